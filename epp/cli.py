"""`epp serve` (flags as the Go EPP's) and `epp demo`.

`epp` with flags and no sub-command means `epp serve`, as the Go EPP binary is run.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from epp import logs
from epp.durations import parse_duration
from epp.errors import ConfigError

log = logging.getLogger("epp")

# Go EPP flags that epp accepts so its manifests work unchanged, but that change nothing here.
# Each one given is named in a warning at start-up.
_ACCEPTED_GO_FLAGS_WITH_VALUE: tuple[str, ...] = ()
_ACCEPTED_GO_BOOL_FLAGS = (
    "--health-checking", "--enable-pprof", "--enable-grpc-stream-metrics",
    "--allow-experimental-plugins",
)


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _text(text: str) -> str:
    """A string flag's value. The upstream chart renders some as --flag="value", and no shell removes
    the quotes from a container's args: one surrounding pair is dropped, as the Go EPP reads them."""
    if len(text) >= 2 and text[0] == text[-1] == '"':
        return text[1:-1]
    return text


def _ports(text: str) -> list[int]:
    """A Go IntSlice: '8000,8001' (the flag may also be repeated)."""
    try:
        return [int(p) for p in _text(text).split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected port numbers separated by commas, got {text!r}") from None


_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
               "ki": 1024, "kib": 1024, "mi": 1024**2, "mib": 1024**2, "gi": 1024**3, "gib": 1024**3}


