"""precise-prefix-cache-producer/-scorer: picks follow what servers report holding, over real ZMQ.

Simulators publish their prefix cache's events as vLLM does; epp subscribes to each pod's
publisher (llm-d's per-pod discovery: the pod's address and `socketPort`). Each simulator has
its own loopback address so all can publish on the same port, as pods do.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import httpx
import pytest

from epp.datastore import Endpoint
from epp.errors import ConfigError
from epp.scheduling import picker_config, registry
from epp.scheduling.framework import SchedulingResult
from epp.scheduling.params import Params
from epp.scheduling.plugins.precise_prefix_cache_producer import PrecisePrefixCacheProducer
from epp.scheduling.plugins.precise_prefix_cache_scorer import PrecisePrefixCacheScorer
from epp.scheduling.plugins.prefix_cache_scorer import PrefixCacheScorer
from epp.simulator.engine import EngineConfig
from epp.simulator.kv_publisher import KVEventsConfig
from epp.simulator.server import SimulatedServer
from epp.stack import free_ports
from tests.helpers import StartEpp, cycle_state, request, until

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
PROMPT = "You are a careful assistant. Answer briefly and cite sources. " * 6  # 5 full blocks of 16


# --- parameters ------------------------------------------------------------------

LLM_D_SAMPLE = {  # deploy/config/sim-epp-kvcache-config.yaml of llm-d-router
    "tokenProcessorConfig": {"blockSize": 16},
    "kvEventsConfig": {"zmqEndpoint": "tcp://127.0.0.1:5557"},
    "indexerConfig": {"kvBlockIndexConfig": {"enableMetrics": False, "metricsLoggingInterval": 60000000000}},
}


def test_llm_ds_parameters_load_and_those_without_effect_warn() -> None:
    params = Params("precise-prefix-cache-producer", {
        **LLM_D_SAMPLE,
        "kvEventsConfig": {"zmqEndpoint": "tcp://127.0.0.1:5557", "topicFilter": "kv@", "concurrency": 8,
                           "discoverPods": False, "podDiscoveryConfig": {"socketPort": 6000,
                                                                         "podLabelSelector": "app=vllm"}},
        "speculativeIndexing": False, "speculativeTTL": "2s",
    })
    p = registry.create("precise-prefix-cache-producer", "p", params)
    assert isinstance(p, PrecisePrefixCacheProducer)
    assert (p.zmq_endpoint, p.discover_pods, p.socket_port, p.block_size) == ("tcp://127.0.0.1:5557", False, 6000, 16)
    joined = " ".join(params.warnings)
    for key in ("concurrency", "podLabelSelector", "enableMetrics", "metricsLoggingInterval"):
        assert key in joined
    scorer = registry.create("precise-prefix-cache-scorer", "s", {"tokenProcessorConfig": {"blockSizeTokens": 64},
                                                                  "kvEventsConfig": {"discoverPods": True}})
    assert isinstance(scorer, PrecisePrefixCacheScorer)
    assert scorer.describe()["tokenProcessorConfig"]["blockSizeTokens"] == 64


@pytest.mark.parametrize(("params", "named"), [
    ({"indexerConfig": {"tokenizersPoolConfig": {"modelName": "x"}}}, "tokenizersPoolConfig"),
    ({"indexerConfig": {"kvBlockIndexConfig": {"redisConfig": {"address": "r:6379"}}}}, "redisConfig"),
    ({"indexerConfig": {"kvCacheBackendConfigs": [{"name": "cpu", "weight": 0.8}]}}, "kvCacheBackendConfigs"),
    ({"speculativeIndexing": True}, "speculativeIndexing"),
    ({"kvEventsConfig": {"engineType": "sglang"}}, "engineType"),
    ({"kvEventsConfig": {"zmqEndpoints": "typo"}}, "zmqEndpoints"),
    ({"tokenizer": "hf"}, "tokenizer"),
    ({"tokenProcessorConfig": {"hashAlgorithm": "md5"}}, "hashAlgorithm"),
])
def test_what_epp_cannot_honour_is_refused_by_name(params: dict[str, object], named: str) -> None:
    for t in ("precise-prefix-cache-producer", "precise-prefix-cache-scorer"):
        with pytest.raises(ConfigError, match=named):
            registry.create(t, "p", params)


def test_prefix_cache_scorer_names_the_precise_producer_as_in_llm_d() -> None:
    cfg = picker_config.load_text(f"""\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: precise-prefix-cache-producer
  parameters: {LLM_D_SAMPLE}
- type: prefix-cache-scorer
  parameters: {{prefixMatchInfoProducerName: precise-prefix-cache-producer}}
- type: precise-prefix-cache-scorer
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - {{pluginRef: prefix-cache-scorer, weight: 2}}
  - {{pluginRef: precise-prefix-cache-scorer}}
  - {{pluginRef: max-score-picker}}
