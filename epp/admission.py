"""Admission: a request's model rewrite and priority, and shedding of sheddable work when the pool is saturated.

The saturation detector gives the pool a saturation level; at 1.0 or more the pool is
saturated, and requests with priority < 0 (sheddable) get 429; priority >= 0 is never shed.
Two detectors, as GIE v1.5 and llm-d-router have them:

- `utilization-detector` (the default): each candidate scores max(waiting / queueDepthThreshold,
  KV use / kvCacheUtilThreshold), or 1.0 when its metrics are missing or older than
  metricsStalenessThreshold; the pool's level is the average over candidates.
- `concurrency-detector`: epp's own requests (or prompt tokens) in flight over the candidates'
  capacity, `maxConcurrency` (or `maxTokenConcurrency`) each; `hybrid` averages each
  candidate's larger ratio.

Both also serve as scheduling filters (listed in a profile), where they drop candidates past
threshold x (1 + headroom).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from epp import errors
from epp.datastore import Datastore, Endpoint
from epp.requests import InferenceRequest

REQUESTS, TOKENS, HYBRID = "requests", "tokens", "hybrid"


class Detector(ABC):
    """A pool's saturation level from its candidates: 1.0 and above is saturated."""

    type_name = ""

    @abstractmethod
    def saturation(self, endpoints: Sequence[Endpoint], now: float) -> float:
        ...

    @abstractmethod
    def admit(self, endpoints: list[Endpoint], now: float) -> list[Endpoint]:
        """The candidates still under their limits (as a scheduling filter)."""
        ...

    def saturated(self, endpoints: Sequence[Endpoint], now: float) -> bool:
        return self.saturation(endpoints, now) >= 1.0

    def describe(self) -> dict[str, Any]:
        return {}


@dataclass(slots=True)
class SaturationConfig:
    """The utilization detector's thresholds (upstream's defaults)."""

    queue_depth_threshold: int = 5
    kv_cache_util_threshold: float = 0.8
    metrics_staleness_threshold: float = 0.2
    headroom: float = 0.0


class UtilizationDetector(Detector):
    type_name = "utilization-detector"

    def __init__(self, config: SaturationConfig | None = None) -> None:
        self.config = config or SaturationConfig()

    def saturation(self, endpoints: Sequence[Endpoint], now: float) -> float:
        if not endpoints:
            return 1.0
        c = self.config
        queue, kv, stale = float(c.queue_depth_threshold), c.kv_cache_util_threshold, c.metrics_staleness_threshold
        total = 0.0
        for ep in endpoints:
            m = ep.fresh_metrics(now, stale)
            total += 1.0 if m is None else max(m.waiting / queue, m.kv_usage / kv)
        return total / len(endpoints)

    def admit(self, endpoints: list[Endpoint], now: float) -> list[Endpoint]:
        c = self.config
        grow = 1.0 + c.headroom
        queue, kv = c.queue_depth_threshold * grow, c.kv_cache_util_threshold * grow
        out = []
        for ep in endpoints:
            m = ep.fresh_metrics(now, c.metrics_staleness_threshold)
            if m is not None and m.waiting < queue and m.kv_usage < kv:
                out.append(ep)
        return out or endpoints  # upstream keeps everyone rather than route nowhere

    def describe(self) -> dict[str, Any]:
        c = self.config
        return {"queueDepthThreshold": c.queue_depth_threshold, "kvCacheUtilThreshold": c.kv_cache_util_threshold,
                "metricsStalenessThreshold": f"{c.metrics_staleness_threshold * 1000:g}ms", "headroom": c.headroom}


@dataclass(slots=True)
class ConcurrencyConfig:
    max_concurrency: int = 100
    headroom: float = 0.0
    mode: str = REQUESTS
    max_token_concurrency: int = 1_000_000


class ConcurrencyDetector(Detector):
    type_name = "concurrency-detector"

    def __init__(self, config: ConcurrencyConfig | None = None,
                 tokens: Callable[[Endpoint], int] | None = None) -> None:
        self.config = config or ConcurrencyConfig()
        # Prompt tokens epp has in flight per endpoint (the in-flight load producer's count).
        self.tokens: Callable[[Endpoint], int] = tokens or (lambda ep: 0)

    def saturation(self, endpoints: Sequence[Endpoint], now: float) -> float:
        if not endpoints:
            return 1.0
        c = self.config
        if c.mode == REQUESTS:
            return sum(ep.inflight for ep in endpoints) / (c.max_concurrency * len(endpoints))
        tokens = self.tokens
        if c.mode == TOKENS:
            return sum(tokens(ep) for ep in endpoints) / (c.max_token_concurrency * len(endpoints))
        total = 0.0
        for ep in endpoints:
            total += max(ep.inflight / c.max_concurrency, tokens(ep) / c.max_token_concurrency)
        return total / len(endpoints)

    def admit(self, endpoints: list[Endpoint], now: float) -> list[Endpoint]:
        c = self.config
        requests = int(c.max_concurrency * (1.0 + c.headroom))
        token_limit = int(c.max_token_concurrency * (1.0 + c.headroom))
        tokens = self.tokens
        if c.mode == REQUESTS:
            return [ep for ep in endpoints if ep.inflight < requests]
        if c.mode == TOKENS:
            return [ep for ep in endpoints if tokens(ep) < token_limit]
        return [ep for ep in endpoints if ep.inflight < requests and tokens(ep) < token_limit]

    def describe(self) -> dict[str, Any]:
        c = self.config
        return {"concurrencyMode": c.mode, "maxConcurrency": c.max_concurrency,
                "maxTokenConcurrency": c.max_token_concurrency, "headroom": c.headroom}


class SaturationDetector:
    """The detector admission asks; built from the config's (a detector, or the utilization
    detector's thresholds)."""

    def __init__(self, config: Detector | SaturationConfig | None = None) -> None:
        self.detector = config if isinstance(config, Detector) else UtilizationDetector(config)

    def saturation(self, endpoints: Sequence[Endpoint], now: float) -> float:
        return self.detector.saturation(endpoints, now)

    def saturated(self, endpoints: Sequence[Endpoint], now: float) -> bool:
        return self.detector.saturated(endpoints, now)


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
