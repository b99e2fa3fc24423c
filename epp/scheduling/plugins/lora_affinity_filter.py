"""lora-affinity-filter: keep endpoints that have the request's adapter, or room to load it.

Endpoints with the adapter active or loading are preferred; with probability
1 - `threshold` (default 0.999, as GIE) the endpoints with a free slot are chosen
instead, so an adapter spreads to more servers as its traffic grows.
"""

from __future__ import annotations

import random

from epp.datastore import Endpoint
from epp.requests import InferenceRequest
from epp.scheduling.framework import CycleState, Filter, Plugin, Seeded
from epp.scheduling.params import Params


class LoraAffinityFilter(Filter, Seeded):
    type_name = "lora-affinity-filter"

    def __init__(self, name: str = "", *, threshold: float = 0.999, seed: int | None = None) -> None:
        super().__init__(name)
        self.threshold = threshold
        self.rng = random.Random(seed)

    def reseed(self, seed: int) -> None:
        self.rng.seed(seed)

    @classmethod
    def from_parameters(cls, name: str, params: Params) -> Plugin:
        threshold = params.float("threshold", 0.999, minimum=0.0, maximum=1.0)
        params.done()
        return cls(name, threshold=threshold)

    def filter(self, state: CycleState, request: InferenceRequest, endpoints: list[Endpoint]) -> list[Endpoint]:
        model = request.target_model
        affinity: list[Endpoint] = []
        available: list[Endpoint] = []
        for ep in endpoints:
            m = state.metrics(ep)
            if m is None:
                continue
            if model in m.active_adapters or model in m.waiting_adapters:
                affinity.append(ep)
            elif len(m.active_adapters) + len(m.waiting_adapters) < m.max_lora:
                available.append(ep)
        if affinity and available:
            return affinity if self.rng.random() < self.threshold else available
        return affinity or available
