"""The ext_proc pick stream (epp.extproc.stream) over real gRPC: what Envoy gets back for each phase and mode."""

from __future__ import annotations

import orjson
import pytest
from envoy.config.core.v3 import base_pb2

from epp.server import EppServer
from tests.extproc_messages import (
    BUFFERED,
    FULL,
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

