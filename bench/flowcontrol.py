"""Flow control under overload: the mixed-priority workload with flow control on and off.

    python -m bench.flowcontrol [--rate 4] [--duration 15] [--servers 2] [--max-num-seqs 4] [--time-scale 4]
                                [--ttl 8s] [--batch-queue 40] [--holdback 0.5] [--runs NAME,...]

The mixed-priority workload (bench/workloads.py: shared-prefix traffic at 2.5x `--rate`, half
of it sheddable, objective `batch`, priority -1) runs against a pool sized so that `--rate`
is below what the pool serves and 2.5x `--rate` is well above it: the priority-0 half alone
fits, both halves together do not. Every router sees the same requests on a fresh, cold pool:

- unloaded:          epp (default profile) with the priority-0 requests alone: the reference
- round-robin:       Envoy's ROUND_ROBIN, no epp: nothing is shed, nothing waits
- least-queue:       epp, queue-scorer only; flow control off: sheddable requests get 429 while
                     the pool is saturated (the utilization detector's default thresholds)
- least-queue + FC:  the same with the flowControl gate on
- epp:               epp's default profile, flow control off
- epp + FC:          epp's default profile with the flowControl gate on

With flow control on, the saturation detector is the concurrency detector at each server's
batch size (`--max-num-seqs` requests in flight per server), requests wait inside epp up to
`--ttl`, a band of sheddable requests holds at most `--batch-queue` of them, and the
priority-holdback policy lets sheddable requests take at most `--holdback` of the slots. Each band's
client TTFT p50/p90, the time it waited in epp's queue (from epp's debug log, one line per
pick), and its 429s are reported; the goal is that priority 0 keeps its p90 TTFT within 2x of
the unloaded run. Writes bench/results/flowcontrol.md (and .json.gz with every request); a run with
the gate on fails unless epp's /metrics shows its flow controller deciding on requests.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from bench import workloads
from bench.routing import LEAST_QUEUE_CONFIG, POOL_FILE, EnvoyPoolRouter, Router, Sample, _send, pct
from epp.envoy import EnvoyOptions, EnvoyProcess
from epp.scheduling.picker_config import DEFAULT_CONFIG
from epp.simulator.engine import EngineConfig
from epp.simulator.server import SimulatedServer
from epp.stack import free_ports, grpc_serving, wait_until

HIGH, BATCH = "priority 0", "batch (-1)"


def with_flow_control(config: str, max_concurrency: int, ttl: str, batch_queue: int, holdback: float) -> str:
    """The config with the flowControl gate on, gated by a concurrency detector; with `holdback`, the
    priority-holdback policy keeps sheddable dispatch below that share of the pool's slots."""
    doc = yaml.safe_load(config)
    doc["apiVersion"] = "llm-d.ai/v1alpha1"
    doc["featureGates"] = ["flowControl"]
    doc["plugins"].append({"type": "concurrency-detector", "parameters": {"maxConcurrency": max_concurrency}})
    doc["flowControl"] = {
        "defaultRequestTTL": ttl,
        "defaultNegativePriorityBand": {"maxRequests": batch_queue},
        "saturationDetector": {"pluginRef": "concurrency-detector"},
    }
    if holdback:
        doc["plugins"].append({"type": "priority-holdback-policy", "name": "holdback",
                               "parameters": {"minCeiling": holdback}})
        doc["flowControl"]["usageLimitPolicyPluginRef"] = "holdback"
    return yaml.safe_dump(doc, sort_keys=False)


def _label(line: str, name: str) -> str:
    return line.split(f'{name}="', 1)[1].split('"', 1)[0]


