"""Logs as the Go EPP writes them (zap through controller-runtime), and optional OpenTelemetry tracing.

`--zap-encoder json` (the default: upstream always writes zap's production JSON) gives one
JSON object per line with zap's keys (`level`, `ts`, `logger`, `caller`, `msg`, then the
record's fields, `error` and `stacktrace`); `console` gives zap's tab-separated text.
`--zap-devel` makes console the default encoder and warn the default stacktrace level, as
controller-runtime's development mode. `--zap-stacktrace-level` (debug, info, error, panic;
default error) adds the caller's stack to records at that level and above. `--zap-time-encoding`
picks `ts`'s form (epoch seconds by default, as zap's production encoder). Verbosity is
upstream's: `-v N` shows what is logged at V(N) and below: 0 info, 2 upstream's default,
3 verbose, 4 debug (Python's `log.debug`), 5 trace. `--zap-log-level` (debug, info, error,
panic, or a number N for V(N)) overrides `-v`, as upstream. Errors always show.

The request path logs one line per pick at debug (`log_pick`: the endpoint, its fallbacks
and every candidate's scores) and the prompt only at trace, never above debug.

`--tracing` (with `opentelemetry-sdk` installed) makes one span per request, `gateway.request`,
carrying the scheduling result, a child of the caller's `traceparent` when it sends one.
Exporter and sampling follow upstream's environment: OTEL_TRACES_EXPORTER `console`
(default) or `otlp` (needs `opentelemetry-exporter-otlp-proto-grpc`), OTEL_TRACES_SAMPLER
(default parent-based trace-id ratio) and OTEL_TRACES_SAMPLER_ARG (default 0.1),
OTEL_SERVICE_NAME (default llm-d-epp, as llm-d-router) or service.name in
OTEL_RESOURCE_ATTRIBUTES. With tracing off nothing of OpenTelemetry is imported.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import time
import traceback
from datetime import UTC, datetime
from typing import IO, TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from epp.requests import InferenceRequest
    from epp.scheduling.framework import SchedulingResult

TRACE = 5  # Python level of V(5); V(4) is logging.DEBUG
DEFAULT_VERBOSITY = 2  # upstream's -v default
ENCODERS = ("json", "console")
TIME_ENCODINGS = ("epoch", "millis", "nano", "iso8601", "rfc3339", "rfc3339nano")
ZAP_LEVELS = {"debug": 1, "info": 0, "error": -1, "panic": -2}
# --zap-stacktrace-level's names (controller-runtime's) and the Python level each starts at.
STACKTRACE_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING, "error": logging.ERROR,
                     "panic": logging.CRITICAL}
MAX_PROMPT_LOGGED = 4096
_HANDLER_NAME = "epp"

logging.addLevelName(TRACE, "TRACE")
_PICK_LOG = logging.getLogger("epp.pick")
# What every LogRecord has; anything else a caller passed in `extra` is a field.
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "fields"}


def python_level(v: int) -> int:
    """The Python level a message logged at V(v) has: V(0) INFO, V(1..3) just below it, V(4) DEBUG, V(5) TRACE."""
    if v <= 0:
        return logging.INFO
    if v <= 3:
        return logging.INFO - v
    if v == 4:
        return logging.DEBUG
    return max(1, TRACE - (v - 5))


def threshold(verbosity: int = DEFAULT_VERBOSITY, zap_log_level: str | None = None) -> int:
    """The lowest Python level shown for these flags."""
    if zap_log_level is not None:
        text = zap_log_level.strip().strip('"').lower()
        if text in ZAP_LEVELS:
            n = ZAP_LEVELS[text]
            if n == -1:
                return logging.ERROR
            if n == -2:
                return logging.CRITICAL
            return python_level(n)
        if text.isdigit() and int(text) > 0:
            return python_level(int(text))
        raise ValueError(f"invalid --zap-log-level {zap_log_level!r}: expected debug, info, error, panic "
                         "or a number greater than 0")
    return python_level(max(0, verbosity))


def _zap_level(levelno: int) -> str:
    """The level name zap writes (llm-d-router's encoder: V(1)-V(3) are info, V(4) debug, V(5)+ trace)."""
    if levelno >= logging.CRITICAL:
        return "panic"
    if levelno >= logging.ERROR:
        return "error"
    if levelno >= logging.WARNING:
        return "warn"
    if levelno > logging.DEBUG:
        return "info"
    if levelno == logging.DEBUG:
        return "debug"
    return "trace"


def _timestamp(created: float, encoding: str) -> Any:
    if encoding == "epoch":
        return created
    if encoding == "millis":
        return created * 1e3
    if encoding == "nano":
        return int(created * 1e9)
    dt = datetime.fromtimestamp(created, UTC)
    if encoding == "iso8601":
        return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"
    if encoding == "rfc3339nano":
        return dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ")


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    out: dict[str, Any] = {}
    given = getattr(record, "fields", None)
    if isinstance(given, dict):
        out.update(given)
    for key, value in vars(record).items():
        if key not in _RECORD_ATTRS and not key.startswith("_"):
            out[key] = value
    return out


class ZapJsonFormatter(logging.Formatter):
    """One JSON object per record, keys in zap's order."""

    def __init__(self, time_encoding: str = "rfc3339") -> None:
        super().__init__()
        self.time_encoding = time_encoding

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "level": _zap_level(record.levelno),
            "ts": _timestamp(record.created, self.time_encoding),
            "logger": record.name,
            "caller": f"{record.module}.py:{record.lineno}",
            "msg": record.getMessage(),
        }
        for key, value in _fields(record).items():
            out.setdefault(key, value)
        if record.exc_info and record.exc_info[1] is not None:
            out["error"] = f"{type(record.exc_info[1]).__name__}: {record.exc_info[1]}"
            out["stacktrace"] = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        elif record.stack_info:
            out["stacktrace"] = record.stack_info
        return orjson.dumps(out, default=str).decode()


