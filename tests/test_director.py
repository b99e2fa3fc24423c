"""The director (epp.director): one plan for a real pick and for explain's dry run; decide commits it.

`plan` computes candidates, rewrite, admission and scheduling and changes nothing;
`decide` commits exactly one pick (in-flight count, the plugins' PreRequest hooks,
metrics); `finish` releases it once.
"""

from __future__ import annotations

import asyncio
import logging

import orjson
import pytest

from epp.director import Director
from epp.errors import EppError
from epp.metrics import EppMetrics
from epp.requests import InferenceRequest, new_request, parse_body
from epp.rewrites import ModelRewrites, RewriteRule
from epp.scheduling.framework import PrefixIndexHolder
from epp.scheduling.picker_config import load_text
from epp.scheduling.plugins.prefill_load_scorer import PrefillLoadScorer
from tests.helpers import director, endpoint, until

DOC = "a long shared document. " * 100


def req(objective: str = "", model: str = "m", prompt: str = DOC) -> InferenceRequest:
    headers = {"x-gateway-inference-objective": objective} if objective else {}
    return parse_body(new_request("/v1/completions", headers), orjson.dumps({"model": model, "prompt": prompt}))


def prefix_index_size(d: Director) -> int:
    return sum(p.prefix_index_size() for p in d.scheduler.plugins if isinstance(p, PrefixIndexHolder))


def prefill_backlog(d: Director) -> dict[str, int]:
    return next(p for p in d.scheduler.plugins if isinstance(p, PrefillLoadScorer)).backlog


def sample(m: EppMetrics, name: str, **labels: str) -> float:
    return m.registry.get_sample_value(name, labels) or 0.0


