"""The routing benchmark: the same seeded workload, the same simulated pool, one router after another.

    bench/run [--workloads shared-prefix,random] [--routers epp,round-robin,...] [--rate 12] [--duration 40]
              [--repeat 1]
    bench/run --scenarios bypass,replicas,restart,mixed-speed,upstream-shared-prefix   (bench/scenarios.py)

Routers (each gets a fresh pool of simulators, cold caches, and the identical request stream):

- epp:          Envoy -> epp (default EndpointPickerConfig) -> pod, the pick over ext_proc (deploy/envoy.yaml)
- epp-http-pick: the same epp, the pick over HTTP through ext_authz (deploy/envoy-http-pick.yaml)
- least-queue:  Envoy -> epp configured with queue-scorer only
- gie-default:  Envoy -> epp with GIE's default weights (bench/configs/gie-weights.yaml)
- epp-config:   Envoy -> epp with the EndpointPickerConfig file given by --epp-config (A/B a profile)
- round-robin:  Envoy's ROUND_ROBIN over the pods (what a plain Kubernetes Service gives)
- random:       Envoy's RANDOM over the pods
- sglang-router / vllm-router: the peer routers from PyPI with their cache_aware policy, when installed;
                `+envoy` behind the same Envoy as epp; `-ha` as `--replicas` processes behind one Envoy
                (round robin), each with its own cache tree: the peer run highly available, as epp's
                replicas are
- oracle:       the benchmark itself picks, reading each simulator's true state in-process (its exact
                prefix cache, queue and adapters, no scrape delay), and Envoy routes to that pod: the
                upper bound of what routing can do here

Besides the client's TTFT, the table gives each request's TTFT inside its server (submit to
first token, read from the engine) and "path": the mean client TTFT minus the mean in-server
TTFT, what the gateway, the pick and the client's own loop add. Routing quality shows in the
first; the hop shows in the second.

With --repeat N, each workload is run N times over all routers in turn, each round starting one
router later (A, B, C, then B, C, A), so slow drifts of the machine hit every router alike; the table then
shows each metric's median over the rounds, and every round's p90 TTFT beside it.

The simulators run in this process (so the oracle can read them); Envoy, epp and the
peer routers are child processes. The client streams every response and records
time to first token, inter-token latency and end-to-end latency.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import httpx

from bench import envoy_phases, workloads
from bench.gateways import DirectEnvoy, PoolEnvoy, ReplicaEnvoy
from epp.envoy import EnvoyOptions, EnvoyProcess
from epp.simulator.engine import CHARS_PER_TOKEN, EngineConfig, prompt_blocks
from epp.simulator.kv_publisher import KVEventsConfig
from epp.simulator.server import SimulatedServer, _prompt_text
from epp.stack import free_ports, grpc_serving, wait_until

ROUTERS = ("epp", "epp-http-pick", "round-robin", "random", "least-queue", "gie-default", "sglang-router",
           "sglang-router+envoy", "vllm-router", "oracle", "epp-config", "sglang-router-ha", "vllm-router-ha")
GIE_WEIGHTS = Path(__file__).parent / "configs" / "gie-weights.yaml"  # the router gie-default
BEHIND_ENVOY = "+envoy"  # a peer router placed behind the same Envoy that fronts epp: the same hops as epp
REPLICATED = "-ha"  # a peer router as --replicas processes behind one Envoy, as a highly available deployment


def peer_name(router: str) -> str:
    """The peer router's own name without the layout's suffix ("" when `router` is no peer)."""
    name = router.removesuffix(BEHIND_ENVOY).removesuffix(REPLICATED)
    return name if name in PeerRouter.COMMANDS else ""


LEAST_QUEUE_CONFIG = """\
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
  - pluginRef: max-score-picker
"""
POOL_FILE = f"""\
apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferenceObjective
metadata: {{name: {workloads.SHEDDABLE_OBJECTIVE}}}
spec: {{priority: -1, poolRef: {{name: default}}}}
"""


@dataclass
class Sample:
    status: int
    tag: str
    sent: float
    ttft: float | None = None
    e2e: float | None = None
    itl: float | None = None
    tokens: int = 0
    pod: str = ""
    stage: int = 0  # the load stage it was sent in (upstream-shared-prefix)


@dataclass
class RunResult:
    workload: str
    router: str
    samples: list[Sample] = field(default_factory=list)
    duration: float = 0.0
    prefix_hit_rate: float = 0.0
    per_pod: dict[str, int] = field(default_factory=dict)
    note: str = ""
    round: int = 0  # with --repeat, which pass over the routers this run was
    # Each request's TTFT inside its server (submit to first token), ms: routing quality alone.
    server_ttft: list[float] = field(default_factory=list)
    # With --envoy-phases, where the time went inside Envoy (see bench/envoy_phases.py), ms.
    envoy_phases: dict[str, float] = field(default_factory=dict)
    start: float = 0.0  # perf_counter at the first arrival's offset 0
    # What a scenario did to the run, as it happened (bench/scenarios.py): the bypassed pods, each
    # epp replica's requests, the restart's timing.
    mechanics: dict[str, Any] = field(default_factory=dict)


# --- routers -------------------------------------------------------------------
class Router:
    """Starts a gateway in front of the pool; `url` takes the requests."""

    url = ""
    needs_pick = False
    phase_log = ""  # where its Envoy, if any, writes bench/envoy_phases' access log

    def envoy_options(self, listen: int, extproc: int, admin: int, **kw: Any) -> EnvoyOptions:
        """Options for this router's Envoy, with the phase log when one is asked for."""
        if self.phase_log:
            kw.update(access_log_path=self.phase_log, access_log_format=envoy_phases.FORMAT)
        return EnvoyOptions(listen, extproc, admin, **kw)

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def pick(self, req: workloads.TimedRequest) -> str:
        """The pod to send this request to, for routers that pick in the client (`needs_pick`)."""
        raise TypeError(f"{type(self).__name__} routes by itself; it does not pick in the client")

    def restart(self) -> dict[str, Any]:
        """Kill the router's own process and start it again on the same ports (the restart scenario);
        what happened, or {} when there is no process of its own (Envoy alone)."""
        return {}

    def counters(self) -> dict[str, Any]:
        """Numbers the router's processes report about the run, read before `stop()`."""
        return {}


