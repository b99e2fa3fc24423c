"""Body-based routing over real gRPC: the headers it sets, the route cache it clears, the body it passes on."""

from __future__ import annotations

from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import grpc
import orjson
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pbg
from grpc_health.v1 import health_pb2, health_pb2_grpc

from epp.gateway.base_models import BaseModels
from epp.gateway.bbr import BbrServer, BodyBasedRouter
from epp.stack import free_ports
from tests.extproc_messages import BUFFERED, FULL, Stream, body_msg, exchange, headers_msg, set_headers

MAPPING = BaseModels({"food-review-1": "Qwen/Qwen3-32B"}, frozenset({"Qwen/Qwen3-32B"}))


@pytest.fixture
async def bbr() -> AsyncIterator[Any]:
    grpc_port, health_port = free_ports(2)
    server = BbrServer(BodyBasedRouter(MAPPING), grpc_port=grpc_port, health_port=health_port,
                       bind_address="127.0.0.1", secure_serving=False)
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}")
    health = grpc.aio.insecure_channel(f"127.0.0.1:{health_port}")
    try:
        yield SimpleNamespace(stub=pbg.ExternalProcessorStub(channel), server=server,
                              health=health_pb2_grpc.HealthStub(health))
    finally:
        await channel.close()
        await health.close()
        await server.stop(0)


def body(model: Any = "food-review-1", **extra: Any) -> bytes:
    return orjson.dumps({"model": model, "prompt": "Write as if you were a critic: San Francisco", **extra})


async def test_streamed_body_sets_model_and_base_model_then_the_body_goes_on_unchanged(bbr: Any) -> None:
    data = body() + b" " * 70000  # longer than one ext_proc body message
    stream = Stream(bbr)
    stream.send(headers_msg(mode=FULL), body_msg(data[:40000], eos=False))
    stream.send(body_msg(data[40000:], eos=True))
    first, *chunks = await stream.read(3)
    stream.close()
    common = first.request_headers.response
    assert common.clear_route_cache  # so Envoy picks the route again, on these headers
    assert set_headers(common) == {"x-gateway-model-name": "food-review-1",
                                   "x-gateway-base-model-name": "Qwen/Qwen3-32B", "content-length": str(len(data))}
    sent = b"".join(c.request_body.response.body_mutation.streamed_response.body for c in chunks)
    assert sent == data
    assert chunks[-1].request_body.response.body_mutation.streamed_response.end_of_stream


async def test_buffered_body_answers_on_the_body_with_the_headers(bbr: Any) -> None:
    headers_answer, body_answer = await exchange(bbr, [headers_msg(mode=BUFFERED), body_msg(body("Qwen/Qwen3-32B"))], 2)
    assert headers_answer.HasField("request_headers")
    common = body_answer.request_body.response
    assert common.clear_route_cache
    assert not common.HasField("body_mutation")
    assert set_headers(common) == {"x-gateway-model-name": "Qwen/Qwen3-32B",
                                   "x-gateway-base-model-name": "Qwen/Qwen3-32B"}


@pytest.mark.parametrize(("doc", "expected"), [
    ({"model": "unmapped"}, {"x-gateway-model-name": "unmapped", "x-gateway-base-model-name": ""}),
    ({"model": ""}, {"x-gateway-base-model-name": ""}),  # as upstream: no model name header for an empty one
    ({"prompt": "no model"}, {}),
    ([1, 2], {}),
])
async def test_what_the_body_names_decides_the_headers(bbr: Any, doc: Any, expected: dict[str, str]) -> None:
    (_, answer) = await exchange(bbr, [headers_msg(mode=BUFFERED), body_msg(orjson.dumps(doc))], 2)
    assert set_headers(answer.request_body.response) == expected


async def test_a_body_that_is_not_json_is_a_400(bbr: Any) -> None:
    (answer,) = await exchange(bbr, [headers_msg(mode=FULL), body_msg(b'{"model": "x", ')], 1)
    assert answer.immediate_response.status.code == 400
    assert "failed to parse request body" in orjson.loads(answer.immediate_response.body)["error"]["message"]


async def test_a_request_without_a_body_passes_untouched(bbr: Any) -> None:
    (answer,) = await exchange(bbr, [headers_msg("/v1/models", eos=True, mode=FULL)], 1)
    assert answer.HasField("request_headers")
    assert not answer.request_headers.response.HasField("header_mutation")


async def test_the_mapping_is_replaced_live_and_health_answers(bbr: Any) -> None:
    bbr.server.router.base_models = BaseModels({"food-review-1": "Qwen/Qwen3-72B"}, frozenset())
    (_, answer) = await exchange(bbr, [headers_msg(mode=BUFFERED), body_msg(body())], 2)
    assert set_headers(answer.request_body.response)["x-gateway-base-model-name"] == "Qwen/Qwen3-72B"
    resp = await bbr.health.Check(health_pb2.HealthCheckRequest(service=""))
    assert resp.status == health_pb2.HealthCheckResponse.SERVING
