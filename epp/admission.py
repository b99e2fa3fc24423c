"""Admission: a request's model rewrite and priority, and shedding of sheddable work when the pool is saturated.

A pod has capacity while its metrics are fresh and its queue and KV-cache use are
under the thresholds; the pool is saturated when no candidate has capacity. Then
requests with priority < 0 (sheddable) get 429; priority >= 0 is never shed.
"""

from __future__ import annotations

from collections.abc import Sequence

from epp import errors
from epp.datastore import Datastore, Endpoint
from epp.requests import InferenceRequest
from epp.scheduling.picker_config import SaturationConfig


class SaturationDetector:
    def __init__(self, config: SaturationConfig) -> None:
        self.config = config

    def has_capacity(self, ep: Endpoint, now: float) -> bool:
        c = self.config
        m = ep.fresh_metrics(now, c.metrics_staleness_threshold)
        return m is not None and m.waiting < c.queue_depth_threshold and m.kv_usage < c.kv_cache_util_threshold

    def saturated(self, endpoints: Sequence[Endpoint], now: float) -> bool:
        return not any(self.has_capacity(ep, now) for ep in endpoints)


class Admission:
    def __init__(self, datastore: Datastore, detector: SaturationDetector) -> None:
        self.datastore = datastore
        self.detector = detector

    def resolve(self, request: InferenceRequest) -> str | None:
        """Set the request's target model (model rewrites) and priority (its objective's).

        Returns the name of the InferenceModelRewrite that chose the target model, if one did.
        """
        rewrite = None
        rewrites = self.datastore.rewrites
        if rewrites:
            chosen = rewrites.rewrite(request.model)
            if chosen is not None:
                request.target_model, rewrite = chosen
        request.priority = self.datastore.objectives.get(request.objective, 0) if request.objective else 0
        return rewrite

    def shed(self, request: InferenceRequest, candidates: Sequence[Endpoint], now: float) -> errors.EppError | None:
        """The 429 for a sheddable request (priority < 0) while the pool is saturated, else None."""
        if request.priority < 0 and self.detector.saturated(candidates, now):
            return errors.EppError(
                errors.RESOURCE_EXHAUSTED,
                "the inference pool is saturated and this request is sheddable (priority < 0); retry later",
                reason="pool_saturated",
            )
        return None
