"""The `epp gateway` and `epp bbr` sub-commands: their flags and what running them does.

`add_parsers(subparsers)` adds both to epp's command line; `run(args)` runs the one chosen.
`python -m epp.gateway gateway|bbr ...` runs them without the rest of epp's CLI.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from typing import Any

from epp.durations import parse_duration

log = logging.getLogger("epp.gateway")

COMMANDS = ("gateway", "bbr")


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "t", "true", "yes", "on"):
        return True
    if value in ("0", "f", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _port_map(text: str) -> dict[int, int]:
    out = {}
    for part in text.split(","):
        if not part.strip():
            continue
        src, sep, dst = part.partition("=")
        try:
            a, b = int(src), int(dst)
        except ValueError:
            a = b = 0
        if not sep or not (0 < a < 65536 and 0 < b < 65536):
            raise argparse.ArgumentTypeError(f"expected GATEWAY_PORT=LOCAL_PORT (e.g. 80=8080), got {part!r}")
        out[a] = b
    return out


def add_parsers(subparsers: Any) -> None:
    """Add `gateway` and `bbr` to epp's sub-command parsers."""
    gw = subparsers.add_parser(
        "gateway", help="a local inference gateway from Gateway API manifests (Envoy configured over xDS)",
        description="Serve the Gateways, HTTPRoutes and InferencePools in the manifests: a real Envoy, configured "
                    "over xDS, and one epp picker per InferencePool. Edits of the manifests apply live.")
    gw.add_argument("--manifests", nargs="+", action="extend", required=True, metavar="DIR|FILE",
                    help="YAML files, or directories of them (*.yaml, *.yml, *.json), watched for edits")
    gw.add_argument("--namespace", default="default", help="the namespace of objects that name none (default)")
    gw.add_argument("--address", default="0.0.0.0", help="address the Gateway listeners listen on (0.0.0.0)")
    gw.add_argument("--port-map", type=_port_map, action="append", default=[], metavar="PORT=LOCAL",
                    help="serve a Gateway listener's port on another local port, e.g. 80=8080 (repeatable)")
    gw.add_argument("--xds-port", type=int, default=18000,
                    help="loopback port of the xDS server (and body-based routing) Envoy talks to (18000; 0: any)")
    gw.add_argument("--admin-port", type=int, default=9090,
                    help="GET /status (what is applied, the last error), /metrics (every pool's), /readyz "
                         "(9090; 0: off)")
    gw.add_argument("--no-envoy", dest="run_envoy", action="store_false",
                    help="do not start Envoy: serve xDS to one started with --print-bootstrap's file, on this host")
    gw.add_argument("--print-bootstrap", action="store_true",
                    help="print the Envoy bootstrap for these ports and exit")
    gw.add_argument("--envoy-admin-port", type=int, default=19000, help="Envoy's admin port, on loopback (19000)")
    gw.add_argument("--envoy-concurrency", type=int, default=0, help="Envoy worker threads (0: one per core)")
    gw.add_argument("--envoy-log-level", default="warning", help="Envoy's --log-level (warning)")
    gw.add_argument("--reload-interval", type=_duration, default=0.2,
                    help="how often the manifests are checked (200ms)")
    gw.add_argument("--drain-settle", type=_duration, default=1.0,
                    help="a removed pool's picker still answers this long after routes stop naming it (1s)")
    gw.add_argument("--drain-timeout", type=_duration, default=30.0,
                    help="then the requests in flight to it get this long to finish (30s)")
    picker = gw.add_argument_group("every pool's picker (as `epp serve`)")
    picker.add_argument("--config-file", help="EndpointPickerConfig YAML for every pool (default: epp's default)")
    picker.add_argument("--refresh-metrics-interval", type=_duration, default=0.05,
                        help="model-server scrape interval (50ms)")
    picker.add_argument("--metrics-staleness-threshold", type=_duration, default=2.0,
                        help="metrics older than this count as unknown (2s)")
    picker.add_argument("--engine-type", default="vllm", help="model-server metric names: vllm, sglang, trtllm")
    picker.add_argument("--max-request-body-bytes", type=int, default=16 << 20, help="request body limit (16 MiB)")
    picker.add_argument("--explain-headers", action="store_true",
                        help="put the pick and its scores on each request (x-epp-endpoint, x-epp-explain)")
    picker.add_argument("--seed", type=int, default=None, help="seed random choices (ties, model rewrites)")
    gw.add_argument("--v", "-v", dest="verbosity", type=int, default=2, help="log verbosity (4+: debug)")

    bbr = subparsers.add_parser(
        "bbr", help="body-based routing alone: the body's model as X-Gateway-Model-Name, for any Envoy",
        description="An ext_proc server that sets X-Gateway-Model-Name and X-Gateway-Base-Model-Name from the "
                    "request body and clears Envoy's route cache, as upstream's body-based router.")
    bbr.add_argument("--grpc-port", type=int, default=9004, help="ext_proc port (9004)")
    bbr.add_argument("--grpc-health-port", type=int, default=9005, help="grpc.health.v1 port (9005)")
    bbr.add_argument("--bind-address", default="0.0.0.0", help="address to listen on (0.0.0.0)")
    bbr.add_argument("--streaming", type=_bool, nargs="?", const=True, default=False,
                     help="assume FULL_DUPLEX_STREAMED when Envoy does not say its body mode (it does from 1.33)")
    bbr.add_argument("--secure-serving", type=_bool, nargs="?", const=True, default=True,
                     help="TLS on the ext_proc port, self-signed unless --cert-path (true, as upstream)")
    bbr.add_argument("--cert-path", help="directory with tls.crt and tls.key")
    bbr.add_argument("--mapping", nargs="+", action="extend", default=[], metavar="DIR|FILE",
                     help="ConfigMaps labelled inference.networking.k8s.io/bbr-managed=true (data.baseModel, "
                          "data.adapters): the base model of each LoRA adapter; re-read when they change")
    bbr.add_argument("--max-request-body-bytes", type=int, default=16 << 20, help="request body limit (16 MiB)")
    bbr.add_argument("--v", "-v", dest="verbosity", type=int, default=2, help="log verbosity (4+: debug)")


