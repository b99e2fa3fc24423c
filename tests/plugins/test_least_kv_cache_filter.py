"""least-kv-cache-filter: keeps the endpoints whose KV-cache use is within a band above the lowest."""

from epp.scheduling.plugins.least_kv_cache_filter import LeastKvCacheFilter
from tests.helpers import cycle_state, endpoint, request


def test_least_kv_keeps_the_band_near_the_minimum() -> None:
    eps = [endpoint(1, kv=0.5), endpoint(2, kv=0.2), endpoint(3, kv=0.8), endpoint(4, kv=0.35)]
    # band: 0.2 .. 0.2 + 0.6/4 = 0.35
    assert [ep.port for ep in LeastKvCacheFilter().filter(cycle_state(), request(), eps)] == [2, 4]
