"""The EPP's own Prometheus metrics, under both upstream name sets, with upstream's labels and buckets.

Dashboards and alerts built for either Go EPP keep working: every series is emitted as
llm-d-router v0.10 names it (`llm_d_epp_*`, labelled with the fairness id and priority) and
as GIE v1.5 names it (`inference_objective_*`, `inference_pool_*`, `inference_extension_*`).
The request path calls the recording methods (`picked`, `rejected`, `finished`,
`scheduled`, ...) and never touches labels: each request's label children are looked up
once per distinct (model, target model, fairness id, priority) and kept. Client-supplied
label values (model names, fairness ids) are capped at 1000 distinct values each, the rest
counted under `other`, and cut to 128 characters. Model-server metrics, which epp reads,
are the data layer's (`epp.datalayer`).
"""

from __future__ import annotations

import math
import threading
import time
from bisect import bisect_left
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from epp import errors
from epp.datastore import Datastore, Endpoint
from epp.requests import INFERENCE_KINDS, InferenceRequest
from epp.usage import Usage

LLMD = "llm_d_epp_"
MAX_LABEL_VALUES = 1000
OVERFLOW_LABEL = "other"
MAX_LABEL_LENGTH = 128
_SERIES_CACHE_LIMIT = 20000

# --- upstream's buckets ----------------------------------------------------------------------
_LATENCY = (0.005, 0.025, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 1.25, 1.5, 2, 3, 4, 5, 6, 8, 10, 15, 20, 30, 45, 60,
            120, 180, 240, 300, 360, 480, 600, 900, 1200, 1800, 2700, 3600)
_TTFT = _LATENCY[:24]  # llm-d-router's TTFT: up to 120 s
_REQ_SIZES = tuple(float(2**i) for i in range(6, 31))
_RESP_SIZES = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32778, 65536)
_IN_TOKENS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32778, 65536, 131072, 262144, 524288,
              1048576)
_OUT_TOKENS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
_NTPOT = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
_TPOT = (0.0005, 0.00205, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.125, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1, 2)
_GIE_TPOT = (0.0005, 0.00205, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.125, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1,
             1.5, 2, 3, 4.5, 6, 12, 18, 24, 30, 36, 48, 60, 90, 120, 180, 270, 360)
_ITL = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2)
_FAST = (0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1)
_REQ_PROCESSING = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.015, 0.025, 0.04, 0.06, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_RESP_PROCESSING = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
_QUEUE_WAIT = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_HIT_RATIO = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
_HIT_BYTES = (0, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)

_MODEL = ("model_name", "target_model_name")
_REQUEST = (*_MODEL, "fairness_id", "priority")
_FLOW = ("fairness_id", "priority", "inference_pool", *_MODEL)


class BoundedLabel:
    """A client-supplied label's values: the first `limit` distinct ones kept, the rest `other`.

    Once admitted a value always maps to itself, so paired updates (running +1 / -1) balance.
    Pinned values (models named by rewrite rules) never count against the cap.
    """

    def __init__(self, limit: int = MAX_LABEL_VALUES) -> None:
        self.limit = limit
        self.seen: set[str] = set()
        self.pinned: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, value: str) -> str:
        if len(value) > MAX_LABEL_LENGTH:
            value = value[:MAX_LABEL_LENGTH]
        if value in self.seen or value in self.pinned or not value:
            return value
        with self._lock:
            if len(self.seen) >= self.limit:
                return OVERFLOW_LABEL
            self.seen.add(value)
        return value

    def pin(self, value: str) -> None:
        self.pinned.add(value[:MAX_LABEL_LENGTH])


