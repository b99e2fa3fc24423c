"""The flowControl section as upstream writes it: defaults, quantities, bands, policies; errors name the line."""

from __future__ import annotations

from typing import Any

import pytest

from epp.errors import ConfigError
from epp.flowcontrol import FlowControlConfig, parse_flow_control, parse_quantity, policy_plugin
from epp.flowcontrol.config import EDF, FCFS, GLOBAL_STRICT, POLICY_TYPES, PRIORITY_HOLDBACK, ROUND_ROBIN
from epp.yaml_lines import load_documents, where


def fail(obj: Any, msg: str) -> ConfigError:
    return ConfigError(f"{where(obj, 'epp.yaml')}: {msg}")


def load(text: str) -> FlowControlConfig:
    doc = load_documents(text, "epp.yaml")[0]
    plugins = {}
    for spec in doc.get("plugins") or []:
        if spec["type"] in POLICY_TYPES:
            name = spec.get("name", spec["type"])
            plugins[name] = policy_plugin(spec["type"], name, spec.get("parameters"), fail, spec)
    return parse_flow_control(doc.get("flowControl"), fail, plugins)


def test_no_section_gives_upstreams_defaults() -> None:
    cfg = parse_flow_control(None, fail)
    assert (cfg.max_requests, cfg.max_bytes, cfg.default_request_ttl, cfg.no_endpoint_request_ttl) == (0, 0, 60, 60)
    band = cfg.band(7)
    assert (band.priority, band.max_requests, band.max_bytes, band.ordering, band.fairness) == (
        7, 5000, 1_000_000_000, FCFS, GLOBAL_STRICT)
    assert cfg.usage_limit.ceilings([7, 0, -1]) == [1.0, 1.0, 1.0]


def test_a_full_section_loads_as_written() -> None:
    cfg = load("""
plugins:
- type: round-robin-fairness-policy
  name: fair
- type: priority-holdback-policy
  name: holdback
  parameters: {minCeiling: 0.4, maxCeiling: 0.9}
flowControl:
  maxRequests: 2k
  maxBytes: 1Gi
  defaultRequestTTL: 30s
  defaultPriorityBand: {maxRequests: 500}
  defaultNegativePriorityBand: {maxRequests: 50, maxBytes: 10M}
  priorityBands:
  - priority: 10
    maxRequests: "1k"
    orderingPolicyRef: edf-ordering-policy
    fairnessPolicyRef: fair
  usageLimitPolicyPluginRef: holdback
  saturationDetector: {pluginRef: utilization-detector}
""")
    assert cfg.max_requests == 2000
    assert cfg.max_bytes == 2**30
    assert cfg.default_request_ttl == 30
    assert cfg.no_endpoint_request_ttl == 30
    high = cfg.band(10)
    assert (high.max_requests, high.ordering, high.fairness, high.max_bytes) == (1000, EDF, ROUND_ROBIN, 10**9)
    assert cfg.band(3).max_requests == 500
    assert (cfg.band(-2).max_requests, cfg.band(-2).max_bytes, cfg.band(-2).priority) == (50, 10**7, -2)
    assert cfg.usage_limit.type_name == PRIORITY_HOLDBACK
    assert cfg.usage_limit.ceilings([10, 0, -1]) == pytest.approx([0.9, 0.65, 0.4])


def test_no_endpoint_ttl_splits_only_when_set_and_zero_disables() -> None:
    cfg = load("flowControl: {defaultRequestTTL: 0s, noEndpointRequestTTL: 5m}")
    assert (cfg.default_request_ttl, cfg.no_endpoint_request_ttl) == (0, 300)


def test_zero_band_limits_mean_the_default_as_upstream() -> None:
    cfg = load("flowControl: {priorityBands: [{priority: 1, maxRequests: 0, maxBytes: '0'}]}")
    assert (cfg.band(1).max_requests, cfg.band(1).max_bytes) == (5000, 1_000_000_000)


