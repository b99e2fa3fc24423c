"""kv-cache-utilization-scorer: free KV cache scores higher; unknown metrics score as full."""

import pytest

from epp.scheduling.plugins.kv_cache_utilization_scorer import KVCacheUtilizationScorer
from tests.helpers import cycle_state, endpoint, request


def test_kv_scorer_is_one_minus_usage() -> None:
    eps = [endpoint(1, kv=0.25), endpoint(2, kv=0.9)]
    assert KVCacheUtilizationScorer().score(cycle_state(), request(), eps) == pytest.approx([0.75, 0.1])


def test_unknown_metrics_are_not_trusted_as_idle() -> None:
    """Never scraped, or stale beyond the threshold: scored as the worst, not the best."""
    eps = [endpoint(1, waiting=4), endpoint(2, waiting=None), endpoint(3, waiting=0, age=5.0)]
    assert KVCacheUtilizationScorer().score(cycle_state(), request(), eps)[1:] == [0.0, 0.0]
