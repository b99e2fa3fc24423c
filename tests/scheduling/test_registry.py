"""The plugin registry (epp.scheduling.registry): the explicit list of built-in plugins, by GIE type name."""

from __future__ import annotations

import pkgutil

import pytest

from epp.errors import ConfigError
from epp.scheduling import plugins, registry


def test_every_plugin_module_is_registered() -> None:
    """A plugin file left out of BUILT_IN could never be named in a config."""
    modules = {m.name for m in pkgutil.iter_modules(plugins.__path__)}
    registered = {cls.__module__.rsplit(".", 1)[1] for cls in registry.BUILT_IN}
    assert modules == registered


def test_older_names_find_the_same_plugin() -> None:
    types = registry.plugin_types()
    assert types["kv-cache-scorer"] is types["kv-cache-utilization-scorer"]


def test_an_unknown_type_names_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown plugin type 'nope'; known types: .*queue-scorer"):
        registry.create("nope")


def test_create_names_the_instance() -> None:
    assert registry.create("queue-scorer").name == "queue-scorer"
    assert registry.create("queue-scorer", "q").name == "q"


def names(text: str) -> list[str]:
    return text.split()


# Every plugin type GIE v1.5 (cmd/epp/runner) and llm-d-router v0.10 register.
GIE_V1_5 = names("""
prefix-cache-scorer max-score-picker random-picker weighted-random-picker single-profile-handler
kv-cache-utilization-scorer queue-scorer running-requests-size-scorer lora-affinity-scorer token-load-scorer
global-strict-fairness-policy round-robin-fairness-policy fcfs-ordering-policy edf-ordering-policy
slo-deadline-ordering-policy static-usage-limit-policy approx-prefix-cache-producer inflight-load-producer
predicted-latency-producer latency-slo-admitter prefix-cache-affinity-filter slo-headroom-tier-filter latency-scorer
header-based-testing-filter destination-endpoint-served-verifier metrics-data-source core-metrics-extractor
k8s-notification-source endpoint-notification-source request-attribute-reporter openai-parser vllmgrpc-parser
passthrough-parser concurrency-detector utilization-detector eviction-sheddable-filter
eviction-priority-then-time-ordering
""")
LLM_D_V0_10 = names("""
disaggregatedset-rollout-screener label-selector-filter by-label-selector by-label encode-filter decode-filter
prefill-filter session-affinity-filter endpoint-attribute-filter topology-affinity-filter utilization-filter
data-parallel-profile-handler load-aware-scorer context-length-aware session-affinity-scorer
header-label-affinity-scorer models-data-source models-data-extractor topology-extractor dcgm-data-source
dcgm-extractor prefix-cache-scorer max-score-picker random-picker weighted-random-picker single-profile-handler
disagg-headers-handler prefill-header-handler pd-profile-handler disagg-profile-handler always-disagg-pd-decider
prefix-based-pd-decider always-disagg-multimodal-decider kv-cache-utilization-scorer queue-scorer
running-requests-size-scorer lora-affinity-scorer token-load-scorer no-hit-lru-scorer active-request-scorer
precise-prefix-cache-scorer mm-embeddings-cache-scorer precise-prefix-cache-producer header-profile-handler
endpoint-attribute-scorer topology-affinity-scorer burst-prefix-cache-producer p2p-source-producer
multicluster-session-affinity-filter multicluster-queue-scorer multicluster-kv-cache-utilization-scorer
multicluster-prefix-cache-scorer multicluster-approx-prefix-cache-producer global-strict-fairness-policy
round-robin-fairness-policy program-aware-fairness fcfs-ordering-policy edf-ordering-policy
slo-deadline-ordering-policy static-usage-limit-policy sheddable-eviction-filter
priority-then-time-eviction-order-policy priority-holdback-policy soft-reflective-ceiling-policy
approx-prefix-cache-producer inflight-load-producer predicted-latency-producer tokenizer
mm-embeddings-cache-producer token-producer session-id-producer latency-slo-admitter probabilistic-admitter
prefix-cache-affinity-filter slo-headroom-tier-filter latency-scorer header-based-testing-filter
destination-endpoint-served-verifier metrics-data-source core-metrics-extractor multicluster-metrics-data-source
multicluster-metrics-extractor k8s-notification-source endpoint-notification-source request-attribute-reporter
openai-parser vllmgrpc-parser passthrough-parser anthropic-parser vllmhttp-parser sglanghttp-parser
vertexai-parser concurrency-detector utilization-detector file-discovery multicluster-file-discovery agent-identity
""")


@pytest.mark.parametrize("type_name", sorted(set(GIE_V1_5) | set(LLM_D_V0_10)))
def test_every_upstream_type_loads_or_is_refused_by_name(type_name: str) -> None:
    """Each type is run (a plugin, a parser, a data-layer part), loaded as an unused flow-control
    policy with a warning, or refused with why and what instead; none is unknown."""
    from epp.scheduling import picker_config, refused

    text = f"apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n- type: {type_name}\n"
    try:
        config = picker_config.load_text(text, "t.yaml")
    except ConfigError as e:
        message = str(e)
        assert "unknown plugin type" not in message
        if type_name in refused.REFUSED:
            assert message.startswith(f"t.yaml:4: plugin type {type_name!r} is not supported by epp (")
            assert "; instead: " in message
        else:  # a type epp runs that cannot go without parameters, as upstream
            assert type_name in {"by-label", "header-label-affinity-scorer", "utilization-filter",
                                 "priority-holdback-policy"}, message
        return
    assert type_name not in refused.REFUSED
    if type_name in refused.FLOW_CONTROL_POLICIES:
        assert any("flow control is off" in w for w in config.warnings)


@pytest.mark.parametrize("type_name", ["disagg-profile-handler", "pd-profile-handler", "prefill-filter",
                                       "decode-filter", "always-disagg-pd-decider", "prefix-based-pd-decider"])
def test_disaggregation_is_refused_as_later_work(type_name: str) -> None:
    from epp.scheduling import refused

    message = refused.refusal(type_name)
    assert message is not None
    assert "prefill/decode disaggregation is later work" in message
