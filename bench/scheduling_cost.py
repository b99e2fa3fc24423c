"""Scheduling cost: CPU per decision for a 4 KB prompt over 100 endpoints, and the prefix index's memory.

    python -m bench.scheduling_cost [--endpoints 100] [--prompt-bytes 4096] [--requests 5000]

Runs the production path in-process: the default EndpointPickerConfig, the Director's
`decide` (admission, every scorer, the picker, the prefix-index update) and `finish`.
The index is warmed with many conversations first, so matching does real work.
Prints per-decision CPU time (p50/p99/mean) and its ratio to the 1 ms budget, then
fills prefix indexes of several capacities far past their limit and reports their
entries and bytes (tracemalloc), against the configured capacity.
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import time
import tracemalloc

import orjson

from epp.datastore import Datastore, Endpoint, EndpointMetrics
from epp.director import Director
from epp.requests import new_request, parse_body
from epp.scheduling import picker_config
from epp.scheduling.prefix_index import PrefixIndex, block_hashes

BUDGET_S = 1e-3


def make_pool(n: int, rng: random.Random) -> Datastore:
    ds = Datastore(staleness=3600)
    now = time.monotonic()
    eps = []
    for i in range(n):
        ep = Endpoint(f"10.0.{i // 250}.{i % 250 + 1}", 8000, name=f"vllm-{i}")
        ep.metrics = EndpointMetrics(
            waiting=rng.randint(0, 20), running=rng.randint(0, 64), kv_usage=rng.random(),
            active_adapters=frozenset(rng.sample([f"lora-{k}" for k in range(20)], 2)), max_lora=4,
            scraped_at=now,
        )
        eps.append(ep)
    ds.set_endpoints(eps)
    return ds


def text(rng: random.Random, nbytes: int) -> str:
    words = ("the", "model", "routes", "tokens", "prefix", "cache", "quickly", "server", "pool", "request")
    out: list[str] = []
    size = 0
    while size < nbytes:
        w = rng.choice(words)
        out.append(w)
        size += len(w) + 1
    return " ".join(out)[:nbytes]


def scheduling_cost(endpoints: int, prompt_bytes: int, requests: int, seed: int) -> dict[str, float]:
    rng = random.Random(seed)
    ds = make_pool(endpoints, rng)
    director = Director(ds, picker_config.default_config(seed=seed))
    systems = [text(rng, prompt_bytes // 2) for _ in range(50)]

    def body() -> bytes:
        prompt = rng.choice(systems) + " " + text(rng, prompt_bytes - prompt_bytes // 2 - 1)
        return orjson.dumps({"model": rng.choice(["base", "lora-3", "lora-7"]), "prompt": prompt, "max_tokens": 64})

    def one(data: bytes) -> tuple[float, float]:
        t0, c0 = time.perf_counter(), time.process_time()
        req = parse_body(new_request("/v1/completions", {}), data)
        decision = director.decide(req)
        director.finish(req, decision)
        return time.perf_counter() - t0, time.process_time() - c0

    for _ in range(2000):  # warm the prefix index and the interpreter
        one(body())
    bodies = [body() for _ in range(requests)]
    gc.collect()
    walls, cpu_total = [], 0.0
    c0 = time.process_time()
    for data in bodies:
        wall, _ = one(data)
        walls.append(wall)
    cpu_total = time.process_time() - c0
    walls.sort()
    return {
        "p50_ms": walls[len(walls) // 2] * 1e3,
        "p99_ms": walls[int(len(walls) * 0.99)] * 1e3,
        "mean_wall_ms": statistics.fmean(walls) * 1e3,
        "mean_cpu_ms": cpu_total / requests * 1e3,
    }


def worst_case_match(endpoints: int, prompt_bytes: int, repeat: int = 2000) -> float:
    """ms to match a prompt that every endpoint holds in full (the index's worst case)."""
    index = PrefixIndex(31250)
    hashes = block_hashes("m", "x" * prompt_bytes, 64, 256)
    names = [f"10.0.0.{i}:8000" for i in range(endpoints)]
    for n in names:
        index.add(n, hashes)
    t0 = time.perf_counter()
    for _ in range(repeat):
        index.match(hashes, names)
    return (time.perf_counter() - t0) / repeat * 1e3


def index_memory(capacity: int, servers: int, blocks_added: int, seed: int) -> dict[str, float]:
    rng = random.Random(seed)
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    index = PrefixIndex(capacity)
    names = [f"10.0.0.{i}:8000" for i in range(servers)]
    added = 0
    while added < blocks_added:
        hashes = block_hashes("m", text(rng, 64 * 64), 64, 256)
        index.add(rng.choice(names), hashes)
        added += len(hashes)
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    return {"capacity": capacity * servers, "entries": index.size(), "bytes": used,
            "bytes_per_entry": used / max(1, index.size()), "blocks_added": added}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--endpoints", type=int, default=100)
    p.add_argument("--prompt-bytes", type=int, default=4096)
    p.add_argument("--requests", type=int, default=5000)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()

    r = scheduling_cost(args.endpoints, args.prompt_bytes, args.requests, args.seed)
    print(f"scheduling decision: {args.prompt_bytes} B prompt, {args.endpoints} endpoints, default profile, "
          f"{args.requests} requests (parse + admission + 4 scorers + picker + prefix-index update)")
    print(f"  wall p50 {r['p50_ms']:.3f} ms  p99 {r['p99_ms']:.3f} ms  mean {r['mean_wall_ms']:.3f} ms")
    print(f"  CPU mean {r['mean_cpu_ms']:.3f} ms per decision = {r['mean_cpu_ms'] / (BUDGET_S * 1e3):.2f}x "
          f"the 1 ms budget")
    worst = worst_case_match(args.endpoints, args.prompt_bytes)
    print(f"  worst case, every endpoint holds the whole prompt: prefix match alone {worst:.3f} ms "
          f"(+{worst / r['p50_ms']:.1f}x the p50 decision)")
    print("prefix index memory (filled far past capacity):")
    print(f"  {'capacity':>10} {'entries':>10} {'MiB':>8} {'B/entry':>8} {'within':>7}")
    for capacity, servers in ((1000, 10), (10000, 10), (31250, 4)):
        m = index_memory(capacity, servers, capacity * servers * 3, args.seed)
        ok = "yes" if m["entries"] <= m["capacity"] else "NO"
        print(f"  {m['capacity']:>10} {m['entries']:>10} {m['bytes'] / 2**20:>8.1f} {m['bytes_per_entry']:>8.0f} "
              f"{ok:>7}")


if __name__ == "__main__":
    main()
