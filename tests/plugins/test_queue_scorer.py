"""queue-scorer: fewer waiting requests score higher, min-max normalised over the candidates."""

from epp.scheduling.plugins.queue_scorer import QueueScorer
from tests.helpers import cycle_state, endpoint, request


def test_queue_scorer_min_max_normalised() -> None:
    eps = [endpoint(1, waiting=0), endpoint(2, waiting=5), endpoint(3, waiting=10)]
    assert QueueScorer().score(cycle_state(), request(), eps) == [1.0, 0.5, 0.0]


def test_queue_scorer_equal_queues_all_one() -> None:
    eps = [endpoint(1, waiting=3), endpoint(2, waiting=3)]
    assert QueueScorer().score(cycle_state(), request(), eps) == [1.0, 1.0]


def test_unknown_metrics_are_not_trusted_as_idle() -> None:
    """Never scraped, or stale beyond the threshold: scored as the worst, not the best."""
    eps = [endpoint(1, waiting=4), endpoint(2, waiting=None), endpoint(3, waiting=0, age=5.0)]
    assert QueueScorer().score(cycle_state(), request(), eps) == [1.0, 0.0, 0.0]