def _size(text: str) -> int:
    """A byte size as upstream's --grpc-max-*-msg-size takes it: 4194304, 10MiB, 25MB, 512Ki."""
    import re

    m = re.fullmatch(r"\s*(\d+)\s*([A-Za-z]*)\s*", _text(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _SIZE_UNITS or int(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"expected a size such as 4194304, 10MiB or 25MB, got {text!r}")
    return int(m.group(1)) * _SIZE_UNITS[unit]


def _bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _serve_parser(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("ports (as the Go EPP)")
    g.add_argument("--grpc-port", type=int, default=9002, help="ext_proc gRPC port (default 9002)")
    g.add_argument("--grpc-health-port", type=int, default=9003, help="grpc.health.v1 port (default 9003)")
    g.add_argument("--metrics-port", type=int, default=9090, help="Prometheus /metrics port (default 9090)")
    g.add_argument("--http-pick-port", type=int, default=9004,
                   help="the pick over HTTP for Envoy's ext_authz, the http-pick Envoy layout (default 9004; 0: off)")
    g.add_argument("--http-pick-header-timeout", type=_duration, default=10.0, metavar="DURATION",
                   help="the HTTP pick closes a connection whose request headers take longer (default 10s)")
    g.add_argument("--bind-address", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    g = p.add_argument_group("pool: from the Kubernetes API (as the Go EPP), a static list, or a file")
    g.add_argument("--pool-name", type=_text, default="",
                   help="the InferencePool to serve, watched through the Kubernetes API")
    g.add_argument("--pool-namespace", type=_text, default="",
                   help="its namespace (default: $NAMESPACE, else the pod's own namespace, else default)")
    g.add_argument("--pool-group", type=_text, default="inference.networking.k8s.io",
                   help="the InferencePool's API group: inference.networking.k8s.io (v1, default) or "
                        "inference.networking.x-k8s.io (v1alpha2)")
    g.add_argument("--endpoint-selector", type=_text, default="",
                   help="pool-less mode: a label selector for the model-server pods (no InferencePool)")
    g.add_argument("--endpoint-target-ports", type=_ports, action="extend", default=[], metavar="PORT[,PORT...]",
                   help="pool-less mode: the model servers' ports (one endpoint per port)")
    g.add_argument("--kubeconfig", type=_text, default=None,
                   help="kubeconfig file (default: $KUBECONFIG, the in-cluster service account, ~/.kube/config)")
    g.add_argument("--ha-enable-leader-election", nargs="?", const=True, type=_bool, default=False, metavar="BOOL",
                   help="several replicas: a coordination.k8s.io Lease picks the one that is ready; standbys "
                        "keep their state warm and take over when it lapses (default false)")
    g.add_argument("--endpoints", action="append", default=[], metavar="IP:PORT[,IP:PORT...]",
                   help="a static pool of model servers, for running without Kubernetes")
    g.add_argument("--pool-file", type=_text, metavar="YAML",
                   help="InferencePool, Pods, InferenceObjectives and InferenceModelRewrites as Kubernetes "
                        "manifests; re-read when it changes (running without a cluster)")
    g.add_argument("--pool-file-reload-interval", type=_duration, default=1.0,
                   help="how often --pool-file is checked for changes (1s)")
    g = p.add_argument_group("TLS on the ext_proc port (as the Go EPP)")
    g.add_argument("--secure-serving", nargs="?", const=True, type=_bool, default=True, metavar="BOOL",
                   help="serve ext_proc over TLS (default true); the health port stays plaintext for kubelet")
    g.add_argument("--cert-path", type=_text, default=None,
                   help="directory with tls.crt and tls.key (default: a self-signed certificate made at start)")
    g.add_argument("--enable-cert-reload", nargs="?", const=True, type=_bool, default=False, metavar="BOOL",
                   help="use a rotated pair in --cert-path for new connections, without dropping streams")
    g.add_argument("--tls-min-version", type=_text, default=None,
                   help="VersionTLS12 (what gRPC serves: TLS 1.2 and 1.3); other values are refused")
    g.add_argument("--tls-cipher-suites", type=_text, default=None,
                   help="refused: gRPC's TLS takes its cipher list only from the GRPC_SSL_CIPHER_SUITES "
                        "environment variable (OpenSSL names), set in the container's env")
    g.add_argument("--metrics-cert-dir", type=_text, default=None,
                   help="serve /metrics over TLS with tls.crt and tls.key from this directory")
    g.add_argument("--metrics-client-ca-file", type=_text, default=None,
                   help="with --metrics-cert-dir: require client certificates signed by this CA (mTLS)")
    g.add_argument("--metrics-endpoint-auth", nargs="?", const=True, type=_bool, default=None, metavar="BOOL",
                   help="/metrics only for callers whose bearer token may get /metrics (TokenReview and "
                        "SubjectAccessReview; default true where epp has a Kubernetes API)")
    g = p.add_argument_group("model-server metrics")
    g.add_argument("--refresh-metrics-interval", type=_duration, default=0.05, help="scrape interval (50ms)")
    g.add_argument("--refresh-prometheus-metrics-interval", type=_duration, default=5.0,
                   help="how often pool-level gauges are refreshed (5s)")
    g.add_argument("--metrics-staleness-threshold", type=_duration, default=2.0,
                   help="older metrics count as unknown (2s)")
    g.add_argument("--metrics-scrape-timeout", type=_duration, default=1.0, help="per-scrape timeout (1s)")
    g.add_argument("--model-server-metrics-path", type=_text, default="/metrics")
    g.add_argument("--model-server-metrics-scheme", default="http", choices=("http", "https"))
    g.add_argument("--model-server-metrics-port", type=int, default=None,
                   help="scrape this port instead of the serving port")
    g.add_argument("--engine-type", type=_text, default="vllm",
                   help="metric names: vllm, sglang, trtllm-serve, triton-tensorrt-llm or triton")
    g.add_argument("--total-queued-requests-metric", type=_text)
    g.add_argument("--total-running-requests-metric", type=_text)
    g.add_argument("--kv-cache-usage-percentage-metric", type=_text)
    g.add_argument("--lora-info-metric", type=_text, help="the LoRA info metric; an empty value turns LoRA off")
    g.add_argument("--cache-info-metric", type=_text,
                   help="the metric whose labels give the server's KV-cache geometry (block_size, num_gpu_blocks)")
    g.add_argument("--model-server-metrics-https-insecure-skip-verify", nargs="?", const=True, type=_bool,
                   default=True, metavar="BOOL",
                   help="with --model-server-metrics-scheme https: do not verify the servers' certificates "
                        "(default true, as the Go EPP)")
    g = p.add_argument_group("scheduling")
    g.add_argument("--config-file", type=_text, help="EndpointPickerConfig YAML (GIE format)")
    g.add_argument("--config-text", type=_text, help="EndpointPickerConfig YAML given inline")
    g.add_argument("--seed", type=int, default=None, help="seed tie-breaking randomness (tests, benchmarks)")
    g.add_argument("--dry-run", action="store_true",
                   help="load and check the configuration, print the resolved profile, and exit (no ports opened)")
    g = p.add_argument_group("requests")
    g.add_argument("--max-request-body-bytes", type=int, default=16 << 20,
                   help="larger request bodies get 400 (default 16 MiB)")
    g.add_argument("--explain-port", type=int, default=9005,
                   help="the explain API (`epp explain`), on 127.0.0.1 only: it shows every pod's load and what "
                        "their caches hold (default 9005; 0: off)")
    g.add_argument("--explain-headers", action="store_true",
                   help="set x-epp-endpoint and x-epp-explain (scores) on the routed request; the shipped "
                        "Envoy config copies them onto the response: for debugging")
    g.add_argument("--response-observer-grace", type=_duration, default=2.0,
                   help="a pick whose response no observer stream watches is released this long after "
                        "its ext_proc stream closes (2s)")
    g.add_argument("--prefix-index-snapshot", default="", metavar="PATH",
                   help="save the approximate prefix index to this file and load it at start, so a restarted epp "
                        "keeps routing prompts to the servers that still cache them (default: off)")
    g.add_argument("--prefix-index-snapshot-interval", type=_duration, default=5.0,
                   help="how often the prefix index snapshot is written (5s); also when epp stops")
    g.add_argument("--prefix-index-snapshot-max-age", type=_duration, default=300.0,
                   help="an older snapshot is not loaded: the servers' caches have moved on (5m)")
    g.add_argument("--grace-period", type=_duration, default=30.0,
                   help="on SIGTERM, after the drain window, how long streams in flight may take to finish (30s)")
    g.add_argument("--drain-timeout", type=_duration, default=30.0,
                   help="on SIGTERM: not ready and the Lease released at once, ext_proc still served this long, "
                        "for proxies that have not seen the change yet (30s, as llm-d-router)")
    g.add_argument("--grpc-max-recv-msg-size", type=_size, default=None, metavar="SIZE",
                   help="largest gRPC message epp accepts, e.g. 10MiB (default gRPC's 4MiB)")
    g.add_argument("--grpc-max-send-msg-size", type=_size, default=None, metavar="SIZE",
                   help="largest gRPC message epp sends, e.g. 10MiB")
    g.add_argument("--disable-endpoint-subset-filter", nargs="?", const=True, type=_bool, default=False,
                   metavar="BOOL", help="ignore the proxy's subset hint (envoy.lb.subset_hint) (default false)")
    g.add_argument("--emit-endpoint-scores", nargs="?", const=True, type=_bool, default=False, metavar="BOOL",
                   help="add each target's score to the pick's envoy.lb metadata, as "
                        "x-gateway-destination-endpoint-scores (default false)")
    g = p.add_argument_group("logs and traces (as the Go EPP)")
    g.add_argument("--v", "-v", type=int, default=logs.DEFAULT_VERBOSITY, dest="verbosity",
                   help="log verbosity: 0 info, 2 (default) as upstream, 3 verbose, 4 debug (each pick), "
                        "5 trace (prompts)")
    g.add_argument("--zap-log-level", type=_text, default=None,
                   help="debug, info, error, panic or a number N for V(N); overrides -v")
    g.add_argument("--zap-encoder", type=_text, default=None,
                   help="json (default: one JSON object per line on stderr) or console")
    g.add_argument("--zap-devel", nargs="?", const=True, type=_bool, default=False, metavar="BOOL",
                   help="development defaults: console encoder, stack traces from warn")
    g.add_argument("--zap-stacktrace-level", type=_text, default=None,
                   help="records at this level and above carry the stack: debug, info, error (default), panic")
    g.add_argument("--zap-time-encoding", type=_text, default=None,
                   help="ts as epoch (default), millis, nano, iso8601, rfc3339 or rfc3339nano")
    g.add_argument("--tracing", nargs="?", const=True, type=_bool, default=False, metavar="BOOL",
                   help="one OpenTelemetry span per request (needs pip install 'epp[tracing]'; "
                        "OTEL_TRACES_EXPORTER, OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_TRACES_SAMPLER(_ARG) as upstream; "
                        "default false)")
    g = p.add_argument_group("accepted for Go EPP compatibility (no effect)")
    for flag in _ACCEPTED_GO_FLAGS_WITH_VALUE:
        g.add_argument(flag, help=argparse.SUPPRESS)
    for flag in _ACCEPTED_GO_BOOL_FLAGS:
        g.add_argument(flag, nargs="?", const=True, type=_bool, help=argparse.SUPPRESS)


def no_effect_flags(args: argparse.Namespace) -> list[str]:
    """The Go EPP flags given on this command line that epp accepts and ignores."""
    return [f for f in (*_ACCEPTED_GO_FLAGS_WITH_VALUE, *_ACCEPTED_GO_BOOL_FLAGS)
            if getattr(args, f[2:].replace("-", "_"), None) is not None]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="epp", description="Endpoint Picker for LLM inference gateways.")
    sub = p.add_subparsers(dest="command")
    serve = sub.add_parser("serve", help="run the ext_proc server")
    _serve_parser(serve)
    ex = sub.add_parser("explain", help="ask a running epp where a request would go, and why (sends nothing)")
    ex.add_argument("--server", default="localhost:9005",
                    help="epp's explain port (localhost:9005; in a cluster: kubectl port-forward to it, or exec)")
    ex.add_argument("--path", default="/v1/completions", help="request path (/v1/completions)")
    ex.add_argument("-H", "--header", action="append", default=[], metavar="NAME: VALUE",
                    help="a request header, e.g. 'x-gateway-inference-objective: batch'")
    ex.add_argument("--subset", action="append", default=[], metavar="IP:PORT", help="restrict to these endpoints")
    ex.add_argument("--json", action="store_true", help="print the raw response as JSON")
    ex.add_argument("--timeout", type=_duration, default=5.0)
    ex.add_argument("body", help="the JSON request body, @FILE to read it from a file, or - for stdin")
    check = sub.add_parser("check-config", help="load and check an EndpointPickerConfig, print what it resolves to")
    check.add_argument("file", help="the EndpointPickerConfig YAML")
    demo = sub.add_parser("demo", help="Envoy + epp + three simulated model servers, a few requests")
    demo.add_argument("--keep", action="store_true", help="stay up after the requests (Ctrl-C to stop)")
    demo.add_argument("--base-port", type=int, default=18000, help="first of the loopback ports used")
    demo.add_argument("--layout", choices=("ext-proc", "http-pick"), default="ext-proc",
                      help="Envoy's layout: the pick over ext_proc, or over HTTP through ext_authz")
    demo.add_argument("--rollout", action="store_true",
                      help="a node-update rollout through epp gateway: the split moving live, and a rollback")
    from epp.gateway import cli as gateway_cli

    gateway_cli.add_parsers(sub)
    return p


def _options(args: argparse.Namespace):
    from epp.server import ServeOptions

    return ServeOptions(
        grpc_port=args.grpc_port,
        grpc_health_port=args.grpc_health_port,
        metrics_port=args.metrics_port,
        http_pick_port=args.http_pick_port,
        http_pick_header_timeout=args.http_pick_header_timeout,
        bind_address=args.bind_address,
        endpoints=args.endpoints,
        pool_file=args.pool_file,
        pool_file_reload_interval=args.pool_file_reload_interval,
        pool_name=args.pool_name,
        pool_namespace=args.pool_namespace,
        pool_group=args.pool_group,
        endpoint_selector=args.endpoint_selector,
        endpoint_target_ports=args.endpoint_target_ports,
        kubeconfig=args.kubeconfig,
        ha_enable_leader_election=args.ha_enable_leader_election,
        secure_serving=args.secure_serving,
        cert_path=args.cert_path,
        enable_cert_reload=args.enable_cert_reload,
        tls_min_version=args.tls_min_version,
        metrics_endpoint_auth=args.metrics_endpoint_auth,
        refresh_metrics_interval=args.refresh_metrics_interval,
        refresh_prometheus_metrics_interval=args.refresh_prometheus_metrics_interval,
        metrics_staleness_threshold=args.metrics_staleness_threshold,
        metrics_scrape_timeout=args.metrics_scrape_timeout,
        model_server_metrics_path=args.model_server_metrics_path,
        model_server_metrics_scheme=args.model_server_metrics_scheme,
        model_server_metrics_port=args.model_server_metrics_port,
        engine_type=args.engine_type,
        total_queued_requests_metric=args.total_queued_requests_metric,
        total_running_requests_metric=args.total_running_requests_metric,
        kv_cache_usage_percentage_metric=args.kv_cache_usage_percentage_metric,
        lora_info_metric=args.lora_info_metric,
        cache_info_metric=args.cache_info_metric,
        model_server_metrics_insecure_skip_verify=args.model_server_metrics_https_insecure_skip_verify,
        config_file=args.config_file,
        config_text=args.config_text,
        max_body_bytes=args.max_request_body_bytes,
        explain_headers=args.explain_headers,
        explain_port=args.explain_port,
        observer_grace=args.response_observer_grace,
        prefix_index_snapshot=args.prefix_index_snapshot,
        prefix_index_snapshot_interval=args.prefix_index_snapshot_interval,
        prefix_index_snapshot_max_age=args.prefix_index_snapshot_max_age,
        grace_period=args.grace_period,
        drain_timeout=args.drain_timeout,
        grpc_max_recv_msg_size=args.grpc_max_recv_msg_size,
        grpc_max_send_msg_size=args.grpc_max_send_msg_size,
        disable_endpoint_subset_filter=args.disable_endpoint_subset_filter,
        emit_endpoint_scores=args.emit_endpoint_scores,
        metrics_cert_dir=args.metrics_cert_dir,
        metrics_client_ca_file=args.metrics_client_ca_file,
        tracing=args.tracing,
        seed=args.seed,
    )


async def _serve(opts) -> None:
    from epp.server import EppServer

    server = EppServer(opts)
    await server.start()
    loop = asyncio.get_running_loop()
    # SIGTERM (Kubernetes stopping the pod) drains; Ctrl-C at a terminal stops without the drain window.
    loop.add_signal_handler(signal.SIGTERM, lambda: asyncio.ensure_future(server.stop()))
    loop.add_signal_handler(signal.SIGINT, lambda: asyncio.ensure_future(server.stop(drain=0)))
    await server.wait()


def _explain(args: argparse.Namespace) -> int:
    import grpc

    from epp import explain

    if args.body == "-":
        body = sys.stdin.buffer.read()
    elif args.body.startswith("@"):
        try:
            with open(args.body[1:], "rb") as f:
                body = f.read()
        except OSError as e:
            print(f"epp explain: cannot read {args.body[1:]}: {e.strerror}", file=sys.stderr)
            return 2
    else:
        body = args.body.encode()
    headers = {}
    for h in args.header:
        name, sep, value = h.partition(":")
        if not sep or not name.strip():
            print(f"epp explain: header {h!r} is not 'name: value'", file=sys.stderr)
            return 2
        headers[name.strip().lower()] = value.strip()
    try:
        resp = explain.query(args.server, body, path=args.path, headers=headers, subset=args.subset,
                             timeout=args.timeout)
    except OSError as e:
        print(f"epp explain: {args.server}: {e}", file=sys.stderr)
        return 1
    except grpc.RpcError as e:
        print(f"epp explain: {args.server}: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    print(explain.to_json(resp) if args.json else explain.render(resp))
    return 1 if resp.HasField("error") else 0


def _check_config(path: str) -> int:
    from epp.scheduling import picker_config

    try:
        config = picker_config.load_file(path, runs_flow_control=True)  # as `epp serve` loads it
    except ConfigError as e:
        print(f"epp check-config: {e}", file=sys.stderr)
        return 1
    print(picker_config.describe(config))
    return 0


def _dry_run(args: argparse.Namespace) -> int:
    """`serve --dry-run`: what serve would load (config, metric names), checked, printed; nothing bound."""
    from epp.scheduling import picker_config
    from epp.server import engine_mapper, load_picker_config

    try:
        opts = _options(args)
        config = load_picker_config(opts)
        engine_mapper(opts)
    except (ConfigError, ValueError) as e:
        print(f"epp: {e}", file=sys.stderr)
        return 1
    print(picker_config.describe(config))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv.insert(0, "serve")  # `epp --grpc-port ...` as the Go binary is run
    args = build_parser().parse_args(argv)
    if args.command is None:
        build_parser().print_help()
        return 2
    if args.command == "explain":
        return _explain(args)
    if args.command == "check-config":
        return _check_config(args.file)
    from epp.gateway import cli as gateway_cli

    if args.command in gateway_cli.COMMANDS:
        return gateway_cli.run(args)
    if args.command == "demo":
        from epp.demo import run_demo

        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        if args.rollout:
            from epp.gateway.demo import run_rollout_demo

            return run_rollout_demo(keep=args.keep, base_port=args.base_port)
        return run_demo(keep=args.keep, base_port=args.base_port, layout=args.layout)
    try:
        # A negative -v means upstream's default, as upstream validates it.
        verbosity = args.verbosity if args.verbosity >= 0 else logs.DEFAULT_VERBOSITY
        logs.configure(encoder=args.zap_encoder, verbosity=verbosity, zap_log_level=args.zap_log_level,
                       time_encoding=args.zap_time_encoding, devel=args.zap_devel,
                       stacktrace_level=args.zap_stacktrace_level)
    except ValueError as e:
        print(f"epp: {e}", file=sys.stderr)
        return 2
    for flag in no_effect_flags(args):
        log.warning("flag %s is accepted for Go EPP compatibility and has no effect in epp", flag)
    if getattr(args, "tls_cipher_suites", None):
        print("epp: --tls-cipher-suites cannot be honoured: gRPC's TLS reads its cipher list only from the "
              "GRPC_SSL_CIPHER_SUITES environment variable (OpenSSL names, e.g. ECDHE-RSA-AES128-GCM-SHA256); "
              "set that in the container's env instead", file=sys.stderr)
        return 1
    if not args.secure_serving and (args.cert_path or args.enable_cert_reload):
        log.warning("--cert-path and --enable-cert-reload have no effect with --secure-serving=false")
    if args.dry_run:
        return _dry_run(args)
    try:
        opts = _options(args)
        import uvloop

        uvloop.run(_serve(opts))
    except (ConfigError, ValueError, OSError) as e:
        print(f"epp: {e}", file=sys.stderr)
        return 1
    return 0
