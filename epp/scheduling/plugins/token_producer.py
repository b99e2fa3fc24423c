"""token-producer: the prompt's token ids, for precise-prefix-cache-producer to key blocks by.

llm-d-router's data producer of the same name (legacy alias `tokenizer`). Its `vllm` backend asks
vLLM's render endpoints (`POST /v1/completions/render`, `POST /v1/chat/completions/render`, served
by `vllm serve` and by the GPU-less `vllm launch render` sidecar) for the token ids the server
itself will see, chat template included: with them the precise producer matches the blocks the
servers report exactly, for text and chat prompts too. The `estimate` backend (no `vllm` and no
`modelName`) packs the prompt's bytes 4 to a pseudo-token, as upstream's: no service needed, but
its ids never match a server's blocks.

Tokenizing is network I/O, so it runs in `prepare` (PrepareRequestData), awaited on the event
loop before the synchronous scheduling cycle, never inside it. A render that fails or runs past
its timeout leaves the request without ids (counted in `stats`); the precise producer then falls
back as it does for a request epp cannot tokenize. Token ids the client sent (a completions
prompt of ids, a token-in generate request) are used as they are, without a call.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from typing import Any

import aiohttp
import orjson

from epp.errors import ConfigError
from epp.kvevents.tokens import request_token_ids
from epp.requests import (
    CHAT,
    COMPLETIONS,
    CONVERSATIONS,
    EMBEDDINGS,
    MESSAGES,
    RESPONSES,
    InferenceRequest,
)
from epp.scheduling.framework import Closes, CycleState, Plugin, PrepareRequestData, PreRequest, SchedulingResult
from epp.scheduling.params import Params

log = logging.getLogger(__name__)

VLLM = "vllm"
ESTIMATE = "estimate"
DEFAULT_URL = "http://localhost:8000"
DEFAULT_TIMEOUT = 5.0
DEFAULT_MM_TIMEOUT = 30.0
COMPLETIONS_RENDER = "/v1/completions/render"
CHAT_RENDER = "/v1/chat/completions/render"
BYTES_PER_TOKEN = 4
MAX_PENDING = 4096  # requests tokenized and not yet scheduled (one refused after prepare ages out)
_ERROR_SNIPPET = 1024


def pack_bytes(raw: bytes) -> list[int]:
    """Upstream's estimate: zero-pad to 4 bytes, one little-endian uint32 per 4 bytes."""
    if not raw:
        return []
    if len(raw) % BYTES_PER_TOKEN:
        raw += b"\0" * (BYTES_PER_TOKEN - len(raw) % BYTES_PER_TOKEN)
    return [int.from_bytes(raw[i:i + BYTES_PER_TOKEN], "little") for i in range(0, len(raw), BYTES_PER_TOKEN)]


def _json(value: Any) -> bytes:
    return orjson.dumps(value)


def _text_bytes(content: Any) -> bytes:
    """A message's content: its text, or its parts' texts; a non-text part by its JSON (epp does not
    model multimodal placeholder counts, so an asset weighs its URL's bytes)."""
    if isinstance(content, str):
        return content.encode()
    out = b""
    if isinstance(content, list):
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                out += part["text"].encode()
            elif part is not None:
                out += _json(part)
    return out


def estimate_ids(request: InferenceRequest) -> list[int] | None:
    """The estimate backend: token ids sent pass through, text is byte-packed, as upstream."""
    given = request_token_ids(request)
    if given is not None:
        return given
    data = request.parsed
    if data is None:
        return None
    kind = request.kind
    raw: bytes
    if kind in (CHAT, MESSAGES):
        raw = _json(data["tools"]) if data.get("tools") else b""
        if kind == MESSAGES and data.get("system"):
            raw += _text_bytes(data["system"])
        for msg in data.get("messages") or ():
            if isinstance(msg, dict):
                role = msg.get("role")
                if isinstance(role, str):
                    raw += role.encode()
                raw += _text_bytes(msg.get("content"))
    elif kind == COMPLETIONS:
        prompt = data.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            return None  # several prompts: several sequences, no one prefix to key
        raw = prompt.encode()
    elif kind == EMBEDDINGS:
        raw = _json(data.get("input"))
    elif kind == RESPONSES:
        parts: list[dict[str, Any]] = []
        if data.get("instructions") is not None:
            parts.append({"instructions": data["instructions"]})
        if data.get("tools") is not None:
            parts.append({"tools": data["tools"]})
        parts.append({"input": data.get("input")})
        raw = _json(parts)
    elif kind == CONVERSATIONS:
        raw = _json(data.get("items"))
    else:
        return None
    return pack_bytes(raw) or None


