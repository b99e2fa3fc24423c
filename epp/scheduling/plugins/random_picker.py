"""random-picker: a uniformly random endpoint, ignoring scores (a baseline, and for A/B tests)."""

from __future__ import annotations

import random
from typing import Any

from epp.datastore import Endpoint
from epp.requests import InferenceRequest
from epp.scheduling.framework import CycleState, Picker, Plugin
from epp.scheduling.params import Params
from epp.scheduling.registry import register


@register("random-picker")
class RandomPicker(Picker):
    def __init__(self, name: str = "", *, max_endpoints: int = 1, seed: int | None = None) -> None:
        super().__init__(name)
        self.max_endpoints = max_endpoints
        self.rng = random.Random(seed)

    @classmethod
    def from_parameters(cls, name: str, params: dict[str, Any]) -> Plugin:
        p = Params(cls.type_name, params)
        max_endpoints = p.int("maxNumOfEndpoints", 1, minimum=1)
        p.done()
        return cls(name, max_endpoints=max_endpoints)

    def pick(
        self, state: CycleState, request: InferenceRequest, endpoints: list[Endpoint], scores: list[float]
    ) -> list[Endpoint]:
        return self.rng.sample(endpoints, min(self.max_endpoints, len(endpoints)))