class ZapConsoleFormatter(logging.Formatter):
    """zap's console encoder: time, LEVEL, logger, caller, message, then the fields as JSON, tab-separated."""

    def __init__(self, time_encoding: str = "rfc3339") -> None:
        super().__init__()
        self.time_encoding = time_encoding

    def format(self, record: logging.LogRecord) -> str:
        ts = _timestamp(record.created, self.time_encoding)
        parts = [str(ts), _zap_level(record.levelno).upper(), record.name, f"{record.module}.py:{record.lineno}",
                 record.getMessage()]
        fields = _fields(record)
        if fields:
            parts.append(orjson.dumps(fields, default=str).decode())
        line = "\t".join(parts)
        if record.exc_info and record.exc_info[1] is not None:
            line += "\n" + "".join(traceback.format_exception(*record.exc_info)).rstrip()
        elif record.stack_info:
            line += "\n" + record.stack_info
        return line


def configure(*, encoder: str | None = "json", verbosity: int = DEFAULT_VERBOSITY, zap_log_level: str | None = None,
              time_encoding: str | None = None, stream: IO[str] | None = None, devel: bool = False,
              stacktrace_level: str | None = None) -> logging.Handler:
    """Install epp's log handler on the root logger for these flags (replacing the one a previous call
    installed); returns it. Raises ValueError on bad values. None for a flag means it was not given
    (its default depends on `devel`)."""
    encoder = (encoder or ("console" if devel else "json")).strip().strip('"')
    if encoder not in ENCODERS:
        raise ValueError(f"invalid --zap-encoder {encoder!r}: expected json or console")
    encoding = (time_encoding or "epoch").strip().strip('"')
    if encoding not in TIME_ENCODINGS:
        raise ValueError(f"invalid --zap-time-encoding {encoding!r}: expected one of {', '.join(TIME_ENCODINGS)}")
    stack_name = (stacktrace_level or ("warn" if devel else "error")).strip().strip('"').lower()
    if stack_name not in STACKTRACE_LEVELS:
        raise ValueError(f"invalid --zap-stacktrace-level {stacktrace_level!r}: expected debug, info, error or panic")
    level = threshold(verbosity, zap_log_level)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(ZapJsonFormatter(encoding) if encoder == "json" else ZapConsoleFormatter(encoding))
    handler.addFilter(_CallerStack(STACKTRACE_LEVELS[stack_name]))
    handler.set_name(_HANDLER_NAME)
    root = logging.getLogger()
    for old in list(root.handlers):
        if old.get_name() == _HANDLER_NAME:  # configured again: one handler, the new one
            root.removeHandler(old)
    root.addHandler(handler)
    # epp's own loggers follow -v; libraries (grpc, asyncio, aiohttp) never log below info here, and
    # their chatter at info (httpx: every scrape) is left out: epp reports state changes itself.
    root.setLevel(max(level, logging.INFO))
    logging.getLogger("epp").setLevel(level)
    for noisy in ("httpx", "httpcore", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    logging.captureWarnings(True)  # Python's warnings are records too, in the same encoding
    return handler


class _CallerStack(logging.Filter):
    """Puts the logging call's stack on records at --zap-stacktrace-level and above (zap's `stacktrace`)."""

    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= self.level and not record.exc_info and not record.stack_info:
            frames: list[traceback.FrameSummary] = list(traceback.extract_stack())
            # Drop the logging machinery's frames: the stack ends at the call that logged.
            for i in range(len(frames) - 1, -1, -1):
                if frames[i].filename == record.pathname and frames[i].lineno == record.lineno:
                    frames = frames[: i + 1]
                    break
            record.stack_info = "".join(traceback.format_list(frames)).rstrip()
        return True


# --- the request line ----------------------------------------------------------------------------------
def log_pick(request: InferenceRequest, result: SchedulingResult, waited: float = 0.0) -> None:
    """The pick at debug: endpoint, fallbacks, each candidate's total and per-scorer scores; the prompt at trace."""
    log = _PICK_LOG
    if not log.isEnabledFor(logging.DEBUG):
        return
    scores = {}
    for i, ep in enumerate(result.candidates):
        per = {name: round(values[i], 4) for name, values in result.scores.items()}
        per["total"] = round(result.totals[i], 4) if i < len(result.totals) else 0.0
        scores[ep.hostport] = per
    fields: dict[str, Any] = {
        "requestID": request.request_id, "path": request.path, "model": request.model,
        "targetModel": request.target_model, "objective": request.objective, "priority": request.priority,
        "fairnessID": request.fairness_id, "endpoint": result.targets[0].hostport,
        "fallbacks": [t.hostport for t in result.targets[1:]], "profile": result.profile, "scores": scores,
    }
    if waited:
        fields["queuedSeconds"] = round(waited, 6)
    log.debug("request scheduled", extra={"fields": fields})
    if log.isEnabledFor(TRACE):
        log.log(TRACE, "request prompt", extra={"fields": {"requestID": request.request_id,
                                                           "prompt": request.prompt[:MAX_PROMPT_LOGGED]}})


# --- tracing --------------------------------------------------------------------------------------------------
class RequestTracer:
    """One `gateway.request` span per request, from its arrival to its pick (or its error)."""

    def __init__(self, provider: Any, tracer: Any, propagator: Any) -> None:
        self.provider, self.tracer, self.propagator = provider, tracer, propagator
        self.api = _otel("opentelemetry.trace")

    def request(self, request: InferenceRequest, result: SchedulingResult | None, *, received_at: float,
                error: Any = None, waited: float = 0.0) -> None:
        """Record the span; `received_at` is the request's time.monotonic() arrival."""
        otel = self.api
        now_ns = time.time_ns()
        start_ns = now_ns - int(max(0.0, time.monotonic() - received_at) * 1e9)
        parent = self.propagator.extract(request.headers) if "traceparent" in request.headers else None
        span = self.tracer.start_span("gateway.request", context=parent, kind=otel.SpanKind.SERVER, start_time=start_ns)
        attrs: dict[str, Any] = {
            "gen_ai.request.model": request.model, "gen_ai.request.id": request.request_id,
            "llm_d.epp.target_model": request.target_model, "llm_d.epp.priority": request.priority,
            "llm_d.epp.fairness_id": request.fairness_id, "llm_d.epp.objective": request.objective,
            "http.route": request.path, "llm_d.epp.queue_seconds": waited,
        }
        if result is not None:
            attrs["llm_d.epp.endpoint"] = result.targets[0].hostport
            attrs["llm_d.epp.fallbacks"] = [t.hostport for t in result.targets[1:]]
            attrs["llm_d.epp.profile"] = result.profile
            attrs["llm_d.epp.candidates"] = len(result.candidates)
            picked = result.candidates.index(result.targets[0]) if result.targets[0] in result.candidates else -1
            if picked >= 0:
                for name, values in result.scores.items():
                    attrs[f"llm_d.epp.score.{name}"] = values[picked]
                if picked < len(result.totals):
                    attrs["llm_d.epp.score.total"] = result.totals[picked]
        if error is not None:
            attrs["http.response.status_code"] = getattr(error, "http_status", 500)
            attrs["error.type"] = getattr(error, "code", type(error).__name__)
            span.set_status(otel.Status(otel.StatusCode.ERROR, getattr(error, "message", str(error))))
        span.set_attributes(attrs)
        span.end(end_time=now_ns)

    def shutdown(self) -> None:
        self.provider.shutdown()


# Where spans go and how the connection is secured: with none of these set, upstream sends to a
# plaintext collector on the loopback (the SDK's own default would try TLS).
_OTLP_TRANSPORT_ENV = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                       "OTEL_EXPORTER_OTLP_INSECURE", "OTEL_EXPORTER_OTLP_TRACES_INSECURE",
                       "OTEL_EXPORTER_OTLP_CERTIFICATE", "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE")


