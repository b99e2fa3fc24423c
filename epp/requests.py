"""Parse an HTTP inference request into an `InferenceRequest`.

This is the only place that understands request bodies. Everything downstream
(admission, scheduling, metrics) sees the parsed fields, never raw JSON. Errors
are `EppError`s with a message a client can act on.

Which parser reads a request is upstream's rule: each parser claims path suffixes
(`openai-parser`: `/v1/completions`, `/v1/chat/completions`, `/v1/embeddings`,
`/v1/responses`, `/v1/conversations`, `/v1/images/generations`; `anthropic-parser`:
`/v1/messages`; `vllmhttp-parser`: `/inference/v1/generate`; `sglanghttp-parser`:
`/generate`), the longest matching suffix wins, and a parser that claims none
(`passthrough-parser`) takes the rest. The default set is llm-d-router's: openai,
anthropic, vllmhttp, then passthrough. A set without a fallback refuses paths no
parser claims.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

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
RESPONSES = "responses"
CONVERSATIONS = "conversations"
IMAGES = "images"
MESSAGES = "messages"  # the Anthropic Messages API
GENERATE = "generate"  # vLLM's and SGLang's token-in APIs
OTHER = "other"
INFERENCE_KINDS = frozenset({COMPLETIONS, CHAT, EMBEDDINGS, RESPONSES, CONVERSATIONS, IMAGES, MESSAGES, GENERATE})


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
    parser: Parser | None = field(default=None, repr=False)
    # The endpoint the proxy reports having sent the request to (x-gateway-destination-endpoint-served).
    served_endpoint: str = ""
    # The response's HTTP status, once its headers arrived (0 before).
    response_status: int = 0

    def forwarded_body(self) -> bytes:
        """The body to send to the model server: the client's, or with `model` set to the target model."""
        if self.parsed is None or self.target_model == self.model:
            return self.body
        data = dict(self.parsed)
        data["model"] = self.target_model
        return orjson.dumps(data)


def _suffix(path: str) -> str:
    return path.split("?", 1)[0].strip().rstrip("/")


class Parser(ABC):
    """One upstream parser type: the path suffixes it claims, and how it reads a body."""

    type_name: ClassVar[str] = ""
    paths: ClassVar[tuple[str, ...]] = ()  # claimed suffixes, no slashes at the ends; () is a fallback

    def __init__(self, name: str = "") -> None:
        self.name = name or self.type_name

    @abstractmethod
    def kind(self, path: str) -> str:
        """The API a claimed path is (query string already removed)."""

    @abstractmethod
    def parse(self, req: InferenceRequest, body: bytes) -> None:
        """Fill `req` from its body; raise `EppError` (400) for what the server would reject."""


class OpenAIParser(Parser):
    type_name = "openai-parser"
    paths = ("chat/completions", "completions", "embeddings", "responses", "conversations",
             "chat/completions/render", "completions/render", "images/generations")

    def kind(self, path: str) -> str:
        # Upstream's order: the first matching API wins.
        if path.endswith("conversations"):
            return CONVERSATIONS
        if path.endswith("responses"):
            return RESPONSES
        if path.endswith(("chat/completions", "chat/completions/render")):
            return CHAT
        if path.endswith(("completions", "completions/render")):
            return COMPLETIONS
        if path.endswith("embeddings"):
            return EMBEDDINGS
        if path.endswith("images/generations"):
            return IMAGES
        return COMPLETIONS

    def parse(self, req: InferenceRequest, body: bytes) -> None:
        data = _json_object(body)
        kind = req.kind
        req.parsed = data
        required = kind in (COMPLETIONS, CHAT, EMBEDDINGS, RESPONSES)
        req.model = _require_model(data) if required else _optional_model(data)
        req.target_model = req.headers.get(MODEL_REWRITE_HEADER) or req.model
        req.stream = _optional_bool(data, "stream")
        if kind == CHAT:
            req.max_tokens = _optional_int(data, "max_completion_tokens")
            if req.max_tokens is None:
                req.max_tokens = _optional_int(data, "max_tokens")
            req.prompt = _chat_prompt(data)
        elif kind == COMPLETIONS:
            req.max_tokens = _optional_int(data, "max_tokens")
            req.prompt = _completion_prompt(data)
        elif kind == RESPONSES:
            req.max_tokens = _optional_int(data, "max_output_tokens")
            req.prompt = _responses_prompt(data)
        elif kind == CONVERSATIONS:
            req.prompt = _conversation_prompt(data)
        elif kind == IMAGES:
            req.prompt = _image_prompt(data)
        else:
            req.prompt = _embedding_input(data)
        _salt(req, data.get("cache_salt"))


