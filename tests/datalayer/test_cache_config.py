"""Each engine's KV-cache configuration (block size, block count) and TensorRT-LLM's two servers, as upstream's
built-in engine configs name their series; scraped over real HTTP."""

from __future__ import annotations

import pytest
from aiohttp import web

from epp.datalayer.engines import ENGINES, with_overrides
from epp.datalayer.scraper import MetricsScraper, extract
from epp.datastore import Datastore
from epp.discovery.static import static_endpoints
from epp.stack import free_ports
from tests.helpers import until

VLLM = (
    """\
vllm:num_requests_waiting{model_name="m"} 1
vllm:num_requests_running{model_name="m"} 2
vllm:kv_cache_usage_perc{model_name="m"} 0.5
# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig
# TYPE vllm:cache_config_info gauge
"""
    'vllm:cache_config_info{block_size="16",cache_dtype="auto",enable_prefix_caching="True",'
    'gpu_memory_utilization="0.9",num_cpu_blocks="None",num_gpu_blocks="27000"} 1.0\n'
)

# trtllm-serve's own names (not Triton's nv_trt_llm_*).
TRTLLM_SERVE = """\
# TYPE trtllm_num_requests_waiting gauge
trtllm_num_requests_waiting{model_name="m"} 4
trtllm_num_requests_running{model_name="m"} 6
trtllm_kv_cache_utilization{model_name="m"} 0.25
trtllm_kv_cache_tokens_per_block{model_name="m"} 32
trtllm_kv_cache_max_blocks{model_name="m"} 5000
"""

TRITON_TRT = """\
nv_trt_llm_request_metrics{model="m",request_type="waiting",version="1"} 2
nv_trt_llm_request_metrics{model="m",request_type="scheduled",version="1"} 3
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="fraction",model="m",version="1"} 0.75
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="tokens_per",model="m",version="1"} 64
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="max",model="m",version="1"} 1200
"""


@pytest.mark.parametrize(("engine", "text", "signals", "cache"), [
    ("vllm", VLLM, (1, 2, 0.5), (16, 27000)),
    ("trtllm-serve", TRTLLM_SERVE, (4, 6, 0.25), (32, 5000)),
    ("triton-tensorrt-llm", TRITON_TRT, (2, 3, 0.75), (64, 1200)),
    ("sglang", 'sglang:num_queue_reqs 5\nsglang:num_running_reqs 1\nsglang:token_usage 0.1\n'
               'sglang:cache_config_info{page_size="64",num_pages="800"} 1\n', (5, 1, 0.1), (64, 800)),
    ("triton", "nv_inference_pending_request_count 7\nnv_inference_exec_count 9\n", (7, 9, 0.0), (0, 0)),
])
def test_each_engine_reads_its_signals_and_cache_configuration(
        engine: str, text: str, signals: tuple, cache: tuple) -> None:
    m, missing = extract(text, ENGINES[engine], now=1.0)
    assert (m.waiting, m.running, m.kv_usage) == pytest.approx(signals)
    assert (m.cache_block_size, m.cache_num_blocks) == cache
    assert missing == []


def test_a_server_without_its_cache_configuration_reports_zero_not_a_guess() -> None:
    text = VLLM.replace('num_gpu_blocks="27000"', 'num_gpu_blocks="None"').replace('block_size="16"', 'block_size=""')
    m, _ = extract(text, ENGINES["vllm"], now=0)
    assert (m.cache_block_size, m.cache_num_blocks) == (0, 0)
    m, _ = extract(VLLM.split("# HELP")[0], ENGINES["vllm"], now=0)
    assert (m.cache_block_size, m.cache_num_blocks) == (0, 0)


def test_cache_info_metric_flag_names_the_info_gauge() -> None:
    """GIE's --cache-info-metric (the chart passes trtllm_cache_config_info for trtllm-serve)."""
    mapping = with_overrides(ENGINES["vllm"], cache_info="trtllm_cache_config_info")
    text = VLLM.replace("vllm:cache_config_info", "trtllm_cache_config_info").replace('"16"', '"128"')
    m, _ = extract(text, mapping, now=0)
    assert (m.cache_block_size, m.cache_num_blocks) == (128, 27000)


async def test_scraped_over_http_from_a_vllm_and_a_trtllm_serve_pod() -> None:
    ports = free_ports(2)
    runners = []
    for port, text in zip(ports, (VLLM, TRTLLM_SERVE), strict=True):
        app = web.Application()

        async def metrics(_: web.Request, body: str = text) -> web.Response:
            return web.Response(text=body, content_type="text/plain")

        app.router.add_get("/metrics", metrics)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        runners.append(runner)
    ds = Datastore(staleness=5.0)
    engine_of = {ports[0]: "vllm", ports[1]: "trtllm-serve"}
    scraper = MetricsScraper(ds, lambda ep: ENGINES[engine_of[ep.port]], interval=0.02, timeout=1.0)
    try:
        scraper.start()
        ds.set_endpoints(static_endpoints([f"127.0.0.1:{p}" for p in ports]))
        vllm, trt = (ds.get(f"127.0.0.1:{p}") for p in ports)
        await until(lambda: vllm.metrics is not None and trt.metrics is not None, 10, "both pods scraped")
        assert (vllm.metrics.cache_block_size, vllm.metrics.cache_num_blocks) == (16, 27000)
        assert (trt.metrics.waiting, trt.metrics.running) == (4, 6)
        assert (trt.metrics.cache_block_size, trt.metrics.cache_num_blocks) == (32, 5000)
    finally:
        scraper.stop()
        for r in runners:
            await r.cleanup()
