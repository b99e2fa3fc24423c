"""What every answer of epp's ext_proc handler must be, and what must hold once a stream is over.

Shared by the direct PickStream fuzz test and the one over real gRPC.
"""

from __future__ import annotations

import orjson
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from epp.protocol import DESTINATION_HEADER, DESTINATION_NAMESPACE, EXCHANGE_HEADER
from epp.server import EppServer

# For each kind of message, the kinds of answer that fit it. A request-headers answer to a body
# message is the held headers response of FULL_DUPLEX_STREAMED, which carries the pick; a body
# answer to a headers message is the body epp sends on after such a pick.
FITS = {
    "request_headers": {"request_headers", "request_body", "immediate_response"},
    "request_body": {"request_body", "request_headers", "immediate_response"},
    "request_trailers": {"request_trailers", "request_headers", "request_body", "immediate_response"},
    "response_headers": {"response_headers"},
    "response_body": {"response_body"},
    "response_trailers": {"response_trailers"},
}


def as_response(answer: bytes | pb.ProcessingResponse) -> pb.ProcessingResponse:
    """What goes on the wire: epp sends some answers pre-serialized."""
    if isinstance(answer, bytes):
        return pb.ProcessingResponse.FromString(answer)
    assert isinstance(answer, pb.ProcessingResponse), f"not a ProcessingResponse: {type(answer).__name__}"
    # It must also serialize: a field set to something unserializable fails only on the wire.
    return pb.ProcessingResponse.FromString(answer.SerializeToString())


def set_headers(resp: pb.ProcessingResponse) -> dict[str, str]:
    kind = resp.WhichOneof("response")
    if kind not in ("request_headers", "request_body"):
        return {}
    common = getattr(resp, kind).response
    return {h.header.key: (h.header.raw_value or h.header.value.encode()).decode()
            for h in common.header_mutation.set_headers}


def pick_of(resp: pb.ProcessingResponse) -> tuple[str, str] | None:
    """(primary, exchange key) when this answer carries a pick, else None."""
    hs = set_headers(resp)
    if DESTINATION_HEADER not in hs:
        return None
    return hs[DESTINATION_HEADER], hs.get(EXCHANGE_HEADER, "")


def check_immediate(resp: pb.ProcessingResponse) -> None:
    """An ImmediateResponse is an HTTP error with an OpenAI-style JSON body."""
    imm = resp.immediate_response
    assert 400 <= imm.status.code <= 599, f"immediate response status {imm.status.code}"
    hs = {h.header.key: h.header.raw_value for h in imm.headers.set_headers}
    assert hs.get("content-type") == b"application/json", f"immediate response headers {hs}"
    check_error_body(imm.body)


def check_error_body(body: bytes) -> None:
    """An OpenAI-style error: {"error": {"message", "type", "param", "code"}}, message and type non-empty."""
    err = orjson.loads(body)["error"]
    for field in ("message", "type"):
        assert isinstance(err[field], str), err
        assert err[field], err
    assert {"code", "param"} <= err.keys(), err


def check_answers(kind: str, answers: list[pb.ProcessingResponse], pool: list[str]) -> None:
    """The answers to one message fit it; a pick names a pool endpoint; an immediate response comes last."""
    for i, resp in enumerate(answers):
        got = resp.WhichOneof("response")
        assert got in FITS[kind], f"a {kind} message answered with {got}"
        if got == "immediate_response":
            check_immediate(resp)
            assert i == len(answers) - 1, "answers after an immediate response"
        pick = pick_of(resp)
        if pick is not None:
            primary, _ = pick
            assert primary in pool, f"picked {primary!r}, not a pool endpoint"
            md = resp.dynamic_metadata.fields[DESTINATION_NAMESPACE].struct_value.fields[DESTINATION_HEADER]
            targets = md.string_value.split(",")
            assert targets[0] == primary, f"metadata targets {md.string_value!r} do not start with {primary!r}"
            assert set(targets) <= set(pool), f"metadata targets {md.string_value!r} outside the pool"
        if got == "request_body" and kind == "request_headers":
            assert pick_of(answers[0]) is not None, "body sent on without a pick before it"


def running_requests(server_or_metrics: object) -> float:
    """The sum of inference_objective_running_requests over every label set."""
    registry = server_or_metrics.metrics.registry if isinstance(server_or_metrics, EppServer) else \
        server_or_metrics.registry  # type: ignore[attr-defined]
    return sum(s.value for fam in registry.collect() if fam.name == "inference_objective_running_requests"
               for s in fam.samples)
