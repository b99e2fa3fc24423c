"""The director (epp.director): one plan for a real pick and for explain's dry run; decide commits it."""

from __future__ import annotations

import orjson

from epp.requests import InferenceRequest, new_request, parse_body
from epp.rewrites import ModelRewrites, RewriteRule
from tests.helpers import director, endpoint


def req(objective: str = "", model: str = "m", prompt: str = "hi") -> InferenceRequest:
    headers = {"x-gateway-inference-objective": objective} if objective else {}
    return parse_body(new_request("/v1/completions", headers), orjson.dumps({"model": model, "prompt": prompt}))


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
