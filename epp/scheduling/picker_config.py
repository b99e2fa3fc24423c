"""Load an EndpointPickerConfig, GIE v1.5's or llm-d-router v0.10's, into a ready Scheduler.

An operator's file for either Go EPP loads unchanged: `apiVersion:
inference.networking.x-k8s.io/v1alpha1` or `llm-d.ai/v1alpha1`, `plugins:` with
`type`/`name`/`parameters`, `schedulingProfiles:` with `pluginRef`/`weight`,
`saturationDetector:` (v1.5's `pluginRef`, or the older inline thresholds), `parser:` or
`requestHandler.parsers`, `dataLayer:`, `featureGates:`. What is left out is defaulted as
upstream does: no profile gives one with every filter, scorer and picker defined (weight 1), a
profile without a picker gets the config's picker or `max-score-picker`, one profile runs under
`single-profile-handler`, the saturation detector is `utilization-detector`, the parsers are
openai, anthropic, vllmhttp and passthrough, the data layer scrapes every server's metrics, and
the producers a plugin reads from are created. With no config at all epp runs its own default
profile (docs/design.md).

Anything epp would not honour is a `ConfigError` that names the line, raised before the server
starts: unknown fields and types, bad parameters, and the upstream types epp does not run
(epp.scheduling.refused). Where upstream itself ignores something, it loads with a warning in
`PickerConfig.warnings`, logged once at start-up.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

from epp.admission import Detector, SaturationConfig, UtilizationDetector
from epp.errors import ConfigError
from epp.flowcontrol.config import (
    POLICY_TYPES,
    REFUSED_POLICY_TYPES,
    SECTION_FIELDS,
    FlowControlConfig,
    PolicyPlugin,
    parse_flow_control,
    policy_plugin,
)
from epp.requests import PARSER_TYPES, Parser, ParserSet, PassthroughParser
from epp.scheduling import refused, registry
from epp.scheduling.datalayer_config import (
    CORE_METRICS_EXTRACTOR,
    ENDPOINT_NOTIFICATION_SOURCE,
    METRICS_DATA_SOURCE,
    DataLayerConfig,
    MetricsExtractor,
    MetricsSource,
    metrics_extractor,
    metrics_source,
)
from epp.scheduling.framework import (
    Binder,
    Filter,
    Picker,
    Plugin,
    ResponseHeaders,
    Scorer,
    Seeded,
    WeightedScorer,
)
from epp.scheduling.params import Params
from epp.scheduling.plugins.approx_prefix_cache_producer import ApproxPrefixCacheProducer
from epp.scheduling.plugins.concurrency_detector import ConcurrencyDetectorPlugin
from epp.scheduling.plugins.inflight_load_producer import InFlightLoadProducer
from epp.scheduling.plugins.utilization_detector import UtilizationDetectorPlugin, utilization_config
from epp.scheduling.scheduler import Scheduler, SchedulingProfile
from epp.yaml_lines import YamlError, load_documents
from epp.yaml_lines import where as _where

log = logging.getLogger(__name__)

GIE_API = "inference.networking.x-k8s.io/v1alpha1"
LLMD_API = "llm-d.ai/v1alpha1"
API_VERSIONS = (LLMD_API, GIE_API)
KIND = "EndpointPickerConfig"

# epp's default profile: prefix affinity, and epp's estimate of the prefill work ahead of the first
# token (this request's uncached tokens plus those of epp's requests not yet streaming), which stops
# a prefix holder busy prefilling a long prompt from collecting every request behind it; LoRA
# affinity; and epp's exact in-flight count, which keeps picks apart between two scrapes.
# GIE's default also weighs the scraped waiting queue (2) and KV-cache usage (2). Min-max normalised,
# one more waiting request moves a pick two thirds as far as a whole prefix match. Under high load
# they pushed requests off the servers holding their prefixes, the misses evicted other prefixes,
# and the pool fell into cache thrash (docs/design.md). Both remain for configs that want them.
# prefill-load-scorer's scrapedLoad weighs the servers' own queues in tokens instead (requests beyond
# epp's own in flight, KV pressure, unknown metrics as busy), for pools with traffic epp does not route;
# serverSpeed counts that work at each server's own speed, timed from epp's streamed responses, for
# pools whose servers differ in speed (a node rollout, mixed accelerators) (docs/design.md).
DEFAULT_CONFIG = """\
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: prefix-cache-scorer
- type: lora-affinity-scorer
- type: running-requests-scorer
- type: prefill-load-scorer
  parameters:
    scrapedLoad: true
    serverSpeed: true
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

