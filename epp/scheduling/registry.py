"""Plugin types by GIE `type` name: the explicit list of built-in plugins.

A new plugin is one file under `plugins/` and one entry in `BUILT_IN` below.
"""

from __future__ import annotations

from typing import Any

from epp.errors import ConfigError
from epp.scheduling.framework import Plugin
from epp.scheduling.plugins.decision_tree_filter import DecisionTreeFilter
from epp.scheduling.plugins.kv_cache_utilization_scorer import KVCacheUtilizationScorer
from epp.scheduling.plugins.least_kv_cache_filter import LeastKvCacheFilter
from epp.scheduling.plugins.least_queue_filter import LeastQueueFilter
from epp.scheduling.plugins.lora_affinity_filter import LoraAffinityFilter
from epp.scheduling.plugins.lora_affinity_scorer import LoraAffinityScorer
from epp.scheduling.plugins.low_queue_filter import LowQueueFilter
from epp.scheduling.plugins.max_score_picker import MaxScorePicker
from epp.scheduling.plugins.prefill_load_scorer import PrefillLoadScorer
from epp.scheduling.plugins.prefix_cache_scorer import PrefixCacheScorer
from epp.scheduling.plugins.queue_scorer import QueueScorer
from epp.scheduling.plugins.random_picker import RandomPicker
from epp.scheduling.plugins.running_requests_scorer import RunningRequestsScorer
from epp.scheduling.plugins.weighted_random_picker import WeightedRandomPicker

BUILT_IN: tuple[type[Plugin], ...] = (
    # scorers
    PrefixCacheScorer,
    PrefillLoadScorer,
    QueueScorer,
    KVCacheUtilizationScorer,
    LoraAffinityScorer,
    RunningRequestsScorer,
    # filters
    DecisionTreeFilter,
    LowQueueFilter,
    LeastQueueFilter,
    LeastKvCacheFilter,
    LoraAffinityFilter,
    # pickers
    MaxScorePicker,
    RandomPicker,
    WeightedRandomPicker,
)


def _index(classes: tuple[type[Plugin], ...]) -> dict[str, type[Plugin]]:
    """Type name (and each older alias) -> class; a name given twice is a bug caught at import."""
    out: dict[str, type[Plugin]] = {}
    for cls in classes:
        for name in (cls.type_name, *cls.aliases):
            if not name or name in out:
                raise RuntimeError(f"plugin type {name!r} of {cls.__name__} is empty or registered twice")
            out[name] = cls
    return out


_TYPES = _index(BUILT_IN)


def plugin_types() -> dict[str, type[Plugin]]:
    """Every plugin type name epp knows, with its class."""
    return dict(_TYPES)


def create(type_name: str, name: str = "", params: dict[str, Any] | None = None) -> Plugin:
    cls = _TYPES.get(type_name)
    if cls is None:
        known = ", ".join(sorted(_TYPES))
        raise ConfigError(f"unknown plugin type {type_name!r}; known types: {known}")
    return cls.from_parameters(name or cls.type_name, dict(params or {}))
