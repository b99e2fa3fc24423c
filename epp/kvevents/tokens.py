"""The token ids of a request's prompt, as the model server will see them, or None.

A precise index is keyed by token ids, so epp must know the server's tokens. It does when the
client sends them (`/v1/completions` with `prompt` as token ids, vLLM's and SGLang's token-in
generate APIs), and for epp's own simulator, whose tokenizer is 4 bytes of UTF-8 a token.
Text prompts to a real server would need its tokenizer and chat template, which epp does not
run: those requests get no precise match and fall back to the approximate index.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from epp.kvevents.hashing import simulator_token_ids
from epp.requests import COMPLETIONS, GENERATE, InferenceRequest

REQUEST = "request"  # token ids given in the request only
SIMULATOR = "simulator"  # and text rendered and tokenized as epp's simulator does
TOKENIZERS = (REQUEST, SIMULATOR)


def _ids(value: Any) -> list[int] | None:
    if isinstance(value, list) and value and all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 1 << 32 for t in value):
        return value
    return None


def request_token_ids(request: InferenceRequest) -> list[int] | None:
    """Token ids the client sent, if it sent a single prompt of them."""
    data = request.parsed
    if data is None:
        return None
    if request.kind == COMPLETIONS:
        return _ids(data.get("prompt"))
    if request.kind == GENERATE:
        return _ids(data.get("token_ids")) or _ids(data.get("input_ids"))
    return None


def cache_salt(request: InferenceRequest) -> str:
    data = request.parsed or {}
    salt = data.get("cache_salt") if request.kind != GENERATE or "token_ids" in data else data.get("extra_key")
    return salt if isinstance(salt, str) else ""


def tokenizer(kind: str) -> Callable[[InferenceRequest], list[int] | None]:
    if kind == REQUEST:
        return request_token_ids
    if kind != SIMULATOR:
        raise ValueError(f"tokenizer {kind!r}: want one of {', '.join(TOKENIZERS)}")
    from epp.simulator.server import prompt_text  # the simulator's rendering of chats and prompts

    def simulated(request: InferenceRequest) -> list[int] | None:
        given = request_token_ids(request)
        if given is not None or request.parsed is None:
            return given
        if request.kind not in (COMPLETIONS, "chat"):
            return None
        return simulator_token_ids(prompt_text(request.kind, request.parsed))

    return simulated
