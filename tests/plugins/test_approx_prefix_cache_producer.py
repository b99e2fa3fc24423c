"""approx-prefix-cache-producer: the prefix index the prefix-aware plugins share, and its parameters."""

from epp.scheduling.framework import SchedulingResult
from epp.scheduling.params import Params
from epp.scheduling.plugins.approx_prefix_cache_producer import ApproxPrefixCacheProducer
from tests.helpers import cycle_state, endpoint, request


def make(**params) -> ApproxPrefixCacheProducer:
    p = ApproxPrefixCacheProducer.from_parameters("p", Params("approx-prefix-cache-producer", params))
    assert isinstance(p, ApproxPrefixCacheProducer)
    return p


def test_learns_what_was_sent_and_forgets_servers_that_leave() -> None:
    p = make(blockSizeTokens=4)  # 16-character blocks
    eps = [endpoint(1), endpoint(2)]
    prompt = "0123456789abcdef" * 4
    p.pre_request(cycle_state(), request(prompt), SchedulingResult([eps[0]], eps))
    assert p.matched_blocks(cycle_state(), request(prompt + "tail"), eps) == {eps[0].hostport: 4}
    p.endpoints_changed([], [eps[0]])
    assert p.prefix_index_size() == 0


def test_token_cap_and_the_deprecated_block_size() -> None:
    assert make(maxPrefixTokensToMatch=64).max_prefix_blocks == 4  # 64 tokens / 16 a block
    params = Params("approx-prefix-cache-producer", {"blockSize": 32})
    p = ApproxPrefixCacheProducer.from_parameters("p", params)
    assert p.block_tokens == 32  # type: ignore[attr-defined]  # as llm-d-router maps it
    assert any("deprecated" in w for w in params.warnings)


def test_lru_capacity_bounds_each_server() -> None:
    p = make(blockSizeTokens=1, lruCapacityPerServer=3)
    ep = endpoint(1)
    p.pre_request(cycle_state(), request("x" * 40), SchedulingResult([ep], [ep]))
    assert p.prefix_index_size() == 3
