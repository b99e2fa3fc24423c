"""The rollout guide's operations through a real Envoy configured by `epp gateway` over xDS.

Each test runs a stream of requests while it edits the manifests live (the example manifests of
deploy/gateway-examples, as docs/rollouts.md shows them) and counts every request's outcome: none
may fail or be lost, and after each edit the traffic must follow it (a split within a binomial
tolerance of its weights, exactly when a weight is 0).
"""

from __future__ import annotations

import asyncio
import re
import time

import httpx
import pytest
from gateway_harness import Gateway, Load, Outcome, pools_of, scenario_files, wait_for, within

pytestmark = pytest.mark.integration

LLAMA = "meta-llama/Llama-3.1-8B-Instruct"
STEP = 150  # requests measured after each edit


def pool_of_pod(pod: str) -> str:
    return pod.rsplit("-", 1)[0]


def set_weights(text: str, *weights: int) -> str:
    """The route with its `weight:` fields, in order, set to `weights`."""
    it = iter(weights)
    out = re.sub(r"weight: \d+", lambda m: f"weight: {next(it)}", text)
    assert next(it, None) is None, "more weights than the route has"
    return out


def rewrite_weights(text: str, v1: int, v2: int) -> str:
    """The rollout's InferenceModelRewrite with these weights; a version at 0 is left out (a rewrite's
    weights are all given or none)."""
    text = set_weights(text, v1 or 1, v2 or 1)
    for name, w in (("food-review-v1", v1), ("food-review-v2", v2)):
        if not w:
            text = re.sub(rf"\n        - modelRewrite: {name}\n          weight: 1", "", text)
    return text


def completions(models: list[str], stream_every: int = 3) -> object:
    def body(i: int) -> dict[str, object]:
        b: dict[str, object] = {"model": models[i % len(models)], "prompt": f"request {i}: " + "tell me more " * 8,
                                "max_tokens": 4}
        if stream_every and i % stream_every == 0:  # long enough to be in flight across an edit
            b.update(stream=True, max_tokens=300)
        return b
    return body


async def step(gateway: Gateway, load: Load, change: object, shares: dict[str, float], n: int = STEP,
               pool_of: object = pool_of_pod) -> list[Outcome]:
    """Apply `change` while `load` runs; the requests started once it was applied, checked against `shares`."""
    st, seconds = await asyncio.to_thread(gateway.edit, change)
    applied = st["applied_at"]
    assert seconds < 1.0, f"the edit took {seconds:.2f} s to apply"
    done = await load.until_started_after(applied, n)
    seen = pools_of(done, pool_of)  # type: ignore[arg-type]
    for pool, share in shares.items():
        assert within(seen[pool], n, share), f"{dict(seen)} of {n} after the edit; expected {shares}"
    assert set(seen) <= set(shares), f"requests reached {dict(seen)}, expected only {set(shares)}"
    print(f"  edit applied in {seconds * 1000:.0f} ms, {load.in_flight_at(applied)} requests in flight at the "
          f"switch; then {dict(seen)}")
    return done


async def test_node_update_split_moves_live_and_rolls_back_without_losing_a_request(gateway: Gateway) -> None:
    files = scenario_files("node-update")
    route = files["routes-to-llm.yaml"]
    only_old = {k: v for k, v in files.items() if k != "pool-llm-new.yaml"}
    only_old["routes-to-llm.yaml"] = re.sub(r"\n        - name: llm-new\n(          .*\n){3}", "\n", route)
    assert "llm-new" not in only_old["routes-to-llm.yaml"].split("rules:")[1]
    await asyncio.to_thread(gateway.use, only_old)

    load = Load(gateway.url, completions(["food-review", LLAMA]), workers=6)
    runner = asyncio.create_task(load.run())
    try:
        await load.until_started_after(time.time(), 20)
        # The new pool and the 90/10 route in one edit: its clusters are in Envoy before a route names them.
        await step(gateway, load, lambda: gateway.put(files), {"llm": 0.9, "llm-new": 0.1})
        await step(gateway, load, lambda: gateway.write("routes-to-llm.yaml", set_weights(route, 50, 50)),
                   {"llm": 0.5, "llm-new": 0.5})
        await step(gateway, load, lambda: gateway.write("routes-to-llm.yaml", set_weights(route, 0, 100)),
                   {"llm-new": 1.0})
        # Roll back and retire llm-new in one edit, while its streams are still in flight.
        switch = time.time()
        await step(gateway, load, lambda: gateway.put(only_old), {"llm": 1.0})
        streams_cut_over = [o for o in load.outcomes if o.started < switch < o.ended and o.pod.startswith("llm-new")]
        wait_for(lambda: "default/llm-new" not in gateway.status()["pools"], 15, "llm-new to drain and go")
    finally:
        load.stop()
        await runner
    assert load.failures() == [], load.failures()[:5]
    print(f"  {len(load.outcomes)} requests, none failed; {len(streams_cut_over)} to llm-new in flight at its removal")
    assert streams_cut_over, "no request was in flight to the removed pool: the drain went untested"


