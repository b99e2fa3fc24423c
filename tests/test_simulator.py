"""The simulator's engine behaves like vLLM where routing quality depends on it.

Durations are read from the engine's modelled clock (what the latency model says),
so these tests do not depend on the machine's speed; time_scale 0 runs them instantly.
"""

from __future__ import annotations

import asyncio

import pytest

from epp.simulator.engine import Engine, EngineConfig

MODEL = "meta-llama/Llama-3.1-8B-Instruct"


def engine(**kw) -> Engine:
    return Engine(EngineConfig(time_scale=0.0, **kw))


async def run(e: Engine, prompt: str, max_tokens: int = 4, model: str = MODEL):
    seq = e.submit(model, prompt, max_tokens)
    while await seq.tokens.get() is not None:
        pass
    return seq


async def test_prefix_cache_skips_prefill_of_cached_blocks() -> None:
    e = engine()
    doc = "lorem ipsum dolor sit amet " * 600  # ~4000 tokens
    cold = await run(e, doc + "question one?")
    warm = await run(e, doc + "question two?")
    assert cold.cached_tokens == 0
    assert warm.cached_tokens >= 0.95 * warm.prompt_tokens
    cold_ttft = cold.first_token_clock - cold.submit_clock
    warm_ttft = warm.first_token_clock - warm.submit_clock
    assert cold_ttft > 90  # ~4000 tokens at 0.0255 ms each (measured H100 figure)
    assert warm_ttft < cold_ttft / 8
    assert e.prefix_hits == warm.cached_tokens


async def test_decode_steps_slow_down_with_batch_and_context() -> None:
    c = EngineConfig()
    assert c.step_ms(1, 512, 0, 0) == pytest.approx(6.5, abs=0.1)  # measured 6.52
    assert c.step_ms(128, 128 * 2048, 0, 0) == pytest.approx(18.5, abs=0.6)  # measured 18.51
    assert c.step_ms(0, 0, 4096, 4096**2) == pytest.approx(106, rel=0.06)  # measured 106.4


async def test_batch_limit_queues_requests() -> None:
    e = engine(max_num_seqs=2)
    seqs = [e.submit(MODEL, f"prompt {i} " * 50, 20) for i in range(5)]
    await asyncio.sleep(0)
    e._admit()
    assert e.num_running == 2
    assert e.num_waiting == 3
    for s in seqs:
        while await s.tokens.get() is not None:
            pass
    assert e.num_running == e.num_waiting == 0


async def test_lru_eviction_when_the_cache_is_full() -> None:
    e = engine(num_gpu_blocks=300)  # 4800 tokens
    a = "alpha beta gamma delta " * 400  # ~2300 tokens
    await run(e, a)
    for i in range(3):  # push a out
        await run(e, f"filler {i} " * 1200)
    again = await run(e, a)
    assert again.cached_tokens == 0
    assert len(e.cache) <= 300


async def test_lora_slots_and_load_cost() -> None:
    e = engine(max_lora=1, lora_adapters=["a", "b"])
    first = await run(e, "x " * 100, model="a")
    second = await run(e, "y " * 100, model="a")
    assert list(e.active_loras) == ["a"]
    t_first = first.first_token_clock - first.submit_clock
    t_second = second.first_token_clock - second.submit_clock
    assert t_first - t_second == pytest.approx(e.cfg.lora_load_ms, abs=1.0)
    await run(e, "z " * 100, model="b")
    assert list(e.active_loras) == ["b"]  # one slot: a was unloaded


def test_oversized_request_is_refused() -> None:
    e = Engine(EngineConfig(num_gpu_blocks=10))
    with pytest.raises(ValueError, match="KV blocks"):
        e.submit(MODEL, "x " * 1000, 10)


