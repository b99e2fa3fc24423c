"""token-load-scorer (GIE, llm-d-router): fewer prompt tokens in flight to the server score higher.

Load = the tokens epp has in flight there (the in-flight load producer's count) plus the tokens
this request would add there; score = 1 - min(load, `queueThresholdTokens`) / that threshold,
so an idle server scores 1 and one at the threshold (default 4194304: 128 requests of 32K) 0.
"""

from __future__ import annotations

from typing import Any

from epp.datastore import Endpoint
from epp.requests import InferenceRequest
from epp.scheduling.framework import CycleState, Lookup, Plugin, Scorer, producer
from epp.scheduling.params import Params
from epp.scheduling.plugins.inflight_load_producer import InFlightLoadProducer

DEFAULT_THRESHOLD_TOKENS = 4194304


class TokenLoadScorer(Scorer):
    type_name = "token-load-scorer"

    def __init__(self, name: str = "", *, threshold_tokens: int = DEFAULT_THRESHOLD_TOKENS,
                 producer_name: str = "") -> None:
        super().__init__(name)
        self.threshold = float(threshold_tokens)
        self._producer_name = producer_name
        self.load = InFlightLoadProducer()

    @classmethod
    def from_parameters(cls, name: str, params: Params) -> Plugin:
        threshold = params.int("queueThresholdTokens", DEFAULT_THRESHOLD_TOKENS)
        if threshold <= 0:  # upstream falls back to the default
            params.warnings.append(f"plugin {params.plugin_type!r}: queueThresholdTokens {threshold} is not "
                                   f"positive, using {DEFAULT_THRESHOLD_TOKENS}")
            threshold = DEFAULT_THRESHOLD_TOKENS
        producer_name = params.str("inFlightLoadProducerName", "", empty=True)
        params.done()
        return cls(name, threshold_tokens=threshold, producer_name=producer_name)

    def bind(self, lookup: Lookup) -> None:
        self.load = producer(lookup, InFlightLoadProducer, self._producer_name, param="inFlightLoadProducerName")

    def describe(self) -> dict[str, Any]:
        return {"queueThresholdTokens": int(self.threshold), "inFlightLoadProducerName": self.load.name}

    def score(self, state: CycleState, request: InferenceRequest, endpoints: list[Endpoint]) -> list[float]:
        load, limit = self.load, self.threshold
        extra = load.uncached(state, request, endpoints)
        out = []
        for ep, own in zip(endpoints, extra, strict=True):
            tokens = load.tokens(ep) + own
            out.append(1.0 if tokens <= 0 else 1.0 - min(tokens, limit) / limit)
        return out
