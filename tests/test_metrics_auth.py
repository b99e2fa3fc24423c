"""/metrics behind TokenReview + SubjectAccessReview, against the stand-in API server (tests/kubeapi.py).

The scraper is the GKE Inference Gateway deployment guide's metrics reader: ServiceAccount
`inference-gateway-sa-metrics-reader`, bound to a ClusterRole allowing `get` on /metrics.
"""

from __future__ import annotations

import asyncio
import gzip
import logging
import ssl
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import httpx
import pytest
from lightkube import AsyncClient
from prometheus_client import CollectorRegistry, Counter

from epp.discovery.kubernetes import load_kube_config
from epp.metrics_auth import KubernetesAuthorizer, bearer_token
from epp.metrics_endpoint import MetricsEndpoint
from tests.kubeapi import KubeApi

NS = "default"
REVIEWS = ["tokenreviews.authentication.k8s.io", "subjectaccessreviews.authorization.k8s.io"]


@pytest.fixture
def api() -> Iterator[KubeApi]:
    with KubeApi() as server:
        yield server


@pytest.fixture
def registry() -> CollectorRegistry:
    reg = CollectorRegistry()
    Counter("inference_objective_request", "Requests", ["model_name"], registry=reg).labels("llama").inc(3)
    return reg


class Scrapers:
    """The tokens the tests scrape with."""

    def __init__(self, api: KubeApi) -> None:
        self.reader, reader_user = api.service_account(NS, "inference-gateway-sa-metrics-reader")
        api.grant_urls(reader_user, ["get"], ["/metrics"])  # ClusterRole inference-gateway-metrics-reader
        self.other, _ = api.service_account(NS, "some-app")  # authenticated, not granted


async def epp_client(api: KubeApi, tmp: Path, *, may_review: bool = True) -> AsyncClient:
    token, user = api.service_account(NS, "epp")
    if may_review:
        api.grant(user, ["create"], REVIEWS)  # cluster-wide, as a ClusterRole binding gives it
    return AsyncClient(load_kube_config(api.kubeconfig(tmp / "kc-epp", token)))


@pytest.fixture
async def endpoint(api: KubeApi, registry: CollectorRegistry, tmp_path: Path) -> AsyncIterator[MetricsEndpoint]:
    client = await epp_client(api, tmp_path)
    ep = MetricsEndpoint(registry, "127.0.0.1", 0, authorizer=KubernetesAuthorizer(
        client, authn_ttl=60, allow_ttl=60, deny_ttl=60, retry_initial=0.01, retry_steps=2))
    await ep.start()
    yield ep
    await ep.stop()
    await client.close()


async def scrape(ep: MetricsEndpoint, token: str | None = None, path: str = "/metrics",
                 **headers: str) -> httpx.Response:
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    async with httpx.AsyncClient() as c:
        return await c.get(f"http://127.0.0.1:{ep.port}{path}", headers=headers)


