"""epp's logs as the Go EPP writes them (zap's JSON and console encoders, -v levels), the pick line, and tracing."""

from __future__ import annotations

import io
import logging
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime

import orjson
import pytest

from epp import logs
from epp.errors import EppError
from tests.helpers import director, endpoint, request

log = logging.getLogger("epp.test")


@pytest.fixture
def out() -> Iterator[io.StringIO]:
    """What epp writes to stderr, captured; logging restored afterwards."""
    root, own = logging.getLogger(), logging.getLogger("epp")
    saved = (list(root.handlers), root.level, own.level)
    buf = io.StringIO()
    yield buf
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in saved[0]:
        root.addHandler(h)
    root.setLevel(saved[1])
    own.setLevel(saved[2])


def lines(buf: io.StringIO) -> list[dict]:
    return [orjson.loads(line) for line in buf.getvalue().splitlines() if line.strip()]


def test_json_encoder_writes_one_object_per_line_with_zaps_keys(out: io.StringIO) -> None:
    logs.configure(encoder="json", verbosity=0, stream=out)
    log.info("pool %s synced", "default", extra={"fields": {"endpoints": 3}, "leader": True})
    log.warning("two\nlines")
    first, second = lines(out)
    assert list(first)[:5] == ["level", "ts", "logger", "caller", "msg"]
    assert first["level"] == "info"
    assert first["logger"] == "epp.test"
    assert first["msg"] == "pool default synced"
    assert first["endpoints"] == 3
    assert first["leader"] is True
    assert first["caller"].startswith("test_logs.py:")
    # Epoch seconds: upstream's logger is zap's production JSON encoder, which --zap-time-encoding never reaches.
    assert isinstance(first["ts"], float)
    assert abs(first["ts"] - time.time()) < 60
    assert second["level"] == "warn"
    assert second["msg"] == "two\nlines"  # a multi-line message stays one JSON line
    assert len(out.getvalue().splitlines()) == 2


def test_an_exception_carries_error_and_stacktrace(out: io.StringIO) -> None:
    logs.configure(encoder="json", verbosity=0, stream=out)
    try:
        raise ValueError("bad thing")
    except ValueError:
        log.exception("scheduling failed")
    (line,) = lines(out)
    assert line["level"] == "error"
    assert line["error"] == "ValueError: bad thing"
    assert "Traceback" in line["stacktrace"]


