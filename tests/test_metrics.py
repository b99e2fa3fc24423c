"""epp's own metrics, read from the /metrics endpoint of a running epp: each moves when it should, under both name sets.

The pool is three simulated vLLM servers (epp.simulator) that epp really scrapes; requests
come over real gRPC as Envoy sends them (request phase, then the streamed response inline).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from epp.flowcontrol import FlowControlConfig, FlowControlError, FlowController
from epp.metrics import MAX_LABEL_LENGTH, MAX_LABEL_VALUES, OVERFLOW_LABEL, BoundedLabel, observe_all
from epp.requests import new_request, parse_body
from epp.server import EppServer
from epp.simulator.engine import EngineConfig
from epp.simulator.server import SimulatedServer
from epp.stack import free_ports
from epp.usage import Usage
from tests.extproc_messages import (
    MODEL,
    SSE_HEADERS,
    Stream,
    body_msg,
    completion,
    dest_header,
    headers_msg,
    response_body_msg,
    response_headers_msg,
)
from tests.helpers import StartEpp, until

TENANT = {"x-gateway-inference-objective": "critical", "x-llm-d-inference-fairness-id": "tenant-a"}
LEGACY = {"model_name": MODEL, "target_model_name": MODEL}
LLMD = {**LEGACY, "fairness_id": "tenant-a", "priority": "5"}


class Scrape:
    """One read of /metrics: sample values by name and labels."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: list[tuple[str, dict[str, str], float]] = [
            (s.name, s.labels, s.value) for fam in text_string_to_metric_families(text) for s in fam.samples]

    def __call__(self, metric: str, **labels: str) -> float:
        """The sum over every series of `metric` whose labels include `labels` (0 if none)."""
        return sum(v for n, ls, v in self.samples if n == metric and all(ls.get(k) == x for k, x in labels.items()))

    def has(self, name: str) -> bool:
        return any(n == name for n, _, _ in self.samples)


async def scrape(server: EppServer) -> Scrape:
    async with httpx.AsyncClient() as client:
        r = await client.get(f"http://127.0.0.1:{server.opts.metrics_port}/metrics")
    r.raise_for_status()
    return Scrape(r.text)


@pytest.fixture
async def pool(start_epp: StartEpp) -> AsyncIterator[tuple[EppServer, list[SimulatedServer]]]:
    """epp over three simulators (the first slow, with room for one sequence), its /metrics on a free port."""
    server = await start_epp(metrics_port=free_ports(1)[0], refresh_prometheus_metrics_interval=0.05)
    server.datastore.objectives = {"critical": 5, "batch": -1}
    sims = []
    for i, addr in enumerate(server.opts.endpoints):
        cfg = EngineConfig(max_num_seqs=1 if i == 0 else 64, time_scale=200.0 if i == 0 else 1.0)
        sim = SimulatedServer(f"sim-{i}", int(addr.rsplit(":", 1)[1]), cfg)
        await sim.start()
        sims.append(sim)
    eps = server.datastore.all_endpoints()
    await until(lambda: all(ep.metrics is not None for ep in eps), 10, "every simulator scraped")
    try:
        yield server, sims
    finally:
        for sim in sims:
            await sim.stop()


async def stream_request(server: EppServer, body: bytes, chunks: list[bytes], headers: dict[str, str],
                         status: int = 200, pause: float = 0.02, mid: Any = None) -> str:
    """One request as Envoy's inline ext_proc filter sends it (BUFFERED); returns the pick."""
    s = Stream(server)
    s.send(headers_msg(extra=headers), body_msg(body))
    answers = await s.read(2)
    pick = dest_header(answers[1].request_body.response)
    s.send(SSE_HEADERS if status == 200 else response_headers_msg(status, "application/json"))
    await s.read(1)
    if mid is not None:
        await mid()
    for i, chunk in enumerate(chunks):
        await asyncio.sleep(pause)
        s.send(response_body_msg(chunk, eos=i == len(chunks) - 1))
        await s.read(1)
    s.close()
    await s.rest()
    return pick


