"""Request parsing: what reaches the scheduler, and the 400s clients get for bad bodies."""

import orjson
import pytest

from epp.errors import EppError
from epp.requests import CHAT, COMPLETIONS, OTHER, new_request, parse_body, request_kind

MODEL = "m"


def parse(path: str, body: bytes | dict, headers: dict | None = None):
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    return parse_body(new_request(path, headers or {}), raw)


def test_kinds_ignore_query_strings() -> None:
    assert request_kind("/v1/chat/completions?x=1") == CHAT
    assert request_kind("/v1/completions") == COMPLETIONS
    assert request_kind("/v1/models") == OTHER


def test_completion_fields() -> None:
    r = parse("/v1/completions", {"model": MODEL, "prompt": "hello", "stream": True, "max_tokens": 7})
    assert (r.model, r.target_model, r.prompt, r.stream, r.max_tokens) == (MODEL, MODEL, "hello", True, 7)


def test_token_id_prompts_hash_as_text() -> None:
    assert parse("/v1/completions", {"model": MODEL, "prompt": [1, 2, 3]}).prompt == "1 2 3"


def test_chat_flattening_is_prefix_preserving() -> None:
    """A longer conversation's text extends the shorter one's: prefix hashing can match turns."""
    turn1 = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    turn2 = [*turn1, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "more"}]
    a = parse("/v1/chat/completions", {"model": MODEL, "messages": turn1}).prompt
    b = parse("/v1/chat/completions", {"model": MODEL, "messages": turn2}).prompt
    assert b.startswith(a)
    assert len(b) > len(a)


def test_chat_content_parts() -> None:
    parts = [{"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": "u"}}]
    msgs = [{"role": "user", "content": parts}]
    prompt = parse("/v1/chat/completions", {"model": MODEL, "messages": msgs}).prompt
    assert "look" in prompt
    assert "image_url" in prompt


def test_objective_and_fairness_headers() -> None:
    r = parse("/v1/completions", {"model": MODEL, "prompt": "x"},
              {"x-gateway-inference-objective": "batch", "x-gateway-inference-fairness-id": "team-a"})
    assert (r.objective, r.fairness_id) == ("batch", "team-a")
    assert parse("/v1/completions", {"model": MODEL, "prompt": "x"}).fairness_id == "default-flow"


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b"{not json", "not valid JSON"),
        (b'{"model": "\xff\xfe", "prompt": "x"}', "not valid UTF-8"),
        (b"[1, 2]", "must be a JSON object"),
        (b"", "empty"),
        (orjson.dumps({"prompt": "x"}), "'model' is required"),
        (orjson.dumps({"model": 3, "prompt": "x"}), "'model' must be a non-empty string"),
        (orjson.dumps({"model": MODEL}), "'prompt' is required"),
        (orjson.dumps({"model": MODEL, "prompt": {"a": 1}}), "'prompt' must be"),
        (orjson.dumps({"model": MODEL, "prompt": "x", "stream": "yes"}), "'stream' must be a boolean"),
        (orjson.dumps({"model": MODEL, "prompt": "x", "max_tokens": -1}), "'max_tokens' must be"),
    ],
)
def test_bad_completion_bodies_are_400(body: bytes, needle: str) -> None:
    with pytest.raises(EppError) as e:
        parse("/v1/completions", body)
    assert e.value.http_status == 400
    assert needle in e.value.message
    err = orjson.loads(e.value.body())["error"]
    assert err["type"] == "invalid_request_error"
    assert needle in err["message"]


@pytest.mark.parametrize(
    "messages", [None, [], "hi", [1], [{"content": "no role"}], [{"role": "user", "content": 5}]]
)
def test_bad_chat_messages_are_400(messages) -> None:
    body = {"model": MODEL} if messages is None else {"model": MODEL, "messages": messages}
    with pytest.raises(EppError) as e:
        parse("/v1/chat/completions", body)
    assert e.value.http_status == 400


def test_other_paths_never_fail_on_body() -> None:
    r = parse("/tokenize", b"\x00 not json")
    assert r.kind == OTHER
    assert r.model == ""
    assert parse("/tokenize", {"model": MODEL}).model == MODEL


def test_rewrite_model_changes_only_the_model() -> None:
    r = parse("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 3})
    assert r.forwarded_body() is r.body  # unchanged: the very same bytes are forwarded
    r.target_model = "m-lora-v2"
    assert orjson.loads(r.forwarded_body()) == {"model": "m-lora-v2", "prompt": "x", "max_tokens": 3}
