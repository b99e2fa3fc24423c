"""approx-prefix-cache-producer: which servers probably hold each prompt's prefix in their KV cache.

The prompt is cut into blocks of `blockSizeTokens` tokens (4 characters a token, as upstream
estimates); each block's hash chains the previous one, so a block identifies the whole prefix up
to it. The index learns when a pick is sent and forgets servers that leave. `prefix-cache-scorer`,
`no-hit-lru-scorer`, `prefix-cache-affinity-filter` and `inflight-load-producer` read the match
it computes once per request; one is created with these defaults when a config names none.
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
)
from epp.scheduling.params import Params
from epp.scheduling.prefix_index import PrefixIndex, block_hashes

AVERAGE_CHARS_PER_TOKEN = 4  # upstream's estimate; epp never tokenizes
DEFAULT_BLOCK_TOKENS = 16  # vLLM's default block size
DEFAULT_MAX_BLOCKS = 256
DEFAULT_LRU_CAPACITY = 31250

# The parameters that configure an index; older releases gave them to prefix-cache-scorer.
INDEX_PARAMETERS = ("autoTune", "blockSizeTokens", "blockSize", "hashBlockSize", "maxPrefixBlocksToMatch",
                    "maxPrefixTokensToMatch", "lruCapacityPerServer")


class ApproxPrefixCacheProducer(Plugin, PreRequest, EndpointsChanged, PrefixIndexHolder):
    type_name = "approx-prefix-cache-producer"
    hook_order = 10  # others read this request's match in their PreRequest before the index learns it

    def __init__(self, name: str = "", *, block_size_tokens: int = DEFAULT_BLOCK_TOKENS,
                 max_prefix_blocks: int = DEFAULT_MAX_BLOCKS, lru_capacity_per_server: int = DEFAULT_LRU_CAPACITY,
                 block_chars: int | None = None, auto_tune: bool = True) -> None:
        super().__init__(name)
        self.block_chars = block_chars or block_size_tokens * AVERAGE_CHARS_PER_TOKEN
        self.block_tokens = max(1, self.block_chars // AVERAGE_CHARS_PER_TOKEN)
        self.max_prefix_blocks = max_prefix_blocks
        self.auto_tune = auto_tune
        self.index = PrefixIndex(lru_capacity_per_server)
        # Keys of this producer's per-request results in the cycle state (one producer, one match).
        self._hashes_key = object()
        self._matched_key = object()

    @classmethod
    def from_parameters(cls, name: str, params: Params) -> Plugin:
        return cls(name, **index_parameters(params))

    def describe(self) -> dict[str, Any]:
        return {"blockSizeTokens": self.block_tokens, "maxPrefixBlocksToMatch": self.max_prefix_blocks,
                "lruCapacityPerServer": self.index.capacity, "autoTune": self.auto_tune}

    def hashes(self, state: CycleState, request: InferenceRequest) -> list[int]:
        """The prompt's chained block hashes; computed once per cycle."""
        hashes: list[int] | None = state.data.get(self._hashes_key)
        if hashes is None:
            hashes = block_hashes(request.target_model, request.prompt, self.block_chars, self.max_prefix_blocks)
            state.data[self._hashes_key] = hashes
        return hashes

    def matched_blocks(self, state: CycleState, request: InferenceRequest, endpoints: list[Endpoint]) -> dict[str, int]:
        """Leading blocks of this prompt each endpoint holds (absent: none); computed once per cycle."""
        matched: dict[str, int] | None = state.data.get(self._matched_key)
        if matched is None:
            hashes = self.hashes(state, request)
            matched = self.index.match(hashes, (ep.hostport for ep in endpoints)) if hashes else {}
            state.data[self._matched_key] = matched
        return matched

    def pre_request(self, state: CycleState, request: InferenceRequest, result: SchedulingResult) -> None:
        hashes = self.hashes(state, request)
        if hashes:
            self.index.add(result.endpoint.hostport, hashes)

    def endpoints_changed(self, added: list[Endpoint], removed: list[Endpoint]) -> None:
        for ep in removed:
            self.index.remove_server(ep.hostport)

    def prefix_index_size(self) -> int:
        return self.index.size()


def index_parameters(params: Params) -> dict[str, Any]:
    """The index's parameters, as GIE v1.5 and llm-d-router name them (and older releases did)."""
    auto_tune_given = params.has("autoTune")
    auto_tune = params.bool("autoTune", True)
    if auto_tune and auto_tune_given:
        params.warnings.append(
            f"plugin {params.plugin_type!r}: autoTune takes the block size from blockSizeTokens and the index "
            "size from lruCapacityPerServer: epp scrapes the servers' cache geometry but does not size its "
            "index from it yet")
    block_size_tokens = params.int("blockSizeTokens", DEFAULT_BLOCK_TOKENS, minimum=1)
    if params.has("blockSize"):  # deprecated upstream; llm-d-router takes it as tokens
        legacy = params.int("blockSize", 0, minimum=0)
        params.warnings.append(f"plugin {params.plugin_type!r}: 'blockSize' is deprecated; use 'blockSizeTokens'")
        if legacy and block_size_tokens == DEFAULT_BLOCK_TOKENS:
            block_size_tokens = legacy
    # The oldest releases gave the block size in characters.
    block_chars = params.optional_int("hashBlockSize", minimum=1)
    max_blocks = params.int("maxPrefixBlocksToMatch", DEFAULT_MAX_BLOCKS, minimum=0)
    max_tokens = params.int("maxPrefixTokensToMatch", 0, minimum=0)
    lru = params.int("lruCapacityPerServer", DEFAULT_LRU_CAPACITY, minimum=1)
    params.done()
    tokens_per_block = (block_chars // AVERAGE_CHARS_PER_TOKEN or 1) if block_chars else block_size_tokens
    if max_tokens:
        max_blocks = max(1, max_tokens // tokens_per_block)
    elif max_blocks == 0:  # upstream: both caps 0 match the whole prompt
        max_blocks = 1 << 30
    return {"block_size_tokens": block_size_tokens, "max_prefix_blocks": max_blocks,
            "lru_capacity_per_server": lru, "block_chars": block_chars, "auto_tune": auto_tune}