def sse(tokens: int, prompt: int, cached: int) -> list[bytes]:
    out = [b'data: {"choices":[{"text":"t"}]}\n\n' for _ in range(tokens)]
    usage = {"prompt_tokens": prompt, "completion_tokens": tokens, "prompt_tokens_details": {"cached_tokens": cached}}
    out.append(b'data: {"choices":[],"usage":' + orjson.dumps(usage) + b"}\n\ndata: [DONE]\n\n")
    return out


async def test_a_streamed_request_moves_every_per_request_metric_in_both_sets(
        pool: tuple[EppServer, list[SimulatedServer]]) -> None:
    server, _ = pool
    body = completion()
    before = await scrape(server)
    assert before("llm_d_epp_request_total") == 0

    async def while_streaming() -> None:
        mid = await scrape(server)
        assert mid("llm_d_epp_request_running", **LLMD) == 1
        assert mid("inference_objective_running_requests", model_name=MODEL) == 1

    pick = await stream_request(server, body, sse(3, prompt=51, cached=32), TENANT, mid=while_streaming)
    m = await scrape(server)
    assert m("inference_objective_request_total", **LEGACY, priority="5") == 1
    assert m("llm_d_epp_request_total", **LLMD) == 1
    for legacy, llmd, value in (
            ("inference_objective_request_sizes_sum", "llm_d_epp_request_size_bytes_sum", len(body)),
            ("inference_objective_input_tokens_sum", "llm_d_epp_request_input_tokens_sum", 51),
            ("inference_objective_output_tokens_sum", "llm_d_epp_request_output_tokens_sum", 3),
            ("inference_objective_prompt_cached_tokens_sum", "llm_d_epp_request_cached_tokens_sum", 32),
            ("inference_objective_request_duration_seconds_count", "llm_d_epp_request_duration_seconds_count", 1),
            ("inference_objective_normalized_time_per_output_token_seconds_count",
             "llm_d_epp_request_ntpot_seconds_count", 1),
            ("inference_objective_request_tpot_seconds_count", "llm_d_epp_request_streaming_tpot_seconds_count", 1),
            ("inference_objective_request_ttft_seconds_count", "llm_d_epp_request_ttft_seconds_count", 1)):
        assert m(legacy, **LEGACY) == value, legacy
        assert m(llmd, **LLMD) == value, llmd
    assert m("llm_d_epp_request_ttft_seconds_count", **LLMD, streaming="true") == 1
    assert m("inference_objective_response_sizes_sum", **LEGACY) == sum(map(len, sse(3, 51, 32)))
    assert m("llm_d_epp_response_size_bytes_count", **LLMD) == 1
    # Four chunks (three tokens, then the usage): three gaps of about `pause`.
    assert m("llm_d_epp_request_streaming_itl_seconds_count", **LLMD) == 3
    assert 0.045 <= m("llm_d_epp_request_streaming_itl_seconds_sum", **LLMD) < 2.0
    assert m("llm_d_epp_request_running", **LLMD) == 0
    assert m("inference_objective_running_requests", model_name=MODEL) == 0
    e2e = m("llm_d_epp_request_duration_seconds_sum", **LLMD)
    assert m("llm_d_epp_request_ntpot_seconds_sum", **LLMD) == pytest.approx(e2e / 3)
    # The scheduler: end to end, and the attempt with the endpoint it picked.
    assert m("inference_extension_scheduler_e2e_duration_seconds_count") == 1
    assert m("llm_d_epp_scheduler_e2e_duration_seconds_count") == 1
    assert m("inference_extension_scheduler_attempts_total", status="success", pod_name=pick) == 1
    assert m("llm_d_epp_scheduler_attempts_total", status="success", endpoint_name=pick,
             port=pick.rsplit(":", 1)[1]) == 1


async def test_errors_are_counted_by_code_under_both_names(pool: tuple[EppServer, list[SimulatedServer]]) -> None:
    server, _ = pool
    s = Stream(server)
    s.send(headers_msg(extra=TENANT), body_msg(b'{"prompt": "no model"}'))
    answers = await s.rest()
    assert answers[-1].immediate_response.status.code == 400
    await stream_request(server, completion(), [b'{"error": "boom"}'], TENANT, status=500)
    m = await scrape(server)
    assert m("inference_objective_request_error_total", error_code="BadRequest") == 1
    assert m("llm_d_epp_request_error_total", error_code="BadRequest", fairness_id="tenant-a") == 1
    assert m("inference_objective_request_error_total", **LEGACY, error_code="ModelServerError") == 1
    assert m("llm_d_epp_request_error_total", **LLMD, error_code="ModelServerError") == 1
    assert m("llm_d_epp_request_running") == 0


