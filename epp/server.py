"""Assemble and run the EPP: datastore, discovery, scraper, director, gRPC servers, HTTP pick, /metrics.

Health (grpc.health.v1) answers SERVING only once the pool is known, for the empty
service name, the ext_proc service name, "readiness" and "liveness", on the health
port and on the ext_proc port (so an Envoy health check of the ext_proc cluster
works too). SIGTERM: health goes NOT_SERVING, new streams are refused, streams in
flight get `grace_period` to finish.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from epp._proto import explain_pb2_grpc
from epp.datalayer import engines
from epp.datalayer.scraper import MetricsScraper
from epp.datastore import Datastore, Endpoint
from epp.director import Director
from epp.discovery import manifests
from epp.discovery.static import static_endpoints
from epp.errors import ConfigError
from epp.exchanges import Exchanges
from epp.explain import ExplainService
from epp.extproc.processor import SERVICE, ExternalProcessor
from epp.handoff import Handoffs
from epp.http_pick import HttpPick
from epp.metrics import EppMetrics
from epp.rewrites import ModelRewrites
from epp.scheduling import picker_config
from epp.scheduling.framework import PrefixIndexHolder

log = logging.getLogger(__name__)

HEALTH_SERVICES = ("", SERVICE, "readiness", "liveness")


@dataclass
class ServeOptions:
    grpc_port: int = 9002
    grpc_health_port: int = 9003
    metrics_port: int = 9090
    http_pick_port: int = 0  # the CLI's default is 9004; 0: no HTTP pick server
    bind_address: str = "0.0.0.0"
    endpoints: list[str] = field(default_factory=list)
    pool_file: str | None = None
    pool_file_reload_interval: float = 1.0
    pool_name: str = "default"
    pool_namespace: str = "default"
    refresh_metrics_interval: float = 0.05
    refresh_prometheus_metrics_interval: float = 5.0
    metrics_staleness_threshold: float = 2.0
    metrics_scrape_timeout: float = 1.0
    model_server_metrics_path: str = "/metrics"
    model_server_metrics_scheme: str = "http"
    model_server_metrics_port: int | None = None
    engine_type: str = "vllm"
    total_queued_requests_metric: str | None = None
    total_running_requests_metric: str | None = None
    kv_cache_usage_percentage_metric: str | None = None
    lora_info_metric: str | None = None
    model_server_metrics_insecure_skip_verify: bool = True
    config_file: str | None = None
    config_text: str | None = None
    max_body_bytes: int = 16 << 20
    explain_headers: bool = False
    observer_grace: float = 2.0
    grace_period: float = 30.0
    seed: int | None = None


def load_picker_config(opts: ServeOptions) -> picker_config.PickerConfig:
    if opts.config_file and opts.config_text:
        raise ConfigError("--config-file and --config-text cannot both be set")
    if opts.config_file:
        return picker_config.load_file(opts.config_file, seed=opts.seed)
    if opts.config_text:
        return picker_config.load_text(opts.config_text, "--config-text", seed=opts.seed)
    return picker_config.default_config(seed=opts.seed)


def engine_mapper(opts: ServeOptions) -> dict[str, engines.EngineMapping]:
    """Engine name -> mapping, with the metric-name flags applied to the default engine."""
    if opts.engine_type not in engines.ENGINES:
        raise ValueError(f"unknown --engine-type {opts.engine_type!r}; known: {', '.join(engines.ENGINES)}")
    by_name = dict(engines.ENGINES)
    by_name[opts.engine_type] = engines.with_overrides(
        by_name[opts.engine_type],
        queue=opts.total_queued_requests_metric,
        running=opts.total_running_requests_metric,
        kv_usage=opts.kv_cache_usage_percentage_metric,
        lora_info=opts.lora_info_metric,
    )
    return by_name


class EppServer:
    def __init__(self, opts: ServeOptions) -> None:
        self.opts = opts
        # Fail at start-up, before binding anything, on any configuration problem.
        self.picker_config = load_picker_config(opts)
        self.engines = engine_mapper(opts)
        self.datastore = Datastore(staleness=opts.metrics_staleness_threshold)
        self.metrics = EppMetrics(opts.pool_name)
        self.director = Director(self.datastore, self.picker_config, self.metrics,
                                 explain_headers=opts.explain_headers)
        self.exchanges = Exchanges(self.director, self.metrics, observer_grace=opts.observer_grace)
        self.handoffs = Handoffs(grace=opts.observer_grace)
        self.processor = ExternalProcessor(self.exchanges, self.handoffs, max_body_bytes=opts.max_body_bytes)
        self.http_pick = (
            HttpPick(self.exchanges, self.handoffs, max_body_bytes=opts.max_body_bytes,
                     grace_period=opts.grace_period)
            if opts.http_pick_port else None
        )
        self.scraper = MetricsScraper(
            self.datastore,
            self._mapping_for,
            interval=opts.refresh_metrics_interval,
            timeout=opts.metrics_scrape_timeout,
            path=opts.model_server_metrics_path,
            scheme=opts.model_server_metrics_scheme,
            verify_tls=not opts.model_server_metrics_insecure_skip_verify,
        )
        self.health = health_aio.HealthServicer()
        self._servers: list[grpc.aio.Server] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()
        self.initial_endpoints: list[Endpoint] = static_endpoints(opts.endpoints, opts.model_server_metrics_port)
        self._started = False
        self.pool_file: manifests.PoolFileWatcher | None = None
        if opts.pool_file:
            snap = manifests.read(opts.pool_file, opts.pool_name, opts.pool_namespace)
            if snap.has_pool and self.initial_endpoints:
                raise manifests.ManifestError(
                    f"{opts.pool_file} defines an InferencePool and --endpoints lists a pool too; give one of them"
                )
            self.apply_pool_file(snap)
            self.pool_file = manifests.PoolFileWatcher(
                opts.pool_file, opts.pool_name, opts.pool_namespace, self.apply_pool_file,
                interval=opts.pool_file_reload_interval,
            )

    def apply_pool_file(self, snap: manifests.PoolSnapshot) -> None:
        """Install what the pool file says: objectives and rewrites always, endpoints if it has a pool."""
        self.datastore.objectives = snap.objectives
        self.datastore.rewrites = ModelRewrites(snap.rewrites, seed=self.opts.seed)
        if snap.has_pool:
            for ep in snap.endpoints:
                ep.metrics_port = self.opts.model_server_metrics_port
            if self._started:
                self.datastore.set_endpoints(snap.endpoints)
            else:
                self.initial_endpoints = snap.endpoints

    def _mapping_for(self, ep: Endpoint) -> engines.EngineMapping:
        engine = ep.labels.get(engines.ENGINE_LABEL, self.opts.engine_type)
        return self.engines.get(engine, self.engines[self.opts.engine_type])

    async def start(self) -> None:
        opts = self.opts
        main = grpc.aio.server(options=[("grpc.max_concurrent_streams", 100000)])
        main.add_generic_rpc_handlers((self.processor.handler(),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, main)
        explain_pb2_grpc.add_ExplainServicer_to_server(ExplainService(self.director), main)
        self._bind(main, opts.grpc_port)
        self._servers.append(main)
        if opts.grpc_health_port and opts.grpc_health_port != opts.grpc_port:
            hs = grpc.aio.server()
            health_pb2_grpc.add_HealthServicer_to_server(self.health, hs)
            self._bind(hs, opts.grpc_health_port)
            self._servers.append(hs)
        if opts.metrics_port:
            self.metrics.serve(opts.metrics_port, opts.bind_address)
        for name in HEALTH_SERVICES:
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.health.set("liveness", health_pb2.HealthCheckResponse.SERVING)
        for s in self._servers:
            await s.start()
        if self.http_pick is not None:
            await self.http_pick.start(opts.bind_address, opts.http_pick_port)
        self.scraper.start()
        if self.initial_endpoints or self.pool_file is not None:
            self.datastore.set_endpoints(self.initial_endpoints)
        self._started = True
        await self._update_health()
        self._tasks.append(asyncio.create_task(self._pool_metrics_loop()))
        if self.pool_file is not None:
            self._tasks.append(asyncio.create_task(self.pool_file.run()))
        log.info(
            "epp serving ext_proc on :%d, HTTP pick on :%s, health on :%d, metrics on :%d; pool %s with %d endpoints",
            opts.grpc_port, opts.http_pick_port or "off", opts.grpc_health_port, opts.metrics_port, opts.pool_name,
            len(self.datastore.all_endpoints()),
        )

    def _bind(self, server: grpc.aio.Server, port: int) -> None:
        addr = f"{self.opts.bind_address}:{port}"
        if server.add_insecure_port(addr) == 0:
            raise OSError(f"cannot listen on {addr}")

    async def _update_health(self) -> None:
        serving = self.datastore.pool_synced and not self._stopping.is_set()
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in HEALTH_SERVICES:
            if name != "liveness":
                await self.health.set(name, status)
        if self.http_pick is not None:
            self.http_pick.serving = serving

    async def _pool_metrics_loop(self) -> None:
        holders = [p for p in self.picker_config.scheduler.plugins if isinstance(p, PrefixIndexHolder)]
        while True:
            self.metrics.update_pool(self.datastore)
            if holders:
                self.metrics.prefix_indexer_size.set(sum(p.prefix_index_size() for p in holders))
            await asyncio.sleep(self.opts.refresh_prometheus_metrics_interval)

    async def stop(self, grace: float | None = None) -> None:
        """Refuse new streams, let those in flight finish (up to the grace period), then stop."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        await self._update_health()
        grace = self.opts.grace_period if grace is None else grace
        stops = [s.stop(grace) for s in self._servers]
        if self.http_pick is not None:
            stops.append(self.http_pick.stop())
        await asyncio.gather(*stops)
        for t in self._tasks:
            t.cancel()
        self.scraper.stop()
        log.info("epp stopped")

    async def wait(self) -> None:
        await self._stopping.wait()
        await asyncio.gather(*(s.wait_for_termination() for s in self._servers))
