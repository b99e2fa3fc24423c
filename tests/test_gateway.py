"""Through a real Envoy: client -> Envoy -> epp (ext_proc, or the HTTP pick) -> simulated vLLM servers.

Each layout runs one stack (processes on loopback) for its module; tests wait on
conditions, never on sleeps.
"""

from __future__ import annotations

import signal
import threading

import httpx
import orjson
import pytest

from epp.envoy import EnvoyOptions
from epp.stack import Stack, StackOptions, wait_until

pytestmark = pytest.mark.integration

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
# Envoy copies the subset hint from a request header into filter metadata (as a gateway would),
# and echoes the envoy.lb dynamic metadata epp set back to the client.
SUBSET_FILTER = {
    "name": "envoy.filters.http.header_to_metadata",
    "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.header_to_metadata.v3.Config",
        "request_rules": [{"header": "x-test-subset", "remove": True, "on_header_present": {
            "metadata_namespace": "envoy.lb.subset_hint", "key": "x-gateway-destination-endpoint-subset",
            "type": "STRING"}}],
    },
}
ECHO = {"x-test-lb-metadata": "%DYNAMIC_METADATA(envoy.lb:x-gateway-destination-endpoint)%"}
EPP_ARGS = ["--explain-headers", "--seed", "5", "--max-request-body-bytes", "65536",
            "--refresh-metrics-interval", "20ms"]
HTTP_PICK = "http-pick"


def _stack(layout: str) -> Stack:
    """`layout`: "http-pick", or the ext_proc request body mode, then "observe" (the shipped
    two-filter layout) or "inline" (GIE's)."""
    if layout == HTTP_PICK:
        return Stack(StackOptions(
            servers=3, epp_args=EPP_ARGS, sim_args=["--time-scale", "0.3"],
            envoy=EnvoyOptions(0, 0, 0, layout=HTTP_PICK, filters_before_ext_proc=[SUBSET_FILTER],
                               response_headers_to_add=ECHO),
        ))
    mode, response_path = layout.split("/")
    return Stack(StackOptions(
        servers=3,
        epp_args=EPP_ARGS,
        sim_args=["--time-scale", "0.3"],
        envoy=EnvoyOptions(0, 0, 0, request_body_mode=mode, response_body_mode=mode,
                           observe_responses=response_path == "observe",
                           filters_before_ext_proc=[SUBSET_FILTER], response_headers_to_add=ECHO),
    ))


@pytest.fixture(scope="module", params=["FULL_DUPLEX_STREAMED/observe", "FULL_DUPLEX_STREAMED/inline",
                                        "BUFFERED/observe", HTTP_PICK])
def stack(request):
    with _stack(request.param) as s:
        s.layout = request.param
        yield s


@pytest.fixture
def client(stack: Stack):
    with httpx.Client(base_url=stack.url, timeout=30) as c:
        yield c


def completion(prompt: str, **kw) -> dict:
    return {"model": MODEL, "prompt": prompt, "max_tokens": 4, **kw}


def test_request_reaches_the_chosen_pod(client: httpx.Client, stack: Stack) -> None:
    for i in range(6):
        r = client.post("/v1/completions", json=completion(f"request {i} " * 30))
        assert r.status_code == 200, r.text
        chosen = r.headers["x-epp-endpoint"]
        assert chosen in stack.endpoints
        assert f"127.0.0.1:{r.headers['x-simulator-port']}" == chosen  # served by the pod epp picked
        if stack.layout != HTTP_PICK:  # ext_authz has no envoy.lb metadata to give: the header routes
            assert r.headers["x-test-lb-metadata"] == chosen  # and Envoy got it as envoy.lb metadata
        assert r.json()["usage"]["completion_tokens"] == 4


def test_chat_streaming_through_the_gateway(client: httpx.Client) -> None:
    body = {"model": MODEL, "max_tokens": 20, "stream": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": "tell me a story " * 20}]}
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    chunks = [orjson.loads(e[6:]) for e in events[:-1]]
    assert sum(1 for c in chunks if c["choices"]) == 20
    assert chunks[-1]["usage"]["completion_tokens"] == 20


def _metric(stack: Stack, name: str) -> float:
    """The sum of a metric's samples for MODEL, scraped over HTTP."""
    total = 0.0
    for ln in httpx.get(stack.metrics_url).text.splitlines():
        if ln.startswith(name + "{") and f'model_name="{MODEL}"' in ln:
            total += float(ln.rsplit(" ", 1)[1])
    return total


def test_epp_sees_each_response_and_releases_its_request(client: httpx.Client, stack: Stack) -> None:
    """Whichever layout watches the response: time to first token and usage reach epp's metrics,
    and no request stays counted as running once its stream is done."""
    ttft0 = _metric(stack, "inference_objective_request_ttft_seconds_count")
    out0 = _metric(stack, "inference_objective_output_tokens_sum")
    body = {"model": MODEL, "max_tokens": 7, "stream": True, "stream_options": {"include_usage": True},
            "prompt": "watch this response " * 20}
    with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        r.read()
    client.post("/v1/completions", json=completion("and this one", max_tokens=5))
    wait_until(lambda: _metric(stack, "inference_objective_output_tokens_sum") - out0 == 12, 10,
               "usage of both responses in epp's metrics")
    assert _metric(stack, "inference_objective_request_ttft_seconds_count") - ttft0 == 2
    wait_until(lambda: _metric(stack, "inference_objective_running_requests") == 0, 10, "running back to 0")


def test_get_requests_are_routed(client: httpx.Client, stack: Stack) -> None:
    r = client.get("/v1/models")
    assert r.status_code == 200
    assert r.json()["data"][0]["id"] == MODEL
    assert r.headers["x-epp-endpoint"] in stack.endpoints


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b'{"model": "x", "prompt": ', 400, "invalid_json"),
        (b'{"model": "\xff", "prompt": "x"}', 400, "invalid_encoding"),
        (b'{"prompt": "x"}', 400, "missing_model"),
        (b'{"model": "m", "prompt": "x", "max_tokens": "many"}', 400, "invalid_request"),
        (orjson.dumps(completion("x" * 70000)), 400, "request_too_large"),
    ],
)
def test_errors_reach_the_client_with_their_status(client: httpx.Client, body: bytes, status: int, code: str) -> None:
    r = client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status
    assert r.headers["content-type"] == "application/json"
    assert r.json()["error"]["code"] == code


