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


# --- the parsers, by path, as upstream resolves them ---------------------------------------
from epp.requests import (  # noqa: E402
    CONVERSATIONS,
    GENERATE,
    IMAGES,
    MESSAGES,
    RESPONSES,
    AnthropicParser,
    OpenAIParser,
    ParserSet,
    PassthroughParser,
    SGLangHTTPParser,
    VllmHTTPParser,
)


@pytest.mark.parametrize(("path", "kind"), [
    ("/v1/chat/completions", CHAT), ("/v1/chat/completions/render", CHAT), ("/v1/completions", COMPLETIONS),
    ("/v1/responses", RESPONSES), ("/v1/conversations", CONVERSATIONS), ("/v1/images/generations", IMAGES),
    ("/v1/messages", MESSAGES), ("/v1/messages/count_tokens", OTHER), ("/inference/v1/generate", GENERATE),
    ("/generate", OTHER), ("/v1/models", OTHER), ("/openai/v1/completions/", COMPLETIONS),
])
def test_default_parsers_resolve_by_the_longest_suffix(path: str, kind: str) -> None:
    assert request_kind(path) == kind


def test_prompt_as_a_list_of_strings_and_of_token_id_lists() -> None:
    assert parse("/v1/completions", {"model": MODEL, "prompt": ["a", "b"]}).prompt == "a\nb"
    assert parse("/v1/completions", {"model": MODEL, "prompt": [[1, 2], [3]]}).prompt == "1 2\n3"


def test_anthropic_messages_flatten_system_then_turns() -> None:
    body = {"model": "claude", "max_tokens": 64, "stream": True, "system": [{"type": "text", "text": "be kind"}],
            "messages": [{"role": "user", "content": "hi"},
                         {"role": "assistant", "content": [{"type": "text", "text": "hello"}]}]}
    r = parse("/v1/messages", body)
    assert (r.kind, r.model, r.max_tokens, r.stream) == (MESSAGES, "claude", 64, True)
    assert r.prompt.startswith("<|system|>\nbe kind\n<|user|>\nhi\n")
    longer = parse("/v1/messages", {**body, "messages": [*body["messages"], {"role": "user", "content": "more"}]})
    assert longer.prompt.startswith(r.prompt)  # prefix preserving, as chat is


@pytest.mark.parametrize("body", [{"model": "c"}, {"model": "c", "messages": []}, {"messages": [{"role": "user"}]},
                                  {"model": "c", "messages": [{"content": "no role"}]}])
def test_bad_anthropic_bodies_are_400(body) -> None:
    with pytest.raises(EppError) as e:
        parse("/v1/messages", body)
    assert e.value.http_status == 400


def test_count_tokens_is_forwarded_uninterpreted() -> None:
    r = parse("/v1/messages/count_tokens", b"not even json")
    assert (r.kind, r.prompt) == (OTHER, "")


def test_vllm_generate_takes_token_ids_and_sampling_max_tokens() -> None:
    r = parse("/inference/v1/generate", {"token_ids": [5, 6, 7], "sampling_params": {"max_tokens": 9}})
    assert (r.kind, r.model, r.prompt, r.max_tokens) == (GENERATE, "", "5 6 7", 9)
    with pytest.raises(EppError, match="token_ids"):
        parse("/inference/v1/generate", {"token_ids": []})


def test_sglang_generate_single_and_batched_input_ids() -> None:
    sglang = ParserSet([SGLangHTTPParser(), PassthroughParser()])
    r = parse_body(new_request("/generate", {}, sglang), orjson.dumps({"input_ids": [[1, 2], [3]]}))
    assert (r.kind, r.prompt) == (GENERATE, "1 2\n3")
    with pytest.raises(EppError, match="input_ids"):
        parse_body(new_request("/generate", {}, sglang), orjson.dumps({"text": "hi"}))


def test_responses_conversations_and_images() -> None:
    r = parse("/v1/responses", {"model": MODEL, "instructions": "terse", "max_output_tokens": 5,
                                "input": [{"role": "user", "content": [{"type": "input_text", "text": "q"}]}]})
    assert (r.kind, r.max_tokens) == (RESPONSES, 5)
    assert r.prompt.startswith("<|system|>\nterse\n<|user|>")
    c = parse("/v1/conversations", {"items": [{"type": "message", "role": "user", "content": "hello"}]})
    assert (c.kind, c.model, c.prompt) == (CONVERSATIONS, "", "<|user|>\nhello\n")
    assert parse("/v1/images/generations", {"prompt": "a cat"}).prompt == "a cat"
    for path, body in (("/v1/responses", {"model": MODEL}), ("/v1/conversations", {"items": []}),
                       ("/v1/images/generations", {"n": 1})):
        with pytest.raises(EppError):
            parse(path, body)


def test_a_cache_salt_separates_otherwise_equal_prompts() -> None:
    plain = parse("/v1/completions", {"model": MODEL, "prompt": "same"}).prompt
    salted = parse("/v1/completions", {"model": MODEL, "prompt": "same", "cache_salt": "tenant-a"}).prompt
    assert salted != plain
    assert salted.endswith(plain)


def test_an_explicit_parser_list_has_no_fallback() -> None:
    only_openai = ParserSet([OpenAIParser()])
    r = new_request("/v1/models", {}, only_openai)
    with pytest.raises(EppError) as e:
        parse_body(r, b"")
    assert e.value.http_status == 400
    assert e.value.reason == "unsupported_path"


def test_a_parser_after_the_fallback_or_twice_is_skipped() -> None:
    s = ParserSet([VllmHTTPParser(), PassthroughParser(), AnthropicParser(), VllmHTTPParser("again")])
    assert s.names() == ["vllmhttp-parser", "passthrough-parser"]
    assert len(s.warnings) == 2
    assert request_kind("/v1/messages", s) == OTHER