async def test_kv_usage_counts_a_shared_prefix_once_and_idle_cache_as_free() -> None:
    """vLLM's kv_cache_usage_perc is blocks in use / all blocks: sequences sharing a cached prefix hold
    its blocks once, and cached blocks that no running sequence uses are free (evictable)."""
    e = engine(num_gpu_blocks=1000, max_num_seqs=8)
    doc = "lorem ipsum dolor sit amet " * 300  # ~2000 tokens: ~126 blocks of 16
    await run(e, doc + "warm the cache")
    assert e.kv_usage == 0.0  # cached, not in use
    assert len(e.cache) > 100
    seqs = [e.submit(MODEL, doc + f"question {i}?", 4) for i in range(4)]
    await asyncio.sleep(0)
    e._admit()
    assert e.num_running == 4
    prompt_blocks = -(-seqs[0].prompt_tokens // 16)
    # One copy of the prefix plus each sequence's own last block(s), not four copies.
    assert prompt_blocks / 1000 <= e.kv_usage < (prompt_blocks + 4 * 2) / 1000
    for s in seqs:
        while await s.tokens.get() is not None:
            pass
    assert e.kv_usage == 0.0


# --- KV-cache events -------------------------------------------------------------


def recording(**kw):
    from epp.kvevents.events import Event

    e = engine(**kw)
    got: list[list[Event]] = []
    e.events = got.append
    return e, got


async def test_kv_events_report_stores_evictions_and_resets_as_vllm_does() -> None:
    from epp.kvevents.events import AllBlocksCleared, BlockRemoved, BlockStored
    from epp.kvevents.hashing import simulator_token_ids

    e, got = recording(num_gpu_blocks=16)
    doc = "a" * (16 * 4 * 3)  # exactly 3 blocks of 16 tokens
    await run(e, doc + "tail")
    (first,) = got.pop()
    assert isinstance(first, BlockStored)
    assert first.block_hashes == list(e.cache)
    assert first.parent_block_hash is None
    assert first.token_ids == simulator_token_ids(doc)
    assert first.block_size == 16
    assert first.medium == "GPU"
    # The same prefix, longer: only the new block is stored, chained on the last cached one.
    await run(e, doc + "b" * 64)
    (second,) = got.pop()
    assert isinstance(second, BlockStored)
    assert second.parent_block_hash == first.block_hashes[-1]
    assert len(second.block_hashes) == 1
    # A prompt that needs the room (6 blocks cached, 7 held while it runs) evicts the oldest block.
    await run(e, "c" * (16 * 4 * 6))
    stored, removed = got.pop()
    assert isinstance(stored, BlockStored)
    assert len(stored.block_hashes) == 6
    assert removed == BlockRemoved([first.block_hashes[0]])
    assert first.block_hashes[0] not in e.cache
    e.reset_prefix_cache()
    assert got.pop() == [AllBlocksCleared()]
    assert not e.cache


async def test_a_token_id_prompt_is_cached_by_its_ids() -> None:
    e, got = recording()
    ids = list(range(1000, 1040))  # 2 full blocks and 8 tokens
    seq = e.submit(MODEL, "ignored", 2, token_ids=ids)
    while await seq.tokens.get() is not None:
        pass
    assert seq.prompt_tokens == 40
    (stored,) = got.pop()
    assert stored.token_ids == ids[:32]
    again = e.submit(MODEL, "", 2, token_ids=[*ids[:32], 1])
    assert again.blocks[:2] == seq.blocks[:2]


async def test_lora_blocks_name_their_adapter() -> None:
    e, got = recording(lora_adapters=["ad"])
    await run(e, "x" * 64, model="ad")
    (stored,) = got.pop()
    assert stored.lora_name == "ad"
    assert stored.lora_id == 1


def test_kv_events_config_is_vllms_json() -> None:
    from epp.simulator.kv_publisher import parse_kv_events_config

    cfg = parse_kv_events_config('{"enable_kv_cache_events": true, "publisher": "zmq", '
                                 '"endpoint": "tcp://127.0.0.1:5557", "topic": "kv@pod@m", "buffer_steps": 10}')
    assert cfg is not None
    assert (cfg.endpoint, cfg.topic) == ("tcp://127.0.0.1:5557", "kv@pod@m")
    assert parse_kv_events_config('{"publisher": "null"}') is None
    for bad in ('{"publisher": "nats"}', '{"endpoint": "x", "colour": 1, "publisher": "zmq"}',
                '{"publisher": "zmq", "replay_endpoint": "tcp://*:5558"}', "[1]", "{"):
        with pytest.raises(ValueError):  # noqa: PT011
            parse_kv_events_config(bad)


async def test_a_simulator_publishes_its_cache_over_zmq() -> None:
    """A request to the server; a subscriber sees its blocks under the token keys a request would have."""
    import httpx

    from epp.kvevents.hashing import block_keys, root_key, simulator_token_ids
    from epp.kvevents.index import BlockIndex
    from epp.kvevents.subscriber import Subscriber
    from epp.simulator.kv_publisher import KVEventsConfig
    from epp.simulator.server import SimulatedServer
    from epp.stack import free_ports
    from tests.helpers import until

    http_port, zmq_port = free_ports(2)
    sim = SimulatedServer("s", http_port, EngineConfig(time_scale=0.0),
                          kv_events=KVEventsConfig(f"tcp://127.0.0.1:{zmq_port}"))
    await sim.start()
    sub = Subscriber(BlockIndex())
    pod = f"127.0.0.1:{http_port}"
    try:
        sub.add("central", f"tcp://127.0.0.1:{zmq_port}")
        prompt = "a shared system prompt, long enough for blocks. " * 8
        keys = block_keys(root_key(MODEL), simulator_token_ids(prompt), 16)
        # Events sent before the subscriber joins are lost (ZMQ PUB): probe with resets until one arrives.
        def joined() -> bool:
            sim.engine.reset_prefix_cache()
            return sub.index.publishes(pod)

        await until(joined, what="the subscriber to join")
        async with httpx.AsyncClient(base_url=f"http://{pod}") as client:
            r = await client.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 1})
            r.raise_for_status()
            await until(lambda: sub.index.match(keys, [pod]) == {pod: len(keys)}, what="the blocks")
            await client.post("/reset_prefix_cache")
            await until(lambda: sub.index.blocks(pod) == 0, what="the reset")
    finally:
        sub.close()
        await sim.stop()


