"""Which Prometheus series carry each signal, per model-server engine.

A spec is a metric name, optionally with label matchers: `name{label=value}`
(Triton's TensorRT-LLM backend reports several signals as one family told apart by a label). Engines are
data; an endpoint's `inference.networking.k8s.io/engine-type` label or the
`--engine-type` flag picks one, and GIE's metric-name flags override single specs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any

ENGINE_LABEL = "inference.networking.k8s.io/engine-type"

_SPEC = re.compile(r"^\s*([A-Za-z_:][A-Za-z0-9_:]*)\s*(?:\{(.*)\})?\s*$")


@dataclass(frozen=True, slots=True)
class MetricSpec:
    name: str
    labels: tuple[tuple[str, str], ...] = ()

    def matches(self, labels: dict[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in self.labels)


def parse_spec(text: str) -> MetricSpec:
    """'vllm:num_requests_waiting' or 'nv_trt_llm_request_metrics{request_type=waiting}'."""
    m = _SPEC.match(text)
    if not m:
        raise ValueError(f"invalid metric spec {text!r}: expected name or name{{label=value,...}}")
    labels = []
    if m.group(2):
        for part in m.group(2).split(","):
            k, sep, v = part.partition("=")
            if not sep or not k.strip():
                raise ValueError(f"invalid label matcher {part!r} in metric spec {text!r}")
            labels.append((k.strip(), v.strip().strip('"')))
    return MetricSpec(m.group(1), tuple(labels))


def _specs(*texts: str) -> tuple[MetricSpec, ...]:
    return tuple(parse_spec(t) for t in texts)


@dataclass(frozen=True, slots=True)
class EngineMapping:
    """Each signal lists specs in order of preference (newer name first)."""

    queue: tuple[MetricSpec, ...]
    running: tuple[MetricSpec, ...]
    kv_usage: tuple[MetricSpec, ...]
    lora_info: tuple[MetricSpec, ...] = ()
    # The KV cache's configuration (prefix producers' autoTune): an info gauge whose labels carry the
    # block size and block count (vLLM, SGLang), or one gauge for each (TensorRT-LLM).
    cache_info: tuple[MetricSpec, ...] = ()
    cache_block_size_label: str = "block_size"
    cache_num_blocks_label: str = "num_gpu_blocks"
    cache_block_size: tuple[MetricSpec, ...] = ()
    cache_num_blocks: tuple[MetricSpec, ...] = ()
    names: frozenset[str] = field(default=frozenset(), compare=False)

    def with_names(self) -> EngineMapping:
        all_specs = (
            self.queue + self.running + self.kv_usage + self.lora_info + self.cache_info + self.cache_block_size
            + self.cache_num_blocks
        )
        return replace(self, names=frozenset(s.name for s in all_specs))


# As upstream's built-in engine configs (llm-d-router v0.10 and GIE v1.5 name the same series).
ENGINES: dict[str, EngineMapping] = {
    "vllm": EngineMapping(
        queue=_specs("vllm:num_requests_waiting"),
        running=_specs("vllm:num_requests_running"),
        kv_usage=_specs("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
        lora_info=_specs("vllm:lora_requests_info"),
        cache_info=_specs("vllm:cache_config_info"),
    ).with_names(),
    "sglang": EngineMapping(
        queue=_specs("sglang:num_queue_reqs"),
        running=_specs("sglang:num_running_reqs"),
        kv_usage=_specs("sglang:token_usage"),
        cache_info=_specs("sglang:cache_config_info"),
        cache_block_size_label="page_size",
        cache_num_blocks_label="num_pages",
    ).with_names(),
    # TensorRT-LLM's own server (trtllm-serve).
    "trtllm-serve": EngineMapping(
        queue=_specs("trtllm_num_requests_waiting"),
        running=_specs("trtllm_num_requests_running"),
        kv_usage=_specs("trtllm_kv_cache_utilization"),
        cache_block_size=_specs("trtllm_kv_cache_tokens_per_block"),
        cache_num_blocks=_specs("trtllm_kv_cache_max_blocks"),
    ).with_names(),
    # Triton Inference Server with the TensorRT-LLM backend.
    "triton-tensorrt-llm": EngineMapping(
        queue=_specs("nv_trt_llm_request_metrics{request_type=waiting}"),
        running=_specs("nv_trt_llm_request_metrics{request_type=scheduled}"),
        kv_usage=_specs("nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=fraction}"),
        cache_block_size=_specs("nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=tokens_per}"),
        cache_num_blocks=_specs("nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=max}"),
    ).with_names(),
    # Triton serving other models: queue and executions only (no KV cache).
    "triton": EngineMapping(
        queue=_specs("nv_inference_pending_request_count"),
        running=_specs("nv_inference_exec_count"),
        kv_usage=(),
    ).with_names(),
}


def with_overrides(
    base: EngineMapping,
    *,
    queue: str | None = None,
    running: str | None = None,
    kv_usage: str | None = None,
    lora_info: str | None = None,
    cache_info: str | None = None,
) -> EngineMapping:
    """Apply GIE's --total-queued-requests-metric style flags (--cache-info-metric: `cache_info`)."""
    changes: dict[str, Any] = {}
    for key, value in (
        ("queue", queue), ("running", running), ("kv_usage", kv_usage),
        ("lora_info", lora_info), ("cache_info", cache_info),
    ):
        if value:
            changes[key] = _specs(value)
        elif value == "" and key == "lora_info":
            changes[key] = ()  # as the Go EPP: an empty LoRA metric name turns LoRA scraping off
    return replace(base, **changes).with_names() if changes else base
