"""least-kv-cache-filter: keep the endpoints whose KV-cache use is near the lowest (GIE's band rule)."""

from __future__ import annotations

from epp.datastore import Endpoint
from epp.requests import InferenceRequest
from epp.scheduling.filtering import near_minimum
from epp.scheduling.framework import CycleState, Filter


class LeastKvCacheFilter(Filter):
    type_name = "least-kv-cache-filter"

    def filter(self, state: CycleState, request: InferenceRequest, endpoints: list[Endpoint]) -> list[Endpoint]:
        return near_minimum(state, endpoints, lambda m: m.kv_usage)
