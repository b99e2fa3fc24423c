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

from epp.server import EppServer, ServeOptions
from epp.stack import free_ports

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
        endpoints=[f"127.0.0.1:{p}" for p in ports[2:5]], max_body_bytes=4096, seed=1, observer_grace=0.1,
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
    # Ended early: the stream closes after the pick, with no response at all (client went away, or
    # the proxy watches responses elsewhere and no observer came): released after observer_grace.
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


# --- the observed layout: a second ext_proc filter in observability_mode watches the response ---

def pick_key(common: pb.CommonResponse) -> str:
    for h in common.header_mutation.set_headers:
        if h.header.key == "x-epp-request-id":
            return h.header.raw_value.decode()
    return ""


def observer_headers(key: str) -> pb.ProcessingRequest:
    hs = [base_pb2.HeaderValue(key="x-epp-request-id", raw_value=key.encode())]
    return pb.ProcessingRequest(observability_mode=True,
                                request_headers=pb.HttpHeaders(headers=base_pb2.HeaderMap(headers=hs)))


def observed(msg: pb.ProcessingRequest) -> pb.ProcessingRequest:
    msg.observability_mode = True
    return msg


SSE_HEADERS = pb.ProcessingRequest(response_headers=pb.HttpHeaders(headers=base_pb2.HeaderMap(headers=[
    base_pb2.HeaderValue(key=":status", raw_value=b"200"),
    base_pb2.HeaderValue(key="content-type", raw_value=b"text/event-stream")])))


class Observer:
    """An observer stream as Envoy drives it: messages go out, nothing is read back until the end."""

    def __init__(self, server: EppServer) -> None:
        self.queue: asyncio.Queue = asyncio.Queue()

        async def gen():
            while (m := await self.queue.get()) is not None:
                yield m

        self.call = server.stub.Process(gen())

    def send(self, *msgs: pb.ProcessingRequest) -> None:
        for m in msgs:
            self.queue.put_nowait(observed(m))

    async def responses(self) -> list[pb.ProcessingResponse]:
        """Everything epp answered, once it ended the stream."""
        out = []
        while (r := await asyncio.wait_for(self.call.read(), 5)) is not grpc.aio.EOF:
            out.append(r)
        return out


async def until(cond, timeout: float = 5) -> None:
    async def poll() -> None:
        while not cond():
            await asyncio.sleep(0.005)

    await asyncio.wait_for(poll(), timeout)


def sample(epp: EppServer, name: str) -> float:
    return epp.metrics.registry.get_sample_value(name, {"model_name": MODEL, "target_model_name": MODEL}) or 0.0


async def test_observer_stream_holds_the_request_until_its_response_ends(epp: EppServer) -> None:
    out = await exchange(epp, [headers_msg(mode=FULL), body_msg(completion())], 2)
    common = out[0].request_headers.response
    dest, key = dest_header(common), pick_key(common)
    assert key, "the pick names its exchange for the observer"
    ep = epp.datastore.get(dest)
    obs = Observer(epp)  # the pick stream has closed; the observer stream opens as Envoy sends on
    obs.send(observer_headers(key), SSE_HEADERS,
             pb.ProcessingRequest(response_body=pb.HttpBody(body=b'data: {"choices":[]}\n\n')))
    exchange_ = epp.exchanges.open_exchanges[key]
    await until(lambda: exchange_.usage.first_byte_at > 0)
    await asyncio.sleep(3 * epp.opts.observer_grace)  # long past the grace a pick without observer gets
    assert ep.inflight == 1, "a watched request stays in flight while it streams"
    usage = b'data: {"choices":[],"usage":{"prompt_tokens":51,"completion_tokens":4}}\n\ndata: [DONE]\n\n'
    obs.send(pb.ProcessingRequest(response_body=pb.HttpBody(body=usage, end_of_stream=True)))
    assert await obs.responses() == [], "observability_mode: epp answers nothing and ends the stream"
    assert ep.inflight == 0
    assert key not in epp.exchanges.open_exchanges
    assert sample(epp, "inference_objective_input_tokens_sum") == 51
    assert sample(epp, "inference_objective_request_ttft_seconds_count") == 1


async def test_observer_stream_that_ends_early_releases_the_request(epp: EppServer) -> None:
    out = await exchange(epp, [headers_msg(), body_msg(completion())], 2)
    common = out[1].request_body.response
    ep, key = epp.datastore.get(dest_header(common)), pick_key(common)
    obs = Observer(epp)
    obs.send(observer_headers(key), SSE_HEADERS)
    await until(lambda: epp.exchanges.open_exchanges[key].usage.status == 200)
    obs.queue.put_nowait(None)  # the client went away: Envoy closes the observer stream
    await obs.responses()
    assert ep.inflight == 0


async def test_observer_for_an_unknown_exchange_is_closed_at_once(epp: EppServer) -> None:
    """Another replica's pick, or one long released: epp ends the stream, so Envoy sends no more."""
    obs = Observer(epp)
    obs.send(observer_headers("not-ours-1"))
    assert await obs.responses() == []
    assert all(ep.inflight == 0 for ep in epp.datastore.all_endpoints())
