"""The ext_proc pick stream (epp.extproc.stream) over real gRPC: what Envoy gets back for each phase and mode."""

from __future__ import annotations

import orjson
import pytest
from envoy.config.core.v3 import base_pb2

from epp.server import EppServer
from tests.extproc_messages import (
    BUFFERED,
    FULL,
    Stream,
    body_msg,
    completion,
    dest_header,
    exchange,
    headers_msg,
    response_body_msg,
    response_headers_msg,
)
from tests.helpers import until


async def test_buffered_mode_routes_on_body_response(epp: EppServer) -> None:
    out = await exchange(epp, [headers_msg(), body_msg(completion())], 2)
    assert out[0].WhichOneof("response") == "request_headers"
    assert not out[0].request_headers.response.HasField("header_mutation")  # a plain continue
    body_resp = out[1]
    assert body_resp.WhichOneof("response") == "request_body"
    dest = dest_header(body_resp.request_body.response)
    assert dest in epp.opts.endpoints
    md = body_resp.dynamic_metadata.fields["envoy.lb"].struct_value.fields["x-gateway-destination-endpoint"]
    assert md.string_value == dest
    assert epp.datastore.get(dest).inflight == 1


async def test_full_duplex_holds_headers_and_sends_body_back(epp: EppServer) -> None:
    data = completion("x" * 3000)
    msgs = [headers_msg(mode=FULL), body_msg(data[:1000], eos=False), body_msg(data[1000:2000], eos=False),
            body_msg(data[2000:], eos=True)]
    out = await exchange(epp, msgs, 2)
    assert out[0].WhichOneof("response") == "request_headers"
    common = out[0].request_headers.response
    assert dest_header(common) in epp.opts.endpoints
    lengths = [h.header.raw_value for h in common.header_mutation.set_headers if h.header.key == "content-length"]
    assert lengths == [str(len(data)).encode()]
    sb = out[1].request_body.response.body_mutation.streamed_response
    assert sb.body == data
    assert sb.end_of_stream


async def test_client_cannot_choose_the_endpoint(epp: EppServer) -> None:
    """A client-sent x-gateway-destination-endpoint is overwritten, not appended to."""
    out = await exchange(epp, [headers_msg(extra={"x-gateway-destination-endpoint": "6.6.6.6:80"}),
                               body_msg(completion())], 2)
    opt = next(h for h in out[1].request_body.response.header_mutation.set_headers
               if h.header.key == "x-gateway-destination-endpoint")
    assert opt.append_action == base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


async def test_request_without_body_is_routed_on_headers(epp: EppServer) -> None:
    out = await exchange(epp, [headers_msg("/v1/models", eos=True)], 1)
    assert dest_header(out[0].request_headers.response) in epp.opts.endpoints


@pytest.mark.parametrize("mode", [BUFFERED, FULL])
async def test_bad_json_is_a_400_immediate_response(epp: EppServer, mode: int) -> None:
    msgs = [headers_msg(mode=mode), body_msg(b'{"model": ')]
    out = await exchange(epp, msgs, 2 if mode == BUFFERED else 1)
    imm = out[-1].immediate_response
    assert imm.status.code == 400
    assert orjson.loads(imm.body)["error"]["code"] == "invalid_json"
    set_headers = [(h.header.key, h.header.raw_value) for h in imm.headers.set_headers]
    assert ("content-type", b"application/json") in set_headers


async def test_oversized_body_is_rejected_before_it_ends(epp: EppServer) -> None:
    """In FULL_DUPLEX_STREAMED the limit trips on the chunk that crosses it; the rest is never awaited."""
    out = await exchange(epp, [headers_msg(mode=FULL), body_msg(b"x" * 5000, eos=False)], 1)
    assert out[0].immediate_response.status.code == 400
    assert b"exceeds the limit of 4096 bytes" in out[0].immediate_response.body


async def test_subset_hint_restricts_and_empty_intersection_is_503(epp: EppServer) -> None:
    only = epp.opts.endpoints[2]
    for _ in range(5):
        out = await exchange(epp, [headers_msg(subset=[only]), body_msg(completion())], 2)
        assert dest_header(out[1].request_body.response) == only
    out = await exchange(epp, [headers_msg(subset=["10.9.9.9:8000"]), body_msg(completion())], 2)
    assert out[1].immediate_response.status.code == 503
    assert b"subset hint" in out[1].immediate_response.body


async def test_no_ready_endpoint_is_503(epp: EppServer) -> None:
    epp.datastore.set_endpoints([])
    out = await exchange(epp, [headers_msg(), body_msg(completion())], 2)
    assert out[1].immediate_response.status.code == 503


