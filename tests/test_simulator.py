"""The simulator's engine behaves like vLLM where routing quality depends on it.

Durations are read from the engine's modelled clock (what the latency model says),
so these tests do not depend on the machine's speed; time_scale 0 runs them instantly.
"""

from __future__ import annotations

import asyncio

import pytest

from epp.simulator.engine import Engine, EngineConfig

MODEL = "meta-llama/Llama-3.1-8B-Instruct"


def engine(**kw) -> Engine:
    return Engine(EngineConfig(time_scale=0.0, **kw))


async def run(e: Engine, prompt: str, max_tokens: int = 4, model: str = MODEL):
    seq = e.submit(model, prompt, max_tokens)
    while await seq.tokens.get() is not None:
        pass
    return seq


async def test_prefix_cache_skips_prefill_of_cached_blocks() -> None:
    e = engine()
    doc = "lorem ipsum dolor sit amet " * 600  # ~4000 tokens
    cold = await run(e, doc + "question one?")
    warm = await run(e, doc + "question two?")
    assert cold.cached_tokens == 0
    assert warm.cached_tokens >= 0.95 * warm.prompt_tokens
    cold_ttft = cold.first_token_clock - cold.submit_clock
    warm_ttft = warm.first_token_clock - warm.submit_clock
    assert cold_ttft > 90  # ~4000 tokens at 0.0255 ms each (measured H100 figure)
    assert warm_ttft < cold_ttft / 8
    assert e.prefix_hits == warm.cached_tokens


async def test_decode_steps_slow_down_with_batch_and_context() -> None:
    c = EngineConfig()
    assert c.step_ms(1, 512, 0, 0) == pytest.approx(6.5, abs=0.1)  # measured 6.52
    assert c.step_ms(128, 128 * 2048, 0, 0) == pytest.approx(18.5, abs=0.6)  # measured 18.51
    assert c.step_ms(0, 0, 4096, 4096**2) == pytest.approx(106, rel=0.06)  # measured 106.4


async def test_batch_limit_queues_requests() -> None:
    e = engine(max_num_seqs=2)
    seqs = [e.submit(MODEL, f"prompt {i} " * 50, 20) for i in range(5)]
    await asyncio.sleep(0)
    e._admit()
    assert e.num_running == 2
    assert e.num_waiting == 3
    for s in seqs:
        while await s.tokens.get() is not None:
            pass
    assert e.num_running == e.num_waiting == 0


async def test_lru_eviction_when_the_cache_is_full() -> None:
    e = engine(num_gpu_blocks=300)  # 4800 tokens
    a = "alpha beta gamma delta " * 400  # ~2300 tokens
    await run(e, a)
    for i in range(3):  # push a out
        await run(e, f"filler {i} " * 1200)
    again = await run(e, a)
    assert again.cached_tokens == 0
    assert len(e.cache) <= 300


async def test_lora_slots_and_load_cost() -> None:
    e = engine(max_lora=1, lora_adapters=["a", "b"])
    first = await run(e, "x " * 100, model="a")
    second = await run(e, "y " * 100, model="a")
    assert list(e.active_loras) == ["a"]
    t_first = first.first_token_clock - first.submit_clock
    t_second = second.first_token_clock - second.submit_clock
    assert t_first - t_second == pytest.approx(e.cfg.lora_load_ms, abs=1.0)
    await run(e, "z " * 100, model="b")
    assert list(e.active_loras) == ["b"]  # one slot: a was unloaded


def test_oversized_request_is_refused() -> None:
    e = Engine(EngineConfig(num_gpu_blocks=10))
    with pytest.raises(ValueError, match="KV blocks"):
        e.submit(MODEL, "x " * 1000, 10)


async def test_kv_usage_counts_a_shared_prefix_once_and_idle_cache_as_free() -> None:
    """vLLM's kv_cache_usage_perc is blocks in use / all blocks: sequences sharing a cached prefix hold
    its blocks once, and cached blocks that no running sequence uses are free (evictable)."""
    e = engine(num_gpu_blocks=1000, max_num_seqs=8)
    doc = "lorem ipsum dolor sit amet " * 300  # ~2000 tokens: ~126 blocks of 16
    await run(e, doc + "warm the cache")
    assert e.kv_usage == 0.0  # cached, not in use
    assert len(e.cache) > 100
    seqs = [e.submit(MODEL, doc + f"question {i}?", 4) for i in range(4)]
    await asyncio.sleep(0)
    e._admit()
    assert e.num_running == 4
    prompt_blocks = -(-seqs[0].prompt_tokens // 16)
    # One copy of the prefix plus each sequence's own last block(s), not four copies.
    assert prompt_blocks / 1000 <= e.kv_usage < (prompt_blocks + 4 * 2) / 1000
    for s in seqs:
        while await s.tokens.get() is not None:
            pass
    assert e.kv_usage == 0.0