def _multimodal(data: dict[str, Any]) -> bool:
    """A chat whose content is given as parts may carry images: it gets the longer timeout, as upstream."""
    for msg in data.get("messages") or ():
        if isinstance(msg, dict) and isinstance(msg.get("content"), list) and msg["content"]:
            return True
    return False


class TokenProducer(Plugin, PrepareRequestData, PreRequest, Closes):
    type_name = "token-producer"
    aliases = ("tokenizer",)
    hook_order = 100  # its ids are let go once the pick is made, after every plugin that reads them

    def __init__(self, name: str = "", *, backend: str = ESTIMATE, model_name: str = "", url: str = DEFAULT_URL,
                 timeout: float = DEFAULT_TIMEOUT, mm_timeout: float = DEFAULT_MM_TIMEOUT) -> None:
        super().__init__(name)
        if backend not in (VLLM, ESTIMATE):
            raise ValueError(f"token-producer backend {backend!r}: want {VLLM} or {ESTIMATE}")
        self.backend = backend
        self.model_name = model_name
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.mm_timeout = mm_timeout
        # The executor's budget is the worst case, as upstream's ProduceTimeout; the HTTP call's own
        # timeout (text or multimodal) is what ends a slow render first.
        self.prepare_timeout = max(timeout, mm_timeout) + 1.0 if backend == VLLM else 1.0
        self.stats: dict[str, int] = {"rendered": 0, "given": 0, "estimated": 0, "failed": 0, "timeouts": 0,
                                      "unsupported": 0}
        # id(request) -> (request_id, body length, ids): the request itself is not held, so one that
        # never reaches the cycle keeps only its ids until it ages out.
        self._ids: OrderedDict[int, tuple[str, int, list[int]]] = OrderedDict()
        self._session: aiohttp.ClientSession | None = None
        self._session_loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def from_parameters(cls, name: str, params: Params) -> Plugin:
        if params.has("udsTokenizerConfig"):
            raise ConfigError(f"plugin {params.plugin_type!r}: udsTokenizerConfig is not supported by epp "
                              "(deprecated upstream): set vllm.url to a vLLM render endpoint instead")
        estimate = params.has("estimate")
        vllm = params.has("vllm") or params.has("modelName")
        if estimate and vllm:
            raise ConfigError(f"plugin {params.plugin_type!r}: only one of 'estimate' or 'vllm' may be set")
        if estimate:
            est = params.sub("estimate", params.mapping("estimate"))
            for key in ("image", "video"):
                if est.has(key):
                    raise ConfigError(f"plugin {params.plugin_type!r}: estimate.{key} is not supported by epp: it "
                                      "does not estimate multimodal placeholder tokens")
            est.done()
            params.done()
            return cls(name, backend=ESTIMATE)
        if not vllm:
            params.done()
            return cls(name, backend=ESTIMATE)
        model = params.str("modelName", "", empty=True)
        if not model:
            raise ConfigError(f"plugin {params.plugin_type!r}: 'modelName' must be specified")
        cfg = params.sub("vllm", params.mapping("vllm"))
        url = cfg.str("url", DEFAULT_URL, empty=True) or DEFAULT_URL
        if not url.startswith("http://"):
            raise ConfigError(f"plugin {params.plugin_type!r}: vllm.url {url!r} must be plain http:// "
                              "(TLS is not supported, as upstream)")
        timeout = cfg.duration("timeout", DEFAULT_TIMEOUT) or DEFAULT_TIMEOUT
        mm_timeout = cfg.duration("mmTimeout", DEFAULT_MM_TIMEOUT) or DEFAULT_MM_TIMEOUT
        if timeout <= 0 or mm_timeout <= 0:
            raise ConfigError(f"plugin {params.plugin_type!r}: vllm.timeout and vllm.mmTimeout must be positive")
        cfg.done()
        params.done()
        return cls(name, backend=VLLM, model_name=model, url=url, timeout=timeout, mm_timeout=mm_timeout)

    def describe(self) -> dict[str, Any]:
        if self.backend == ESTIMATE:
            return {"estimate": {}}
        return {"modelName": self.model_name,
                "vllm": {"url": self.url, "timeout": f"{self.timeout:g}s", "mmTimeout": f"{self.mm_timeout:g}s"}}

    # --- what consumers read ------------------------------------------------------
    def token_ids(self, request: InferenceRequest) -> list[int] | None:
        """The ids `prepare` found for this request, or None (not prepared, or tokenizing failed)."""
        entry = self._ids.get(id(request))
        if entry is None or entry[0] != request.request_id or entry[1] != len(request.body):
            return None
        return entry[2]

    def pre_request(self, state: CycleState, request: InferenceRequest, result: SchedulingResult) -> None:
        self._ids.pop(id(request), None)  # the cycle has read them (its state keeps the keys)

    def _store(self, request: InferenceRequest, ids: list[int]) -> None:
        self._ids[id(request)] = (request.request_id, len(request.body), ids)
        while len(self._ids) > MAX_PENDING:
            self._ids.popitem(last=False)

    # --- per request, before the cycle -------------------------------------------------
    async def prepare(self, request: InferenceRequest) -> None:
        self._ids.pop(id(request), None)  # what an earlier request at this address left, if any
        given = request_token_ids(request)
        if given is not None:
            self.stats["given"] += 1
            self._store(request, given)
            return
        if self.backend == ESTIMATE:
            ids = estimate_ids(request)
            if ids is None:
                self.stats["unsupported"] += 1
                return
            self.stats["estimated"] += 1
            self._store(request, ids)
            return
        data = request.parsed
        if data is None or request.kind not in (COMPLETIONS, CHAT):
            self.stats["unsupported"] += 1  # upstream renders completions and chats; others go untokenized
            return
        try:
            ids = await self._render(request.kind, data)
        except TimeoutError:
            self.stats["timeouts"] += 1
            log.debug("token-producer %s: render timed out for %s", self.name, request.request_id)
            return
        except (aiohttp.ClientError, ValueError, OSError) as e:
            self.stats["failed"] += 1
            log.debug("token-producer %s: render failed for %s: %s", self.name, request.request_id, e)
            return
        if ids:
            self.stats["rendered"] += 1
            self._store(request, ids)

    async def _render(self, kind: str, data: dict[str, Any]) -> list[int] | None:
        body = dict(data)
        body["model"] = self.model_name  # `vllm launch render` requires the base model's name
        chat = kind == CHAT
        timeout = self.mm_timeout if chat and _multimodal(data) else self.timeout
        session = self._client()
        async with session.post(self.url + (CHAT_RENDER if chat else COMPLETIONS_RENDER), data=orjson.dumps(body),
                                headers={"Content-Type": "application/json"},
                                timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            raw = await resp.read()
            if not 200 <= resp.status < 300:
                raise ValueError(f"vLLM render returned status {resp.status}: "
                                 f"{raw[:_ERROR_SNIPPET].decode(errors='replace')}")
        try:
            parsed = orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            raise ValueError(f"unmarshal response: {e}") from None
        if not chat:
            # A list, one rendered request per prompt; one prompt is one sequence to key.
            if not isinstance(parsed, list) or not parsed:
                raise ValueError("vLLM render returned empty response")
            if len(parsed) != 1:
                return None
            parsed = parsed[0]
        ids = parsed.get("token_ids") if isinstance(parsed, dict) else None
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise ValueError("vLLM render returned no token_ids")
        return ids

    def _client(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        if self._session is None or self._session.closed or self._session_loop is not loop:
            # HTTP/1.1 with a small keep-alive pool: a loopback sidecar or one render Service.
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit_per_host=16))
            self._session_loop = loop
        return self._session

    async def aclose(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None

