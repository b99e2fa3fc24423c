"""EndpointPickerConfig loading: GIE's files load unchanged; mistakes fail at start-up naming the line."""

from pathlib import Path

import pytest

from epp.errors import ConfigError
from epp.scheduling.framework import SchedulingResult
from epp.scheduling.picker_config import default_config, describe, load_text
from tests.helpers import NOW, endpoint, request

GIE_STYLE = """\
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
featureGates: []
plugins:
- type: queue-scorer
- type: kv-cache-scorer            # an older release's name
- type: prefix-cache-scorer
  parameters:
    hashBlockSize: 64
    maxPrefixBlocksToMatch: 256
    lruCapacityPerServer: 31250
- type: max-score-picker
- type: single-profile-handler
- type: metrics-data-source        # data-layer plugins GIE configures; built in here
- type: core-metrics-extractor
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
  - pluginRef: kv-cache-scorer
    weight: 1
  - pluginRef: prefix-cache-scorer
    weight: 3
  - pluginRef: max-score-picker
saturationDetector:
  queueDepthThreshold: 8
  kvCacheUtilThreshold: 0.9
  metricsStalenessThreshold: 150ms
"""


def test_default_profile_weighs_affinity_and_prefill_cost_not_the_scraped_queue() -> None:
    profile = default_config().scheduler.profiles[0]
    weights = {ws.scorer.type_name: ws.weight for ws in profile.scorers}
    assert weights == {"prefix-cache-scorer": 3, "prefill-load-scorer": 3, "lora-affinity-scorer": 1,
                       "running-requests-scorer": 0.5}
    assert profile.picker is not None
    assert profile.picker.type_name == "max-score-picker"


DOC = "a long shared document. " * 500  # ~3000 tokens at 4 characters a token


def test_default_profile_sends_an_adapter_where_it_is_loaded_despite_more_requests_there() -> None:
    """Loading an adapter costs more than sharing a server with a few more requests; the default profile
    knows it, and still sends base-model requests to the less busy server."""
    scheduler = default_config(seed=1).scheduler
    eps = [endpoint(1, max_lora=4, inflight=0), endpoint(2, max_lora=4, inflight=2, active=("sql-lora",))]
    for _ in range(5):
        result, _ = scheduler.schedule(request("a short question", model="sql-lora"), eps, NOW, 2.0)
        assert result.endpoint is eps[1]
    for _ in range(5):
        result, _ = scheduler.schedule(request("a short question", model="m"), eps, NOW, 2.0)
        assert result.endpoint is eps[0]  # the base model: fewer requests in flight wins


def test_default_profile_keeps_a_busy_prefix_holder_when_the_cost_is_the_same() -> None:
    """Under load the holder of a prompt's prefix is busy: a longer waiting queue, more KV in use, and a
    long prefill ahead (the document's first question, still prefilling). Sending the request elsewhere
    costs it as much (it prefills the whole document there) and costs the pool a second copy of the
    prefix, which evicts others: under high load that is how hit rates collapse. The default profile
    keeps it on the holder."""
    scheduler = default_config(seed=1).scheduler
    holder, idle = endpoint(1, waiting=3, kv=0.8, inflight=4), endpoint(2, waiting=0, kv=0.1, inflight=3)
    eps = [holder, idle]
    first = request(DOC + "first question?")
    _, state = scheduler.schedule(first, eps, NOW, 2.0)
    scheduler.pre_request(state, first, SchedulingResult([holder], eps))  # sent there: held, and prefilling
    for i in range(3):
        result, _ = scheduler.schedule(request(DOC + f"question {i}?"), eps, NOW, 2.0)
        assert result.endpoint is holder


def test_the_previous_default_with_gie_weights_still_loads() -> None:
    """bench/configs keeps the profile with GIE's default weights, for A/B runs against the default."""
    path = Path(__file__).parents[2] / "bench" / "configs" / "gie-weights.yaml"
    profile = load_text(path.read_text(), str(path)).scheduler.profiles[0]
    weights = {ws.scorer.type_name: ws.weight for ws in profile.scorers}
    assert weights["queue-scorer"] == weights["kv-cache-utilization-scorer"] == 2
    assert weights["prefix-cache-scorer"] == 3


