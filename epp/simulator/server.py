"""The simulator's HTTP face: enough of vLLM's OpenAI API and /metrics for the EPP to route on.

Every response carries `x-simulator-pod` and `x-simulator-port`, so a client (test,
demo, benchmark) can see which server answered. `/sim/control` lets tests make the
server misbehave (slow or broken /metrics); `/sim/state` reports its true state.
With KV events configured, the prefix cache's stores, evictions and resets
(`POST /reset_prefix_cache`, as vLLM's) are published over ZMQ (kv_publisher.py).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import orjson
from aiohttp import web

from epp.kvevents.events import topic as kv_topic
from epp.kvevents.hashing import simulator_token_ids
from epp.simulator.engine import Engine, EngineConfig, Sequence
from epp.simulator.kv_publisher import KVEventPublisher, KVEventsConfig

# A fixed vocabulary: output text is deterministic for a given request.
_WORDS = ("the", "model", "routes", "tokens", "quickly", "and", "prefix", "cache", "hits", "well")


def _error(status: int, message: str, etype: str) -> web.Response:
    body = {"error": {"message": message, "type": etype, "param": None, "code": status}}
    return web.json_response(body, status=status, dumps=lambda o: orjson.dumps(o).decode())


def prompt_text(kind: str, body: dict[str, Any]) -> str:
    """The text the engine caches for a request (epp's `simulator` tokenizer renders the same)."""
    if kind == "chat":
        parts = []
        for m in body.get("messages") or []:
            content = m.get("content")
            if isinstance(content, list):
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            parts.append(f"<|{m.get('role', '')}|>\n{content or ''}\n")
        return "".join(parts)
    prompt = body.get("prompt", "")
    if isinstance(prompt, list):
        return "\n".join(map(str, prompt))
    return str(prompt)


def _is_token_ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 1 << 32 for t in value)