def bucket_range(buckets: list[tuple[float, float]], q: float) -> tuple[float, float] | None:
    """The bucket (lower, upper bound) of a cumulative histogram's (upper bound, count) that holds its
    q-th percentile: a histogram says no more than that."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = buckets[-1][1] * q / 100
    lower = 0.0
    for bound, count in buckets:
        if count >= rank:
            return lower, bound
        lower = bound
    return lower, float("inf")


class EppProcess(Router):
    """`epp serve` over the pool behind the shipped Envoy layout; its debug log says how long each pick waited."""

    def __init__(self, pods: list[str], logdir: Path, name: str, config: str | None) -> None:
        self.pods, self.logdir, self.name, self.config = pods, logdir, name, config
        self.proc: subprocess.Popen[bytes] | None = None
        self.envoy: EnvoyProcess | None = None
        self.decisions: dict[str, int] = {}
        self.queue_buckets: dict[int, list[tuple[float, float]]] = {}
        self.log_path = logdir / f"epp-{name.replace(' ', '_').replace('+', 'fc')}.log"

    def start(self) -> None:
        grpc_port, health_port, metrics_port, listen, admin = free_ports(5)
        self.metrics_port = metrics_port
        pool = self.logdir / "pool.yaml"
        pool.write_text(POOL_FILE)
        args = [sys.executable, "-m", "epp", "serve", "--endpoints", ",".join(self.pods), "--pool-file", str(pool),
                "--grpc-port", str(grpc_port), "--grpc-health-port", str(health_port),
                "--metrics-port", str(metrics_port), "--http-pick-port", "0", "--bind-address", "127.0.0.1",
                "--seed", "1", "--drain-timeout", "0s", "--zap-encoder", "json", "--v", "4"]
        if self.config:
            args += ["--config-text", self.config]
        log = open(self.log_path, "wb")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        proc = self.proc
        wait_until(lambda: proc.poll() is not None or grpc_serving(health_port), 30, "epp")
        if proc.poll() is not None:
            raise RuntimeError(f"epp exited: {self.log_path.read_text()[-3000:]}")
        self.envoy = EnvoyProcess(EnvoyOptions(listen, grpc_port, admin)).start()
        self.envoy.wait_ready()
        self.url = self.envoy.url

    def flow_decisions(self) -> dict[str, int]:
        """Requests epp's flow controller decided on, by outcome (its /metrics): proof the gate is on.
        Also keeps the dispatched requests' queue-time histogram by priority, in `queue_buckets`."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as r:
            text = r.read().decode()
        out: dict[str, int] = {}
        buckets: dict[int, dict[float, float]] = {}
        for line in text.splitlines():
            if line.startswith("llm_d_epp_flow_control_requests_total{"):
                outcome = _label(line, "outcome")
                out[outcome] = out.get(outcome, 0) + int(float(line.rsplit(" ", 1)[1]))
            elif (line.startswith("llm_d_epp_flow_control_request_queue_duration_seconds_bucket{")
                  and _label(line, "outcome") == "Dispatched"):
                per = buckets.setdefault(int(_label(line, "priority")), {})
                le = float(_label(line, "le"))
                per[le] = per.get(le, 0.0) + float(line.rsplit(" ", 1)[1])
        self.queue_buckets = {prio: sorted(per.items()) for prio, per in buckets.items()}
        return out

    def stop(self) -> None:
        gated = bool(self.config and "flowControl" in self.config)
        if gated and self.proc is not None and self.proc.poll() is None:
            self.decisions = self.flow_decisions()
        if self.envoy is not None:
            self.envoy.stop()
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
        if gated and not self.decisions:
            raise RuntimeError(f"{self.name}: the flowControl gate is set but epp's flow controller decided on "
                               "no request")

    def queue_times(self) -> dict[int, list[float]]:
        """Seconds each picked request waited in flow control, by priority (the pick lines of the debug log)."""
        out: dict[int, list[float]] = {}
        for line in self.log_path.read_text().splitlines():
            if '"request scheduled"' not in line:
                continue
            rec = json.loads(line)
            out.setdefault(rec["priority"], []).append(rec.get("queuedSeconds", 0.0))
        return out


@dataclass
class Run:
    name: str
    samples: list[Sample] = field(default_factory=list)
    queue: dict[int, list[float]] = field(default_factory=dict)
    duration: float = 0.0
    decisions: dict[str, int] = field(default_factory=dict)  # flow control's outcomes, from epp's /metrics
    queue_buckets: dict[int, list[tuple[float, float]]] = field(default_factory=dict)


