"""The data layer's part of an EndpointPickerConfig: how to scrape the model servers, and their metric names.

Upstream configures its scraper with two plugins: `metrics-data-source` (scheme, path, port,
TLS, interval) and `core-metrics-extractor` (metric names per engine). epp has one scraper;
these settings reach it through `DataLayerConfig`. A field left `None` was not set by the
config: the flag's value (or its default) applies, as upstream ranks them: config, flag, default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from epp.datalayer.engines import ENGINE_LABEL, EngineMapping, MetricSpec, parse_spec
from epp.errors import ConfigError
from epp.scheduling.params import Params

# llm-d-router's label naming a pod's engine; GIE's (epp's ENGINE_LABEL) is read when it is absent.
LLMD_ENGINE_LABEL = "llm-d.ai/engine-type"
METRICS_DATA_SOURCE = "metrics-data-source"
CORE_METRICS_EXTRACTOR = "core-metrics-extractor"
ENDPOINT_NOTIFICATION_SOURCE = "endpoint-notification-source"
# Engines upstream's extractor knows without configuration.
BUILT_IN_ENGINES = ("vllm", "sglang", "trtllm-serve", "triton-tensorrt-llm", "triton")

_SPEC_FIELDS = {
    "queuedRequestsSpec": "queue", "runningRequestsSpec": "running", "kvUsageSpec": "kv_usage",
    "loraSpec": "lora", "cacheInfoSpec": "cache_info", "cacheBlockSizeSpec": "cache_block_size",
    "cacheNumBlocksSpec": "cache_num_blocks",
}


@dataclass(frozen=True, slots=True)
class EngineMetrics:
    """One engine's metric specs (`name` or `name{label=value}`); "" leaves that signal unscraped."""

    name: str
    queue: str = ""
    running: str = ""
    kv_usage: str = ""
    lora: str = ""
    cache_info: str = ""
    cache_block_size_label: str = "block_size"
    cache_num_blocks_label: str = "num_gpu_blocks"
    cache_block_size: str = ""
    cache_num_blocks: str = ""


@dataclass(frozen=True, slots=True)
class DataLayerConfig:
    """What the scraper must honour; `None`: not set by the config (the flag or default applies)."""

    scrape: bool = True  # False: the config turned metrics collection off
    legacy_metrics: bool = False  # the enableLegacyMetrics gate: the flags alone configure scraping
    scheme: str | None = None
    path: str | None = None
    port: int | None = None  # overrides the endpoints' port for scraping
    insecure_skip_verify: bool | None = None
    ca_cert_path: str | None = None
    client_cert_path: str | None = None
    client_key_path: str | None = None
    interval: float | None = None  # seconds; rounded to a multiple of --refresh-metrics-interval
    engine_label_key: str | None = None
    default_engine: str | None = None
    engines: tuple[EngineMetrics, ...] = ()  # these replace the built-in engine of the same name

    def describe(self) -> dict[str, Any]:
        if not self.scrape:
            return {"scrape": False}
        if self.legacy_metrics:
            return {"legacyMetrics": True}
        out: dict[str, Any] = {}
        for key, value in (("scheme", self.scheme), ("path", self.path), ("port", self.port),
                           ("insecureSkipVerify", self.insecure_skip_verify), ("caCertPath", self.ca_cert_path),
                           ("clientCertPath", self.client_cert_path), ("clientKeyPath", self.client_key_path),
                           ("interval", None if self.interval is None else f"{self.interval:g}s"),
                           ("engineLabelKey", self.engine_label_key), ("defaultEngine", self.default_engine)):
            if value is not None:
                out[key] = value
        if self.engines:
            out["engineConfigs"] = [e.name for e in self.engines]
        return out or {"scrape": True}


@dataclass(frozen=True, slots=True)
class ScrapeSettings:
    """What the scraper does, the config's settings over the flags'."""

    scrape: bool
    scheme: str
    path: str
    port: int | None
    verify_tls: bool
    ca_cert_path: str | None
    client_cert_path: str | None
    client_key_path: str | None
    interval: float


def scrape_settings(layer: DataLayerConfig, *, scheme: str, path: str, insecure_skip_verify: bool,
                    refresh_interval: float) -> ScrapeSettings:
    """The config's values where it gives them, else the flags' (upstream: config, flag, default).
    The interval is rounded to a whole number of `refresh_interval` ticks, at least one."""
    if layer.legacy_metrics:
        layer = DataLayerConfig(scrape=layer.scrape)
    interval = refresh_interval
    if layer.interval is not None and refresh_interval > 0:
        interval = max(1, round(layer.interval / refresh_interval)) * refresh_interval
    skip = insecure_skip_verify if layer.insecure_skip_verify is None else layer.insecure_skip_verify
    return ScrapeSettings(layer.scrape, layer.scheme or scheme, layer.path or path, layer.port, not skip,
                          layer.ca_cert_path, layer.client_cert_path, layer.client_key_path, interval)


def engine_of(labels: dict[str, str], layer: DataLayerConfig, default: str) -> str:
    """The engine a pod's labels name (the config's label key, else llm-d-router's, else GIE's),
    or the config's default engine, else `default` (the --engine-type flag)."""
    keys = (layer.engine_label_key,) if layer.engine_label_key else (LLMD_ENGINE_LABEL, ENGINE_LABEL)
    for key in keys:
        engine = labels.get(key)
        if engine:
            return engine
    return layer.default_engine or default


