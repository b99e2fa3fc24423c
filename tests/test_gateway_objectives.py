"""Objectives and model rewrites end to end: client -> real Envoy -> epp -> simulated vLLM servers.

The pool file holds an InferenceObjective (priority -1) and an InferenceModelRewrite
(a 50/50 adapter rollout); the endpoints come from --endpoints. Saturation is real:
servers with one batch slot, busy with long requests.
"""

from __future__ import annotations

import threading
from collections import Counter

import httpx
import pytest

from epp import explain
from epp.stack import Stack, StackOptions, wait_until

pytestmark = pytest.mark.integration

POOL_FILE = """\
apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferenceObjective
metadata: {name: batch-jobs}
spec: {priority: -1, poolRef: {name: default}}
---
apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferenceModelRewrite
metadata: {name: food-review-rollout}
spec:
  poolRef: {name: default}
  rules:
  - matches: [{model: {value: food-review}}]
    targets:
    - {modelRewrite: food-review-v1, weight: 50}
    - {modelRewrite: food-review-v2, weight: 50}
"""
CONFIG = """\
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: lora-affinity-scorer
- type: running-requests-scorer
saturationDetector:
  queueDepthThreshold: 1
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
  - pluginRef: lora-affinity-scorer
  - pluginRef: running-requests-scorer
    weight: 5
"""
BASE = "meta-llama/Llama-3.1-8B-Instruct"


@pytest.fixture(scope="module", params=["ext-proc", "http-pick"])
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """Both layouts: over HTTP, a rewritten body reaches the server through the layout's ext_proc filter."""
    pool = tmp_path_factory.mktemp("pool") / "pool.yaml"
    pool.write_text(POOL_FILE)
    with Stack(StackOptions(
        servers=2,
        epp_args=["--pool-file", str(pool), "--config-text", CONFIG, "--seed", "3",
                  "--refresh-metrics-interval", "20ms"],
        sim_args=["--max-num-seqs", "1", "--max-lora", "2",
                  "--lora", "food-review-v1", "--lora", "food-review-v2"],
        layout=request.param,
    )) as s:
        yield s


def post(stack: Stack, model: str = BASE, objective: str | None = None, max_tokens: int = 2) -> httpx.Response:
    headers = {"x-gateway-inference-objective": objective} if objective else {}
    return httpx.post(f"{stack.url}/v1/completions", headers=headers, timeout=60,
                      json={"model": model, "prompt": "rate this dish", "max_tokens": max_tokens})


def test_rewrite_splits_traffic_and_the_server_sees_the_target(stack: Stack) -> None:
    served = Counter()
    for _ in range(60):
        r = post(stack, model="food-review", max_tokens=1)
        assert r.status_code == 200, r.text
        served[r.json()["model"]] += 1  # the simulator answers with the model it ran
    assert set(served) == {"food-review-v1", "food-review-v2"}
    assert 15 <= served["food-review-v1"] <= 45
    metrics = httpx.get(stack.metrics_url).text
    assert 'inference_extension_model_rewrite_decisions_total{model_name="food-review",' \
           'model_rewrite_name="food-review-rollout",target_model="food-review-v2"}' in metrics


def test_sheddable_requests_get_429_only_while_the_pool_is_saturated(stack: Stack) -> None:
    assert post(stack, objective="batch-jobs").status_code == 200  # idle pool: admitted

    # Two long requests per server: one running, one waiting, on each (queue depth 1 = saturated).
    # epp's own in-flight count spreads them 2 + 2 before any scrape could.
    results: list[int] = []
    hogs = [threading.Thread(target=lambda: results.append(post(stack, max_tokens=150).status_code))
            for _ in range(4)]
    for t in hogs:
        t.start()
    server = f"127.0.0.1:{stack.explain_port}"
    req = b'{"model": "%s", "prompt": "x"}' % BASE.encode()

    def saturated_by_queues() -> bool:
        """Saturated by the servers' queues, as fresh scrapes show them (a stale scrape also counts as
        saturated, but only for as long as it stays stale)."""
        plan = explain.query(server, req)
        return plan.pool_saturated and all(c.metrics.fresh for c in plan.candidates)
    wait_until(saturated_by_queues, 20, "the pool's queues to saturate it")

    shed = post(stack, objective="batch-jobs")
    assert shed.status_code == 429
    assert shed.json()["error"]["code"] == "pool_saturated"
    assert post(stack).status_code == 200  # priority 0 is never shed; it waits its turn

    for t in hogs:
        t.join()
    assert results == [200] * 4
    wait_until(lambda: not explain.query(server, req).pool_saturated, 20, "the pool to drain")
    assert post(stack, objective="batch-jobs").status_code == 200


