"""weighted-random-picker: pick at random with probability proportional to the total score.

Spreads load where max-score would pile every request onto the single best endpoint.
Uses A-Res weighted sampling (key = U^(1/score), largest keys win), as GIE does, so
`maxNumOfEndpoints` > 1 draws fallbacks without replacement. Zero-score endpoints
are chosen only when every score is zero (then uniformly).
"""

from __future__ import annotations

from epp.datastore import Endpoint
from epp.requests import InferenceRequest
from epp.scheduling.framework import CountedPicker, CycleState


class WeightedRandomPicker(CountedPicker):
    type_name = "weighted-random-picker"

    def pick(
        self, state: CycleState, request: InferenceRequest, endpoints: list[Endpoint], scores: list[float]
    ) -> list[Endpoint]:
        k = min(self.max_endpoints, len(endpoints))
        if not any(s > 0 for s in scores):
            return self.rng.sample(endpoints, k)
        rand = self.rng.random
        keys = [(rand() or 1e-12) ** (1.0 / s) if s > 0 else -1.0 for s in scores]
        order = sorted(range(len(endpoints)), key=keys.__getitem__, reverse=True)
        return [endpoints[i] for i in order[:k]]