""")
    split, legacy = (ws.scorer for ws in cfg.scheduler.profiles[0].scorers)
    assert isinstance(split, PrefixCacheScorer)
    assert isinstance(split.producer, PrecisePrefixCacheProducer)
    assert split.producer in cfg.scheduler.plugins
    assert legacy.producer is split.producer  # type: ignore[attr-defined]  # the legacy type defers to it


# --- behaviour over real ZMQ -----------------------------------------------------


@dataclass
class Pods:
    sims: list[SimulatedServer]
    endpoints: list[Endpoint]
    socket_port: int


@pytest.fixture
async def pods() -> AsyncIterator[Pods]:
    """Three simulators on 127.0.0.2-4; the first two publish KV events on one port, the third publishes none."""
    *ports, sock = free_ports(4)
    sims = []
    for i, port in enumerate(ports):
        host = f"127.0.0.{i + 2}"
        events = KVEventsConfig(f"tcp://{host}:{sock}") if i < 2 else None
        sims.append(SimulatedServer(f"sim{i}", port, EngineConfig(time_scale=0.0, num_gpu_blocks=24), host, events))
    for s in sims:
        await s.start()
    try:
        yield Pods(sims, [Endpoint(s.host, s.port) for s in sims], sock)
    finally:
        for s in sims:
            await s.stop()


async def joined(producer: PrecisePrefixCacheProducer, pods: Pods) -> None:
    """Until each publisher's subscriber has joined (ZMQ PUB drops what is sent before): probe with resets."""
    def all_joined() -> bool:
        for sim, ep in zip(pods.sims[:2], pods.endpoints[:2], strict=True):
            if not producer.events.publishes(ep.hostport):
                sim.engine.reset_prefix_cache()
        return all(producer.events.publishes(ep.hostport) for ep in pods.endpoints[:2])

    await until(all_joined, what="every publisher's subscriber to join")


async def send(sim: SimulatedServer, prompt: str, max_tokens: int = 1) -> None:
    async with httpx.AsyncClient(base_url=f"http://{sim.host}:{sim.port}") as client:
        r = await client.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": max_tokens})
        r.raise_for_status()


@pytest.fixture
def producer(pods: Pods) -> Iterator[PrecisePrefixCacheProducer]:
    p = PrecisePrefixCacheProducer("p", socket_port=pods.socket_port, tokenizer_kind="simulator")
    p.endpoints_changed(pods.endpoints, [])
    yield p
    p.close()


async def test_a_block_stored_on_a_pod_and_its_removal_move_the_score(pods: Pods,
                                                                    producer: PrecisePrefixCacheProducer) -> None:
    scorer = PrefixCacheScorer("s")
    scorer.producer = producer
    await joined(producer, pods)
    req = request(PROMPT, MODEL)
    assert scorer.score(cycle_state(), req, pods.endpoints) == [0.0, 0.0, 0.0]
    await send(pods.sims[1], PROMPT)  # straight to B: epp never sent it anything
    await until(lambda: scorer.score(cycle_state(), req, pods.endpoints)[1] == 1.0, what="B's blocks")
    assert scorer.score(cycle_state(), req, pods.endpoints)[0] == 0.0
    # B evicts the prompt's blocks for a long other one (24 blocks, 17 held while it runs): the score goes.
    await send(pods.sims[1], "z" * (16 * 4 * 17))
    await until(lambda: scorer.score(cycle_state(), req, pods.endpoints)[1] < 1.0, what="B's eviction")
    assert producer.events.stats.removed_blocks > 0


async def test_a_pod_that_publishes_nothing_is_scored_from_the_approximate_index(
        pods: Pods, producer: PrecisePrefixCacheProducer) -> None:
    await joined(producer, pods)
    c = pods.endpoints[2]
    st = cycle_state()
    req = request(PROMPT, MODEL)
    assert producer.matched_blocks(st, req, pods.endpoints) == {}
    producer.pre_request(st, req, SchedulingResult([c], pods.endpoints))  # epp sent it to C
    blocks = len(producer.hashes(cycle_state(), req))
    assert blocks == 5
    assert producer.matched_blocks(cycle_state(), req, pods.endpoints) == {c.hostport: 5}
    # A publisher is never guessed for: what it reports is what counts.
    producer.pre_request(cycle_state(), req, SchedulingResult([pods.endpoints[0]], pods.endpoints))
    assert producer.matched_blocks(cycle_state(), req, pods.endpoints) == {c.hostport: 5}


async def test_a_pod_that_leaves_is_dropped(pods: Pods, producer: PrecisePrefixCacheProducer) -> None:
    await joined(producer, pods)
    b = pods.endpoints[1]
    await send(pods.sims[1], PROMPT)
    await until(lambda: producer.events.blocks(b.hostport) == 5, what="B's blocks")
    producer.endpoints_changed([], [b])
    assert not producer.events.publishes(b.hostport)
    assert producer.events.blocks(b.hostport) == 0
    await until(lambda: b.hostport not in producer.subscriber.connected, what="the unsubscribe")


