"""The block index: what each pod reports holding, keyed so a request's tokens find it; bounded."""

import random
import struct

import xxhash

from epp.kvevents.events import AllBlocksCleared, BlockRemoved, BlockStored, EventBatch
from epp.kvevents.hashing import block_keys, root_key
from epp.kvevents.index import BlockIndex

MODEL = "m"
TOKENS = list(range(100, 164))  # 4 blocks of 16


def stored(hashes: list[int], tokens: list[int], parent: int | None = None, block_size: int = 16,
           **kw: object) -> EventBatch:
    return EventBatch(0.0, [BlockStored(hashes, parent, tokens, block_size, **kw)])  # type: ignore[arg-type]


def keys(tokens: list[int] = TOKENS, model: str = MODEL, salt: str = "", seed: str = "") -> list[int]:
    return block_keys(root_key(model, seed, salt), tokens, 16)


def test_stored_blocks_match_the_requests_tokens_whatever_the_engines_hashes() -> None:
    idx = BlockIndex()
    idx.apply("a", MODEL, stored([901, 902], TOKENS[:32]))
    idx.apply("a", MODEL, stored([903], TOKENS[32:48], parent=902))  # chained on the engine's parent hash
    assert idx.match(keys(), ["a", "b"]) == {"a": 3}
    assert idx.publishes("a")
    assert not idx.publishes("b")
    # Another model's (or LoRA adapter's) blocks are other blocks.
    idx.apply("b", MODEL, stored([1], TOKENS[:16], lora_name="adapter"))
    assert idx.match(keys(), ["b"]) == {}
    assert idx.match(keys(model="adapter"), ["b"]) == {"b": 1}


def test_removal_and_clear() -> None:
    idx = BlockIndex()
    idx.apply("a", MODEL, stored([1, 2, 3, 4], TOKENS))
    idx.apply("a", MODEL, EventBatch(0.0, [BlockRemoved([2])]))
    assert idx.match(keys(), ["a"]) == {"a": 1}  # the prefix stops at the hole
    idx.apply("a", MODEL, EventBatch(0.0, [AllBlocksCleared()]))
    assert idx.match(keys(), ["a"]) == {}
    assert idx.size() == 0
    assert idx.publishes("a")  # still a publisher: its empty cache is known, not a guess
    idx.forget("a")
    assert not idx.publishes("a")


def test_an_unknown_parent_and_other_tiers_are_skipped() -> None:
    idx = BlockIndex()
    idx.apply("a", MODEL, stored([5], TOKENS[16:32], parent=4))  # its prefix was never reported
    idx.apply("a", MODEL, stored([1], TOKENS[:16], medium="CPU"))
    assert idx.size() == 0
    assert idx.stats.skipped_events == 2


def test_engine_blocks_larger_than_epps_map_to_several_keys() -> None:
    idx = BlockIndex(block_size=16)
    idx.apply("a", MODEL, stored([1, 2], TOKENS, block_size=32))
    assert idx.match(keys(), ["a"]) == {"a": 4}
    idx.apply("a", MODEL, EventBatch(0.0, [BlockRemoved([2])]))
    assert idx.match(keys(), ["a"]) == {"a": 2}


def test_cache_salt_and_hash_seed_separate_prefixes() -> None:
    idx = BlockIndex(hash_seed="42")
    idx.apply("a", MODEL, stored([1], TOKENS[:16], extra_keys=[["tenant-1"]]))
    assert idx.match(keys(salt="tenant-1", seed="42"), ["a"]) == {"a": 1}
    assert idx.match(keys(seed="42"), ["a"]) == {}
    assert idx.match(keys(salt="tenant-1"), ["a"]) == {}


def test_memory_is_bounded_per_pod_and_overall() -> None:
    idx = BlockIndex(max_blocks_per_pod=100, max_blocks=150)
    for pod in ("a", "b"):
        for i in range(50):
            toks = list(range(i * 1000, i * 1000 + 64))
            idx.apply(pod, MODEL, stored([i * 10 + j for j in range(4)], toks))
            assert idx.blocks(pod) <= 100
            assert idx.size() <= 150
    assert idx.size() == 150
    # The newest blocks stay; the oldest went first.
    assert idx.match(keys(list(range(49000, 49064))), ["a", "b"]) == {"a": 4, "b": 4}
    assert idx.match(keys(list(range(0, 64))), ["a", "b"]) == {}


def test_block_keys_chain_xxh64_over_little_endian_uint32_blocks() -> None:
    """The key format, on the packing's fast path and its fallback (ids beyond uint32 wrap)."""
    def reference(parent: int, tokens: list[int], size: int) -> list[int]:
        out = []
        for i in range(len(tokens) // size):
            block = struct.pack(f"<{size}I", *(t & 0xFFFFFFFF for t in tokens[i * size:(i + 1) * size]))
            parent = xxhash.xxh64_intdigest(block, seed=parent)
            out.append(parent)
        return out

    rng = random.Random(7)
    ordinary = [rng.randrange(1 << 17) for _ in range(16 * 40 + 5)]
    wrapped = [*ordinary[:20], -1, 1 << 32, (1 << 40) + 3, *ordinary[20:40]]
    for tokens in (ordinary, wrapped, [], ordinary[:15]):
        assert block_keys(root_key(MODEL), tokens, 16) == reference(root_key(MODEL), tokens, 16)
    assert block_keys(1, ordinary, 16, max_blocks=3) == reference(1, ordinary, 16)[:3]
