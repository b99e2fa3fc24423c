"""prefix-cache-affinity-filter (GIE, llm-d-router): narrow the candidates to the servers that hold
the prompt's prefix ("sticky": prefix match >= `affinityThreshold`, 0.8), unless that costs too much.

- No sticky server, one candidate, or a threshold <= 0: every candidate is kept.
- With probability `explorationProbability` (0) the gate is skipped, to seed the cache elsewhere.
- The load gate: when the best sticky server's time to first token exceeds the best other's by
  more than `maxTTFTPenaltyMs` (18000; 0 always sticks), every candidate is kept. The time is
  estimated from the tokens epp has in flight there: tokens / `peakPrefillThroughput` (15928
  tokens/s) * 1000 ms (`ttftSource: prefillThroughput`, upstream's default).
The prefix match comes from an approx-prefix-cache-producer, the in-flight tokens from the
in-flight load producer; both are created with their defaults when a config names none.
"""

from __future__ import annotations

import random
from typing import Any

from epp.datastore import Endpoint
from epp.errors import ConfigError
from epp.requests import InferenceRequest
from epp.scheduling.framework import CycleState, Filter, Lookup, Plugin, Seeded, producer
from epp.scheduling.params import Params
from epp.scheduling.plugins.approx_prefix_cache_producer import ApproxPrefixCacheProducer
from epp.scheduling.plugins.inflight_load_producer import InFlightLoadProducer


class PrefixCacheAffinityFilter(Filter, Seeded):
    type_name = "prefix-cache-affinity-filter"

    def __init__(self, name: str = "", *, threshold: float = 0.8, exploration: float = 0.0,
                 max_penalty_ms: float = 18000.0, peak_throughput: float = 15928.0,
                 prefix_name: str = "", load_name: str = "", seed: int | None = None) -> None:
        super().__init__(name)
        self.threshold = threshold
        self.exploration = exploration
        self.max_penalty_ms = max_penalty_ms
        self.peak_throughput = peak_throughput
        self._prefix_name = prefix_name
        self._load_name = load_name
        self.prefix = ApproxPrefixCacheProducer()
        self.load = InFlightLoadProducer()
        self.rng = random.Random(seed)

    def reseed(self, seed: int) -> None:
        self.rng.seed(seed)

    @classmethod
    def from_parameters(cls, name: str, params: Params) -> Plugin:
        where = f"plugin {params.plugin_type!r}"
        threshold = params.float("affinityThreshold", 0.8, maximum=1.0)
        exploration = params.float("explorationProbability", 0.0, minimum=0.0, maximum=1.0)
        penalty = params.float("maxTTFTPenaltyMs", 18000.0, minimum=0.0)
        source = params.str("ttftSource", "prefillThroughput", choices=("prefillThroughput", "latencyPredictor"))
        if source == "latencyPredictor":
            raise ConfigError(f"{where}: ttftSource latencyPredictor needs the latency predictor "
                              "(predicted-latency-producer), which epp does not run; use prefillThroughput")
        params.deprecated("latencyPredictionInfoProducerName", why="only read with ttftSource latencyPredictor")
        peak = params.float("peakPrefillThroughput", 15928.0, minimum=0.0)
        if penalty > 0 and peak == 0:
            raise ConfigError(f"{where}: peakPrefillThroughput must be > 0 when ttftSource is prefillThroughput")
        prefix = params.str("prefixMatchInfoProducerName", "", empty=True)
        load = params.str("inFlightLoadProducerName", "", empty=True)
        params.done()
        return cls(name, threshold=threshold, exploration=exploration, max_penalty_ms=penalty,
                   peak_throughput=peak, prefix_name=prefix, load_name=load)

    def bind(self, lookup: Lookup) -> None:
        self.prefix = producer(lookup, ApproxPrefixCacheProducer, self._prefix_name,
                               param="prefixMatchInfoProducerName")
        if self.max_penalty_ms > 0:
            self.load = producer(lookup, InFlightLoadProducer, self._load_name, param="inFlightLoadProducerName")

    def describe(self) -> dict[str, Any]:
        return {"affinityThreshold": self.threshold, "explorationProbability": self.exploration,
                "maxTTFTPenaltyMs": self.max_penalty_ms, "ttftSource": "prefillThroughput",
                "peakPrefillThroughput": self.peak_throughput}

    def filter(self, state: CycleState, request: InferenceRequest, endpoints: list[Endpoint]) -> list[Endpoint]:
        if len(endpoints) <= 1 or self.threshold <= 0:
            return endpoints
        if self.exploration and self.rng.random() < self.exploration:
            return endpoints
        total = len(self.prefix.hashes(state, request))
        if not total:
            return endpoints
        matched = self.prefix.matched_blocks(state, request, endpoints)
        cut = self.threshold * total
        sticky = [ep for ep in endpoints if matched.get(ep.hostport, 0) >= cut]
        if not sticky:
            return endpoints
        if self.max_penalty_ms > 0 and len(sticky) < len(endpoints):
            tokens = self.load.tokens
            best_sticky = min(tokens(ep) for ep in sticky)
            best_other = min(tokens(ep) for ep in endpoints if ep not in sticky)
            if (best_sticky - best_other) / self.peak_throughput * 1000.0 > self.max_penalty_ms:
                return endpoints
        return sticky
