"""Admission (epp.admission): priority from InferenceObjectives, and shedding under saturation."""

from __future__ import annotations

import orjson
import pytest

from epp.director import Director
from epp.errors import EppError
from epp.requests import new_request, parse_body
from tests.helpers import NOW, director, endpoint


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


def test_sheddable_admitted_while_the_pools_average_is_under_capacity() -> None:
    """upstream's roofline: each server's max(queue / 5, KV / 0.8), averaged: (1.2 + 0.4) / 2 < 1."""
    d = director(endpoint(1, waiting=6, kv=0.1), endpoint(2, waiting=2, kv=0.2))
    admit(d, req("batch"))


def test_one_idle_server_does_not_hide_an_overloaded_pool() -> None:
    """(3.0 + 0) / 2 >= 1: saturated on average, though one server is idle, as upstream counts it."""
    d = director(endpoint(1, waiting=15), endpoint(2, waiting=0))
    with pytest.raises(EppError):
        admit(d, req("batch"))


def test_the_configs_concurrency_detector_decides_shedding() -> None:
    from epp.scheduling.picker_config import load_text

    config = load_text("apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n"
                       "- {type: concurrency-detector, parameters: {maxConcurrency: 2}}\n- type: queue-scorer\n"
                       "saturationDetector: {pluginRef: concurrency-detector}\n", seed=1)
    busy = (endpoint(1, waiting=50, inflight=2), endpoint(2, waiting=50, inflight=1))
    admit(director(*busy, config=config), req("batch"))  # 3 of 4 in flight: under capacity, queues notwithstanding
    full = (endpoint(1, inflight=2), endpoint(2, inflight=2))
    with pytest.raises(EppError):
        admit(director(*full, config=config), req("batch"))
