"""load-aware-scorer (llm-d-router): an empty waiting queue scores 0.5, a queue of `threshold` or more 0.

Score = 0.5 * (1 - min(waiting, threshold) / threshold); the upper half is kept for servers with
spare capacity, as upstream documents. A server whose metrics are unknown (never scraped, or
stale) scores 0: it is not trusted to be idle.
"""

from __future__ import annotations

from typing import Any

from epp.datastore import Endpoint
from epp.requests import InferenceRequest
from epp.scheduling.framework import CycleState, Plugin, Scorer
from epp.scheduling.params import Params

DEFAULT_THRESHOLD = 128


class LoadAwareScorer(Scorer):
    type_name = "load-aware-scorer"

    def __init__(self, name: str = "", *, threshold: int = DEFAULT_THRESHOLD) -> None:
        super().__init__(name)
        self.threshold = float(threshold)

    @classmethod
    def from_parameters(cls, name: str, params: Params) -> Plugin:
        threshold = params.int("threshold", DEFAULT_THRESHOLD)
        if threshold <= 0:  # upstream falls back to the default
            params.warnings.append(f"plugin {params.plugin_type!r}: threshold {threshold} is not positive, "
                                   f"using {DEFAULT_THRESHOLD}")
            threshold = DEFAULT_THRESHOLD
        params.done()
        return cls(name, threshold=threshold)

    def describe(self) -> dict[str, Any]:
        return {"threshold": int(self.threshold)}

    def score(self, state: CycleState, request: InferenceRequest, endpoints: list[Endpoint]) -> list[float]:
        limit = self.threshold
        out = []
        for ep in endpoints:
            m = state.metrics(ep)
            if m is None:
                out.append(0.0)
            else:
                out.append(0.5 * (1.0 - min(m.waiting, limit) / limit))
        return out
