"""Load an EndpointPickerConfig (GIE's YAML format) into a ready Scheduler.

An operator's file for the Go EPP loads unchanged: same apiVersion/kind, `plugins:`
with `type`/`name`/`parameters`, `schedulingProfiles:` with `pluginRef`/`weight`,
`saturationDetector:` and `featureGates:`. Plugin types that configure parts the
Go EPP makes pluggable but epp builds in (its metrics data source, the OpenAI
parser, ...) are accepted and need nothing. Anything wrong is a `ConfigError` that
names the line, raised before the server starts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from epp.durations import parse_duration
from epp.errors import ConfigError
from epp.scheduling import registry
from epp.scheduling.framework import Filter, Picker, Plugin, Scorer, Seeded, WeightedScorer
from epp.scheduling.scheduler import Scheduler, SchedulingProfile
from epp.yaml_lines import YamlError, load_documents
from epp.yaml_lines import where as _where

log = logging.getLogger(__name__)

API_VERSIONS = ("inference.networking.x-k8s.io/v1alpha1",)
KIND = "EndpointPickerConfig"

# epp's default profile: prefix affinity, and epp's estimate of the prefill work ahead of the first
# token (this request's uncached tokens plus those of epp's requests not yet streaming), which stops
# a prefix holder busy prefilling a long prompt from collecting every request behind it; LoRA
# affinity; and epp's exact in-flight count, which keeps picks apart between two scrapes.
# GIE's default also weighs the scraped waiting queue (2) and KV-cache usage (2). Min-max normalised,
# one more waiting request moves a pick two thirds as far as a whole prefix match. Under high load
# they pushed requests off the servers holding their prefixes, the misses evicted other prefixes,
# and the pool fell into cache thrash (docs/design.md). Both remain for configs that want them.
DEFAULT_CONFIG = """\
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: prefix-cache-scorer
- type: lora-affinity-scorer
- type: running-requests-scorer
- type: prefill-load-scorer
- type: max-score-picker
- type: single-profile-handler
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: prefix-cache-scorer
    weight: 3
  - pluginRef: lora-affinity-scorer
    weight: 1
  - pluginRef: running-requests-scorer
    weight: 0.5
  - pluginRef: prefill-load-scorer
    weight: 3
  - pluginRef: max-score-picker
