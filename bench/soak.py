"""Fault-injection soak: a steady load through Envoy + epp while pods, /metrics, epp and Envoy fail on a schedule.

    python -m bench.soak [--duration 180] [--rate 40] [--pods 3] [--out bench/results/soak.md]

The gateway is the shipped one: each simulated pod its own process on its own loopback address
(127.0.0.11, .12, ...), one `epp serve` (TLS on its ext_proc port), and two Envoys from the shipped
bootstrap in front of it, both listing the pods in their pool cluster (so a request that cannot reach
its pod is retried on another): one FailClose (the default) and one FailOpen
(`failure_mode_allow: true`, with the request body buffered, which FailOpen needs). An open-loop
load at `--rate` alternates between the two Envoys. On a schedule spread over `--duration`, each
fault runs once, with quiet time between:

- pod-kill: SIGKILL one pod's process; restart it 5 s later;
- pod-freeze: SIGSTOP one pod's process for 5 s (a hung server), then SIGCONT;
- metrics-hang: one pod's /metrics hangs for 8 s, then answers garbage for 8 s (NaN and
  out-of-range gauges, unparsable text, random bytes, in turn), then heals;
- epp-kill, epp-term: SIGKILL epp (a crash), or SIGTERM it (a rollout: it drains, then exits), and start
  it again at once;
- epp-freeze: SIGSTOP epp for 5 s, then SIGCONT (a stalled process);
- envoy-restart (FailClose, then FailOpen): stop that Envoy and start it again.

A fault's window runs from its start until the gateway has recovered from it (the pod serves
again / epp answers health / Envoy is ready) plus a settle time. Each request is one of: answered
(its HTTP status), refused (no connection to Envoy), reset (the connection broke before the answer
was complete), or lost (nothing within the client's timeout: must never happen). A request that
failed while a window was open is counted against that fault; one that failed outside every window
is unattributed. The run prints a table per fault and the totals, and writes them to `--out`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import httpx
from aiohttp import web

from epp.envoy import EnvoyOptions, EnvoyProcess
from epp.simulator.engine import EngineConfig
from epp.simulator.server import SimulatedServer
from epp.stack import free_ports, grpc_serving, wait_until

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
SETTLE = 2.0  # seconds after a fault's recovery still counted as its window
CLIENT_TIMEOUT = 60.0  # no answer by then: the request is lost
GARBAGE = [  # what a broken /metrics answers, in turn, with status 200
    'vllm:num_requests_waiting{model_name="m"} NaN\nvllm:num_requests_running{model_name="m"} +Inf\n'
    'vllm:kv_cache_usage_perc{model_name="m"} NaN\n',
    'vllm:num_requests_waiting{model_name="m"} ' + "9" * 400 + '\nvllm:kv_cache_usage_perc{model_name="m"} 0.1\n',
    'vllm:num_requests_waiting{model_name="m" 3\n# TYPE\nvllm:kv_cache_usage_perc{{{ 1\n',
    "\x00\xff garbage \ufffd" * 50,
]


# --- a pod: one simulator in its own process, whose /metrics can be made to answer garbage ------

class SoakPod(SimulatedServer):
    """The simulator, with one more control: `{"metrics_garbage": true}` answers 200 with garbage, in turn."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.metrics_garbage = False
        self._garbage_seq = 0

    async def metrics(self, request: web.Request) -> web.Response:
        if self.metrics_garbage and not self.metrics_delay:
            self._garbage_seq += 1
            return web.Response(text=GARBAGE[self._garbage_seq % len(GARBAGE)], content_type="text/plain")
        return await super().metrics(request)

    async def control(self, request: web.Request) -> web.Response:
        body = await request.json()
        if "metrics_garbage" in body:
            self.metrics_garbage = bool(body["metrics_garbage"])
        return await super().control(_Replayed(request, body))  # type: ignore[arg-type]


class _Replayed:
    """The control request again, for the base class: its body was already read."""

    def __init__(self, request: web.Request, body: dict[str, Any]) -> None:
        self._body = body

    async def json(self) -> dict[str, Any]:
        return self._body


