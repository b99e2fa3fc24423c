"""Parse an OpenAI-style HTTP request into an `InferenceRequest`.

This is the only place that understands request bodies. Everything downstream
(admission, scheduling, metrics) sees the parsed fields, never raw JSON. Errors
are `EppError`s with a message a client can act on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from epp.errors import EppError, bad_request
from epp.protocol import (
    DEFAULT_FAIRNESS_ID,
    FAIRNESS_ID_HEADERS,
    MODEL_REWRITE_HEADER,
    OBJECTIVE_HEADER,
    REQUEST_ID_HEADER,
)

COMPLETIONS = "completions"
CHAT = "chat"
EMBEDDINGS = "embeddings"
OTHER = "other"
INFERENCE_KINDS = frozenset({COMPLETIONS, CHAT, EMBEDDINGS})


@dataclass(slots=True)
class InferenceRequest:
    """One client request, as the scheduler and the response phase see it."""

    path: str
    kind: str
    headers: dict[str, str]
    body: bytes = b""
    model: str = ""
    # The model sent to the server; differs from `model` after a rewrite.
    target_model: str = ""
    # Text whose prefix identifies reusable KV cache: the prompt, or the flattened chat.
    prompt: str = ""
    stream: bool = False
    max_tokens: int | None = None
    objective: str = ""
    fairness_id: str = DEFAULT_FAIRNESS_ID
    priority: int = 0
    request_id: str = ""
    parsed: dict[str, Any] | None = field(default=None, repr=False)

    def forwarded_body(self) -> bytes:
        """The body to send to the model server: the client's, or with `model` set to the target model."""
        if self.parsed is None or self.target_model == self.model:
            return self.body
        data = dict(self.parsed)
        data["model"] = self.target_model
        return orjson.dumps(data)


def request_kind(path: str) -> str:
    """Classify the HTTP path; query strings are ignored."""
    path = path.split("?", 1)[0].rstrip("/")
    if path.endswith("/chat/completions"):
        return CHAT
    if path.endswith("/completions"):
        return COMPLETIONS
    if path.endswith("/embeddings"):
        return EMBEDDINGS
    return OTHER


def new_request(path: str, headers: dict[str, str]) -> InferenceRequest:
    """Start a request from its headers; the body, if any, comes later."""
    req = InferenceRequest(path=path, kind=request_kind(path), headers=headers)
    req.objective = headers.get(OBJECTIVE_HEADER, "")
    req.fairness_id = next((headers[h] for h in FAIRNESS_ID_HEADERS if headers.get(h)), DEFAULT_FAIRNESS_ID)
    req.request_id = headers.get(REQUEST_ID_HEADER, "")
    return req


def parse_body(req: InferenceRequest, body: bytes) -> InferenceRequest:
    """Fill `req` from its body. Raises `EppError` (400) for anything a server would reject."""
    req.body = body
    if req.kind == OTHER:
        _parse_passthrough(req, body)
        return req
    if not body:
        raise bad_request("request body is empty; expected a JSON object", reason="empty_body")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        # orjson rejects invalid UTF-8 with the same error type; say which it was.
        try:
            body.decode("utf-8")
        except UnicodeDecodeError:
            raise bad_request("request body is not valid UTF-8", reason="invalid_encoding") from None
        raise bad_request(f"request body is not valid JSON: {e}", reason="invalid_json") from None
    if not isinstance(data, dict):
        raise bad_request("request body must be a JSON object", reason="invalid_json")
    req.parsed = data
    req.model = _require_model(data)
    req.target_model = req.headers.get(MODEL_REWRITE_HEADER) or req.model
    req.stream = _optional_bool(data, "stream")
    req.max_tokens = _optional_int(data, "max_completion_tokens")
    if req.max_tokens is None:
        req.max_tokens = _optional_int(data, "max_tokens")
    if req.kind == COMPLETIONS:
        req.prompt = _completion_prompt(data)
    elif req.kind == CHAT:
        req.prompt = _chat_prompt(data)
    else:
        req.prompt = _embedding_input(data)
    return req


def _parse_passthrough(req: InferenceRequest, body: bytes) -> None:
    """Non-inference paths are routed without demanding a particular body."""
    if not body:
        return
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return
    if isinstance(data, dict) and isinstance(data.get("model"), str):
        req.parsed = data
        req.model = data["model"]
        req.target_model = req.headers.get(MODEL_REWRITE_HEADER) or req.model


def _require_model(data: dict[str, Any]) -> str:
    model = data.get("model")
    if model is None:
        raise bad_request("'model' is required", param="model", reason="missing_model")
    if not isinstance(model, str) or not model:
        raise bad_request("'model' must be a non-empty string", param="model", reason="invalid_model")
    return model


def _optional_bool(data: dict[str, Any], key: str) -> bool:
    value = data.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad_request(f"'{key}' must be a boolean", param=key)
    return value


def _optional_int(data: dict[str, Any], key: str) -> int | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise bad_request(f"'{key}' must be a non-negative integer", param=key)
    return value


def _completion_prompt(data: dict[str, Any]) -> str:
    prompt = data.get("prompt")
    if prompt is None:
        raise bad_request("'prompt' is required for /v1/completions", param="prompt", reason="missing_prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return "\n".join(prompt)
        # Token-id prompts: hash their decimal form so shared prefixes still match.
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return " ".join(map(str, prompt))
        if all(isinstance(p, list) and all(isinstance(t, int) for t in p) for p in prompt):
            return "\n".join(" ".join(map(str, p)) for p in prompt)
    raise bad_request(
        "'prompt' must be a string, a list of strings, or a list of token ids", param="prompt"
    )


def _chat_prompt(data: dict[str, Any]) -> str:
    """Flatten messages deterministically: a longer conversation extends the text of a shorter one."""
    messages = data.get("messages")
    if messages is None:
        raise bad_request(
            "'messages' is required for /v1/chat/completions", param="messages", reason="missing_messages"
        )
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty array", param="messages")
    parts: list[str] = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise bad_request(f"messages[{i}] must be an object", param="messages")
        role = msg.get("role")
        if not isinstance(role, str):
            raise bad_request(f"messages[{i}].role must be a string", param="messages")
        parts.append(f"<|{role}|>\n")
        parts.append(_content_text(msg.get("content"), i))
        parts.append("\n")
    return "".join(parts)


def _content_text(content: Any, i: int) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict):
                raise bad_request(f"messages[{i}].content parts must be objects", param="messages")
            if part.get("type") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                # Images and other parts still identify the prefix; their JSON is stable.
                texts.append(orjson.dumps(part, option=orjson.OPT_SORT_KEYS).decode())
        return "".join(texts)
    raise bad_request(f"messages[{i}].content must be a string or an array", param="messages")


def _embedding_input(data: dict[str, Any]) -> str:
    value = data.get("input")
    if value is None:
        raise bad_request("'input' is required for /v1/embeddings", param="input", reason="missing_input")
    if isinstance(value, str):
        return value
    return orjson.dumps(value).decode()


__all__ = [
    "CHAT",
    "COMPLETIONS",
    "EMBEDDINGS",
    "INFERENCE_KINDS",
    "OTHER",
    "EppError",
    "InferenceRequest",
    "new_request",
    "parse_body",
    "request_kind",
]