class AnthropicParser(Parser):
    type_name = "anthropic-parser"
    paths = ("messages", "messages/count_tokens")

    def kind(self, path: str) -> str:
        return OTHER if path.endswith("/messages/count_tokens") else MESSAGES

    def parse(self, req: InferenceRequest, body: bytes) -> None:
        if req.kind == OTHER:  # count_tokens: only a count comes back; forwarded as it is
            _parse_passthrough(req, body)
            return
        if not req.path.split("?", 1)[0].rstrip("/").endswith("/messages"):
            raise bad_request(f"the Anthropic parser does not handle {req.path}", reason="unsupported_path")
        data = _json_object(body)
        req.parsed = data
        req.model = _require_model(data)
        req.target_model = req.headers.get(MODEL_REWRITE_HEADER) or req.model
        req.stream = _optional_bool(data, "stream")
        req.max_tokens = _optional_int(data, "max_tokens")
        req.prompt = _anthropic_prompt(data)
        _salt(req, data.get("cache_salt"))


class VllmHTTPParser(Parser):
    type_name = "vllmhttp-parser"
    paths = ("inference/v1/generate",)

    def kind(self, path: str) -> str:
        return GENERATE

    def parse(self, req: InferenceRequest, body: bytes) -> None:
        data = _json_object(body)
        req.parsed = data
        req.model = _optional_model(data)
        req.target_model = req.headers.get(MODEL_REWRITE_HEADER) or req.model
        req.stream = _optional_bool(data, "stream")
        req.max_tokens = _sampling_max_tokens(data)
        tokens = data.get("token_ids")
        if not isinstance(tokens, list) or not tokens or not _token_ids(tokens):
            raise bad_request("'token_ids' must be a non-empty array of token ids", param="token_ids",
                              reason="missing_prompt")
        req.prompt = " ".join(map(str, tokens))
        _salt(req, data.get("cache_salt"))


class SGLangHTTPParser(Parser):
    type_name = "sglanghttp-parser"
    paths = ("generate",)

    def kind(self, path: str) -> str:
        return GENERATE

    def parse(self, req: InferenceRequest, body: bytes) -> None:
        if _suffix(req.path).lstrip("/") != "generate":
            raise bad_request(f"the SGLang parser does not handle {req.path}", reason="unsupported_path")
        data = _json_object(body)
        req.parsed = data
        req.model = _optional_model(data)
        req.target_model = req.headers.get(MODEL_REWRITE_HEADER) or req.model
        req.stream = _optional_bool(data, "stream")
        req.max_tokens = _sampling_max_tokens(data)
        ids = data.get("input_ids")
        if isinstance(ids, list) and ids and _token_ids(ids):
            req.prompt = " ".join(map(str, ids))
        elif isinstance(ids, list) and ids and all(isinstance(p, list) and p and _token_ids(p) for p in ids):
            req.prompt = "\n".join(" ".join(map(str, p)) for p in ids)
        else:
            raise bad_request("'input_ids' must be token ids or a list of them", param="input_ids",
                              reason="missing_prompt")
        salt = data.get("extra_key")
        if salt is not None and not isinstance(salt, str):
            raise bad_request("'extra_key' must be a string", param="extra_key")
        _salt(req, salt)


class PassthroughParser(Parser):
    type_name = "passthrough-parser"
    paths = ()

    def kind(self, path: str) -> str:
        return OTHER

    def parse(self, req: InferenceRequest, body: bytes) -> None:
        _parse_passthrough(req, body)


