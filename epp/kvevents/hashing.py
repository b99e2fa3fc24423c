"""Block keys from token ids: the same key for a request's prompt and for a server's stored blocks.

Engines' own block hashes depend on their hash function and seed; epp does not reproduce them.
As llm-d does, it recomputes its own keys from the token ids a BlockStored event carries and
maps the engine's hashes to them, so a request's tokens, hashed the same way, find the blocks.
A key chains the previous one (xxh64 over the block's token ids, seeded with the previous key;
the first seeded by the hash seed and the model), so a key names the whole prefix up to it.
"""

from __future__ import annotations

import array
import struct
import sys
from collections.abc import Sequence

import xxhash

MASK = 0xFFFFFFFFFFFFFFFF


def root_key(model: str, hash_seed: str = "", salt: str = "") -> int:
    """The parent of a prompt's first block: the seed, the model (or LoRA adapter) and any cache salt."""
    seed = xxhash.xxh64_intdigest(hash_seed.encode())
    key = xxhash.xxh64_intdigest(model.encode(), seed=seed)
    if salt:
        key = xxhash.xxh64_intdigest(salt.encode(), seed=key)
    return key


_U32 = next(code for code in "IL" if array.array(code).itemsize == 4)


def _little_endian_u32(values: Sequence[int] | bytes) -> array.array[int]:
    """uint32s from ints, or from little-endian bytes; byteswapped either way on a big-endian host."""
    out = array.array(_U32, values)
    if sys.byteorder != "little":
        out.byteswap()
    return out


def _pack(tokens: Sequence[int]) -> bytes:
    """Token ids as little-endian uint32s (ids outside that range wrap)."""
    try:
        return _little_endian_u32(tokens).tobytes()  # C speed: about 6x struct.pack over a generator
    except (OverflowError, TypeError):
        return struct.pack(f"<{len(tokens)}I", *(t & 0xFFFFFFFF for t in tokens))


def block_keys(parent: int, tokens: Sequence[int], block_size: int, max_blocks: int | None = None) -> list[int]:
    """Chained keys of the full blocks of `tokens` (a trailing partial block has none, as engines
    cache only full blocks)."""
    n = len(tokens) // block_size
    if max_blocks is not None:
        n = min(n, max_blocks)
    out: list[int] = []
    digest = xxhash.xxh64_intdigest
    data = _pack(tokens[: n * block_size])
    step = block_size * 4
    for i in range(n):
        parent = digest(data[i * step : (i + 1) * step], seed=parent)
        out.append(parent)
    return out


def simulator_token_ids(text: str) -> list[int]:
    """The simulator's tokenizer: every 4 bytes of UTF-8 are one token (little-endian); a trailing
    1-3 bytes make no token. A block of token ids then packs back to the block's bytes, which is
    what the simulator's engine hashes."""
    data = text.encode("utf-8", "surrogatepass")
    return _little_endian_u32(data[: len(data) // 4 * 4]).tolist()