def test_subset_hint_and_empty_subset(client: httpx.Client, stack: Stack) -> None:
    only = stack.endpoints[1]
    for i in range(4):
        r = client.post("/v1/completions", json=completion(f"subset {i}"), headers={"x-test-subset": only})
        assert r.status_code == 200
        assert r.headers["x-epp-endpoint"] == only
    r = client.post("/v1/completions", json=completion("nowhere"), headers={"x-test-subset": "10.1.2.3:8000"})
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "no_endpoint"
    # A client cannot pin its pod by sending the hint's header itself, in either layout.
    pinned = stack.endpoints[2]
    picks = set()
    for i in range(12):
        r = client.post("/v1/completions", json=completion(f"pin {i} " * 20),
                        headers={"x-gateway-destination-endpoint-subset": pinned})
        assert r.status_code == 200
        picks.add(r.headers["x-epp-endpoint"])
    assert picks != {pinned}


def test_shared_prefix_requests_land_on_the_same_pod(client: httpx.Client) -> None:
    system = "You are a meticulous assistant for a large catalogue of spare parts. " * 12
    pods = set()
    for q in ("first question?", "second question?", "third one?", "and a fourth?"):
        body = {"model": MODEL, "max_tokens": 2,
                "messages": [{"role": "system", "content": system}, {"role": "user", "content": q}]}
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200
        pods.add(r.headers["x-epp-endpoint"])
    assert len(pods) == 1


def test_epp_metrics_are_scraped_over_http(client: httpx.Client, stack: Stack) -> None:
    client.post("/v1/completions", json=completion("count me"))
    client.post("/v1/completions", content=b"{oops", headers={"content-type": "application/json"})
    lines = httpx.get(stack.metrics_url).text.splitlines()
    line = next(ln for ln in lines if ln.startswith("inference_objective_request_total{"))
    assert f'model_name="{MODEL}"' in line
    assert float(line.rsplit(" ", 1)[1]) >= 1
    errors = [ln for ln in lines if ln.startswith("inference_objective_request_error_total{")]
    assert any('error_code="BadRequest"' in ln and float(ln.rsplit(" ", 1)[1]) >= 1 for ln in errors)
    assert any(ln.startswith("inference_extension_scheduler_e2e_duration_seconds_count") for ln in lines)


def test_a_hanging_metrics_endpoint_does_not_stop_the_gateway(client: httpx.Client, stack: Stack) -> None:
    hung = stack.sim_ports[0]
    httpx.post(f"http://127.0.0.1:{hung}/sim/control", json={"metrics_delay": 30})
    try:
        for i in range(6):
            r = client.post("/v1/completions", json=completion(f"while hung {i}"))
            assert r.status_code == 200
    finally:
        httpx.post(f"http://127.0.0.1:{hung}/sim/control", json={"metrics_delay": 0})


def test_a_client_cannot_ask_for_the_body_rewrite(client: httpx.Client, stack: Stack) -> None:
    """x-epp-rewrite-body from a client is dropped: the request is picked and counted once, body untouched."""
    before = _metric(stack, "inference_objective_request_total")
    r = client.post("/v1/completions", json=completion("forged"), headers={"x-epp-rewrite-body": "1"})
    assert r.status_code == 200
    assert r.json()["model"] == MODEL
    assert _metric(stack, "inference_objective_request_total") - before == 1


@pytest.mark.parametrize("layout", ["FULL_DUPLEX_STREAMED/observe", HTTP_PICK])
def test_sigterm_lets_inflight_streams_finish(layout: str) -> None:
    """Stopping epp: the request in flight completes; afterwards Envoy fails closed (503)."""
    with _stack(layout) as stack, httpx.Client(base_url=stack.url, timeout=30) as client:
        result: dict = {}
        started = threading.Event()

        def slow() -> None:
            body = completion("slow one", max_tokens=300, stream=True)
            with client.stream("POST", "/v1/completions", json=body) as r:
                started.set()
                result["events"] = sum(1 for ln in r.iter_lines() if ln.startswith("data: {"))
                result["status"] = r.status_code

        t = threading.Thread(target=slow)
        t.start()
        assert started.wait(10)
        assert stack.stop_epp(signal.SIGTERM) == 0
        t.join(30)
        assert result == {"status": 200, "events": 300}
        wait_until(lambda: client.post("/v1/completions", json=completion("after")).status_code == 503, 10,
                   "requests to fail closed once epp is gone")