async def test_a_simulator_restarted_at_once_binds_its_kv_events_address_again() -> None:
    """ZMQ frees a closed socket's address a moment later, in its own thread, and later still while a
    subscriber is connected: a server started again straight away on the same address (the
    benchmark's next run, a restart) must still start. Without the retried bind about one restart
    in ten failed with EADDRINUSE."""
    import zmq

    from epp.simulator.kv_publisher import KVEventsConfig
    from epp.simulator.server import SimulatedServer
    from epp.stack import free_ports
    from tests.helpers import until

    endpoint = f"tcp://127.0.0.1:{free_ports(1)[0]}"
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.setsockopt(zmq.LINGER, 0)
    sub.connect(endpoint)
    try:
        for _ in range(30):
            sim = SimulatedServer("s", free_ports(1)[0], EngineConfig(time_scale=0.0),
                                  kv_events=KVEventsConfig(endpoint))
            await sim.start()

            def heard(sim: SimulatedServer = sim) -> bool:  # connected once a batch reaches it
                sim.engine.reset_prefix_cache()
                try:
                    sub.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    return False
                return True

            await until(heard, what="the subscriber to connect")
            await sim.stop()
    finally:
        sub.close()


def test_several_servers_of_one_process_publish_on_consecutive_ports() -> None:
    from epp.simulator.kv_publisher import offset_endpoint

    assert [offset_endpoint("tcp://*:5557", i) for i in range(3)] == ["tcp://*:5557", "tcp://*:5558", "tcp://*:5559"]


