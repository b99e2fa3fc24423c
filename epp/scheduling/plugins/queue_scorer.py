"""queue-scorer: prefer short waiting queues, min-max normalised so the shortest scores 1.

An endpoint whose metrics are unknown (never scraped, or stale) is treated as having
the longest queue: it is not trusted to be idle.
"""

from __future__ import annotations

from epp.datastore import Endpoint
from epp.requests import InferenceRequest
from epp.scheduling.framework import CycleState, Scorer


class QueueScorer(Scorer):
    type_name = "queue-scorer"
    ignores_parameters = True  # upstream's factory takes none

    def score(self, state: CycleState, request: InferenceRequest, endpoints: list[Endpoint]) -> list[float]:
        queues = [None if m is None else m.waiting for m in state.metrics_of(endpoints)]
        known = [q for q in queues if q is not None]
        if not known:
            return [0.0] * len(endpoints)
        lo, hi = min(known), max(known)
        if len(known) < len(queues):
            hi = max(hi, lo + 1)  # unknown endpoints sit at the bottom
        if hi == lo:
            return [1.0] * len(endpoints)
        span = hi - lo
        return [0.0 if q is None else (hi - q) / span for q in queues]
