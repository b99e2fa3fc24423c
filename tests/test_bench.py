"""The routing benchmark runs end to end, and prefix-aware routing shows in the servers' own cache counters;
each scenario does to the pool what it says (the bypass, the replicas, the restart, the slow pod, the stages).

A short, seeded shared-prefix workload through epp (real Envoy + epp) and through
Envoy's round-robin, on fresh simulated pools; the hit rates are the simulators'
true prefix-cache counters, not anything epp reports.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from bench import routing, scenarios, workloads

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


async def test_kv_events_pods_publish_on_their_own_addresses_and_epp_routes_on_them(tmp_path: Path) -> None:
    """--kv-events: each pod on its own loopback address publishes its cache as vLLM does; epp with the
    precise-prefix config subscribes to every pod and routes every request, prefix-aware."""
    wl = workloads.shared_prefix(rate=15, duration=4, seed=3, prompts=6, prompt_tokens=1200, max_tokens=4)
    a = args(kv_events=True, epp_config="bench/configs/precise-prefix.yaml")
    precise = await routing.run_one(wl, "epp-config", a, tmp_path)
    plain = await routing.run_one(wl, "round-robin", a, tmp_path)
    for r in (precise, plain):
        assert [s.status for s in r.samples] == [200] * len(wl.requests)
    assert all(n > 0 for n in precise.mechanics["kv_event_batches"].values())
    assert len(precise.mechanics["kv_event_batches"]) == 3
    assert precise.prefix_hit_rate > plain.prefix_hit_rate + 0.2


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


def test_targets_compare_epp_with_other_routers_not_with_itself_or_the_oracle() -> None:
    def row(router: str, p90: float) -> dict:
        return {"workload": "replicas", "router": router, "ttft_p90": p90}

    rows = [row("epp", 30.0), row("epp-config", 25.0), row("oracle", 20.0), row("sglang-router", 27.0)]
    lines = scenarios.target_lines(rows, [], ())
    assert lines == ["replicas: p90 TTFT best other (sglang-router) / epp = 0.90x"
                     "  (target >= 1.0 within 5% noise: NOT met)"]
    assert scenarios.target_lines([row("epp", 30.0), row("epp-config", 25.0)], [], ()) == []


# --- scenarios (bench/scenarios.py), each at a tiny size -------------------------------------
def scenario_args(name: str, **kw) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    scenarios.add_options(p)
    base = vars(p.parse_args([]))
    return args(**{**base, "rate": 12, "duration": 4, "seed": 3, "scenario": name, **kw})


async def test_bypass_requests_reach_their_pod_past_the_router(tmp_path: Path) -> None:
    a = scenario_args("bypass", bypass_tokens=400)
    wl = scenarios.build("bypass", a)
    bypass = sum(1 for r in wl.requests if r.tag == routing.BYPASS)
    assert 0 < bypass < len(wl.requests)
    r = await routing.run_one(wl, "epp", a, tmp_path)
    assert [s.status for s in r.samples] == [200] * len(wl.requests)
    row = routing.summary(r)
    # The table counts only what the router routed; the bypass is reported apart.
    assert row["requests"] == len(wl.requests) - bypass
    assert row["bypass_requests"] == row["bypass_ok"] == bypass
    assert row["bypass_ttft_p90"] > 0
    # The servers' own counters: the bypassed pod served every bypassing request on top of its picks.
    assert r.mechanics["bypass_pods"] == ["sim-0"]
    port = str(r.mechanics["ports"]["sim-0"])
    assert all(s.pod == port for s in r.samples if s.tag == routing.BYPASS)
    assert r.per_pod["sim-0"] >= bypass
    assert sum(r.per_pod.values()) == len(wl.requests)
    table = "\n".join(scenarios.mechanics_table([row], "bypass"))
    assert f"| epp | {bypass} ({bypass}) |" in table


async def test_replicas_split_the_picks_between_two_epps(tmp_path: Path) -> None:
    a = scenario_args("replicas")
    wl = scenarios.build("replicas", a)
    r = await routing.run_one(wl, "epp", a, tmp_path)
    assert [s.status for s in r.samples] == [200] * len(wl.requests)
    # Each replica's own /metrics: both handled requests, together all of them.
    counts = r.mechanics["replica_requests"]
    assert len(counts) == 2
    assert min(counts) > 0
    assert sum(counts) == len(wl.requests)
    # In GIE's single-filter layout (the default here) the replica that picks also sees its response.
    assert r.mechanics["replica_responses_seen"] == counts
    assert "| epp | " in "\n".join(scenarios.mechanics_table([routing.summary(r)], "replicas"))


@pytest.mark.skipif(not routing.PeerRouter.available("sglang-router"), reason="sglang-router is not installed")
async def test_a_replicated_peer_runs_as_replicas_behind_one_envoy(tmp_path: Path) -> None:
    a = scenario_args("replicas")
    wl = scenarios.build("replicas", a)
    r = await routing.run_one(wl, "sglang-router-ha", a, tmp_path)
    assert [s.status for s in r.samples] == [200] * len(wl.requests)
    assert r.mechanics["peer_replicas"] == 2
    assert (tmp_path / "sglang-router.log").exists()
    assert (tmp_path / "sglang-router-1.log").exists()
    table = "\n".join(scenarios.mechanics_table([routing.summary(r)], "replicas"))
    assert "| sglang-router-ha | not epp: 2 replicas behind Envoy" in table


async def test_restart_kills_epp_mid_run_and_the_new_one_routes(tmp_path: Path) -> None:
    a = scenario_args("restart", duration=8, restart_at=0.25)
    wl = scenarios.build("restart", a)
    r = await routing.run_one(wl, "epp", a, tmp_path)
    m = r.mechanics["restart"]
    assert 1.0 < m["at_s"] < 3.0
    assert m["down_s"] > 0
    # The killed epp had picked some; the one started on the same ports picked the rest that got through.
    assert m["requests_before"][0] > 0
    assert r.mechanics["requests_after_restart"][0] > 0
    ok = sum(1 for s in r.samples if s.status == 200)
    assert len(wl.requests) // 2 < ok < len(wl.requests)  # the requests in the gap failed, the rest did not
    rows = [routing.summary(r)]
    assert "| epp | " in "\n".join(scenarios.mechanics_table(rows, "restart"))


async def test_mixed_speed_has_one_slow_pod(tmp_path: Path) -> None:
    a = scenario_args("mixed-speed", time_scale=1.0)
    wl = scenarios.build("mixed-speed", a)
    r = await routing.run_one(wl, "round-robin", a, tmp_path)
    assert r.mechanics["time_scale"] == {"sim-0": 2.0, "sim-1": 1.0, "sim-2": 1.0}
    # A client sees it: answers from sim-0 take longer end to end than anyone else's.
    port = str(r.mechanics["ports"]["sim-0"])
    slow = [s.e2e for s in r.samples if s.pod == port and s.e2e]
    fast = [s.e2e for s in r.samples if s.pod != port and s.e2e]
    assert slow
    assert fast
    assert min(slow) > 1.4 * sorted(fast)[len(fast) // 2]


async def test_upstream_shared_prefix_reports_each_stage(tmp_path: Path) -> None:
    a = scenario_args("upstream-shared-prefix", scale=0.02, stages="3:1.5,8:1.5")
    wl = scenarios.build("upstream-shared-prefix", a)
    assert {r.stage for r in wl.requests} == {0, 1}
    first = wl.requests[0].body
    assert first["max_tokens"] == 20  # 1000 output tokens x 0.02
    results = [await routing.run_one(wl, rt, a, tmp_path) for rt in ("epp", "round-robin")]
    ladder = scenarios.stages(a)
    for r in results:
        assert [s.status for s in r.samples] == [200] * len(wl.requests)
        stats = scenarios.stage_stats(r, ladder)
        assert [st["sent"] for st in stats] == [sum(1 for q in wl.requests if q.stage == k) for k in (0, 1)]
        assert all(st["output_tok_s"] > 0 and st["ttft_p90"] > 0 for st in stats)
    table = scenarios.stage_tables(results, ladder)
    assert any(line.startswith("| 1 | 8/s |") for line in table)
    lines = scenarios.target_lines([routing.summary(r) for r in results], results, ladder)
    assert any("top stage (8/s): output tokens/s epp / round-robin" in ln for ln in lines)
    assert any("top stage (8/s): p90 TTFT round-robin / epp" in ln and "target >= 100" in ln for ln in lines)