def observe_all(histogram: Any, values: list[float]) -> None:
    """`observe` for each value, as one update: a streamed response's inter-chunk gaps are many, and one
    lock per value would cost more than the rest of its metrics together."""
    bounds, buckets, total = (getattr(histogram, a, None) for a in ("_upper_bounds", "_buckets", "_sum"))
    if bounds is None or buckets is None or total is None:  # another prometheus_client layout
        for v in values:
            histogram.observe(v)
        return
    counts = [0] * len(bounds)
    for v in values:
        counts[bisect_left(bounds, v)] += 1  # the first bucket whose bound is >= v, as observe() picks
    for bucket, n in zip(buckets, counts, strict=True):
        if n:
            bucket.inc(n)
    total.inc(sum(values))


def _help(text: str) -> str:
    return f"[ALPHA] {text}"


class _RequestSeries:
    """One (model, target model, fairness id, priority)'s children of every per-request metric, both sets."""

    __slots__ = ("cached", "duration", "errors", "input", "itl", "key", "ntpot", "output", "priority", "request_size",
                 "response_size", "running", "total", "tpot", "ttft")

    def __init__(self, m: EppMetrics, model: str, target: str, fairness: str, priority: str) -> None:
        legacy, full = (model, target), (model, target, fairness, priority)
        self.key = full
        self.priority = priority
        self.total = (m.request_total.labels(model, target, priority), m.llmd_request_total.labels(*full))
        self.duration = (m.request_duration.labels(*legacy), m.llmd_request_duration.labels(*full))
        self.request_size = (m.request_sizes.labels(*legacy), m.llmd_request_size.labels(*full))
        self.response_size = (m.response_sizes.labels(*legacy), m.llmd_response_size.labels(*full))
        self.input = (m.input_tokens.labels(*legacy), m.llmd_input_tokens.labels(*full))
        self.output = (m.output_tokens.labels(*legacy), m.llmd_output_tokens.labels(*full))
        self.cached = (m.cached_tokens.labels(*legacy), m.llmd_cached_tokens.labels(*full))
        self.running = (m.running_requests.labels(model), m.llmd_running.labels(*full))
        self.ntpot = (m.ntpot.labels(*legacy), m.llmd_ntpot.labels(*full))
        # TTFT: GIE's, then llm-d-router's for non-streamed and streamed responses.
        self.ttft = (m.request_ttft.labels(*legacy), m.llmd_ttft.labels(*full, "false"),
                     m.llmd_ttft.labels(*full, "true"))
        self.tpot = (m.request_tpot.labels(*legacy), m.llmd_tpot.labels(*full))
        self.itl = m.llmd_itl.labels(*full)
        self.errors: dict[str, tuple[Any, Any]] = {}


class _FastHistogram(Collector):
    """A histogram (under one or several names) from per-series bucket counts in plain lists: an
    observation costs a few hundred ns, where prometheus_client's takes a lock (~2.5 us on a busy
    core). For what the request path observes several times per decision.

    Written by the request path's thread, read by the scrape's: a scrape may see a count and its
    sum one observation apart, never a lost observation."""

    def __init__(self, names: tuple[str, ...], text: str, labels: tuple[str, ...], bounds: tuple[float, ...]) -> None:
        self.names, self.text, self.labels, self.bounds = names, text, labels, bounds
        self._les = [floatToGoString(b) for b in bounds] + ["+Inf"]
        self._series: dict[tuple[str, ...], list[float]] = {}  # bucket counts..., then the sum

    def observe(self, key: tuple[str, ...], value: float) -> None:
        series = self._series.get(key)
        if series is None:
            if len(self._series) >= _SERIES_CACHE_LIMIT:
                return
            series = self._series[key] = [0.0] * (len(self.bounds) + 2)
        series[bisect_left(self.bounds, value)] += 1
        series[-1] += value

    def collect(self) -> Iterator[HistogramMetricFamily]:
        snapshot = [(key, list(series)) for key, series in list(self._series.items())]
        for name in self.names:
            family = HistogramMetricFamily(name, self.text, labels=self.labels)
            for key, series in snapshot:
                cumulative, buckets = 0.0, []
                for le, n in zip(self._les, series[:-1], strict=True):
                    cumulative += n
                    buckets.append((le, cumulative))
                family.add_metric(key, buckets, series[-1])
            yield family


