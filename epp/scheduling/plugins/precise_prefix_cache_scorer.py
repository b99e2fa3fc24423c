"""precise-prefix-cache-scorer: llm-d's older all-in-one type, a precise producer and a prefix scorer.

llm-d-router deprecates it for precise-prefix-cache-producer with prefix-cache-scorer naming it
(`prefixMatchInfoProducerName`); epp runs both forms. With a precise-prefix-cache-producer in the
config it scores on that one, its own parameters unused (as upstream); otherwise it keeps its own
producer built from its parameters, the producer's (see precise_prefix_cache_producer.py).
Score = matched leading blocks / the prompt's blocks.
"""

from __future__ import annotations

from typing import Any

from epp.scheduling.framework import Binder, Closes, Lookup, Plugin
from epp.scheduling.params import Params
from epp.scheduling.plugins.precise_prefix_cache_producer import PrecisePrefixCacheProducer, precise_parameters
from epp.scheduling.plugins.prefix_cache_scorer import PrefixCacheScorer


class PrecisePrefixCacheScorer(PrefixCacheScorer, Closes):
    type_name = "precise-prefix-cache-scorer"

    def __init__(self, name: str = "", **producer: Any) -> None:
        super().__init__(name)
        self.producer = PrecisePrefixCacheProducer(self.name, **producer)
        self._owns_producer = True

    @classmethod
    def from_parameters(cls, name: str, params: Params) -> Plugin:
        return cls(name, **precise_parameters(params))

    def bind(self, lookup: Lookup) -> None:
        existing = lookup.find(PrecisePrefixCacheProducer) if isinstance(lookup, Binder) else None
        if existing is not None:
            self.producer = existing
            self._owns_producer = False
        elif isinstance(self.producer, PrecisePrefixCacheProducer):
            self.producer.bind(lookup)  # its own producer reads the config's token-producer too

    async def aclose(self) -> None:
        if self._owns_producer and isinstance(self.producer, PrecisePrefixCacheProducer):
            await self.producer.aclose()

    def describe(self) -> dict[str, Any]:
        if self._owns_producer:
            return self.producer.describe()
        return {"prefixMatchInfoProducerName": self.producer.name}
