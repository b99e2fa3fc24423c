"""The routing benchmark runs end to end, and prefix-aware routing shows in the servers' own cache counters.

A short, seeded shared-prefix workload through epp (real Envoy + epp) and through
Envoy's round-robin, on fresh simulated pools; the hit rates are the simulators'
true prefix-cache counters, not anything epp reports.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from bench import routing, workloads

pytestmark = pytest.mark.integration


def args(**kw) -> argparse.Namespace:
    base = {"servers": 3, "max_num_seqs": 16, "num_gpu_blocks": 300, "max_lora": 2, "time_scale": 0.5}
    return argparse.Namespace(**{**base, **kw})


async def test_epp_beats_round_robin_on_cache_hits(tmp_path: Path) -> None:
    wl = workloads.shared_prefix(rate=15, duration=4, seed=3, prompts=6, prompt_tokens=1200, max_tokens=4)
    results = {}
    for router in ("epp", "epp-http-pick", "round-robin", "oracle"):
        results[router] = await routing.run_one(wl, router, args(envoy_phases=True), tmp_path)
    for r in results.values():
        assert [s.status for s in r.samples] == [200] * len(wl.requests)
        assert all(s.ttft is not None and s.tokens == 4 for s in r.samples)
    assert results["epp"].prefix_hit_rate > results["round-robin"].prefix_hit_rate + 0.2
    assert results["epp-http-pick"].prefix_hit_rate > results["round-robin"].prefix_hit_rate + 0.2
    rows = [routing.summary(r) for r in results.values()]
    for r, row in zip(results.values(), rows, strict=True):
        # Every request's in-server TTFT is recorded; the way there and back adds to it, never takes away.
        assert len(r.server_ttft) == len(wl.requests)
        assert row["server_ttft_p50"] < row["ttft_p50"]
        assert row["path_ms"] > 0
    # Envoy's access log shows the pick hop: Envoy alone passes a request on at once, epp's layouts
    # spend the exchange with epp between the client's last byte and the pod's first.
    for router in ("epp", "epp-http-pick", "round-robin", "oracle"):
        assert results[router].envoy_phases["total_p50"] > results[router].envoy_phases["pick_p50"] > 0
    for picker in ("epp", "epp-http-pick"):
        for plain in ("round-robin", "oracle"):
            assert results[picker].envoy_phases["pick_p50"] > 2 * results[plain].envoy_phases["pick_p50"]
    report = routing.markdown(rows, {wl.name: wl})
    assert "| epp |" in report
    assert "| round-robin |" in report
    assert "Inside Envoy" in report


def test_repeated_rounds_rotate_which_router_runs_first() -> None:
    routers = ["epp", "sglang-router", "oracle"]
    orders = [routing.round_order(routers, k) for k in range(4)]
    assert [o[0] for o in orders] == ["epp", "sglang-router", "oracle", "epp"]
    assert all(sorted(o) == sorted(routers) for o in orders)
    assert routing.round_order([], 3) == []


def test_repeated_rounds_report_the_median_and_every_round() -> None:
    def run(router: str, k: int, ttft_ms: list[float]) -> routing.RunResult:
        samples = [routing.Sample(200, "", 0.0, ttft=t / 1e3, e2e=t / 1e3 + 0.1, itl=0.01, tokens=4) for t in ttft_ms]
        return routing.RunResult("shared-prefix", router, samples, duration=1.0, prefix_hit_rate=0.5, round=k)

    flat = [10.0] * 9
    results = [run("epp", 0, [*flat, 20.0]), run("sglang-router", 0, [*flat, 40.0]),
               run("epp", 1, [*flat, 30.0]), run("sglang-router", 1, [*flat, 50.0]),
               run("epp", 2, [*flat, 80.0]), run("sglang-router", 2, [*flat, 45.0])]
    rows = {r["router"]: r for r in routing.combined(results)}
    assert rows["epp"]["ttft_p90_rounds"] == [20.0, 30.0, 80.0]
    assert rows["epp"]["ttft_p90"] == 30.0  # the median round, not the mean (43.3) nor the pooled p90
    assert rows["sglang-router"]["ttft_p90"] == 45.0
    wl = workloads.build("shared-prefix", 1, 1, 1)
    report = routing.markdown(list(rows.values()), {"shared-prefix": wl})
    assert "| 20.0, 30.0, 80.0 |" in report
    assert "shared-prefix: p90 TTFT sglang-router / epp = 1.50x" in "\n".join(routing.ratios(list(rows.values())))
