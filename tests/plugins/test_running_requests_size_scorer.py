"""running-requests-size-scorer: the server's reported running requests, min-max normalised (GIE)."""

from epp.datastore import Endpoint, EndpointMetrics
from epp.scheduling.plugins.running_requests_size_scorer import RunningRequestsSizeScorer
from tests.helpers import NOW, cycle_state, request


def ep(port: int, running: int | None, inflight: int = 0) -> Endpoint:
    e = Endpoint("10.0.0.1", port)
    if running is not None:
        e.metrics = EndpointMetrics(running=running, scraped_at=NOW)
    e.inflight = inflight
    return e


def test_fewest_running_scores_one() -> None:
    eps = [ep(1, 0), ep(2, 5), ep(3, 10)]
    assert RunningRequestsSizeScorer().score(cycle_state(), request(), eps) == [1.0, 0.5, 0.0]
    assert RunningRequestsSizeScorer().score(cycle_state(), request(), [ep(1, 4), ep(2, 4)]) == [1.0, 1.0]


def test_reads_the_servers_count_not_epps() -> None:
    eps = [ep(1, 8, inflight=0), ep(2, 0, inflight=8)]
    assert RunningRequestsSizeScorer().score(cycle_state(), request(), eps) == [0.0, 1.0]


def test_unknown_metrics_are_the_busiest() -> None:
    assert RunningRequestsSizeScorer().score(cycle_state(), request(), [ep(1, 3), ep(2, None)]) == [1.0, 0.0]