class EppRouter(Router):
    """Envoy in front of `replicas` epp processes; with two or more, Envoy's ext_proc cluster lists
    them all and spreads the picks over them (each keeps its own prefix index)."""

    def __init__(self, pods: list[str], logdir: Path, config: str | None = None, layout: str = "ext-proc",
                 replicas: int = 1, observe_responses: bool = True) -> None:
        self.pods, self.logdir, self.config, self.layout = pods, logdir, config, layout
        self.replicas = replicas
        self.observe_responses = observe_responses  # False: GIE's single ext_proc filter (see EnvoyOptions)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.cmds: list[tuple[list[str], int, int]] = []  # each replica's command, health and metrics port
        self.envoy: EnvoyProcess | None = None
        self.restarted: list[int] = []  # requests each replica had served before its restart
        self.snapshot_dir: Path | None = None

    def _spawn(self, i: int) -> None:
        args, health_port, _ = self.cmds[i]
        log = open(self.logdir / f"epp-{i}.log", "ab")  # noqa: SIM115 - lives as long as the process
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        self.procs[i:i + 1] = [proc]
        wait_until(lambda: proc.poll() is not None or grpc_serving(health_port), 30, "epp")
        if proc.poll() is not None:
            raise RuntimeError(f"epp exited: {(self.logdir / f'epp-{i}.log').read_text()[-3000:]}")

    def start(self) -> None:
        pool = self.logdir / "pool.yaml"
        pool.write_text(POOL_FILE)
        snapshots = self.snapshot_dir = Path(tempfile.mkdtemp(prefix="prefix-index-", dir=self.logdir))  # this pool's
        grpc_ports, pick_ports = [], []
        for i in range(self.replicas):
            grpc_port, health_port, metrics_port, pick_port = free_ports(4)
            args = [sys.executable, "-m", "epp", "serve", "--endpoints", ",".join(self.pods), "--pool-file", str(pool),
                    "--grpc-port", str(grpc_port), "--grpc-health-port", str(health_port),
                    "--metrics-port", str(metrics_port), "--http-pick-port", str(pick_port),
                    "--bind-address", "127.0.0.1", "--seed", "1", "--drain-timeout=0s", "--explain-port", "0",
                    # As the chart runs it: a restarted process starts from the old one's prefix index.
                    "--prefix-index-snapshot", str(snapshots / f"prefix-index-{i}")]
            if self.config:
                args += ["--config-text", self.config]
            self.cmds.append((args, health_port, metrics_port))
            self.procs.append(None)  # type: ignore[arg-type]  # set by _spawn
            self._spawn(i)
            grpc_ports.append(grpc_port)
            pick_ports.append(pick_port)
        listen, admin = free_ports(2)
        opts = self.envoy_options(listen, grpc_ports[0], admin, layout=self.layout, http_pick_port=pick_ports[0],
                                  observe_responses=self.observe_responses)
        self.envoy = (ReplicaEnvoy(opts, grpc_ports[1:]) if self.replicas > 1 else EnvoyProcess(opts)).start()
        self.envoy.wait_ready()
        self.url = self.envoy.url

    def _requests(self, i: int) -> int:
        """Requests replica i has handled."""
        return self._metric_total(i, "inference_objective_request_total{")

    def _metric_total(self, i: int, series: str) -> int:
        """The sum of a series' samples on replica i's /metrics (0 when it does not answer)."""
        try:
            text = httpx.get(f"http://127.0.0.1:{self.cmds[i][2]}/metrics", timeout=5).text
        except httpx.HTTPError:
            return 0
        return int(sum(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines() if ln.startswith(series)))

    def restart(self) -> dict[str, Any]:
        """SIGKILL every replica and start each again with the same command and ports; Envoy stays."""
        self.restarted = [self._requests(i) for i in range(self.replicas)]
        t0 = time.perf_counter()
        for proc in self.procs:
            proc.kill()
            proc.wait()
        for i in range(self.replicas):
            self._spawn(i)
        return {"down_s": round(time.perf_counter() - t0, 3), "requests_before": list(self.restarted)}

    def counters(self) -> dict[str, Any]:
        after = [self._requests(i) for i in range(self.replicas)]
        out: dict[str, Any] = {"replica_requests": after}
        if self.replicas > 1:  # the responses each replica saw begin: those whose first byte it timed
            out["replica_responses_seen"] = [self._metric_total(i, "inference_objective_request_ttft_seconds_count{")
                                             for i in range(self.replicas)]
        if self.restarted:
            out = {"replica_requests": [a + b for a, b in zip(after, self.restarted, strict=True)],
                   "requests_after_restart": after}
        return out

    def stop(self) -> None:
        if self.envoy is not None:
            self.envoy.stop()
        for proc in self.procs:
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=30)
        if self.snapshot_dir is not None:
            shutil.rmtree(self.snapshot_dir, ignore_errors=True)