def run(args: argparse.Namespace) -> int:
    """Run `epp gateway` or `epp bbr` as parsed by the parsers above; the exit status."""
    level = logging.DEBUG if args.verbosity >= 4 else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if args.command == "bbr":
        return _run_bbr(args)
    return _run_gateway(args)


def gateway_options(args: argparse.Namespace) -> Any:
    from epp.gateway.runner import GatewayOptions
    from epp.server import ServeOptions

    port_map: dict[int, int] = {}
    for m in args.port_map:
        port_map.update(m)
    picker = ServeOptions(
        config_file=args.config_file, refresh_metrics_interval=args.refresh_metrics_interval,
        metrics_staleness_threshold=args.metrics_staleness_threshold, engine_type=args.engine_type,
        max_body_bytes=args.max_request_body_bytes, explain_headers=args.explain_headers, seed=args.seed,
        grace_period=args.drain_timeout)
    return GatewayOptions(
        manifests=args.manifests, namespace=args.namespace, address=args.address, port_map=port_map,
        xds_port=args.xds_port, admin_port=args.admin_port, run_envoy=args.run_envoy,
        envoy_admin_port=args.envoy_admin_port, envoy_concurrency=args.envoy_concurrency,
        envoy_log_level=args.envoy_log_level, reload_interval=args.reload_interval, drain_settle=args.drain_settle,
        drain_timeout=args.drain_timeout, picker=picker)


def _run_gateway(args: argparse.Namespace) -> int:
    from epp.errors import ConfigError
    from epp.gateway.envoy_process import bootstrap
    from epp.gateway.manifests import ManifestError

    if args.print_bootstrap:
        print(bootstrap(args.xds_port, args.envoy_admin_port), end="")
        return 0
    opts = gateway_options(args)
    try:
        import uvloop

        return uvloop.run(_serve_gateway(opts))
    except ManifestError as e:
        print(f"epp gateway: {e}", file=sys.stderr)
    except (ConfigError, ValueError, OSError, RuntimeError, TimeoutError) as e:
        print(f"epp gateway: {e}", file=sys.stderr)
    return 1


async def _serve_gateway(opts: Any) -> int:
    from epp.gateway.runner import Gateway

    gateway = Gateway(opts)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await gateway.start()
    waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(gateway.failed.wait())]
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for w in waits:
        w.cancel()
    await gateway.stop()
    if gateway.failure:
        print(f"epp gateway: {gateway.failure}", file=sys.stderr)
        return 1
    return 0


def _run_bbr(args: argparse.Namespace) -> int:
    from epp.gateway.base_models import BaseModelError
    from epp.gateway.manifests import ManifestError

    try:
        import uvloop

        return uvloop.run(_serve_bbr(args))
    except (ManifestError, BaseModelError, OSError, ValueError) as e:
        print(f"epp bbr: {e}", file=sys.stderr)
    return 1


async def _serve_bbr(args: argparse.Namespace) -> int:
    from epp.gateway.bbr import BbrServer, BodyBasedRouter
    from epp.gateway.mapping import MappingWatcher

    watcher = MappingWatcher(args.mapping) if args.mapping else None
    router = BodyBasedRouter(watcher.load() if watcher else None, streaming=args.streaming,
                             max_body_bytes=args.max_request_body_bytes)
    server = BbrServer(router, grpc_port=args.grpc_port, health_port=args.grpc_health_port,
                       bind_address=args.bind_address, secure_serving=args.secure_serving, cert_path=args.cert_path)
    await server.start()
    tasks = [asyncio.create_task(watcher.run(router))] if watcher else []
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for t in tasks:
        t.cancel()
    await server.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m epp.gateway")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parsers(sub)
    return run(parser.parse_args(argv))
