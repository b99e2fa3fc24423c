"""The data layer's settings from a config, over the flags, as the scraper gets them."""

import pytest

from epp.datalayer.engines import ENGINES, parse_spec
from epp.scheduling.datalayer_config import DataLayerConfig, EngineMetrics, engine_mappings, engine_of, scrape_settings
from epp.scheduling.picker_config import load_text

FLAGS = {"scheme": "http", "path": "/metrics", "insecure_skip_verify": True, "refresh_interval": 0.05}


def test_the_config_wins_over_the_flags_and_the_interval_rounds_to_ticks() -> None:
    layer = DataLayerConfig(path="/prometheus/metrics", scheme="https", insecure_skip_verify=False, interval=0.12)
    s = scrape_settings(layer, **FLAGS)
    assert (s.path, s.scheme, s.verify_tls) == ("/prometheus/metrics", "https", True)
    assert s.interval == pytest.approx(0.1)
    flags_only = scrape_settings(DataLayerConfig(), **FLAGS)
    assert (flags_only.path, flags_only.scheme, flags_only.verify_tls, flags_only.interval) == (
        "/metrics", "http", False, 0.05)


def test_legacy_metrics_leaves_the_flags_alone() -> None:
    s = scrape_settings(DataLayerConfig(legacy_metrics=True, path="/x"), **FLAGS)
    assert s.path == "/metrics"


def test_engine_labels_llm_d_first_then_gie_then_the_default() -> None:
    layer = DataLayerConfig(default_engine="sglang")
    assert engine_of({"llm-d.ai/engine-type": "vllm", "inference.networking.k8s.io/engine-type": "x"}, layer,
                     "vllm") == "vllm"
    assert engine_of({"inference.networking.k8s.io/engine-type": "trtllm-serve"}, layer, "vllm") == "trtllm-serve"
    assert engine_of({}, layer, "vllm") == "sglang"
    assert engine_of({"mine": "a"}, DataLayerConfig(engine_label_key="mine"), "vllm") == "a"


def test_configured_engines_add_to_and_replace_the_built_in_ones() -> None:
    layer = DataLayerConfig(engines=(EngineMetrics("vllm", queue="q_waiting", running="q_running"),
                                     EngineMetrics("mine", kv_usage="cache{kind=frac}")))
    out = engine_mappings(layer, dict(ENGINES))
    assert out["vllm"].queue == (parse_spec("q_waiting"),)
    assert out["vllm"].kv_usage == ()  # not given: not scraped, as upstream
    assert out["mine"].kv_usage == (parse_spec("cache{kind=frac}"),)
    assert out["sglang"] is ENGINES["sglang"]


def test_a_config_reaches_the_scraper_settings() -> None:
    cfg = load_text("apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n"
                    "- type: metrics-data-source\n  parameters: {path: /m, interval: 500ms, port: 9000}\n"
                    "- type: core-metrics-extractor\n  parameters:\n    engineConfigs:\n"
                    "    - {name: e, queuedRequestsSpec: w, cacheInfoSpec: i}\n")
    s = scrape_settings(cfg.data_layer, **FLAGS)
    assert (s.path, s.port, s.interval) == ("/m", 9000, pytest.approx(0.5))
    assert [e.name for e in cfg.data_layer.engines] == ["e"]
    assert any("cache configuration specs have no effect" in w for w in cfg.warnings)
