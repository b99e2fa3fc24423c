"""Shared by the filters: keep the endpoints whose value is near the pool's minimum.

GIE's least-queue and least-KV filters keep values in [min, min + (max - min) / n]:
the best band, narrower as the pool grows. Endpoints with unknown (stale) metrics
are dropped while any endpoint is known, and kept when none is, so a filter never
empties the pool because the scraper is behind.
"""

from __future__ import annotations

from collections.abc import Callable

from epp.datastore import Endpoint, EndpointMetrics
from epp.scheduling.framework import CycleState


def near_minimum(
    state: CycleState, endpoints: list[Endpoint], value: Callable[[EndpointMetrics], float]
) -> list[Endpoint]:
    known: list[tuple[Endpoint, float]] = []
    for ep in endpoints:
        m = state.metrics(ep)
        if m is not None:
            known.append((ep, value(m)))
    if not known:
        return endpoints
    lo = min(v for _, v in known)
    hi = max(v for _, v in known)
    limit = lo + (hi - lo) / len(endpoints)
    return [ep for ep, v in known if v <= limit]
