"""token-producer: prompts rendered by a vLLM render endpoint (epp's simulator serves vLLM's), over
real HTTP, awaited before the cycle; failures and timeouts leave the request to the fallbacks.

The end-to-end layout is llm-d's: epp binds the central KV-events socket, the simulators connect to
it and publish, and a render sidecar tokenizes text prompts so the precise index matches them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import orjson
import pytest
from aiohttp import web

from epp.datastore import Endpoint
from epp.errors import ConfigError
from epp.kvevents.hashing import simulator_token_ids
from epp.requests import InferenceRequest, new_request, parse_body
from epp.scheduling import picker_config, registry
from epp.scheduling.framework import SchedulingResult, WeightedScorer
from epp.scheduling.params import Params
from epp.scheduling.plugins.max_score_picker import MaxScorePicker
from epp.scheduling.plugins.precise_prefix_cache_producer import PrecisePrefixCacheProducer
from epp.scheduling.plugins.prefix_cache_scorer import PrefixCacheScorer
from epp.scheduling.plugins.token_producer import TokenProducer, pack_bytes
from epp.scheduling.scheduler import Scheduler, SchedulingProfile
from epp.simulator.engine import EngineConfig
from epp.simulator.kv_publisher import KVEventsConfig
from epp.simulator.server import SimulatedServer, prompt_text
from epp.stack import free_ports
from tests.helpers import NOW, StartEpp, cycle_state, until

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
SYSTEM = "You are a careful assistant. Answer briefly and cite your sources when you can. " * 4


def chat(user: str, model: str = MODEL) -> InferenceRequest:
    body = {"model": model, "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]}
    return parse_body(new_request("/v1/chat/completions", {}), orjson.dumps(body))


def completion(prompt: object, model: str = MODEL) -> InferenceRequest:
    return parse_body(new_request("/v1/completions", {}), orjson.dumps({"model": model, "prompt": prompt}))


def create(params: dict[str, object], type_name: str = "token-producer") -> TokenProducer:
    p = registry.create(type_name, "tp", Params(type_name, params))
    assert isinstance(p, TokenProducer)
    return p


# --- parameters ----------------------------------------------------------------------

def test_the_vllm_backend_takes_upstreams_parameters_and_defaults() -> None:
    p = create({"modelName": MODEL})
    assert p.describe() == {"modelName": MODEL, "vllm": {"url": "http://localhost:8000", "timeout": "5s",
                                                         "mmTimeout": "30s"}}
    p = create({"modelName": MODEL, "vllm": {"url": "http://127.0.0.1:9000/", "timeout": "250ms",
                                             "mmTimeout": "2s"}})
    assert (p.backend, p.url, p.timeout, p.mm_timeout) == ("vllm", "http://127.0.0.1:9000", 0.25, 2.0)


def test_no_backend_is_the_estimate_and_the_legacy_name_is_accepted() -> None:
    assert create({}).backend == "estimate"
    assert create({"estimate": {}}).backend == "estimate"
    assert create({"modelName": MODEL}, type_name="tokenizer").backend == "vllm"


@pytest.mark.parametrize(("params", "error"), [
    ({"vllm": {"url": "http://x:8000"}}, "'modelName' must be specified"),
    ({"modelName": MODEL, "estimate": {}}, "only one of 'estimate' or 'vllm'"),
    ({"modelName": MODEL, "udsTokenizerConfig": {"socketFile": "/tmp/t.sock"}}, "udsTokenizerConfig"),
    ({"estimate": {"image": {"mode": "static"}}}, "estimate.image"),
    ({"modelName": MODEL, "vllm": {"url": "https://x:8000"}}, "plain http://"),
    ({"modelName": MODEL, "vllm": {"timeout": "soon"}}, "timeout"),
    ({"modelName": MODEL, "vllm": {"urls": "http://x"}}, "urls"),
])
def test_what_it_cannot_honour_is_refused_by_name(params: dict[str, object], error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        create(params)


def test_the_precise_producers_read_the_configs_token_producer() -> None:
    tp = create({})
    legacy = registry.create("precise-prefix-cache-scorer", "legacy", {})
    legacy.bind({"token-producer": tp}.get)
    assert isinstance(legacy.producer, PrecisePrefixCacheProducer)  # type: ignore[attr-defined]
    assert legacy.producer.token_source is tp  # type: ignore[attr-defined]
    alone = PrecisePrefixCacheProducer("p")
    alone.bind({}.get)
    assert alone.token_source is None  # none is created


def test_the_estimate_packs_four_bytes_a_token_as_upstream() -> None:
    assert pack_bytes(b"abcde") == [int.from_bytes(b"abcd", "little"), int.from_bytes(b"e\0\0\0", "little")]
    assert pack_bytes(b"") == []


async def test_the_estimate_backend_needs_no_service() -> None:
    p = create({})
    req = chat("hello")
    await p.prepare(req)
    assert p.token_ids(req) == pack_bytes(b"system" + SYSTEM.encode() + b"user" + b"hello")
    given = completion([5, 6, 7])
    await p.prepare(given)
    assert p.token_ids(given) == [5, 6, 7]  # ids the client sent pass through
    assert p.stats["estimated"] == 1
    assert p.stats["given"] == 1


# --- the vllm backend over real HTTP --------------------------------------------------------

@pytest.fixture
async def render() -> AsyncIterator[SimulatedServer]:
    """A render sidecar: epp's simulator serves vLLM's render endpoints with its tokenizer."""
    port, = free_ports(1)
    sim = SimulatedServer("render", port, EngineConfig(time_scale=0.0, models=[MODEL], lora_adapters=["sql-lora"]))
    await sim.start()
    yield sim
    await sim.stop()


def vllm(url: str, **extra: object) -> TokenProducer:
    return create({"modelName": MODEL, "vllm": {"url": url, **extra}})


async def test_chats_and_text_prompts_get_the_servers_token_ids(render: SimulatedServer) -> None:
    p = vllm(f"http://127.0.0.1:{render.port}")
    try:
        req = chat("what is a prefix cache?", model="sql-lora")  # the base model's name is what is sent
        await p.prepare(req)
        assert req.parsed is not None
        assert p.token_ids(req) == simulator_token_ids(prompt_text("chat", req.parsed))
        text = completion("Once upon a time " * 10)
        await p.prepare(text)
        assert p.token_ids(text) == simulator_token_ids("Once upon a time " * 10)
        assert p.stats["rendered"] == 2
        assert render.rendered == 2
        ep = Endpoint("127.0.0.1", 1)
        p.pre_request(cycle_state(), req, SchedulingResult([ep], [ep]))  # once picked, its ids are let go
        assert p.token_ids(req) is None
    finally:
        await p.aclose()


async def test_the_render_requests_are_vllms() -> None:
    """The exact bodies and paths, as llm-d-router's vllm_http.go sends them."""
    seen: list[tuple[str, dict[str, object]]] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append((request.path, orjson.loads(await request.read())))
        if request.path.endswith("/chat/completions/render"):
            return web.json_response({"request_id": "r", "token_ids": [1, 2, 3], "features": None})
        return web.json_response([{"request_id": "r", "token_ids": [4, 5]}])

    app = web.Application()
    app.add_routes([web.post("/v1/completions/render", handler), web.post("/v1/chat/completions/render", handler)])
    runner = web.AppRunner(app)
    await runner.setup()
    port, = free_ports(1)
    await web.TCPSite(runner, "127.0.0.1", port).start()
    p = vllm(f"http://127.0.0.1:{port}")
    try:
        c = chat("hi", model="alias")
        await p.prepare(c)
        t = completion("text", model="alias")
        await p.prepare(t)
        assert (p.token_ids(c), p.token_ids(t)) == ([1, 2, 3], [4, 5])
        assert c.parsed is not None
        assert seen == [("/v1/chat/completions/render", {**c.parsed, "model": MODEL}),
                        ("/v1/completions/render", {"model": MODEL, "prompt": "text"})]
        assert c.parsed["model"] == "alias"  # the request itself is not changed
    finally:
        await p.aclose()
        await runner.cleanup()