async def test_token_ids_in_the_request_need_no_tokenizer(pods: Pods) -> None:
    from epp.requests import new_request, parse_body

    p = PrecisePrefixCacheProducer("p", socket_port=pods.socket_port)  # tokenizer: request (the default)
    p.endpoints_changed(pods.endpoints, [])
    try:
        await joined(p, pods)
        ids = list(range(500, 580))  # 5 blocks
        async with httpx.AsyncClient(base_url=f"http://{pods.sims[0].host}:{pods.sims[0].port}") as client:
            r = await client.post("/v1/completions", json={"model": MODEL, "prompt": ids, "max_tokens": 1})
            r.raise_for_status()
        import orjson

        req = parse_body(new_request("/v1/completions", {}), orjson.dumps({"model": MODEL, "prompt": ids}))
        await until(lambda: p.matched_blocks(cycle_state(), req, pods.endpoints) == {pods.endpoints[0].hostport: 5},
                    what="A's blocks")
        # A text prompt: epp does not know the server's tokens, so only the approximate index answers.
        assert p.precise_keys(cycle_state(), request(PROMPT, MODEL)) is None
    finally:
        p.close()


async def test_a_running_epp_picks_the_pod_that_reports_the_prefix(pods: Pods, start_epp: StartEpp) -> None:
    """Through epp's ext_proc: B's stored blocks win the pick before epp sent B anything; when B evicts
    them, the pick moves to A, which holds them too."""
    from tests.extproc_messages import body_msg, completion, dest_header, exchange, headers_msg

    config = f"""\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: precise-prefix-cache-producer
  parameters:
    tokenProcessorConfig: {{blockSize: 16}}
    kvEventsConfig: {{discoverPods: true, podDiscoveryConfig: {{socketPort: {pods.socket_port}}}}}
    tokenizer: simulator
- type: prefix-cache-scorer
  parameters: {{prefixMatchInfoProducerName: precise-prefix-cache-producer}}
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - {{pluginRef: prefix-cache-scorer}}
  - {{pluginRef: max-score-picker}}
"""
    server = await start_epp(endpoints=[ep.hostport for ep in pods.endpoints], config_text=config,
                             max_body_bytes=1 << 20)
    producer = next(p for p in server.picker_config.scheduler.plugins if isinstance(p, PrecisePrefixCacheProducer))
    await joined(producer, pods)
    a, b, _ = pods.endpoints

    async def pick() -> str:
        out = await exchange(server, [headers_msg(), body_msg(completion(PROMPT, MODEL))], 2)
        return dest_header(out[1].request_body.response)

    await send(pods.sims[1], PROMPT)
    await until(lambda: producer.events.blocks(b.hostport) == 5, what="B's blocks")
    assert await pick() == b.hostport
    await send(pods.sims[0], PROMPT)
    await until(lambda: producer.events.blocks(a.hostport) == 5, what="A's blocks")
    await send(pods.sims[1], "z" * (16 * 4 * 17))  # B evicts the prompt's blocks
    await until(lambda: producer.events.match(producer.hashes(cycle_state(), request(PROMPT, MODEL)),
                                              [b.hostport]) == {}, what="B's eviction")
    assert await pick() == a.hostport


async def test_the_legacy_scorer_keeps_its_own_producer(pods: Pods) -> None:
    scorer = registry.create("precise-prefix-cache-scorer", "legacy", {
        "kvEventsConfig": {"podDiscoveryConfig": {"socketPort": pods.socket_port}}, "tokenizer": "simulator"})
    assert isinstance(scorer, PrecisePrefixCacheScorer)
    scorer.bind({}.get)
    own = scorer.producer
    assert isinstance(own, PrecisePrefixCacheProducer)
    scorer.endpoints_changed(pods.endpoints, [])  # its hooks reach its producer
    try:
        await joined(own, pods)
        await send(pods.sims[0], PROMPT)
        req = request(PROMPT, MODEL)
        await until(lambda: scorer.score(cycle_state(), req, pods.endpoints) == [1.0, 0.0, 0.0], what="A's blocks")
    finally:
        own.close()


async def test_stopping_epp_stops_the_event_subscriber_and_frees_its_socket(start_epp: StartEpp) -> None:
    """epp binds the central socket; a stopped epp lets go of it (a restart on the same port binds again)."""
    import zmq

    zmq_port = free_ports(1)[0]
    config = f"""
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: precise-prefix-cache-producer
  parameters:
    kvEventsConfig: {{zmqEndpoint: "tcp://127.0.0.1:{zmq_port}", discoverPods: false}}
- type: prefix-cache-scorer
  parameters: {{prefixMatchInfoProducerName: precise-prefix-cache-producer}}
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins: [{{pluginRef: prefix-cache-scorer}}, {{pluginRef: max-score-picker}}]
"""
    server = await start_epp(endpoints=["127.0.0.1:9"], config_text=config)
    producer = next(p for p in server.picker_config.scheduler.plugins if isinstance(p, PrecisePrefixCacheProducer))
    await until(lambda: "central" in producer.subscriber.connected, what="epp to bind the central socket")
    await server.stop(grace=0, drain=0)
    assert producer.subscriber._thread is not None
    assert not producer.subscriber._thread.is_alive()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.SUB)
    try:
        sock.bind(f"tcp://127.0.0.1:{zmq_port}")  # raises if epp still held it
    finally:
        sock.close(linger=0)
        ctx.term()
