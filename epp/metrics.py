"""The EPP's own Prometheus metrics, with the Go EPP's names and labels.

Dashboards and alerts built for the Go EPP keep working: the names below are
GIE's (inference_objective_*, inference_pool_*, inference_extension_*). The request
path calls the recording methods (`picked`, `rejected`, `finished`, ...) and never
touches labels itself. Model-server metrics, which epp reads, are the data layer's
(`epp.datalayer`).
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from epp import errors
from epp.datastore import Datastore, Endpoint
from epp.requests import INFERENCE_KINDS, InferenceRequest
from epp.usage import Usage

_LATENCY = (
    0.005, 0.025, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 1.25, 1.5, 2, 3, 4, 5, 6, 8, 10, 15, 20, 30, 45, 60,
    120, 180, 240, 300, 360, 480, 600, 900, 1200, 1800, 2700, 3600,
)
_SCHED = (0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1)
_REQ_SIZES = tuple(float(2**i) for i in range(6, 31))
_RESP_SIZES = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32778, 65536)
_TOKENS = tuple(float(2**i) for i in range(0, 18))
_MODEL = ("model_name", "target_model_name")


class EppMetrics:
    """All metrics on one registry (one per server, so tests can run several)."""

    def __init__(self, pool_name: str = "default") -> None:
        self.registry = r = CollectorRegistry()
        self.pool_name = pool_name
        self.request_total = Counter(
            "inference_objective_request_total",
            "Counter of inference objective requests broken out for each model and target model.",
            (*_MODEL, "priority"), registry=r,
        )
        self.request_error_total = Counter(
            "inference_objective_request_error_total",
            "Counter of inference objective requests errors broken out for each model and target model.",
            (*_MODEL, "error_code"), registry=r,
        )
        self.request_duration = Histogram(
            "inference_objective_request_duration_seconds",
            "Inference objective response latency distribution in seconds for each model and target model.",
            _MODEL, buckets=_LATENCY, registry=r,
        )
        self.request_ttft = Histogram(
            "inference_objective_request_ttft_seconds",
            "Inference model TTFT distribution in seconds for each model and target model.",
            _MODEL, buckets=_LATENCY, registry=r,
        )
        self.request_sizes = Histogram(
            "inference_objective_request_sizes",
            "Inference objective requests size distribution in bytes for each model and target model.",
            _MODEL, buckets=_REQ_SIZES, registry=r,
        )
        self.response_sizes = Histogram(
            "inference_objective_response_sizes",
            "Inference objective responses size distribution in bytes for each model and target model.",
            _MODEL, buckets=_RESP_SIZES, registry=r,
        )
        self.input_tokens = Histogram(
            "inference_objective_input_tokens",
            "Inference objective input token count distribution for requests in each model.",
            _MODEL, buckets=_TOKENS, registry=r,
        )
        self.output_tokens = Histogram(
            "inference_objective_output_tokens",
            "Inference objective output token count distribution for requests in each model.",
            _MODEL, buckets=_TOKENS, registry=r,
        )
        self.running_requests = Gauge(
            "inference_objective_running_requests",
            "Inference objective number of running requests in each model.",
            ("model_name",), registry=r,
        )
        self.pool_avg_kv = Gauge(
            "inference_pool_average_kv_cache_utilization",
            "The average kv cache utilization for an inference server pool.", ("name",), registry=r,
        )
        self.pool_avg_queue = Gauge(
            "inference_pool_average_queue_size",
            "The average number of requests pending in the model server queue.", ("name",), registry=r,
        )
        self.pool_avg_running = Gauge(
            "inference_pool_average_running_requests",
            "The average number of running requests across model servers in the pool.", ("name",), registry=r,
        )
        self.pool_ready_pods = Gauge(
            "inference_pool_ready_pods", "The number of ready pods in the inference server pool.",
            ("name",), registry=r,
        )
        self.scheduler_e2e = Histogram(
            "inference_extension_scheduler_e2e_duration_seconds",
            "End-to-end scheduling latency distribution in seconds.", buckets=_SCHED, registry=r,
        )
        self.scheduler_attempts = Counter(
            "inference_extension_scheduler_attempts_total", "Total number of scheduling attempts.",
            ("status", "target_model_name", "pod_name", "namespace", "port"), registry=r,
        )
        self.model_rewrites = Counter(
            "inference_extension_model_rewrite_decisions_total", "Total number of inference model rewrite decisions.",
            ("model_rewrite_name", "model_name", "target_model"), registry=r,
        )
        self.prefix_indexer_size = Gauge(
            "inference_extension_prefix_indexer_size", "Size of the prefix indexer.", registry=r,
        )
        self.info = Gauge(
            "inference_extension_info", "General information of the current build of Inference Extension.",
            ("commit", "build_ref"), registry=r,
        )
        self.info.labels(commit="", build_ref="epp").set(1)

    # --- recording, called by the request path ------------------------------------
    def picked(self, req: InferenceRequest, body_size: int) -> None:
        """An inference request got its pick and goes to a server."""
        if req.kind in INFERENCE_KINDS:
            self.request_total.labels(req.model, req.target_model, str(req.priority)).inc()
            self.request_sizes.labels(req.model, req.target_model).observe(body_size)
            self.running_requests.labels(req.model).inc()

    def rejected(self, req: InferenceRequest, code: str) -> None:
        """A request ended with an error of epp's instead of a pick."""
        self.request_error_total.labels(req.model, req.target_model or req.model, code).inc()

    def finished(self, req: InferenceRequest, usage: Usage, received_at: float) -> None:
        """A picked request's response ended (or its stream did): once per `picked` request."""
        if req.kind not in INFERENCE_KINDS or req.parsed is None:
            return  # only parsed inference requests were counted in `picked`
        model, target = req.model, req.target_model
        self.running_requests.labels(model).dec()
        if not usage.status:
            return  # ended before any response: nothing more to record
        if usage.status >= 400:
            self.request_error_total.labels(model, target, errors.MODEL_SERVER_ERROR).inc()
            return
        self.request_duration.labels(model, target).observe(time.monotonic() - received_at)
        if usage.first_byte_at:
            self.request_ttft.labels(model, target).observe(usage.first_byte_at - received_at)
        self.response_sizes.labels(model, target).observe(usage.size)
        if usage.prompt_tokens is not None:
            self.input_tokens.labels(model, target).observe(usage.prompt_tokens)
        if usage.completion_tokens is not None:
            self.output_tokens.labels(model, target).observe(usage.completion_tokens)

    def scheduled(self, req: InferenceRequest, ep: Endpoint, seconds: float) -> None:
        self.scheduler_e2e.observe(seconds)
        self.scheduler_attempts.labels("success", req.target_model, ep.name, "", str(ep.port)).inc()

    def rewritten(self, rewrite: str, req: InferenceRequest) -> None:
        self.model_rewrites.labels(rewrite, req.model, req.target_model).inc()

    # --- serving and periodic gauges -------------------------------------------------
    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        """Expose /metrics over HTTP from a background thread."""
        start_http_server(port, addr=addr, registry=self.registry)

    def update_pool(self, datastore: Datastore) -> None:
        """Refresh the pool-level gauges (called every few seconds, not per request)."""
        ready = datastore.ready_endpoints()
        now = datastore.now()
        fresh = [m for m in (ep.fresh_metrics(now, datastore.staleness) for ep in ready) if m is not None]
        name = self.pool_name
        self.pool_ready_pods.labels(name).set(len(ready))
        if fresh:
            n = len(fresh)
            self.pool_avg_kv.labels(name).set(sum(m.kv_usage for m in fresh) / n)
            self.pool_avg_queue.labels(name).set(sum(m.waiting for m in fresh) / n)
            self.pool_avg_running.labels(name).set(sum(m.running for m in fresh) / n)