TOP_LEVEL = ("apiVersion", "kind", "featureGates", "plugins", "schedulingProfiles", "saturationDetector",
             "dataLayer", "flowControl", "parser", "requestHandler")
# Gates both releases register, with their defaults.
FEATURE_GATES = {"flowControl": False, "haPopulateNonLeaderDatastore": True, "dataLayer": False,
                 "enableLegacyMetrics": False}
SINGLE_PROFILE_HANDLER = "single-profile-handler"
# The utilization detector's thresholds as GIE up to v1.4 gave them, inline under saturationDetector.
INLINE_SATURATION = ("queueDepthThreshold", "kvCacheUtilThreshold", "metricsStalenessThreshold")
DEFAULT_PARSERS = ("openai-parser", "anthropic-parser", "vllmhttp-parser", "passthrough-parser")

# Kept for importers of the older location.
__all__ = ["DEFAULT_CONFIG", "DataLayerConfig", "PickerConfig", "SaturationConfig", "default_config",
           "describe", "load_file", "load_text"]


@dataclass(slots=True)
class PickerConfig:
    """Everything an EndpointPickerConfig configures, defaults filled in."""

    scheduler: Scheduler
    saturation: Detector = field(default_factory=UtilizationDetector)
    parsers: ParserSet = field(default_factory=lambda: ParserSet([p() for p in _default_parser_types()]))
    data_layer: DataLayerConfig = field(default_factory=DataLayerConfig)
    feature_gates: dict[str, bool] = field(default_factory=lambda: dict(FEATURE_GATES))
    warnings: list[str] = field(default_factory=list)
    source: str = "<config>"
    api_version: str = GIE_API
    saturation_name: str = "utilization-detector"
    # Set when the flowControl gate is on (and the caller runs flow control), from the flowControl section.
    flow_control: FlowControlConfig | None = None


def _default_parser_types() -> list[type[Parser]]:
    return [PARSER_TYPES[t] for t in DEFAULT_PARSERS]


def load_text(text: str, source: str = "<config>", *, seed: int | None = None,
              runs_flow_control: bool = False) -> PickerConfig:
    """Load a config. `runs_flow_control`: the caller runs epp.flowcontrol's controller with
    `PickerConfig.flow_control`; without it the flowControl gate is refused."""
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
    config = _Loader(doc, source, seed, runs_flow_control).build()
    for warning in config.warnings:
        log.warning("%s: %s", source, warning)
    return config


def load_file(path: str, *, seed: int | None = None, runs_flow_control: bool = False) -> PickerConfig:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    return load_text(text, path, seed=seed, runs_flow_control=runs_flow_control)


def default_config(*, seed: int | None = None) -> PickerConfig:
    return load_text(DEFAULT_CONFIG, "<default config>", seed=seed)


@dataclass(slots=True)
class _Instance:
    """One entry of `plugins:` (or one the loader added), built."""

    name: str
    type_name: str
    spec: Any  # the YAML mapping, for line numbers
    plugin: Plugin | None = None  # a scheduling plugin, producer or detector
    parser: Parser | None = None
    source: MetricsSource | None = None
    extractor: MetricsExtractor | None = None
    policy: PolicyPlugin | None = None  # a flow-control policy
    component: str = ""  # what else it is: "profile-handler", "notification-source", "token-producer", ...
    used: bool = False


