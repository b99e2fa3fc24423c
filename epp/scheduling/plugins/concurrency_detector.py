"""concurrency-detector (GIE v1.5, llm-d-router): a saturation detector from epp's own requests (or
prompt tokens) in flight, which it knows exactly and with no scrape delay (see epp.admission).
Named by `saturationDetector.pluginRef`; listed in a profile it also filters, dropping servers at
or past the limit x (1 + `headroom`).

Parameters (defaults): `concurrencyMode` (requests; tokens; hybrid), `maxConcurrency` (100 per
server), `maxTokenConcurrency` (1000000 per server), `headroom` (0), `inFlightLoadProducerName`.
"""

from __future__ import annotations

from typing import Any

from epp.admission import HYBRID, REQUESTS, TOKENS, ConcurrencyConfig, ConcurrencyDetector
from epp.datastore import Endpoint
from epp.errors import ConfigError
from epp.requests import InferenceRequest
from epp.scheduling.framework import CycleState, Filter, Lookup, Plugin, producer
from epp.scheduling.params import Params
from epp.scheduling.plugins.inflight_load_producer import InFlightLoadProducer


class ConcurrencyDetectorPlugin(Filter):
    type_name = "concurrency-detector"

    def __init__(self, name: str = "", *, config: ConcurrencyConfig | None = None, producer_name: str = "") -> None:
        super().__init__(name)
        self.detector = ConcurrencyDetector(config)
        self._producer_name = producer_name

    @classmethod
    def from_parameters(cls, name: str, params: Params) -> Plugin:
        where = f"plugin {params.plugin_type!r}"
        requests = params.int("maxConcurrency", 100)
        room = params.float("headroom", 0.0)
        mode = params.str("concurrencyMode", REQUESTS)
        tokens = params.int("maxTokenConcurrency", 1_000_000)
        producer_name = params.str("inFlightLoadProducerName", "", empty=True)
        params.done()
        problems = []
        if requests <= 0:
            problems.append(f"maxConcurrency must be strictly positive, got {requests}")
        if room < 0:
            problems.append(f"headroom must be a non-negative value, got {room}")
        if tokens <= 0:
            problems.append(f"maxTokenConcurrency must be strictly positive, got {tokens}")
        if mode not in (REQUESTS, TOKENS, HYBRID):
            problems.append(f"unsupported concurrencyMode: {mode!r}")
        if problems:
            raise ConfigError(f"{where}: " + "; ".join(problems))
        return cls(name, config=ConcurrencyConfig(requests, room, mode, tokens), producer_name=producer_name)

    def bind(self, lookup: Lookup) -> None:
        if self.detector.config.mode != REQUESTS or self._producer_name:
            load = producer(lookup, InFlightLoadProducer, self._producer_name, param="inFlightLoadProducerName")
            self.detector.tokens = load.tokens

    def describe(self) -> dict[str, Any]:
        return self.detector.describe()

    def filter(self, state: CycleState, request: InferenceRequest, endpoints: list[Endpoint]) -> list[Endpoint]:
        return self.detector.admit(endpoints, state.now)
