"""low-queue-filter: keep endpoints whose waiting queue is at most `threshold` (default 128, as GIE).

In the decision-tree profile it decides whether LoRA affinity may outweigh load:
when every queue is long, the tree falls back to plain least-queue.
Endpoints with unknown metrics do not pass: they are not known to have a short queue.
"""

from __future__ import annotations

from epp.datastore import Endpoint
from epp.requests import InferenceRequest
from epp.scheduling.framework import CycleState, Filter, Plugin
from epp.scheduling.params import Params


class LowQueueFilter(Filter):
    type_name = "low-queue-filter"

    def __init__(self, name: str = "", *, threshold: int = 128) -> None:
        super().__init__(name)
        self.threshold = threshold

    @classmethod
    def from_parameters(cls, name: str, params: Params) -> Plugin:
        threshold = params.int("threshold", 128, minimum=0)
        params.done()
        return cls(name, threshold=threshold)

    def filter(self, state: CycleState, request: InferenceRequest, endpoints: list[Endpoint]) -> list[Endpoint]:
        out = []
        for ep in endpoints:
            m = state.metrics(ep)
            if m is not None and m.waiting <= self.threshold:
                out.append(ep)
        return out
