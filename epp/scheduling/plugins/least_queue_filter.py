"""least-queue-filter: keep the endpoints whose waiting queue is near the shortest (GIE's band rule)."""

from __future__ import annotations

from epp.datastore import Endpoint
from epp.requests import InferenceRequest
from epp.scheduling.filtering import near_minimum
from epp.scheduling.framework import CycleState, Filter


class LeastQueueFilter(Filter):
    type_name = "least-queue-filter"

    def filter(self, state: CycleState, request: InferenceRequest, endpoints: list[Endpoint]) -> list[Endpoint]:
        return near_minimum(state, endpoints, lambda m: m.waiting)
