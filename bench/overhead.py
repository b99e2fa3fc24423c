"""Latency epp adds per request: Envoy → epp → server vs the same Envoy config routing directly.

All gateways run side by side in one run, from the same bootstrap, against one epp and
one server: epp in the shipped layout (a pick filter, and an observability-mode filter
that watches the response), epp in GIE's single-filter layout (the pick filter also
processes the response, in --mode), epp in the HTTP pick layout (the pick over ext_authz,
deploy/envoy-http-pick.yaml), and the direct one, with the ext_proc filters
removed and the pod named by the client in x-gateway-destination-endpoint. Requests
rotate between them, so machine noise hits all alike. Prints p50/p99 of each and the
difference to direct (the added latency).

    python -m bench.overhead [--requests 2000] [--mode FULL_DUPLEX_STREAMED|BUFFERED]
    python -m bench.overhead --rates 50,100,200,400,800 [--seconds 10] [--rounds 1] [--inline | --http-pick]

With --rates, each rate is an open-loop Poisson load on one layout (the shipped one, or
with --inline GIE's): every arrival sends one request through it and through the direct
gateway at once. For each rate it prints both latency distributions, the difference, the
rate achieved, and epp's CPU (share of one core, from /proc) and resident memory; the
highest rate epp sustains is the last one it keeps up with (achieved rate within 5% of
the offered rate, no errors, epp under one core).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import resource
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from bench.gateways import DirectEnvoy
from epp.envoy import EnvoyOptions, EnvoyProcess
from epp.stack import Stack, StackOptions, free_ports

MODEL = "meta-llama/Llama-3.1-8B-Instruct"


def request_body(prompt_chars: int) -> dict:
    """A completion request with a prompt of about this many characters (4 make a token)."""
    words = "The quick brown fox "
    return {"model": MODEL, "prompt": (words * (prompt_chars // len(words) + 1))[:prompt_chars], "max_tokens": 1}


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def _sweep(
    stack: Stack, epp_url: str, direct_url: str, pod: str, rates: list[float], seconds: float,
    prompt_chars: int = 1000,
) -> list[dict]:
    import aiohttp

    body = request_body(prompt_chars)
    rows = []
    pid = stack.epp_proc.pid
    rng = random.Random(1)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def one(url: str, headers: dict[str, str], out: list[float], errors: list[int]) -> None:
            t = time.perf_counter()
            try:
                async with session.post(url + "/v1/completions", json=body, headers=headers) as r:
                    await r.read()
                    if r.status != 200:
                        errors.append(r.status)
                        return
            except aiohttp.ClientError:
                errors.append(-1)
                return
            out.append(time.perf_counter() - t)

        for _ in range(100):  # warm both paths
            await one(epp_url, {}, [], [])
            await one(direct_url, {"x-gateway-destination-endpoint": pod}, [], [])
        for rate in rates:
            via_epp: list[float] = []
            straight: list[float] = []
            errors: list[int] = []
            tasks = []
            cpu0, t0 = _cpu_seconds(pid), time.perf_counter()
            next_at = t0
            while next_at < t0 + seconds:
                next_at += rng.expovariate(rate)
                delay = next_at - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(epp_url, {}, via_epp, errors)))
                tasks.append(asyncio.create_task(
                    one(direct_url, {"x-gateway-destination-endpoint": pod}, straight, errors)))
            await asyncio.gather(*tasks)
            elapsed = time.perf_counter() - t0
            cpu = (_cpu_seconds(pid) - cpu0) / elapsed
            rows.append({
                "rate": rate, "achieved": len(via_epp) / elapsed, "errors": len(errors),
                "direct_p50": pct(straight, 50), "direct_p99": pct(straight, 99),
                "epp_p50": pct(via_epp, 50), "epp_p99": pct(via_epp, 99),
                "epp_cpu": cpu, "epp_rss_mib": _rss_mib(pid),
            })
    return rows


@contextlib.contextmanager
def gateways(mode: str) -> Iterator[tuple[Stack, EnvoyProcess, EnvoyProcess, DirectEnvoy]]:
    """Envoy + epp + one instant server in the shipped layout (TLS to epp, its default); beside it, Envoys
    in GIE's single-filter layout and in the HTTP pick layout (same epp), and one routing directly to
    that server."""
    opts = StackOptions(servers=1, request_body_mode=mode, response_body_mode=mode,
                        sim_args=["--time-scale", "0"], epp_args=["--seed", "1"])
    with Stack(opts) as stack:
        listen, admin, listen2, admin2, listen3, admin3 = free_ports(6)
        direct = DirectEnvoy(EnvoyOptions(listen, 0, admin))
        inline = EnvoyProcess(EnvoyOptions(listen2, stack.grpc_port, admin2, request_body_mode=mode,
                                           response_body_mode=mode, observe_responses=False))
        http_pick = EnvoyProcess(EnvoyOptions(listen3, stack.grpc_port, admin3, layout="http-pick",
                                              http_pick_port=stack.http_pick_port))
        envoys = (direct, inline, http_pick)
        for e in envoys:
            e.start()
        try:
            for e in envoys:
                e.wait_ready()
            yield stack, inline, http_pick, direct
        finally:
            for e in envoys:
                e.stop()


def pin(pid: int, cpus: set[int]) -> None:
    """Pin every thread of a process (as `taskset -a -p`): epp's gRPC threads exist before we pin."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(tid), cpus)


