"""Render deploy/dashboards/epp.json's panels to a PNG from a real run's scraped metrics, without Grafana.

    python -m bench.dashboard                       # run a live gateway (epp.stack), load it, scrape, render
    python -m bench.dashboard --scrape URL --save scrapes.jsonl --duration 60   # scrape a running epp
    python -m bench.dashboard --scrapes scrapes.jsonl [--png out.png]          # render saved scrapes

The panels are the dashboard's own: each target's PromQL expression is evaluated over the
scrapes by a small evaluator that knows what the dashboard uses (selectors with label
matchers, `rate`, `sum`/`avg`/`max`/`min` `by (...)`, `histogram_quantile`, and `/` or `*`
between results or numbers), with `$__rate_interval` taken as `--window`. A saved scrape
file has one JSON object per line: `{"t": seconds, "text": "<the /metrics text>"}`.

The live run starts simulated servers, epp with the flowControl gate on (the settings of
bench/flowcontrol.py) and a real Envoy, sends the mixed-priority workload through Envoy,
scrapes epp's /metrics every `--interval` seconds, and writes the scrapes and the PNG.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gzip
import json
import math
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "dashboards" / "epp.json"
Labels = frozenset[tuple[str, str]]
Vector = dict[Labels, float]


# --- scrapes -------------------------------------------------------------------------------------------
@dataclass
class Scrape:
    t: float
    series: dict[str, list[tuple[dict[str, str], float]]]

    @classmethod
    def parse(cls, t: float, text: str) -> Scrape:
        series: dict[str, list[tuple[dict[str, str], float]]] = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                series.setdefault(s.name, []).append((s.labels, s.value))
        return cls(t, series)


def load_scrapes(path: Path) -> list[Scrape]:
    opener: Callable[..., Any] = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        return [Scrape.parse(rec["t"], rec["text"]) for rec in map(json.loads, f) if rec]


# --- a PromQL subset -------------------------------------------------------------------------------------------
_TOKEN = re.compile(r"\s*(?:(?P<num>\d+\.?\d*(?:e[+-]?\d+)?)|(?P<str>\"(?:[^\"\\]|\\.)*\")|"
                    r"(?P<dur>\[[^\]]+\])|(?P<name>[A-Za-z_:][A-Za-z0-9_:]*)|(?P<op>=~|!=|!~|[(){},=/*+-]))")
_DURATION = re.compile(r"(\d+)(ms|s|m|h)")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def _tokens(expr: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    expr = expr.strip()
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        if m is None or m.end() == pos:
            raise ValueError(f"cannot read {expr[pos:]!r} in {expr!r}")
        kind = m.lastgroup
        assert kind is not None
        out.append((kind, m.group(kind)))
        pos = m.end()
    return out


class Query:
    """One expression, parsed once, evaluated at any scrape."""

    AGGREGATIONS = ("sum", "avg", "max", "min")

    def __init__(self, expr: str, window: float) -> None:
        self.expr, self.window = expr, window
        self.toks = _tokens(expr.replace("$__rate_interval", f"{window:g}s"))
        self.i = 0
        self.tree = self._expr()
        if self.i != len(self.toks):
            raise ValueError(f"unexpected {self.toks[self.i][1]!r} in {expr!r}")

    # parsing
    def _peek(self) -> str:
        return self.toks[self.i][1] if self.i < len(self.toks) else ""

    def _take(self, want: str | None = None) -> tuple[str, str]:
        tok = self.toks[self.i]
        if want is not None and tok[1] != want:
            raise ValueError(f"expected {want!r}, got {tok[1]!r} in {self.expr!r}")
        self.i += 1
        return tok

    def _expr(self) -> Any:
        node = self._term()
        while self._peek() in ("/", "*", "+", "-"):
            op = self._take()[1]
            node = ("binop", op, node, self._term())
        return node

    def _labels(self) -> tuple[str, ...]:
        self._take("(")
        names = []
        while self._peek() != ")":
            names.append(self._take()[1])
            if self._peek() == ",":
                self._take(",")
        self._take(")")
        return tuple(names)

    def _term(self) -> Any:
        kind, text = self._take()
        if kind == "num":
            return ("num", float(text))
        if text == "(":
            node = self._expr()
            self._take(")")
            return node
        if text in self.AGGREGATIONS:
            by: tuple[str, ...] = ()
            if self._peek() == "by":
                self._take()
                by = self._labels()
            self._take("(")
            inner = self._expr()
            self._take(")")
            if self._peek() == "by":
                self._take()
                by = self._labels()
            return ("agg", text, by, inner)
        if text == "rate":
            self._take("(")
            sel = self._selector(*self._take())
            self._take(")")
            if sel[3] is None:
                raise ValueError(f"rate needs a range in {self.expr!r}")
            return ("rate", sel)
        if text == "histogram_quantile":
            self._take("(")
            q = float(self._take()[1])
            self._take(",")
            inner = self._expr()
            self._take(")")
            return ("quantile", q, inner)
        return self._selector(kind, text)

    def _selector(self, kind: str, name: str) -> Any:
        if kind != "name":
            raise ValueError(f"expected a metric name, got {name!r} in {self.expr!r}")
        matchers = []
        if self._peek() == "{":
            self._take("{")
            while self._peek() != "}":
                label = self._take()[1]
                op = self._take()[1]
                value = json.loads(self._take()[1])
                matchers.append((label, op, value))
                if self._peek() == ",":
                    self._take(",")
            self._take("}")
        rng = None
        if self.i < len(self.toks) and self.toks[self.i][0] == "dur":
            text = self._take()[1][1:-1]
            rng = sum(float(n) * _UNIT[u] for n, u in _DURATION.findall(text))
        return ("sel", name, tuple(matchers), rng)

    # evaluating
    def at(self, scrapes: list[Scrape], k: int) -> Vector:
        return self._eval(self.tree, scrapes, k)

    @staticmethod
    def _match(labels: dict[str, str], matchers: tuple[tuple[str, str, str], ...]) -> bool:
        for label, op, value in matchers:
            v = labels.get(label, "")
            if (op == "=" and v != value) or (op == "!=" and v == value):
                return False
            if (op == "=~" and not re.fullmatch(value, v)) or (op == "!~" and re.fullmatch(value, v)):
                return False
        return True

    def _instant(self, sel: Any, scrape: Scrape) -> Vector:
        _, name, matchers, _ = sel
        return {frozenset(ls.items()): v for ls, v in scrape.series.get(name, []) if self._match(ls, matchers)}

    def _eval(self, node: Any, scrapes: list[Scrape], k: int) -> Vector:
        kind = node[0]
        if kind == "num":
            return {frozenset(): node[1]}
        if kind == "sel":
            return self._instant(node, scrapes[k])
        if kind == "rate":
            sel = node[1]
            now = scrapes[k]
            j = k
            while j > 0 and now.t - scrapes[j - 1].t <= sel[3] + 1e-9:
                j -= 1
            if j == k:
                return {}
            then, dt = self._instant(sel, scrapes[j]), now.t - scrapes[j].t
            out = {}
            for labels, v in self._instant(sel, now).items():
                before = then.get(labels, 0.0)
                out[labels] = (v - before if v >= before else v) / dt  # a reset counts from zero
            return out
        if kind == "agg":
            _, fn, by, inner = node
            groups: dict[Labels, list[float]] = {}
            for labels, v in self._eval(inner, scrapes, k).items():
                key = frozenset((n, x) for n, x in labels if n in by)
                groups.setdefault(key, []).append(v)
            reduce: Callable[[list[float]], float] = {"sum": sum, "max": max, "min": min,
                                                      "avg": lambda xs: sum(xs) / len(xs)}[fn]
            return {key: reduce(vs) for key, vs in groups.items()}
        if kind == "quantile":
            _, q, inner = node
            buckets: dict[Labels, list[tuple[float, float]]] = {}
            for labels, v in self._eval(inner, scrapes, k).items():
                le = dict(labels).get("le")
                if le is None:
                    continue
                key = frozenset((n, x) for n, x in labels if n != "le")
                buckets.setdefault(key, []).append((float(le), v))
            return {key: _quantile(q, sorted(bs)) for key, bs in buckets.items()}
        if kind == "binop":
            _, op, left, right = node
            a, b = self._eval(left, scrapes, k), self._eval(right, scrapes, k)
            scalar_b = b.get(frozenset()) if len(b) == 1 else None
            out = {}
            for labels, x in a.items():
                y = b.get(labels, scalar_b)
                if y is None:
                    continue
                if op == "/":
                    out[labels] = x / y if y else math.nan
                elif op == "*":
                    out[labels] = x * y
                elif op == "+":
                    out[labels] = x + y
                else:
                    out[labels] = x - y
            return out
        raise ValueError(f"cannot evaluate {kind}")


def _quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """Prometheus's histogram_quantile over (upper bound, cumulative count), sorted."""
    if not buckets or buckets[-1][1] <= 0:
        return math.nan
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for upper, count in buckets:
        if count >= rank:
            if math.isinf(upper):
                return lower
            if count == below:
                return upper
            return lower + (upper - lower) * (rank - below) / (count - below)
        lower, below = upper, count
    return lower