async def test_inflight_released_on_response_end_and_on_early_stream_end(epp: EppServer) -> None:
    # Finished normally: response headers then a final body chunk.
    call_msgs = [headers_msg(), body_msg(completion()), response_headers_msg(200),
                 response_body_msg(b'{"usage":{"prompt_tokens":3}}', eos=True)]
    out = await exchange(epp, call_msgs, 4)
    dest = dest_header(out[1].request_body.response)
    assert epp.datastore.get(dest).inflight == 0
    # Ended early: the stream closes after the pick, with no response at all (client went away, or
    # the proxy watches responses elsewhere and no observer came): released after observer_grace.
    out = await exchange(epp, [headers_msg(), body_msg(completion())], 2)
    dest = dest_header(out[1].request_body.response)
    await until(lambda: epp.datastore.get(dest).inflight == 0, what="the unwatched pick to be released")


async def test_a_vanished_endpoint_mid_request_is_harmless(epp: EppServer) -> None:
    out = await exchange(epp, [headers_msg(), body_msg(completion())], 2)
    dest = dest_header(out[1].request_body.response)
    survivors = [ep for ep in epp.datastore.all_endpoints() if ep.hostport != dest]
    epp.datastore.set_endpoints(survivors)  # the pod leaves while its request is in flight
    for _ in range(5):
        out = await exchange(epp, [headers_msg(), body_msg(completion())], 2)
        assert dest_header(out[1].request_body.response) in {ep.hostport for ep in survivors}


# --- messages out of order: a stream opens at most one exchange, and answers what Envoy waits for ---

def inflight(epp: EppServer) -> int:
    return sum(ep.inflight for ep in epp.datastore.all_endpoints())


async def test_a_second_request_headers_after_the_pick_does_not_pick_again(epp: EppServer) -> None:
    stream = Stream(epp)
    stream.send(headers_msg(), body_msg(completion()))
    _, routed = await stream.read(2)
    dest = dest_header(routed.request_body.response)
    stream.send(headers_msg(), body_msg(completion()))  # a proxy bug, or a forged replay
    again = await stream.read(2)
    assert [r.WhichOneof("response") for r in again] == ["request_headers", "request_body"]
    assert not again[0].request_headers.response.HasField("header_mutation")
    assert not again[1].request_body.response.HasField("header_mutation")  # a plain continue, no new pick
    assert inflight(epp) == 1
    assert epp.datastore.get(dest).inflight == 1
    assert len(epp.exchanges) == 1
    stream.close()
    assert await stream.rest() == []
    await until(lambda: inflight(epp) == 0, what="the one pick to be released")
    assert len(epp.exchanges) == 0


@pytest.mark.parametrize("eos", [False, True])
async def test_a_large_body_chunk_after_the_pick_is_forwarded_whole(epp: EppServer, eos: bool) -> None:
    """FULL_DUPLEX_STREAMED: epp sends the body on itself, in messages of at most 62,000 bytes; a chunk
    that arrives after the pick goes on in as many messages as it needs, none of it lost."""
    stream = Stream(epp)
    stream.send(headers_msg("/v1/models", eos=True, mode=FULL))  # routed on its headers
    [routed] = await stream.read()
    assert dest_header(routed.request_headers.response) in epp.opts.endpoints
    late = bytes(range(256)) * 600  # 153,600 bytes, over the 4096-byte limit for bodies epp reads
    stream.send(body_msg(late, eos=eos))
    sent = [r.request_body.response.body_mutation.streamed_response for r in await stream.read(3)]
    assert b"".join(s.body for s in sent) == late
    assert [len(s.body) for s in sent] == [62_000, 62_000, 29_600]
    assert [s.end_of_stream for s in sent] == [False, False, eos]
    stream.close()
    assert await stream.rest() == []


async def test_a_body_before_the_headers_is_answered_nothing_and_breaks_nothing(epp: EppServer) -> None:
    stream = Stream(epp)
    stream.send(body_msg(b'{"model": "stale", "prompt": ', eos=False), headers_msg(), body_msg(completion()))
    first, routed = await stream.read(2)
    assert first.WhichOneof("response") == "request_headers"  # the stray body got no answer
    assert routed.WhichOneof("response") == "request_body"
    assert dest_header(routed.request_body.response) in epp.opts.endpoints  # the body parsed whole: no 400
    assert inflight(epp) == 1
    stream.close()
    assert await stream.rest() == []