async def test_pool_gauges_follow_the_servers_own_load(pool: tuple[EppServer, list[SimulatedServer]]) -> None:
    server, sims = pool
    slow = sims[0]
    # Three requests straight to the slow server (it runs one at a time): 1 running, 2 waiting there.
    async with httpx.AsyncClient(timeout=60) as client:
        url = f"http://127.0.0.1:{slow.port}/v1/completions"
        model = slow.cfg.models[0]
        tasks = [asyncio.create_task(client.post(url, json={"model": model, "prompt": "p" * 400, "max_tokens": 500}))
                 for _ in range(3)]
        try:
            await until(lambda: slow.engine.num_waiting == 2 and slow.engine.num_running == 1, 10,
                        "the slow server to queue two")

            async def gauges() -> Scrape:
                return await scrape(server)

            name = server.metrics.pool_name
            m = await gauges()
            deadline = asyncio.get_running_loop().time() + 10
            while m("llm_d_epp_average_queue_size", name=name) != pytest.approx(2 / 3):
                assert asyncio.get_running_loop().time() < deadline, m.text[-2000:]
                await asyncio.sleep(0.05)
                m = await gauges()
            assert m("inference_pool_average_queue_size", name=name) == pytest.approx(2 / 3)
            assert m("llm_d_epp_std_dev_queue_size", name=name) == pytest.approx(0.9428, abs=1e-3)
            assert m("inference_pool_average_running_requests", name=name) == pytest.approx(1 / 3)
            assert m("llm_d_epp_std_dev_running_requests", name=name) == pytest.approx(0.4714, abs=1e-3)
            assert m("llm_d_epp_average_kv_cache_utilization", name=name) > 0
            assert m("llm_d_epp_std_dev_kv_cache_utilization", name=name) > 0
            assert m("inference_pool_ready_pods", name=name) == 3
            assert m("llm_d_epp_ready_endpoints", name=name) == 3
            slow_name = f"127.0.0.1:{slow.port}"
            assert m("inference_pool_per_pod_queue_size", name=name, model_server_pod=slow_name) == 2
            assert m("llm_d_epp_per_endpoint_queue_size", name=name, model_server_endpoint=slow_name) == 2
            assert m("llm_d_epp_per_endpoint_queue_size", name=name) == 2  # the others have none
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


async def test_the_prefix_index_size_grows_with_picks(pool: tuple[EppServer, list[SimulatedServer]]) -> None:
    server, _ = pool
    assert (await scrape(server))("inference_extension_prefix_indexer_size") == 0
    await stream_request(server, completion("a long shared prompt " * 40), sse(1, 200, 0), TENANT)
    await until(lambda: server.metrics.prefix_indexer_size._value.get() > 0, 5, "the index size to be published")
    assert (await scrape(server))("inference_extension_prefix_indexer_size") > 0


async def test_each_plugin_run_and_the_picks_prefix_match_are_recorded(
        pool: tuple[EppServer, list[SimulatedServer]]) -> None:
    """Real requests through the default profile: every filter, scorer, picker and PreRequest hook is timed
    per run, and the second request with the same prompt finds its whole prefix on the endpoint picked."""
    server, _ = pool
    prompt = "a long shared prompt that fills several blocks " * 20
    first = await stream_request(server, completion(prompt), sse(1, 200, 0), TENANT)
    second = await stream_request(server, completion(prompt), sse(1, 200, 0), TENANT)
    assert first == second
    s = await scrape(server)
    runs = {(ls["extension_point"], ls["plugin_type"]): v for n, ls, v in s.samples
            if n == "llm_d_epp_plugin_duration_seconds_count"}
    assert runs[("Scorer", "prefix-cache-scorer")] == 2
    assert runs[("Picker", "max-score-picker")] == 2
    assert runs[("PreRequest", "approx-prefix-cache-producer")] == 2  # the index learning each pick
    assert all(v == 2 for v in runs.values()), runs
    legacy = {(ls["extension_point"], ls["plugin_type"]): v for n, ls, v in s.samples
              if n == "inference_extension_plugin_duration_seconds_count"}
    assert legacy == runs
    assert s("llm_d_epp_plugin_duration_seconds_sum") > 0
    prefix = {"plugin_type": "approx-prefix-cache-producer"}
    assert s("llm_d_epp_prefix_indexer_hit_ratio_count", **prefix) == 2
    assert s("llm_d_epp_prefix_indexer_hit_ratio_sum", **prefix) == 1.0  # none, then all of it
    assert s("inference_extension_prefix_indexer_hit_ratio_bucket", le="0.0") == 1
    assert s("inference_extension_prefix_indexer_hit_bytes_sum") >= len(prompt) - 64


