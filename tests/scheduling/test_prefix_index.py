"""The prefix index (epp.scheduling.prefix_index): block hashes and what each server was sent."""

import xxhash

from epp.scheduling.prefix_index import PrefixIndex, block_hashes


def test_prefix_hash_chain_includes_model() -> None:
    assert block_hashes("a", "x" * 200, 64, 256) != block_hashes("b", "x" * 200, 64, 256)
    h = block_hashes("a", "x" * 200, 64, 256)
    assert len(h) == 4
    assert len(set(h)) == 4
    assert len(block_hashes("a", "x" * 10_000, 64, 8)) == 8  # maxPrefixBlocksToMatch caps the work


def test_block_hashes_keep_their_values_so_saved_snapshots_still_match() -> None:
    # A snapshot (--prefix-index-snapshot) written by an earlier epp holds these values: each block's
    # xxh64 of its UTF-8 bytes seeded with the previous hash, the first seeded with the model's, and
    # the trailing partial block hashed too.
    prompt = "héllo wörld, " * 11  # 165 bytes: two full blocks of 64, then 37
    data = prompt.encode()
    seed = xxhash.xxh64_intdigest(b"m")
    want = []
    for start in range(0, len(data), 64):
        seed = xxhash.xxh64_intdigest(data[start:start + 64], seed=seed)
        want.append(seed)
    assert len(want) == 3
    assert block_hashes("m", prompt, 64, 256) == want
    assert block_hashes("m", prompt, 64, 2) == want[:2]
    assert block_hashes("m", "a" * 64, 64, 256) == block_hashes("m", "a" * 100, 64, 1)  # one full block
    assert block_hashes("m", "", 64, 256) == []


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