PARSER_TYPES: dict[str, type[Parser]] = {
    cls.type_name: cls for cls in (OpenAIParser, AnthropicParser, VllmHTTPParser, SGLangHTTPParser, PassthroughParser)
}


class ParserSet:
    """The configured parsers, resolved by path as upstream's registry does."""

    def __init__(self, parsers: Sequence[Parser]) -> None:
        self.parsers: list[Parser] = []
        self.fallback: Parser | None = None
        self.warnings: list[str] = []
        self._claims: list[tuple[str, Parser]] = []
        seen: set[str] = set()
        for i, parser in enumerate(parsers):
            if parser.type_name in seen:
                self.warnings.append(f"parser {parser.name!r}: a {parser.type_name} is already listed; skipped")
                continue
            seen.add(parser.type_name)
            self.parsers.append(parser)
            if not parser.paths:
                self.fallback = parser
                for skipped in parsers[i + 1:]:
                    self.warnings.append(f"parser {skipped.name!r} is listed after the fallback {parser.name!r}; "
                                         "skipped")
                break
            self._claims.extend((suffix, parser) for suffix in parser.paths)
        self._claims.sort(key=lambda claim: -len(claim[0]))  # the longest suffix wins
        self._resolved: dict[str, Parser | None] = {}

    def resolve(self, path: str) -> Parser | None:
        """The parser for a path (query string ignored), or None when none claims it."""
        clean = _suffix(path)
        cached = self._resolved.get(clean, False)
        if cached is not False:
            return cached  # type: ignore[return-value]
        found = next((parser for suffix, parser in self._claims if clean.endswith(suffix)), self.fallback)
        if len(self._resolved) < 4096:
            self._resolved[clean] = found
        return found

    def names(self) -> list[str]:
        return [p.name for p in self.parsers]


DEFAULT_PARSERS = ParserSet([OpenAIParser(), AnthropicParser(), VllmHTTPParser(), PassthroughParser()])


def request_kind(path: str, parsers: ParserSet | None = None) -> str:
    """Classify the HTTP path; query strings are ignored."""
    parser = (parsers or DEFAULT_PARSERS).resolve(path)
    return OTHER if parser is None else parser.kind(_suffix(path))


def new_request(path: str, headers: dict[str, str], parsers: ParserSet | None = None) -> InferenceRequest:
    """Start a request from its headers; the body, if any, comes later."""
    parser = (parsers or DEFAULT_PARSERS).resolve(path)
    kind = OTHER if parser is None else parser.kind(_suffix(path))
    req = InferenceRequest(path=path, kind=kind, headers=headers, parser=parser)
    req.objective = headers.get(OBJECTIVE_HEADER, "")
    req.fairness_id = next((headers[h] for h in FAIRNESS_ID_HEADERS if headers.get(h)), DEFAULT_FAIRNESS_ID)
    req.request_id = headers.get(REQUEST_ID_HEADER, "")
    return req


def parse_body(req: InferenceRequest, body: bytes) -> InferenceRequest:
    """Fill `req` from its body. Raises `EppError` (400) for anything a server would reject."""
    req.body = body
    parser = req.parser
    if parser is None:
        raise bad_request(f"no configured parser handles the path {req.path.split('?', 1)[0]!r}",
                          reason="unsupported_path")
    parser.parse(req, body)
    return req


def _json_object(body: bytes) -> dict[str, Any]:
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
    return data


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


def _optional_model(data: dict[str, Any]) -> str:
    """APIs where the model may be left out (conversations, images, token-in generate)."""
    if data.get("model") is None:
        return ""
    return _require_model(data)


def _salt(req: InferenceRequest, salt: Any) -> None:
    """A cache salt isolates the request's prefix cache: requests share a prefix only under the same salt."""
    if salt is None or salt == "":
        return
    if not isinstance(salt, str):
        raise bad_request("'cache_salt' must be a string", param="cache_salt")
    req.prompt = f"<|cache_salt|>{salt}\n{req.prompt}"


