"""prefix-cache-scorer: prefer the server that already holds the longest prefix of this prompt.

Score = matched leading blocks / total blocks. The index learns when a pick is sent
(`pre_request`), so the next request with the same prefix follows it, and forgets
servers that leave the pool.
"""

from __future__ import annotations

from typing import Any

from epp.datastore import Endpoint
from epp.requests import InferenceRequest
from epp.scheduling.framework import (
    CycleState,
    EndpointsChanged,
    Plugin,
    PrefixIndexHolder,
    PreRequest,
    SchedulingResult,
    Scorer,
)
from epp.scheduling.params import Params
from epp.scheduling.prefix_index import PrefixIndex, block_hashes

AVERAGE_CHARS_PER_TOKEN = 4  # GIE's approximation; the EPP never tokenizes.
_STATE_KEY = "prefix-cache.hashes"
_MATCHED_KEY = "prefix-cache.matched"


class PrefixCacheScorer(Scorer, PreRequest, EndpointsChanged, PrefixIndexHolder):
    type_name = "prefix-cache-scorer"

    def __init__(
        self,
        name: str = "",
        *,
        block_size_tokens: int = 16,
        max_prefix_blocks: int = 256,
        lru_capacity_per_server: int = 31250,
        block_chars: int | None = None,
    ) -> None:
        super().__init__(name)
        self.block_chars = block_chars or block_size_tokens * AVERAGE_CHARS_PER_TOKEN
        self.block_tokens = max(1, self.block_chars // AVERAGE_CHARS_PER_TOKEN)
        self.max_prefix_blocks = max_prefix_blocks
        self.index = PrefixIndex(lru_capacity_per_server)

    @classmethod
    def from_parameters(cls, name: str, params: dict[str, Any]) -> Plugin:
        p = Params(cls.type_name, params)
        block_size_tokens = p.int("blockSizeTokens", 16, minimum=1)
        # Older releases gave the block size in characters.
        hash_block_size = p.optional_int("hashBlockSize")
        max_blocks = p.int("maxPrefixBlocksToMatch", 256, minimum=1)
        max_tokens = p.optional_int("maxPrefixTokensToMatch")
        lru = p.int("lruCapacityPerServer", 31250, minimum=1)
        p.bool("autoTune", True)  # accepted; the block size here is already the server's default (16)
        p.done()
        if hash_block_size is not None and hash_block_size < 1:
            raise ValueError("hashBlockSize must be >= 1")
        if max_tokens:
            max_blocks = max(1, max_tokens // block_size_tokens)
        return cls(
            name,
            block_size_tokens=block_size_tokens,
            max_prefix_blocks=max_blocks,
            lru_capacity_per_server=lru,
            block_chars=hash_block_size,
        )

    def hashes(self, state: CycleState, request: InferenceRequest) -> list[int]:
        hashes = state.data.get(_STATE_KEY)
        if hashes is None:
            hashes = block_hashes(request.target_model, request.prompt, self.block_chars, self.max_prefix_blocks)
            state.data[_STATE_KEY] = hashes
        return hashes

    def matched_blocks(self, state: CycleState, request: InferenceRequest, endpoints: list[Endpoint]) -> dict[str, int]:
        """Leading blocks of this prompt each endpoint holds (absent: none); computed once per cycle."""
        matched = state.data.get(_MATCHED_KEY)
        if matched is None:
            hashes = self.hashes(state, request)
            matched = self.index.match(hashes, (ep.hostport for ep in endpoints)) if hashes else {}
            state.data[_MATCHED_KEY] = matched
        return matched

    def score(self, state: CycleState, request: InferenceRequest, endpoints: list[Endpoint]) -> list[float]:
        matched = self.matched_blocks(state, request, endpoints)
        total = len(self.hashes(state, request))
        if not total:
            return [0.0] * len(endpoints)
        return [matched.get(ep.hostport, 0) / total for ep in endpoints]

    def pre_request(self, state: CycleState, request: InferenceRequest, result: SchedulingResult) -> None:
        hashes = self.hashes(state, request)
        if hashes:
            self.index.add(result.endpoint.hostport, hashes)

    def endpoints_changed(self, added: list[Endpoint], removed: list[Endpoint]) -> None:
        for ep in removed:
            self.index.remove_server(ep.hostport)

    def prefix_index_size(self) -> int:
        return self.index.size()