"""

# Types the Go EPP configures as plugins and epp builds in; they load and need nothing.
BUILT_IN_TYPES = {
    "metrics-data-source": "epp scrapes model-server metrics itself (--refresh-metrics-interval)",
    "core-metrics-extractor": "epp maps vLLM/SGLang/TRT-LLM metric names itself",
    "openai-parser": "epp parses OpenAI requests itself",
    "passthrough-parser": "epp passes non-inference requests through",
    "k8s-notification-source": "epp watches its pool itself",
    "endpoint-notification-source": "epp watches its pool itself",
    "inflight-load-producer": "epp counts in-flight requests itself",
    "approx-prefix-cache-producer": "the prefix-cache-scorer keeps its own index",
    "destination-endpoint-served-verifier": "not needed by epp",
    "request-attribute-reporter": "not needed by epp",
    "fcfs-ordering-policy": "flow control queues are FCFS within a priority",
    "global-strict-fairness-policy": "flow control serves priorities strictly",
    "round-robin-fairness-policy": "flow control serves priorities strictly",
}
SINGLE_PROFILE_HANDLER = "single-profile-handler"
SATURATION_TYPES = ("utilization-detector",)
KNOWN_TOP_LEVEL = {
    "apiVersion", "kind", "featureGates", "plugins", "schedulingProfiles", "saturationDetector",
    "dataLayer", "data", "flowControl", "parser", "metadata", "requestHandling",
}


@dataclass(slots=True)
class SaturationConfig:
    """When a pod counts as having capacity (GIE's utilization detector, same defaults)."""

    queue_depth_threshold: int = 5
    kv_cache_util_threshold: float = 0.8
    metrics_staleness_threshold: float = 0.2


@dataclass(slots=True)
class PickerConfig:
    scheduler: Scheduler
    saturation: SaturationConfig = field(default_factory=SaturationConfig)


def load_text(text: str, source: str = "<config>", *, seed: int | None = None) -> PickerConfig:
    try:
        docs = load_documents(text, source)
    except YamlError as e:
        raise ConfigError(str(e)) from None
    if not docs:
        raise ConfigError(f"{source}: the configuration is empty")
    if len(docs) > 1:
        raise ConfigError(f"{_where(docs[1], source)}: expected one EndpointPickerConfig document, got {len(docs)}")
    doc = docs[0]
    if not isinstance(doc, dict):
        raise ConfigError(f"{_where(doc, source)}: the configuration must be a mapping")
    return _build(doc, source, seed)


def load_file(path: str, *, seed: int | None = None) -> PickerConfig:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    return load_text(text, path, seed=seed)


def default_config(*, seed: int | None = None) -> PickerConfig:
    return load_text(DEFAULT_CONFIG, "<default config>", seed=seed)


def _build(doc: dict[str, Any], source: str, seed: int | None) -> PickerConfig:
    def fail(obj: Any, msg: str) -> ConfigError:
        return ConfigError(f"{_where(obj, source)}: {msg}")

    api = doc.get("apiVersion")
    if api is not None and api not in API_VERSIONS:
        raise fail(doc, f"unsupported apiVersion {api!r}; expected {API_VERSIONS[0]}")
    kind = doc.get("kind")
    if kind is not None and kind != KIND:
        raise fail(doc, f"kind must be {KIND}, got {kind!r}")
    for key in doc:
        if key not in KNOWN_TOP_LEVEL:
            raise fail(doc, f"unknown field {key!r}; known fields: {', '.join(sorted(KNOWN_TOP_LEVEL))}")

    gates = doc.get("featureGates") or []
    if not isinstance(gates, list) or not all(isinstance(g, str) for g in gates):
        raise fail(gates, "featureGates must be a list of names")

    saturation = _saturation(doc.get("saturationDetector"), fail)

    specs = doc.get("plugins")
    if not isinstance(specs, list) or not specs:
        raise fail(doc, "'plugins' must be a non-empty list")
    plugins: dict[str, Plugin] = {}
    for spec in specs:
        if not isinstance(spec, dict):
            raise fail(spec, "each plugin must be a mapping with 'type'")
        unknown = set(spec) - {"type", "name", "parameters"}
        if unknown:
            raise fail(spec, f"unknown plugin field(s) {sorted(unknown)}")
        ptype = spec.get("type")
        if not isinstance(ptype, str) or not ptype:
            raise fail(spec, "plugin 'type' is required")
        name = spec.get("name") or ptype
        if not isinstance(name, str):
            raise fail(spec, "plugin 'name' must be a string")
        if name in plugins:
            raise fail(spec, f"duplicate plugin name {name!r}")
        params = spec.get("parameters") or {}
        if not isinstance(params, dict):
            raise fail(spec, "plugin 'parameters' must be a mapping")
        if ptype in BUILT_IN_TYPES or ptype == SINGLE_PROFILE_HANDLER:
            log.debug("plugin %s (%s): %s", name, ptype, BUILT_IN_TYPES.get(ptype, "built in"))
            continue
        if ptype in SATURATION_TYPES:
            saturation = _saturation(params, fail)
            continue
        try:
            plugin = registry.create(ptype, name, params)
        except (ConfigError, ValueError) as e:
            raise fail(spec, str(e)) from None
        if seed is not None and isinstance(plugin, Seeded):
            plugin.reseed(seed)
        plugins[name] = plugin

    for spec in specs:
        bound = plugins.get(spec.get("name") or spec.get("type"))
        if bound is not None:
            try:
                bound.bind(plugins.get)
            except ConfigError as e:
                raise fail(spec, str(e)) from None

    profiles_spec = doc.get("schedulingProfiles")
    if not isinstance(profiles_spec, list) or not profiles_spec:
        raise fail(doc, "'schedulingProfiles' must be a non-empty list")
    if len(profiles_spec) > 1:
        raise fail(profiles_spec, "epp runs one scheduling profile (single-profile-handler); got several")
    profiles = []
    for pspec in profiles_spec:
        profiles.append(_profile(pspec, plugins, fail))
    return PickerConfig(Scheduler(profiles, list(plugins.values())), saturation)


def _profile(pspec: Any, plugins: dict[str, Plugin], fail: Any) -> SchedulingProfile:
    if not isinstance(pspec, dict):
        raise fail(pspec, "each scheduling profile must be a mapping")
    name = pspec.get("name")
    if not isinstance(name, str) or not name:
        raise fail(pspec, "scheduling profile 'name' is required")
    refs = pspec.get("plugins")
    if not isinstance(refs, list) or not refs:
        raise fail(pspec, f"profile {name!r}: 'plugins' must be a non-empty list")
    profile = SchedulingProfile(name)
    for ref in refs:
        if not isinstance(ref, dict) or not isinstance(ref.get("pluginRef"), str):
            raise fail(ref, f"profile {name!r}: each entry needs a 'pluginRef'")
        unknown = set(ref) - {"pluginRef", "weight"}
        if unknown:
            raise fail(ref, f"profile {name!r}: unknown field(s) {sorted(unknown)}")
        pname = ref["pluginRef"]
        plugin = plugins.get(pname)
        if plugin is None:
            if pname in BUILT_IN_TYPES or pname == SINGLE_PROFILE_HANDLER:
                continue
            raise fail(ref, f"profile {name!r}: pluginRef {pname!r} names no plugin defined under 'plugins'")
        weight = ref.get("weight", 1)
        if isinstance(weight, bool) or not isinstance(weight, int | float) or weight < 0:
            raise fail(ref, f"profile {name!r}: weight of {pname!r} must be a non-negative number")
        if isinstance(plugin, Scorer):
            profile.scorers.append(WeightedScorer(plugin, float(weight)))
        elif isinstance(plugin, Filter):
            profile.filters.append(plugin)
        elif isinstance(plugin, Picker):
            if profile.picker is not None:
                raise fail(ref, f"profile {name!r}: more than one picker")
            profile.picker = plugin
        else:
            raise fail(ref, f"profile {name!r}: {pname!r} is not a filter, scorer or picker")
    if profile.picker is None:
        # GIE adds a max-score picker to a profile that names none.
        profile.picker = registry.create("max-score-picker")  # type: ignore[assignment]
    return profile


def _saturation(spec: Any, fail: Any) -> SaturationConfig:
    cfg = SaturationConfig()
    if spec is None:
        return cfg
    if not isinstance(spec, dict):
        raise fail(spec, "saturationDetector must be a mapping")
    for key, value in spec.items():
        if key == "queueDepthThreshold":
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise fail(spec, "queueDepthThreshold must be a positive integer")
            cfg.queue_depth_threshold = value
        elif key == "kvCacheUtilThreshold":
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
                raise fail(spec, "kvCacheUtilThreshold must be in (0, 1]")
            cfg.kv_cache_util_threshold = float(value)
        elif key == "metricsStalenessThreshold":
            try:
                cfg.metrics_staleness_threshold = parse_duration(value)
            except ValueError as e:
                raise fail(spec, f"metricsStalenessThreshold: {e}") from None
            if cfg.metrics_staleness_threshold <= 0:
                raise fail(spec, "metricsStalenessThreshold must be positive")
        elif key == "headroom":
            continue
        else:
            raise fail(spec, f"unknown saturationDetector field {key!r}")
    return cfg