def serve_pod(host: str, port: int, name: str, time_scale: float) -> None:
    async def run() -> None:
        pod = SoakPod(name, port, EngineConfig(time_scale=time_scale, models=[MODEL]), host)
        await pod.start()
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await pod.stop()

    asyncio.run(run())


# --- the gateway -----------------------------------------------------------------------------

@dataclass
class Pod:
    host: str
    port: int
    name: str
    proc: subprocess.Popen[bytes] | None = None

    @property
    def hostport(self) -> str:
        return f"{self.host}:{self.port}"

    def healthy(self) -> bool:
        try:
            return httpx.get(f"http://{self.hostport}/health", timeout=0.5).status_code == 200
        except httpx.HTTPError:
            return False

    def control(self, **knobs: Any) -> None:
        httpx.post(f"http://{self.hostport}/sim/control", json=knobs, timeout=5).raise_for_status()


class Gateway:
    """Pods, epp and the two Envoys as child processes, each restartable."""

    def __init__(self, pods: int, time_scale: float, logdir: Path) -> None:
        self.logdir = logdir
        self.time_scale = time_scale
        ports = free_ports(pods + 9)
        self.pods = [Pod(f"127.0.0.{11 + i}", ports[i], f"pod-{i}") for i in range(pods)]
        self.grpc_port, self.health_port, self.metrics_port = ports[pods:pods + 3]
        envoy_ports = ports[pods + 3:]
        pool = [p.hostport for p in self.pods]  # Envoy knows the pool: a dead pod's picks are retried elsewhere
        self.envoy_opts = {
            "FailClose": EnvoyOptions(envoy_ports[0], self.grpc_port, envoy_ports[1], failure_mode_allow=False,
                                      pool_endpoints=pool),
            # FailOpen needs a buffered body: Envoy fails a FULL_DUPLEX_STREAMED request closed.
            "FailOpen": EnvoyOptions(envoy_ports[2], self.grpc_port, envoy_ports[3], failure_mode_allow=True,
                                     request_body_mode="BUFFERED", pool_endpoints=pool),
        }
        self.envoys: dict[str, EnvoyProcess] = {}
        self.epp: subprocess.Popen[bytes] | None = None
        self._logs: list[Any] = []

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.logdir / f"{name}.log", "ab")  # noqa: SIM115 - closed at stop
        self._logs.append(log)
        return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"))

    def start_pod(self, pod: Pod) -> None:
        pod.proc = self._spawn(pod.name, [sys.executable, "-m", "bench.soak", "--serve-pod",
                                          f"{pod.host}:{pod.port}:{pod.name}", "--time-scale", str(self.time_scale)])
        wait_until(pod.healthy, 30, f"{pod.name} health")

    def start_epp(self) -> None:
        self.epp = self._spawn("epp", [
            sys.executable, "-m", "epp", "serve", "--endpoints", ",".join(p.hostport for p in self.pods),
            "--grpc-port", str(self.grpc_port), "--grpc-health-port", str(self.health_port),
            "--metrics-port", str(self.metrics_port), "--http-pick-port", "0", "--bind-address", "127.0.0.1",
            "--seed", "1"])
        wait_until(lambda: self.epp is not None and (self.epp.poll() is not None or grpc_serving(self.health_port)),
                   30, "epp health")
        if self.epp.poll() is not None:
            raise RuntimeError(f"epp exited with {self.epp.returncode}; see {self.logdir / 'epp.log'}")

    def start_envoy(self, name: str) -> None:
        envoy = EnvoyProcess(self.envoy_opts[name])
        self.envoys[name] = envoy
        envoy.start()
        envoy.wait_ready(30)

    def url(self, name: str) -> str:
        o = self.envoy_opts[name]
        return f"http://127.0.0.1:{o.listen_port}"

    def start(self) -> None:
        for pod in self.pods:
            self.start_pod(pod)
        self.start_epp()
        for name in self.envoy_opts:
            self.start_envoy(name)

    def stop(self) -> None:
        for envoy in self.envoys.values():
            envoy.stop()
        procs = [p.proc for p in self.pods if p.proc is not None] + ([self.epp] if self.epp else [])
        if self.epp is not None and self.epp.poll() is None:
            self.epp.send_signal(signal.SIGCONT)  # were it stopped
            self.epp.kill()  # the run is over: no drain to wait for
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for log in self._logs:
            log.close()


