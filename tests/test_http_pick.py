"""The HTTP pick (what Envoy's ext_authz asks) over real HTTP, and its hand-off to ext_proc for rewrites."""

from __future__ import annotations

import asyncio

import grpc
import httpx
import orjson
import pytest
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2 as pm
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pbg

from epp.rewrites import ModelRewrites, RewriteRule
from epp.server import EppServer, ServeOptions
from epp.stack import free_ports
from tests.test_extproc import body_msg, exchange, headers_msg

MODEL = "m"


@pytest.fixture
async def epp():
    ports = free_ports(7)
    opts = ServeOptions(
        grpc_port=ports[0], grpc_health_port=ports[1], metrics_port=0, http_pick_port=ports[2],
        bind_address="127.0.0.1", endpoints=[f"127.0.0.1:{p}" for p in ports[3:6]], max_body_bytes=4096,
        seed=1, observer_grace=0.1,
    )
    server = EppServer(opts)
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{ports[0]}")
    server.stub = pbg.ExternalProcessorStub(channel)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{ports[2]}") as client:
        server.client = client
        try:
            yield server
        finally:
            await channel.close()
            await server.stop(grace=1)


def completion(model: str = MODEL, prompt: str = "hello " * 50) -> bytes:
    return orjson.dumps({"model": model, "prompt": prompt, "max_tokens": 4})


async def test_pick_answers_with_the_endpoint_and_exchange(epp: EppServer) -> None:
    r = await epp.client.post("/pick/v1/completions", content=completion(),
                              headers={"content-type": "application/json"})
    assert r.status_code == 200
    dest = r.headers["x-gateway-destination-endpoint"]
    assert dest in epp.opts.endpoints
    assert epp.datastore.get(dest).inflight == 1
    assert r.headers["x-epp-request-id"] in epp.exchanges.open_exchanges
    assert "x-epp-rewrite-body" not in r.headers
    # No observer claims it here: released after the grace period.
    await asyncio.wait_for(_until(lambda: epp.datastore.get(dest).inflight == 0), 5)


async def _until(cond) -> None:
    while not cond():
        await asyncio.sleep(0.01)


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b'{"model": "x", "prompt": ', 400, "invalid_json"),
        (b'{"prompt": "x"}', 400, "missing_model"),
        (completion(prompt="x" * 5000), 400, "request_too_large"),
    ],
)
async def test_errors_are_answered_as_the_client_should_see_them(
    epp: EppServer, body: bytes, status: int, code: str
) -> None:
    r = await epp.client.post("/pick/v1/completions", content=body)
    assert r.status_code == status
    assert r.headers["content-type"] == "application/json"
    assert r.json()["error"]["code"] == code
    assert "x-gateway-destination-endpoint" not in r.headers
    assert all(ep.inflight == 0 for ep in epp.datastore.all_endpoints())


async def test_subset_header_restricts_the_pick_and_none_left_is_a_503(epp: EppServer) -> None:
    only = epp.opts.endpoints[2]
    for _ in range(3):
        r = await epp.client.post("/pick/v1/completions", content=completion(),
                                  headers={"x-gateway-destination-endpoint-subset": only})
        assert r.headers["x-gateway-destination-endpoint"] == only
    r = await epp.client.post("/pick/v1/completions", content=completion(),
                              headers={"x-gateway-destination-endpoint-subset": "10.9.9.9:1"})
    # A 5xx would become ext_authz's own bodiless 503: it goes out through the ext_proc filter instead.
    assert r.status_code == 200
    assert "x-gateway-destination-endpoint" not in r.headers
    extra = {"x-epp-request-id": r.headers["x-epp-request-id"], "x-epp-rewrite-body": r.headers["x-epp-rewrite-body"]}
    out = await exchange(epp, [headers_msg(mode=pm.ProcessingMode.FULL_DUPLEX_STREAMED, extra=extra)], 1)
    imm = out[0].immediate_response
    assert imm.status.code == 503
    assert orjson.loads(imm.body)["error"]["code"] == "no_endpoint"


async def test_a_request_without_body_is_routed_unread(epp: EppServer) -> None:
    r = await epp.client.get("/pick/v1/models")
    assert r.status_code == 200
    assert r.headers["x-gateway-destination-endpoint"] in epp.opts.endpoints


async def test_health_is_ok_only_once_the_pool_is_known(epp: EppServer) -> None:
    assert (await epp.client.get("/healthz")).status_code == 200
    grpc_port, health_port, pick_port = free_ports(3)
    blind = EppServer(ServeOptions(grpc_port=grpc_port, grpc_health_port=health_port, metrics_port=0,
                                   http_pick_port=pick_port, bind_address="127.0.0.1"))
    await blind.start()
    try:
        async with httpx.AsyncClient() as c:
            assert (await c.get(f"http://127.0.0.1:{pick_port}/healthz")).status_code == 503
    finally:
        await blind.stop(grace=0.1)


async def test_a_rewritten_body_goes_out_through_the_ext_proc_stream(epp: EppServer) -> None:
    epp.datastore.rewrites = ModelRewrites([RewriteRule("canary", frozenset({"alias"}), ("m-v2",), (1,))], seed=1)
    r = await epp.client.post("/pick/v1/completions", content=completion(model="alias"))
    assert r.status_code == 200
    assert r.headers["x-epp-rewrite-body"] == "1"
    key, dest = r.headers["x-epp-request-id"], r.headers["x-gateway-destination-endpoint"]
    # Envoy's conditional ext_proc filter then sends the (unchanged) client body with both headers.
    extra = {"x-epp-request-id": key, "x-epp-rewrite-body": "1"}
    out = await exchange(epp, [headers_msg(mode=pm.ProcessingMode.FULL_DUPLEX_STREAMED, extra=extra),
                               body_msg(completion(model="alias"))], 2)
    common = out[0].request_headers.response
    assert {h.header.key: h.header.raw_value.decode() for h in common.header_mutation.set_headers}[
        "x-gateway-destination-endpoint"] == dest  # the same pick, not a new one
    sent = out[1].request_body.response.body_mutation.streamed_response.body
    assert orjson.loads(sent)["model"] == "m-v2"
    assert epp.datastore.get(dest).inflight == 1  # counted once
