"""Model-server metrics (epp.datalayer.scraper): extraction, and real HTTP scrapes (healthy, hanging, broken)."""

import asyncio

import pytest

from epp.datalayer.engines import ENGINES
from epp.datalayer.scraper import MetricsParseError, MetricsScraper, extract
from epp.datastore import Datastore
from epp.discovery.static import static_endpoints
from epp.simulator.engine import EngineConfig
from epp.simulator.server import SimulatedServer
from epp.stack import free_ports
from tests.helpers import until

VLLM = """\
# HELP vllm:num_requests_waiting Number of requests waiting.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="m"} 3.0
vllm:num_requests_running{model_name="m"} 7.0
vllm:gpu_cache_usage_perc{model_name="m"} 0.42
vllm:lora_requests_info{max_lora="4",running_lora_adapters="a,b",waiting_lora_adapters=""} 1700000000.0
vllm:lora_requests_info{max_lora="4",running_lora_adapters="a,b,c",waiting_lora_adapters="d"} 1700000100.0
vllm:cache_config_info{block_size="16",num_gpu_blocks="9000"} 1.0
vllm:e2e_request_latency_seconds_bucket{le="1.0",model_name="m"} 5.0
"""


def test_extract_vllm_with_older_kv_name_and_newest_lora_series() -> None:
    m, missing = extract(VLLM, ENGINES["vllm"], now=5.0)
    assert (m.waiting, m.running, m.kv_usage) == (3, 7, pytest.approx(0.42))
    assert m.active_adapters == {"a", "b", "c"}
    assert m.waiting_adapters == {"d"}
    assert m.max_lora == 4
    assert m.scraped_at == 5.0
    assert missing == []


def test_extract_triton_tensorrt_llm_label_specs() -> None:
    text = (
        'nv_trt_llm_request_metrics{request_type="waiting"} 2\n'
        'nv_trt_llm_request_metrics{request_type="scheduled"} 5\n'
        'nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="fraction"} 0.3\n'
        'nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="tokens_per"} 32\n'
    )
    m, _ = extract(text, ENGINES["triton-tensorrt-llm"], now=0)
    assert (m.waiting, m.running, m.kv_usage) == (2, 5, pytest.approx(0.3))
    assert m.cache_block_size == 32


def test_not_a_model_server() -> None:
    with pytest.raises(MetricsParseError, match="none of the expected metrics"):
        extract("go_goroutines 12\n", ENGINES["vllm"], now=0)


async def test_scrapes_real_servers_and_survives_a_hanging_and_a_broken_one() -> None:
    ports = free_ports(3)
    servers = [SimulatedServer(f"s{i}", p, EngineConfig()) for i, p in enumerate(ports)]
    for s in servers:
        await s.start()
    servers[1].metrics_delay = 30.0  # hangs
    servers[2].metrics_status = 500  # broken
    ds = Datastore(staleness=2.0)
    scraper = MetricsScraper(ds, lambda ep: ENGINES["vllm"], interval=0.02, timeout=0.3)
    try:
        scraper.start()
        ds.set_endpoints(static_endpoints([f"127.0.0.1:{p}" for p in ports]))
        eps = ds.all_endpoints()
        await until(lambda: eps[0].metrics is not None and eps[1].scrape_error and eps[2].scrape_error, 10,
                    "a scrape of each server")
        assert eps[0].scrape_error is None
        assert "timed out" in eps[1].scrape_error
        assert eps[1].metrics is None
        assert "HTTP 500" in eps[2].scrape_error
        # The healthy server keeps being scraped while the other two fail.
        first = eps[0].metrics.scraped_at
        await until(lambda: eps[0].metrics.scraped_at > first, 10, "the healthy server's next scrape")
        # A server removed from the pool stops being scraped.
        ds.set_endpoints([eps[0]])
        await until(lambda: len(scraper._tasks) == 1, 10, "the removed server's scrape loop to stop")
    finally:
        scraper.stop()
        for s in servers:
            await s.stop()