def test_gie_config_loads_unchanged() -> None:
    cfg = load_text(GIE_STYLE)
    profile = cfg.scheduler.profiles[0]
    assert [(ws.scorer.name, ws.weight) for ws in profile.scorers] == [
        ("queue-scorer", 1.0), ("kv-cache-scorer", 1.0), ("prefix-cache-scorer", 3.0)]
    assert profile.scorers[2].scorer.block_chars == 64
    assert cfg.saturation.config.queue_depth_threshold == 8  # type: ignore[attr-defined]
    assert cfg.saturation.config.metrics_staleness_threshold == pytest.approx(0.15)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("text", "line", "needle"),
    [
        ("plugins:\n- type: queue-scorer\n- type: no-such-scorer\nschedulingProfiles: []\n", 3,
         "unknown plugin type 'no-such-scorer'"),
        ("plugins:\n- type: queue-scorer\nschedulingProfiles:\n- name: p\n  plugins:\n  - pluginRef: missing\n",
         6, "pluginRef 'missing' names no plugin"),
        ("plugins:\n- type: prefix-cache-scorer\n  parameters:\n    lruCapacityPerServer: -1\n"
         "schedulingProfiles:\n- name: p\n  plugins:\n  - pluginRef: prefix-cache-scorer\n", 2,
         "'lruCapacityPerServer' must be >= 1"),
        ("plugins:\n- type: prefix-cache-scorer\n  parameters:\n    blockSizeTokenz: 4\n"
         "schedulingProfiles: []\n", 2, "unknown parameter"),
        ("plugins:\n- type: queue-scorer\nschedulingProfiles:\n- name: p\n  plugins:\n"
         "  - pluginRef: queue-scorer\n    weight: lots\n", 6, "weight"),
        ("kind: Deployment\nplugins: []\n", 1, "kind must be EndpointPickerConfig"),
        ("plugins:\n- type: queue-scorer\n  name: q\n- type: kv-cache-scorer\n  name: q\n"
         "schedulingProfiles: []\n", 4, "duplicate plugin name"),
    ],
)
def test_config_errors_name_the_line(text: str, line: int, needle: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_text(text, "cfg.yaml")
    assert f"cfg.yaml:{line}:" in str(e.value)
    assert needle in str(e.value)


def test_yaml_syntax_error() -> None:
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_text("plugins: [\n", "cfg.yaml")


# --- both config generations, upstream's defaulting -----------------------------------------
LLMD = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\n"
GIE = "apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\n"


def test_no_profile_gets_every_scheduling_plugin_at_weight_one() -> None:
    cfg = load_text(LLMD + "plugins:\n- type: load-aware-scorer\n- type: context-length-aware\n"
                           "- type: approx-prefix-cache-producer\n")
    (profile,) = cfg.scheduler.profiles
    assert profile.name == "default"
    assert [(ws.scorer.type_name, ws.weight) for ws in profile.scorers] == [
        ("load-aware-scorer", 1.0), ("context-length-aware", 1.0)]
    assert [f.type_name for f in profile.filters] == ["context-length-aware"]  # it filters too
    assert profile.picker is not None
    assert profile.picker.type_name == "max-score-picker"


def test_a_profile_without_a_picker_reuses_the_configs() -> None:
    cfg = load_text(LLMD + "plugins:\n- type: queue-scorer\n- {type: random-picker, name: rnd}\n"
                           "schedulingProfiles:\n- name: p\n  plugins:\n  - pluginRef: queue-scorer\n")
    picker = cfg.scheduler.profiles[0].picker
    assert picker is not None
    assert picker.name == "rnd"


def test_unknown_parameters_warn_under_gies_api_version_and_fail_under_llm_ds() -> None:
    body = "plugins:\n- type: load-aware-scorer\n  parameters: {threshold: 5, treshold: 6}\n"
    cfg = load_text(GIE + body)
    assert any("['treshold'] ignored" in w for w in cfg.warnings)
    with pytest.raises(ConfigError, match=r"cfg.yaml:4: .*unknown parameter\(s\) \['treshold'\]"):
        load_text(LLMD + body, "cfg.yaml")


def test_parameters_upstream_never_reads_are_a_warning_in_both() -> None:
    cfg = load_text(LLMD + "plugins:\n- type: queue-scorer\n  parameters: {foo: 1}\n")
    assert any("'queue-scorer'" in w and "upstream ignores" in w for w in cfg.warnings)


def test_the_v1_5_saturation_detector_reference_and_llm_ds_flow_control_one() -> None:
    cfg = load_text(LLMD + "plugins:\n- {type: concurrency-detector, name: c, parameters: {maxConcurrency: 7}}\n"
                           "- {type: utilization-detector, name: u}\n"
                           "saturationDetector: {pluginRef: u}\nflowControl:\n  saturationDetector: {pluginRef: c}\n")
    assert cfg.saturation.type_name == "concurrency-detector"  # the newer field wins, as upstream
    assert cfg.saturation_name == "c"


def test_the_flow_control_section_is_ignored_with_the_gate_off_and_parsed_with_it_on() -> None:
    section = ("plugins:\n- {type: round-robin-fairness-policy, name: fair}\n"
               "flowControl:\n  maxRequests: 1k\n  priorityBands:\n  - {priority: 10, fairnessPolicyRef: fair}\n")
    off = load_text(LLMD + section)
    assert off.flow_control is None
    assert any("feature gate is off" in w for w in off.warnings)
    assert any("'fair' (round-robin-fairness-policy) has no effect" in w for w in off.warnings)
    with pytest.raises(ConfigError, match="feature gate 'flowControl' is not supported"):
        load_text(LLMD + "featureGates: [flowControl]\n" + section)
    on = load_text(LLMD + "featureGates: [flowControl]\n" + section, runs_flow_control=True)
    assert on.flow_control is not None
    assert on.flow_control.max_requests == 1000
    assert on.flow_control.band(10).fairness == "round-robin-fairness-policy"


def test_flow_control_errors_name_the_line() -> None:
    text = (LLMD + "featureGates: [flowControl]\nflowControl:\n  priorityBands:\n"
            "  - {priority: 1, orderingPolicyRef: nope}\n")
    with pytest.raises(ConfigError, match=r"^c.yaml:6: orderingPolicyRef: no plugin named 'nope'"):
        load_text(text, "c.yaml", runs_flow_control=True)
    with pytest.raises(ConfigError, match=r"^c.yaml:4: .*threshold must be in"):
        load_text(LLMD + "plugins:\n- {type: static-usage-limit-policy, parameters: {threshold: 2}}\n", "c.yaml")


def test_built_in_types_are_found_by_their_names() -> None:
    cfg = load_text(GIE + "plugins:\n- {type: single-profile-handler, name: h}\n- {type: openai-parser, name: o}\n"
                          "- {type: queue-scorer, name: q}\n"
                          "schedulingProfiles:\n- name: p\n  plugins: [{pluginRef: h}, {pluginRef: q}]\n"
                          "parser: {pluginRef: o}\n")
    assert [ws.scorer.name for ws in cfg.scheduler.profiles[0].scorers] == ["q"]
    assert cfg.parsers.names() == ["o", "passthrough-parser"]  # GIE's one parser saw every path


def test_an_unused_plugin_is_reported() -> None:
    cfg = load_text(LLMD + "plugins:\n- type: queue-scorer\n- type: kv-cache-utilization-scorer\n"
                           "schedulingProfiles:\n- name: p\n  plugins: [{pluginRef: queue-scorer}]\n")
    assert any("'kv-cache-utilization-scorer'" in w and "not used" in w for w in cfg.warnings)


def test_data_layer_settings_left_out_stay_none_for_the_flags() -> None:
    cfg = load_text(LLMD + "plugins:\n- type: metrics-data-source\n  parameters: {path: /m}\n")
    layer = cfg.data_layer
    assert (layer.scrape, layer.path, layer.scheme, layer.interval, layer.insecure_skip_verify) == (
        True, "/m", None, None, None)


@pytest.mark.parametrize(("params", "needle"), [
    ("{scheme: ftp}", "must be one of"),
    ("{port: 70000}", "invalid port"),
    ("{interval: soon}", "duration"),
    ("{clientCertPath: /c.pem}", "set together"),
    ("{path: metrics}", "start with '/'"),
])
def test_bad_metrics_data_source_parameters(params: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        load_text(LLMD + f"plugins:\n- type: metrics-data-source\n  parameters: {params}\n")


def test_an_engine_default_must_exist() -> None:
    with pytest.raises(ConfigError, match="defaultEngine 'tgi' not found"):
        load_text(LLMD + "plugins:\n- type: core-metrics-extractor\n  parameters: {defaultEngine: tgi}\n")


def test_describe_prints_the_resolved_profile_with_defaults() -> None:
    cfg = load_text(LLMD + "plugins:\n- type: load-aware-scorer\n- type: token-load-scorer\n", "c.yaml")
    text = describe(cfg)
    assert text.startswith("# c.yaml: loads\napiVersion: llm-d.ai/v1alpha1\n")
    assert "  - load-aware-scorer  weight: 1\n      threshold: 128\n" in text
    assert "queueThresholdTokens: 4194304" in text
    assert "- inflight-load-producer\n" in text  # created for token-load-scorer, as upstream does
    assert "  type: utilization-detector\n  queueDepthThreshold: 5\n" in text
    assert "parsers: [openai-parser, anthropic-parser, vllmhttp-parser, passthrough-parser]" in text


def test_response_headers_come_from_the_plugins_that_add_them() -> None:
    cfg = load_text(LLMD + "plugins:\n- type: session-affinity-scorer\n- type: destination-endpoint-served-verifier\n")
    r = request()
    r.served_endpoint = "10.0.0.1:1"
    headers = dict(cfg.scheduler.response_headers(r, endpoint(1)))
    assert set(headers) == {"x-session-token", "x-conformance-test-served-endpoint"}