async def test_a_failed_render_leaves_the_request_to_the_fallback_and_is_counted(render: SimulatedServer) -> None:
    closed, = free_ports(1)
    p = vllm(f"http://127.0.0.1:{closed}")
    wrong = create({"modelName": "no-such-model", "vllm": {"url": f"http://127.0.0.1:{render.port}"}})
    try:
        req = chat("hi")
        await scheduler_with(p).prepare(req)  # never raises
        assert p.token_ids(req) is None
        assert p.stats["failed"] == 1
        await wrong.prepare(req)  # the render endpoint's 404
        assert (wrong.token_ids(req), wrong.stats["failed"]) == (None, 1)
    finally:
        await p.aclose()
        await wrong.aclose()


async def test_a_slow_render_times_out_without_blocking_the_loop() -> None:
    never = asyncio.Event()

    async def hang(request: web.Request) -> web.Response:
        await never.wait()
        return web.json_response({})

    app = web.Application()
    app.add_routes([web.post("/v1/chat/completions/render", hang)])
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    port, = free_ports(1)
    await web.TCPSite(runner, "127.0.0.1", port).start()
    p = vllm(f"http://127.0.0.1:{port}", timeout="200ms")
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    t = asyncio.create_task(ticker())
    try:
        req = chat("hi")
        await scheduler_with(p).prepare(req)
        assert p.token_ids(req) is None
        assert p.stats["timeouts"] == 1
        assert ticks > 5  # the loop ran other work while the render was pending
    finally:
        t.cancel()
        never.set()
        await p.aclose()
        await runner.cleanup()