class SimulatedServer:
    def __init__(self, name: str, port: int, cfg: EngineConfig, host: str = "127.0.0.1",
                 kv_events: KVEventsConfig | None = None) -> None:
        self.name = name
        self.port = port
        self.host = host
        self.cfg = cfg
        self.engine = Engine(cfg)
        self.kv_events = kv_events
        self.publisher: KVEventPublisher | None = None
        self.metrics_delay = 0.0
        self.metrics_status = 200
        self.served = 0
        self.rendered = 0  # render requests answered (a tokenizer sidecar's load)
        self.app = web.Application(client_max_size=64 << 20)
        self.app.add_routes([
            web.post("/v1/completions", self.completions),
            web.post("/v1/chat/completions", self.chat),
            web.post("/v1/completions/render", self.render_completions),
            web.post("/v1/chat/completions/render", self.render_chat),
            web.get("/v1/models", self.models),
            web.get("/metrics", self.metrics),
            web.get("/health", self.health),
            web.get("/sim/state", self.state),
            web.post("/sim/control", self.control),
            web.post("/reset_prefix_cache", self.reset_prefix_cache),
        ])
        self._runner: web.AppRunner | None = None

    @property
    def known_models(self) -> list[str]:
        return self.cfg.models + self.cfg.lora_adapters

    def _headers(self) -> dict[str, str]:
        return {"x-simulator-pod": self.name, "x-simulator-port": str(self.port)}

    async def start(self) -> None:
        if self.kv_events is not None:
            topic = self.kv_events.topic or kv_topic(f"{self.host}:{self.port}", self.cfg.models[0])
            self.publisher = await KVEventPublisher.open(self.kv_events, topic)
            self.engine.events = self.publisher.publish
        self._runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        await self.engine.close()
        if self.publisher is not None:
            self.engine.events = None
            self.publisher.close()

    # --- handlers -------------------------------------------------------------
    async def health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok", headers=self._headers())

    async def models(self, request: web.Request) -> web.Response:
        data = [{"id": m, "object": "model", "owned_by": "simulator"} for m in self.known_models]
        return web.json_response({"object": "list", "data": data}, headers=self._headers())

    async def metrics(self, request: web.Request) -> web.Response:
        if self.metrics_delay:
            await asyncio.sleep(self.metrics_delay)
        if self.metrics_status != 200:
            return web.Response(status=self.metrics_status, text="broken")
        return web.Response(text=self.engine.metrics_text(self.cfg.models[0]), content_type="text/plain")

    async def state(self, request: web.Request) -> web.Response:
        e = self.engine
        return web.json_response({
            "name": self.name, "port": self.port, "waiting": e.num_waiting, "running": e.num_running,
            "kv_usage": e.kv_usage, "served": self.served, "prefix_queries": e.prefix_queries,
            "prefix_hits": e.prefix_hits, "active_loras": list(e.active_loras), "steps": e.steps,
        })

    async def control(self, request: web.Request) -> web.Response:
        body = await request.json()
        if "metrics_delay" in body:
            self.metrics_delay = float(body["metrics_delay"])
        if "metrics_status" in body:
            self.metrics_status = int(body["metrics_status"])
        if "time_scale" in body:
            self.cfg.time_scale = float(body["time_scale"])
        return web.json_response({"ok": True})

    async def reset_prefix_cache(self, request: web.Request) -> web.Response:
        self.engine.reset_prefix_cache()
        return web.Response(text="ok", headers=self._headers())

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "completions")

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "chat")

    async def render_completions(self, request: web.Request) -> web.Response:
        """vLLM's `/v1/completions/render`: a list, one rendered request (its token_ids) per prompt."""
        return await self._render(request, "completions")

    async def render_chat(self, request: web.Request) -> web.Response:
        """vLLM's `/v1/chat/completions/render`: the chat rendered by the template and tokenized."""
        return await self._render(request, "chat")

    async def _render(self, request: web.Request, kind: str) -> web.Response:
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return _error(400, "invalid JSON body", "BadRequestError")
        if not isinstance(body, dict):
            return _error(400, "the body must be a JSON object", "BadRequestError")
        model = body.get("model")
        if model not in self.known_models:
            return _error(404, f"The model `{model}` does not exist.", "NotFoundError")
        self.rendered += 1

        def rendered(ids: list[int]) -> dict[str, Any]:
            return {"request_id": f"render-{self.rendered}", "token_ids": ids, "features": None,
                    "sampling_params": {"max_tokens": body.get("max_tokens")}, "model": model, "stream": False}

        if kind == "chat":
            if not isinstance(body.get("messages"), list):
                return _error(400, "messages must be a list", "BadRequestError")
            return web.json_response(rendered(simulator_token_ids(prompt_text("chat", body))),
                                     dumps=lambda o: orjson.dumps(o).decode())
        prompt: Any = body.get("prompt")
        if _is_token_ids(prompt):
            prompts: list[list[int]] = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            prompts = [simulator_token_ids(p) for p in prompt]
        elif isinstance(prompt, str):
            prompts = [simulator_token_ids(prompt)]
        else:
            return _error(400, "prompt must be a string, a list of strings or of token ids", "BadRequestError")
        return web.json_response([rendered(ids) for ids in prompts], dumps=lambda o: orjson.dumps(o).decode())

    async def _generate(self, request: web.Request, kind: str) -> web.StreamResponse:
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return _error(400, "invalid JSON body", "BadRequestError")
        model = body.get("model")
        if model not in self.known_models:
            return _error(404, f"The model `{model}` does not exist.", "NotFoundError")
        prompt = prompt_text(kind, body)
        raw_prompt = body.get("prompt")
        token_ids = raw_prompt if kind == "completions" and _is_token_ids(raw_prompt) else None
        max_tokens = int(body.get("max_tokens") or body.get("max_completion_tokens") or 16)
        stream = bool(body.get("stream"))
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        engine = self.engine
        try:
            seq = engine.submit(model, prompt, max_tokens, token_ids)
        except ValueError as e:
            return _error(400, str(e), "BadRequestError")
        self.served += 1
        try:
            rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:16]}"
            created = int(time.time())
            obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
            if not stream:
                while await seq.tokens.get() is not None:
                    pass
                text = " ".join(_WORDS[i % len(_WORDS)] for i in range(seq.max_tokens))
                if kind == "chat":
                    choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                                              "finish_reason": "length"}
                else:
                    choice = {"index": 0, "text": text, "finish_reason": "length"}
                payload = {"id": rid, "object": "chat.completion" if kind == "chat" else "text_completion",
                           "created": created, "model": model, "choices": [choice], "usage": _usage(seq)}
                return web.Response(body=orjson.dumps(payload), content_type="application/json",
                                    headers=self._headers())
            resp = web.StreamResponse(headers={**self._headers(), "content-type": "text/event-stream",
                                               "cache-control": "no-cache"})
            await resp.prepare(request)
            i = 0
            while (n := await seq.tokens.get()) is not None:
                word = _WORDS[i % len(_WORDS)] + " "
                if kind == "chat":
                    delta: dict[str, Any] = {"content": word}
                    if i == 0:
                        delta["role"] = "assistant"
                    choice = {"index": 0, "delta": delta, "finish_reason": None}
                else:
                    choice = {"index": 0, "text": word, "finish_reason": None}
                if n >= seq.max_tokens:
                    choice["finish_reason"] = "length"
                chunk = {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}
                await resp.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
                i += 1
            if include_usage:
                chunk = {"id": rid, "object": obj, "created": created, "model": model, "choices": [],
                         "usage": _usage(seq)}
                await resp.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            return resp
        finally:
            engine.abort(seq)


def _usage(seq: Sequence) -> dict[str, Any]:
    return {
        "prompt_tokens": seq.prompt_tokens, "completion_tokens": seq.generated,
        "total_tokens": seq.prompt_tokens + seq.generated,
        "prompt_tokens_details": {"cached_tokens": seq.cached_tokens},
    }


_prompt_text = prompt_text  # the benchmark's oracle reads it by its older name
