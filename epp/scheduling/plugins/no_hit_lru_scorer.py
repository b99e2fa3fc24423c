"""no-hit-lru-scorer (llm-d-router): send a cold request to the server that least recently got one.

A request is cold when no candidate holds any of its prefix (the prefix producer's match). A cold
request's new KV blocks then land where they evict least: servers that never took a cold request
score highest (1, then falling in candidate order), then the least recently used ones; the
latest scores lowest (down to 0). A warm request scores 0.5 everywhere, leaving the choice to
cache affinity. The server a cold request is sent to becomes the most recent; the LRU holds
`lruSize` servers.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from epp.datastore import Endpoint
from epp.requests import InferenceRequest
from epp.scheduling.framework import (
    CycleState,
    EndpointsChanged,
    Lookup,
    Plugin,
    PreRequest,
    SchedulingResult,
    Scorer,
    producer,
)
from epp.scheduling.params import Params
from epp.scheduling.plugins.approx_prefix_cache_producer import ApproxPrefixCacheProducer

DEFAULT_LRU_SIZE = 1024


class NoHitLRUScorer(Scorer, PreRequest, EndpointsChanged):
    type_name = "no-hit-lru-scorer"

    def __init__(self, name: str = "", *, lru_size: int = DEFAULT_LRU_SIZE, producer_name: str = "") -> None:
        super().__init__(name)
        self.lru_size = lru_size
        self._producer_name = producer_name
        self.prefix = ApproxPrefixCacheProducer()
        self._lru: OrderedDict[str, None] = OrderedDict()  # hostport, least recently used first
        self._cold_key = object()

    @classmethod
    def from_parameters(cls, name: str, params: Params) -> Plugin:
        params.deprecated("prefixPluginType", "prefixPluginName", why="deprecated upstream, never used")
        size = params.int("lruSize", DEFAULT_LRU_SIZE)
        if size <= 0:
            size = DEFAULT_LRU_SIZE  # upstream keeps its default for a value <= 0
        producer_name = params.str("prefixMatchInfoProducerName", "", empty=True)
        params.done()
        return cls(name, lru_size=size, producer_name=producer_name)

    def bind(self, lookup: Lookup) -> None:
        self.prefix = producer(lookup, ApproxPrefixCacheProducer, self._producer_name,
                               param="prefixMatchInfoProducerName")

    def describe(self) -> dict[str, Any]:
        return {"lruSize": self.lru_size, "prefixMatchInfoProducerName": self.prefix.name}

    def score(self, state: CycleState, request: InferenceRequest, endpoints: list[Endpoint]) -> list[float]:
        matched = self.prefix.matched_blocks(state, request, endpoints)
        cold = not any(matched.values())
        state.data[self._cold_key] = cold
        n = len(endpoints)
        if not cold:
            return [0.5] * n
        if n == 1:
            return [1.0]
        lru = self._lru
        position = {hostport: i for i, hostport in enumerate(lru)} if lru else {}
        span = n - 1
        never = [i for i, ep in enumerate(endpoints) if ep.hostport not in position]
        out = [0.0] * n
        for rank, i in enumerate(never):
            out[i] = 1.0 - rank / span
        offset = len(never)
        for i, ep in enumerate(endpoints):
            pos = position.get(ep.hostport)
            if pos is not None:
                out[i] = max(0.0, 1.0 - (offset + pos) / span)
        return out

    def pre_request(self, state: CycleState, request: InferenceRequest, result: SchedulingResult) -> None:
        if not state.data.get(self._cold_key):
            return
        lru = self._lru
        hostport = result.endpoint.hostport
        if hostport in lru:
            lru.move_to_end(hostport)
        else:
            lru[hostport] = None
            if len(lru) > self.lru_size:
                lru.popitem(last=False)

    def endpoints_changed(self, added: list[Endpoint], removed: list[Endpoint]) -> None:
        for ep in removed:
            self._lru.pop(ep.hostport, None)