class _EnvoyOnlyRouter(Router, ABC):
    """An Envoy without epp in front of the pool; subclasses say which."""

    envoy: EnvoyProcess | None = None

    @abstractmethod
    def make_envoy(self, opts: EnvoyOptions) -> EnvoyProcess: ...

    def start(self) -> None:
        listen, admin = free_ports(2)
        self.envoy = self.make_envoy(self.envoy_options(listen, 0, admin))
        self.envoy.start()
        self.envoy.wait_ready()
        self.url = self.envoy.url

    def stop(self) -> None:
        if self.envoy is not None:
            self.envoy.stop()


class EnvoyPoolRouter(_EnvoyOnlyRouter):
    def __init__(self, pods: list[str], policy: str) -> None:
        self.pods, self.policy = pods, policy

    def make_envoy(self, opts: EnvoyOptions) -> EnvoyProcess:
        eps = [(p.rsplit(":", 1)[0], int(p.rsplit(":", 1)[1])) for p in self.pods]
        return PoolEnvoy(opts, eps, self.policy)


class PeerRouter(Router):
    """sglang-router or vllm-router, from PyPI: as their own proxy, behind the same Envoy as epp (`+envoy`),
    or as several processes behind one Envoy, each with its own cache tree (`-ha`)."""

    COMMANDS = {
        "sglang-router": [sys.executable, "-m", "sglang_router.launch_router"],
        "vllm-router": ["vllm-router"],
    }

    def __init__(self, name: str, pods: list[str], logdir: Path, behind_envoy: bool = False,
                 replicas: int = 1) -> None:
        self.name, self.pods, self.logdir = name, pods, logdir
        self.behind_envoy = behind_envoy or replicas > 1  # replicas need a balancer in front
        self.replicas = replicas
        self.cmds: list[list[str]] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        self.envoy: EnvoyProcess | None = None

    @staticmethod
    def _vllm_router() -> str | None:
        """The vllm-router executable beside this Python (a venv's bin/) or on PATH."""
        return shutil.which("vllm-router", path=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])

    @classmethod
    def available(cls, name: str) -> bool:
        if name == "sglang-router":
            import importlib.util

            return importlib.util.find_spec("sglang_router") is not None
        return cls._vllm_router() is not None

    def start(self) -> None:
        ports = free_ports(2 * self.replicas)  # each replica's proxy port, then its metrics port
        ports, metrics_ports = ports[:self.replicas], ports[self.replicas:]
        for port, metrics_port in zip(ports, metrics_ports, strict=True):
            cmd = list(self.COMMANDS[self.name])
            if cmd[0] == "vllm-router":
                cmd[0] = self._vllm_router() or "vllm-router"
            cmd += ["--host", "127.0.0.1", "--port", str(port), "--policy", "cache_aware",
                    "--worker-urls", *[f"http://{p}" for p in self.pods],
                    "--prometheus-host", "127.0.0.1", "--prometheus-port", str(metrics_port),
                    "--log-level", "warn" if self.name == "sglang-router" else "warning"]
            self.cmds.append(cmd)
            self.procs.append(self._spawn(len(self.procs)))
        for i in range(self.replicas):
            self._wait_ready(i)
        self.url = f"http://127.0.0.1:{ports[0]}"
        if self.behind_envoy:
            # As a user behind a gateway runs it: the gateway's Envoy forwards everything to the router
            # (to its replicas in turn).
            listen, admin = free_ports(2)
            self.envoy = PoolEnvoy(self.envoy_options(listen, 0, admin), [("127.0.0.1", p) for p in ports],
                                   "ROUND_ROBIN")
            self.envoy.start()
            self.envoy.wait_ready()
            self.url = self.envoy.url

    def _log(self, i: int) -> Path:
        return self.logdir / (f"{self.name}.log" if i == 0 else f"{self.name}-{i}.log")

    def _spawn(self, i: int) -> subprocess.Popen[bytes]:
        log = open(self._log(i), "ab")  # noqa: SIM115 - lives as long as the process
        return subprocess.Popen(self.cmds[i], stdout=log, stderr=subprocess.STDOUT)

    def _wait_ready(self, i: int) -> None:
        cmd, proc = self.cmds[i], self.procs[i]
        url = f"http://127.0.0.1:{cmd[cmd.index('--port') + 1]}"

        def ready() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self._log(i).read_text()[-3000:]}")
            try:
                return httpx.get(f"{url}/v1/models", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, 60, self.name)

    def restart(self) -> dict[str, Any]:
        """SIGKILL every replica of the router and start each again on the same port."""
        t0 = time.perf_counter()
        for proc in self.procs:
            proc.kill()
            proc.wait()
        self.procs = [self._spawn(i) for i in range(self.replicas)]
        for i in range(self.replicas):
            self._wait_ready(i)
        return {"down_s": round(time.perf_counter() - t0, 3)}

    def counters(self) -> dict[str, Any]:
        return {"peer_replicas": self.replicas} if self.replicas > 1 else {}

    def stop(self) -> None:
        if self.envoy is not None:
            self.envoy.stop()
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()


