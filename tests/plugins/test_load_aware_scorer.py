"""load-aware-scorer: an empty queue scores 0.5, falling linearly to 0 at the threshold (llm-d-router)."""

import pytest

from epp.scheduling.params import Params
from epp.scheduling.plugins.load_aware_scorer import LoadAwareScorer
from tests.helpers import cycle_state, endpoint, request


def test_empty_queue_half_full_queue_and_past_the_threshold() -> None:
    eps = [endpoint(1, waiting=0), endpoint(2, waiting=64), endpoint(3, waiting=128), endpoint(4, waiting=500)]
    assert LoadAwareScorer().score(cycle_state(), request(), eps) == [0.5, 0.25, 0.0, 0.0]


def test_threshold_parameter() -> None:
    scorer = LoadAwareScorer.from_parameters("l", Params("load-aware-scorer", {"threshold": 10}))
    assert scorer.score(cycle_state(), request(), [endpoint(1, waiting=5)]) == [0.25]  # type: ignore[attr-defined]


def test_a_non_positive_threshold_falls_back_to_128_with_a_warning() -> None:
    p = Params("load-aware-scorer", {"threshold": 0})
    scorer = LoadAwareScorer.from_parameters("l", p)
    assert scorer.threshold == 128  # type: ignore[attr-defined]
    assert any("threshold 0" in w for w in p.warnings)


def test_unknown_metrics_score_zero() -> None:
    eps = [endpoint(1, waiting=None), endpoint(2, waiting=0, age=5.0)]
    assert LoadAwareScorer().score(cycle_state(), request(), eps) == [0.0, 0.0]


def test_unknown_parameter_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown parameter"):
        LoadAwareScorer.from_parameters("l", Params("load-aware-scorer", {"treshold": 3}))
