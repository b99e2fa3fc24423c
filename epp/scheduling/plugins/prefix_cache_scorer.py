"""prefix-cache-scorer: prefer the server that already holds the longest prefix of this prompt.

Score = matched leading blocks / total blocks, as upstream; with `matchLengthWeight` w > 0
(llm-d-router), (1 - w) * that + w * min(1, matched tokens / `matchLengthScaleTokens`)^2, so a
long absolute match counts beyond its share of a longer prompt.

The match comes from an `approx-prefix-cache-producer` (`prefixMatchInfoProducerName`, or the
config's one, created with its defaults if the config has none), as in GIE v1.5 and llm-d-router.
Older releases gave the index's parameters (`blockSizeTokens`, `hashBlockSize`, ...) to the
scorer itself: then the scorer keeps its own index with them.
"""

from __future__ import annotations

from typing import Any

from epp.datastore import Endpoint
from epp.errors import ConfigError
from epp.requests import InferenceRequest
from epp.scheduling.framework import (
    Binder,
    CycleState,
    EndpointsChanged,
    Lookup,
    Plugin,
    PrefixIndexHolder,
    PreRequest,
    SchedulingResult,
    Scorer,
    producer,
)
from epp.scheduling.params import Params
from epp.scheduling.plugins.approx_prefix_cache_producer import (
    AVERAGE_CHARS_PER_TOKEN,
    INDEX_PARAMETERS,
    ApproxPrefixCacheProducer,
    index_parameters,
)
from epp.scheduling.prefix_index import PrefixIndex

__all__ = ["AVERAGE_CHARS_PER_TOKEN", "PrefixCacheScorer"]


class PrefixCacheScorer(Scorer, PreRequest, EndpointsChanged, PrefixIndexHolder):
    type_name = "prefix-cache-scorer"
    hook_order = 10  # its own index learns the pick after the plugins that read this request's match

    def __init__(self, name: str = "", *, producer_name: str = "", shared: bool = False,
                 match_length_weight: float = 0.0, match_length_scale_tokens: int = 8192,
                 **index: Any) -> None:
        super().__init__(name)
        # Its own index until bound to a shared producer (a scorer used on its own keeps its own).
        self.producer = ApproxPrefixCacheProducer(self.name, **index)
        self._owns_producer = True
        self._shared = shared
        self._producer_name = producer_name
        self.match_length_weight = match_length_weight
        self.match_length_scale_tokens = match_length_scale_tokens

    @classmethod
    def from_parameters(cls, name: str, params: Params) -> Plugin:
        producer_name = params.str("prefixMatchInfoProducerName", "", empty=True)
        weight = params.float("matchLengthWeight", 0.0, minimum=0.0, maximum=1.0)
        scale = params.int("matchLengthScaleTokens", 8192)
        if weight > 0 and scale <= 0:
            raise ConfigError(f"plugin {params.plugin_type!r}: matchLengthScaleTokens must be > 0 when "
                              f"matchLengthWeight > 0, got {scale}")
        legacy = [key for key in INDEX_PARAMETERS if params.has(key)]
        if legacy and producer_name:
            raise ConfigError(f"plugin {params.plugin_type!r}: {legacy} configure an index; with "
                              "prefixMatchInfoProducerName give them to that approx-prefix-cache-producer")
        if legacy:
            return cls(name, match_length_weight=weight, match_length_scale_tokens=scale, **index_parameters(params))
        params.done()
        return cls(name, producer_name=producer_name, shared=True, match_length_weight=weight,
                   match_length_scale_tokens=scale)

    def bind(self, lookup: Lookup) -> None:
        if not self._shared:
            return
        shared = producer(lookup, ApproxPrefixCacheProducer, self._producer_name, param="prefixMatchInfoProducerName")
        if isinstance(lookup, Binder) or lookup(shared.name) is shared:
            self.producer = shared  # it gets the request hooks itself
            self._owns_producer = False

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"matchLengthWeight": self.match_length_weight}
        if self.match_length_weight:
            out["matchLengthScaleTokens"] = self.match_length_scale_tokens
        if self._owns_producer:
            out.update(self.producer.describe())
        else:
            out["prefixMatchInfoProducerName"] = self.producer.name
        return out

    @property
    def own_producer(self) -> ApproxPrefixCacheProducer | None:
        """The index this scorer keeps itself, or None when it reads a shared producer's."""
        return self.producer if self._owns_producer else None

    # The index, for the plugins that read it through the scorer (prefill-load-scorer).
    @property
    def index(self) -> PrefixIndex:
        return self.producer.index

    @property
    def block_tokens(self) -> int:
        return self.producer.block_tokens

    @property
    def block_chars(self) -> int:
        return self.producer.block_chars

    @property
    def max_prefix_blocks(self) -> int:
        return self.producer.max_prefix_blocks

    def hashes(self, state: CycleState, request: InferenceRequest) -> list[int]:
        return self.producer.hashes(state, request)

    def matched_blocks(self, state: CycleState, request: InferenceRequest, endpoints: list[Endpoint]) -> dict[str, int]:
        return self.producer.matched_blocks(state, request, endpoints)

    def prefix_match(self, state: CycleState, request: InferenceRequest, endpoint: Endpoint) -> tuple[int, int]:
        """(cached, total) bytes of this prompt's prefix on `endpoint`, as the index saw it when scoring
        (upstream's prefix-match metrics: blocks times the block's characters)."""
        hashes = self.producer.hashes(state, request)
        if not hashes:
            return 0, 0
        blocks = self.producer.matched_blocks(state, request, [endpoint]).get(endpoint.hostport, 0)
        return blocks * self.producer.block_chars, len(hashes) * self.producer.block_chars

    def score(self, state: CycleState, request: InferenceRequest, endpoints: list[Endpoint]) -> list[float]:
        matched = self.producer.matched_blocks(state, request, endpoints)
        total = len(self.producer.hashes(state, request))
        if not total:
            return [0.0] * len(endpoints)
        w = self.match_length_weight
        if not w:
            return [matched.get(ep.hostport, 0) / total for ep in endpoints]
        per_block = self.producer.block_tokens / self.match_length_scale_tokens
        out = []
        for ep in endpoints:
            blocks = matched.get(ep.hostport, 0)
            length = min(1.0, blocks * per_block)
            out.append(w * length * length + (1.0 - w) * blocks / total)
        return out

    # The hooks reach the index only when it is the scorer's own; a shared producer gets them itself.
    def pre_request(self, state: CycleState, request: InferenceRequest, result: SchedulingResult) -> None:
        if self._owns_producer:
            self.producer.pre_request(state, request, result)

    def endpoints_changed(self, added: list[Endpoint], removed: list[Endpoint]) -> None:
        if self._owns_producer:
            self.producer.endpoints_changed(added, removed)

    def prefix_index_size(self) -> int:
        return self.producer.prefix_index_size() if self._owns_producer else 0
