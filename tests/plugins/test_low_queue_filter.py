"""low-queue-filter: keeps the endpoints whose queue is at most the threshold; unknown ones fail."""

from epp.scheduling.plugins.low_queue_filter import LowQueueFilter
from tests.helpers import cycle_state, endpoint, request


def ports(eps):
    return [ep.port for ep in eps]


def test_low_queue_threshold_is_inclusive_and_unknown_fails() -> None:
    eps = [endpoint(1, waiting=128), endpoint(2, waiting=129), endpoint(3, waiting=None)]
    assert ports(LowQueueFilter().filter(cycle_state(), request(), eps)) == [1]
    assert ports(LowQueueFilter(threshold=0).filter(cycle_state(), request(), eps)) == []
