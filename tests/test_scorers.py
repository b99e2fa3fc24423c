"""Each plugin's scores on hand-built metrics, and the picker's choice."""

import pytest

from epp.scheduling.framework import CycleState, SchedulingResult
from epp.scheduling.plugins.kv_cache_utilization_scorer import KVCacheUtilizationScorer
from epp.scheduling.plugins.lora_affinity_scorer import LoraAffinityScorer
from epp.scheduling.plugins.max_score_picker import MaxScorePicker
from epp.scheduling.plugins.prefix_cache_scorer import PrefixCacheScorer
from epp.scheduling.plugins.queue_scorer import QueueScorer
from epp.scheduling.plugins.random_picker import RandomPicker
from epp.scheduling.plugins.running_requests_scorer import RunningRequestsScorer
from epp.scheduling.prefix_index import PrefixIndex, block_hashes
from tests.helpers import NOW, endpoint, request


def state() -> CycleState:
    return CycleState(NOW, staleness=2.0)


def test_queue_scorer_min_max_normalised() -> None:
    eps = [endpoint(1, waiting=0), endpoint(2, waiting=5), endpoint(3, waiting=10)]
    assert QueueScorer().score(state(), request(), eps) == [1.0, 0.5, 0.0]


def test_queue_scorer_equal_queues_all_one() -> None:
    eps = [endpoint(1, waiting=3), endpoint(2, waiting=3)]
    assert QueueScorer().score(state(), request(), eps) == [1.0, 1.0]


def test_unknown_metrics_are_not_trusted_as_idle() -> None:
    """Never scraped, or stale beyond the threshold: scored as the worst, not the best."""
    eps = [endpoint(1, waiting=4), endpoint(2, waiting=None), endpoint(3, waiting=0, age=5.0)]
    assert QueueScorer().score(state(), request(), eps) == [1.0, 0.0, 0.0]
    assert KVCacheUtilizationScorer().score(state(), request(), eps)[1:] == [0.0, 0.0]


def test_kv_scorer_is_one_minus_usage() -> None:
    eps = [endpoint(1, kv=0.25), endpoint(2, kv=0.9)]
    assert KVCacheUtilizationScorer().score(state(), request(), eps) == pytest.approx([0.75, 0.1])


def test_lora_affinity_order() -> None:
    eps = [
        endpoint(1, active=("a",), max_lora=2),  # running it
        endpoint(2, active=("b",), max_lora=2),  # room to load it
        endpoint(3, active=("b", "c"), waiting_loras=("a",), max_lora=2),  # queued for it, no room
        endpoint(4, active=("b", "c"), max_lora=2),  # none
    ]
    assert LoraAffinityScorer().score(state(), request(model="a"), eps) == [1.0, 0.8, 0.6, 0.0]


def test_running_requests_scorer_uses_epp_inflight() -> None:
    eps = [endpoint(1, inflight=4), endpoint(2, inflight=0), endpoint(3, inflight=2)]
    assert RunningRequestsScorer().score(state(), request(), eps) == [0.0, 1.0, 0.5]


def test_prefix_scorer_follows_what_was_sent() -> None:
    scorer = PrefixCacheScorer()
    eps = [endpoint(1), endpoint(2)]
    prompt = "shared system prompt. " * 20
    st = state()
    assert scorer.score(st, request(prompt), eps) == [0.0, 0.0]
    scorer.pre_request(st, request(prompt), SchedulingResult([eps[1]]))
    # Same prefix, different ending: endpoint 2 holds most of the blocks.
    scores = scorer.score(state(), request(prompt + "question one?"), eps)
    assert scores[0] == 0.0
    assert scores[1] == 6 / 8
    assert scorer.score(state(), request(prompt), eps) == [0.0, 1.0]


def test_prefix_hash_chain_includes_model() -> None:
    assert block_hashes("a", "x" * 200, 64, 256) != block_hashes("b", "x" * 200, 64, 256)
    h = block_hashes("a", "x" * 200, 64, 256)
    assert len(h) == 4
    assert len(set(h)) == 4
    assert len(block_hashes("a", "x" * 10_000, 64, 8)) == 8  # maxPrefixBlocksToMatch caps the work


def test_prefix_index_is_bounded_per_server() -> None:
    idx = PrefixIndex(capacity_per_server=100)
    for i in range(50):
        idx.add("s1", block_hashes("m", f"prompt {i} " * 40, 64, 256))
    assert idx.size() == 100
    idx.remove_server("s1")
    assert idx.size() == 0


def test_prefix_index_match_requires_leading_blocks() -> None:
    idx = PrefixIndex(1000)
    h = block_hashes("m", "abc" * 100, 64, 256)
    idx.add("s1", h[1:])  # holds later blocks but not the first
    idx.add("s2", h[:2])
    assert idx.match(h, ["s1", "s2"]) == {"s2": 2}


def test_max_score_picker_breaks_ties_at_random_seeded() -> None:
    eps = [endpoint(i) for i in range(4)]
    picks = {MaxScorePicker(seed=s).pick(state(), request(), eps, [1, 3, 3, 2])[0].port for s in range(30)}
    assert picks == {1, 2}
    assert MaxScorePicker(seed=1).pick(state(), request(), eps, [0, 1, 5, 2])[0].port == 2


def test_max_score_picker_returns_fallbacks_best_first() -> None:
    eps = [endpoint(i) for i in range(4)]
    out = MaxScorePicker(max_endpoints=3, seed=0).pick(state(), request(), eps, [0.1, 0.9, 0.5, 0.7])
    assert [e.port for e in out] == [1, 3, 2]


def test_random_picker_spreads() -> None:
    eps = [endpoint(i) for i in range(3)]
    p = RandomPicker(seed=3)
    assert {p.pick(state(), request(), eps, [9, 0, 0])[0].port for _ in range(60)} == {0, 1, 2}