def rate_sweep(args: argparse.Namespace) -> None:
    rates = [float(r) for r in args.rates.split(",")]
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # thousands of sockets at the higher rates
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if args.epp_cpu is not None:  # the client, Envoys and server (children inherit this) stay off epp's CPU
        os.sched_setaffinity(0, os.sched_getaffinity(0) - {args.epp_cpu})
    with gateways(args.mode) as (stack, inline, http_pick, direct):
        epp_url = inline.url if args.inline else http_pick.url if args.http_pick else stack.url
        if args.epp_cpu is not None:
            pin(stack.epp_proc.pid, {args.epp_cpu})
            print(f"epp pinned to CPU {args.epp_cpu}; client, Envoys and server share the other "
                  f"{len(os.sched_getaffinity(0))} CPUs")
        rounds = [asyncio.run(_sweep(stack, epp_url, direct.url, stack.endpoints[0], rates, args.seconds,
                                     args.prompt_chars))
                  for _ in range(args.rounds)]
    rows = [r for rnd in rounds for r in rnd]
    ms = 1000.0
    layout = ("GIE single-filter layout" if args.inline else "HTTP pick layout" if args.http_pick
              else "shipped layout (response observed)")
    print(f"mode={args.mode}, {layout}, prompt {args.prompt_chars} chars; open-loop Poisson, "
          f"{args.seconds:g}s per rate, each arrival sent through both gateways")
    print(f"{'rate/s':>7}{'achieved':>9}{'err':>5}{'direct p50':>11}{'epp p50':>9}{'added p50':>10}"
          f"{'direct p99':>11}{'epp p99':>9}{'added p99':>10}{'epp CPU':>9}{'epp RSS':>9}")
    sustained = 0.0
    for r in rows:
        print(f"{r['rate']:7.0f}{r['achieved']:9.1f}{r['errors']:5d}{r['direct_p50'] * ms:11.2f}"
              f"{r['epp_p50'] * ms:9.2f}{(r['epp_p50'] - r['direct_p50']) * ms:10.2f}"
              f"{r['direct_p99'] * ms:11.2f}{r['epp_p99'] * ms:9.2f}"
              f"{(r['epp_p99'] - r['direct_p99']) * ms:10.2f}{r['epp_cpu']:8.0%} {r['epp_rss_mib']:6.0f} MiB")
        if r["achieved"] >= 0.95 * r["rate"] and not r["errors"] and r["epp_cpu"] < 1.0:
            sustained = max(sustained, r["rate"])
    print(f"highest offered rate epp kept up with: {sustained:g} req/s")
    if args.rounds > 1:
        print(f"\nover {args.rounds} rounds (each rate once per round): median [min, max] of the added latency")
        for i, rate in enumerate(rates):
            p50s = sorted((rnd[i]["epp_p50"] - rnd[i]["direct_p50"]) * ms for rnd in rounds)
            p99s = sorted((rnd[i]["epp_p99"] - rnd[i]["direct_p99"]) * ms for rnd in rounds)
            print(f"{rate:7.0f} req/s  added p50 {statistics.median(p50s):.2f} ms [{p50s[0]:.2f}, {p50s[-1]:.2f}]"
                  f"  added p99 {statistics.median(p99s):.2f} ms [{p99s[0]:.2f}, {p99s[-1]:.2f}]")


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.overhead")
    ap.add_argument("--requests", type=int, default=2000, help="per gateway")
    ap.add_argument("--mode", default="FULL_DUPLEX_STREAMED", help="request/response body mode for epp's Envoy")
    ap.add_argument("--inline", action="store_true",
                    help="sweep GIE's single-filter layout instead of the shipped one")
    ap.add_argument("--http-pick", action="store_true",
                    help="sweep the HTTP pick layout (deploy/envoy-http-pick.yaml) instead of the shipped one")
    ap.add_argument("--rates", default="", help="comma-separated request rates: open-loop sweep instead")
    ap.add_argument("--seconds", type=float, default=10.0, help="seconds per rate in the sweep")
    ap.add_argument("--rounds", type=int, default=1,
                    help="repeat the sweep; prints the median and range of each rate's added latency")
    ap.add_argument("--epp-cpu", type=int, default=None,
                    help="pin epp to this one CPU and keep everything else off it (sweep only)")
    ap.add_argument("--prompt-chars", type=int, default=1000,
                    help="prompt length in characters (the body epp reads and sends back grows with it)")
    args = ap.parse_args()
    if args.rates:
        rate_sweep(args)
        return

    plain_opts = StackOptions(servers=1, request_body_mode=args.mode, response_body_mode=args.mode, tls=False,
                              sim_args=["--time-scale", "0"], epp_args=["--seed", "1"])
    with gateways(args.mode) as (stack, inline, http_pick, direct), Stack(plain_opts) as plain:
        pod = stack.endpoints[0]
        body = request_body(args.prompt_chars)
        fronts = {  # name: (url, headers)
            "Envoy direct": (direct.url, {"x-gateway-destination-endpoint": pod}),
            "Envoy + epp": (stack.url, {}),
            "Envoy + epp, plaintext": (plain.url, {}),
            "Envoy + epp, inline": (inline.url, {}),
            "Envoy + epp, HTTP pick": (http_pick.url, {}),
        }
        times: dict[str, list[float]] = {name: [] for name in fronts}
        clients = {name: httpx.Client(base_url=url, headers=h, timeout=10) for name, (url, h) in fronts.items()}
        try:
            for i in range(50 + args.requests):  # the first 50 warm every path
                for name, c in clients.items():
                    t = time.perf_counter()
                    r = c.post("/v1/completions", json=body)
                    if i >= 50:
                        times[name].append(time.perf_counter() - t)
                    if r.status_code != 200:
                        raise RuntimeError(f"{name}: request failed: {r.text}")
        finally:
            for c in clients.values():
                c.close()

    ms = 1000.0
    print(f"mode={args.mode}  requests={args.requests} per gateway, prompt {args.prompt_chars} chars, "
          "one connection each, in turn")
    print("  Envoy + epp: the shipped layout (TLS to epp), an observability-mode filter watches the response")
    print("  Envoy + epp, plaintext: the same with epp --secure-serving=false (its own epp and server)")
    print("  Envoy + epp, inline: GIE's single filter, epp processes the response in --mode")
    print("  Envoy + epp, HTTP pick: deploy/envoy-http-pick.yaml, the pick over ext_authz")
    print(f"{'':30}{'p50 ms':>10}{'p90 ms':>10}{'p99 ms':>10}{'mean ms':>10}")
    for name, xs in times.items():
        print(f"{name:30}{pct(xs, 50) * ms:10.3f}{pct(xs, 90) * ms:10.3f}{pct(xs, 99) * ms:10.3f}"
              f"{statistics.mean(xs) * ms:10.3f}")
    straight = times["Envoy direct"]
    for name in ("Envoy + epp", "Envoy + epp, inline", "Envoy + epp, HTTP pick"):
        xs = times[name]
        print(f"{'added: ' + name:30}{(pct(xs, 50) - pct(straight, 50)) * ms:10.3f}"
              f"{(pct(xs, 90) - pct(straight, 90)) * ms:10.3f}{(pct(xs, 99) - pct(straight, 99)) * ms:10.3f}"
              f"{(statistics.mean(xs) - statistics.mean(straight)) * ms:10.3f}")
    tls, plain_xs = times["Envoy + epp"], times["Envoy + epp, plaintext"]
    print(f"{'TLS to epp costs':30}{(pct(tls, 50) - pct(plain_xs, 50)) * ms:10.3f}"
          f"{(pct(tls, 90) - pct(plain_xs, 90)) * ms:10.3f}{(pct(tls, 99) - pct(plain_xs, 99)) * ms:10.3f}"
          f"{(statistics.mean(tls) - statistics.mean(plain_xs)) * ms:10.3f}")
    print(f"ratio p50 (epp / direct): {pct(times['Envoy + epp'], 50) / pct(straight, 50):.2f}x shipped, "
          f"{pct(times['Envoy + epp, inline'], 50) / pct(straight, 50):.2f}x inline, "
          f"{pct(times['Envoy + epp, HTTP pick'], 50) / pct(straight, 50):.2f}x HTTP pick")


if __name__ == "__main__":
    main()