@pytest.mark.parametrize(("encoding", "check"), [
    ("epoch", lambda ts: isinstance(ts, float) and ts > 1.6e9),
    ("millis", lambda ts: ts > 1.6e12),
    ("nano", lambda ts: isinstance(ts, int) and ts > 1.6e18),
    ("iso8601", lambda ts: datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%fZ")),
    ("rfc3339nano", lambda ts: datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%fZ")),
])
def test_time_encodings_as_zap_names_them(out: io.StringIO, encoding: str, check: object) -> None:
    logs.configure(encoder="json", time_encoding=encoding, stream=out)
    log.info("x")
    assert check(lines(out)[0]["ts"])  # type: ignore[operator]


def test_console_encoder_is_tab_separated_text_with_json_fields(out: io.StringIO) -> None:
    logs.configure(encoder="console", verbosity=0, stream=out, time_encoding="rfc3339")
    log.info("picked", extra={"fields": {"endpoint": "10.0.0.1:8000"}})
    ts, level, name, caller, msg, fields = out.getvalue().rstrip("\n").split("\t")
    assert datetime.strptime(ts, "%Y-%m-%dT%H:%M:%SZ")
    assert (level, name, msg) == ("INFO", "epp.test", "picked")
    assert caller.startswith("test_logs.py:")
    assert orjson.loads(fields) == {"endpoint": "10.0.0.1:8000"}


def test_records_at_the_stacktrace_level_carry_the_callers_stack(out: io.StringIO) -> None:
    logs.configure(encoder="json", verbosity=0, stream=out)  # error, as upstream's production logger
    log.warning("no stack below error")
    log.error("with its stack")
    warn, error = lines(out)
    assert "stacktrace" not in warn
    stack = error["stacktrace"]
    assert "test_records_at_the_stacktrace_level_carry_the_callers_stack" in stack
    assert stack.rstrip().splitlines()[-1].strip() == 'log.error("with its stack")'  # ends at the call


def test_devel_means_console_and_stacks_from_warn(out: io.StringIO) -> None:
    logs.configure(encoder=None, devel=True, verbosity=0, stream=out)
    log.warning("careful")
    text = out.getvalue()
    assert text.split("\t")[1] == "WARN"
    assert 'log.warning("careful")' in text  # the stack follows the line


def emit_every_level() -> None:
    log.error("error")
    log.warning("warn")
    log.info("v0")
    for v in (1, 2, 3):
        log.log(logs.python_level(v), f"v{v}")
    log.debug("v4")
    log.log(logs.TRACE, "v5")


@pytest.mark.parametrize(("verbosity", "expected"), [
    (0, ["error", "warn", "v0"]),
    (2, ["error", "warn", "v0", "v1", "v2"]),  # upstream's default
    (3, ["error", "warn", "v0", "v1", "v2", "v3"]),
    (4, ["error", "warn", "v0", "v1", "v2", "v3", "v4"]),
    (5, ["error", "warn", "v0", "v1", "v2", "v3", "v4", "v5"]),
])
def test_v_levels_show_what_upstream_shows(out: io.StringIO, verbosity: int, expected: list[str]) -> None:
    logs.configure(encoder="json", verbosity=verbosity, stream=out)
    emit_every_level()
    assert [line["msg"] for line in lines(out)] == expected
    levels = {line["msg"]: line["level"] for line in lines(out)}
    assert levels.get("v3", "info") == "info"
    assert levels.get("v4", "debug") == "debug"
    assert levels.get("v5", "trace") == "trace"


@pytest.mark.parametrize(("zap_level", "expected"), [
    ("error", ["error"]),
    ("info", ["error", "warn", "v0"]),
    ("debug", ["error", "warn", "v0", "v1"]),  # zap's debug is V(1), as controller-runtime maps it
    ("4", ["error", "warn", "v0", "v1", "v2", "v3", "v4"]),
    ('"5"', ["error", "warn", "v0", "v1", "v2", "v3", "v4", "v5"]),  # the chart's quoted value
    ("panic", []),
])
def test_zap_log_level_overrides_v(out: io.StringIO, zap_level: str, expected: list[str]) -> None:
    logs.configure(encoder="json", verbosity=5, zap_log_level=zap_level, stream=out)
    emit_every_level()
    assert [line["msg"] for line in lines(out)] == expected


def test_libraries_debug_chatter_stays_out_at_debug_verbosity(out: io.StringIO) -> None:
    logs.configure(encoder="json", verbosity=5, stream=out)
    logging.getLogger("grpc._cython.cygrpc").debug("loaded running loop")
    logging.getLogger("httpx").info("HTTP Request: GET /metrics")
    logging.getLogger("aiohttp.server").warning("bad request line")
    assert [line["msg"] for line in lines(out)] == ["bad request line"]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"encoder": "xml"}, "--zap-encoder"),
    ({"zap_log_level": "loud"}, "--zap-log-level"),
    ({"zap_log_level": "0"}, "--zap-log-level"),
    ({"time_encoding": "unix"}, "--zap-time-encoding"),
])
def test_bad_flag_values_are_refused_with_the_flag_named(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        logs.configure(stream=io.StringIO(), **kwargs)


def picked() -> tuple:
    d = director(endpoint(8000, waiting=0), endpoint(8001, waiting=3))
    req = request(prompt="the secret prompt text " * 4)
    req.request_id = "req-1"
    decision = d.decide(req)
    return req, decision


@pytest.mark.parametrize(("verbosity", "debug_line", "trace_line"), [(2, False, False), (4, True, False),
                                                                      (5, True, True)])
def test_the_pick_is_logged_at_debug_and_the_prompt_only_at_trace(
        out: io.StringIO, verbosity: int, debug_line: bool, trace_line: bool) -> None:
    logs.configure(encoder="json", verbosity=verbosity, stream=out)
    req, decision = picked()
    out.seek(0)
    out.truncate()  # only the line below (the director may log its own pick)
    logs.log_pick(req, decision.result, waited=0.25)
    got = lines(out)
    picks = [line for line in got if line["msg"] == "request scheduled"]
    prompts = [line for line in got if line["msg"] == "request prompt"]
    assert bool(picks) is debug_line
    assert bool(prompts) is trace_line
    if picks:
        (p,) = picks
        assert p["level"] == "debug"
        assert p["logger"] == "epp.pick"
        assert p["requestID"] == "req-1"
        assert p["endpoint"] == decision.endpoint.hostport
        assert set(p["scores"]) == {"10.0.0.1:8000", "10.0.0.1:8001"}
        assert all("total" in s for s in p["scores"].values())
        assert p["queuedSeconds"] == 0.25
        assert "secret prompt" not in orjson.dumps(p).decode()
    if prompts:
        assert prompts[0]["level"] == "trace"
        assert "the secret prompt text" in prompts[0]["prompt"]


def test_tracing_off_imports_nothing_of_opentelemetry() -> None:
    code = ("import sys, epp.logs as l; assert l.setup_tracing(False) is None; "
            "assert not any(m.startswith('opentelemetry') for m in sys.modules), sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_tracing_makes_one_span_per_request_with_the_scheduling_result(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("opentelemetry.sdk")
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_on")
    exporter = InMemorySpanExporter()
    tracer = logs.setup_tracing(True, exporter=exporter)
    assert tracer is not None
    req, decision = picked()
    parent_trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    req.headers["traceparent"] = f"00-{parent_trace}-00f067aa0ba902b7-01"
    tracer.request(req, decision.result, received_at=time.monotonic() - 0.01, waited=0.004)
    tracer.request(request(), None, received_at=time.monotonic(),
                   error=EppError("ResourceExhausted", "saturated", reason="rejected-saturated"))
    tracer.shutdown()
    ok, failed = exporter.get_finished_spans()
    assert ok.name == failed.name == "gateway.request"
    assert f"{ok.context.trace_id:032x}" == parent_trace  # a child of the caller's trace
    assert ok.attributes["llm_d.epp.endpoint"] == decision.endpoint.hostport
    assert ok.attributes["gen_ai.request.model"] == "m"
    assert ok.attributes["llm_d.epp.queue_seconds"] == 0.004
    assert "llm_d.epp.score.total" in ok.attributes
    assert (ok.end_time - ok.start_time) >= 10_000_000  # from the request's arrival
    assert failed.attributes["http.response.status_code"] == 429
    assert failed.status.status_code.name == "ERROR"
