"""random-picker: a uniformly random endpoint, ignoring scores (a baseline, and for A/B tests)."""

from __future__ import annotations

from epp.datastore import Endpoint
from epp.requests import InferenceRequest
from epp.scheduling.framework import CountedPicker, CycleState


class RandomPicker(CountedPicker):
    type_name = "random-picker"

    def pick(
        self, state: CycleState, request: InferenceRequest, endpoints: list[Endpoint], scores: list[float]
    ) -> list[Endpoint]:
        return self.rng.sample(endpoints, min(self.max_endpoints, len(endpoints)))