async def test_recorders_the_request_path_calls_land_on_the_endpoint(
        pool: tuple[EppServer, list[SimulatedServer]]) -> None:
    """What the director, the scheduler and the transports record, as they record it (the index size is
    republished every refresh interval: test_the_prefix_index_size_grows_with_picks)."""
    server, _ = pool
    m = server.metrics
    m.prefix_match("prefix-cache-scorer", "prefix-cache-scorer", 768, 1024)
    m.plugin_ran("Scorer", "queue-scorer", "queue-scorer", 0.0003)
    m.request_processed(0.002)
    m.rewritten("canary", parse_body(new_request("/v1/completions", {}), completion()))
    s = await scrape(server)
    prefix = {"plugin_name": "prefix-cache-scorer", "plugin_type": "prefix-cache-scorer"}
    assert s("llm_d_epp_prefix_indexer_hit_ratio_sum", **prefix) == 0.75
    assert s("inference_extension_prefix_indexer_hit_ratio_count") == 1
    assert s("llm_d_epp_prefix_indexer_hit_bytes_sum", **prefix) == 768
    assert s("inference_extension_prefix_indexer_hit_bytes_sum") == 768
    plugin = {"extension_point": "Scorer", "plugin_type": "queue-scorer", "plugin_name": "queue-scorer"}
    assert s("inference_extension_plugin_duration_seconds_count", **plugin) == 1
    assert s("llm_d_epp_plugin_duration_seconds_count", **plugin) == 1
    assert s("llm_d_epp_request_processing_duration_seconds_count") == 1
    assert s("inference_extension_model_rewrite_decisions_total", model_rewrite_name="canary") == 1
    assert s("llm_d_epp_model_rewrite_decisions_total", model_rewrite_name="canary") == 1
    assert s("inference_extension_info") == 1
    assert s("llm_d_epp_info") == 1


async def test_flow_control_metrics_move_with_the_queue(pool: tuple[EppServer, list[SimulatedServer]]) -> None:
    server, _ = pool
    saturation = [1.5]
    fc = FlowController(FlowControlConfig(default_request_ttl=0.3), lambda: saturation[0], lambda: 3,
                        metrics=server.metrics, pool_name=server.metrics.pool_name)
    req = parse_body(new_request("/v1/completions", TENANT), completion())
    req.priority = 5
    waiting = asyncio.create_task(fc.admit(req))
    await until(lambda: fc.count == 1, 2, "the request queued")
    flow = {"fairness_id": "tenant-a", "priority": "5", "inference_pool": server.metrics.pool_name, **LEGACY}
    s = await scrape(server)
    assert s("llm_d_epp_flow_control_queue_size", **flow) == 1
    assert s("inference_extension_flow_control_queue_size", **flow) == 1
    assert s("llm_d_epp_flow_control_queue_bytes", **flow) == len(req.body)
    assert s("inference_extension_flow_control_queue_bytes", **flow) == len(req.body)
    assert s("llm_d_epp_flow_control_request_enqueue_duration_seconds_count", fairness_id="tenant-a") == 1
    with pytest.raises(FlowControlError):
        await waiting  # its TTL ran out
    saturation[0] = 0.2
    await fc.admit(req)
    s = await scrape(server)
    assert s("llm_d_epp_flow_control_queue_size", **flow) == 0
    assert s("inference_extension_flow_control_queue_bytes", **flow) == 0
    assert s("llm_d_epp_flow_control_requests_total", outcome="EvictedTTL", priority="5") == 1
    assert s("llm_d_epp_flow_control_requests_total", outcome="Dispatched", priority="5") == 1
    assert s("llm_d_epp_flow_control_request_queue_duration_seconds_count", outcome="EvictedTTL", **flow) == 1
    assert s("inference_extension_flow_control_request_queue_duration_seconds_sum", outcome="EvictedTTL") >= 0.3
    assert s("llm_d_epp_flow_control_request_queue_duration_seconds_count", outcome="Dispatched") == 1
    # A capacity signal runs a dispatch cycle; the pool is still saturated, so the request stays.
    saturation[0] = 2.0
    blocked = asyncio.create_task(fc.admit(req))
    await until(lambda: fc.count == 1, 2, "the request queued")
    fc.capacity_changed()
    await until(lambda: server.metrics.llmd_fc_dispatch_cycle._sum.get() > 0, 2, "a dispatch cycle")
    s = await scrape(server)
    assert s("llm_d_epp_flow_control_dispatch_cycle_duration_seconds_count") >= 1
    assert s("inference_extension_flow_control_dispatch_cycle_duration_seconds_count") >= 1
    assert s("llm_d_epp_flow_control_pool_saturation", stage="effective") == 2.0
    assert s("inference_extension_flow_control_pool_saturation", stage="effective") == 2.0
    fc.close()
    await asyncio.gather(blocked, return_exceptions=True)


