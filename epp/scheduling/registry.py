"""Plugin types by GIE `type` name: the explicit list of built-in plugins.

A new plugin is one file under `plugins/` and one entry in `BUILT_IN` below.
"""

from __future__ import annotations

from typing import Any

from epp.errors import ConfigError
from epp.scheduling.framework import Plugin
from epp.scheduling.params import Params
from epp.scheduling.plugins.active_request_scorer import ActiveRequestScorer
from epp.scheduling.plugins.approx_prefix_cache_producer import ApproxPrefixCacheProducer
from epp.scheduling.plugins.by_label_filter import ByLabelFilter
from epp.scheduling.plugins.concurrency_detector import ConcurrencyDetectorPlugin
from epp.scheduling.plugins.context_length_aware import ContextLengthAware
from epp.scheduling.plugins.decision_tree_filter import DecisionTreeFilter
from epp.scheduling.plugins.destination_endpoint_served_verifier import DestinationEndpointServedVerifier
from epp.scheduling.plugins.header_based_testing_filter import HeaderBasedTestingFilter
from epp.scheduling.plugins.header_label_affinity_scorer import HeaderLabelAffinityScorer
from epp.scheduling.plugins.inflight_load_producer import InFlightLoadProducer
from epp.scheduling.plugins.kv_cache_utilization_scorer import KVCacheUtilizationScorer
from epp.scheduling.plugins.label_selector_filter import LabelSelectorFilter
from epp.scheduling.plugins.least_kv_cache_filter import LeastKvCacheFilter
from epp.scheduling.plugins.least_queue_filter import LeastQueueFilter
from epp.scheduling.plugins.load_aware_scorer import LoadAwareScorer
from epp.scheduling.plugins.lora_affinity_filter import LoraAffinityFilter
from epp.scheduling.plugins.lora_affinity_scorer import LoraAffinityScorer
from epp.scheduling.plugins.low_queue_filter import LowQueueFilter
from epp.scheduling.plugins.max_score_picker import MaxScorePicker
from epp.scheduling.plugins.no_hit_lru_scorer import NoHitLRUScorer
from epp.scheduling.plugins.precise_prefix_cache_producer import PrecisePrefixCacheProducer
from epp.scheduling.plugins.precise_prefix_cache_scorer import PrecisePrefixCacheScorer
from epp.scheduling.plugins.prefill_load_scorer import PrefillLoadScorer
from epp.scheduling.plugins.prefix_cache_affinity_filter import PrefixCacheAffinityFilter
from epp.scheduling.plugins.prefix_cache_scorer import PrefixCacheScorer
from epp.scheduling.plugins.queue_scorer import QueueScorer
from epp.scheduling.plugins.random_picker import RandomPicker
from epp.scheduling.plugins.running_requests_scorer import RunningRequestsScorer
from epp.scheduling.plugins.running_requests_size_scorer import RunningRequestsSizeScorer
from epp.scheduling.plugins.session_affinity_filter import SessionAffinityFilter
from epp.scheduling.plugins.session_affinity_scorer import SessionAffinityScorer
from epp.scheduling.plugins.token_load_scorer import TokenLoadScorer
from epp.scheduling.plugins.token_producer import TokenProducer
from epp.scheduling.plugins.utilization_detector import UtilizationDetectorPlugin
from epp.scheduling.plugins.utilization_filter import UtilizationFilter
from epp.scheduling.plugins.weighted_random_picker import WeightedRandomPicker

BUILT_IN: tuple[type[Plugin], ...] = (
    # scorers
    PrefixCacheScorer,
    PrecisePrefixCacheScorer,
    PrefillLoadScorer,
    QueueScorer,
    KVCacheUtilizationScorer,
    LoraAffinityScorer,
    RunningRequestsScorer,
    RunningRequestsSizeScorer,
    ActiveRequestScorer,
    LoadAwareScorer,
    TokenLoadScorer,
    NoHitLRUScorer,
    SessionAffinityScorer,
    HeaderLabelAffinityScorer,
    # filters (context-length-aware also scores)
    DecisionTreeFilter,
    LowQueueFilter,
    LeastQueueFilter,
    LeastKvCacheFilter,
    LoraAffinityFilter,
    LabelSelectorFilter,
    ByLabelFilter,
    SessionAffinityFilter,
    PrefixCacheAffinityFilter,
    UtilizationFilter,
    ContextLengthAware,
    HeaderBasedTestingFilter,
    # saturation detectors (also filters)
    UtilizationDetectorPlugin,
    ConcurrencyDetectorPlugin,
    # pickers
    MaxScorePicker,
    RandomPicker,
    WeightedRandomPicker,
    # data producers and request-lifecycle plugins
    ApproxPrefixCacheProducer,
    PrecisePrefixCacheProducer,
    TokenProducer,
    InFlightLoadProducer,
    DestinationEndpointServedVerifier,
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


def create(type_name: str, name: str = "", params: dict[str, Any] | Params | None = None) -> Plugin:
    """Build a plugin from its `parameters:` (a mapping, read strictly, or a prepared `Params`)."""
    cls = _TYPES.get(type_name)
    if cls is None:
        known = ", ".join(sorted(_TYPES))
        raise ConfigError(f"unknown plugin type {type_name!r}; known types: {known}")
    if not isinstance(params, Params):
        params = Params(type_name, params)
    return cls.from_parameters(name or cls.type_name, params)