def scheduler_with(*plugins: object) -> Scheduler:
    return Scheduler([SchedulingProfile("default", picker=MaxScorePicker("p"))], list(plugins))  # type: ignore[arg-type]


# --- llm-d's layout end to end: central socket bound by epp, render sidecar -----------------------

@dataclass
class Pool:
    sims: list[SimulatedServer]
    endpoints: list[Endpoint]
    zmq_port: int


@pytest.fixture
async def pool() -> AsyncIterator[Pool]:
    """Three model servers whose publishers connect to one central endpoint, as vLLM does with
    `--kv-events-config '{"endpoint": "tcp://<epp>:5557"}'`."""
    *ports, z = free_ports(4)
    sims = [SimulatedServer(f"sim{i}", port, EngineConfig(time_scale=0.0, num_gpu_blocks=64, models=[MODEL]),
                            kv_events=KVEventsConfig(f"tcp://127.0.0.1:{z}", bind=False))
            for i, port in enumerate(ports)]
    for s in sims:
        await s.start()
    try:
        yield Pool(sims, [Endpoint(s.host, s.port) for s in sims], z)
    finally:
        for s in sims:
            await s.stop()


def llm_d_scheduler(pool: Pool, render_url: str) -> tuple[Scheduler, PrecisePrefixCacheProducer, TokenProducer]:
    """sim-epp-kvcache-config.yaml's plugins: token-producer, precise producer, prefix-cache-scorer."""
    tp = vllm(render_url)
    producer = PrecisePrefixCacheProducer("precise", zmq_endpoint=f"tcp://127.0.0.1:{pool.zmq_port}",
                                          discover_pods=False)
    scorer = PrefixCacheScorer("prefix", producer_name="precise", shared=True)
    plugins = {"token-producer": tp, "precise": producer, "prefix": scorer}
    producer.bind(plugins.get)
    scorer.bind(plugins.get)
    profile = SchedulingProfile("default", scorers=[WeightedScorer(scorer, 1.0)], picker=MaxScorePicker("picker"))
    sched = Scheduler([profile], [tp, producer, scorer])
    producer.endpoints_changed(pool.endpoints, [])
    return sched, producer, tp


