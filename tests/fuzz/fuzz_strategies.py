"""Hypothesis strategies for the fuzz tests: ext_proc messages as Envoy (or anyone on port 9002) might send them.

A sequence starts as a plausible request (headers, a body in chunks, maybe the response), then is
mutated: messages are dropped, repeated, reordered, and arbitrary ones are inserted. Plausible
prefixes reach the deep states (a pick, the response phase); the mutations reach the odd ones.

Every test here runs under `FUZZ`: derandomized (the same examples on every run, so CI is
deterministic), no example database, no per-example deadline (CI machines are slow and shared).
`EPP_FUZZ_EXAMPLES=N` raises the number of examples for a longer local run.
"""

from __future__ import annotations

import itertools
import json
import os
from typing import Any

import orjson
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from epp.protocol import (
    DESTINATION_HEADER,
    EXCHANGE_HEADER,
    FAIRNESS_ID_HEADERS,
    HANDOFF_HEADER,
    MODEL_REWRITE_HEADER,
    OBJECTIVE_HEADER,
    REQUEST_ID_HEADER,
    SUBSET_KEY,
    SUBSET_NAMESPACE,
)


def fuzz_settings(examples: int) -> settings:
    """Deterministic settings for CI; EPP_FUZZ_EXAMPLES overrides the example count for local runs."""
    return settings(
        max_examples=int(os.environ.get("EPP_FUZZ_EXAMPLES", examples)),
        derandomize=True,
        database=None,
        deadline=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                               HealthCheck.function_scoped_fixture],
    )


# --- JSON --------------------------------------------------------------------------------------

def dumps(value: Any) -> bytes:
    """JSON text of any value, integers past 64 bits included (which orjson cannot write)."""
    return json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")


JSON_SCALARS = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
                | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20))
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
# Values a field may hold: the right type, the wrong one, or an odd one of the right type.
FIELD_VALUES = JSON_VALUES | st.sampled_from(["", "m", "x" * 3000, "\u0000", "\ud7ff\U0010ffff", -1, 0, 2**64, 1.5,
                                              True, [], {}, [1, 2, 3], [[1, 2], [3]], ["a", "b"], [{"type": "text"}]])


@st.composite
def request_like_json(draw: st.DrawFn) -> dict[str, Any]:
    """An object shaped like an OpenAI request: the known fields, each present or not, of any value."""
    keys = ("model", "prompt", "messages", "input", "stream", "max_tokens", "max_completion_tokens",
            "stream_options", "n", "temperature")
    out: dict[str, Any] = {}
    for k in keys:
        if draw(st.booleans()):
            out[k] = draw(FIELD_VALUES | _good_field(k))
    out.update(draw(st.dictionaries(st.text(max_size=6), JSON_VALUES, max_size=2)))
    return out


def _good_field(key: str) -> st.SearchStrategy[Any]:
    if key == "model":
        return st.text(min_size=1, max_size=30)
    if key == "prompt":
        return (st.text(max_size=50) | st.lists(st.text(max_size=10), min_size=1, max_size=3)
                | st.lists(st.integers(0, 50000), min_size=1, max_size=5))
    if key == "messages":
        msg = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"])},
                                    optional={"content": st.text(max_size=30) | st.lists(
                                        st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=9)}),
                                        max_size=2)})
        return st.lists(msg, min_size=1, max_size=3)
    if key in ("stream",):
        return st.booleans()
    if key in ("max_tokens", "max_completion_tokens"):
        return st.integers(0, 5000)
    return JSON_VALUES