def _legend(fmt: str, labels: Labels) -> str:
    d = dict(labels)
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: d.get(m.group(1), ""), fmt) or ",".join(f"{k}={v}" for k, v in
                                                                                         sorted(d.items()))


# --- rendering ------------------------------------------------------------------------------------------------
_SCALE = {"s": (1.0, "s"), "percentunit": (100.0, "%"), "reqps": (1.0, "req/s"), "short": (1.0, "")}


def render(scrapes: list[Scrape], png: Path, window: float, title: str = "", dashboard: Path = DASHBOARD) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dash = json.loads(dashboard.read_text())
    panels = [p for p in dash["panels"] if p.get("type") == "timeseries"]
    cols = 2
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(13, 2.9 * rows), squeeze=False)
    t0 = scrapes[0].t
    xs = [s.t - t0 for s in scrapes]
    for ax, panel in zip((a for row in axes for a in row), panels, strict=False):
        scale, unit = _SCALE.get(panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "short"), (1.0, ""))
        for target in panel["targets"]:
            query = Query(target["expr"], window)
            lines: dict[str, list[float]] = {}
            for k in range(len(scrapes)):
                for labels, v in query.at(scrapes, k).items():
                    lines.setdefault(_legend(target.get("legendFormat", ""), labels), [math.nan] * len(scrapes))[k] \
                        = v * scale
            for name, ys in sorted(lines.items()):
                ax.plot(xs, ys, label=name, linewidth=1.3)
        ax.set_title(panel["title"], fontsize=10)
        ax.set_ylabel(unit, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6.5, loc="upper left")
    for ax in list(a for row in axes for a in row)[len(panels):]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("seconds", fontsize=8)
    fig.suptitle(title or dash["title"], fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 0.975))
    fig.savefig(png, dpi=90)
    plt.close(fig)


