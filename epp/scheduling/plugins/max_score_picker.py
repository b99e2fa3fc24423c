"""max-score-picker: the highest total score wins; ties are broken at random.

`maxNumOfEndpoints` > 1 returns that many endpoints best first: the rest are
fallbacks the proxy may retry on.
"""

from __future__ import annotations

from epp.datastore import Endpoint
from epp.requests import InferenceRequest
from epp.scheduling.framework import CountedPicker, CycleState


class MaxScorePicker(CountedPicker):
    type_name = "max-score-picker"

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