def test_the_default_policies_and_parameterless_types_resolve_by_type_name() -> None:
    cfg = load("""
flowControl:
  priorityBands:
  - {priority: 0, orderingPolicyRef: fcfs-ordering-policy, fairnessPolicyRef: global-strict-fairness-policy}
  - {priority: 1, orderingPolicyRef: edf-ordering-policy, fairnessPolicyRef: round-robin-fairness-policy}
  usageLimitPolicyPluginRef: static-usage-limit-policy
""")
    assert (cfg.band(1).ordering, cfg.band(1).fairness) == (EDF, ROUND_ROBIN)


def test_value_domain_holdback_spaces_ceilings_by_priority_value() -> None:
    cfg = load("""
plugins:
- {type: priority-holdback-policy, name: h, parameters: {domain: value, minCeiling: 0.2}}
flowControl: {usageLimitPolicyPluginRef: h}
""")
    assert cfg.usage_limit.ceilings([10, 8, 0]) == pytest.approx([1.0, 0.84, 0.2])


@pytest.mark.parametrize(("text", "line", "message"), [
    ("flowControl:\n  maxRequest: 3\n", 2, "unknown field(s) ['maxRequest']"),
    ("flowControl:\n  maxBytes: lots\n", 2, "flowControl.maxBytes: 'lots' is not a quantity"),
    ("flowControl:\n  maxRequests: -5\n", 2, "must be non-negative"),
    ("flowControl:\n  defaultRequestTTL: soon\n", 2, "flowControl.defaultRequestTTL: invalid duration"),
    ("flowControl:\n  priorityBands:\n  - {maxRequests: 3}\n", 3, "each band needs a priority"),
    ("flowControl:\n  priorityBands:\n  - {priority: 1}\n  - {priority: 1}\n", 4, "priority 1 is listed twice"),
    ("flowControl:\n  priorityBands:\n  - {priority: 1, orderingPolicyRef: mine}\n", 3, "no plugin named 'mine'"),
    ("flowControl:\n  priorityBands:\n  - {priority: 1, orderingPolicyRef: round-robin-fairness-policy}\n", 3,
     "is a round-robin-fairness-policy, not one of edf-ordering-policy, fcfs-ordering-policy"),
    ("flowControl:\n  priorityBands:\n  - {priority: 1, orderingPolicyRef: slo-deadline-ordering-policy}\n", 3,
     "not supported by epp: use edf-ordering-policy"),
    ("flowControl:\n  enableEviction: true\n", 2, "enableEviction is not supported by epp"),
    ("flowControl:\n  usageLimitPolicyPluginRef: priority-holdback-policy\n", 2, "declare it under plugins"),
    ("plugins:\n- type: priority-holdback-policy\n  name: h\nflowControl: {usageLimitPolicyPluginRef: h}\n", 2,
     "minCeiling is required"),
    ("plugins:\n- type: static-usage-limit-policy\n  name: s\n  parameters: {threshold: 1.5}\n", 2,
     "threshold must be in (0.0, 1.0]"),
    ("plugins:\n- type: fcfs-ordering-policy\n  parameters: {depth: 1}\n", 2, "unknown parameter(s) ['depth']"),
])
def test_mistakes_name_the_line(text: str, line: int, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        load(text)
    assert str(e.value).startswith(f"epp.yaml:{line}: ")
    assert message in str(e.value)


@pytest.mark.parametrize(("text", "value"), [
    ("100", 100), ("1k", 1000), ("500M", 500_000_000), ("1Gi", 2**30), ("2Ki", 2048), ("1e3", 1000),
    ("1.5k", 1500), ("100m", 1), (250, 250), (2.5, 3),
])
def test_quantities_read_as_kubernetes_writes_them(text: Any, value: int) -> None:
    assert parse_quantity(text) == value


@pytest.mark.parametrize("text", ["", "1KB", "k", "ten", True, None])
def test_what_is_not_a_quantity_is_refused(text: Any) -> None:
    with pytest.raises(ValueError, match="is not a quantity"):
        parse_quantity(text)