def test_the_publisher_binds_or_connects_by_the_endpoints_form_as_vllm() -> None:
    from epp.simulator.kv_publisher import parse_kv_events_config, server_config

    def cfg(endpoint: str) -> bool:
        parsed = parse_kv_events_config(f'{{"publisher": "zmq", "endpoint": "{endpoint}"}}')
        assert parsed is not None
        return parsed.bind

    assert [cfg(e) for e in ("tcp://*:5557", "tcp://0.0.0.0:5557", "tcp://[::]:5557", "ipc:///tmp/kv")] == [True] * 4
    assert [cfg(e) for e in ("tcp://epp.default.svc:5557", "tcp://127.0.0.1:5557")] == [False] * 2
    central = parse_kv_events_config('{"publisher": "zmq", "endpoint": "tcp://10.0.0.9:5557"}')
    assert central is not None
    # several servers of one process all connect to the one central socket
    assert {server_config(central, i).endpoint for i in range(3)} == {"tcp://10.0.0.9:5557"}


async def test_the_simulator_command_publishes_with_vllms_flag() -> None:
    """`python -m epp.simulator --kv-events-config '{...}'` publishes its cache's blocks."""
    import json
    import subprocess
    import sys

    import httpx

    from epp.kvevents.index import BlockIndex
    from epp.kvevents.subscriber import Subscriber
    from epp.stack import free_ports
    from tests.helpers import until

    port, z = free_ports(2)
    cfg = json.dumps({"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": f"tcp://127.0.0.1:{z}"})
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "epp.simulator", "--ports", str(port), "--time-scale", "0", "--kv-events-config",
        cfg, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    sub = Subscriber(BlockIndex())
    try:
        sub.add("central", f"tcp://127.0.0.1:{z}", bind=True)  # vLLM's rule: a host endpoint is connected to
        pod = f"127.0.0.1:{port}"
        async with httpx.AsyncClient(base_url=f"http://{pod}") as client:
            async def up() -> bool:
                try:
                    return (await client.get("/health")).status_code == 200
                except httpx.TransportError:
                    return False

            deadline = asyncio.get_running_loop().time() + 60
            while not await up():
                if proc.returncode is not None or asyncio.get_running_loop().time() > deadline:
                    err = b"" if proc.stderr is None else await proc.stderr.read()
                    raise AssertionError(f"the simulator did not start: {err.decode()}")
                await asyncio.sleep(0.05)

            async def joined() -> bool:
                await client.post("/reset_prefix_cache")
                return sub.index.publishes(pod)

            while not await joined():
                assert asyncio.get_running_loop().time() < deadline, "no events from the simulator"
            r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "p" * 256, "max_tokens": 1})
            r.raise_for_status()
            await until(lambda: sub.index.blocks(pod) == 4, what="its 4 blocks")
    finally:
        sub.close()
        if proc.returncode is None:
            proc.terminate()
        await asyncio.wait_for(proc.wait(), 10)


async def test_the_render_endpoints_answer_in_vllms_shape_with_the_simulators_tokens() -> None:
    """What a `vllm launch render` sidecar answers: a list for completions, one object for a chat."""
    import httpx

    from epp.kvevents.hashing import simulator_token_ids
    from epp.simulator.server import SimulatedServer, prompt_text
    from epp.stack import free_ports

    port, = free_ports(1)
    sim = SimulatedServer("s", port, EngineConfig(time_scale=0.0))
    await sim.start()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            r = await client.post("/v1/completions/render", json={"model": MODEL, "prompt": ["ab", "abcdefgh"]})
            assert r.status_code == 200
            assert [x["token_ids"] for x in r.json()] == [simulator_token_ids("ab"), simulator_token_ids("abcdefgh")]
            chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi there"}]}
            r = await client.post("/v1/chat/completions/render", json=chat)
            assert r.json()["token_ids"] == simulator_token_ids(prompt_text("chat", chat))
            r = await client.post("/v1/completions/render", json={"model": "other", "prompt": "x"})
            assert r.status_code == 404
        assert sim.rendered == 2
        assert sim.engine.prefix_queries == 0  # rendering runs no model
    finally:
        await sim.stop()