async def serve_chat(sim: SimulatedServer, user: str) -> None:
    async with httpx.AsyncClient(base_url=f"http://{sim.host}:{sim.port}") as client:
        body = {"model": MODEL, "max_tokens": 1,
                "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]}
        (await client.post("/v1/chat/completions", json=body)).raise_for_status()


async def test_picks_follow_events_from_servers_connected_to_epps_socket(pool: Pool, render: SimulatedServer) -> None:
    sched, producer, tp = llm_d_scheduler(pool, f"http://127.0.0.1:{render.port}")
    try:
        def all_joined() -> bool:
            for sim, ep in zip(pool.sims, pool.endpoints, strict=True):
                if not producer.events.publishes(ep.hostport):
                    sim.engine.reset_prefix_cache()
            return all(producer.events.publishes(ep.hostport) for ep in pool.endpoints)

        await until(all_joined, what="every server's publisher to reach epp's socket")
        await serve_chat(pool.sims[2], "first question")  # C caches the system prompt; epp sent it nothing
        await until(lambda: producer.events.blocks(pool.endpoints[2].hostport) > 0, what="C's blocks")
        for user in ("a second question", "a third, different question"):
            req = chat(user)
            await sched.prepare(req)
            assert tp.token_ids(req) is not None
            result, _ = sched.schedule(req, pool.endpoints, NOW, 2.0)
            assert result.endpoint == pool.endpoints[2]
            assert result.scores["prefix"][2] > 0.5
            assert result.scores["prefix"][:2] == [0.0, 0.0]
        # Without the render (the sidecar is down) a text chat has no precise keys: no pod scores from events.
        await render.stop()
        req = chat("a fourth question")
        await sched.prepare(req)
        assert tp.token_ids(req) is None
        assert tp.stats["failed"] == 1
        result, state = sched.schedule(req, pool.endpoints, NOW, 2.0)
        assert producer.precise_keys(state, req) is None
        assert result.scores["prefix"] == [0.0, 0.0, 0.0]
        sched.pre_request(state, req, SchedulingResult([result.endpoint], pool.endpoints))
    finally:
        producer.close()
        await tp.aclose()


# --- the configuration files and the running epp, once they call the token producer ------------

LLM_D_KVCACHE = """\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: token-producer
  parameters:
    modelName: {model}
    vllm: {{url: "{render}"}}
- type: precise-prefix-cache-producer
  parameters:
    tokenProcessorConfig: {{blockSize: 16}}
    kvEventsConfig: {{zmqEndpoint: "tcp://127.0.0.1:{zmq}", discoverPods: false}}
- type: prefix-cache-scorer
  parameters: {{prefixMatchInfoProducerName: precise-prefix-cache-producer}}
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - {{pluginRef: prefix-cache-scorer}}
  - {{pluginRef: max-score-picker}}
"""


def test_llm_ds_sample_config_loads_with_the_vllm_token_producer() -> None:
    cfg = picker_config.load_text(LLM_D_KVCACHE.format(model=MODEL, render="http://127.0.0.1:8000", zmq=5557), "t")
    producer = next(p for p in cfg.scheduler.plugins if isinstance(p, PrecisePrefixCacheProducer))
    assert isinstance(producer.token_source, TokenProducer)


# Through a running epp: the director awaits the token-producer before the cycle.
async def test_a_running_epp_tokenizes_chats_and_picks_the_pod_that_holds_them(
        pool: Pool, render: SimulatedServer, start_epp: StartEpp) -> None:
    from tests.extproc_messages import body_msg, dest_header, exchange, headers_msg

    config = LLM_D_KVCACHE.format(model=MODEL, render=f"http://127.0.0.1:{render.port}", zmq=pool.zmq_port)
    server = await start_epp(endpoints=[ep.hostport for ep in pool.endpoints], config_text=config,
                             max_body_bytes=1 << 20)
    producer = next(p for p in server.picker_config.scheduler.plugins if isinstance(p, PrecisePrefixCacheProducer))

    def all_joined() -> bool:
        for sim, ep in zip(pool.sims, pool.endpoints, strict=True):
            if not producer.events.publishes(ep.hostport):
                sim.engine.reset_prefix_cache()
        return all(producer.events.publishes(ep.hostport) for ep in pool.endpoints)

    await until(all_joined, what="every server's publisher to reach epp's socket")
    await serve_chat(pool.sims[1], "first question")
    await until(lambda: producer.events.blocks(pool.endpoints[1].hostport) > 0, what="B's blocks")
    body = orjson.dumps({"model": MODEL, "messages": [{"role": "system", "content": SYSTEM},
                                                      {"role": "user", "content": "another question"}]})
    out = await exchange(server, [headers_msg(path="/v1/chat/completions"), body_msg(body)], 2)
    assert dest_header(out[1].request_body.response) == pool.endpoints[1].hostport