async def test_oversized_and_unreachable_metrics_are_errors_not_crashes(monkeypatch: pytest.MonkeyPatch) -> None:
    from aiohttp import web

    import epp.datalayer.scraper as scraper_mod

    monkeypatch.setattr(scraper_mod, "MAX_METRICS_BYTES", 10_000)
    big = "vllm:num_requests_waiting 1\n" + "# padding\n" * 2000

    async def sized(_: web.Request) -> web.Response:
        return web.Response(text=big)

    async def chunked(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for i in range(0, len(big), 1000):
            await resp.write(big[i : i + 1000].encode())
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/sized/metrics", sized)
    app.router.add_get("/chunked/metrics", chunked)
    runner = web.AppRunner(app)
    await runner.setup()
    port, closed = free_ports(2)
    await web.TCPSite(runner, "127.0.0.1", port).start()
    ds = Datastore(staleness=2.0)
    scraper = MetricsScraper(ds, lambda ep: ENGINES["vllm"], interval=0.02, timeout=0.5, path="/sized/metrics")
    try:
        scraper.start()
        ds.set_endpoints(static_endpoints([f"127.0.0.1:{port}", f"127.0.0.1:{closed}"]))
        sized_ep, dead = ds.all_endpoints()
        await until(lambda: sized_ep.scrape_error and dead.scrape_error, 10, "both scrapes to fail")
        assert "too large" in sized_ep.scrape_error
        assert sized_ep.metrics is None
        assert "Connect" in dead.scrape_error
        assert dead.metrics is None
        # No Content-Length: the cap holds while reading, too (the client lives on the scraper's loop).
        once = scraper.scrape_once(sized_ep, f"http://127.0.0.1:{port}/chunked/metrics")
        err = await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(once, scraper._loop))
        assert "too large" in err
    finally:
        scraper.stop()
        await runner.cleanup()


@pytest.mark.parametrize("value", ["NaN", "+Inf", "-Inf", "-3"])
def test_a_non_finite_or_negative_gauge_is_an_error_not_an_idle_server(value: str) -> None:
    text = (f'vllm:num_requests_waiting{{model_name="m"}} {value}\n'
            "vllm:num_requests_running 1\nvllm:kv_cache_usage_perc 0.1\n")
    with pytest.raises(MetricsParseError, match="vllm:num_requests_waiting is"):
        extract(text, ENGINES["vllm"], now=1.0)


async def test_garbage_from_a_server_never_ends_its_scrape_loop() -> None:
    """A NaN queue used to raise out of the scrape task: the pod stayed unknown until epp restarted."""
    from aiohttp import web

    body = {"text": "vllm:num_requests_waiting NaN\nvllm:num_requests_running 1\nvllm:kv_cache_usage_perc 0.1\n"}

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(text=body["text"])

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_ports(1)[0]
    await web.TCPSite(runner, "127.0.0.1", port).start()
    ds = Datastore(staleness=2.0)
    scraper = MetricsScraper(ds, lambda ep: ENGINES["vllm"], interval=0.02, timeout=0.5)
    try:
        scraper.start()
        ds.set_endpoints(static_endpoints([f"127.0.0.1:{port}"]))
        (ep,) = ds.all_endpoints()
        await until(lambda: ep.scrape_error is not None, 10, "the NaN scrape to be refused")
        assert "is nan" in ep.scrape_error
        assert ep.metrics is None
        body["text"] = "vllm:num_requests_waiting 4\nvllm:num_requests_running 1\nvllm:kv_cache_usage_perc 0.1\n"
        await until(lambda: ep.metrics is not None and ep.metrics.waiting == 4, 10, "the next good scrape")
    finally:
        scraper.stop()
        await runner.cleanup()


async def test_a_server_that_goes_down_is_unknown_at_once_not_after_the_staleness_threshold() -> None:
    port = free_ports(1)[0]
    server = SimulatedServer("s0", port, EngineConfig())
    await server.start()
    ds = Datastore(staleness=60.0)  # staleness alone would trust the last scrape for a minute
    scraper = MetricsScraper(ds, lambda ep: ENGINES["vllm"], interval=0.02, timeout=0.5)
    try:
        scraper.start()
        ds.set_endpoints(static_endpoints([f"127.0.0.1:{port}"]))
        (ep,) = ds.all_endpoints()
        await until(lambda: ep.metrics is not None, 10, "a first scrape")
        await server.stop()  # killed: its port now refuses connections
        await until(lambda: ep.metrics is None, 2, "the refused scrape to forget the last snapshot")
        assert "Connect" in (ep.scrape_error or "")
    finally:
        scraper.stop()


async def test_a_scrape_records_epps_own_requests_in_flight_while_it_was_taken() -> None:
    """The scorer tells other clients' requests from epp's by this count: the one at scrape time, not now."""
    port = free_ports(1)[0]
    server = SimulatedServer("s0", port, EngineConfig())
    await server.start()
    ds = Datastore(staleness=2.0)
    scraper = MetricsScraper(ds, lambda ep: ENGINES["vllm"], interval=0.02, timeout=0.5)
    try:
        scraper.start()
        ds.set_endpoints(static_endpoints([f"127.0.0.1:{port}"]))
        ep = ds.all_endpoints()[0]
        await until(lambda: ep.metrics is not None, 10, "a first scrape")
        assert ep.metrics.own_inflight == 0
        ep.inflight = 3
        await until(lambda: ep.metrics.own_inflight == 3, 10, "a scrape taken with three in flight")
        ep.inflight = 0  # they ended
        await until(lambda: ep.metrics.own_inflight == 0, 10, "the next scrape")
    finally:
        scraper.stop()
        await server.stop()