async def run_one(name: str, reqs: list[workloads.TimedRequest], config: str | None, args: argparse.Namespace,
                  logdir: Path) -> Run:
    servers = []
    for i, port in enumerate(free_ports(args.servers)):
        s = SimulatedServer(f"sim-{i}", port, EngineConfig(max_num_seqs=args.max_num_seqs, time_scale=args.time_scale))
        await s.start()
        servers.append(s)
    pods = [f"127.0.0.1:{s.port}" for s in servers]
    router: Router = EnvoyPoolRouter(pods, "ROUND_ROBIN") if config == "round-robin" else \
        EppProcess(pods, logdir, name, config)
    run = Run(name)
    try:
        await asyncio.to_thread(router.start)
        await asyncio.sleep(0.5)  # let epp scrape the pool once
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300),
                                         connector=aiohttp.TCPConnector(limit=0)) as session:
            start = time.perf_counter()
            tasks = []
            for req in reqs:
                delay = start + req.at - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                sample = Sample(0, BATCH if req.tag else HIGH, 0.0)
                run.samples.append(sample)
                tasks.append(asyncio.create_task(_send(session, router.url, req, {}, sample)))
            await asyncio.gather(*tasks)
            run.duration = time.perf_counter() - start
    finally:
        await asyncio.to_thread(router.stop)
        for s in servers:
            await s.stop()
    if isinstance(router, EppProcess):
        run.queue = router.queue_times()
        run.decisions = router.decisions
        run.queue_buckets = router.queue_buckets
    return run


def band_rows(run: Run) -> list[dict[str, Any]]:
    rows = []
    for band, prio in ((HIGH, 0), (BATCH, -1)):
        samples = [s for s in run.samples if s.tag == band]
        if not samples:
            continue
        ok = [s.ttft * 1e3 for s in samples if s.status == 200 and s.ttft is not None]
        waited = [q * 1e3 for q in run.queue.get(prio, [])]
        waited_pcts: tuple[Any, Any] = (pct(waited, 50), pct(waited, 90)) if waited else (None, None)
        if not waited and prio in run.queue_buckets:  # no pick lines in the log: epp's histogram
            waited_pcts = tuple(bucket_range(run.queue_buckets[prio], q) for q in (50, 90))  # type: ignore[assignment]
        rows.append({
            "run": run.name, "band": band, "requests": len(samples), "ok": len(ok),
            "429": sum(1 for s in samples if s.status == 429),
            "other_errors": sum(1 for s in samples if s.status not in (200, 429)),
            "ttft_p50": pct(ok, 50), "ttft_p90": pct(ok, 90),
            "queue_p50": waited_pcts[0], "queue_p90": waited_pcts[1],
        })
    return rows


def _ms(v: float | tuple[float, float] | None) -> str:
    if isinstance(v, tuple):  # a histogram bucket, in seconds
        lo, hi = v
        return f"{lo * 1e3:g}-{hi * 1e3:g} ms" if lo else f"< {hi * 1e3:g} ms"
    return "-" if v is None or v != v else f"{v:.0f} ms"


