"""The ext_proc protocol over real gRPC: what Envoy gets back for each phase and mode."""

from __future__ import annotations

import asyncio

import grpc
import orjson
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2 as pm
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pbg
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.stack import free_ports
from epp.server import EppServer, ServeOptions

MODEL = "m"
FULL = pm.ProcessingMode.FULL_DUPLEX_STREAMED
BUFFERED = pm.ProcessingMode.BUFFERED


def headers_msg(path: str = "/v1/completions", *, eos: bool = False, mode: int = BUFFERED,
                subset: list[str] | None = None, extra: dict[str, str] | None = None) -> pb.ProcessingRequest:
    hs = {":path": path, ":method": "GET" if eos else "POST", "content-type": "application/json", **(extra or {})}
    msg = pb.ProcessingRequest(request_headers=pb.HttpHeaders(
        headers=base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in hs.items()]),
        end_of_stream=eos))
    msg.protocol_config.request_body_mode = mode
    msg.protocol_config.response_body_mode = mode
    if subset is not None:
        ns = msg.metadata_context.filter_metadata["envoy.lb.subset_hint"]
        lv = ns.fields["x-gateway-destination-endpoint-subset"].list_value
        for s in subset:
            lv.values.add().string_value = s
    return msg


def body_msg(data: bytes, eos: bool = True) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(request_body=pb.HttpBody(body=data, end_of_stream=eos))


def completion(prompt: str = "hello " * 50) -> bytes:
    return orjson.dumps({"model": MODEL, "prompt": prompt, "max_tokens": 4})


def dest_header(common: pb.CommonResponse) -> str:
    for h in common.header_mutation.set_headers:
        if h.header.key == "x-gateway-destination-endpoint":
            return h.header.raw_value.decode()
    return ""


@pytest.fixture
async def epp():
    ports = free_ports(6)
    opts = ServeOptions(
        grpc_port=ports[0], grpc_health_port=ports[1], metrics_port=0, bind_address="127.0.0.1",
        endpoints=[f"127.0.0.1:{p}" for p in ports[2:5]], max_body_bytes=4096, seed=1,
    )
    server = EppServer(opts)
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{ports[0]}")
    server.stub = pbg.ExternalProcessorStub(channel)
    server.endpoint_names = opts.endpoints
    try:
        yield server
    finally:
        await channel.close()
        await server.stop(grace=1)


async def exchange(server: EppServer, msgs: list[pb.ProcessingRequest], n: int) -> list[pb.ProcessingResponse]:
    """Send messages on one stream; collect n responses, then half-close."""
    queue: asyncio.Queue = asyncio.Queue()
    for m in msgs:
        queue.put_nowait(m)

    async def gen():
        while True:
            m = await queue.get()
            if m is None:
                return
            yield m

    call = server.stub.Process(gen())
    out = []
    for _ in range(n):
        out.append(await asyncio.wait_for(call.read(), 5))
    queue.put_nowait(None)
    return out


async def test_health_serving_once_pool_known(epp: EppServer) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{epp.opts.grpc_health_port}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for service in ("", "envoy.service.ext_proc.v3.ExternalProcessor", "readiness"):
            resp = await stub.Check(health_pb2.HealthCheckRequest(service=service))
            assert resp.status == health_pb2.HealthCheckResponse.SERVING


async def test_buffered_mode_routes_on_body_response(epp: EppServer) -> None:
    out = await exchange(epp, [headers_msg(), body_msg(completion())], 2)
    assert out[0].WhichOneof("response") == "request_headers"
    assert not out[0].request_headers.response.HasField("header_mutation")  # a plain continue
    body_resp = out[1]
    assert body_resp.WhichOneof("response") == "request_body"
    dest = dest_header(body_resp.request_body.response)
    assert dest in epp.endpoint_names
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
    assert dest_header(common) in epp.endpoint_names
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
    assert dest_header(out[0].request_headers.response) in epp.endpoint_names


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
    only = epp.endpoint_names[2]
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
    call_msgs = [headers_msg(), body_msg(completion()),
                 pb.ProcessingRequest(response_headers=pb.HttpHeaders(headers=base_pb2.HeaderMap(
                     headers=[base_pb2.HeaderValue(key=":status", raw_value=b"200")]))),
                 pb.ProcessingRequest(response_body=pb.HttpBody(body=b'{"usage":{"prompt_tokens":3}}',
                                                                end_of_stream=True))]
    out = await exchange(epp, call_msgs, 4)
    dest = dest_header(out[1].request_body.response)
    assert epp.datastore.get(dest).inflight == 0
    # Ended early: the stream closes after the pick, with no response at all (client went away).
    out = await exchange(epp, [headers_msg(), body_msg(completion())], 2)
    dest = dest_header(out[1].request_body.response)

    async def released() -> None:
        while epp.datastore.get(dest).inflight != 0:
            await asyncio.sleep(0.01)

    await asyncio.wait_for(released(), 5)


async def test_a_vanished_endpoint_mid_request_is_harmless(epp: EppServer) -> None:
    out = await exchange(epp, [headers_msg(), body_msg(completion())], 2)
    dest = dest_header(out[1].request_body.response)
    survivors = [ep for ep in epp.datastore.all_endpoints() if ep.hostport != dest]
    epp.datastore.set_endpoints(survivors)  # the pod leaves while its request is in flight
    for _ in range(5):
        out = await exchange(epp, [headers_msg(), body_msg(completion())], 2)
        assert dest_header(out[1].request_body.response) in {ep.hostport for ep in survivors}
