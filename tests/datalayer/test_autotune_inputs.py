"""epp.datalayer.cache_config: what autoTune makes of each server's scraped KV-cache configuration."""

from __future__ import annotations

from epp.datalayer.cache_config import LLMD_MIN_BLOCK_TOKENS, tuned_block_tokens, tuned_capacity
from epp.datalayer.engines import ENGINES
from epp.datalayer.scraper import extract
from epp.datastore import Endpoint, EndpointMetrics

VLLM = ('vllm:num_requests_waiting 0\nvllm:num_requests_running 0\nvllm:kv_cache_usage_perc 0\n'
        'vllm:cache_config_info{block_size="32",num_gpu_blocks="4096"} 1\n')


def pod(port: int, metrics: EndpointMetrics | None) -> Endpoint:
    ep = Endpoint("127.0.0.1", port)
    ep.metrics = metrics
    return ep


def test_a_scraped_block_size_and_count_replace_the_configured_ones_under_autotune() -> None:
    m, _ = extract(VLLM, ENGINES["vllm"], now=0)
    a, b = pod(1, m), pod(2, None)
    assert tuned_block_tokens([a, b], 16, auto_tune=True) == 32
    assert tuned_capacity(a, 31250, auto_tune=True) == 4096
    assert tuned_capacity(b, 31250, auto_tune=True) == 31250  # not scraped yet: the configured capacity


def test_autotune_off_or_nothing_reported_keeps_the_configuration() -> None:
    m, _ = extract(VLLM, ENGINES["vllm"], now=0)
    assert tuned_block_tokens([pod(1, m)], 16, auto_tune=False) == 16
    assert tuned_capacity(pod(1, m), 31250, auto_tune=False) == 31250
    assert tuned_block_tokens([pod(1, EndpointMetrics())], 16, auto_tune=True) == 16
    assert tuned_block_tokens([], 16, auto_tune=True) == 16


def test_llm_d_routers_floor_applies_to_every_source() -> None:
    m, _ = extract(VLLM, ENGINES["vllm"], now=0)
    assert tuned_block_tokens([pod(1, m)], 16, auto_tune=True, minimum=LLMD_MIN_BLOCK_TOKENS) == 64
    assert tuned_block_tokens([], 128, auto_tune=True, minimum=LLMD_MIN_BLOCK_TOKENS) == 128