# --- collecting -----------------------------------------------------------------------------------------------
async def collect(url: str, interval: float, stop: asyncio.Event, out: list[dict[str, Any]]) -> None:
    """Scrape `url` every `interval` seconds until `stop` is set (and once more after)."""
    async with httpx.AsyncClient(timeout=5) as client:
        start = time.monotonic()
        while True:
            r = await client.get(url)
            out.append({"t": time.monotonic() - start, "text": r.text})
            if stop.is_set():
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)


async def live(args: argparse.Namespace) -> list[dict[str, Any]]:
    """A gateway on loopback (simulators, epp with flow control, Envoy), loaded with the mixed-priority workload."""
    import aiohttp

    from bench import workloads
    from bench.flowcontrol import with_flow_control
    from bench.routing import POOL_FILE, Sample, _send
    from epp.scheduling.picker_config import DEFAULT_CONFIG
    from epp.stack import Stack, StackOptions

    config = with_flow_control(DEFAULT_CONFIG, max_concurrency=args.max_num_seqs, ttl="8s", batch_queue=40,
                               holdback=0.5)
    stack = Stack(StackOptions(servers=args.servers, sim_args=["--max-num-seqs", str(args.max_num_seqs),
                                                               "--time-scale", str(args.time_scale)]))
    pool = stack.logdir / "pool.yaml"
    pool.write_text(POOL_FILE)
    stack.opts.epp_args = ["--pool-file", str(pool), "--config-text", config, "--seed", "1"]
    wl = workloads.build("mixed-priority", args.rate, args.duration, args.seed)
    scrapes: list[dict[str, Any]] = []
    await asyncio.to_thread(stack.start)
    try:
        stop = asyncio.Event()
        collector = asyncio.create_task(collect(stack.metrics_url, args.interval, stop, scrapes))
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300),
                                         connector=aiohttp.TCPConnector(limit=0)) as session:
            start = time.perf_counter()
            tasks = []
            for req in wl.requests:
                delay = start + req.at - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(_send(session, stack.url, req, {}, Sample(0, req.tag, 0.0))))
            await asyncio.gather(*tasks)
        await asyncio.sleep(2 * args.interval)
        stop.set()
        await collector
    finally:
        await asyncio.to_thread(stack.stop)
    return scrapes


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.dashboard", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scrapes", type=Path, help="render this file of saved scrapes (.jsonl or .jsonl.gz)")
    p.add_argument("--scrape", help="scrape this /metrics URL instead of running a gateway")
    p.add_argument("--save", type=Path, default=Path("bench/results/dashboard-scrapes.jsonl.gz"),
                   help="where collected scrapes go")
    p.add_argument("--png", type=Path, default=Path("bench/results/dashboard.png"))
    p.add_argument("--window", type=float, default=5.0, help="seconds that $__rate_interval stands for")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between scrapes")
    p.add_argument("--duration", type=float, default=40.0, help="seconds of load (or of scraping with --scrape)")
    p.add_argument("--rate", type=float, default=4.0, help="the mixed-priority workload's base rate (it sends 2.5x)")
    p.add_argument("--servers", type=int, default=2)
    p.add_argument("--max-num-seqs", type=int, default=4)
    p.add_argument("--time-scale", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--title", default="", help="the figure's title (default: the dashboard's, or the live run's)")
    args = p.parse_args()
    live_run = args.scrapes is None and not args.scrape
    if args.scrapes is None:
        if args.scrape:
            async def scrape_for() -> list[dict[str, Any]]:
                stop, out = asyncio.Event(), []
                task = asyncio.create_task(collect(args.scrape, args.interval, stop, out))
                await asyncio.sleep(args.duration)
                stop.set()
                await task
                return out
            records = asyncio.run(scrape_for())
        else:
            records = asyncio.run(live(args))
        args.save.parent.mkdir(parents=True, exist_ok=True)
        opener: Callable[..., Any] = gzip.open if args.save.suffix == ".gz" else open
        with opener(args.save, "wt") as f:
            for rec in records:
                f.write(json.dumps(rec) + "\n")
        print(f"wrote {len(records)} scrapes to {args.save}", file=sys.stderr)
        args.scrapes = args.save
    scrapes = load_scrapes(args.scrapes)
    if len(scrapes) < 2:
        raise SystemExit(f"{args.scrapes}: need at least two scrapes, found {len(scrapes)}")
    title = args.title or (f"epp, flow control on: the mixed-priority workload at {2.5 * args.rate:g} req/s over "
                           f"{args.servers} simulated servers (bench/flowcontrol.py's settings)" if live_run else "")
    render(scrapes, args.png, args.window, title)
    print(f"wrote {args.png}", file=sys.stderr)


if __name__ == "__main__":
    main()
