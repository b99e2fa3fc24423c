"""kv-cache-utilization-scorer (older configs: kv-cache-scorer): score = 1 - KV-cache usage.

Unknown metrics score 0: a server we cannot see may be full.
"""

from __future__ import annotations

from epp.datastore import Endpoint
from epp.requests import InferenceRequest
from epp.scheduling.framework import CycleState, Scorer


class KVCacheUtilizationScorer(Scorer):
    type_name = "kv-cache-utilization-scorer"
    aliases = ("kv-cache-scorer",)
    ignores_parameters = True  # upstream's factory takes none

    def score(self, state: CycleState, request: InferenceRequest, endpoints: list[Endpoint]) -> list[float]:
        return [0.0 if m is None else min(1.0, max(0.0, 1.0 - m.kv_usage)) for m in state.metrics_of(endpoints)]