# --- faults ------------------------------------------------------------------------------------

@dataclass
class Fault:
    name: str
    pod: str = ""  # the pod it hits, if one
    started: float = 0.0
    recovered: float = 0.0  # the gateway is whole again (before SETTLE)
    note: str = ""

    @property
    def window(self) -> tuple[float, float]:
        return self.started, self.recovered + SETTLE


def _until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    wait_until(cond, timeout, what, interval=0.05)


def served_by(outcomes: list[Outcome], pod: Pod, since: float) -> bool:
    return any(o.pod == pod.name and o.sent_at >= since for o in outcomes)


def pod_kill(gw: Gateway, outcomes: list[Outcome], pod: Pod) -> Fault:
    f = Fault(f"pod-kill {pod.name}", pod.name)
    f.started = time.monotonic()
    assert pod.proc is not None
    pod.proc.kill()
    pod.proc.wait()
    time.sleep(5)  # down for 5 s, as a crashed pod before its restart
    gw.start_pod(pod)
    back = time.monotonic()
    f.recovered = back
    with contextlib.suppress(TimeoutError):
        _until(lambda: served_by(outcomes, pod, back), 20, f"{pod.name} to serve again")
        f.note = f"served again {time.monotonic() - back:.1f} s after its restart"
    f.note = f.note or "not served again within 20 s of its restart"
    return f


def pod_freeze(gw: Gateway, outcomes: list[Outcome], pod: Pod, seconds: float = 5.0) -> Fault:
    """SIGSTOP a pod's process (a hung server: it accepts connections and answers nothing), then SIGCONT."""
    f = Fault(f"pod-freeze {pod.name}", pod.name)
    f.started = time.monotonic()
    assert pod.proc is not None
    pod.proc.send_signal(signal.SIGSTOP)
    time.sleep(seconds)
    pod.proc.send_signal(signal.SIGCONT)
    f.recovered = time.monotonic()
    f.note = f"stopped {seconds:g} s"
    return f


def metrics_hang(gw: Gateway, outcomes: list[Outcome], pod: Pod) -> Fault:
    f = Fault(f"metrics-hang+garbage {pod.name}", pod.name)
    f.started = time.monotonic()
    pod.control(metrics_delay=30.0)
    time.sleep(8)
    pod.control(metrics_delay=0.0, metrics_garbage=True)
    time.sleep(8)
    pod.control(metrics_garbage=False)
    healed = time.monotonic()
    f.recovered = healed
    with contextlib.suppress(TimeoutError):
        _until(lambda: served_by(outcomes, pod, healed), 20, f"{pod.name} to serve again")
        f.note = f"served again {time.monotonic() - healed:.1f} s after /metrics healed"
    f.note = f.note or "not served again within 20 s of /metrics healing"
    return f


def epp_restart(gw: Gateway, outcomes: list[Outcome], sig: signal.Signals) -> Fault:
    """SIGKILL (a crash) or SIGTERM (a rollout: epp drains, then exits), then start epp again at once."""
    f = Fault("epp-kill" if sig == signal.SIGKILL else "epp-term")
    f.started = time.monotonic()
    assert gw.epp is not None
    gw.epp.send_signal(sig)
    gw.epp.wait(60)
    exited = time.monotonic()
    gw.start_epp()
    serving = time.monotonic()
    for envoy in gw.envoys.values():
        envoy.wait_ready(30)  # its health check of the ext_proc cluster sees epp again
    f.recovered = time.monotonic()
    f.note = (f"exited after {exited - f.started:.1f} s, serving health {serving - f.started:.1f} s after the "
              f"signal, Envoys healthy after {f.recovered - f.started:.1f} s")
    return f


