"""Priority from InferenceObjectives, shedding under saturation, and model rewrites before scheduling."""

from __future__ import annotations

import orjson
import pytest

from epp.datastore import Datastore
from epp.director import Director
from epp.errors import EppError
from epp.requests import new_request, parse_body
from epp.rewrites import ModelRewrites, RewriteRule
from epp.scheduling import picker_config
from tests.helpers import NOW, endpoint


def director(*eps, objectives=None) -> Director:
    ds = Datastore()
    ds.now = lambda: NOW  # type: ignore[method-assign]
    ds.set_endpoints(eps)
    ds.objectives = objectives or {"batch": -1, "critical": 10}
    return Director(ds, picker_config.default_config(seed=1))


def req(objective: str = "", model: str = "m"):
    headers = {"x-gateway-inference-objective": objective} if objective else {}
    return parse_body(new_request("/v1/completions", headers), orjson.dumps({"model": model, "prompt": "hi"}))


def admit(d: Director, r) -> None:
    d.admission.resolve(r)
    error = d.admission.shed(r, d.candidates(None), NOW)
    if error is not None:
        raise error


def test_priority_comes_from_the_named_objective() -> None:
    d = director(endpoint(1))
    for name, priority in (("batch", -1), ("critical", 10), ("unknown-objective", 0), ("", 0)):
        r = req(name)
        admit(d, r)
        assert r.priority == priority


@pytest.mark.parametrize(
    "saturated_pool",
    [
        (endpoint(1, waiting=5), endpoint(2, waiting=9)),  # every queue at or over 5
        (endpoint(1, kv=0.8), endpoint(2, kv=0.95)),  # every KV cache at or over 80%
        (endpoint(1, waiting=0, age=0.5), endpoint(2, waiting=None)),  # metrics stale or missing: no known capacity
    ],
)
def test_sheddable_gets_429_only_when_the_pool_is_saturated(saturated_pool) -> None:
    d = director(*saturated_pool)
    with pytest.raises(EppError) as e:
        admit(d, req("batch"))
    assert e.value.http_status == 429
    assert e.value.reason == "pool_saturated"
    for objective in ("", "critical"):  # priority >= 0 is never shed
        admit(d, req(objective))


def test_sheddable_admitted_while_one_endpoint_has_capacity() -> None:
    d = director(endpoint(1, waiting=50, kv=0.99), endpoint(2, waiting=4, kv=0.79))
    admit(d, req("batch"))


def test_rewrite_happens_before_scoring_so_lora_affinity_sees_the_target() -> None:
    d = director(
        endpoint(1, active=("food-review-v1",), max_lora=1),
        endpoint(2, active=("food-review-v2",), max_lora=1),
    )
    d.datastore.rewrites = ModelRewrites(
        [RewriteRule("rollout", frozenset({"food-review"}), ("food-review-v1", "food-review-v2"), (1, 1))], seed=5)
    picked = {}
    for _ in range(40):
        r = req(model="food-review")
        decision = d.decide(r)
        picked.setdefault(r.target_model, set()).add(decision.endpoint.port)
        d.finish(r, decision)
        assert orjson.loads(r.forwarded_body())["model"] == r.target_model
    assert picked == {"food-review-v1": {1}, "food-review-v2": {2}}
