"""active-request-scorer (llm-d-router): fewer requests in flight from this EPP score higher.

A server with at most `idleThreshold` requests in flight scores 1; a busier one
(max - count) / max * `maxBusyScore`, max being the busiest candidate's count. With
`maxBusyScore` < 1 every idle server beats every busy one by that gap. The counts are the
in-flight load producer's: exact, and fresher than any scrape.
"""

from __future__ import annotations

from typing import Any

from epp.datastore import Endpoint
from epp.requests import InferenceRequest
from epp.scheduling.framework import CycleState, Lookup, Plugin, Scorer, producer
from epp.scheduling.params import Params
from epp.scheduling.plugins.inflight_load_producer import InFlightLoadProducer


class ActiveRequestScorer(Scorer):
    type_name = "active-request-scorer"

    def __init__(self, name: str = "", *, idle_threshold: int = 0, max_busy_score: float = 1.0,
                 producer_name: str = "") -> None:
        super().__init__(name)
        self.idle_threshold = idle_threshold
        self.max_busy_score = max_busy_score
        self._producer_name = producer_name

    @classmethod
    def from_parameters(cls, name: str, params: Params) -> Plugin:
        params.deprecated("requestTimeout", why="deprecated upstream: the in-flight load producer tracks requests")
        idle = params.int("idleThreshold", 0)
        if idle < 0:  # upstream keeps its default for a negative value
            params.warnings.append(f"plugin {params.plugin_type!r}: idleThreshold {idle} < 0, using 0")
            idle = 0
        busy = params.float("maxBusyScore", 1.0)
        if not 0.0 <= busy <= 1.0:
            params.warnings.append(f"plugin {params.plugin_type!r}: maxBusyScore {busy} is outside [0, 1], using 1")
            busy = 1.0
        name_ = params.str("inFlightLoadProducerName", "", empty=True)
        params.done()
        return cls(name, idle_threshold=idle, max_busy_score=busy, producer_name=name_)

    def bind(self, lookup: Lookup) -> None:
        if self._producer_name:
            producer(lookup, InFlightLoadProducer, self._producer_name, param="inFlightLoadProducerName")

    def describe(self) -> dict[str, Any]:
        return {"idleThreshold": self.idle_threshold, "maxBusyScore": self.max_busy_score}

    def score(self, state: CycleState, request: InferenceRequest, endpoints: list[Endpoint]) -> list[float]:
        most = max((ep.inflight for ep in endpoints), default=0)
        idle, busy = self.idle_threshold, self.max_busy_score
        return [1.0 if ep.inflight <= idle else (most - ep.inflight) / most * busy for ep in endpoints]