class OracleRouter(_EnvoyOnlyRouter):
    """Picks with perfect, instant knowledge of every simulator; Envoy routes to the pick."""

    needs_pick = True

    def __init__(self, servers: list[SimulatedServer]) -> None:
        self.servers = servers

    def make_envoy(self, opts: EnvoyOptions) -> EnvoyProcess:
        return DirectEnvoy(opts)

    def pick(self, req: workloads.TimedRequest) -> str:
        """The pod with the least estimated time to first token, from true state."""
        kind = "chat" if req.path.endswith("chat/completions") else "completions"
        model = req.body["model"]
        prompt = _prompt_text(kind, req.body)
        best, best_cost = "", float("inf")
        blocks: list[int] | None = None
        for s in self.servers:
            e, c = s.engine, s.cfg
            if blocks is None:
                blocks = prompt_blocks(model, prompt, c.block_size * CHARS_PER_TOKEN)
            uncached = max(1, len(prompt) // CHARS_PER_TOKEN - e.cached_blocks(blocks) * c.block_size)
            cost = c.prefill_per_token_ms * (e.queued_prefill_tokens() + uncached)
            cost += c.decode_base_ms * (1 + max(0, e.num_running + e.num_waiting + 1 - c.max_num_seqs))
            cost += c.decode_per_seq_ms * e.num_running
            if model in c.lora_adapters and model not in e.active_loras:
                cost += c.lora_load_ms
            if cost < best_cost:
                best, best_cost = f"{s.host}:{s.port}", cost
        return best


# --- one run ----------------------------------------------------------------------
async def _send(session: aiohttp.ClientSession, url: str, req: workloads.TimedRequest, headers: dict[str, str],
                sample: Sample) -> None:
    t0 = time.perf_counter()
    sample.sent = t0
    first = last = 0.0
    try:
        async with session.post(url + req.path, json=req.body, headers={**req.headers, **headers}) as resp:
            sample.status = resp.status
            sample.pod = resp.headers.get("x-simulator-port", "")
            if resp.status != 200:
                await resp.read()
                return
            async for line in resp.content:
                if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                    continue
                if b'"choices":[]' in line:
                    continue  # the usage chunk
                now = time.perf_counter()
                if not first:
                    first = now
                last = now
                sample.tokens += 1
    except (TimeoutError, aiohttp.ClientError) as e:
        sample.status = -1
        sample.pod = type(e).__name__
        return
    if first:
        sample.ttft = first - t0
        sample.e2e = last - t0
        if sample.tokens > 1:
            sample.itl = (last - first) / (sample.tokens - 1)


async def run_one(workload: workloads.Workload, router_name: str, args: argparse.Namespace,
                  logdir: Path) -> RunResult:
    """One router over one workload on a fresh pool. A scenario (args.scenario, see bench/scenarios.py)
    may slow one server, send some requests past the router, run epp as replicas or restart it."""
    scenario = getattr(args, "scenario", "")
    ports = free_ports(args.servers)
    servers = []
    for i, port in enumerate(ports):
        time_scale = args.time_scale
        if scenario == "mixed-speed" and i == 0:
            time_scale *= getattr(args, "slow_factor", 2.0)  # one pod of the pool runs this much slower
        cfg = EngineConfig(max_num_seqs=args.max_num_seqs, num_gpu_blocks=args.num_gpu_blocks,
                           time_scale=time_scale, lora_adapters=list(workload.lora_adapters),
                           max_lora=args.max_lora)
        host, events = "127.0.0.1", None
        if getattr(args, "kv_events", False):  # each pod its own loopback address, its publisher on it at 5557
            host = f"127.0.0.{KV_EVENTS_FIRST_HOST + i}"
            events = KVEventsConfig(f"tcp://{host}:{KV_EVENTS_PORT}")
        s = SimulatedServer(f"sim-{i}", port, cfg, host=host, kv_events=events)
        await s.start()
        servers.append(s)
    pods = [f"{s.host}:{s.port}" for s in servers]
    replicas = getattr(args, "replicas", 2) if scenario == "replicas" else 1
    # Replicas that share the picks behind one Envoy run GIE's single filter unless told otherwise:
    # the shipped observer stream would reach the replica that did not pick (docs/deployment.md).
    observe = replicas == 1 or getattr(args, "replica_layout", "single-filter") == "observer"
    router: Router
    epp_kw: dict[str, Any] = {"replicas": replicas, "observe_responses": observe}
    if router_name == "epp":
        router = EppRouter(pods, logdir, **epp_kw)
    elif router_name == "epp-http-pick":
        router = EppRouter(pods, logdir, layout="http-pick", replicas=replicas)
    elif router_name == "least-queue":
        router = EppRouter(pods, logdir, LEAST_QUEUE_CONFIG, **epp_kw)
    elif router_name == "gie-default":
        router = EppRouter(pods, logdir, await asyncio.to_thread(GIE_WEIGHTS.read_text), **epp_kw)
    elif router_name == "epp-config":
        if not getattr(args, "epp_config", ""):
            raise ValueError("router epp-config needs --epp-config FILE")
        router = EppRouter(pods, logdir, await asyncio.to_thread(Path(args.epp_config).read_text), **epp_kw)
    elif router_name == "round-robin":
        router = EnvoyPoolRouter(pods, "ROUND_ROBIN")
    elif router_name == "random":
        router = EnvoyPoolRouter(pods, "RANDOM")
    elif peer := peer_name(router_name):
        # -ha: --replicas processes (as epp's in the replicas scenario), and never fewer than two.
        ha = max(2, getattr(args, "replicas", 2)) if router_name.endswith(REPLICATED) else 1
        router = PeerRouter(peer, pods, logdir, behind_envoy=router_name.endswith(BEHIND_ENVOY), replicas=ha)
    elif router_name == "oracle":
        router = OracleRouter(servers)
    else:
        raise ValueError(f"unknown router {router_name!r}")
    result = RunResult(workload.name, router_name)
    if getattr(args, "envoy_phases", False):
        router.phase_log = str(logdir / f"envoy-phases-{workload.name}-{router_name}-{time.monotonic_ns()}.log")
    # The bypass: requests tagged so go straight to one pod (or, spread, to each pod in turn).
    bypass_urls = ([f"http://{p}" for p in pods] if getattr(args, "bypass_spread", False) else [f"http://{pods[0]}"])
    if scenario == "bypass":
        result.mechanics["bypass_pods"] = [servers[pods.index(u.removeprefix("http://"))].name for u in bypass_urls]
    if scenario == "mixed-speed":
        result.mechanics["time_scale"] = {s.name: s.cfg.time_scale for s in servers}
    result.mechanics["ports"] = {s.name: s.port for s in servers}
    try:
        await asyncio.to_thread(router.start)
        await asyncio.sleep(0.5)  # let epp scrape the pool once
        timeout = aiohttp.ClientTimeout(total=300)
        async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
            start = time.perf_counter()
            result.start = start
            restart: asyncio.Task[None] | None = None
            if scenario == "restart":
                restart = asyncio.create_task(_restart_at(router, start + getattr(args, "restart_at", 0.5)
                                                          * workload_span(workload), result))
            tasks = []
            bypassed = 0
            for req in workload.requests:
                delay = start + req.at - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                url, headers = router.url, {}
                if req.tag == BYPASS:
                    url = bypass_urls[bypassed % len(bypass_urls)]
                    bypassed += 1
                elif router.needs_pick:
                    headers = {"x-gateway-destination-endpoint": router.pick(req)}
                sample = Sample(0, req.tag, 0.0, stage=req.stage)
                result.samples.append(sample)
                tasks.append(asyncio.create_task(_send(session, url, req, headers, sample)))
            await asyncio.gather(*tasks)
            result.duration = time.perf_counter() - start
            if restart is not None:
                await restart
            result.mechanics.update(await asyncio.to_thread(router.counters))
    finally:
        await asyncio.to_thread(router.stop)
        queries = sum(s.engine.prefix_queries for s in servers)
        hits = sum(s.engine.prefix_hits for s in servers)
        result.prefix_hit_rate = hits / queries if queries else 0.0
        result.per_pod = {s.name: s.served for s in servers}
        if getattr(args, "kv_events", False):
            result.mechanics["kv_event_batches"] = {s.name: s.publisher.sent for s in servers if s.publisher}
        result.server_ttft = [round(t * 1e3, 3) for s in servers for t in s.engine.server_ttfts]
        if router.phase_log:  # Envoy has exited, so the log is flushed
            result.envoy_phases = await asyncio.to_thread(envoy_phases.summarize, Path(router.phase_log))
        for s in servers:
            await s.stop()
    return result


BYPASS = "bypass"  # the tag of a request that goes straight to a pod, past the router
# --kv-events: pod i listens on 127.0.0.(10+i) (all of 127/8 is loopback on Linux) and publishes its
# KV-cache events there at 5557, as a vLLM pod does at its pod IP: per-pod subscriptions need one address each.
KV_EVENTS_FIRST_HOST = 10
KV_EVENTS_PORT = 5557


def workload_span(workload: workloads.Workload) -> float:
    """Seconds from the first arrival's offset 0 to the last arrival."""
    return max((r.at for r in workload.requests), default=0.0)


async def _restart_at(router: Router, when: float, result: RunResult) -> None:
    """Restart the router at perf_counter `when`, while the run's requests keep arriving."""
    await asyncio.sleep(max(0.0, when - time.perf_counter()))
    at = time.perf_counter() - result.start
    done = await asyncio.to_thread(router.restart)
    result.mechanics["restart"] = {"at_s": round(at, 3), **done} if done else {"at_s": None,
                                                                              "note": "no process of its own"}


# --- reporting ----------------------------------------------------------------------
def pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


def summary(r: RunResult) -> dict[str, Any]:
    """The run's numbers over the requests the router routed; the bypass's own TTFT apart."""
    routed = [s for s in r.samples if s.tag != BYPASS]
    bypass = [s.ttft * 1e3 for s in r.samples if s.tag == BYPASS and s.status == 200 and s.ttft is not None]
    ok = [s for s in routed if s.status == 200 and s.ttft is not None]
    ttft = [s.ttft * 1e3 for s in ok]
    itl = [s.itl * 1e3 for s in ok if s.itl is not None]
    e2e = [s.e2e * 1e3 for s in ok]
    tokens = sum(s.tokens for s in ok)
    return {
        "workload": r.workload, "router": r.router, "requests": len(routed), "ok": len(ok),
        "shed": sum(1 for s in routed if s.status == 429),
        "errors": sum(1 for s in routed if s.status not in (200, 429)),
        "bypass_requests": len(r.samples) - len(routed), "bypass_ok": len(bypass),
        "bypass_ttft_p50": pct(bypass, 50), "bypass_ttft_p90": pct(bypass, 90),
        "ttft_p50": pct(ttft, 50), "ttft_p90": pct(ttft, 90), "ttft_p99": pct(ttft, 99),
        "server_ttft_p50": pct(r.server_ttft, 50), "server_ttft_p90": pct(r.server_ttft, 90),
        # What the way to and from the server adds to TTFT (gateway, pick, client), on average.
        # (Not with a bypass: the servers' own TTFTs then include the bypassing requests.)
        "path_ms": (statistics.fmean(ttft) - statistics.fmean(r.server_ttft)) if ttft and r.server_ttft
        and not bypass else float("nan"),
        "itl_p50": pct(itl, 50), "itl_p90": pct(itl, 90),
        "e2e_p50": pct(e2e, 50), "e2e_p90": pct(e2e, 90), "e2e_p99": pct(e2e, 99),
        "throughput_tok_s": tokens / r.duration if r.duration else 0.0,
        "prefix_hit_rate": r.prefix_hit_rate, "per_pod": r.per_pod, "mechanics": r.mechanics,
        "ttft_p90_high_priority": pct([s.ttft * 1e3 for s in ok if not s.tag], 90),
        **{f"envoy_{k}": v for k, v in r.envoy_phases.items()},
    }


def combined(results: list[RunResult]) -> list[dict[str, Any]]:
    """One row per (workload, router): a single run's summary, or over repeated rounds the median
    of every number, with each round's p90 TTFT kept in `ttft_p90_rounds`."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r.workload, r.router), []).append(summary(r))
    rows = []
    for runs in groups.values():
        row = dict(runs[0])
        if len(runs) > 1:
            for key, value in row.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    row[key] = statistics.median(run[key] for run in runs)
        row["ttft_p90_rounds"] = [run["ttft_p90"] for run in runs]
        rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]], wl: dict[str, workloads.Workload]) -> str:
    out = []
    rounds = max((len(r.get("ttft_p90_rounds", ())) for r in rows), default=0)
    extra = " p90 TTFT per round |" if rounds > 1 else ""
    for name in dict.fromkeys(r["workload"] for r in rows):
        out.append(f"### {name}\n\n{wl[name].description}\n")
        out.append("| router | ok | shed | err | TTFT p50 | TTFT p90 | TTFT p99 | in-server TTFT p50 | p90 "
                   "| path | ITL p50 | ITL p90 | E2E p50 | E2E p90 | tokens/s | prefix-cache hit |" + extra)
        out.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if rounds > 1 else ""))
        for r in rows:
            if r["workload"] != name:
                continue
            per_round = (" " + ", ".join(f"{v:.1f}" for v in r["ttft_p90_rounds"]) + " |") if rounds > 1 else ""
            p90 = f"{r['ttft_p90']:.1f}" if rounds > 1 else f"{r['ttft_p90']:.0f}"
            out.append(f"| {r['router']} | {r['ok']:.0f} | {r['shed']:.0f} | {r['errors']:.0f} | "
                       f"{r['ttft_p50']:.0f} ms | {p90} ms | {r['ttft_p99']:.0f} ms | "
                       f"{r['server_ttft_p50']:.1f} ms | {r['server_ttft_p90']:.1f} ms | {r['path_ms']:.1f} ms | "
                       f"{r['itl_p50']:.1f} ms | "
                       f"{r['itl_p90']:.1f} ms | {r['e2e_p50']:.0f} ms | {r['e2e_p90']:.0f} ms | "
                       f"{r['throughput_tok_s']:.0f} | {r['prefix_hit_rate']:.0%} |" + per_round)
        out += _phase_table([r for r in rows if r["workload"] == name])
        if name == "mixed-priority":
            out.append("Priority ≥ 0 only (the traffic that must not suffer): p90 TTFT " + ", ".join(
                f"{r['router']} {r['ttft_p90_high_priority']:.0f} ms" for r in rows if r["workload"] == name) + ".")
        out.append("")
    return "\n".join(out)


def _phase_table(rows: list[dict[str, Any]]) -> list[str]:
    """With --envoy-phases: each phase inside Envoy, p50 / mean in ms, for the routers behind one."""
    rows = [r for r in rows if "envoy_total_p50" in r]
    if not rows:
        return []
    names = [name for name, _, _ in envoy_phases.PHASES]
    out = ["", "Inside Envoy, p50 / mean per request (ms, from its access log): " + "; ".join(
        f"{n} = {a} to {b}" for n, a, b in envoy_phases.PHASES) + ".", "",
        "| router | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for r in rows:
        cells = [f"{r.get(f'envoy_{n}_p50', float('nan')):.2f} / {r.get(f'envoy_{n}_mean', float('nan')):.2f}"
                 for n in names]
        out.append(f"| {r['router']} | " + " | ".join(cells) + " |")
    return out


def ratios(rows: list[dict[str, Any]]) -> list[str]:
    """The targets, as ratios of p90 TTFT (higher = epp better)."""
    by = {(r["workload"], r["router"]): r for r in rows}
    lines = []
    for wl in dict.fromkeys(r["workload"] for r in rows):
        epp = by.get((wl, "epp"))
        if epp is None:
            continue
        for other in ROUTERS:
            o = by.get((wl, other))
            if o is None or other == "epp":
                continue
            ratio = o["ttft_p90"] / epp["ttft_p90"] if epp["ttft_p90"] else float("nan")
            target = ""
            if wl == "shared-prefix" and other == "round-robin":
                target = "  (target >= 3.0: " + ("met" if ratio >= 3 else "NOT met") + ")"
            elif wl == "shared-prefix" and other in PeerRouter.COMMANDS:
                target = "  (target >= 1.0: " + ("met" if ratio >= 1 else "NOT met") + ")"
            elif wl == "random" and other == "least-queue":
                target = "  (target >= 1.0 within 5% noise: " + ("met" if ratio >= 0.95 else "NOT met") + ")"
            lines.append(f"{wl}: p90 TTFT {other} / epp = {ratio:.2f}x{target}")
    return lines


def plots(rows: list[dict[str, Any]], results: list[RunResult], outdir: Path, stem: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    names = list(dict.fromkeys(r["workload"] for r in rows))
    routers = list(dict.fromkeys(r["router"] for r in rows))
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.8), squeeze=False)
    for ax, wl in zip(axes[0], names, strict=True):
        vals = [next((r["ttft_p90"] for r in rows if r["workload"] == wl and r["router"] == rt), 0) for rt in routers]
        ax.bar(range(len(routers)), vals, color=["#2a7" if rt == "epp" else "#999" for rt in routers])
        ax.set_xticks(range(len(routers)), routers, rotation=45, ha="right", fontsize=8)
        ax.set_title(wl, fontsize=10)
        ax.set_ylabel("p90 TTFT (ms)")
    fig.tight_layout()
    p = outdir / f"{stem}-ttft-p90.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.8), squeeze=False)
    for ax, wl in zip(axes[0], names, strict=True):
        for r in results:
            if r.workload != wl or r.round:  # with --repeat, the first round's distribution
                continue
            xs = sorted(s.ttft * 1e3 for s in r.samples if s.ttft is not None)
            if xs:
                ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=r.router,
                        linewidth=2.2 if r.router == "epp" else 1.0)
        ax.set_xscale("log")
        ax.set_xlabel("TTFT (ms)")
        ax.set_title(wl, fontsize=10)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("fraction of requests")
    fig.tight_layout()
    p = outdir / f"{stem}-ttft-cdf.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)
    return paths


def round_order(routers: list[str], k: int) -> list[str]:
    """Round k's order: each round starts one router later (A B C, B C A, ...), so none always runs first."""
    k %= len(routers) or 1
    return routers[k:] + routers[:k]


async def run_all(args: argparse.Namespace, logdir: Path
                  ) -> tuple[list[RunResult], list[str], dict[str, workloads.Workload]]:
    from bench import scenarios

    scenario_names = [s for s in getattr(args, "scenarios", "").split(",") if s]
    names = scenario_names or [w for w in args.workloads.split(",") if w]
    if not args.routers:
        args.routers = scenarios.DEFAULT_ROUTERS if scenario_names else ",".join(
            r for r in ROUTERS if r not in ("epp-config", "gie-default") and not r.endswith(REPLICATED))
    routers = [r for r in args.routers.split(",") if r]
    skipped = []
    for r in list(routers):
        peer = peer_name(r)
        if peer and not PeerRouter.available(peer):
            routers.remove(r)
            skipped.append(f"{r}: not installed (pip install {peer})")
    wl = {n: scenarios.build(n, args) if scenario_names else workloads.build(n, args.rate, args.duration, args.seed)
          for n in names}
    results: list[RunResult] = []
    for n in names:
        run_args = argparse.Namespace(**{**vars(args), "scenario": n if scenario_names else ""})
        for k in range(args.repeat):
            for rt in round_order(routers, k):
                tag = f" (round {k + 1} of {args.repeat})" if args.repeat > 1 else ""
                span = workload_span(wl[n])
                print(f"[{n}] {rt}{tag}: {len(wl[n].requests)} requests over {span:.0f}s ...", flush=True)
                try:
                    r = await run_one(wl[n], rt, run_args, logdir)
                except Exception as e:  # a peer that fails to run is reported, not fatal
                    print(f"  {rt} failed: {e}", flush=True)
                    skipped.append(f"{rt} on {n}: {e}")
                    continue
                r.round = k
                results.append(r)
                row = summary(r)
                print(f"  ok {row['ok']} shed {row['shed']} err {row['errors']}  TTFT p50 {row['ttft_p50']:.1f} "
                      f"p90 {row['ttft_p90']:.1f} ms  hit {row['prefix_hit_rate']:.0%}", flush=True)
    return results, skipped, wl


def write_report(args: argparse.Namespace, results: list[RunResult], skipped: list[str],
                 wl: dict[str, workloads.Workload]) -> None:
    from bench import scenarios

    scenario_names = [s for s in getattr(args, "scenarios", "").split(",") if s]
    rows = combined(results)
    outdir = Path(args.out)
    outdir.mkdir(parents=True, exist_ok=True)
    stem = args.stem or ("routing-scenarios" if scenario_names else time.strftime("routing-%Y-%m-%d"))
    extra: list[str] = []
    if scenario_names:
        ladder = scenarios.stages(args)
        targets = scenarios.target_lines(rows, results, ladder)  # none without epp and a peer
        extra = [*(["## Targets (issue #16)", "", "```", *targets, "```", ""] if targets else []),
                 "## What each scenario did", ""]
        for n in dict.fromkeys(r["workload"] for r in rows):
            extra += [f"### {n}", "", *scenarios.mechanics_table(rows, n),
                      *(scenarios.stage_tables(results, ladder) if n == "upstream-shared-prefix" else [])]
    stages_note = " (upstream-shared-prefix: its own stages)" if "upstream-shared-prefix" in scenario_names else ""
    report = ["# Routing benchmark" + (": scenarios" if scenario_names else ""), "",
              f"Command: `bench/run {' '.join(sys.argv[1:])}`".rstrip(), "",
              f"Pool: {args.servers} simulated vLLM servers (Llama-3.1-8B on H100 latency model, "
              f"max_num_seqs {args.max_num_seqs}, {args.num_gpu_blocks} KV blocks of 16 tokens, max_lora "
              f"{args.max_lora}, time scale {args.time_scale:g}); Poisson arrivals at {args.rate:g} req/s for "
              f"{args.duration:g} s{stages_note}; seed {args.seed}. Every router saw the "
              "same requests on a fresh, cold pool"
              + (f", {args.repeat} times, routers in turn; numbers are medians over the rounds." if args.repeat > 1
                 else "."), "", *([scenarios.options_line(args, scenario_names), ""] if scenario_names else []),
              markdown(rows, wl), *extra]
    if ratio_lines := ratios(rows):
        report += ["## Ratios (p90 TTFT, other / epp)", "", "```", *ratio_lines, "```", ""]
    if skipped:
        report += ["## Not run", "", *[f"- {s}" for s in skipped], ""]
    (outdir / f"{stem}.md").write_text("\n".join(report))
    raw = {"args": vars(args), "summary": rows, "runs": [
        {"workload": r.workload, "router": r.router, "round": r.round, "duration": r.duration, "start": r.start,
         "mechanics": r.mechanics,
         "prefix_hit_rate": r.prefix_hit_rate, "per_pod": r.per_pod, "server_ttft_ms": r.server_ttft,
         "envoy_phases_ms": r.envoy_phases, "samples": [asdict(s) for s in r.samples]} for r in results]}
    (outdir / f"{stem}.json").write_text(json.dumps(raw))
    pngs = plots(rows, results, outdir, stem) if rows else []
    print("\n".join(report))
    print(f"wrote {outdir / (stem + '.md')}, {outdir / (stem + '.json')}, " + ", ".join(map(str, pngs)))


def main() -> None:
    p = argparse.ArgumentParser(prog="bench/run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", default="shared-prefix,multi-turn,rag,lora,mixed-priority,random")
    p.add_argument("--routers", default="", help="comma-separated (default: all but epp-config and gie-default; "
                   "with --scenarios: epp, round-robin, least-queue, gie-default and the peers)")
    p.add_argument("--epp-config", default="", help="EndpointPickerConfig file for the router epp-config")
    p.add_argument("--rate", type=float, default=12.0, help="requests per second (Poisson)")
    p.add_argument("--duration", type=float, default=40.0, help="seconds of arrivals per run")
    p.add_argument("--servers", type=int, default=4)
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--num-gpu-blocks", type=int, default=2048)
    p.add_argument("--max-lora", type=int, default=4)
    p.add_argument("--time-scale", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--repeat", type=int, default=1,
                   help="run every workload this many times over the routers in turn; report medians")
    p.add_argument("--out", default="bench/results")
    p.add_argument("--stem", default="", help="output file name stem (default routing-DATE)")
    p.add_argument("--kv-events", action="store_true",
                   help="the simulated pods publish KV-cache events (vLLM's format), each on its own loopback "
                   f"address at port {KV_EVENTS_PORT}; pair with --epp-config bench/configs/precise-prefix.yaml")
    p.add_argument("--envoy-phases", action="store_true",
                   help="give each Envoy an access log and report where the time went inside it (the pick hop)")
    from bench import scenarios

    scenarios.add_options(p)
    args = p.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)  # peers probe the pods with HTTP/2 first
    # A SIGTERM stops the run as Ctrl-C does, so the routers' child processes (epp, Envoy, peers) stop too.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    logdir = Path(tempfile.mkdtemp(prefix="epp-bench-"))
    results, skipped, wl = asyncio.run(run_all(args, logdir))
    write_report(args, results, skipped, wl)
    print(f"logs of epp, Envoy and the peer routers: {logdir}")


if __name__ == "__main__":
    main()
