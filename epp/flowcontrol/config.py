"""The `flowControl` section of an EndpointPickerConfig, in llm-d-router v0.10's format (GIE v1.5's is a subset).

```yaml
featureGates: [flowControl]
plugins:
- type: round-robin-fairness-policy          # policies are plugins, named by the section's *Ref fields
  name: fair
flowControl:
  maxRequests: 2000                          # all bands together; 0 or absent: no global bound
  maxBytes: 1Gi
  defaultRequestTTL: 30s                     # queue-wait budget while the pool has endpoints (default 60s)
  noEndpointRequestTTL: 5m                   # ... while it has none (default: defaultRequestTTL)
  defaultPriorityBand: {maxRequests: 500}    # template for priorities not listed
  defaultNegativePriorityBand: {maxRequests: 50}   # template for priorities below 0
  priorityBands:
  - {priority: 10, maxRequests: 1k, orderingPolicyRef: edf-ordering-policy, fairnessPolicyRef: fair}
  usageLimitPolicyPluginRef: static-usage-limit-policy
  saturationDetector: {pluginRef: ...}       # read by the picker config, not here
```

Quantities are Kubernetes resource quantities ("100", "1k", "1Gi", "500M"); a band's
`maxRequests` / `maxBytes` of 0 or absent is the default (5000 requests, 1 GB), as upstream.
The policy plugins upstream registers by default (`fcfs-ordering-policy`,
`global-strict-fairness-policy`, `static-usage-limit-policy`) need no `plugins:` entry; epp also
resolves the other parameterless types by their type name. What epp does not run
(`enableEviction`, `slo-deadline-ordering-policy`, ...) is an error that says so.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from epp.durations import parse_duration

Fail = Callable[[Any, str], Exception]

FCFS, EDF = "fcfs-ordering-policy", "edf-ordering-policy"
GLOBAL_STRICT, ROUND_ROBIN = "global-strict-fairness-policy", "round-robin-fairness-policy"
STATIC_USAGE_LIMIT, PRIORITY_HOLDBACK = "static-usage-limit-policy", "priority-holdback-policy"
ORDERING_TYPES = frozenset({FCFS, EDF})
FAIRNESS_TYPES = frozenset({GLOBAL_STRICT, ROUND_ROBIN})
USAGE_LIMIT_TYPES = frozenset({STATIC_USAGE_LIMIT, PRIORITY_HOLDBACK})
# The plugin types this package builds (the picker config hands their `plugins:` entries here).
POLICY_TYPES = ORDERING_TYPES | FAIRNESS_TYPES | USAGE_LIMIT_TYPES
# Upstream's flow-control plugin types that epp refuses, with what to use instead.
REFUSED_POLICY_TYPES = {
    "slo-deadline-ordering-policy": "use edf-ordering-policy (deadline = enqueue time + TTL)",
    "program-aware-fairness": "use round-robin-fairness-policy (fair turns across fairness ids)",
    "soft-reflective-ceiling-policy": "use priority-holdback-policy or static-usage-limit-policy",
}

DEFAULT_TTL = 60.0
DEFAULT_BAND_MAX_REQUESTS = 5000
DEFAULT_BAND_MAX_BYTES = 1_000_000_000

SECTION_FIELDS = ("maxBytes", "maxRequests", "defaultRequestTTL", "noEndpointRequestTTL", "defaultPriorityBand",
                  "defaultNegativePriorityBand", "priorityBands", "usageLimitPolicyPluginRef", "saturationDetector",
                  "enableEviction")
BAND_FIELDS = ("priority", "maxBytes", "maxRequests", "fairnessPolicyRef", "orderingPolicyRef")


@dataclass(frozen=True, slots=True)
class UsageLimitPolicy:
    """The admission ceiling of each band: a band dispatches while the pool's saturation is below it.

    `static-usage-limit-policy`: one `threshold` for every band. `priority-holdback-policy`:
    ceilings spread linearly from `max_ceiling` (highest priority) to `min_ceiling` (lowest), by
    rank or by priority value, so lower bands wait first as saturation rises.
    """

    type_name: str = STATIC_USAGE_LIMIT
    threshold: float = 1.0
    min_ceiling: float = 0.0
    max_ceiling: float = 1.0
    domain: str = "rank"

    def ceilings(self, priorities: list[int]) -> list[float]:
        """Ceilings for the priorities, given highest first."""
        n = len(priorities)
        if self.type_name == STATIC_USAGE_LIMIT:
            return [self.threshold] * n
        if n <= 1:
            return [self.max_ceiling] * n
        lo, hi = self.min_ceiling, self.max_ceiling
        if self.domain == "value":
            top, bottom = priorities[0], priorities[-1]
            span = top - bottom
            return [lo + (p - bottom) / span * (hi - lo) if span else hi for p in priorities]
        return [hi - i * (hi - lo) / (n - 1) for i in range(n)]


@dataclass(frozen=True, slots=True)
class PolicyPlugin:
    """A flow-control policy from the `plugins:` section: its name, type and what its parameters set."""

    name: str
    type_name: str
    usage_limit: UsageLimitPolicy | None = None


@dataclass(frozen=True, slots=True)
class BandConfig:
    """One priority band: its capacity and how it picks the next request."""

    priority: int = 0
    max_requests: int = DEFAULT_BAND_MAX_REQUESTS
    max_bytes: int = DEFAULT_BAND_MAX_BYTES
    ordering: str = FCFS
    fairness: str = GLOBAL_STRICT


@dataclass(slots=True)
class FlowControlConfig:
    """Everything the section sets, upstream's defaults filled in. Durations in seconds; 0 disables a TTL."""

    max_requests: int = 0  # all bands together; 0: no global bound
    max_bytes: int = 0
    default_request_ttl: float = DEFAULT_TTL
    no_endpoint_request_ttl: float = DEFAULT_TTL
    bands: dict[int, BandConfig] = field(default_factory=dict)
    default_band: BandConfig = field(default_factory=BandConfig)
    default_negative_band: BandConfig | None = None
    usage_limit: UsageLimitPolicy = field(default_factory=UsageLimitPolicy)

    def band(self, priority: int) -> BandConfig:
        """The band a priority gets: its own, else the negative template (priority < 0), else the default."""
        band = self.bands.get(priority)
        if band is not None:
            return band
        template = self.default_negative_band if priority < 0 and self.default_negative_band else self.default_band
        return replace(template, priority=priority)


