"""Which prompt prefixes each server has probably cached.

The prompt is cut into fixed-size blocks; each block's hash chains the previous one
(xxhash64 seeded with the previous hash, the first seeded with the model name), so a
block hash identifies the whole prefix up to it, as vLLM's automatic prefix cache
does. Each server has an LRU of the block hashes the EPP sent it, bounded by
`capacity_per_server` entries: memory stays bounded whatever the traffic.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

import xxhash


def block_hashes(model: str, prompt: str, block_chars: int, max_blocks: int) -> list[int]:
    """Chained hashes of the prompt's full blocks, at most `max_blocks` of them.

    A trailing partial block is hashed too (GIE does the same): it lets identical
    short prompts match, and costs nothing when prompts only share full blocks.
    """
    data = prompt.encode("utf-8", "surrogatepass")
    if not data:
        return []
    limit = min(len(data), block_chars * max_blocks)
    digest = xxhash.xxh64_intdigest  # the second argument is the seed: the previous block's hash
    prev = digest(model.encode())
    out: list[int] = []
    append = out.append
    full = limit - limit % block_chars
    # On the pick path for every request: one slice and one digest per block, nothing else.
    for start in range(0, full, block_chars):
        prev = digest(data[start : start + block_chars], prev)
        append(prev)
    if full < limit:
        append(digest(data[full:limit], prev))
    return out


class PrefixIndex:
    """Per-server LRU sets of block hashes."""

    def __init__(self, capacity_per_server: int) -> None:
        self.capacity = capacity_per_server
        self._servers: dict[str, OrderedDict[int, None]] = {}

    def match(self, hashes: list[int], servers: Iterable[str]) -> dict[str, int]:
        """Number of leading blocks of `hashes` each server holds (servers with none are left out)."""
        out: dict[str, int] = {}
        if not hashes:
            return out
        first = hashes[0]
        for server in servers:
            lru = self._servers.get(server)
            if lru is None or first not in lru:
                continue
            n = 1
            for h in hashes[1:]:
                if h not in lru:
                    break
                n += 1
            out[server] = n
        return out

    def add(self, server: str, hashes: list[int]) -> None:
        """Record that these blocks were sent to `server` (it will cache them)."""
        lru = self._servers.get(server)
        if lru is None:
            lru = self._servers[server] = OrderedDict()
        move = lru.move_to_end
        for h in hashes:
            if h in lru:
                move(h)
            else:
                lru[h] = None
        excess = len(lru) - self.capacity
        for _ in range(excess):
            lru.popitem(last=False)

    def entries(self) -> Iterable[tuple[str, Iterable[int]]]:
        """Each server's block hashes, least recently sent first (what a snapshot saves)."""
        return self._servers.items()

    def restore(self, server: str, hashes: Iterable[int]) -> None:
        """Take a server's block hashes from a snapshot, least recently sent first; those beyond
        the capacity, the oldest, are dropped."""
        lru = OrderedDict.fromkeys(hashes)
        for _ in range(len(lru) - self.capacity):
            lru.popitem(last=False)
        self._servers[server] = lru

    def remove_server(self, server: str) -> None:
        self._servers.pop(server, None)

    def size(self) -> int:
        """Total entries across servers (GIE's prefix_indexer_size)."""
        return sum(len(lru) for lru in self._servers.values())

    def blocks(self, server: str) -> int:
        """Blocks recorded for one server: how much of its cache epp's traffic has claimed."""
        lru = self._servers.get(server)
        return len(lru) if lru is not None else 0