async def test_base_model_update_keeps_adapters_and_objectives_on_both_pools(gateway: Gateway) -> None:
    st = await asyncio.to_thread(gateway.use, "base-model")
    pools = st["pools"]
    assert pools["default/llm-pool"]["objectives"] == pools["version-2/llm-pool-version-2"]["objectives"] == {
        "food-review": 10, "cad-fabricator": -1}
    route = gateway.read("routes-to-llm.yaml")
    models = ["food-review", "cad-fabricator", "llm"]
    load = Load(gateway.url, completions(models, stream_every=0), workers=6,
                headers=lambda i: {"x-gateway-inference-objective": models[i % 3]} if i % 3 < 2 else {})
    runner = asyncio.create_task(load.run())
    try:
        await load.until_started_after(time.time(), 30)
        for weights, shares in (((50, 50), {"llm-pool": 0.5, "llm-pool-version-2": 0.5}),
                                ((0, 100), {"llm-pool-version-2": 1.0}),
                                ((90, 10), {"llm-pool": 0.9, "llm-pool-version-2": 0.1})):
            done = await step(gateway, load,
                              lambda w=weights: gateway.write("routes-to-llm.yaml", set_weights(route, *w)), shares)
            for o in done:  # the alias resolves to each pool's own base model; the adapters are the same
                base = "Qwen/Qwen3-8B" if o.pod.startswith("llm-pool-version-2") else LLAMA
                assert o.model in ("food-review", "cad-fabricator", base), (o.pod, o.model)
            assert {o.model for o in done} >= {"food-review", "cad-fabricator"}
    finally:
        load.stop()
        await runner
    assert load.failures() == [], load.failures()[:5]


async def test_lora_adapter_update_moves_food_review_to_v2_in_steps(gateway: Gateway) -> None:
    await asyncio.to_thread(gateway.use, "lora-adapter")
    rollout = gateway.read("food-review-rollout.yaml")
    load = Load(gateway.url, completions(["food-review"], stream_every=0), workers=6)
    runner = asyncio.create_task(load.run())

    def version(o: Outcome) -> str:
        return o.model

    try:
        await load.until_started_after(time.time(), 20)
        for weights in ((50, 50), (0, 100), (100, 0)):
            st, seconds = await asyncio.to_thread(
                gateway.edit, lambda w=weights: gateway.write("food-review-rollout.yaml", rewrite_weights(rollout, *w)))
            assert seconds < 1.0
            done = await load.until_started_after(st["applied_at"], STEP)
            seen = {m: sum(o.model == m for o in done) for m in ("food-review-v1", "food-review-v2")}
            for m, share in zip(seen, (w / 100 for w in weights), strict=True):
                assert within(seen[m], STEP, share), f"{seen} after weights {weights}"
            print(f"  rewrite {weights} applied in {seconds * 1000:.0f} ms; then {seen}")
    finally:
        load.stop()
        await runner
    assert load.failures() == [], load.failures()[:5]
    assert {version(o) for o in load.outcomes} <= {"food-review-v1", "food-review-v2"}


async def test_two_models_routed_by_body_with_shedding_per_objective(gateway: Gateway) -> None:
    await asyncio.to_thread(gateway.use, "multi-model")
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as client:
        async def ask(model: str, objective: str | None = None) -> httpx.Response:
            headers = {"x-gateway-inference-objective": objective} if objective else {}
            return await client.post("/v1/completions", headers=headers,
                                     json={"model": model, "prompt": "what should I watch tonight?", "max_tokens": 3})

        for model, pool in (("chatbot", "gemma"), ("google/gemma-3-27b-it", "gemma"), ("recommender", "deepseek")):
            for _ in range(4):
                r = await ask(model)
                assert r.status_code == 200, r.text
                assert pool_of_pod(r.headers["x-simulator-pod"]) == pool
                assert r.json()["model"] == model
        # A model no route names, and a request without a body: the gateway's 404, in OpenAI's shape.
        r = await ask("mystery-model")
        assert r.status_code == 404
        assert r.json()["error"]["type"] == "NotFoundError"
        assert (await client.get("/v1/models")).status_code == 404

        # The recommender's only server stops reporting metrics: its pool counts as saturated.
        gateway.sim_control("127.0.13.11", {"metrics_status": 500})
        try:
            async def shed() -> bool:
                return (await ask("recommender", "recommender-batch")).status_code == 429
            deadline = asyncio.get_running_loop().time() + 10
            while not await shed():
                assert asyncio.get_running_loop().time() < deadline, "the saturated pool never shed"
            r = await ask("recommender", "recommender-batch")
            assert r.status_code == 429
            assert "saturated" in r.json()["error"]["message"]
            assert (await ask("recommender", "recommender")).status_code == 200  # priority 0: served
            assert (await ask("chatbot", "chatbot-batch")).status_code == 200  # another pool: unaffected
            assert (await ask("chatbot", "chatbot")).status_code == 200
        finally:
            gateway.sim_control("127.0.13.11", {"metrics_status": 200})


