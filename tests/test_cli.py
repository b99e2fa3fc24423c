"""The command line (epp.cli) as the Go EPP is run: `epp --flag ...` means `epp serve`, Go's flags work.

Flags the Go EPP has and epp accepts without effect are named in a warning at start-up;
bool flags take Go's forms (--flag, --flag=true, --flag=false); anything unknown fails
with argparse's exit code 2, before anything starts.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator

import orjson
import pytest

from epp import cli
from epp.server import EppServer
from epp.stack import free_ports, grpc_serving, wait_until


@pytest.fixture(autouse=True)
def _logging_restored() -> Iterator[None]:
    """`cli.main` in this process installs epp's log handler on this test's stderr: removed afterwards."""
    root, own = logging.getLogger(), logging.getLogger("epp")
    saved = (list(root.handlers), root.level, own.level)
    yield
    for h in list(root.handlers):
        if h not in saved[0]:
            root.removeHandler(h)
    root.setLevel(saved[1])
    own.setLevel(saved[2])


def serve_args(*argv: str):
    return cli.build_parser().parse_args(["serve", *argv])


def run_epp(*flags: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    """`python -m epp` as the Go EPP's manifests run it (flags first, no sub-command), stopped with SIGTERM
    once it serves health; its exit code and stderr."""
    grpc_port, health_port, pool_port = free_ports(3)
    argv = [sys.executable, "-m", "epp", "--grpc-port", str(grpc_port), "--grpc-health-port", str(health_port),
            "--metrics-port", "0", "--http-pick-port", "0", "--explain-port", "0", "--bind-address", "127.0.0.1",
            "--endpoints", f"127.0.0.1:{pool_port}", "--drain-timeout", "0s", *flags]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        wait_until(lambda: proc.poll() is not None or grpc_serving(health_port), 30, "epp to serve health")
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, err


def test_go_style_command_line_runs_serve_and_names_the_no_effect_flags() -> None:
    """Every line on stderr is one zap JSON object (the default encoder); a no-effect flag is a warning."""
    rc, err = run_epp("--tracing=false", "--zap-encoder", "json", "--enable-pprof")
    assert rc == 0, err
    records = [orjson.loads(line) for line in err.splitlines()]
    assert records
    assert all({"level", "ts", "logger", "caller", "msg"} <= r.keys() for r in records)
    assert all(isinstance(r["ts"], float) for r in records)  # epoch seconds, as zap's production encoder
    warned = [r for r in records if "--enable-pprof" in r["msg"]]
    assert [r["level"] for r in warned] == ["warn"]
    assert "has no effect in epp" in warned[0]["msg"]
    assert not any("--zap-encoder" in r["msg"] or "--tracing" in r["msg"] for r in records)


def test_console_encoder_and_time_encoding_reach_the_log() -> None:
    rc, err = run_epp("--zap-encoder=console", "--zap-time-encoding", "iso8601", "--enable-pprof")
    assert rc == 0, err
    line = next(ln for ln in err.splitlines() if "--enable-pprof" in ln)
    ts, level, logger, _caller, msg = line.split("\t")[:5]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", ts)
    assert (level, logger) == ("WARN", "epp")
    assert "has no effect" in msg


def test_zap_log_level_reaches_the_log() -> None:
    """Upstream's default shows info; --zap-log-level error leaves only errors (the levels themselves:
    tests/test_logs.py)."""
    rc, default = run_epp("--enable-pprof")
    rc_error, quiet = run_epp("--zap-log-level", "error", "--enable-pprof")
    assert rc == rc_error == 0, default + quiet
    assert {"info", "warn"} <= {orjson.loads(line)["level"] for line in default.splitlines()}
    assert quiet.strip() == ""


@pytest.mark.parametrize(("flag", "value"), [("--zap-encoder", "xml"), ("--zap-time-encoding", "week"),
                                             ("--zap-log-level", "loud"), ("--zap-stacktrace-level", "warp")])
def test_bad_log_flag_values_exit_2_naming_the_flag(flag: str, value: str,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["serve", flag, value, "--endpoints", "127.0.0.1:1"]) == 2
    assert f"invalid {flag} {value!r}" in capsys.readouterr().err


def test_tracing_without_the_sdk_fails_at_start_saying_what_to_install(tmp_path) -> None:
    """An `opentelemetry` package that cannot be imported first on the path stands in for the missing extra."""
    (tmp_path / "opentelemetry").mkdir()
    (tmp_path / "opentelemetry" / "__init__.py").write_text("raise ImportError('not installed')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    rc, err = run_epp("--tracing", env=env)
    assert rc == 1
    assert "--tracing needs the OpenTelemetry SDK: pip install opentelemetry-sdk" in err


def test_no_effect_flags_are_reported_by_name_only_when_given() -> None:
    args = serve_args("--grpc-port", "9", "--zap-encoder", "json", "--enable-pprof", "--tracing=false")
    assert cli.no_effect_flags(args) == ["--enable-pprof"]
    assert cli.no_effect_flags(serve_args("--grpc-port", "9", "--v", "4")) == []


@pytest.mark.parametrize("flag", ["--tracing", "--ha-enable-leader-election", "--zap-devel"])
@pytest.mark.parametrize(("form", "value"), [("", True), ("=true", True), ("=false", False), ("=True", True),
                                             ("=0", False)])
def test_go_bool_flags_take_go_forms(flag: str, form: str, value: bool) -> None:
    args = serve_args(flag + form)
    assert getattr(args, flag[2:].replace("-", "_")) is value


@pytest.mark.parametrize(("form", "skip_verify"), [(None, True), ("", True), ("=true", True), ("=false", False)])
def test_insecure_skip_verify_reaches_the_scraper(form: str | None, skip_verify: bool) -> None:
    """--model-server-metrics-https-insecure-skip-verify=false turns certificate verification on (default off,
    as the Go EPP)."""
    flags = ["--endpoints", "127.0.0.1:9", "--model-server-metrics-scheme", "https"]
    if form is not None:
        flags.append("--model-server-metrics-https-insecure-skip-verify" + form)
    opts = cli._options(serve_args(*flags))
    assert opts.model_server_metrics_insecure_skip_verify is skip_verify
    server = EppServer(opts)  # nothing listens until start()
    assert server.scraper.verify_tls is (not skip_verify)


def test_durations_are_go_strings() -> None:
    opts = cli._options(serve_args("--refresh-metrics-interval", "250ms", "--metrics-staleness-threshold", "1m30s",
                                   "--grace-period", "5"))
    assert (opts.refresh_metrics_interval, opts.metrics_staleness_threshold, opts.grace_period) == (0.25, 90.0, 5.0)


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        (["--grpc-port", "9", "--no-such-flag", "x"], "unrecognized arguments: --no-such-flag x"),
        (["serve", "--grpc-port", "nine"], "argument --grpc-port: invalid int value: 'nine'"),
        (["--tracing=maybe"], "argument --tracing: expected true or false, got 'maybe'"),
        (["--refresh-metrics-interval", "1d"], "argument --refresh-metrics-interval: invalid duration '1d'"),
        (["--model-server-metrics-scheme", "ftp"], "argument --model-server-metrics-scheme: invalid choice"),
    ],
)
def test_bad_flags_exit_2_naming_the_flag(argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    assert needle in capsys.readouterr().err


def test_no_arguments_prints_help_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 2
    out = capsys.readouterr().out
    assert "serve" in out
    assert "demo" in out


@pytest.mark.parametrize(("text", "size"), [("4194304", 4194304), ("10MiB", 10 << 20), ("25MB", 25_000_000),
                                            ("512Ki", 512 << 10), ('"8MiB"', 8 << 20)])
def test_message_sizes_take_upstreams_quantities(text: str, size: int) -> None:
    opts = cli._options(serve_args("--endpoints", "127.0.0.1:9", "--grpc-max-recv-msg-size", text,
                                   "--grpc-max-send-msg-size", text))
    assert opts.grpc_max_recv_msg_size == opts.grpc_max_send_msg_size == size


def test_a_bad_message_size_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        serve_args("--grpc-max-recv-msg-size", "ten megs")
    assert e.value.code == 2
    assert "10MiB" in capsys.readouterr().err


def test_llm_d_router_flags_reach_the_options() -> None:
    opts = cli._options(serve_args(
        "--endpoints", "127.0.0.1:9", "--drain-timeout", "5s", "--emit-endpoint-scores",
        "--disable-endpoint-subset-filter=true", "--metrics-cert-dir", "/certs", "--metrics-client-ca-file", "/ca"))
    assert (opts.drain_timeout, opts.emit_endpoint_scores, opts.disable_endpoint_subset_filter) == (5.0, True, True)
    assert (opts.metrics_cert_dir, opts.metrics_client_ca_file) == ("/certs", "/ca")
    assert cli._options(serve_args("--endpoints", "127.0.0.1:9")).drain_timeout == 30.0  # llm-d-router's default


def test_quoted_values_as_the_upstream_chart_renders_them() -> None:
    opts = cli._options(serve_args("--endpoints", "127.0.0.1:9",
                                   '--total-queued-requests-metric="sglang:num_queue_reqs"',
                                   '--model-server-metrics-path="/prometheus/metrics"'))
    assert opts.total_queued_requests_metric == "sglang:num_queue_reqs"
    assert opts.model_server_metrics_path == "/prometheus/metrics"
    server = EppServer(opts)
    assert server.engines["vllm"].queue[0].name == "sglang:num_queue_reqs"


def test_cache_info_metric_and_the_pick_header_timeout_reach_the_server() -> None:
    opts = cli._options(serve_args("--endpoints", "127.0.0.1:9", '--cache-info-metric="sglang:cache_config_info"',
                                   "--http-pick-header-timeout", "3s"))
    assert EppServer(opts).engines["vllm"].cache_info[0].name == "sglang:cache_config_info"
    assert opts.http_pick_header_timeout == 3.0
    assert "--cache-info-metric" not in cli.no_effect_flags(serve_args("--cache-info-metric", "x"))


def test_check_config_loads_a_flow_control_config_as_serve_does(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    epc = tmp_path / "fc.yaml"
    epc.write_text("apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nfeatureGates: [flowControl]\n"
                   "plugins:\n- type: queue-scorer\n- type: max-score-picker\n")
    assert cli.main(["check-config", str(epc)]) == 0, capsys.readouterr().err


def test_tls_cipher_suites_are_refused_with_the_way_to_set_them(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--endpoints", "127.0.0.1:9", "--tls-cipher-suites", "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256"]) == 1
    assert "GRPC_SSL_CIPHER_SUITES" in capsys.readouterr().err


def test_check_config_prints_the_resolved_profile_or_the_error(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "epc.yaml"
    good.write_text("apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n"
                    "- type: queue-scorer\n- type: max-score-picker\n")
    assert cli.main(["check-config", str(good)]) == 0
    out = capsys.readouterr().out
    assert "queue-scorer" in out
    assert "max-score-picker" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n- type: no-such-scorer\n")
    assert cli.main(["check-config", str(bad)]) == 1
    assert "bad.yaml:4" in capsys.readouterr().err


def test_dry_run_checks_without_binding(capsys: pytest.CaptureFixture[str]) -> None:
    port = free_ports(1)[0]
    assert cli.main(["--endpoints", "127.0.0.1:9", "--grpc-port", str(port), "--dry-run"]) == 0
    assert "prefix-cache-scorer" in capsys.readouterr().out  # epp's default profile, resolved
    assert cli.main(["--endpoints", "127.0.0.1:9", "--config-text", "plugins: 3", "--dry-run"]) == 1
    assert "plugins" in capsys.readouterr().err