async def until(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met")
        await asyncio.sleep(0.01)


async def test_reader_gets_metrics_others_get_401_or_403(api: KubeApi, endpoint: MetricsEndpoint) -> None:
    s = Scrapers(api)
    ok = await scrape(endpoint, s.reader)
    assert ok.status_code == 200
    assert 'inference_objective_request_total{model_name="llama"} 3.0' in ok.text
    assert ok.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert (await scrape(endpoint)).status_code == 401
    assert (await scrape(endpoint, "not-a-token")).status_code == 401
    assert (await scrape(endpoint, Authorization="Basic dXNlcjpwdw==")).status_code == 401
    denied = await scrape(endpoint, s.other)
    assert denied.status_code == 403
    assert "system:serviceaccount:default:some-app" in denied.text
    assert (await scrape(endpoint, s.reader, path="/debug")).status_code == 404
    assert endpoint.scrapes == 1


async def test_answers_are_cached_for_tokens_and_grants(api: KubeApi, endpoint: MetricsEndpoint) -> None:
    s = Scrapers(api)
    assert (await scrape(endpoint, s.reader)).status_code == 200
    assert (await scrape(endpoint, s.other)).status_code == 403
    assert (await scrape(endpoint, "bad")).status_code == 401
    reviews = (api.calls_to("tokenreviews"), api.calls_to("subjectaccessreviews"))
    assert reviews == (3, 2)
    for _ in range(3):
        assert (await scrape(endpoint, s.reader)).status_code == 200
        assert (await scrape(endpoint, s.other)).status_code == 403
        assert (await scrape(endpoint, "bad")).status_code == 401
    assert (api.calls_to("tokenreviews"), api.calls_to("subjectaccessreviews")) == reviews
    # Concurrent scrapes of a new token ask the API once.
    token, user = api.service_account(NS, "prometheus")
    api.grant_urls(user, ["get"], ["/metrics"])
    got = await asyncio.gather(*(scrape(endpoint, token) for _ in range(5)))
    assert [r.status_code for r in got] == [200] * 5
    assert api.calls_to("tokenreviews") == reviews[0] + 1


async def test_cache_entries_expire(api: KubeApi, registry: CollectorRegistry, tmp_path: Path) -> None:
    s = Scrapers(api)
    client = await epp_client(api, tmp_path)
    ep = MetricsEndpoint(registry, "127.0.0.1", 0, authorizer=KubernetesAuthorizer(
        client, authn_ttl=0.2, allow_ttl=0.2, deny_ttl=0.2, max_entries=2))
    await ep.start()
    try:
        assert (await scrape(ep, s.reader)).status_code == 200
        before = api.calls_to("tokenreviews")
        api.revoke_token(s.reader)  # revoked: allowed until its cache entry expires, then 401

        async def revoked() -> bool:
            return (await scrape(ep, s.reader)).status_code == 401
        deadline = time.monotonic() + 5
        while not await revoked():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        assert api.calls_to("tokenreviews") > before
    finally:
        await ep.stop()
        await client.close()


@pytest.mark.parametrize("mode", ["refuse", "unavailable"])
async def test_api_down_is_503_never_a_cached_denial(api: KubeApi, endpoint: MetricsEndpoint, mode: str,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "epp.metrics_auth")
    s = Scrapers(api)
    assert (await scrape(endpoint, s.reader)).status_code == 200
    api.outage(mode)
    assert (await scrape(endpoint, s.reader)).status_code == 200  # cached: the scrape goes on
    for _ in range(3):
        assert (await scrape(endpoint, s.other)).status_code == 503
    api.outage(None)
    assert (await scrape(endpoint, s.other)).status_code == 403  # asked again, not remembered as an error
    text = [r.getMessage() for r in caplog.records if r.name == "epp.metrics_auth"]
    assert len([m for m in text if "cannot reach the Kubernetes API" in m]) == 1
    assert len([m for m in text if "reaches the Kubernetes API again" in m]) == 1


async def test_epp_without_review_rights_says_which_grant_is_missing(
        api: KubeApi, registry: CollectorRegistry, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    s = Scrapers(api)
    client = await epp_client(api, tmp_path, may_review=False)
    ep = MetricsEndpoint(registry, "127.0.0.1", 0, authorizer=KubernetesAuthorizer(client))
    await ep.start()
    try:
        for _ in range(3):
            r = await scrape(ep, s.reader)
            assert r.status_code == 500
            assert "may not create tokenreviews.authentication.k8s.io" in r.text
    finally:
        await ep.stop()
        await client.close()
    errors = [r.getMessage() for r in caplog.records if r.name == "epp.metrics_auth" and r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "grant `create` on tokenreviews.authentication.k8s.io" in errors[0]


async def test_the_review_carries_the_users_groups_uid_and_extra(api: KubeApi, endpoint: MetricsEndpoint) -> None:
    api.add_token("oidc-token", "alice@example.com", groups=["monitoring"], uid="u-1", extra={"scopes": ["metrics"]})
    api.grant_urls("group:monitoring", ["get"], ["/metrics"])  # granted through a group only
    assert (await scrape(endpoint, "oidc-token")).status_code == 200
    sar = next(r for r in api.reviews if r["kind"] == "SubjectAccessReview")
    assert sar == {"kind": "SubjectAccessReview", "user": "alice@example.com", "uid": "u-1",
                   "groups": ["monitoring", "system:authenticated"], "extra": {"scopes": ["metrics"]},
                   "nonResourceAttributes": {"path": "/metrics", "verb": "get"}}
    assert next(r for r in api.reviews if r["kind"] == "TokenReview") == {"kind": "TokenReview",
                                                                          "token": "oidc-token"}


async def test_gzip_and_no_auth(api: KubeApi, registry: CollectorRegistry) -> None:
    ep = MetricsEndpoint(registry, "127.0.0.1", 0)  # --metrics-endpoint-auth=false
    await ep.start()
    try:
        async with httpx.AsyncClient() as c:
            r = await c.get(f"http://127.0.0.1:{ep.port}/metrics", headers={"Accept-Encoding": "identity"})
            assert r.status_code == 200
            assert "inference_objective_request_total" in r.text
            raw = await c.send(c.build_request("GET", f"http://127.0.0.1:{ep.port}/metrics",
                                               headers={"Accept-Encoding": "gzip"}), stream=True)
            assert raw.headers["content-encoding"] == "gzip"
            body = b"".join([chunk async for chunk in raw.aiter_raw()])
            await raw.aclose()
            assert b"inference_objective_request_total" in gzip.decompress(body)
    finally:
        await ep.stop()


async def test_https_when_given_a_certificate(api: KubeApi, registry: CollectorRegistry) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(Path(api._tmp.name, "tls.crt"), Path(api._tmp.name, "tls.key"))  # a self-signed pair
    ep = MetricsEndpoint(registry, "127.0.0.1", 0, ssl_context=ctx)
    await ep.start()
    try:
        verify = ssl.create_default_context(cadata=api.ca_pem)
        async with httpx.AsyncClient(verify=verify) as c:
            r = await c.get(f"https://127.0.0.1:{ep.port}/metrics")
        assert r.status_code == 200
    finally:
        await ep.stop()


def test_bearer_header_parsing() -> None:
    assert bearer_token("Bearer abc") == "abc"
    assert bearer_token("bearer abc") == "abc"
    assert bearer_token("Bearer ") is None
    assert bearer_token("Basic abc") is None
    assert bearer_token(None) is None