def report(args: argparse.Namespace, runs: list[Run], wl: workloads.Workload) -> str:
    rows = [r for run in runs for r in band_rows(run)]
    unloaded = next((r["ttft_p90"] for r in rows if r["run"] == "unloaded" and r["band"] == HIGH), float("nan"))
    out = ["# Flow control under overload", "",
           f"Command: `{' '.join(['python -m bench.flowcontrol', *sys.argv[1:]])}`", "",
           f"Pool: {args.servers} simulated vLLM servers (max_num_seqs {args.max_num_seqs}, time scale "
           f"{args.time_scale:g}); the mixed-priority workload: {wl.description}, Poisson arrivals at "
           f"{2.5 * args.rate:g} req/s (2.5x {args.rate:g}) for {args.duration:g} s, half of them sheddable; "
           f"seed {args.seed}. The unloaded run sends the priority-0 half alone. With flow control: the "
           f"concurrency detector at {args.max_num_seqs} requests per server, defaultRequestTTL {args.ttl}, "
           f"defaultNegativePriorityBand maxRequests {args.batch_queue}"
           + (f", priority-holdback-policy minCeiling {args.holdback:g} (sheddable requests dispatch only while "
              f"the pool is below {args.holdback:.0%} of its slots)" if args.holdback else "")
           + ". Queue time is what epp's debug log reports for each picked request (0 when it passed at "
           "once) or, without those lines, the bucket of the dispatched requests' "
           "`llm_d_epp_flow_control_request_queue_duration_seconds` histogram that holds the percentile.", "",
           "| run | band | requests | ok | 429 | other errors | TTFT p50 | TTFT p90 | queue p50 | queue p90 "
           "| p90 / unloaded |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = r["ttft_p90"] / unloaded if r["band"] == HIGH and unloaded == unloaded else None
        out.append(f"| {r['run']} | {r['band']} | {r['requests']} | {r['ok']} | {r['429']} | {r['other_errors']} | "
                   f"{_ms(r['ttft_p50'])} | {_ms(r['ttft_p90'])} | {_ms(r['queue_p50'])} | {_ms(r['queue_p90'])} | "
                   + (f"{ratio:.2f}x" if ratio is not None else "") + " |")
    out.append("")
    for r in rows:
        if r["band"] == HIGH and r["run"] != "unloaded":
            ratio = r["ttft_p90"] / unloaded
            verdict = "within 2x" if ratio <= 2 else "NOT within 2x"
            out.append(f"- {r['run']}: priority-0 p90 TTFT {r['ttft_p90']:.0f} ms = {ratio:.2f}x unloaded "
                       f"({unloaded:.0f} ms): {verdict}")
    decided = [(run.name, run.decisions) for run in runs if run.decisions]
    if decided:
        out += ["", "Flow control's decisions in each run with it on (epp's "
                "`llm_d_epp_flow_control_requests_total`, by outcome):", ""]
        for name, d in decided:
            out.append(f"- {name}: " + ", ".join(f"{k} {v}" for k, v in sorted(d.items())))
    return "\n".join(out) + "\n"


async def run_all(args: argparse.Namespace, logdir: Path) -> tuple[list[Run], workloads.Workload]:
    wl = workloads.build("mixed-priority", args.rate, args.duration, args.seed)
    high_only = [r for r in wl.requests if not r.tag]
    fc = {"max_concurrency": args.max_num_seqs, "ttl": args.ttl, "batch_queue": args.batch_queue,
          "holdback": args.holdback}
    plan: list[tuple[str, list[workloads.TimedRequest], str | None]] = [
        ("unloaded", high_only, None),
        ("round-robin", wl.requests, "round-robin"),
        ("least-queue", wl.requests, LEAST_QUEUE_CONFIG),
        ("least-queue + FC", wl.requests, with_flow_control(LEAST_QUEUE_CONFIG, **fc)),
        ("epp", wl.requests, None),
        ("epp + FC", wl.requests, with_flow_control(DEFAULT_CONFIG, **fc)),
    ]
    only = {n.strip() for n in args.runs.split(",") if n.strip()} if args.runs else None
    runs = []
    for name, reqs, config in plan:
        if only and name not in only:
            continue
        print(f"[{name}] {len(reqs)} requests over {args.duration:g}s ...", flush=True)
        run = await run_one(name, reqs, config, args, logdir)
        runs.append(run)
        for r in band_rows(run):
            print(f"  {r['band']}: ok {r['ok']} 429 {r['429']} err {r['other_errors']}  TTFT p50 {_ms(r['ttft_p50'])}"
                  f" p90 {_ms(r['ttft_p90'])}  queue p90 {_ms(r['queue_p90'])}", flush=True)
    return runs, wl


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.flowcontrol", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rate", type=float, default=4.0, help="the workload's base rate; it sends 2.5x this")
    p.add_argument("--duration", type=float, default=15.0)
    p.add_argument("--servers", type=int, default=2)
    p.add_argument("--max-num-seqs", type=int, default=4)
    p.add_argument("--time-scale", type=float, default=4.0)
    p.add_argument("--ttl", default="8s", help="flowControl.defaultRequestTTL")
    p.add_argument("--batch-queue", type=int, default=40, help="most sheddable requests waiting at once")
    p.add_argument("--holdback", type=float, default=0.5,
                   help="priority-holdback-policy minCeiling: sheddable requests dispatch only below this "
                        "saturation (0: static-usage-limit-policy, every band up to 1.0)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--runs", default="", help="only these runs, comma-separated (default: all)")
    p.add_argument("--out", default="bench/results")
    p.add_argument("--stem", default="flowcontrol")
    args = p.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    logdir = Path(tempfile.mkdtemp(prefix="epp-bench-fc-"))
    runs, wl = asyncio.run(run_all(args, logdir))
    text = report(args, runs, wl)
    outdir = Path(args.out)
    outdir.mkdir(parents=True, exist_ok=True)
    (outdir / f"{args.stem}.md").write_text(text)
    raw = {"args": vars(args), "runs": [{"name": r.name, "duration": r.duration, "queue_seconds": r.queue,
                                         "flow_control_outcomes": r.decisions,
                                         "queue_seconds_buckets": r.queue_buckets,
                                         "samples": [asdict(s) for s in r.samples]} for r in runs]}
    with gzip.open(outdir / f"{args.stem}.json.gz", "wt") as f:
        json.dump(raw, f)
    print(text)
    print(f"wrote {outdir / (args.stem + '.md')}; logs in {logdir}")


if __name__ == "__main__":
    main()