def good_request(kind: str, prompt: str, model: str = "m") -> bytes:
    """A body a model server accepts, for the inference path `kind` names."""
    if kind == "chat":
        return orjson.dumps({"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 4})
    if kind == "embeddings":
        return orjson.dumps({"model": model, "input": prompt})
    return orjson.dumps({"model": model, "prompt": prompt, "max_tokens": 4})


INFERENCE_PATHS = {"/v1/completions": "completions", "/v1/chat/completions": "chat", "/v1/embeddings": "embeddings"}
PATHS = (st.sampled_from([*INFERENCE_PATHS, "/v1/models", "/", "/v1/completions/?a=b", "/health", ""])
         | st.text(max_size=30).map(lambda s: "/" + s))


@st.composite
def request_bodies(draw: st.DrawFn) -> bytes:
    """A whole body: a good request, one of any shape, not JSON, not UTF-8, or far too large."""
    return draw(st.one_of(
        st.builds(good_request, st.sampled_from(["completions", "chat", "embeddings"]), st.text(max_size=200)),
        request_like_json().map(dumps),
        JSON_VALUES.map(dumps),
        st.binary(max_size=300),
        st.sampled_from([b"", b"{", b'{"model": ', b"\xff\xfe", b"null", b"[]", b'{"model":"m","prompt":"' + b"\xc3",
                         b'{"model":"m","prompt":"x"}' * 2, b"[" * 5000, b'{"model":"m","messages":' + b"[" * 3000,
                         b'{"model":"m","prompt":"\\ud800"}', b'{"model":"m","prompt":"a"}\x00']),
        st.integers(3000, 200_000).map(lambda n: b'{"model":"m","prompt":"' + b"y" * n + b'"}'),
    ))


# --- ext_proc messages --------------------------------------------------------------------------

# BodySendMode values: NONE, STREAMED, BUFFERED, BUFFERED_PARTIAL, FULL_DUPLEX_STREAMED, GRPC, and
# ones this proto version does not know (proto3 enums are open).
MODES = st.sampled_from([0, 1, 2, 3, 4, 5, 77])
HEADER_NAMES = st.sampled_from([OBJECTIVE_HEADER, *FAIRNESS_ID_HEADERS, MODEL_REWRITE_HEADER, REQUEST_ID_HEADER,
                                EXCHANGE_HEADER, HANDOFF_HEADER, DESTINATION_HEADER, SUBSET_KEY, "content-type",
                                "content-length", "authorization", ":method", ":authority"]) | st.text(max_size=12)
HEADER_VALUES = st.text(max_size=40) | st.sampled_from(["", "critical", "batch", "-1", "m", "x" * 9000])


def header_map(headers: dict[str, str], raw: bool) -> base_pb2.HeaderMap:
    """Envoy sends raw_value; older Envoys (and anyone else) may send value."""
    if raw:
        return base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode("utf-8", "surrogatepass"))
                                           for k, v in headers.items()])
    return base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, value=v) for k, v in headers.items()])


@st.composite
def subset_metadata(draw: st.DrawFn, pool: list[str]) -> pb.ProcessingRequest:
    """A ProcessingRequest carrying only a subset hint: a list, a comma string, or something else."""
    msg = pb.ProcessingRequest()
    ns = msg.metadata_context.filter_metadata[SUBSET_NAMESPACE]
    names = draw(st.lists(st.sampled_from([*pool, "127.0.0.1:1", "", "garbage", "[::1]:5"]), max_size=4))
    shape = draw(st.sampled_from(["list", "string", "number", "struct", "other-key"]))
    if shape == "list":
        lv = ns.fields[SUBSET_KEY].list_value
        for n in names:
            lv.values.add().string_value = n
        if draw(st.booleans()):
            lv.values.add().number_value = 3.0
    elif shape == "string":
        ns.fields[SUBSET_KEY].string_value = ", ".join(names)
    elif shape == "number":
        ns.fields[SUBSET_KEY].number_value = 1.0
    elif shape == "struct":
        ns.fields[SUBSET_KEY].struct_value.fields["a"].string_value = "b"
    else:
        ns.fields["unrelated"].string_value = "x"
    return msg


@st.composite
def request_headers_msg(draw: st.DrawFn, pool: list[str], path: str | None = None, eos: bool | None = None,
                        mode: int | None = None) -> pb.ProcessingRequest:
    headers: dict[str, str] = {}
    if draw(st.integers(0, 9)) > 0:
        headers[":path"] = path if path is not None else draw(PATHS)
    headers.update(draw(st.dictionaries(HEADER_NAMES, HEADER_VALUES, max_size=3)))
    msg = pb.ProcessingRequest(request_headers=pb.HttpHeaders(
        headers=header_map(headers, raw=draw(st.integers(0, 4)) > 0),
        end_of_stream=draw(st.booleans()) if eos is None else eos))
    if draw(st.integers(0, 4)) > 0:
        m = draw(MODES) if mode is None else mode
        msg.protocol_config.request_body_mode = m
        msg.protocol_config.response_body_mode = draw(st.sampled_from([m, 0, 1, 2, 4]))
        msg.protocol_config.send_body_without_waiting_for_header_response = draw(st.booleans())
    if draw(st.integers(0, 3)) == 0:
        msg.MergeFrom(draw(subset_metadata(pool)))
    return msg


def body_msg(data: bytes, eos: bool) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(request_body=pb.HttpBody(body=data, end_of_stream=eos))


SSE_CHUNKS = st.sampled_from([
    b'data: {"choices":[{"text":"a"}]}\n\n',
    b'data: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2}}\n\ndata: [DONE]\n\n',
    b'data: {"usage":{"prompt_tokens":"x","completion_tokens":-1}}\n\n',
    b'data: {"usage":{"prompt_tokens":1e400}}\n\n',
    b'{"usage":{"prompt_tokens":3,"completion_tokens":1}}',
    b"data: [DONE]\n\n", b"data: {", b"\n\n\n", b"",
]) | st.binary(max_size=200)


