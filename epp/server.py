"""Assemble and run the EPP: datastore, discovery, scraper, director, gRPC servers, HTTP pick, /metrics.

Discovery is one of three sources, all feeding the datastore through one snapshot path:
a static list (`--endpoints`), a pool file (`--pool-file`), or the Kubernetes API
(`--pool-name` or `--endpoint-selector`, as the Go EPP runs in a cluster).

Health (grpc.health.v1), on the health port and on the ext_proc port (so an Envoy
health check of the ext_proc cluster works too): `liveness` is SERVING while the
process runs; every other name the upstream charts and probes use ("", the ext_proc
service, `inference-extension`, `readiness`) is SERVING only once the pool is synced,
and, with `--ha-enable-leader-election`, only on the leader. A standby keeps its
datastore warm and takes over when the leader's Lease lapses. SIGTERM: health goes
NOT_SERVING, new streams are refused, streams in flight get `grace_period` to finish.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from epp import logs, tls
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
from epp.metrics_endpoint import MetricsEndpoint
from epp.rewrites import ModelRewrites
from epp.scheduling import datalayer_config, picker_config
from epp.scheduling.framework import PrefixIndexHolder
from epp.scheduling.index_snapshot import IndexSnapshots, approximate_indexes

if TYPE_CHECKING:
    from lightkube import AsyncClient

    from epp.discovery.kubernetes import KubernetesDiscovery
    from epp.leader_election import LeaderElector

log = logging.getLogger(__name__)

LIVENESS = "liveness"
# Every name that means "ready to route": upstream's charts probe `inference-extension`; Envoy's
# health check of the ext_proc cluster asks for the ext_proc service; conformance manifests use "".
READINESS_SERVICES = ("", SERVICE, "inference-extension", "readiness")
HEALTH_SERVICES = (*READINESS_SERVICES, LIVENESS)
POOL_GROUP = "inference.networking.k8s.io"
DEFAULT_POOL_LABEL = "default"  # the pool label of epp's metrics when no pool is named


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
    pool_name: str = ""
    pool_namespace: str = ""  # "": $NAMESPACE, the service account's namespace, then "default"
    pool_group: str = POOL_GROUP
    endpoint_selector: str = ""  # pool-less mode: the pods' label selector
    endpoint_target_ports: list[int] = field(default_factory=list)
    kubeconfig: str | None = None
    ha_enable_leader_election: bool = False
    # TLS on the ext_proc port. The CLI's default is on, as the Go EPP; off here for in-process use.
    secure_serving: bool = False
    cert_path: str | None = None
    enable_cert_reload: bool = False
    tls_min_version: str | None = None
    # /metrics behind TokenReview + SubjectAccessReview. None: the Go EPP's default, on where epp
    # talks to a Kubernetes API, off (said once at start) for --endpoints and --pool-file.
    metrics_endpoint_auth: bool | None = None
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
    cache_info_metric: str | None = None
    model_server_metrics_insecure_skip_verify: bool = True
    config_file: str | None = None
    config_text: str | None = None
    max_body_bytes: int = 16 << 20
    grpc_max_recv_msg_size: int | None = None  # bytes; None: gRPC's default (4 MiB)
    grpc_max_send_msg_size: int | None = None
    disable_endpoint_subset_filter: bool = False
    emit_endpoint_scores: bool = False
    # /metrics over TLS (llm-d-router's --metrics-cert-dir: tls.crt, tls.key), with client certificates
    # verified against --metrics-client-ca-file when given.
    metrics_cert_dir: str | None = None
    metrics_client_ca_file: str | None = None
    # On SIGTERM: not ready (and the Lease released) at once, ext_proc still served this long.
    drain_timeout: float = 0.0
    explain_headers: bool = False
    # The explain API (every candidate's scores, the prefix cache's view): on 127.0.0.1 only, so only a
    # caller inside the pod (kubectl exec / port-forward) can ask. 0: off.
    explain_port: int = 0
    observer_grace: float = 2.0
    # The approximate prefix indexes saved here and loaded at start (epp.scheduling.index_snapshot); "": off.
    prefix_index_snapshot: str = ""
    prefix_index_snapshot_interval: float = 5.0
    prefix_index_snapshot_max_age: float = 300.0
    grace_period: float = 30.0
    # The HTTP pick port closes a connection whose request headers take longer than this (slowloris).
    http_pick_header_timeout: float = 10.0
    # --tracing: one OpenTelemetry span per pick (epp.logs.setup_tracing; the SDK must be installed).
    tracing: bool = False
    seed: int | None = None

    @property
    def from_kubernetes(self) -> bool:
        """The pool comes from the Kubernetes API (not --endpoints, not --pool-file)."""
        return not self.endpoints and not self.pool_file and bool(self.pool_name or self.endpoint_selector)


def load_picker_config(opts: ServeOptions) -> picker_config.PickerConfig:
    if opts.config_file and opts.config_text:
        raise ConfigError("--config-file and --config-text cannot both be set")
    # The server runs flow control (the flowControl feature gate) with the config's section.
    if opts.config_file:
        return picker_config.load_file(opts.config_file, seed=opts.seed, runs_flow_control=True)
    if opts.config_text:
        return picker_config.load_text(opts.config_text, "--config-text", seed=opts.seed, runs_flow_control=True)
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
        cache_info=opts.cache_info_metric,
    )
    return by_name


def _check_pool_source(opts: ServeOptions) -> None:
    if opts.endpoint_selector and opts.pool_name and not (opts.endpoints or opts.pool_file):
        raise ConfigError("--pool-name and --endpoint-selector cannot both be set: name the InferencePool, "
                          "or select its pods directly (pool-less mode), not both")
    if opts.endpoint_target_ports and not opts.endpoint_selector:
        raise ConfigError("--endpoint-target-ports needs --endpoint-selector")
    if opts.endpoint_selector and not opts.endpoint_target_ports:
        raise ConfigError("--endpoint-selector needs --endpoint-target-ports (the model servers' ports)")
    if not (opts.endpoints or opts.pool_file or opts.pool_name or opts.endpoint_selector):
        raise ConfigError("no pool to serve: give --pool-name (an InferencePool in Kubernetes), --endpoint-selector "
                          "with --endpoint-target-ports, --endpoints IP:PORT,... or --pool-file FILE")


def _metrics_ssl(cert_dir: str | None, client_ca: str | None) -> ssl.SSLContext | None:
    """TLS for /metrics, as llm-d-router's --metrics-cert-dir (and mTLS with --metrics-client-ca-file)."""
    if client_ca and not cert_dir:
        raise ConfigError("--metrics-client-ca-file needs --metrics-cert-dir (the metrics server's own certificate)")
    if not cert_dir:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(os.path.join(cert_dir, tls.CERT_FILE), os.path.join(cert_dir, tls.KEY_FILE))
        if client_ca:
            ctx.load_verify_locations(client_ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"metrics TLS: cannot load {cert_dir} / {client_ca or 'no client CA'}: {e}") from None
    return ctx


