"""running-requests-size-scorer (GIE, llm-d-router): fewer requests running on the server score higher.

The server's own count, as it reports it (`vllm:num_requests_running`), min-max normalised over
the candidates: the fewest score 1, the most 0, all equal 1. A server whose metrics are unknown
(never scraped, or stale) is taken as the busiest: it is not trusted to be idle.
(`running-requests-scorer` is epp's count of its own requests in flight instead.)
"""

from __future__ import annotations

from epp.datastore import Endpoint
from epp.requests import InferenceRequest
from epp.scheduling.framework import CycleState, Scorer


class RunningRequestsSizeScorer(Scorer):
    type_name = "running-requests-size-scorer"
    ignores_parameters = True

    def score(self, state: CycleState, request: InferenceRequest, endpoints: list[Endpoint]) -> list[float]:
        running = []
        for ep in endpoints:
            m = state.metrics(ep)
            running.append(None if m is None else m.running)
        known = [r for r in running if r is not None]
        if not known:
            return [0.0] * len(endpoints)
        lo, hi = min(known), max(known)
        if len(known) < len(running):
            hi = max(hi, lo + 1)  # unknown endpoints sit at the bottom
        if hi == lo:
            return [1.0] * len(endpoints)
        span = hi - lo
        return [0.0 if r is None else (hi - r) / span for r in running]