class _Loader:
    def __init__(self, doc: dict[str, Any], source: str, seed: int | None, runs_flow_control: bool = False) -> None:
        self.doc = doc
        self.source = source
        self.seed = seed
        self.runs_flow_control = runs_flow_control
        self.flow_on = False
        self.warnings: list[str] = []
        self.instances: dict[str, _Instance] = {}
        self.plugins: dict[str, Plugin] = {}  # scheduling plugins, producers, detectors by name
        self.order: list[Plugin] = []  # the same, in the order their hooks run
        self.strict = True
        self.api = GIE_API
        self.looked_up: set[str] = set()  # names other plugins resolved while binding

    def fail(self, obj: Any, msg: str) -> ConfigError:
        return ConfigError(f"{_where(obj, self.source)}: {msg}")

    # --- the whole file -----------------------------------------------------------
    def build(self) -> PickerConfig:
        doc = self.doc
        api = doc.get("apiVersion")
        if api is not None and api not in API_VERSIONS:
            raise self.fail(doc, f"unsupported apiVersion {api!r}; expected {LLMD_API} or {GIE_API}")
        # GIE decodes plugin parameters leniently (unknown keys dropped); llm-d-router strictly.
        self.strict = api != GIE_API
        self.api = api or GIE_API
        kind = doc.get("kind")
        if kind is not None and kind != KIND:
            raise self.fail(doc, f"kind must be {KIND}, got {kind!r}")
        for key in doc:
            if key not in TOP_LEVEL:
                raise self.fail(doc, f"unknown field {key!r}; known fields: {', '.join(sorted(TOP_LEVEL))}")

        gates = self.feature_gates(doc.get("featureGates"))
        flow = doc.get("flowControl")
        if flow is not None and not isinstance(flow, dict):
            raise self.fail(doc, "flowControl must be a mapping")

        specs = doc.get("plugins")
        if specs is None:
            specs = []
        if not isinstance(specs, list):
            raise self.fail(doc, "'plugins' must be a list")
        for spec in specs:
            self.instantiate(spec)
        self.bind()

        flow_control = self.flow_control(flow)
        profiles = self.profiles(doc.get("schedulingProfiles"))
        detector, detector_name = self.saturation(doc.get("saturationDetector"), flow)
        parsers = self.parsers(doc)
        data_layer = self.data_layer(doc.get("dataLayer"), gates)
        self.report_unused()
        scheduler = Scheduler(profiles, self.hook_order())
        return PickerConfig(scheduler, detector, parsers, data_layer, gates, self.warnings, self.source,
                            self.api, detector_name, flow_control)

    def feature_gates(self, gates: Any) -> dict[str, bool]:
        out = dict(FEATURE_GATES)
        if gates is None:
            return out
        if not isinstance(gates, list) or not all(isinstance(g, str) for g in gates):
            raise self.fail(gates if gates else self.doc, "featureGates must be a list of names")
        for gate in gates:
            name, sep, value = gate.partition("=")
            name = name.strip()
            if name not in FEATURE_GATES:
                raise self.fail(gates, f"feature gate {name!r} is unknown; known gates: {', '.join(FEATURE_GATES)}")
            enabled = True
            if sep:
                text = value.strip().lower()
                if text not in ("true", "false", "1", "0", "t", "f"):
                    raise self.fail(gates, f"{value!r} is not a valid value for the feature gate {name}")
                enabled = text in ("true", "1", "t")
            out[name] = enabled
        if out["flowControl"] and not self.runs_flow_control:
            raise self.fail(gates, f"feature gate 'flowControl' is not supported by epp: {refused.FLOW_CONTROL_LATER}")
        self.flow_on = out["flowControl"]
        if not out["haPopulateNonLeaderDatastore"]:
            self.warnings.append("feature gate haPopulateNonLeaderDatastore=false has no effect: epp's replicas "
                                 "all keep the pool's state")
        return out

    def flow_control(self, flow: dict[str, Any] | None) -> FlowControlConfig | None:
        """The flowControl section (epp.flowcontrol reads it) with the gate on. With it off the section's
        settings are ignored, as upstream ignores them, with a warning; its saturationDetector is read."""
        policies = {i.name: i.policy for i in self.instances.values() if i.policy is not None}
        if self.flow_on:
            for inst in self.instances.values():
                if inst.component == "flow-control-policy":
                    inst.used = True
            return parse_flow_control(flow, self.fail, policies)
        if flow is not None:
            unknown = sorted(set(flow) - set(SECTION_FIELDS))
            if unknown:
                raise self.fail(flow, f"flowControl: unknown field(s) {unknown}; known: {', '.join(SECTION_FIELDS)}")
            if set(flow) - {"saturationDetector"}:
                self.warnings.append("the flowControl section is set but the flowControl feature gate is off; its "
                                     "settings (other than saturationDetector) are ignored")
        for inst in self.instances.values():
            if inst.component == "flow-control-policy":
                inst.used = True
                self.warnings.append(f"plugin {inst.name!r} ({inst.type_name}) has no effect: flow control is off")
        return None

    # --- plugins ------------------------------------------------------------------
    def instantiate(self, spec: Any) -> None:
        if not isinstance(spec, dict):
            raise self.fail(spec if isinstance(spec, list) else self.doc.get("plugins"),
                            "each plugin must be a mapping with 'type'")
        unknown = set(spec) - {"type", "name", "parameters"}
        if unknown:
            raise self.fail(spec, f"unknown plugin field(s) {sorted(unknown)}")
        ptype = spec.get("type")
        if not isinstance(ptype, str) or not ptype:
            raise self.fail(spec, f"plugin {spec.get('name', '')!r} is missing a type")
        name = spec.get("name") or ptype
        if not isinstance(name, str):
            raise self.fail(spec, "plugin 'name' must be a string")
        if name in self.instances:
            raise self.fail(spec, f"duplicate plugin name {name!r}")
        raw = spec.get("parameters")
        if raw is not None and not isinstance(raw, dict):
            raise self.fail(spec, "plugin 'parameters' must be a mapping")
        params = Params(ptype, raw or {}, strict=self.strict, warnings=self.warnings)
        try:
            self.instances[name] = self.build_one(name, ptype, spec, params)
        except (ConfigError, ValueError) as e:
            raise self.fail(spec, str(e)) from None

    def build_one(self, name: str, ptype: str, spec: Any, params: Params) -> _Instance:
        inst = _Instance(name, ptype, spec)
        why = refused.refusal(ptype)
        if why is not None:
            raise ConfigError(why)
        if ptype in refused.FLOW_CONTROL_POLICIES:
            # epp.flowcontrol reads its policies; ones it does not run are refused there with the gate on.
            inst.component = "flow-control-policy"
            if ptype in POLICY_TYPES or (self.flow_on and ptype in REFUSED_POLICY_TYPES):
                inst.policy = policy_plugin(ptype, name, params.rest(), lambda _where, msg: ConfigError(msg), spec)
            else:
                params.rest()
            return inst
        if ptype in PARSER_TYPES:
            params.done(ignored_upstream=True)
            inst.parser = PARSER_TYPES[ptype](name)
            return inst
        if ptype == METRICS_DATA_SOURCE:
            inst.source = metrics_source(params)
            return inst
        if ptype == CORE_METRICS_EXTRACTOR:
            inst.extractor = metrics_extractor(params)
            return inst
        if ptype == ENDPOINT_NOTIFICATION_SOURCE:
            params.done(ignored_upstream=True)
            inst.component = "notification-source"
            inst.used = True  # epp tells plugins about endpoints joining and leaving itself
            return inst
        if ptype == SINGLE_PROFILE_HANDLER:
            params.done(ignored_upstream=True)
            inst.component = "profile-handler"
            inst.used = True
            return inst
        plugin = registry.create(ptype, name, params)
        inst.plugin = plugin
        self.add(plugin)
        return inst

    def add(self, plugin: Plugin) -> None:
        self.plugins[plugin.name] = plugin
        self.order.append(plugin)
        if self.seed is not None and isinstance(plugin, Seeded):
            plugin.reseed(self.seed)

    def bind(self) -> None:
        adopted: list[Plugin] = []

        def adopt(plugin: Plugin) -> None:
            self.instances[plugin.name] = _Instance(plugin.name, plugin.type_name, None, plugin, used=True)
            self.add(plugin)
            adopted.append(plugin)

        binder = Binder(self.plugins, adopt)
        self.looked_up = binder.looked_up
        producers = (ApproxPrefixCacheProducer, InFlightLoadProducer)
        first = [i for i in self.instances.values() if i.plugin is not None and not isinstance(i.plugin, producers)]
        last = [i for i in self.instances.values() if isinstance(i.plugin, producers)]
        for inst in (*first, *last):
            assert inst.plugin is not None
            try:
                inst.plugin.bind(binder)
            except ConfigError as e:
                raise self.fail(inst.spec, str(e)) from None
        while adopted:
            plugin = adopted.pop(0)
            try:
                plugin.bind(binder)
            except ConfigError as e:
                raise self.fail(self.doc, f"{plugin.name}: {e}") from None

    def hook_order(self) -> list[Plugin]:
        return sorted(self.order, key=lambda p: p.hook_order)  # stable: config order within a rank

    # --- scheduling profiles ------------------------------------------------------------
    def profiles(self, specs: Any) -> list[SchedulingProfile]:
        handlers = [i for i in self.instances.values() if i.component == "profile-handler"]
        if len(handlers) > 1:
            raise self.fail(handlers[1].spec, f"several profile handlers ({handlers[0].name!r}, "
                                              f"{handlers[1].name!r}); only one is allowed")
        if specs is None or specs == []:
            return [self.default_profile(specs)]
        if not isinstance(specs, list):
            raise self.fail(self.doc, "'schedulingProfiles' must be a list")
        if len(specs) > 1:
            raise self.fail(specs, "single-profile-handler cannot run several scheduling profiles (the handlers "
                                   f"that can are not supported by epp: {refused.PD_LATER})")
        profiles: list[SchedulingProfile] = []
        for pspec in specs:
            profiles.append(self.profile(pspec))
        return profiles

    def default_profile(self, where: Any) -> SchedulingProfile:
        """Upstream's: every filter, scorer and picker the config defines, scorers weighing 1."""
        profile = SchedulingProfile("default")
        for inst in self.instances.values():
            plugin = inst.plugin
            if inst.spec is None or plugin is None:
                continue
            if isinstance(plugin, Scorer | Filter | Picker):
                self.place(profile, plugin, 1.0, inst.spec)
                inst.used = True
        self.finish_profile(profile)
        return profile

    def profile(self, pspec: Any) -> SchedulingProfile:
        if not isinstance(pspec, dict):
            raise self.fail(pspec, "each scheduling profile must be a mapping")
        unknown = set(pspec) - {"name", "plugins"}
        if unknown:
            raise self.fail(pspec, f"unknown scheduling profile field(s) {sorted(unknown)}")
        name = pspec.get("name")
        if not isinstance(name, str) or not name:
            raise self.fail(pspec, "scheduling profile 'name' is required")
        refs = pspec.get("plugins") or []
        if not isinstance(refs, list):
            raise self.fail(pspec, f"profile {name!r}: 'plugins' must be a list")
        profile = SchedulingProfile(name)
        for ref in refs:
            if not isinstance(ref, dict) or not isinstance(ref.get("pluginRef"), str) or not ref["pluginRef"]:
                raise self.fail(ref if isinstance(ref, dict) else refs, f"profile {name!r}: each entry needs a "
                                                                        "'pluginRef'")
            unknown = set(ref) - {"pluginRef", "weight"}
            if unknown:
                raise self.fail(ref, f"profile {name!r}: unknown field(s) {sorted(unknown)}")
            pname = ref["pluginRef"]
            inst = self.instances.get(pname)
            if inst is None or inst.spec is None:
                raise self.fail(ref, f"profile {name!r}: pluginRef {pname!r} names no plugin defined under 'plugins'")
            weight = ref.get("weight", 1)
            if weight is None:
                weight = 1
            if isinstance(weight, bool) or not isinstance(weight, int | float) or weight != weight:
                raise self.fail(ref, f"profile {name!r}: weight of {pname!r} must be a number")
            inst.used = True
            plugin = inst.plugin
            if not isinstance(plugin, Scorer | Filter | Picker):
                self.warnings.append(f"profile {name!r}: {pname!r} ({inst.type_name}) is not a filter, scorer or "
                                     "picker; ignored there, as upstream does")
                continue
            if isinstance(plugin, Picker) and profile.picker is not None:
                raise self.fail(ref, f"profile {name!r}: more than one picker")
            self.place(profile, plugin, float(weight), ref)
        self.finish_profile(profile)
        return profile

    @staticmethod
    def place(profile: SchedulingProfile, plugin: Plugin, weight: float, where: Any) -> None:
        # A plugin can be several things at once (context-length-aware filters and scores).
        if isinstance(plugin, Scorer):
            profile.scorers.append(WeightedScorer(plugin, weight))
        if isinstance(plugin, Filter):
            profile.filters.append(plugin)
        if isinstance(plugin, Picker) and profile.picker is None:
            profile.picker = plugin

    def finish_profile(self, profile: SchedulingProfile) -> None:
        if profile.picker is not None:
            return
        # Upstream reuses the config's picker, else adds a max-score-picker.
        found = next((i for i in self.instances.values() if isinstance(i.plugin, Picker)), None)
        picker = found.plugin if found is not None else None
        if found is not None:
            found.used = True
        if picker is None:
            picker = registry.create("max-score-picker")
            self.instances[picker.name] = _Instance(picker.name, picker.type_name, None, picker, used=True)
            self.add(picker)
        assert isinstance(picker, Picker)
        profile.picker = picker

    # --- saturation, parsers, data layer -------------------------------------------------
    def saturation(self, spec: Any, flow: dict[str, Any] | None) -> tuple[Detector, str]:
        """flowControl.saturationDetector (llm-d-router) over the top-level one; a pluginRef (GIE v1.5,
        llm-d-router) or the older inline thresholds; else utilization-detector."""
        chosen = spec
        if flow is not None and flow.get("saturationDetector") is not None:
            chosen = flow["saturationDetector"]
        if chosen is None:
            return self.detector_ref("utilization-detector", self.doc)
        if not isinstance(chosen, dict):
            raise self.fail(self.doc, "saturationDetector must be a mapping")
        inline = [k for k in chosen if k in INLINE_SATURATION]
        unknown = set(chosen) - {"pluginRef", *INLINE_SATURATION}
        if unknown:
            raise self.fail(chosen, f"unknown saturationDetector field(s) {sorted(unknown)}")
        if inline and "pluginRef" in chosen:
            raise self.fail(chosen, "saturationDetector: give a pluginRef or the thresholds, not both")
        if inline:
            params = Params("saturationDetector", dict(chosen), strict=True, warnings=self.warnings)
            try:
                return UtilizationDetector(utilization_config(params, headroom=False)), "saturationDetector"
            except ConfigError as e:
                raise self.fail(chosen, str(e)) from None
        ref = chosen.get("pluginRef") or "utilization-detector"
        if not isinstance(ref, str):
            raise self.fail(chosen, "saturationDetector.pluginRef must be a plugin name")
        return self.detector_ref(ref, chosen)

    def detector_ref(self, ref: str, where: Any) -> tuple[Detector, str]:
        inst = self.instances.get(ref)
        if inst is None:
            if ref != "utilization-detector":
                raise self.fail(where, f"saturation detector references undefined plugin {ref!r}")
            return UtilizationDetector(), ref  # upstream's default, with its defaults
        inst.used = True
        plugin = inst.plugin
        if isinstance(plugin, UtilizationDetectorPlugin | ConcurrencyDetectorPlugin):
            return plugin.detector, ref
        raise self.fail(where, f"plugin {ref!r} is not a saturation detector")

    def parsers(self, doc: dict[str, Any]) -> ParserSet:
        handler = doc.get("requestHandler")
        legacy = doc.get("parser")
        refs: list[Any] = []
        fallback = False
        if handler is not None:
            if not isinstance(handler, dict) or set(handler) - {"parsers"}:
                raise self.fail(handler if isinstance(handler, dict) else doc,
                                "requestHandler takes only 'parsers', a list of pluginRefs")
            listed = handler.get("parsers") or []
            if not isinstance(listed, list):
                raise self.fail(handler, "requestHandler.parsers must be a list")
            refs = listed
        if not refs and legacy is not None:
            if not isinstance(legacy, dict) or set(legacy) - {"pluginRef"}:
                raise self.fail(legacy if isinstance(legacy, dict) else doc, "parser takes only 'pluginRef'")
            refs = [legacy]
            # GIE's one parser saw every path; keep the other paths routed, not refused.
            fallback = True
        if not refs:
            parsers = [self.parser_ref(t, doc) for t in DEFAULT_PARSERS]
            return ParserSet(parsers)
        parsers = []
        for ref in refs:
            if not isinstance(ref, dict) or set(ref) != {"pluginRef"} or not isinstance(ref["pluginRef"], str):
                raise self.fail(ref if isinstance(ref, dict) else refs, "each parser is a mapping with 'pluginRef'")
            parsers.append(self.parser_ref(ref["pluginRef"], ref))
        if fallback and not any(not p.paths for p in parsers):
            parsers.append(PassthroughParser())
        out = ParserSet(parsers)
        self.warnings.extend(out.warnings)
        return out

    def parser_ref(self, ref: str, where: Any) -> Parser:
        inst = self.instances.get(ref)
        if inst is not None:
            inst.used = True
            if inst.parser is None:
                raise self.fail(where, f"the plugin {ref!r} is not a parser plugin")
            return inst.parser
        if ref in PARSER_TYPES:  # upstream adds a parser named by its type
            return PARSER_TYPES[ref](ref)
        raise self.fail(where, f"parser references undefined plugin {ref!r}")

    def data_layer(self, spec: Any, gates: dict[str, bool]) -> DataLayerConfig:
        sources = [i for i in self.instances.values() if i.source is not None]
        extractors = [i for i in self.instances.values() if i.extractor is not None]
        if gates["enableLegacyMetrics"]:
            # Upstream's legacy metrics path: the flags configure scraping, the data layer is unused.
            for inst in sources + extractors:
                inst.used = True
                self.warnings.append(f"plugin {inst.name!r} ({inst.type_name}) has no effect with enableLegacyMetrics:"
                                     " the metric flags configure scraping")
            if spec is not None:
                self.warnings.append("dataLayer has no effect with enableLegacyMetrics")
            return DataLayerConfig(legacy_metrics=True)
        inject = True
        chosen: list[tuple[_Instance, _Instance | None]] = []
        if spec is not None:
            if not isinstance(spec, dict):
                raise self.fail(self.doc, "dataLayer must be a mapping")
            allowed = {"sources", "injectDefaults", "discovery", "peerDiscovery", "crossReplicaSyncerPluginRef",
                       "crossReplicaSyncInterval"}
            unknown = set(spec) - allowed
            if unknown:
                raise self.fail(spec, f"unknown dataLayer field(s) {sorted(unknown)}")
            if spec.get("discovery") is not None:
                raise self.fail(spec, "dataLayer.discovery is not supported by epp: it discovers endpoints itself "
                                      "(--pool-name, --endpoint-selector, --pool-file FILE, --endpoints)")
            if spec.get("peerDiscovery") is not None or spec.get("crossReplicaSyncerPluginRef"):
                raise self.fail(spec, "sharing state across EPP replicas (peerDiscovery, a cross-replica syncer) is "
                                      "not supported by epp")
            if spec.get("crossReplicaSyncInterval") is not None:
                self.warnings.append("dataLayer.crossReplicaSyncInterval has no effect without a cross-replica syncer")
            injected = spec.get("injectDefaults")
            if injected is not None and not isinstance(injected, bool):
                raise self.fail(spec, "dataLayer.injectDefaults must be true or false")
            # GIE: a dataLayer section is used as given (no sources: no scraping); llm-d-router
            # adds the default source unless injectDefaults is false.
            inject = injected if injected is not None else self.api == LLMD_API
            listed = spec.get("sources") or []
            if not isinstance(listed, list):
                raise self.fail(spec, "dataLayer.sources must be a list")
            for entry in listed:
                chosen.append(self.data_source(entry))
        metrics = [(s, e) for s, e in chosen if s.source is not None]
        if not metrics and (spec is None or inject):
            # The default source and extractor: the ones of that name if defined, else defaults.
            src = self.instances.get(METRICS_DATA_SOURCE)
            ext = self.instances.get(CORE_METRICS_EXTRACTOR)
            if src is not None and src.source is None:
                raise self.fail(src.spec, f"the plugin {METRICS_DATA_SOURCE!r} is not a metrics data source")
            for default in (src, ext):
                if default is not None:
                    default.used = True
            given = src.source if src is not None and src.source is not None else MetricsSource()
            return self.data_config(given, ext.extractor if ext is not None else None)
        if len(metrics) > 1:
            raise self.fail(spec, "epp scrapes each server once: give dataLayer one metrics-data-source")
        if not metrics:
            return DataLayerConfig(scrape=False)
        source_inst, extractor_inst = metrics[0]
        assert source_inst.source is not None
        return self.data_config(source_inst.source, extractor_inst.extractor if extractor_inst else None)

    def data_source(self, src: Any) -> tuple[_Instance, _Instance | None]:
        if not isinstance(src, dict) or not isinstance(src.get("pluginRef"), str) or set(src) - {"pluginRef",
                                                                                                "extractors"}:
            raise self.fail(src if isinstance(src, dict) else self.doc,
                            "each dataLayer source is a mapping with 'pluginRef' and 'extractors'")
        inst = self.instances.get(src["pluginRef"])
        if inst is None:
            raise self.fail(src, f"the plugin {src['pluginRef']} is not a data source (none of that name is defined)")
        if inst.source is None and inst.component != "notification-source":
            raise self.fail(src, f"the plugin {inst.name} is not a data source")
        inst.used = True
        extractor: _Instance | None = None
        for ext in src.get("extractors") or []:
            if not isinstance(ext, dict) or set(ext) != {"pluginRef"}:
                raise self.fail(src, "each extractor is a mapping with 'pluginRef'")
            found = self.instances.get(ext["pluginRef"])
            if found is None:
                raise self.fail(src, f"the plugin {ext['pluginRef']} is not registered")
            found.used = True
            if inst.source is not None:
                if found.extractor is None:
                    raise self.fail(src, f"the plugin {found.name} cannot extract from a metrics-data-source")
                if extractor is not None:
                    raise self.fail(src, "give a metrics-data-source one core-metrics-extractor")
                extractor = found
            elif not isinstance(found.plugin, InFlightLoadProducer):
                raise self.fail(src, f"the plugin {found.name} cannot extract from an endpoint-notification-source")
        return inst, extractor

    @staticmethod
    def data_config(src: MetricsSource, ext: MetricsExtractor | None) -> DataLayerConfig:
        ext = ext or MetricsExtractor()
        return DataLayerConfig(
            scheme=src.scheme, path=src.path, port=src.port, insecure_skip_verify=src.insecure_skip_verify,
            ca_cert_path=src.ca_cert_path, client_cert_path=src.client_cert_path, client_key_path=src.client_key_path,
            interval=src.interval, engine_label_key=ext.engine_label_key, default_engine=ext.default_engine,
            engines=ext.engines)

    def report_unused(self) -> None:
        for inst in self.instances.values():
            if inst.spec is None or inst.used:
                continue
            if inst.plugin is not None and (self.plugin_hooks(inst.plugin) or inst.name in self.looked_up):
                continue  # a producer, a lifecycle plugin, or one another plugin reads
            what = inst.plugin.type_name if inst.plugin is not None else inst.type_name
            self.warnings.append(f"plugin {inst.name!r} ({what}) is defined but not used")

    @staticmethod
    def plugin_hooks(plugin: Plugin) -> bool:
        return isinstance(plugin, ApproxPrefixCacheProducer | InFlightLoadProducer | ResponseHeaders)