class _PerEndpointQueue(Collector):
    """Each endpoint's scraped queue, read at collection time (as upstream's pool collector)."""

    def __init__(self, datastore: Datastore, pool_name: str) -> None:
        self.datastore, self.pool_name = datastore, pool_name

    def collect(self) -> Iterator[GaugeMetricFamily]:
        legacy = GaugeMetricFamily("inference_pool_per_pod_queue_size",
                                   _help("Requests waiting in each model server's queue, per pod."),
                                   labels=("name", "model_server_pod"))
        llmd = GaugeMetricFamily(LLMD + "per_endpoint_queue_size",
                                 _help("Requests waiting in each model server's queue, per endpoint."),
                                 labels=("name", "model_server_endpoint"))
        for ep in self.datastore.all_endpoints():
            m = ep.metrics
            if m is not None:
                legacy.add_metric((self.pool_name, ep.name), m.waiting)
                llmd.add_metric((self.pool_name, ep.name), m.waiting)
        yield legacy
        yield llmd


class EppMetrics:
    """All metrics on one registry (one per server, so tests can run several)."""

    def __init__(self, pool_name: str = "default") -> None:
        self.registry = r = CollectorRegistry()
        self.pool_name = pool_name
        self.models = BoundedLabel()
        self.fairness_ids = BoundedLabel()
        self._series: dict[tuple[str, str, str, int], _RequestSeries] = {}
        self._flow_series: dict[tuple[str, str, str, str, str], tuple[Any, ...]] = {}
        self._flow_outcomes: dict[tuple[str, str, str, str, str, str], tuple[Any, ...]] = {}
        self._pool_collector: _PerEndpointQueue | None = None

        def both(kind: Any, name: str, legacy_prefix: str, text: str, labels: Iterable[str],
                 llmd_labels: Iterable[str] | None = None, **kw: Any) -> tuple[Any, Any]:
            legacy = kind(legacy_prefix + name, _help(text), tuple(labels), registry=r, **kw)
            llmd = kind(LLMD + name, _help(text), tuple(labels if llmd_labels is None else llmd_labels),
                        registry=r, **kw)
            return legacy, llmd

        o, p, x = "inference_objective_", "inference_pool_", "inference_extension_"
        # --- per request (GIE's inference_objective_* by model; llm-d-router's also by fairness id, priority)
        self.request_total = Counter(o + "request_total", _help("Requests, by model, target model and priority."),
                                     (*_MODEL, "priority"), registry=r)
        self.llmd_request_total = Counter(LLMD + "request_total", _help("Requests processed."), _REQUEST, registry=r)
        self.request_error_total = Counter(o + "request_error_total", _help("Requests ended in an error, by code."),
                                           (*_MODEL, "error_code"), registry=r)
        self.llmd_request_error_total = Counter(LLMD + "request_error_total", _help("Requests that ended in an error."),
                                                (*_REQUEST, "error_code"), registry=r)
        self.request_duration = Histogram(o + "request_duration_seconds", _help("Request latency, received to done."),
                                          _MODEL, buckets=_LATENCY, registry=r)
        self.llmd_request_duration = Histogram(LLMD + "request_duration_seconds",
                                               _help("End-to-end request latency."), _REQUEST, buckets=_LATENCY,
                                               registry=r)
        self.request_sizes = Histogram(o + "request_sizes", _help("Request body sizes in bytes."), _MODEL,
                                       buckets=_REQ_SIZES, registry=r)
        self.llmd_request_size = Histogram(LLMD + "request_size_bytes", _help("Request body sizes in bytes."),
                                           _REQUEST, buckets=_REQ_SIZES, registry=r)
        self.response_sizes = Histogram(o + "response_sizes", _help("Response body sizes in bytes."), _MODEL,
                                        buckets=_RESP_SIZES, registry=r)
        self.llmd_response_size = Histogram(LLMD + "response_size_bytes", _help("Response body sizes in bytes."),
                                            _REQUEST, buckets=_RESP_SIZES, registry=r)
        self.input_tokens = Histogram(o + "input_tokens", _help("Prompt tokens per request (the response's usage)."),
                                      _MODEL, buckets=_IN_TOKENS, registry=r)
        self.llmd_input_tokens = Histogram(LLMD + "request_input_tokens", _help("Prompt tokens per request."),
                                           _REQUEST, buckets=_IN_TOKENS, registry=r)
        self.output_tokens = Histogram(o + "output_tokens", _help("Generated tokens per request (its usage)."),
                                       _MODEL, buckets=_OUT_TOKENS, registry=r)
        self.llmd_output_tokens = Histogram(LLMD + "request_output_tokens", _help("Generated tokens per request."),
                                            _REQUEST, buckets=_OUT_TOKENS, registry=r)
        self.cached_tokens = Histogram(o + "prompt_cached_tokens",
                                       _help("Prompt tokens the model server read from its cache, per request."),
                                       _MODEL, buckets=_IN_TOKENS, registry=r)
        self.llmd_cached_tokens = Histogram(LLMD + "request_cached_tokens",
                                            _help("Prompt tokens the model server read from its cache, per request."),
                                            _REQUEST, buckets=_IN_TOKENS, registry=r)
        self.running_requests = Gauge(o + "running_requests", _help("Requests picked and not yet finished, by model."),
                                      ("model_name",), registry=r)
        self.llmd_running = Gauge(LLMD + "request_running", _help("Requests picked and not yet finished."), _REQUEST,
                                  registry=r)
        self.ntpot = Histogram(o + "normalized_time_per_output_token_seconds",
                               _help("Request latency divided by its generated tokens."), _MODEL, buckets=_NTPOT,
                               registry=r)
        self.llmd_ntpot = Histogram(LLMD + "request_ntpot_seconds",
                                    _help("Request latency divided by its generated tokens."), _REQUEST,
                                    buckets=_NTPOT, registry=r)
        self.request_ttft = Histogram(o + "request_ttft_seconds", _help("Time to the first response byte."), _MODEL,
                                      buckets=_LATENCY, registry=r)
        self.llmd_ttft = Histogram(LLMD + "request_ttft_seconds",
                                   _help("Time from the request's arrival to the first response byte."),
                                   (*_REQUEST, "streaming"), buckets=_TTFT, registry=r)
        self.request_tpot = Histogram(o + "request_tpot_seconds",
                                      _help("Streamed responses: time per output token after the first."), _MODEL,
                                      buckets=_GIE_TPOT, registry=r)
        self.llmd_tpot = Histogram(LLMD + "request_streaming_tpot_seconds",
                                   _help("Streamed responses: (latency - TTFT) / (output tokens - 1)."), _REQUEST,
                                   buckets=_TPOT, registry=r)
        self.llmd_itl = Histogram(LLMD + "request_streaming_itl_seconds",
                                  _help("Streamed responses: time between consecutive response chunks."), _REQUEST,
                                  buckets=_ITL, registry=r)
        # --- the pool ---------------------------------------------------------------------------------
        self.pool_avg_kv, self.llmd_avg_kv = both(
            Gauge, "average_kv_cache_utilization", p, "Mean KV-cache utilization over the pool's ready endpoints.",
            ("name",))
        self.pool_avg_queue, self.llmd_avg_queue = both(
            Gauge, "average_queue_size", p, "Mean model-server queue over the pool's ready endpoints.", ("name",))
        self.pool_avg_running, self.llmd_avg_running = both(
            Gauge, "average_running_requests", p, "Mean running requests over the pool's ready endpoints.", ("name",))
        self.llmd_std_kv = Gauge(LLMD + "std_dev_kv_cache_utilization",
                                 _help("Standard deviation of KV-cache use over the pool."), ("name",), registry=r)
        self.llmd_std_queue = Gauge(LLMD + "std_dev_queue_size",
                                    _help("Standard deviation of the model-server queues over the pool."), ("name",),
                                    registry=r)
        self.llmd_std_running = Gauge(LLMD + "std_dev_running_requests",
                                      _help("Standard deviation of running requests over the pool."), ("name",),
                                      registry=r)
        self.pool_ready_pods = Gauge(p + "ready_pods", _help("Ready endpoints in the pool."), ("name",), registry=r)
        self.llmd_ready_endpoints = Gauge(LLMD + "ready_endpoints", _help("Ready endpoints in the pool."), ("name",),
                                          registry=r)
        # --- scheduling and epp's own processing -----------------------------------------------------------
        self.scheduler_e2e, self.llmd_scheduler_e2e = both(
            Histogram, "scheduler_e2e_duration_seconds", x, "Time to schedule one request (filters, scorers, picker).",
            (), buckets=_FAST)
        self.scheduler_attempts, self.llmd_scheduler_attempts = both(
            Counter, "scheduler_attempts_total", x, "Scheduling attempts, by result and picked endpoint.",
            ("status", "target_model_name", "pod_name", "namespace", "port"),
            ("status", "target_model_name", "endpoint_name", "namespace", "port"))
        # Observed once per plugin per decision: a plain-list histogram (a few hundred ns) rather than
        # prometheus_client's (two locked updates each, ~5 us for both names on a busy core).
        self.plugin_duration = _FastHistogram(
            (x + "plugin_duration_seconds", LLMD + "plugin_duration_seconds"),
            _help("Time one plugin took, by extension point, plugin type and name."),
            ("extension_point", "plugin_type", "plugin_name"), _FAST)
        r.register(self.plugin_duration)
        self.llmd_request_processing = Histogram(
            LLMD + "request_processing_duration_seconds",
            _help("Time inside epp from the request's arrival to its pick (admission and queueing included)."),
            buckets=_REQ_PROCESSING, registry=r)
        self.llmd_response_processing = Histogram(
            LLMD + "response_processing_duration_seconds",
            _help("Time inside epp handling one request's response."), buckets=_RESP_PROCESSING, registry=r)
        self.model_rewrites, self.llmd_model_rewrites = both(
            Counter, "model_rewrite_decisions_total", x, "Model rewrite decisions.",
            ("model_rewrite_name", "model_name", "target_model"))
        # --- the prefix index ---------------------------------------------------------------------------
        self.prefix_indexer_size = Gauge(x + "prefix_indexer_size", _help("Entries in the prefix indexes."),
                                         registry=r)
        self.llmd_prefix_indexer_size = Gauge(LLMD + "prefix_indexer_size", _help("Entries in a prefix index."),
                                              ("plugin_name", "plugin_type"), registry=r)
        # Observed once per pick: plain-list histograms, as plugin_duration_seconds.
        ratio_text = _help("Share of the prompt's prefix found cached on the picked endpoint.")
        bytes_text = _help("Length of the cached prefix match, in bytes.")
        self.prefix_hit_ratio = _FastHistogram((x + "prefix_indexer_hit_ratio",), ratio_text, (), _HIT_RATIO)
        self.llmd_prefix_hit_ratio = _FastHistogram((LLMD + "prefix_indexer_hit_ratio",), ratio_text,
                                                    ("plugin_name", "plugin_type"), _HIT_RATIO)
        self.prefix_hit_bytes = _FastHistogram((x + "prefix_indexer_hit_bytes",), bytes_text, (), _HIT_BYTES)
        self.llmd_prefix_hit_bytes = _FastHistogram((LLMD + "prefix_indexer_hit_bytes",), bytes_text,
                                                    ("plugin_name", "plugin_type"), _HIT_BYTES)
        for h in (self.prefix_hit_ratio, self.llmd_prefix_hit_ratio, self.prefix_hit_bytes, self.llmd_prefix_hit_bytes):
            r.register(h)
        # --- flow control ---------------------------------------------------------------------------------
        self.fc_queue_duration, self.llmd_fc_queue_duration = both(
            Histogram, "flow_control_request_queue_duration_seconds", x,
            "Time requests spent in flow control, from arrival to outcome.",
            ("fairness_id", "priority", "outcome", "inference_pool", *_MODEL), buckets=_QUEUE_WAIT)
        self.fc_dispatch_cycle, self.llmd_fc_dispatch_cycle = both(
            Histogram, "flow_control_dispatch_cycle_duration_seconds", x, "Time one flow-control dispatch cycle took.",
            (), buckets=_FAST)
        self.fc_enqueue, self.llmd_fc_enqueue = both(
            Histogram, "flow_control_request_enqueue_duration_seconds", x, "Time to enqueue a request in flow control.",
            ("fairness_id", "priority", "outcome"), buckets=_FAST)
        self.fc_queue_size, self.llmd_fc_queue_size = both(
            Gauge, "flow_control_queue_size", x, "Requests waiting in flow control.", _FLOW)
        self.fc_queue_bytes, self.llmd_fc_queue_bytes = both(
            Gauge, "flow_control_queue_bytes", x, "Bytes of the requests waiting in flow control.", _FLOW)
        self.fc_saturation, self.llmd_fc_saturation = both(
            Gauge, "flow_control_pool_saturation", x,
            "The pool saturation that gates flow-control dispatch (1.0: saturated).", ("inference_pool", "stage"))
        self.llmd_fc_requests = Counter(LLMD + "flow_control_requests_total",
                                        _help("Requests flow control decided on, by outcome."),
                                        ("outcome", "priority", "inference_pool"), registry=r)
        # --- build ---------------------------------------------------------------------------------------
        self.info, self.llmd_info = both(Gauge, "info", x, "Build information.", ("commit", "build_ref"))
        from epp import __version__

        self.info.labels(commit="", build_ref=__version__).set(1)
        self.llmd_info.labels(commit="", build_ref=__version__).set(1)
        self._fc_cycle = (self.fc_dispatch_cycle, self.llmd_fc_dispatch_cycle)
        self._sched = (self.scheduler_e2e, self.llmd_scheduler_e2e)
        self._saturation = (self.fc_saturation.labels(pool_name, "effective"),
                            self.llmd_fc_saturation.labels(pool_name, "effective"))
        self._attempts: dict[tuple[str, str, str, str], tuple[Any, Any]] = {}

    # --- label children, looked up once --------------------------------------------------------------
    def _of(self, req: InferenceRequest) -> _RequestSeries:
        key = (req.model, req.target_model, req.fairness_id, req.priority)
        s = self._series.get(key)
        if s is None:
            if len(self._series) >= _SERIES_CACHE_LIMIT:
                self._series.clear()  # the children stay registered; only the shortcut is rebuilt
            bound = self.models
            s = self._series[key] = _RequestSeries(self, bound(req.model), bound(req.target_model or req.model),
                                                   self.fairness_ids(req.fairness_id), str(req.priority))
        return s

    def pin_models(self, names: Iterable[str]) -> None:
        """Models named by configuration (rewrite rules) always get their own label, never `other`."""
        for n in names:
            self.models.pin(n)

    # --- recording, called by the request path ------------------------------------------------------
    def picked(self, req: InferenceRequest, body_size: int) -> None:
        """An inference request got its pick and goes to a server."""
        if req.kind in INFERENCE_KINDS:
            s = self._of(req)
            for c in s.total:
                c.inc()
            for c in s.request_size:
                c.observe(body_size)
            for c in s.running:
                c.inc()

    def rejected(self, req: InferenceRequest, code: str) -> None:
        """A request ended with an error of epp's instead of a pick."""
        self._error(self._of(req), code)

    def _error(self, s: _RequestSeries, code: str) -> None:
        pair = s.errors.get(code)
        if pair is None:
            model, target, fairness, priority = s.key
            pair = s.errors[code] = (self.request_error_total.labels(model, target, code),
                                     self.llmd_request_error_total.labels(model, target, fairness, priority, code))
        for c in pair:
            c.inc()

    def finished(self, req: InferenceRequest, usage: Usage, received_at: float) -> None:
        """A picked request's response ended (or its stream did): once per `picked` request."""
        if req.kind not in INFERENCE_KINDS:
            return  # only inference requests were counted in `picked`
        s = self._of(req)
        for c in s.running:
            c.dec()
        if usage.processing:
            self.llmd_response_processing.observe(usage.processing)
        if not usage.status:
            return  # ended before any response: nothing more to record
        if usage.status >= 400:
            self._error(s, errors.MODEL_SERVER_ERROR)
            return
        now = time.monotonic()
        e2e = now - received_at
        for c in s.duration:
            c.observe(e2e)
        first = usage.first_byte_at
        if first:
            ttft = first - received_at
            s.ttft[0].observe(ttft)
            s.ttft[2 if usage.streaming else 1].observe(ttft)
        for c in s.response_size:
            c.observe(usage.size)
        if usage.prompt_tokens:
            for c in s.input:
                c.observe(usage.prompt_tokens)
        if usage.cached_tokens is not None:
            for c in s.cached:
                c.observe(usage.cached_tokens)
        out = usage.completion_tokens
        if out:
            for c in s.output:
                c.observe(out)
            for c in s.ntpot:
                c.observe(e2e / out)
            if usage.streaming and first and out > 1 and now > first:
                tpot = (now - first) / (out - 1)
                for c in s.tpot:
                    c.observe(tpot)
        if usage.gaps:
            observe_all(s.itl, usage.gaps)

    def scheduled(self, req: InferenceRequest, ep: Endpoint, seconds: float) -> None:
        """A scheduling cycle picked `ep` in `seconds`."""
        for c in self._sched:
            c.observe(seconds)
        key = ("success", req.target_model, ep.name, str(ep.port))
        pair = self._attempts.get(key)
        if pair is None:
            target = self.models(req.target_model)
            pair = self._attempts[key] = (self.scheduler_attempts.labels("success", target, ep.name, "", key[3]),
                                          self.llmd_scheduler_attempts.labels("success", target, ep.name, "", key[3]))
        for c in pair:
            c.inc()

    def schedule_failed(self, req: InferenceRequest) -> None:
        """A scheduling cycle found no endpoint."""
        target = self.models(req.target_model)
        self.scheduler_attempts.labels("failure", target, "", "", "").inc()
        self.llmd_scheduler_attempts.labels("failure", target, "", "", "").inc()

    def plugin_ran(self, extension_point: str, plugin_type: str, plugin_name: str, seconds: float) -> None:
        """One plugin's run at an extension point (Filter, Scorer, Picker, PreRequest, ...)."""
        self.plugin_duration.observe((extension_point, plugin_type, plugin_name), seconds)

    def rewritten(self, rewrite: str, req: InferenceRequest) -> None:
        model = self.models(req.model)
        self.model_rewrites.labels(rewrite, model, req.target_model).inc()
        self.llmd_model_rewrites.labels(rewrite, model, req.target_model).inc()

    def request_processed(self, seconds: float) -> None:
        """The request phase inside epp is over (its pick or its error is answered)."""
        self.llmd_request_processing.observe(seconds)

    def prefix_match(self, plugin_name: str, plugin_type: str, matched_bytes: int, total_bytes: int) -> None:
        """The picked endpoint's cached prefix of this request, as the prefix index saw it."""
        key = (plugin_name, plugin_type)
        self.prefix_hit_bytes.observe((), matched_bytes)
        self.llmd_prefix_hit_bytes.observe(key, matched_bytes)
        if total_bytes > 0:
            ratio = matched_bytes / total_bytes
            self.prefix_hit_ratio.observe((), ratio)
            self.llmd_prefix_hit_ratio.observe(key, ratio)

    def prefix_index_size(self, sizes: Iterable[tuple[str, str, int]]) -> None:
        """Each prefix index's (plugin name, plugin type, entries); the legacy gauge gets their sum."""
        total = 0
        for name, type_name, size in sizes:
            self.llmd_prefix_indexer_size.labels(name, type_name).set(size)
            total += size
        self.prefix_indexer_size.set(total)

    # --- flow control ------------------------------------------------------------------------------------
    def _flow(self, req: InferenceRequest, priority: int) -> tuple[Any, ...]:
        key = (req.fairness_id, str(priority), req.model, req.target_model or req.model, self.pool_name)
        t = self._flow_series.get(key)
        if t is None:
            labels = (self.fairness_ids(key[0]), key[1], self.pool_name, self.models(key[2]), self.models(key[3]))
            t = self._flow_series[key] = (self.fc_queue_size.labels(*labels), self.llmd_fc_queue_size.labels(*labels),
                                          self.fc_queue_bytes.labels(*labels), self.llmd_fc_queue_bytes.labels(*labels),
                                          labels)
        return t

    def flow_queued(self, req: InferenceRequest, priority: int, size: int, delta: int) -> None:
        """A request joined (+1) or left (-1) the flow-control queue."""
        t = self._flow(req, priority)
        t[0].inc(delta)
        t[1].inc(delta)
        t[2].inc(delta * size)
        t[3].inc(delta * size)

    def flow_outcome(self, req: InferenceRequest, priority: int, outcome: str, pool: str, seconds: float) -> None:
        """Flow control decided on a request after `seconds` of waiting."""
        base = self._flow(req, priority)[4]
        key = (*base[:2], outcome, pool or self.pool_name, *base[3:])
        t = self._flow_outcomes.get(key)
        if t is None:
            t = self._flow_outcomes[key] = (self.fc_queue_duration.labels(*key),
                                            self.llmd_fc_queue_duration.labels(*key),
                                            self.llmd_fc_requests.labels(outcome, key[1], key[3]))
        t[0].observe(seconds)
        t[1].observe(seconds)
        t[2].inc()

    def flow_enqueue_time(self, req: InferenceRequest, priority: int, outcome: str, seconds: float) -> None:
        labels = (self.fairness_ids(req.fairness_id), str(priority), outcome)
        self.fc_enqueue.labels(*labels).observe(seconds)
        self.llmd_fc_enqueue.labels(*labels).observe(seconds)

    def flow_saturation(self, pool: str, value: float) -> None:
        for c in self._saturation:
            c.set(value)

    def flow_dispatch_cycle(self, seconds: float) -> None:
        for c in self._fc_cycle:
            c.observe(seconds)

    # --- serving and periodic gauges -------------------------------------------------------------------
    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        """Expose /metrics over HTTP from a background thread."""
        start_http_server(port, addr=addr, registry=self.registry)

    def update_pool(self, datastore: Datastore) -> None:
        """Refresh the pool-level gauges (called every few seconds, not per request)."""
        if self._pool_collector is None:
            self._pool_collector = _PerEndpointQueue(datastore, self.pool_name)
            self.registry.register(self._pool_collector)
        ready = datastore.ready_endpoints()
        now = datastore.now()
        fresh = [m for m in (ep.fresh_metrics(now, datastore.staleness) for ep in ready) if m is not None]
        name = self.pool_name
        self.pool_ready_pods.labels(name).set(len(ready))
        self.llmd_ready_endpoints.labels(name).set(len(ready))
        if not fresh:
            return
        for values, avg, llmd_avg, std in (
                ([m.kv_usage for m in fresh], self.pool_avg_kv, self.llmd_avg_kv, self.llmd_std_kv),
                ([float(m.waiting) for m in fresh], self.pool_avg_queue, self.llmd_avg_queue, self.llmd_std_queue),
                ([float(m.running) for m in fresh], self.pool_avg_running, self.llmd_avg_running,
                 self.llmd_std_running)):
            mean = sum(values) / len(values)
            avg.labels(name).set(mean)
            llmd_avg.labels(name).set(mean)
            std.labels(name).set(math.sqrt(sum((v - mean) ** 2 for v in values) / len(values)))