def engine_mappings(layer: DataLayerConfig, base: dict[str, EngineMapping]) -> dict[str, EngineMapping]:
    """`base` (epp's engines, flags applied) with the config's engines added or replacing theirs."""
    out = dict(base)
    for engine in layer.engines:
        out[engine.name] = EngineMapping(
            queue=_specs(engine.queue), running=_specs(engine.running), kv_usage=_specs(engine.kv_usage),
            lora_info=_specs(engine.lora)).with_names()
    return out


def _specs(text: str) -> tuple[MetricSpec, ...]:
    return (parse_spec(text),) if text else ()


@dataclass(frozen=True, slots=True)
class MetricsSource:
    """A metrics-data-source's parameters (what was given; None: not given)."""

    scheme: str | None = None
    path: str | None = None
    port: int | None = None
    insecure_skip_verify: bool | None = None
    ca_cert_path: str | None = None
    client_cert_path: str | None = None
    client_key_path: str | None = None
    interval: float | None = None


@dataclass(frozen=True, slots=True)
class MetricsExtractor:
    engine_label_key: str | None = None
    default_engine: str | None = None
    engines: tuple[EngineMetrics, ...] = ()


def metrics_source(params: Params) -> MetricsSource:
    where = f"plugin {params.plugin_type!r}"
    scheme = params.str("scheme", "", choices=("http", "https")) if params.has("scheme") else None
    path = params.str("path", "/metrics") if params.has("path") else None
    if path is not None and not path.startswith("/"):
        raise ConfigError(f"{where}: parameter 'path' must start with '/', got {path!r}")
    port = params.optional_int("port")
    if port is not None and not 1 <= port <= 65535:
        raise ConfigError(f"{where}: invalid port {port}: must be between 1 and 65535")
    skip = params.bool("insecureSkipVerify", True) if params.has("insecureSkipVerify") else None
    ca = params.str("caCertPath", "", empty=True) or None
    cert = params.str("clientCertPath", "", empty=True) or None
    key = params.str("clientKeyPath", "", empty=True) or None
    if (cert is None) != (key is None):
        raise ConfigError(f"{where}: clientCertPath and clientKeyPath are set together")
    interval = None
    if params.has("interval"):
        if params.str("interval", "", empty=True, peek=True) == "":
            params.raw("interval")  # "": every base tick, the scraper's own interval
        else:
            interval = params.duration("interval", 0.0)
            if interval <= 0:
                raise ConfigError(f"{where}: parameter 'interval' must be a positive duration")
    params.done()
    return MetricsSource(scheme, path, port, skip, ca, cert, key, interval)


def metrics_extractor(params: Params) -> MetricsExtractor:
    where = f"plugin {params.plugin_type!r}"
    label = params.str("engineLabelKey", "", empty=True) or None
    default = params.str("defaultEngine", "", empty=True) or None
    engines: list[EngineMetrics] = []
    for i, spec in enumerate(params.list("engineConfigs")):
        if not isinstance(spec, dict):
            raise ConfigError(f"{where}: engineConfigs[{i}] must be a mapping")
        engines.append(_engine(params.sub(f"engineConfigs[{i}]", spec), where, i))
    params.done()
    names = [e.name for e in engines]
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}: engineConfigs name an engine twice: {names}")
    if default is not None and default not in {*names, *BUILT_IN_ENGINES}:
        raise ConfigError(f"{where}: defaultEngine {default!r} not found in engineConfigs")
    return MetricsExtractor(label, default, tuple(engines))


def _engine(p: Params, where: str, i: int) -> EngineMetrics:
    name = p.str("name", "", empty=True)
    if not name:
        raise ConfigError(f"{where}: engineConfigs[{i}]: engine config name cannot be empty")
    if name == "default":
        raise ConfigError(f"{where}: engineConfigs[{i}]: engine config name cannot be 'default' (reserved)")
    if p.list("customMetrics"):
        raise ConfigError(f"{where}: engineConfigs[{i}].customMetrics: custom metrics feed upstream's "
                          "endpoint-attribute plugins, which epp does not have")
    fields: dict[str, str] = {}
    for key, attr in _SPEC_FIELDS.items():
        text = p.str(key, "", empty=True)
        if text:
            try:
                parse_spec(text)
            except ValueError as e:
                raise ConfigError(f"{where}: engineConfigs[{i}].{key}: {e}") from None
        fields[attr] = text
    block_label = p.str("cacheBlockSizeLabelName", "", empty=True) or "block_size"
    blocks_label = p.str("cacheNumBlocksLabelName", "", empty=True) or "num_gpu_blocks"
    p.done()
    if fields["cache_info"] or fields["cache_block_size"] or fields["cache_num_blocks"]:
        p.warnings.append(f"{where}: engineConfigs[{i}] ({name}): the cache configuration specs have no effect: "
                          "epp's prefix index takes its block size from blockSizeTokens")
    return EngineMetrics(name, cache_block_size_label=block_label, cache_num_blocks_label=blocks_label, **fields)
