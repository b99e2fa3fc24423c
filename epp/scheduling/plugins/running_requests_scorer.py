"""running-requests-scorer: prefer endpoints with fewer requests in flight from this EPP.

The count is the EPP's own (incremented when a pick is sent, decremented when the
response ends), so it is exact and fresher than any scrape. Min-max normalised.
"""

from __future__ import annotations

from epp.datastore import Endpoint
from epp.requests import InferenceRequest
from epp.scheduling.framework import CycleState, Scorer


class RunningRequestsScorer(Scorer):
    type_name = "running-requests-scorer"
    aliases = ("inflight-scorer",)

    def score(self, state: CycleState, request: InferenceRequest, endpoints: list[Endpoint]) -> list[float]:
        counts = [ep.inflight for ep in endpoints]
        lo, hi = min(counts), max(counts)
        if hi == lo:
            return [1.0] * len(endpoints)
        span = hi - lo
        return [(hi - c) / span for c in counts]
