"""lora-affinity-scorer: adapter already running (1.0) > room to load it (0.8) > waiting (0.6) > none (0).

Loading an adapter costs the server time; running one it already has is free.
"""

from __future__ import annotations

from epp.datastore import Endpoint
from epp.requests import InferenceRequest
from epp.scheduling.framework import CycleState, Scorer


class LoraAffinityScorer(Scorer):
    type_name = "lora-affinity-scorer"
    ignores_parameters = True  # upstream's factory takes none

    def score(self, state: CycleState, request: InferenceRequest, endpoints: list[Endpoint]) -> list[float]:
        model = request.target_model
        out = []
        for m in state.metrics_of(endpoints):
            if m is None:
                out.append(0.0)
            elif model in m.active_adapters:
                out.append(1.0)
            elif len(m.active_adapters) + len(m.waiting_adapters) < m.max_lora:
                out.append(0.8)
            elif model in m.waiting_adapters:
                out.append(0.6)
            else:
                out.append(0.0)
        return out
