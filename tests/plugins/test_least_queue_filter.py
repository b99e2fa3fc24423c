"""least-queue-filter: keeps the endpoints whose queue is within a band above the shortest."""

from epp.scheduling.plugins.least_queue_filter import LeastQueueFilter
from tests.helpers import cycle_state, endpoint, request


def ports(eps):
    return [ep.port for ep in eps]


def test_least_queue_keeps_the_band_near_the_minimum() -> None:
    # min 0, max 30, 3 endpoints: keep queue <= 0 + 30/3 = 10.
    eps = [endpoint(1, waiting=0), endpoint(2, waiting=10), endpoint(3, waiting=30)]
    assert ports(LeastQueueFilter().filter(cycle_state(), request(), eps)) == [1, 2]


def test_least_filters_drop_unknown_endpoints_but_never_empty_the_pool() -> None:
    eps = [endpoint(1, waiting=None), endpoint(2, waiting=7)]
    assert ports(LeastQueueFilter().filter(cycle_state(), request(), eps)) == [2]
    unknown = [endpoint(1, waiting=None), endpoint(2, waiting=3, age=10.0)]
    assert ports(LeastQueueFilter().filter(cycle_state(), request(), unknown)) == [1, 2]