def setup_tracing(enabled: bool, service_name: str = "llm-d-epp", *, exporter: Any = None) -> RequestTracer | None:
    """The request tracer for `--tracing`, or None when off. Raises RuntimeError (what to install) when
    the OpenTelemetry packages are missing. `exporter` replaces the environment's choice (tests)."""
    if not enabled:
        return None
    try:
        propagate = _otel("opentelemetry.propagate")
        resources = _otel("opentelemetry.sdk.resources")
        sdk_trace = _otel("opentelemetry.sdk.trace")
        export = _otel("opentelemetry.sdk.trace.export")
        sampling = _otel("opentelemetry.sdk.trace.sampling")
    except ImportError:
        raise RuntimeError("--tracing needs the OpenTelemetry SDK: pip install opentelemetry-sdk "
                           "(and opentelemetry-exporter-otlp-proto-grpc for OTEL_TRACES_EXPORTER=otlp)") from None
    from epp import __version__

    sampler = None  # the SDK reads OTEL_TRACES_SAMPLER itself when it is set
    if "OTEL_TRACES_SAMPLER" not in os.environ:
        try:
            ratio = float(os.environ.get("OTEL_TRACES_SAMPLER_ARG", "0.1"))
        except ValueError:
            ratio = 0.1
        sampler = sampling.ParentBased(sampling.TraceIdRatioBased(ratio))
    attrs = {"service.version": __version__}
    # As upstream: OTEL_SERVICE_NAME, then OTEL_RESOURCE_ATTRIBUTES, then the built-in name.
    if "OTEL_SERVICE_NAME" in os.environ or "service.name=" not in os.environ.get("OTEL_RESOURCE_ATTRIBUTES", ""):
        attrs["service.name"] = os.environ.get("OTEL_SERVICE_NAME", service_name)
    resource = resources.Resource.create(attrs)
    provider = sdk_trace.TracerProvider(resource=resource, sampler=sampler)
    if exporter is not None:
        provider.add_span_processor(export.SimpleSpanProcessor(exporter))
    else:
        kind = os.environ.get("OTEL_TRACES_EXPORTER", "console")
        if kind == "otlp":
            try:
                otlp = _otel("opentelemetry.exporter.otlp.proto.grpc.trace_exporter")
            except ImportError as e:
                if "opentelemetry.proto" in str(e):
                    # xds-protos ships an older copy of the same files; whichever installed last owns them.
                    raise RuntimeError("OTEL_TRACES_EXPORTER=otlp: opentelemetry-proto's modules were overwritten "
                                       "by xds-protos' older copy; restore them with pip install --force-reinstall "
                                       f"--no-deps opentelemetry-proto ({e})") from None
                raise RuntimeError("OTEL_TRACES_EXPORTER=otlp needs pip install "
                                   "opentelemetry-exporter-otlp-proto-grpc") from None
            if not any(k in os.environ for k in _OTLP_TRANSPORT_ENV):
                # As upstream: a plaintext collector on the loopback when the environment names none.
                provider.add_span_processor(export.BatchSpanProcessor(
                    otlp.OTLPSpanExporter(endpoint="localhost:4317", insecure=True)))
            else:
                provider.add_span_processor(export.BatchSpanProcessor(otlp.OTLPSpanExporter()))
        elif kind == "console":
            provider.add_span_processor(export.BatchSpanProcessor(export.ConsoleSpanExporter()))
        elif kind != "none":
            raise RuntimeError(f"OTEL_TRACES_EXPORTER={kind!r} is not supported: use console, otlp or none")
    return RequestTracer(provider, provider.get_tracer("epp", __version__), propagate.get_global_textmap())


def _otel(module: str) -> Any:
    """An OpenTelemetry module, imported only when tracing is on (the package is optional)."""
    return importlib.import_module(module)

