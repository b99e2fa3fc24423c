"""utilization-filter: keep servers within every condition's maxValue (llm-d-router)."""

import pytest

from epp.datastore import Endpoint, EndpointMetrics
from epp.scheduling.params import Params
from epp.scheduling.plugins.utilization_filter import UtilizationFilter
from tests.helpers import NOW, cycle_state, request


def ep(port: int, *, waiting: int = 0, running: int = 0, kv: float = 0.0, inflight: int = 0,
       scraped: bool = True) -> Endpoint:
    e = Endpoint("10.0.0.1", port)
    if scraped:
        e.metrics = EndpointMetrics(waiting=waiting, running=running, kv_usage=kv, scraped_at=NOW)
    e.inflight = inflight
    return e


def make(conditions, **extra):
    return UtilizationFilter.from_parameters("u", Params("utilization-filter", {"conditions": conditions, **extra}))


def test_every_condition_must_hold() -> None:
    f = make([{"metric": "waiting-queue", "maxValue": 2}, {"metric": "kv-cache-utilization", "maxValue": 0.9}])
    eps = [ep(1, waiting=2, kv=0.5), ep(2, waiting=3), ep(3, kv=0.95), ep(4, scraped=False)]
    assert f.filter(cycle_state(), request(), eps) == [eps[0]]  # type: ignore[attr-defined]


def test_active_and_running_requests() -> None:
    f = make([{"metric": "active-requests", "maxValue": 1}, {"metric": "running-requests", "maxValue": 4}])
    eps = [ep(1, inflight=1, running=4), ep(2, inflight=2), ep(3, running=5)]
    assert f.filter(cycle_state(), request(), eps) == [eps[0]]  # type: ignore[attr-defined]


def test_fallback_on_empty() -> None:
    eps = [ep(1, waiting=9)]
    assert make([{"metric": "waiting-queue", "maxValue": 1}]).filter(cycle_state(), request(), eps) == []  # type: ignore[attr-defined]
    f = make([{"metric": "waiting-queue", "maxValue": 1}], fallbackOnEmpty=True)
    assert f.filter(cycle_state(), request(), eps) == eps  # type: ignore[attr-defined]


@pytest.mark.parametrize(("conditions", "needle"), [
    ([], "at least one condition"),
    ([{"metric": "gpu-temp", "maxValue": 1}], "metric must be one of"),
    ([{"metric": "waiting-queue"}], "requires a numeric maxValue"),
    ([{"metric": "kv-cache-utilization", "maxValue": 80}], "in \\[0, 1\\]"),
])
def test_bad_conditions(conditions, needle) -> None:
    with pytest.raises(ValueError, match=needle):
        make(conditions)
