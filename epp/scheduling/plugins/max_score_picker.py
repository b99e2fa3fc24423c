"""max-score-picker: the highest total score wins; ties are broken at random.

`maxNumOfEndpoints` > 1 returns that many endpoints best first: the rest are
fallbacks the proxy may retry on.
"""

from __future__ import annotations

import random
from typing import Any

from epp.datastore import Endpoint
from epp.requests import InferenceRequest
from epp.scheduling.framework import CycleState, Picker, Plugin
from epp.scheduling.params import Params
from epp.scheduling.registry import register


@register("max-score-picker")
class MaxScorePicker(Picker):
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
        best = max(scores)
        ties = [i for i, s in enumerate(scores) if s == best]
        first = ties[0] if len(ties) == 1 else self.rng.choice(ties)
        if self.max_endpoints == 1:
            return [endpoints[first]]
        # Shuffle before the stable sort so equal scores among fallbacks are ordered at random too.
        order = [i for i in range(len(endpoints)) if i != first]
        self.rng.shuffle(order)
        order.sort(key=lambda i: -scores[i])
        return [endpoints[first]] + [endpoints[i] for i in order[: self.max_endpoints - 1]]