def epp_freeze(gw: Gateway, outcomes: list[Outcome], seconds: float = 5.0) -> Fault:
    """SIGSTOP epp for a while (a stalled process: CPU starvation, a debugger, a hung node), then SIGCONT."""
    f = Fault("epp-freeze")
    f.started = time.monotonic()
    assert gw.epp is not None
    gw.epp.send_signal(signal.SIGSTOP)
    time.sleep(seconds)
    gw.epp.send_signal(signal.SIGCONT)
    for envoy in gw.envoys.values():
        envoy.wait_ready(30)
    f.recovered = time.monotonic()
    f.note = f"stopped {seconds:g} s; Envoys healthy {f.recovered - f.started - seconds:.1f} s after it resumed"
    return f


def envoy_restart(gw: Gateway, outcomes: list[Outcome], name: str) -> Fault:
    f = Fault(f"envoy-restart {name}")
    f.started = time.monotonic()
    gw.envoys[name].stop()
    gw.start_envoy(name)
    f.recovered = time.monotonic()
    f.note = f"ready again after {f.recovered - f.started:.1f} s"
    return f


# --- the load --------------------------------------------------------------------------------

@dataclass
class Outcome:
    envoy: str
    sent_at: float
    done_at: float = 0.0
    result: str = ""  # an HTTP status, "refused", "reset" or "lost"
    pod: str = ""
    detail: str = ""  # the start of a failed answer's body, or the client's error


@dataclass
class Load:
    gw: Gateway
    rate: float
    outcomes: list[Outcome] = field(default_factory=list)
    stop: bool = False

    async def run(self) -> None:
        rng = random.Random(1)
        prefixes = [f"system prompt {i}: " + "you are a helpful assistant. " * 30 for i in range(8)]
        names = list(self.gw.envoy_opts)
        conn = aiohttp.TCPConnector(limit=0, force_close=False)
        async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=CLIENT_TIMEOUT)) as s:
            tasks: set[asyncio.Task[None]] = set()
            start = time.monotonic()
            i = 0
            while not self.stop:
                await asyncio.sleep(max(0.0, start + i / self.rate - time.monotonic()))
                name = names[i % len(names)]
                o = Outcome(name, time.monotonic())
                self.outcomes.append(o)
                body = {"model": MODEL, "prompt": rng.choice(prefixes) + f"question {i}", "max_tokens": 8,
                        "stream": i % 3 == 0}
                t = asyncio.create_task(self.one(s, self.gw.url(name), body, o))
                tasks.add(t)
                t.add_done_callback(tasks.discard)
                i += 1
            await asyncio.gather(*tasks)

    async def one(self, session: aiohttp.ClientSession, url: str, body: dict[str, Any], o: Outcome) -> None:
        try:
            async with session.post(url + "/v1/completions", json=body) as r:
                data = await r.read()
                o.result = str(r.status)
                o.pod = r.headers.get("x-simulator-pod", "")
                if r.status != 200:
                    o.detail = data[:100].decode("utf-8", "replace")
        except TimeoutError:
            o.result = "lost"
        except aiohttp.ClientConnectorError as e:
            o.result, o.detail = "refused", str(e)[:100]
        except (aiohttp.ClientError, ConnectionError) as e:
            o.result, o.detail = "reset", f"{type(e).__name__}: {e}"[:100]
        o.done_at = time.monotonic()


# --- the run and the report -------------------------------------------------------------------

FAULTS = ("pod-kill", "pod-freeze", "metrics-hang", "epp-kill", "epp-term", "epp-freeze", "envoy-restart-failclose",
          "envoy-restart-failopen")


