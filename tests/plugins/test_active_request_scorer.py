"""active-request-scorer: idle servers score 1, busy ones (max - count) / max * maxBusyScore (llm-d-router)."""

import pytest

from epp.scheduling.params import Params
from epp.scheduling.plugins.active_request_scorer import ActiveRequestScorer
from tests.helpers import cycle_state, endpoint, request


def scores(scorer, *counts: int) -> list[float]:
    return scorer.score(cycle_state(), request(), [endpoint(i, inflight=c) for i, c in enumerate(counts)])


def test_defaults_scale_from_idle_to_the_busiest() -> None:
    assert scores(ActiveRequestScorer(), 0, 2, 4) == [1.0, 0.5, 0.0]
    assert scores(ActiveRequestScorer(), 3, 3) == [0.0, 0.0]  # all equally busy: the busiest score 0
    assert scores(ActiveRequestScorer(), 0, 0) == [1.0, 1.0]


def test_idle_threshold_and_a_gap_between_idle_and_busy() -> None:
    scorer = ActiveRequestScorer.from_parameters("a", Params("active-request-scorer", {
        "idleThreshold": 1, "maxBusyScore": 0.5}))
    assert scores(scorer, 1, 2, 4) == [1.0, 0.25, 0.0]


def test_deprecated_request_timeout_warns() -> None:
    p = Params("active-request-scorer", {"requestTimeout": "2m"})
    ActiveRequestScorer.from_parameters("a", p)
    assert any("requestTimeout" in w for w in p.warnings)


def test_out_of_range_max_busy_score_keeps_the_default_with_a_warning() -> None:
    p = Params("active-request-scorer", {"maxBusyScore": 2.0})
    scorer = ActiveRequestScorer.from_parameters("a", p)
    assert scorer.max_busy_score == 1.0  # type: ignore[attr-defined]
    assert p.warnings


def test_unknown_parameter_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown parameter"):
        ActiveRequestScorer.from_parameters("a", Params("active-request-scorer", {"idle": 1}))