class EppServer:
    def __init__(self, opts: ServeOptions) -> None:
        self.opts = opts
        # Fail at start-up, before binding anything, on any configuration problem.
        _check_pool_source(opts)
        self.picker_config = load_picker_config(opts)
        self.data_layer = self.picker_config.data_layer
        self.engines = datalayer_config.engine_mappings(self.data_layer, engine_mapper(opts))
        self.tls = (tls.serving_tls(opts.cert_path, reload=opts.enable_cert_reload, min_version=opts.tls_min_version)
                    if opts.secure_serving else None)
        self.datastore = Datastore(staleness=opts.metrics_staleness_threshold)
        self.metrics = EppMetrics(opts.pool_name or DEFAULT_POOL_LABEL)
        self.director = Director(self.datastore, self.picker_config, self.metrics,
                                 explain_headers=opts.explain_headers, emit_endpoint_scores=opts.emit_endpoint_scores,
                                 honor_subset_hint=not opts.disable_endpoint_subset_filter,
                                 flow_recheck=opts.refresh_metrics_interval)
        try:
            self.director.tracer = logs.setup_tracing(opts.tracing)
        except RuntimeError as e:  # the OpenTelemetry SDK is missing: say what to install
            raise ConfigError(str(e)) from None
        self.snapshots = (
            IndexSnapshots(opts.prefix_index_snapshot, approximate_indexes(self.picker_config.scheduler.plugins),
                           interval=opts.prefix_index_snapshot_interval,
                           max_age=opts.prefix_index_snapshot_max_age,
                           pool_servers=lambda: {ep.hostport for ep in self.datastore.all_endpoints()})
            if opts.prefix_index_snapshot else None
        )
        self.exchanges = Exchanges(self.director, self.metrics, observer_grace=opts.observer_grace)
        self.handoffs = Handoffs(grace=opts.observer_grace)
        self.processor = ExternalProcessor(self.exchanges, self.handoffs, max_body_bytes=opts.max_body_bytes)
        self.http_pick = (
            HttpPick(self.exchanges, self.handoffs, max_body_bytes=opts.max_body_bytes,
                     grace_period=opts.grace_period, header_timeout=opts.http_pick_header_timeout)
            if opts.http_pick_port else None
        )
        # The config's metrics-data-source settings over the flags' (as upstream: config, flag, default).
        scrape = datalayer_config.scrape_settings(
            self.data_layer, scheme=opts.model_server_metrics_scheme, path=opts.model_server_metrics_path,
            insecure_skip_verify=opts.model_server_metrics_insecure_skip_verify,
            refresh_interval=opts.refresh_metrics_interval)
        self.scrape = scrape
        self.scraper = MetricsScraper(
            self.datastore,
            self._mapping_for,
            interval=scrape.interval,
            timeout=opts.metrics_scrape_timeout,
            path=scrape.path,
            scheme=scrape.scheme,
            verify_tls=scrape.verify_tls,
            ca_cert_path=scrape.ca_cert_path,
            client_cert=(scrape.client_cert_path, scrape.client_key_path)
            if scrape.client_cert_path and scrape.client_key_path else None,
        )
        if scrape.port is not None and opts.model_server_metrics_port is None:
            opts.model_server_metrics_port = scrape.port
        self.metrics_ssl = _metrics_ssl(opts.metrics_cert_dir, opts.metrics_client_ca_file)
        self.health = health_aio.HealthServicer()
        self.metrics_endpoint: MetricsEndpoint | None = None
        self.kube_client: AsyncClient | None = None
        self.leader: LeaderElector | None = None
        self._leader_task: asyncio.Task[None] | None = None
        self._servers: list[grpc.aio.Server] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()
        self.initial_endpoints: list[Endpoint] = static_endpoints(opts.endpoints, opts.model_server_metrics_port)
        self._started = False
        self.pool_file: manifests.PoolFileWatcher | None = None
        if opts.pool_file:
            snap = manifests.read(opts.pool_file, opts.pool_name or DEFAULT_POOL_LABEL,
                                  opts.pool_namespace or "default")
            if snap.has_pool and self.initial_endpoints:
                raise manifests.ManifestError(
                    f"{opts.pool_file} defines an InferencePool and --endpoints lists a pool too; give one of them"
                )
            self.apply_pool_file(snap)
            self.pool_file = manifests.PoolFileWatcher(
                opts.pool_file, opts.pool_name or DEFAULT_POOL_LABEL, opts.pool_namespace or "default",
                self.apply_pool_file, interval=opts.pool_file_reload_interval,
            )
        self.kubernetes: KubernetesDiscovery | None = None
        if opts.from_kubernetes or opts.ha_enable_leader_election or opts.metrics_endpoint_auth:
            self._build_kubernetes()

    # --- Kubernetes --------------------------------------------------------------------
    def _build_kubernetes(self) -> None:
        """The API client and what uses it; every error here is a start-up error with the reason."""
        from lightkube import AsyncClient

        from epp.discovery import kubernetes
        from epp.discovery.selectors import LabelSelector

        opts = self.opts
        conf = kubernetes.load_kube_config(opts.kubeconfig)
        self.kube_client = client = AsyncClient(conf)
        namespace = kubernetes.pool_namespace(opts.pool_namespace or None)
        if opts.from_kubernetes:
            selector = LabelSelector.parse(opts.endpoint_selector) if opts.endpoint_selector else None
            self.kubernetes = kubernetes.KubernetesDiscovery(
                client, self.apply_snapshot, pool_name=opts.pool_name, namespace=namespace,
                pool_group=opts.pool_group, endpoint_selector=selector, target_ports=opts.endpoint_target_ports,
            )
        if opts.ha_enable_leader_election:
            from epp.leader_election import LeaderElector, lease_name

            owner = opts.pool_name or kubernetes.deployment_name(os.environ.get("POD_NAME"))
            self.leader = LeaderElector(client, lease_name(namespace, owner), namespace,
                                        on_change=lambda _: self._health_changed())

    def _set_rewrites(self, snap: manifests.PoolSnapshot) -> None:
        self.datastore.rewrites = ModelRewrites(snap.rewrites, seed=self.opts.seed)
        # The models the rules name get their own metric label, however many others clients send.
        self.metrics.pin_models({m for rule in snap.rewrites for m in (*rule.models, *rule.targets)})

    def apply_snapshot(self, snap: manifests.PoolSnapshot) -> None:
        """Install what the Kubernetes API says. No pool (deleted, not there yet): no endpoints, not ready."""
        self.datastore.objectives = snap.objectives
        self._set_rewrites(snap)
        if not snap.has_pool:
            self.datastore.set_endpoints([])
            self.datastore.pool_synced = False
        else:
            # One target port: --model-server-metrics-port may redirect scrapes; several: each its own.
            metrics_port = self.opts.model_server_metrics_port if len(snap.target_ports) <= 1 else None
            for ep in snap.endpoints:
                ep.metrics_port = metrics_port
            self.datastore.set_endpoints(snap.endpoints)
        self._health_changed()

    def apply_pool_file(self, snap: manifests.PoolSnapshot) -> None:
        """Install what the pool file says: objectives and rewrites always, endpoints if it has a pool."""
        self.datastore.objectives = snap.objectives
        self._set_rewrites(snap)
        if snap.has_pool:
            for ep in snap.endpoints:
                ep.metrics_port = self.opts.model_server_metrics_port
            if self._started:
                self.datastore.set_endpoints(snap.endpoints)
            else:
                self.initial_endpoints = snap.endpoints

    def _mapping_for(self, ep: Endpoint) -> engines.EngineMapping:
        engine = datalayer_config.engine_of(ep.labels, self.data_layer, self.opts.engine_type)
        return self.engines.get(engine, self.engines[self.opts.engine_type])

    # --- serving -----------------------------------------------------------------------------
    async def start(self) -> None:
        opts = self.opts
        grpc_options: list[tuple[str, int]] = [("grpc.max_concurrent_streams", 100000)]
        if opts.grpc_max_recv_msg_size:
            grpc_options.append(("grpc.max_receive_message_length", opts.grpc_max_recv_msg_size))
        if opts.grpc_max_send_msg_size:
            grpc_options.append(("grpc.max_send_message_length", opts.grpc_max_send_msg_size))
        main = grpc.aio.server(options=grpc_options)
        main.add_generic_rpc_handlers((self.processor.handler(),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, main)
        self._bind(main, opts.grpc_port, self.tls.credentials if self.tls else None)
        self._servers.append(main)
        if opts.grpc_health_port and opts.grpc_health_port != opts.grpc_port:
            # Plaintext, as upstream: kubelet's gRPC probes do not speak TLS.
            hs = grpc.aio.server()
            health_pb2_grpc.add_HealthServicer_to_server(self.health, hs)
            self._bind(hs, opts.grpc_health_port, None)
            self._servers.append(hs)
        if opts.explain_port:
            explain = grpc.aio.server()
            explain_pb2_grpc.add_ExplainServicer_to_server(ExplainService(self.director), explain)
            if explain.add_insecure_port(f"127.0.0.1:{opts.explain_port}") == 0:
                raise OSError(f"cannot listen on 127.0.0.1:{opts.explain_port} (--explain-port)")
            self._servers.append(explain)
        if opts.metrics_port:
            await self._start_metrics()
        for name in READINESS_SERVICES:
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.health.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)
        for s in self._servers:
            await s.start()
        if self.http_pick is not None:
            await self.http_pick.start(opts.bind_address, opts.http_pick_port)
        if self.snapshots is not None:
            await asyncio.to_thread(self.snapshots.load)  # before the first pick: the old process's view
            self._tasks.append(asyncio.create_task(self.snapshots.run()))
        if self.scrape.scrape:
            self.scraper.start()
        if self.initial_endpoints or self.pool_file is not None or opts.endpoints:
            self.datastore.set_endpoints(self.initial_endpoints)
        self._started = True
        await self._update_health()
        self._tasks.append(asyncio.create_task(self._pool_metrics_loop()))
        if self.pool_file is not None:
            self._tasks.append(asyncio.create_task(self.pool_file.run()))
        if self.kubernetes is not None:
            self._tasks.append(asyncio.create_task(self.kubernetes.run()))
        if self.leader is not None:
            self._leader_task = asyncio.create_task(self.leader.run())
            self._tasks.append(self._leader_task)
        log.info(
            "epp serving ext_proc on :%d (%s), HTTP pick on :%s, health on :%d, metrics on :%d%s; pool %s",
            opts.grpc_port, self.tls.describe() if self.tls else "plaintext", opts.http_pick_port or "off",
            opts.grpc_health_port, opts.metrics_port,
            " (behind TokenReview)" if self.metrics_endpoint and self.metrics_endpoint.authorizer else "",
            self._pool_description(),
        )

    def _pool_description(self) -> str:
        o = self.opts
        if self.kubernetes is not None:
            what = f"pods matching {o.endpoint_selector!r}" if o.endpoint_selector else f"InferencePool {o.pool_name}"
            return f"{what} from the Kubernetes API" + (", leader election on" if self.leader else "")
        return f"{o.pool_name or DEFAULT_POOL_LABEL} with {len(self.datastore.all_endpoints())} endpoints"

    async def _start_metrics(self) -> None:
        opts = self.opts
        authorizer = None
        auth = opts.metrics_endpoint_auth
        if auth is None:
            auth = self.kube_client is not None
            if not auth:
                log.info("/metrics is served without authentication: --metrics-endpoint-auth needs a Kubernetes "
                         "API (in a cluster, or --kubeconfig) and this pool comes from %s",
                         "--pool-file" if opts.pool_file else "--endpoints")
        if auth:
            from epp.metrics_auth import KubernetesAuthorizer

            assert self.kube_client is not None
            authorizer = KubernetesAuthorizer(self.kube_client)
        self.metrics_endpoint = MetricsEndpoint(self.metrics.registry, opts.bind_address, opts.metrics_port,
                                                authorizer=authorizer, ssl_context=self.metrics_ssl)
        await self.metrics_endpoint.start()

    def _bind(self, server: grpc.aio.Server, port: int, credentials: grpc.ServerCredentials | None) -> None:
        addr = f"{self.opts.bind_address}:{port}"
        bound = server.add_secure_port(addr, credentials) if credentials else server.add_insecure_port(addr)
        if bound == 0:
            raise OSError(f"cannot listen on {addr}")

    @property
    def ready(self) -> bool:
        """Ready to route: the pool is synced, epp is not stopping, and (with HA) it leads."""
        if self._stopping.is_set() or not self.datastore.pool_synced:
            return False
        if self.kubernetes is not None and not self.kubernetes.synced.is_set():
            return False
        return self.leader is None or self.leader.is_leader

    def _health_changed(self) -> None:
        if self._started:
            self._tasks.append(asyncio.get_running_loop().create_task(self._update_health()))

    async def _update_health(self) -> None:
        serving = self.ready
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in READINESS_SERVICES:
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

    async def stop(self, grace: float | None = None, drain: float | None = None) -> None:
        """Not ready at once (a held Lease released, so a standby takes over); keep serving ext_proc for the
        drain window (a proxy may still send before it sees the change); then refuse new streams and let
        those in flight finish, up to the grace period."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        await self._update_health()
        drain = self.opts.drain_timeout if drain is None else drain
        if self._leader_task is not None:
            self._leader_task.cancel()  # releases the Lease
        if drain > 0:
            log.info("draining: ext_proc served %gs more before it stops", drain)
            await asyncio.sleep(drain)
        grace = self.opts.grace_period if grace is None else grace
        if self.director.flow is not None:
            self.director.flow.close()  # requests still waiting are told 503 (shutting down) now
        stops = [s.stop(grace) for s in self._servers]
        if self.http_pick is not None:
            stops.append(self.http_pick.stop())
        await asyncio.gather(*stops)
        for t in self._tasks:
            t.cancel()
        # Cancelling the elector releases a held Lease: a standby takes over at once.
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.snapshots is not None:
            await self.snapshots.save()  # what the last requests taught the index
        if self.metrics_endpoint is not None:
            await self.metrics_endpoint.stop()
        if self.kube_client is not None:
            await self.kube_client.close()
        self.scraper.stop()
        await self.director.scheduler.aclose()  # KV-event subscribers, tokenizer sessions
        if self.director.tracer is not None:
            self.director.tracer.shutdown()  # exports the spans still batched
        log.info("epp stopped")

    async def wait(self) -> None:
        await self._stopping.wait()
        await asyncio.gather(*(s.wait_for_termination() for s in self._servers))
