"""Upstream plugin types epp does not run, each with why and what to use instead.

A config naming one fails at start-up with
`file:line: plugin type X is not supported by epp (why; what to use instead)`,
never loads with it silently dropped. Flow control's policy types are different: epp.flowcontrol
reads them; while flow control is off upstream builds them and leaves them unused, so they load
with a warning.
"""

from __future__ import annotations

PD_LATER = "prefill/decode disaggregation is later work in epp: it runs one scheduling profile per request"
LATENCY = "needs upstream's latency predictor sidecar, which epp does not run"
BURST = "co-locating bursts of prompt-sharing requests is not implemented in epp"
MULTICLUSTER = "multi-cluster routing is not supported by epp"
ATTRIBUTES = "reads endpoint attributes from custom metric extraction, which epp does not have"

# type -> (why, what to use instead)
REFUSED: dict[str, tuple[str, str]] = {
    # prefill/decode (and encode) disaggregation, and what only it uses
    "disagg-profile-handler": (PD_LATER, "single-profile-handler"),
    "pd-profile-handler": (PD_LATER, "single-profile-handler"),
    "disagg-headers-handler": (PD_LATER, "single-profile-handler"),
    "prefill-header-handler": (PD_LATER, "single-profile-handler"),
    "prefill-filter": (PD_LATER, "label-selector-filter on llm-d.ai/role to keep a pool's serving pods"),
    "decode-filter": (PD_LATER, "label-selector-filter on llm-d.ai/role to keep a pool's serving pods"),
    "encode-filter": (PD_LATER, "label-selector-filter on llm-d.ai/role"),
    "always-disagg-pd-decider": (PD_LATER, "remove it"),
    "prefix-based-pd-decider": (PD_LATER, "remove it"),
    "always-disagg-multimodal-decider": (PD_LATER, "remove it"),
    "disaggregatedset-rollout-screener": (PD_LATER, "remove it"),
    "topology-affinity-filter": (PD_LATER + " (it matches a prefill pod's topology)", "remove it"),
    "topology-affinity-scorer": (PD_LATER + " (it matches a prefill pod's topology)", "remove it"),
    "topology-extractor": (PD_LATER + " (it feeds the topology plugins)", "remove it"),
    # several profiles per request
    "data-parallel-profile-handler": (
        "epp runs one scheduling profile per request",
        "single-profile-handler; a pool with several target ports already gets one endpoint per rank"),
    "header-profile-handler": ("epp runs one scheduling profile per request",
                               "single-profile-handler, with one profile"),
    # the latency predictor
    "predicted-latency-producer": (LATENCY, "prefill-load-scorer estimates the time to first token from the "
                                   "prompt tokens queued at each server"),
    "latency-scorer": (LATENCY, "prefill-load-scorer"),
    "slo-headroom-tier-filter": (LATENCY, "prefill-load-scorer"),
    "latency-slo-admitter": (LATENCY, "shedding of sheddable requests by utilization-detector"),
    "probabilistic-admitter": ("admitter plugins are later work in epp",
                               "shedding of sheddable requests by utilization-detector"),
    # exact prefix caches
    "burst-prefix-cache-producer": (BURST, "approx-prefix-cache-producer"),
    "p2p-source-producer": ("KV-cache transfer between servers is not supported by epp", "remove it"),
    "mm-embeddings-cache-producer": ("multimodal embedding caches are not tracked by epp", "remove it"),
    "mm-embeddings-cache-scorer": ("multimodal embedding caches are not tracked by epp", "prefix-cache-scorer"),
    # multi-cluster
    "multicluster-session-affinity-filter": (MULTICLUSTER, "session-affinity-filter"),
    "multicluster-queue-scorer": (MULTICLUSTER, "queue-scorer"),
    "multicluster-kv-cache-utilization-scorer": (MULTICLUSTER, "kv-cache-utilization-scorer"),
    "multicluster-prefix-cache-scorer": (MULTICLUSTER, "prefix-cache-scorer"),
    "multicluster-approx-prefix-cache-producer": (MULTICLUSTER, "approx-prefix-cache-producer"),
    "multicluster-metrics-data-source": (MULTICLUSTER, "metrics-data-source"),
    "multicluster-metrics-extractor": (MULTICLUSTER, "core-metrics-extractor"),
    "multicluster-file-discovery": (MULTICLUSTER, "--pool-file"),
    # the data layer beyond the model servers' metrics
    "file-discovery": ("epp reads endpoints from files with its own flag", "--pool-file FILE (manifests)"),
    "models-data-source": ("epp does not scrape the servers' /v1/models", "remove it"),
    "models-data-extractor": ("epp does not scrape the servers' /v1/models", "remove it"),
    "dcgm-data-source": ("epp does not scrape GPU (DCGM) metrics", "remove it"),
    "dcgm-extractor": ("epp does not scrape GPU (DCGM) metrics", "remove it"),
    "k8s-notification-source": ("epp has no extractors for watched Kubernetes objects; it watches its pool "
                                "itself", "remove it"),
    "endpoint-attribute-filter": (ATTRIBUTES, "utilization-filter on the standard metrics"),
    "endpoint-attribute-scorer": (ATTRIBUTES, "queue-scorer, kv-cache-utilization-scorer"),
    # request handling
    "vllmgrpc-parser": ("epp parses HTTP JSON requests, not gRPC", "openai-parser"),
    "vertexai-parser": ("epp parses HTTP JSON requests, not gRPC", "openai-parser"),
    "request-attribute-reporter": ("CEL expressions over the response are not evaluated by epp",
                                   "epp's token metrics (inference_objective_input_tokens, ...output_tokens)"),
    "agent-identity": ("request attributes from agent identities are not supported by epp", "remove it"),
    "session-id-producer": ("request attributes are not supported by epp",
                            "session-affinity-scorer/-filter with sessionIdConfig.sources: [{header: ...}]"),
}

# Flow control's policies: loaded and unused while flow control is off, as upstream does.
FLOW_CONTROL_POLICIES = frozenset({
    "fcfs-ordering-policy", "edf-ordering-policy", "slo-deadline-ordering-policy",
    "global-strict-fairness-policy", "round-robin-fairness-policy", "program-aware-fairness",
    "static-usage-limit-policy", "priority-holdback-policy", "soft-reflective-ceiling-policy",
    "eviction-sheddable-filter", "sheddable-eviction-filter",
    "eviction-priority-then-time-ordering", "priority-then-time-eviction-order-policy",
})

FLOW_CONTROL_LATER = ("flow control (queueing under saturation, priority bands, fairness) is not enabled in epp "
                      "yet; without it sheddable requests get 429 while the pool is saturated, as upstream does "
                      "with the flowControl feature gate off")


def refusal(type_name: str) -> str | None:
    """The error for a refused type, or None if epp runs it."""
    entry = REFUSED.get(type_name)
    if entry is None:
        return None
    why, instead = entry
    return f"plugin type {type_name!r} is not supported by epp ({why}; instead: {instead})"
