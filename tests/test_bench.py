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
    for router in ("epp", "round-robin", "oracle"):
        results[router] = await routing.run_one(wl, router, args(), tmp_path)
    for r in results.values():
        assert [s.status for s in r.samples] == [200] * len(wl.requests)
        assert all(s.ttft is not None and s.tokens == 4 for s in r.samples)
    assert results["epp"].prefix_hit_rate > results["round-robin"].prefix_hit_rate + 0.2
    rows = [routing.summary(r) for r in results.values()]
    report = routing.markdown(rows, {wl.name: wl})
    assert "| epp |" in report
    assert "| round-robin |" in report