def _token_ids(values: list[Any]) -> bool:
    return all(isinstance(t, int) and not isinstance(t, bool) for t in values)


def _sampling_max_tokens(data: dict[str, Any]) -> int | None:
    params = data.get("sampling_params")
    if params is None:
        return None
    if not isinstance(params, dict):
        raise bad_request("'sampling_params' must be an object", param="sampling_params")
    return _optional_int(params, "max_tokens")


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
    return _joined_text(content, f"messages[{i}].content parts must be objects",
                        f"messages[{i}].content must be a string or an array")


def _joined_text(content: Any, not_object: str, not_text: str) -> str:
    """A message's content as one text: a string, or an array of parts (OpenAI) or blocks (Anthropic)
    whose text parts are joined. Images, tool use and the like still identify the prefix: their JSON,
    with sorted keys, is stable."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict):
                raise bad_request(not_object, param="messages")
            if part.get("type") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                texts.append(orjson.dumps(part, option=orjson.OPT_SORT_KEYS).decode())
        return "".join(texts)
    raise bad_request(not_text, param="messages")


def _items_text(items: list[Any], what: str) -> str:
    """Responses input items and conversation items: messages flatten as chat messages do; other
    items (function calls, files) by their stable JSON."""
    parts: list[str] = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            parts.append(item)
            continue
        if not isinstance(item, dict):
            raise bad_request(f"{what}[{i}] must be an object or a string", param=what)
        role = item.get("role")
        if isinstance(role, str) and "content" in item:
            parts.append(f"<|{role}|>\n{_content_text(item['content'], i)}\n")
        else:
            parts.append(orjson.dumps(item, option=orjson.OPT_SORT_KEYS).decode())
    return "".join(parts)


def _responses_prompt(data: dict[str, Any]) -> str:
    value = data.get("input")
    if value is None:
        raise bad_request("'input' is required for /v1/responses", param="input", reason="missing_input")
    instructions = data.get("instructions")
    head = f"<|system|>\n{instructions}\n" if isinstance(instructions, str) and instructions else ""
    if isinstance(value, str):
        return head + value
    if isinstance(value, list):
        return head + _items_text(value, "input")
    raise bad_request("'input' must be a string or an array of items", param="input")


def _conversation_prompt(data: dict[str, Any]) -> str:
    items = data.get("items")
    if not isinstance(items, list) or not items:
        raise bad_request("'items' must be a non-empty array for /v1/conversations", param="items",
                          reason="missing_input")
    return _items_text(items, "items")


def _image_prompt(data: dict[str, Any]) -> str:
    prompt = data.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise bad_request("'prompt' is required for /v1/images/generations", param="prompt",
                          reason="missing_prompt")
    return prompt


def _anthropic_blocks(content: Any, where: str) -> str:
    return _joined_text(content, f"{where} content blocks must be objects",
                        f"{where} must be a string or an array of content blocks")


def _anthropic_prompt(data: dict[str, Any]) -> str:
    """The system prompt (a top-level field in this API), then the messages, flattened as chat is."""
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty array for /v1/messages", param="messages",
                          reason="missing_messages")
    parts: list[str] = []
    system = data.get("system")
    if system:
        parts.append(f"<|system|>\n{_anthropic_blocks(system, 'system')}\n")
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
            raise bad_request(f"messages[{i}] must be an object with a role", param="messages")
        parts.append(f"<|{msg['role']}|>\n{_anthropic_blocks(msg.get('content'), f'messages[{i}]')}\n")
    return "".join(parts)


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
    "CONVERSATIONS",
    "DEFAULT_PARSERS",
    "EMBEDDINGS",
    "GENERATE",
    "IMAGES",
    "INFERENCE_KINDS",
    "MESSAGES",
    "OTHER",
    "PARSER_TYPES",
    "RESPONSES",
    "EppError",
    "InferenceRequest",
    "Parser",
    "ParserSet",
    "new_request",
    "parse_body",
    "request_kind",
]