# --- Kubernetes quantities -----------------------------------------------------------------
_QUANTITY = re.compile(r"^([+-]?(?:\d+\.?\d*|\.\d+))(?:([eE][+-]?\d+)|(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E)?)$")
_SUFFIX = {"": 1, "n": 1e-9, "u": 1e-6, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
           "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}


def parse_quantity(value: Any) -> int:
    """A resource.Quantity's Value(): the integer, rounded up ("1k" -> 1000, "1Gi" -> 1073741824)."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a quantity")
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{value!r} is not a quantity")
        return math.ceil(value)
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a quantity (e.g. 100, 1k, 500M, 1Gi)")
    m = _QUANTITY.match(value.strip())
    if m is None:
        raise ValueError(f"{value!r} is not a quantity (e.g. 100, 1k, 500M, 1Gi)")
    number, exponent, suffix = m.groups()
    scale = 10.0 ** int(exponent[1:]) if exponent else _SUFFIX[suffix or ""]
    return math.ceil(float(number) * scale)


# --- policy plugins ------------------------------------------------------------------------------
def policy_plugin(type_name: str, name: str, params: Mapping[str, Any] | None, fail: Fail, where: Any) -> PolicyPlugin:
    """Build one flow-control policy plugin from its `plugins:` entry; `where` is the entry, for errors."""
    if type_name in REFUSED_POLICY_TYPES:
        why = REFUSED_POLICY_TYPES[type_name]
        raise fail(where, f"flow-control policy {type_name!r} is not supported by epp: {why}")
    if type_name not in POLICY_TYPES:
        raise fail(where, f"{type_name!r} is not a flow-control policy; known: {', '.join(sorted(POLICY_TYPES))}")
    params = dict(params or {})
    if type_name == STATIC_USAGE_LIMIT:
        threshold = _float(params.pop("threshold", 1.0), "threshold", fail, where)
        if not 0.0 < threshold <= 1.0:
            raise fail(where, f"{name}: threshold must be in (0.0, 1.0], got {threshold}")
        _no_more(params, name, fail, where)
        return PolicyPlugin(name, type_name, UsageLimitPolicy(STATIC_USAGE_LIMIT, threshold=threshold))
    if type_name == PRIORITY_HOLDBACK:
        shape = params.pop("shape", "linear")
        if shape != "linear":
            raise fail(where, f"{name}: shape {shape!r} is not supported; only 'linear' is")
        domain = params.pop("domain", "rank")
        if domain not in ("rank", "value"):
            raise fail(where, f"{name}: domain must be 'rank' or 'value', got {domain!r}")
        if "minCeiling" not in params:
            raise fail(where, f"{name}: minCeiling is required (the ceiling of the lowest priority, in [0.0, 1.0))")
        lo = _float(params.pop("minCeiling"), "minCeiling", fail, where)
        hi = _float(params.pop("maxCeiling", 1.0), "maxCeiling", fail, where)
        if not 0.0 <= lo < 1.0:
            raise fail(where, f"{name}: minCeiling must be in [0.0, 1.0), got {lo}")
        if not 0.0 < hi <= 1.0 or hi <= lo:
            raise fail(where, f"{name}: maxCeiling must be in (0.0, 1.0] and above minCeiling, got {hi}")
        _no_more(params, name, fail, where)
        return PolicyPlugin(name, type_name, UsageLimitPolicy(PRIORITY_HOLDBACK, min_ceiling=lo, max_ceiling=hi,
                                                              domain=domain))
    _no_more(params, name, fail, where)
    return PolicyPlugin(name, type_name)


def _float(value: Any, key: str, fail: Fail, where: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise fail(where, f"{key} must be a number, got {value!r}")
    return float(value)


def _no_more(params: dict[str, Any], name: str, fail: Fail, where: Any) -> None:
    if params:
        raise fail(where, f"{name}: unknown parameter(s) {sorted(params)}")


# --- the section -------------------------------------------------------------------------------------
def parse_flow_control(section: Mapping[str, Any] | None, fail: Fail,
                       policies: Mapping[str, PolicyPlugin] | None = None) -> FlowControlConfig:
    """The config the section describes. `fail(obj, msg)` makes the error to raise (naming obj's line);
    `policies` are the flow-control policy plugins the `plugins:` section declares, by name.
    `saturationDetector` is left to the caller."""
    if section is None:
        return FlowControlConfig()
    if not isinstance(section, Mapping):
        raise fail(section, "flowControl must be a mapping")
    unknown = sorted(set(section) - set(SECTION_FIELDS))
    if unknown:
        raise fail(section, f"flowControl: unknown field(s) {unknown}; known: {', '.join(SECTION_FIELDS)}")
    if section.get("enableEviction"):
        raise fail(section, "flowControl.enableEviction is not supported by epp: in-flight requests are never "
                            "revoked; lower the bands' maxRequests or use priority-holdback-policy to keep "
                            "room for high priority")
    refs = _Resolver(policies or {}, fail)
    cfg = FlowControlConfig()
    cfg.max_requests = _quantity(section, "maxRequests", fail, "flowControl")
    cfg.max_bytes = _quantity(section, "maxBytes", fail, "flowControl")
    if "defaultRequestTTL" in section:
        cfg.default_request_ttl = _duration(section, "defaultRequestTTL", fail)
        cfg.no_endpoint_request_ttl = cfg.default_request_ttl  # follows it unless set (upstream's opt-in split)
    if "noEndpointRequestTTL" in section:
        cfg.no_endpoint_request_ttl = _duration(section, "noEndpointRequestTTL", fail)
    base = BandConfig()
    if section.get("defaultPriorityBand") is not None:
        cfg.default_band = _band(section["defaultPriorityBand"], base, refs, fail, "defaultPriorityBand",
                                 needs_priority=False)
    if section.get("defaultNegativePriorityBand") is not None:
        cfg.default_negative_band = _band(section["defaultNegativePriorityBand"], base, refs, fail,
                                          "defaultNegativePriorityBand", needs_priority=False)
    bands = section.get("priorityBands")
    if bands is not None:
        if not isinstance(bands, list):
            raise fail(section, "flowControl.priorityBands must be a list")
        for spec in bands:
            band = _band(spec, base, refs, fail, "priorityBands", needs_priority=True)
            if band.priority in cfg.bands:
                raise fail(spec, f"flowControl.priorityBands: priority {band.priority} is listed twice")
            cfg.bands[band.priority] = band
    ref = section.get("usageLimitPolicyPluginRef")
    if ref is not None and ref != "":
        plugin = refs.resolve(ref, USAGE_LIMIT_TYPES, section, "usageLimitPolicyPluginRef")
        cfg.usage_limit = plugin.usage_limit or UsageLimitPolicy()
    return cfg


class _Resolver:
    def __init__(self, policies: Mapping[str, PolicyPlugin], fail: Fail) -> None:
        self.policies, self.fail = policies, fail

    def resolve(self, ref: Any, kinds: frozenset[str], where: Any, key: str) -> PolicyPlugin:
        if not isinstance(ref, str):
            raise self.fail(where, f"{key} must be a plugin name, got {ref!r}")
        plugin = self.policies.get(ref)
        if plugin is None:
            if ref in REFUSED_POLICY_TYPES:
                raise self.fail(where, f"{key}: {ref!r} is not supported by epp: {REFUSED_POLICY_TYPES[ref]}")
            if ref in POLICY_TYPES and ref != PRIORITY_HOLDBACK:  # a parameterless type named by its type name
                plugin = PolicyPlugin(ref, ref, UsageLimitPolicy() if ref == STATIC_USAGE_LIMIT else None)
            else:
                raise self.fail(where, f"{key}: no plugin named {ref!r}; declare it under plugins: "
                                       f"(types: {', '.join(sorted(kinds))})")
        if plugin.type_name not in kinds:
            raise self.fail(where, f"{key}: plugin {ref!r} is a {plugin.type_name}, not one of "
                                   f"{', '.join(sorted(kinds))}")
        return plugin


def _quantity(spec: Mapping[str, Any], key: str, fail: Fail, what: str) -> int:
    value = spec.get(key)
    if value is None:
        return 0
    try:
        n = parse_quantity(value)
    except ValueError as e:
        raise fail(spec, f"{what}.{key}: {e}") from None
    if n < 0:
        raise fail(spec, f"{what}.{key} must be non-negative, got {value!r}")
    return n


def _duration(spec: Mapping[str, Any], key: str, fail: Fail) -> float:
    try:
        return parse_duration(spec[key])
    except ValueError as e:
        raise fail(spec, f"flowControl.{key}: {e}") from None


def _band(spec: Any, base: BandConfig, refs: _Resolver, fail: Fail, what: str, *, needs_priority: bool) -> BandConfig:
    if not isinstance(spec, Mapping):
        raise fail(spec, f"flowControl.{what}: each band must be a mapping")
    unknown = sorted(set(spec) - set(BAND_FIELDS))
    if unknown:
        raise fail(spec, f"flowControl.{what}: unknown field(s) {unknown}; known: {', '.join(BAND_FIELDS)}")
    priority = spec.get("priority", 0)
    if needs_priority and "priority" not in spec:
        raise fail(spec, f"flowControl.{what}: each band needs a priority")
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise fail(spec, f"flowControl.{what}: priority must be an integer, got {priority!r}")
    label = f"priority band {priority}" if needs_priority else what
    band = replace(base, priority=priority)
    # 0 (or absent) is the default, as upstream: a band is always bounded.
    if n := _quantity(spec, "maxRequests", fail, f"flowControl.{label}"):
        band = replace(band, max_requests=n)
    if n := _quantity(spec, "maxBytes", fail, f"flowControl.{label}"):
        band = replace(band, max_bytes=n)
    if spec.get("orderingPolicyRef"):
        band = replace(band, ordering=refs.resolve(spec["orderingPolicyRef"], ORDERING_TYPES, spec,
                                                   "orderingPolicyRef").type_name)
    if spec.get("fairnessPolicyRef"):
        band = replace(band, fairness=refs.resolve(spec["fairnessPolicyRef"], FAIRNESS_TYPES, spec,
                                                   "fairnessPolicyRef").type_name)
    return band