# --- what `epp check-config` prints -------------------------------------------------------
def describe(config: PickerConfig) -> str:
    """The resolved configuration, defaults filled in, as YAML-like text for `epp check-config`."""
    lines: list[str] = [f"# {config.source}: loads", f"apiVersion: {config.api_version}"]
    gates = [g for g, on in config.feature_gates.items() if on and g != "haPopulateNonLeaderDatastore"]
    lines.append(f"featureGates: [{', '.join(gates)}]")
    lines.append("schedulingProfiles:")
    for profile in config.scheduler.profiles:
        lines.append(f"- name: {profile.name}")
        lines.append("  handler: single-profile-handler")
        lines.append("  filters:")
        for f in profile.filters:
            lines.extend(_plugin_lines(f, "  "))
        lines.append("  scorers:")
        for ws in profile.scorers:
            lines.extend(_plugin_lines(ws.scorer, "  ", weight=ws.weight))
        lines.append("  picker:")
        if profile.picker is not None:
            lines.extend(_plugin_lines(profile.picker, "  "))
    in_profiles = {id(p) for pr in config.scheduler.profiles for p in (*pr.filters, pr.picker,
                                                                        *(w.scorer for w in pr.scorers))}
    others = [p for p in config.scheduler.plugins if id(p) not in in_profiles]
    if others:
        lines.append("producers:")
        for p in others:
            lines.extend(_plugin_lines(p, ""))
    detector = config.saturation
    lines.append("saturationDetector:")
    lines.append(f"  name: {config.saturation_name}")
    lines.append(f"  type: {detector.type_name}")
    lines.extend(f"  {k}: {_value(v)}" for k, v in detector.describe().items())
    flow = config.flow_control
    if flow is not None:
        lines.append("flowControl:")
        lines.append(f"  maxRequests: {flow.max_requests or 'unlimited'}")
        lines.append(f"  maxBytes: {flow.max_bytes or 'unlimited'}")
        lines.append(f"  defaultRequestTTL: {flow.default_request_ttl:g}s")
        lines.append(f"  noEndpointRequestTTL: {flow.no_endpoint_request_ttl:g}s")
        for priority, band in sorted(flow.bands.items()):
            lines.append(f"  - priority: {priority}  maxRequests: {band.max_requests}  ordering: {band.ordering}  "
                         f"fairness: {band.fairness}")
    lines.append("requestHandler:")
    lines.append("  parsers: [" + ", ".join(f"{p.name} ({p.type_name})" if p.name != p.type_name else p.name
                                            for p in config.parsers.parsers) + "]")
    lines.append("dataLayer:")
    lines.extend(f"  {k}: {_value(v)}" for k, v in config.data_layer.describe().items())
    if config.warnings:
        lines.append("warnings:")
        lines.extend(f"- {w}" for w in config.warnings)
    return "\n".join(lines) + "\n"


def _plugin_lines(plugin: Plugin, indent: str, *, weight: float | None = None) -> list[str]:
    head = f"{indent}- {plugin.name}" + (f" ({plugin.type_name})" if plugin.name != plugin.type_name else "")
    if weight is not None:
        head += f"  weight: {weight:g}"
    out = [head]
    for key, value in plugin.describe().items():
        out.append(f"{indent}    {key}: {_value(value)}")
    return out


def _value(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, float):
        return f"{value:g}"
    return json.dumps(value)

