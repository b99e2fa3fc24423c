"""running-requests-scorer: epp's own in-flight count, exact between scrapes."""

from epp.scheduling.plugins.running_requests_scorer import RunningRequestsScorer
from tests.helpers import cycle_state, endpoint, request


def test_running_requests_scorer_uses_epp_inflight() -> None:
    eps = [endpoint(1, inflight=4), endpoint(2, inflight=0), endpoint(3, inflight=2)]
    assert RunningRequestsScorer().score(cycle_state(), request(), eps) == [0.0, 1.0, 0.5]