@st.composite
def response_msg(draw: st.DrawFn) -> pb.ProcessingRequest:
    kind = draw(st.sampled_from(["headers", "body", "trailers"]))
    if kind == "headers":
        headers = {}
        if draw(st.integers(0, 5)) > 0:
            headers[":status"] = draw(st.sampled_from(["200", "429", "500", "503", "99", "abc", "", "2000000000000"]))
        if draw(st.booleans()):
            headers["content-type"] = draw(st.sampled_from(["text/event-stream", "application/json", "text/plain"]))
        return pb.ProcessingRequest(response_headers=pb.HttpHeaders(headers=header_map(headers, raw=True),
                                                                    end_of_stream=draw(st.booleans())))
    if kind == "body":
        return pb.ProcessingRequest(response_body=pb.HttpBody(body=draw(SSE_CHUNKS),
                                                              end_of_stream=draw(st.booleans())))
    return pb.ProcessingRequest(response_trailers=pb.HttpTrailers(trailers=header_map({"grpc-status": "0"}, True)))


@st.composite
def any_message(draw: st.DrawFn, pool: list[str]) -> pb.ProcessingRequest:
    """Any one message a stream might carry, including one that sets no kind at all."""
    return draw(st.one_of(
        request_headers_msg(pool),
        st.builds(body_msg, request_bodies() | st.binary(max_size=100), st.booleans()),
        st.just(pb.ProcessingRequest(request_trailers=pb.HttpTrailers())),
        response_msg(),
        st.just(pb.ProcessingRequest()),  # no kind set (a newer Envoy's message, or nothing)
        subset_metadata(pool),
    ))


@st.composite
def chunked(draw: st.DrawFn, body: bytes) -> list[bytes]:
    """The body cut at arbitrary points."""
    if not body:
        return [b""]
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, len(body) - 1)), max_size=4))))
    bounds = [0, *cuts, len(body)]
    return [body[a:b] for a, b in itertools.pairwise(bounds) if b > a] or [body]


@st.composite
def plausible_stream(draw: st.DrawFn, pool: list[str]) -> list[pb.ProcessingRequest]:
    """What Envoy sends for one request: headers, the body in chunks (or none), maybe the response."""
    mode = draw(st.sampled_from([2, 4, 4, 1, 0]))
    path = draw(st.sampled_from([*INFERENCE_PATHS, "/v1/models", "/other"]))
    without_body = draw(st.integers(0, 5)) == 0
    msgs = [draw(request_headers_msg(pool, path=path, eos=without_body, mode=mode))]
    if not without_body:
        kind = INFERENCE_PATHS.get(path, "completions")
        body = draw(st.builds(good_request, st.just(kind), st.text(max_size=100)) | request_bodies())
        chunks = draw(chunked(body)) if mode != 2 else [body]
        ends_with_trailers = draw(st.integers(0, 5)) == 0
        for i, c in enumerate(chunks):
            msgs.append(body_msg(c, eos=i == len(chunks) - 1 and not ends_with_trailers))
        if ends_with_trailers:
            msgs.append(pb.ProcessingRequest(request_trailers=pb.HttpTrailers()))
    if draw(st.booleans()):
        msgs.extend(draw(st.lists(response_msg(), max_size=4)))
    return msgs


@st.composite
def message_sequence(draw: st.DrawFn, pool: list[str]) -> list[pb.ProcessingRequest]:
    """A plausible stream, then mutated: messages dropped, repeated, swapped, and arbitrary ones inserted."""
    msgs = draw(plausible_stream(pool))
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["insert", "drop", "repeat", "swap"]))
        i = draw(st.integers(0, len(msgs)))
        if op == "insert":
            msgs.insert(i, draw(any_message(pool)))
        elif msgs and i < len(msgs):
            if op == "drop":
                del msgs[i]
            elif op == "repeat":
                msgs.insert(i, msgs[i])
            else:
                j = draw(st.integers(0, len(msgs) - 1))
                msgs[i], msgs[j] = msgs[j], msgs[i]
    return msgs


def unknown_field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field this proto version does not define (a newer Envoy's)."""
    def varint(n: int) -> bytes:
        out = bytearray()
        while True:
            b, n = n & 0x7F, n >> 7
            out.append(b | (0x80 if n else 0))
            if not n:
                return bytes(out)
    return varint(number << 3 | 2) + varint(len(payload)) + payload