def schedule(gw: Gateway, only: set[str]) -> list[tuple[str, Callable[[list[Outcome]], Fault]]]:
    a, b, c = gw.pods[0], gw.pods[min(1, len(gw.pods) - 1)], gw.pods[-1]
    steps = [
        (f"pod-kill {a.name}", lambda o: pod_kill(gw, o, a)),
        (f"pod-freeze {c.name}", lambda o: pod_freeze(gw, o, c)),
        (f"metrics-hang+garbage {b.name}", lambda o: metrics_hang(gw, o, b)),
        ("epp-kill", lambda o: epp_restart(gw, o, signal.SIGKILL)),
        ("epp-term", lambda o: epp_restart(gw, o, signal.SIGTERM)),
        ("epp-freeze", lambda o: epp_freeze(gw, o)),
        ("envoy-restart FailClose", lambda o: envoy_restart(gw, o, "FailClose")),
        ("envoy-restart FailOpen", lambda o: envoy_restart(gw, o, "FailOpen")),
    ]
    return [step for key, step in zip(FAULTS, steps, strict=True) if key in only]


async def soak(gw: Gateway, duration: float, rate: float, only: set[str]) -> tuple[list[Outcome], list[Fault], float]:
    load = Load(gw, rate)
    runner = asyncio.create_task(load.run())
    faults: list[Fault] = []
    steps = schedule(gw, only)
    start = time.monotonic()
    gap = duration / (len(steps) + 1)
    quiet_until = start
    for k, (name, step) in enumerate(steps, 1):
        # Never before the last fault's window has closed: each failure belongs to one fault.
        await asyncio.sleep(max(0.0, start + k * gap - time.monotonic(), quiet_until - time.monotonic()))
        print(f"[{time.monotonic() - start:6.1f}s] {name}", flush=True)
        f = await asyncio.to_thread(step, load.outcomes)
        print(f"[{time.monotonic() - start:6.1f}s]   {f.name}: {f.note}", flush=True)
        faults.append(f)
        quiet_until = f.window[1] + 1.0
    await asyncio.sleep(max(0.0, start + duration - time.monotonic(), quiet_until - time.monotonic()))
    load.stop = True
    await runner
    return load.outcomes, faults, time.monotonic() - start


def pct(xs: list[float], p: float) -> float:
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))] if xs else 0.0


def attribute(o: Outcome, faults: list[Fault]) -> Fault | None:
    for f in faults:
        lo, hi = f.window
        if o.sent_at <= hi and o.done_at >= lo:
            return f
    return None


