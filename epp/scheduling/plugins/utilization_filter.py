"""utilization-filter (llm-d-router): keep the servers within every configured limit.

`conditions`: each a `metric` with a `maxValue` a server must not exceed: `active-requests`
(epp's requests in flight there), `running-requests` and `waiting-queue` (as the server reports
them), `kv-cache-utilization` (a fraction, at most 1). With `fallbackOnEmpty`, when no server
passes, all are kept. A server whose scraped metrics are unknown (never scraped, or stale) does
not pass a condition on them: it is not trusted to be idle.
"""

from __future__ import annotations

from typing import Any

from epp.datastore import Endpoint
from epp.requests import InferenceRequest
from epp.scheduling.framework import CycleState, Filter, Lookup, Plugin, producer
from epp.scheduling.params import Params
from epp.scheduling.plugins.inflight_load_producer import InFlightLoadProducer

METRICS = ("active-requests", "running-requests", "waiting-queue", "kv-cache-utilization")


class UtilizationFilter(Filter):
    type_name = "utilization-filter"

    def __init__(self, name: str = "", *, conditions: tuple[tuple[str, float], ...],
                 fallback_on_empty: bool = False, producer_name: str = "") -> None:
        super().__init__(name)
        self.conditions = conditions
        self.fallback_on_empty = fallback_on_empty
        self._producer_name = producer_name
        self._scraped = any(metric != "active-requests" for metric, _ in conditions)

    @classmethod
    def from_parameters(cls, name: str, params: Params) -> Plugin:
        where = f"plugin {params.plugin_type!r}"
        conditions = []
        for i, cond in enumerate(params.list("conditions")):
            if not isinstance(cond, dict) or set(cond) - {"metric", "maxValue"}:
                raise ValueError(f"{where}: conditions[{i}] must be a mapping of 'metric' and 'maxValue'")
            metric, limit = cond.get("metric"), cond.get("maxValue")
            if metric not in METRICS:
                raise ValueError(f"{where}: conditions[{i}].metric must be one of {', '.join(METRICS)}, "
                                 f"got {metric!r}")
            if isinstance(limit, bool) or not isinstance(limit, int | float):
                raise ValueError(f"{where}: conditions[{i}] for {metric!r} requires a numeric maxValue")
            if limit < 0 or (metric == "kv-cache-utilization" and limit > 1):
                raise ValueError(f"{where}: conditions[{i}].maxValue for {metric!r} must be "
                                 f"{'in [0, 1]' if metric == 'kv-cache-utilization' else '>= 0'}, got {limit}")
            conditions.append((metric, float(limit)))
        fallback = params.bool("fallbackOnEmpty", False)
        producer_name = params.str("inFlightLoadProducerName", "", empty=True)
        params.done()
        if not conditions:
            raise ValueError(f"{where}: at least one condition is required")
        return cls(name, conditions=tuple(conditions), fallback_on_empty=fallback, producer_name=producer_name)

    def bind(self, lookup: Lookup) -> None:
        if self._producer_name:
            producer(lookup, InFlightLoadProducer, self._producer_name, param="inFlightLoadProducerName")

    def describe(self) -> dict[str, Any]:
        return {"conditions": [{"metric": m, "maxValue": v} for m, v in self.conditions],
                "fallbackOnEmpty": self.fallback_on_empty}

    def filter(self, state: CycleState, request: InferenceRequest, endpoints: list[Endpoint]) -> list[Endpoint]:
        out = [ep for ep in endpoints if self._passes(state, ep)]
        if not out and self.fallback_on_empty:
            return endpoints
        return out

    def _passes(self, state: CycleState, ep: Endpoint) -> bool:
        m = state.metrics(ep) if self._scraped else None
        for metric, limit in self.conditions:
            if metric == "active-requests":
                value: float = ep.inflight
            elif m is None:
                return False
            elif metric == "running-requests":
                value = m.running
            elif metric == "waiting-queue":
                value = m.waiting
            else:
                value = m.kv_usage
            if value > limit:
                return False
        return True