async def test_client_supplied_label_values_are_capped_and_cut(pool: tuple[EppServer, list[SimulatedServer]]) -> None:
    server, _ = pool
    m = server.metrics
    assert m.models.limit == m.fairness_ids.limit == MAX_LABEL_VALUES
    m.models.limit = m.fairness_ids.limit = 3  # the same cap, smaller, to keep the exposition short
    for i in range(6):
        r = parse_body(new_request("/v1/completions", {"x-llm-d-inference-fairness-id": f"t{i}"}),
                       completion(model=f"model-{i}"))
        m.picked(r, 10)
        m.finished(r, Usage(), 0.0)
    s = await scrape(server)
    models = {ls["model_name"] for n, ls, _ in s.samples if n == "llm_d_epp_request_total"}
    assert models == {"model-0", "model-1", "model-2", OVERFLOW_LABEL}
    assert s("llm_d_epp_request_total", model_name=OVERFLOW_LABEL) == 3
    assert s("inference_objective_request_total", model_name=OVERFLOW_LABEL) == 3
    assert s("llm_d_epp_request_running", model_name=OVERFLOW_LABEL) == 0  # +1 and -1 land on the same series
    fairness = {ls["fairness_id"] for n, ls, _ in s.samples if n == "llm_d_epp_request_total"}
    assert fairness == {"t0", "t1", "t2", OVERFLOW_LABEL}


def test_a_bounded_label_keeps_what_it_admitted_and_pins_configured_names() -> None:
    label = BoundedLabel(limit=2)
    assert [label("a"), label("b"), label("c"), label("a")] == ["a", "b", OVERFLOW_LABEL, "a"]
    label.pin("canary")
    assert label("canary") == "canary"
    assert label("y" * 500) == OVERFLOW_LABEL
    assert len(BoundedLabel()("z" * 500)) == MAX_LABEL_LENGTH


def test_observing_many_values_at_once_counts_as_observing_each() -> None:
    from prometheus_client import CollectorRegistry, Histogram

    reg = CollectorRegistry()
    one = Histogram("one", "h", buckets=(0.01, 0.1, 1.0), registry=reg)
    many = Histogram("many", "h", buckets=(0.01, 0.1, 1.0), registry=reg)
    values = [0.0, 0.005, 0.01, 0.0100001, 0.1, 0.5, 1.0, 3.0, 0.01]
    for v in values:
        one.observe(v)
    observe_all(many, values)
    got = {(s.name.replace("many", "one"), tuple(sorted(s.labels.items())), s.value)
           for fam in reg.collect() if fam.name == "many" for s in fam.samples if not s.name.endswith("_created")}
    want = {(s.name, tuple(sorted(s.labels.items())), s.value)
            for fam in reg.collect() if fam.name == "one" for s in fam.samples if not s.name.endswith("_created")}
    assert got == want