def test_plan_has_no_side_effects_and_decide_commits_once() -> None:
    metrics = EppMetrics()
    eps = (endpoint(1), endpoint(2))
    d = director(*eps, metrics=metrics)
    for _ in range(3):
        plan = d.plan(req())
        assert plan.error is None
        assert plan.result is not None
    assert [ep.inflight for ep in eps] == [0, 0]
    assert prefix_index_size(d) == 0  # the prefix scorer did not learn the prompt
    assert prefill_backlog(d) == {}
    assert sample(metrics, "inference_extension_scheduler_e2e_duration_seconds_count") == 0

    decision = d.decide(req())
    picked = decision.endpoint
    assert sorted(ep.inflight for ep in eps) == [0, 1]
    assert picked.inflight == 1
    learned = prefix_index_size(d)
    assert learned > 0
    assert prefill_backlog(d) == {picked.hostport: pytest.approx(len(DOC) // 4, abs=10)}  # its prompt, once
    assert sample(metrics, "inference_extension_scheduler_e2e_duration_seconds_count") == 1

    # The committed pick is what the next plan sees, and planning still changes nothing.
    after = d.plan(req())
    assert after.result is not None
    assert after.result.scores["prefix-cache-scorer"][after.result.candidates.index(picked)] == 1.0
    assert prefix_index_size(d) == learned
    assert picked.inflight == 1


def test_dry_run_of_a_shed_request_still_shows_the_scores_and_the_429() -> None:
    eps = (endpoint(1, waiting=5), endpoint(2, waiting=9))  # every queue at the threshold: saturated
    d = director(*eps)
    plan = d.dry_run(req("batch"))
    assert plan.error is not None
    assert plan.error.http_status == 429
    assert plan.error.reason == "pool_saturated"
    assert plan.result is not None, "a shed request is still scored, to show why"
    assert plan.result.candidates == list(eps)
    assert set(plan.result.scores) == {ws.scorer.name for ws in d.scheduler.profiles[0].scorers}
    assert all(len(v) == 2 for v in plan.result.scores.values())
    assert len(plan.result.totals) == 2
    with pytest.raises(EppError) as e:
        d.decide(req("batch"))
    assert e.value.http_status == 429
    assert [ep.inflight for ep in eps] == [0, 0]
    assert prefix_index_size(d) == 0
    assert d.dry_run(req()).error is None  # priority 0 is never shed


def test_a_subset_without_a_ready_endpoint_is_a_503_that_says_so() -> None:
    eps = (endpoint(1), endpoint(2))
    d = director(*eps)
    subset_message = "none of the endpoints in the proxy's subset hint is a ready endpoint of the pool"
    plan = d.dry_run(req(), ["10.9.9.9:80"])
    assert plan.error is not None
    assert (plan.error.http_status, plan.error.reason, plan.error.message) == (503, "no_endpoint", subset_message)
    with pytest.raises(EppError) as e:
        d.decide(req(), ["10.9.9.9:80"])
    assert (e.value.http_status, e.value.reason, e.value.message) == (503, "no_endpoint", subset_message)
    # A pool member that is not ready is excluded too.
    eps[1].ready = False
    d.datastore.set_endpoints(eps)
    with pytest.raises(EppError) as e:
        d.decide(req(), [eps[1].hostport])
    assert e.value.message == subset_message
    assert d.decide(req(), [eps[0].hostport]).endpoint is eps[0]
    # Without a subset, an empty pool says that instead.
    d.datastore.set_endpoints([])
    with pytest.raises(EppError) as e:
        d.decide(req())
    assert (e.value.http_status, e.value.message) == (503, "no ready endpoint in the pool")


def test_a_model_rewrite_changes_the_forwarded_body_and_an_unchanged_body_is_the_same_bytes() -> None:
    metrics = EppMetrics()
    d = director(endpoint(1), endpoint(2), metrics=metrics)
    d.datastore.rewrites = ModelRewrites([RewriteRule("canary", frozenset({"alias"}), ("m-v2",), (1,))], seed=1)
    r = req(model="alias", prompt="hi")
    client_body = r.body
    decision = d.decide(r)
    assert decision.body_changed
    assert orjson.loads(decision.body) == {"model": "m-v2", "prompt": "hi"}
    assert r.body is client_body
    assert orjson.loads(r.body)["model"] == "alias"  # the client's body itself is left alone
    assert sample(metrics, "inference_extension_model_rewrite_decisions_total",
                  model_rewrite_name="canary", model_name="alias", target_model="m-v2") == 1
    plain = req(model="m", prompt="hi")
    unchanged = d.decide(plain)
    assert not unchanged.body_changed
    assert unchanged.body is plain.body  # the very same bytes object: nothing re-serialised


def test_finish_releases_the_in_flight_count_once_per_decision() -> None:
    eps = (endpoint(1), endpoint(2))
    d = director(*eps)
    one, two = req(prompt="one " * 50), req(prompt="two " * 50)
    first, second = d.decide(one, [eps[0].hostport]), d.decide(two, [eps[0].hostport])
    assert eps[0].inflight == 2
    assert prefill_backlog(d)[eps[0].hostport] > 0
    d.finish(one, first)
    assert eps[0].inflight == 1
    d.finish(two, second)
    assert eps[0].inflight == 0
    assert prefill_backlog(d) == {}  # the plugins' ResponseComplete hooks ran for both
    assert eps[1].inflight == 0


def test_rewrite_happens_before_scoring_so_lora_affinity_sees_the_target() -> None:
    d = director(
        endpoint(1, active=("food-review-v1",), max_lora=1),
        endpoint(2, active=("food-review-v2",), max_lora=1),
    )
    d.datastore.rewrites = ModelRewrites(
        [RewriteRule("rollout", frozenset({"food-review"}), ("food-review-v1", "food-review-v2"), (1, 1))], seed=5)
    picked = {}
    for _ in range(40):
        r = req(model="food-review", prompt="hi")
        decision = d.decide(r)
        picked.setdefault(r.target_model, set()).add(decision.endpoint.port)
        d.finish(r, decision)
        assert orjson.loads(r.forwarded_body())["model"] == r.target_model
    assert picked == {"food-review-v1": {1}, "food-review-v2": {2}}


def test_a_pod_epp_cannot_see_gets_no_picks_while_one_it_can_see_exists() -> None:
    """Unknown (never scraped, or its last scrape refused) or stale metrics are not trusted to be idle."""
    seen, unknown, stale = endpoint(1), endpoint(2, waiting=None), endpoint(3, age=10.0)
    d = director(seen, unknown, stale)
    assert d.candidates(None) == [seen]
    for i in range(20):
        assert d.decide(req(prompt=f"prompt {i} " * 40)).endpoint is seen
    # When epp can see none of them (at start, or every scrape failing), every ready pod stays a candidate.
    blind = director(endpoint(2, waiting=None), endpoint(3, age=10.0))
    assert len(blind.candidates(None)) == 2
    # The proxy's subset hint narrows first: a hint naming only unseen pods still routes.
    assert d.candidates([unknown.hostport]) == [unknown]


FILTER_CONFIG = """\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: header-based-testing-filter
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins: [{pluginRef: header-based-testing-filter}, {pluginRef: max-score-picker}]
"""


def test_a_scheduling_cycle_that_finds_no_endpoint_counts_as_a_failed_attempt() -> None:
    metrics = EppMetrics()
    d = director(endpoint(1), metrics=metrics, config=load_text(FILTER_CONFIG))
    with pytest.raises(EppError) as e:
        d.decide(req())  # no selection header: the filter keeps nothing
    assert e.value.http_status == 503
    failed = {"status": "failure", "target_model_name": "m", "pod_name": "", "namespace": "", "port": ""}
    assert sample(metrics, "inference_extension_scheduler_attempts_total", **failed) == 1
    llmd = {**{k: v for k, v in failed.items() if k != "pod_name"}, "endpoint_name": ""}
    assert sample(metrics, "llm_d_epp_scheduler_attempts_total", **llmd) == 1
    d.dry_run(req())  # explain's dry run is not an attempt
    assert sample(metrics, "inference_extension_scheduler_attempts_total", **failed) == 1


def test_each_pick_is_logged_once_at_debug_with_its_scores(caplog: pytest.LogCaptureFixture) -> None:
    d = director(endpoint(1), endpoint(2))
    with caplog.at_level(logging.INFO, logger="epp.pick"):
        d.decide(req())
    assert not [r for r in caplog.records if r.name == "epp.pick"]  # off unless epp.pick logs at debug
    with caplog.at_level(logging.DEBUG, logger="epp.pick"):
        decision = d.decide(req())
    lines = [r for r in caplog.records if r.name == "epp.pick"]
    assert len(lines) == 1
    fields = lines[0].fields  # type: ignore[attr-defined]
    assert fields["endpoint"] == decision.endpoint.hostport
    assert set(fields["scores"]) == {ep.hostport for ep in d.datastore.ready_endpoints()}


FLOW_CONFIG = """\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
featureGates: [flowControl]
plugins:
- type: concurrency-detector
  parameters: {maxConcurrency: 1}
- type: queue-scorer
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins: [{pluginRef: queue-scorer}, {pluginRef: max-score-picker}]
flowControl:
  saturationDetector: {pluginRef: concurrency-detector}
"""


async def test_with_flow_control_a_sheddable_request_waits_for_a_slot_instead_of_429() -> None:
    d = director(endpoint(1), config=load_text(FLOW_CONFIG, runs_flow_control=True))
    assert d.flow is not None
    first = await d.decide_async(req())
    batch = asyncio.ensure_future(d.decide_async(req("batch")))
    await until(lambda: d.flow is not None and d.flow.count == 1, what="the batch request to wait")
    assert not batch.done()
    d.finish(req(), first)  # the slot frees: a capacity signal, no polling
    decision = await asyncio.wait_for(batch, 5)
    assert decision.endpoint.inflight == 1
    d.finish(req("batch"), decision)
    assert decision.endpoint.inflight == 0
