"""The HTTP pick (what Envoy's ext_authz asks, epp.http_pick) over real HTTP."""

from __future__ import annotations

import asyncio
import time

import orjson
import pytest

from epp.server import EppServer
from tests.extproc_messages import FULL, completion, exchange, headers_msg
from tests.helpers import StartEpp, until


@pytest.fixture
async def epp(start_epp: StartEpp) -> EppServer:
    """This module's epp serves the HTTP pick too (`epp.http` is its client)."""
    return await start_epp(http_pick=True)


async def test_pick_answers_with_the_endpoint_and_exchange(epp: EppServer) -> None:
    r = await epp.http.post("/pick/v1/completions", content=completion(),
                            headers={"content-type": "application/json"})
    assert r.status_code == 200
    dest = r.headers["x-gateway-destination-endpoint"]
    assert dest in epp.opts.endpoints
    assert epp.datastore.get(dest).inflight == 1
    assert r.headers["x-epp-request-id"] in epp.exchanges.open_exchanges
    assert "x-epp-rewrite-body" not in r.headers
    # No observer claims it here: released after the grace period.
    await until(lambda: epp.datastore.get(dest).inflight == 0, what="the unwatched pick to be released")


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
    r = await epp.http.post("/pick/v1/completions", content=body)
    assert r.status_code == status
    assert r.headers["content-type"] == "application/json"
    assert r.json()["error"]["code"] == code
    assert "x-gateway-destination-endpoint" not in r.headers
    assert all(ep.inflight == 0 for ep in epp.datastore.all_endpoints())


async def test_subset_header_restricts_the_pick_and_none_left_is_a_503(epp: EppServer) -> None:
    only = epp.opts.endpoints[2]
    for _ in range(3):
        r = await epp.http.post("/pick/v1/completions", content=completion(),
                                headers={"x-gateway-destination-endpoint-subset": only})
        assert r.headers["x-gateway-destination-endpoint"] == only
    r = await epp.http.post("/pick/v1/completions", content=completion(),
                            headers={"x-gateway-destination-endpoint-subset": "10.9.9.9:1"})
    # A 5xx would become ext_authz's own bodiless 503: it goes out through the ext_proc filter instead.
    assert r.status_code == 200
    assert "x-gateway-destination-endpoint" not in r.headers
    extra = {"x-epp-request-id": r.headers["x-epp-request-id"], "x-epp-rewrite-body": r.headers["x-epp-rewrite-body"]}
    out = await exchange(epp, [headers_msg(mode=FULL, extra=extra)], 1)
    imm = out[0].immediate_response
    assert imm.status.code == 503
    assert orjson.loads(imm.body)["error"]["code"] == "no_endpoint"


async def test_a_request_without_body_is_routed_unread(epp: EppServer) -> None:
    r = await epp.http.get("/pick/v1/models")
    assert r.status_code == 200
    assert r.headers["x-gateway-destination-endpoint"] in epp.opts.endpoints


async def test_health_is_ok_only_once_the_pool_is_known(epp: EppServer, start_epp: StartEpp, cluster) -> None:
    assert (await epp.http.get("/healthz")).status_code == 200
    # An InferencePool the API server does not have: never synced.
    blind = await start_epp(endpoints=0, http_pick=True, pool_name="absent", pool_namespace="prod",
                            kubeconfig=cluster.kubeconfig)
    assert (await blind.http.get("/healthz")).status_code == 503


async def test_a_large_header_is_taken_as_envoy_passes_it(epp: EppServer) -> None:
    """Envoy allows 60 KiB of headers and ext_authz passes Authorization on: a 9 KB bearer token is routine."""
    token = "Bearer " + "t" * 9000
    r = await epp.http.post("/pick/v1/completions", content=completion(),
                            headers={"content-type": "application/json", "authorization": token})
    assert r.status_code == 200
    assert r.headers["x-gateway-destination-endpoint"] in epp.opts.endpoints


async def test_an_unparsable_request_never_logs_its_bytes(epp: EppServer, caplog: pytest.LogCaptureFixture) -> None:
    import asyncio
    import logging

    caplog.set_level(logging.DEBUG)
    secret = "sk-" + "s" * 70_000  # past even the raised limit
    reader, writer = await asyncio.open_connection("127.0.0.1", epp.opts.http_pick_port)
    writer.write(f"POST /pick/v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {secret}\r\n\r\n".encode())
    await writer.drain()
    status = await asyncio.wait_for(reader.readline(), 5)
    writer.close()
    assert status.split()[1] == b"400"
    assert "sss" not in caplog.text


async def test_a_connection_trickling_its_headers_is_closed_after_the_header_timeout(start_epp: StartEpp) -> None:
    server = await start_epp(http_pick=True, http_pick_header_timeout=0.5)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.opts.http_pick_port)
    head = b"POST /pick/v1/completions HTTP/1.1\r\nhost: epp\r\nx-padding: " + b"a" * 200 + b"\r\n\r\n"
    started = time.monotonic()
    sent = 0
    closed = asyncio.ensure_future(reader.read())  # b"" once epp closes the connection
    for byte in head:  # a slowloris: 20 bytes a second, never finishing the headers in time
        if closed.done():
            break
        try:
            writer.write(bytes([byte]))
            await writer.drain()
        except ConnectionError:
            break
        sent += 1
        await asyncio.wait([closed], timeout=0.05)  # the client's pace, not a synchronisation
    assert await asyncio.wait_for(closed, 5) == b""
    assert sent < len(head)  # closed before the headers were complete
    assert 0.4 < time.monotonic() - started < 3.0
    writer.close()


async def test_a_kept_alive_connection_idle_between_requests_stays_open(start_epp: StartEpp) -> None:
    server = await start_epp(http_pick=True, http_pick_header_timeout=0.3)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.opts.http_pick_port)
    body = completion()
    request = (b"POST /pick/v1/completions HTTP/1.1\r\nhost: epp\r\ncontent-type: application/json\r\n"
               b"content-length: %d\r\n\r\n" % len(body) + body)
    for _ in range(2):
        writer.write(request)
        await writer.drain()
        status = await asyncio.wait_for(reader.readline(), 5)
        assert status.startswith(b"HTTP/1.1 200"), status
        while (await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b""):
            pass
        # Idle for longer than the header timeout: the timeout counts from a request's first byte only.
        assert not await asyncio.wait_for(_closed_within(reader, 0.6), 5)
    writer.close()


async def _closed_within(reader: asyncio.StreamReader, seconds: float) -> bool:
    try:
        return await asyncio.wait_for(reader.read(1), seconds) == b""
    except TimeoutError:
        return False
