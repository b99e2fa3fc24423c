"""Envoy's side of a fault, through the shipped bootstraps: a pod that died is retried elsewhere, and an
unreachable epp is a 503 with a JSON body.

Real processes throughout: one simulator process per pod (so one can be SIGKILLed alone), `epp serve`
and Envoy from the shipped bootstraps of both layouts, with the pool's servers in Envoy's
`inference_pool` cluster. epp scrapes once a minute here, so it keeps picking the dead pod for the
whole test, as a real epp does in the moments before it notices: every such request must still
succeed for the client.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from epp.envoy import EnvoyOptions
from epp.stack import Stack, StackOptions, wait_until

pytestmark = pytest.mark.integration

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
BODY = {"model": MODEL, "prompt": "retry me elsewhere", "max_tokens": 3}
# A random pick, with fallbacks: the dead pod is picked about a third of the time, and the rest of the
# pick's list says where its retry must go.
RANDOM_WITH_FALLBACKS = """
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: random-picker
  parameters: {maxNumOfEndpoints: 3}
schedulingProfiles:
- name: default
  plugins: [{pluginRef: random-picker}]
"""
# What Envoy logs for each request: the host that answered, how many tries, the pick and its fallbacks.
# The HTTP pick layout carries the list in a header, since ext_authz cannot set metadata.
LOG_FORMAT = {layout: f"%UPSTREAM_HOST% %UPSTREAM_REQUEST_ATTEMPT_COUNT% {targets}\n" for layout, targets in [
    ("ext-proc", "%DYNAMIC_METADATA(envoy.lb:x-gateway-destination-endpoint)%"),
    ("http-pick", "%REQ(x-epp-destination-endpoints)%"),
]}


def start(layout: str, tmp_path: Path, epp_args: list[str]) -> Stack:
    envoy = EnvoyOptions(0, 0, 0, layout=layout, access_log_path=str(tmp_path / "access.log"),
                         access_log_format=LOG_FORMAT[layout])
    return Stack(StackOptions(servers=3, process_per_server=True, layout=layout, envoy=envoy,
                              sim_args=["--time-scale", "0.1"], epp_args=epp_args)).start()


@pytest.fixture(params=["ext-proc", "http-pick"])
def stack(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stack]:
    s = start(request.param, tmp_path, ["--config-text", RANDOM_WITH_FALLBACKS, "--explain-headers", "--seed", "7",
                                        "--refresh-metrics-interval", "60s", "--metrics-staleness-threshold", "120s"])
    try:
        yield s
    finally:
        s.stop()


def access_log(path: Path) -> list[list[str]]:
    return [line.split(" ") for line in path.read_text().splitlines() if line.strip()]


def test_requests_picked_to_a_killed_pod_are_answered_by_another(stack: Stack, tmp_path: Path) -> None:
    dead = stack.endpoints[0]
    stack.kill_simulator(0)
    picked_dead = 0
    with httpx.Client(base_url=stack.url, timeout=30) as client:
        for _ in range(45):
            r = client.post("/v1/completions", json=BODY)
            assert r.status_code == 200, f"{r.status_code} {r.text[:200]}"
            assert r.json()["choices"], r.text
            if r.headers["x-epp-endpoint"] == dead:
                picked_dead += 1
                assert not r.headers["x-simulator-pod"].startswith("sim0-"), "the dead pod answered"
    assert picked_dead >= 5, f"epp picked the dead pod {picked_dead} times of 45: the test proved nothing"
    wait_until(lambda: len(access_log(tmp_path / "access.log")) >= 45, 10, "Envoy's access log")
    retried = [row for row in access_log(tmp_path / "access.log") if row[1] != "1"]
    assert len(retried) == picked_dead, f"tries per request: {access_log(tmp_path / 'access.log')}"
    for host, tries, targets in retried:
        assert host != dead, (host, tries, targets)
        assert tries == "2", (host, tries, targets)
        pick, *fallbacks = targets.split(",")
        assert pick == dead, targets
        assert host == next(t for t in fallbacks if t != dead), \
            f"retried on {host}, not on the pick's first live fallback ({targets})"


@pytest.mark.parametrize("layout", ["ext-proc", "http-pick"])
def test_failclose_answers_json_when_epp_is_unreachable(layout: str, tmp_path: Path) -> None:
    stack = start(layout, tmp_path, [])
    try:
        with httpx.Client(base_url=stack.url, timeout=30) as client:
            assert client.post("/v1/completions", json=BODY).status_code == 200
            stack.epp_proc.kill()
            stack.epp_proc.wait()
            r = client.post("/v1/completions", json=BODY)
        assert r.status_code == 503
        assert r.headers["content-type"] == "application/json"
        error = orjson.loads(r.content)["error"]
        assert error["code"] == "endpoint_picker_unavailable", error
        assert error["type"] == "service_unavailable", error
        assert error["message"]
    finally:
        stack.stop()


@pytest.mark.parametrize("layout", ["ext-proc", "http-pick"])
def test_failopen_without_epp_is_balanced_over_the_pool(layout: str) -> None:
    """FailOpen: without a pick the pool cluster's round robin answers, no fallback route needed."""
    envoy = EnvoyOptions(0, 0, 0, layout=layout, failure_mode_allow=True, request_body_mode="BUFFERED")
    stack = Stack(StackOptions(servers=2, envoy=envoy, sim_args=["--time-scale", "0.1"])).start()
    try:
        stack.epp_proc.kill()
        stack.epp_proc.wait()
        with httpx.Client(base_url=stack.url, timeout=30) as client:
            pods = set()
            for _ in range(6):
                r = client.post("/v1/completions", json=BODY)
                assert r.status_code == 200, r.text[:200]
                pods.add(r.headers["x-simulator-pod"])
        assert len(pods) == 2, pods
    finally:
        stack.stop()


def test_without_the_pool_envoy_routes_by_original_destination_and_does_not_retry() -> None:
    """EnvoyOptions without pool_endpoints: the ORIGINAL_DST cluster, which cannot retry elsewhere."""
    from epp.envoy import render

    cfg = render(EnvoyOptions(1, 2, 3))
    names = [c["name"] for c in cfg["static_resources"]["clusters"]]
    assert "original_destination_cluster" in names
    assert "inference_pool" not in names
    hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    route = hcm["route_config"]["virtual_hosts"][0]["routes"][0]["route"]
    assert route["cluster"] == "original_destination_cluster"
    assert "retry_policy" not in route
    with_pool = render(EnvoyOptions(1, 2, 3, pool_endpoints=["127.0.0.9:7000", "127.0.0.9:7001"]))
    pool = next(c for c in with_pool["static_resources"]["clusters"] if c["name"] == "inference_pool")
    ports = [e["endpoint"]["address"]["socket_address"]["port_value"]
             for e in pool["load_assignment"]["endpoints"][0]["lb_endpoints"]]
    assert ports == [7000, 7001]
    with pytest.raises(ValueError, match="BUFFERED"):
        render(EnvoyOptions(1, 2, 3, failure_mode_allow=True))  # Envoy would fail such requests closed
