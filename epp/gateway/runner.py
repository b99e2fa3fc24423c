"""`epp gateway`: Gateway API manifests in, a serving inference gateway out, edits applied live.

At start: read the manifests (any problem stops the start, each with file:line), start
one picker per InferencePool (epp.gateway.pickers), the control server (xDS for
Envoy, body-based routing), Envoy, and the admin endpoint (/status, /metrics). Then
poll the manifests every `reload_interval`; on a change, read them again and apply the
difference without restarting anything that stays:

  1. pickers of new pools start; pickers of kept pools get their new pods, objectives
     and rewrites;
  2. Envoy gets, in order and each acknowledged before the next: clusters (new pools
     added; removed ones still there), endpoints, listeners, routes;
  3. a pool no route names any more drains: its picker keeps answering for `drain_settle`
     seconds (requests that matched the old routes), then refuses new picks and gives the
     requests it picked `drain_timeout` seconds to finish; then its clusters go.

Manifests with a problem are refused whole: the error is logged and shown on /status
with file:line, and the last good configuration keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from aiohttp import web
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from epp.gateway import envoy_config, manifests
from epp.gateway.bbr import BodyBasedRouter
from epp.gateway.envoy_process import GatewayEnvoy
from epp.gateway.httproute import PoolRef
from epp.gateway.manifests import GatewaySpec, ManifestError, Pool
from epp.gateway.pickers import PoolPicker, workdir
from epp.gateway.xds import XdsRejected, XdsServer
from epp.server import ServeOptions
from epp.stack import free_ports

log = logging.getLogger(__name__)


@dataclass
class GatewayOptions:
    manifests: list[str]
    namespace: str = "default"
    address: str = "0.0.0.0"  # where the Gateway's listeners listen
    port_map: dict[int, int] = field(default_factory=dict)  # a Gateway port -> the local port used for it
    xds_port: int = 18000  # the control server: xDS and body-based routing (loopback)
    admin_port: int = 9090  # /status and /metrics; 0: off
    run_envoy: bool = True  # False: serve xDS to an Envoy started separately (`--print-bootstrap`)
    envoy_admin_port: int = 19000
    envoy_concurrency: int = 0  # Envoy's worker threads; 0: one per core
    envoy_log_level: str = "warning"
    reload_interval: float = 0.2
    drain_settle: float = 1.0
    drain_timeout: float = 30.0
    picker: ServeOptions = field(default_factory=ServeOptions)  # the template of every pool's picker


@dataclass
class _Draining:
    picker: PoolPicker
    pool: Pool
    task: asyncio.Task[None] | None = None
    stopping: bool = False


class _PoolMetrics(Collector):
    """Every picker's metrics in one exposition, each sample labelled with its pool."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    def collect(self) -> Any:
        families: dict[str, Any] = {}
        for ref, picker in list(self.gateway.pickers.items()):
            for fam in picker.server.metrics.registry.collect():
                merged = families.get(fam.name)
                if merged is None:
                    merged = families[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
                for s in fam.samples:
                    merged.samples.append(s._replace(labels={"inference_pool": str(ref), **s.labels}))
        yield from families.values()


class Gateway:
    def __init__(self, opts: GatewayOptions) -> None:
        self.opts = opts
        self.spec: GatewaySpec | None = None
        self.pickers: dict[PoolRef, PoolPicker] = {}
        self.draining: dict[PoolRef, _Draining] = {}
        self.xds = XdsServer()
        self.bbr = BodyBasedRouter(streaming=True, max_body_bytes=opts.picker.max_body_bytes)
        self.health = health_aio.HealthServicer()
        self.envoy: GatewayEnvoy | None = None
        self.generation = 0
        self.applied_at = 0.0
        self.last_apply_seconds = 0.0
        self.last_error: str | None = None
        self.last_error_at = 0.0
        self.mirror_port = 0
        self._workdir = workdir()
        self._lock = asyncio.Lock()
        self._server: grpc.aio.Server | None = None
        self._admin: web.AppRunner | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._stamp: tuple[tuple[str, int, int], ...] = ()
        self.stopped = asyncio.Event()
        self.failure: str | None = None  # why the gateway cannot go on (Envoy exited); `failed` is set
        self.failed = asyncio.Event()

    # --- start and stop -----------------------------------------------------------------
    async def start(self) -> None:
        """Everything up and serving the manifests; ManifestError (nothing started) if they have problems."""
        opts = self.opts
        files = manifests.manifest_files(opts.manifests)
        self._stamp = manifests.stamp(files)
        spec = await asyncio.to_thread(manifests.load, opts.manifests, opts.namespace)
        (self.mirror_port,) = free_ports(1)
        try:
            await self._start_control()
            if opts.run_envoy:
                self.envoy = GatewayEnvoy(self.xds_port, opts.envoy_admin_port, concurrency=opts.envoy_concurrency,
                                          log_level=opts.envoy_log_level, drain_seconds=opts.drain_timeout)
                self.envoy.start()
                await asyncio.to_thread(self.envoy.wait_live)
            await self._install(spec, time.monotonic())
            if self.last_error is not None:
                raise RuntimeError(self.last_error)
            if opts.admin_port:
                await self._start_admin()
        except BaseException:
            await self.stop()
            raise
        self._tasks.append(asyncio.create_task(self._watch()))
        log.info("epp gateway serving %s: %d listeners (%s), %d routes, %d pools; xDS on 127.0.0.1:%d%s",
                 ", ".join(opts.manifests), len(spec.listeners),
                 ", ".join(f"{opts.address}:{envoy_config.local_port(lst, self.opts.port_map)}"
                           for lst in spec.listeners),
                 len(spec.routes), len(spec.pools), self.xds_port,
                 f", status on :{opts.admin_port}/status" if opts.admin_port else "")
        if spec.skipped:
            log.info("skipped (not used by the gateway): %s",
                     ", ".join(f"{n} {k}" for k, n in sorted(spec.skipped.items())))

    async def _start_control(self) -> None:
        server = grpc.aio.server(options=[("grpc.max_concurrent_streams", 100000)])
        server.add_generic_rpc_handlers((self.xds.handler(), self.bbr.handler()))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        port = server.add_insecure_port(f"127.0.0.1:{self.opts.xds_port}")
        if not port:
            raise OSError(f"cannot listen on 127.0.0.1:{self.opts.xds_port} (--xds-port)")
        self.xds_port = port
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        await server.start()
        self._server = server

    async def _start_admin(self) -> None:
        app = web.Application()
        app.router.add_get("/status", self._status_handler)
        app.router.add_get("/metrics", self._metrics_handler)
        app.router.add_get("/readyz", self._ready_handler)
        self._admin = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._admin.setup()
        await web.TCPSite(self._admin, self.opts.address, self.opts.admin_port).start()

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for d in list(self.draining.values()):
            if d.task is not None:
                d.task.cancel()
        await asyncio.gather(*self._tasks, *(d.task for d in self.draining.values() if d.task),
                             return_exceptions=True)
        if self.envoy is not None:
            await asyncio.to_thread(self.envoy.stop)
        await asyncio.gather(*(p.stop(1.0) for p in self.pickers.values()), return_exceptions=True)
        self.pickers.clear()
        if self._server is not None:
            await self._server.stop(1.0)
        if self._admin is not None:
            await self._admin.cleanup()
        self._workdir.cleanup()
        self.stopped.set()

    # --- applying manifests -------------------------------------------------------------
    def _ports(self) -> envoy_config.Ports:
        pickers = {ref: p.port for ref, p in self.pickers.items()}
        return envoy_config.Ports(pickers, self.xds_port, self.mirror_port, self.opts.address, self.opts.port_map)

    async def reload(self) -> bool:
        """Read the manifests again and apply them; False (and the last good configuration kept) on a problem."""
        detected = time.monotonic()
        try:
            spec = await asyncio.to_thread(manifests.load, self.opts.manifests, self.opts.namespace)
        except ManifestError as e:
            self._refused(str(e))
            return False
        return await self._install(spec, detected)

    def _refused(self, message: str) -> None:
        self.last_error, self.last_error_at = message, time.time()
        log.error("manifests not applied, the last good configuration stays: %s", message)

    async def _install(self, spec: GatewaySpec, detected: float) -> bool:
        async with self._lock:
            self.bbr.base_models = spec.base_models
            for ref, pool in spec.pools.items():
                draining = self.draining.get(ref)
                if draining is not None:
                    self._undrain(ref, draining)
                if ref in self.pickers:
                    self.pickers[ref].update(pool)
                else:
                    try:
                        picker = PoolPicker(pool, self.opts.picker, Path(self._workdir.name))
                        await picker.start()
                    except (ValueError, OSError) as e:  # a picker setting it cannot serve, a port taken
                        self._refused(f"pool {ref}: its picker did not start: {e}")
                        return False
                    self.pickers[ref] = picker
            gone = {ref: p for ref, p in self.pickers.items() if ref not in spec.pools and ref not in self.draining}
            keep = {**self._draining_pools(), **{ref: p.pool for ref, p in gone.items()}}
            try:
                await self.xds.apply(envoy_config.build(spec, self._ports(), keep))
            except XdsRejected as e:
                self._refused(str(e))
                return False
            self.spec = spec
            for ref, picker in gone.items():
                d = self.draining[ref] = _Draining(picker, picker.pool)
                d.task = asyncio.create_task(self._drain(ref))
            self.generation += 1
            self.applied_at = time.time()
            self.last_apply_seconds = time.monotonic() - detected
            self.last_error = None
            log.info("configuration %d applied in %.0f ms: %d routes, pools %s%s", self.generation,
                     self.last_apply_seconds * 1000, len(spec.routes), ", ".join(map(str, spec.pools)) or "none",
                     f"; draining {', '.join(map(str, gone))}" if gone else "")
            return True

    def _draining_pools(self) -> dict[PoolRef, Pool]:
        return {ref: d.pool for ref, d in self.draining.items()}

    def _undrain(self, ref: PoolRef, d: _Draining) -> None:
        """A pool back in the manifests while it drains: its picker stays if it still takes picks,
        else a new one takes over (the old one finishes its requests in flight on its own)."""
        self.draining.pop(ref, None)
        if d.stopping:
            self.pickers.pop(ref, None)
        elif d.task is not None:
            d.task.cancel()

    async def _drain(self, ref: PoolRef) -> None:
        d = self.draining[ref]
        await asyncio.sleep(self.opts.drain_settle)
        d.stopping = True
        log.info("pool %s: no route uses it; %d requests in flight get up to %.0f s", ref, d.picker.in_flight,
                 self.opts.drain_timeout)
        await d.picker.stop(self.opts.drain_timeout)
        async with self._lock:
            if self.draining.get(ref) is not d:
                return
            del self.draining[ref]
            self.pickers.pop(ref, None)
            if self.spec is not None:
                try:
                    await self.xds.apply(envoy_config.build(self.spec, self._ports(), self._draining_pools()))
                except XdsRejected as e:
                    log.error("removing pool %s from Envoy: %s", ref, e)
            log.info("pool %s removed", ref)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.opts.reload_interval)
            if self.envoy is not None and not self.envoy.running:
                self.failure = f"Envoy exited unexpectedly:\n{self.envoy.logs()}"
                log.error("%s", self.failure)
                self.failed.set()
                return
            try:
                files = await asyncio.to_thread(manifests.manifest_files, self.opts.manifests)
            except ManifestError as e:
                if self.last_error != str(e):
                    self._refused(str(e))
                continue
            current = await asyncio.to_thread(manifests.stamp, files)
            if current == self._stamp:
                continue
            self._stamp = current
            try:
                await self.reload()
            except Exception:  # a bug must not end the watch: the last good configuration keeps serving
                log.exception("applying the manifests failed; the last good configuration stays")

    # --- admin endpoint -----------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        spec = self.spec
        pools: dict[str, Any] = {}
        for ref, p in self.pickers.items():
            snap = p.pool.snapshot
            pools[str(ref)] = {
                "state": "draining" if ref in self.draining else "serving", "picker_port": p.port,
                "endpoints": [ep.hostport for ep in snap.endpoints],
                "ready": sum(ep.ready for ep in snap.endpoints), "in_flight": p.in_flight,
                "objectives": dict(snap.objectives), "rewrite_rules": len(snap.rewrites),
                "fail_open": p.pool.fail_open,
            }
        routes = []
        for r in spec.routes if spec else ():
            routes.append({"name": r.key, "where": r.where, "rules": [
                {"backends": {str(b.pool): b.weight for b in rule.backends},
                 "mirrors": {str(m.pool): m.percent for m in rule.mirrors}} for rule in r.rules]})
        return {
            "generation": self.generation, "applied_at": self.applied_at,
            "last_apply_seconds": self.last_apply_seconds, "last_error": self.last_error,
            "last_error_at": self.last_error_at, "files": list(spec.files) if spec else [],
            "listeners": [{"gateway": lst.gateway, "name": lst.name, "port": lst.port,
                           "local_port": envoy_config.local_port(lst, self.opts.port_map)}
                          for lst in (spec.listeners if spec else ())],
            "routes": routes, "pools": pools, "base_models": dict(self.bbr.base_models.adapters),
            "envoy": {"connected": self.xds.streams, "versions": {_short(t): v
                                                                  for t, v in self.xds.versions.items()}},
        }

    async def _status_handler(self, request: web.Request) -> web.Response:
        return web.json_response(self.status())

    async def _ready_handler(self, request: web.Request) -> web.Response:
        ok = self.generation > 0 and (self.envoy is None or self.envoy.running)
        return web.Response(status=200 if ok else 503, text="ok" if ok else "not ready")

    async def _metrics_handler(self, request: web.Request) -> web.Response:
        registry = CollectorRegistry()
        registry.register(_PoolMetrics(self))
        body = await asyncio.to_thread(generate_latest, registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_PLAIN_0_0_4})


def _short(type_url: str) -> str:
    return type_url.rsplit(".", 1)[-1]