def report(outcomes: list[Outcome], faults: list[Fault], elapsed: float, args: argparse.Namespace) -> str:
    failed = [o for o in outcomes if o.result != "200"]
    by_fault: dict[str, list[Outcome]] = {f.name: [] for f in faults}
    unattributed = []
    for o in failed:
        f = attribute(o, faults)
        (by_fault[f.name] if f else unattributed).append(o)
    lines = [
        f"`python -m bench.soak --duration {args.duration:g} --rate {args.rate:g} --pods {args.pods}"
        f"{'' if args.faults == ','.join(FAULTS) else ' --faults ' + args.faults}`: "
        f"{len(outcomes)} requests in {elapsed:.0f} s, half through the FailClose Envoy, half through FailOpen.",
        "",
        "| fault | window | requests in window | slowest answer | served by the pod | failed (FailClose) "
        "| failed (FailOpen) | failures span | how | recovery |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for f in faults:
        lo, hi = f.window
        in_window = [o for o in outcomes if o.sent_at <= hi and o.done_at >= lo]
        fs = by_fault[f.name]
        span = (f"{min(o.sent_at for o in fs) - lo:+.1f} s to {max(o.sent_at for o in fs) - lo:+.1f} s"
                if fs else "—")
        how = ", ".join(f"{n} {r}" for r, n in sorted(Counter(o.result for o in fs).items())) or "—"
        close = sum(o.envoy == "FailClose" for o in fs)
        served = "—"
        if f.pod:
            during = [o.sent_at - lo for o in in_window if o.pod == f.pod and lo <= o.sent_at <= f.recovered]
            served = (f"{sum(o.pod == f.pod for o in in_window)} (of {sum(o.pod == f.pod for o in outcomes)}); "
                      + (f"picked until {max(during):+.1f} s" if during else "no pick during the fault"))
        slowest = max((o.done_at - o.sent_at for o in in_window), default=0.0)
        lines.append(f"| {f.name} | {hi - lo:.1f} s | {len(in_window)} | {slowest:.2f} s | {served} | {close} | "
                     f"{len(fs) - close} | {span} | {how} | {f.note} |")
    statuses = Counter(o.result for o in outcomes)
    lost = statuses.get("lost", 0)
    quiet = sorted(o.done_at - o.sent_at for o in outcomes if o.result == "200" and attribute(o, faults) is None)
    lines += [
        "",
        f"- outside the fault windows: p50 {pct(quiet, 50) * 1000:.0f} ms, p99 {pct(quiet, 99) * 1000:.0f} ms, "
        f"slowest {quiet[-1] if quiet else 0:.2f} s",
        f"- sent: {len(outcomes)}; answered by status: "
        + ", ".join(f"{r}: {n}" for r, n in sorted(statuses.items()) if r.isdigit()),
        f"- failed because of a fault: {sum(len(v) for v in by_fault.values())}; failed outside any fault window: "
        f"{len(unattributed)}"
        + (f" ({', '.join(f'{n} {r}' for r, n in sorted(Counter(o.result for o in unattributed).items()))})"
           if unattributed else ""),
        f"- refused (no connection to Envoy): {statuses.get('refused', 0)}; reset mid-answer: "
        f"{statuses.get('reset', 0)}",
        f"- **lost** (no answer within {CLIENT_TIMEOUT:g} s): **{lost}**",
        "",
        "\"failures span\" is when the fault's failed requests were sent, from the start of its window; "
        "\"served by the pod\" counts the answers that pod gave in the window (and in the whole run), and when "
        "the last request it answered was sent while the fault lasted.",
        "",
        "What the failed requests got, by fault (each distinct answer once):",
        "",
    ]
    for name, fs in [*by_fault.items(), ("outside any fault", unattributed)]:
        for (envoy, result, detail), n in sorted(Counter((o.envoy, o.result, o.detail) for o in fs).items()):
            lines.append(f"- {name}, {envoy}: {n} x {result} `{detail.strip() or '(empty body)'}`")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.soak")
    ap.add_argument("--duration", type=float, default=180.0, help="seconds of load; the faults spread over it")
    ap.add_argument("--rate", type=float, default=40.0, help="requests a second, split between the two Envoys")
    ap.add_argument("--pods", type=int, default=3)
    ap.add_argument("--time-scale", type=float, default=1.0, help="the simulated pods' speed (see the simulator)")
    ap.add_argument("--faults", default=",".join(FAULTS), help=f"which faults, in this order: {', '.join(FAULTS)}")
    ap.add_argument("--out", default="", help="write the report (markdown) here, e.g. bench/results/soak.md")
    ap.add_argument("--serve-pod", default="", help=argparse.SUPPRESS)  # HOST:PORT:NAME, the pod processes
    args = ap.parse_args()
    if args.serve_pod:
        host, port, name = args.serve_pod.split(":")
        serve_pod(host, int(port), name, args.time_scale)
        return
    only = {f.strip() for f in args.faults.split(",") if f.strip()}
    if unknown := only - set(FAULTS):
        ap.error(f"unknown fault(s) {', '.join(sorted(unknown))}; known: {', '.join(FAULTS)}")
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    logdir = tempfile.mkdtemp(prefix="epp-soak-")  # kept: the logs of every process, for a failure's why
    gw = Gateway(args.pods, args.time_scale, Path(logdir))
    try:
        gw.start()
        print(f"gateway up (logs in {logdir}); {args.duration:g} s at {args.rate:g} req/s", flush=True)
        outcomes, faults, elapsed = asyncio.run(soak(gw, args.duration, args.rate, only))
    finally:
        gw.stop()
    text = report(outcomes, faults, elapsed, args)
    print(text)
    if args.out:
        Path(args.out).write_text("# Fault-injection soak\n\nMethod and faults: "
                                  "[bench/README.md](../README.md#fault-injection-soak-benchsoak).\n\n" + text + "\n")
    lost = sum(o.result == "lost" for o in outcomes)
    sys.exit(1 if lost else 0)


if __name__ == "__main__":
    main()
