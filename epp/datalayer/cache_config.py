"""What a prefix producer's `autoTune` takes from the model servers' KV-cache configuration.

Upstream's approx-prefix-cache-producer, with autoTune on (its default), hashes prompts in blocks of
the server's own block size (the first candidate's `block_size`, as scraped into
`EndpointMetrics.cache_block_size`) and sizes each server's share of the index by its GPU block count
(`cache_num_blocks`); the configured `blockSizeTokens` and `lruCapacityPerServer` apply where a server
reports neither (or autoTune is off). llm-d-router never hashes in blocks under 64 tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

from epp.datastore import Endpoint

LLMD_MIN_BLOCK_TOKENS = 64  # llm-d-router's floor on the routing block size, whatever its source


def tuned_block_tokens(candidates: Sequence[Endpoint], configured: int, *, auto_tune: bool,
                       minimum: int = 1) -> int:
    """The block size in tokens for this request's hashes: the first candidate's reported block size
    under autoTune, else `configured`; never below `minimum`."""
    size = configured
    if auto_tune and candidates:
        m = candidates[0].metrics
        if m is not None and m.cache_block_size > 0:
            size = m.cache_block_size
    return max(size, minimum)


def tuned_capacity(endpoint: Endpoint, configured: int, *, auto_tune: bool) -> int:
    """How many blocks the index keeps for this server: its GPU block count under autoTune, else `configured`."""
    if auto_tune:
        m = endpoint.metrics
        if m is not None and m.cache_num_blocks > 0:
            return m.cache_num_blocks
    return configured
