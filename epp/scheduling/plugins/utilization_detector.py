"""utilization-detector (GIE v1.5, llm-d-router): the default saturation detector, from the servers'
scraped queue and KV-cache use (see epp.admission). Named by `saturationDetector.pluginRef`; listed
in a profile it also filters, dropping servers at or past threshold x (1 + `headroom`) or with
stale metrics (all are kept when none passes).

Parameters (defaults): `queueDepthThreshold` (5), `kvCacheUtilThreshold` (0.8, in (0, 1]),
`metricsStalenessThreshold` (200ms), `headroom` (0).
"""

from __future__ import annotations

from typing import Any

from epp.admission import SaturationConfig, UtilizationDetector
from epp.datastore import Endpoint
from epp.errors import ConfigError
from epp.requests import InferenceRequest
from epp.scheduling.framework import CycleState, Filter, Plugin
from epp.scheduling.params import Params


def utilization_config(params: Params, *, headroom: bool = True) -> SaturationConfig:
    where = f"plugin {params.plugin_type!r}"
    queue = params.int("queueDepthThreshold", 5)
    kv = params.float("kvCacheUtilThreshold", 0.8)
    stale = params.duration("metricsStalenessThreshold", 0.2)
    room = params.float("headroom", 0.0) if headroom else 0.0
    params.done()
    problems = []
    if queue <= 0:
        problems.append(f"queueDepthThreshold must be strictly positive, got {queue}")
    if not 0.0 < kv <= 1.0:
        problems.append(f"kvCacheUtilThreshold must be in (0.0, 1.0], got {kv}")
    if stale <= 0:
        problems.append("metricsStalenessThreshold must be strictly positive")
    if room < 0:
        problems.append(f"headroom must be a non-negative value, got {room}")
    if problems:
        raise ConfigError(f"{where}: " + "; ".join(problems))
    return SaturationConfig(queue, kv, stale, room)


class UtilizationDetectorPlugin(Filter):
    type_name = "utilization-detector"

    def __init__(self, name: str = "", *, config: SaturationConfig | None = None) -> None:
        super().__init__(name)
        self.detector = UtilizationDetector(config)

    @classmethod
    def from_parameters(cls, name: str, params: Params) -> Plugin:
        return cls(name, config=utilization_config(params))

    def describe(self) -> dict[str, Any]:
        return self.detector.describe()

    def filter(self, state: CycleState, request: InferenceRequest, endpoints: list[Endpoint]) -> list[Endpoint]:
        return self.detector.admit(endpoints, state.now)