async def test_mirrored_pool_gets_a_copy_and_the_client_only_the_primary_answer(gateway: Gateway) -> None:
    await asyncio.to_thread(gateway.use, "mirroring")
    shadow, before = "127.0.14.11", gateway.sim_state("127.0.14.11")["served"]
    primary_before = sum(gateway.sim_state(h)["served"] for h in ("127.0.14.1", "127.0.14.2"))
    n = 30
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as client:
        for i in range(n):
            r = await client.post("/v1/completions", json={"model": LLAMA, "prompt": f"mirror me {i}", "max_tokens": 3})
            assert r.status_code == 200, r.text
            assert pool_of_pod(r.headers["x-simulator-pod"]) == "chat"
    wait_for(lambda: gateway.sim_state(shadow)["served"] - before == n, 10, "the mirror pool's copies")
    assert sum(gateway.sim_state(h)["served"] for h in ("127.0.14.1", "127.0.14.2")) - primary_before == n
    # The copies went through the shadow pool's own picker.
    metrics = (await asyncio.to_thread(httpx.get, f"http://127.0.0.1:{gateway.admin_port}/metrics")).text
    picked = [ln for ln in metrics.splitlines() if ln.startswith("inference_objective_request_total{")
              and 'inference_pool="default/chat-shadow"' in ln]
    assert sum(float(ln.rsplit(" ", 1)[1]) for ln in picked) >= n


async def test_a_broken_edit_is_refused_with_its_line_and_the_last_good_configuration_serves(
        gateway: Gateway) -> None:
    await asyncio.to_thread(gateway.use, "node-update")
    before = gateway.status()["generation"]
    gke_style = gateway.read("routes-to-llm.yaml").replace("  rules:\n    - backendRefs:", "  rules:\n    backendRefs:")
    gke_style = re.sub(r"\n      ", "\n    ", gke_style.split("rules:")[1])
    gateway.write("routes-to-llm.yaml", gateway.read("routes-to-llm.yaml").split("rules:")[0] + "rules:" + gke_style)
    st = wait_for(lambda: (s := gateway.status())["last_error"] and s, 5, "the refusal")
    assert st["generation"] == before
    assert re.search(r"routes-to-llm\.yaml:\d+: HTTPRoute routes-to-llm: spec.rules must be a list", st["last_error"])
    assert "- backendRefs:" in st["last_error"]  # the fix, shown
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as client:
        r = await client.post("/v1/completions", json={"model": LLAMA, "prompt": "still there?", "max_tokens": 2})
    assert r.status_code == 200
    assert pool_of_pod(r.headers["x-simulator-pod"]) in ("llm", "llm-new")


async def test_each_pool_of_a_split_keeps_its_own_prefix_affinity(gateway: Gateway) -> None:
    files = scenario_files("node-update")
    files["routes-to-llm.yaml"] = set_weights(files["routes-to-llm.yaml"], 50, 50)
    await asyncio.to_thread(gateway.use, files)
    system = "You review restaurants for a food magazine. Be concise and fair. " * 30
    by_pool: dict[str, set[str]] = {}
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as client:
        for i in range(40):
            r = await client.post("/v1/completions", json={"model": "food-review", "max_tokens": 2,
                                                           "prompt": f"{system}\nReview number {i}."})
            assert r.status_code == 200, r.text
            pod = r.headers["x-simulator-pod"]
            by_pool.setdefault(pool_of_pod(pod), set()).add(pod)
    # Envoy chose the pool by weight; within each, its picker sent the shared prefix to one pod.
    assert set(by_pool) == {"llm", "llm-new"}, by_pool
    assert all(len(pods) == 1 for pods in by_pool.values()), by_pool
