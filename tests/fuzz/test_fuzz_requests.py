"""Fuzz the body parser (epp.requests): arbitrary bytes and arbitrary JSON shapes, on every path.

Whatever a client sends, `new_request` + `parse_body` either fill a request whose fields have the
types the scheduler relies on, or raise an EppError that is a 400 with an OpenAI-style JSON body.
A request a model server accepts is always accepted, and the body forwarded for it is JSON with
the same fields.
"""

from __future__ import annotations

import orjson
from hypothesis import given
from hypothesis import strategies as st

from epp.errors import EppError
from epp.protocol import MODEL_REWRITE_HEADER
from epp.requests import INFERENCE_KINDS, InferenceRequest, new_request, parse_body
from tests.fuzz.fuzz_checks import check_error_body
from tests.fuzz.fuzz_strategies import (
    HEADER_NAMES,
    HEADER_VALUES,
    INFERENCE_PATHS,
    JSON_VALUES,
    PATHS,
    dumps,
    fuzz_settings,
    good_request,
    request_bodies,
    request_like_json,
)

HEADERS = st.dictionaries(HEADER_NAMES, HEADER_VALUES, max_size=4)
BODIES = st.one_of(st.binary(max_size=500), request_bodies(), request_like_json().map(dumps), JSON_VALUES.map(dumps))


def parse(path: str, headers: dict[str, str], body: bytes) -> InferenceRequest | EppError:
    req = new_request(path, headers)
    try:
        return parse_body(req, body)
    except EppError as e:
        return e


def check_parsed(req: InferenceRequest) -> None:
    """The fields the scheduler, admission and metrics read, with the types they expect."""
    assert isinstance(req.model, str)
    assert isinstance(req.target_model, str)
    assert isinstance(req.prompt, str)
    assert isinstance(req.stream, bool)
    assert req.max_tokens is None or (isinstance(req.max_tokens, int) and req.max_tokens >= 0)
    assert isinstance(req.fairness_id, str)
    assert req.fairness_id
    if req.kind in INFERENCE_KINDS:
        assert req.model, "an inference request is accepted only with a model"
        assert req.parsed is not None
    forwarded = req.forwarded_body()
    if req.target_model != req.model:
        assert orjson.loads(forwarded)["model"] == req.target_model
    else:
        assert forwarded is req.body


@fuzz_settings(600)
@given(path=PATHS, headers=HEADERS, body=BODIES)
def test_any_body_is_parsed_or_rejected_with_a_400(path: str, headers: dict[str, str], body: bytes) -> None:
    out = parse(path, headers, body)
    if isinstance(out, EppError):
        assert out.http_status == 400, f"{out!r} for {body[:100]!r}"
        check_error_body(out.body())
    else:
        check_parsed(out)


@fuzz_settings(300)
@given(path=st.sampled_from(sorted(INFERENCE_PATHS)), prompt=st.text(max_size=300), model=st.text(min_size=1),
       rewrite=st.none() | st.text(min_size=1, max_size=20))
def test_every_request_a_server_accepts_is_accepted(path: str, prompt: str, model: str, rewrite: str | None) -> None:
    headers = {MODEL_REWRITE_HEADER: rewrite} if rewrite else {}
    out = parse(path, headers, good_request(INFERENCE_PATHS[path], prompt, model))
    assert isinstance(out, InferenceRequest), f"rejected: {out!r}"
    check_parsed(out)
    assert out.model == model
    assert out.target_model == (rewrite or model)
    assert prompt in out.prompt or (INFERENCE_PATHS[path] == "embeddings" and out.prompt == prompt)
    forwarded = orjson.loads(out.forwarded_body())
    assert {k: v for k, v in forwarded.items() if k != "model"} == {
        k: v for k, v in orjson.loads(good_request(INFERENCE_PATHS[path], prompt, model)).items() if k != "model"}


@fuzz_settings(200)
@given(path=PATHS, headers=HEADERS, body=BODIES)
def test_parsing_is_deterministic(path: str, headers: dict[str, str], body: bytes) -> None:
    """The same bytes always parse alike: a retried request is scheduled on the same prefix."""
    a, b = parse(path, headers, body), parse(path, headers, body)
    if isinstance(a, EppError):
        assert isinstance(b, EppError)
        assert a.body() == b.body()
    else:
        assert isinstance(b, InferenceRequest)
        assert (a.model, a.prompt, a.kind) == (b.model, b.prompt, b.kind)
