"""Build ext_proc ProcessingResponses.

Responses that never change (continue, empty body/trailer acks) are serialized once
at import and sent as bytes: the servicer's serializer passes bytes through.
"""

from __future__ import annotations

from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2

from epp.errors import EppError
from epp.protocol import DESTINATION_HEADER, DESTINATION_NAMESPACE, DESTINATION_SCORES_KEY

BODY_CHUNK_LIMIT = 62000  # Envoy's per-message body limit for streamed mutations, with room to spare

_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD

CONTINUE_REQUEST_HEADERS = pb.ProcessingResponse(request_headers=pb.HeadersResponse()).SerializeToString()
CONTINUE_REQUEST_BODY = pb.ProcessingResponse(request_body=pb.BodyResponse()).SerializeToString()
CONTINUE_REQUEST_TRAILERS = pb.ProcessingResponse(request_trailers=pb.TrailersResponse()).SerializeToString()
CONTINUE_RESPONSE_HEADERS = pb.ProcessingResponse(response_headers=pb.HeadersResponse()).SerializeToString()
CONTINUE_RESPONSE_BODY = pb.ProcessingResponse(response_body=pb.BodyResponse()).SerializeToString()
CONTINUE_RESPONSE_TRAILERS = pb.ProcessingResponse(response_trailers=pb.TrailersResponse()).SerializeToString()


def _header(key: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=key, raw_value=value.encode()), append_action=_OVERWRITE
    )


def destination_metadata(targets: str, scores: dict[str, float] | None = None) -> struct_pb2.Struct:
    """`envoy.lb`: the pick and its fallbacks, and with --emit-endpoint-scores each one's score."""
    md = struct_pb2.Struct()
    ns = md.fields[DESTINATION_NAMESPACE].struct_value
    ns.fields[DESTINATION_HEADER].string_value = targets
    if scores:
        fields = ns.fields[DESTINATION_SCORES_KEY].struct_value.fields
        for hostport, score in scores.items():
            fields[hostport].number_value = score
    return md


def routing_mutation(
    primary: str, content_length: int | None, extra: dict[str, str] | None = None
) -> pb.HeaderMutation:
    headers = [_header(DESTINATION_HEADER, primary)]
    if content_length is not None:
        headers.append(_header("content-length", str(content_length)))
    if extra:
        headers.extend(_header(k, v) for k, v in extra.items())
    return pb.HeaderMutation(set_headers=headers)


def route_on_headers(primary: str, targets: str, content_length: int | None,
                     extra: dict[str, str] | None = None, scores: dict[str, float] | None = None,
                     ) -> pb.ProcessingResponse:
    """The pick, answered on the request-headers phase (requests without a body, and FULL_DUPLEX_STREAMED)."""
    return pb.ProcessingResponse(
        request_headers=pb.HeadersResponse(
            response=pb.CommonResponse(
                header_mutation=routing_mutation(primary, content_length, extra), clear_route_cache=True
            )
        ),
        dynamic_metadata=destination_metadata(targets, scores),
    )


def route_on_body(primary: str, targets: str, new_body: bytes | None,
                  extra: dict[str, str] | None = None, scores: dict[str, float] | None = None,
                  ) -> pb.ProcessingResponse:
    """The pick, answered on the buffered request-body phase; the body is replaced if rewritten."""
    common = pb.CommonResponse(
        header_mutation=routing_mutation(primary, len(new_body) if new_body is not None else None, extra),
        clear_route_cache=True,
    )
    if new_body is not None:
        common.body_mutation.body = new_body
    return pb.ProcessingResponse(
        request_body=pb.BodyResponse(response=common), dynamic_metadata=destination_metadata(targets, scores)
    )


def response_headers_mutation(headers: tuple[tuple[str, str], ...]) -> pb.ProcessingResponse:
    """Continue the response, with headers the plugins add for the client (session tokens, ...)."""
    return pb.ProcessingResponse(response_headers=pb.HeadersResponse(response=pb.CommonResponse(
        header_mutation=pb.HeaderMutation(set_headers=[_header(k, v) for k, v in headers]))))


def streamed_body(body: bytes, *, request: bool, end_of_stream: bool) -> list[pb.ProcessingResponse]:
    """FULL_DUPLEX_STREAMED: the processor sends the body on itself, in chunks Envoy accepts."""
    out = []
    chunks = [body[i : i + BODY_CHUNK_LIMIT] for i in range(0, len(body), BODY_CHUNK_LIMIT)] or [b""]
    last = len(chunks) - 1
    for i, chunk in enumerate(chunks):
        common = pb.CommonResponse()
        common.body_mutation.streamed_response.body = chunk
        common.body_mutation.streamed_response.end_of_stream = end_of_stream and i == last
        if request:
            out.append(pb.ProcessingResponse(request_body=pb.BodyResponse(response=common)))
        else:
            out.append(pb.ProcessingResponse(response_body=pb.BodyResponse(response=common)))
    return out


def immediate(error: EppError) -> pb.ProcessingResponse:
    """End the HTTP request here with an OpenAI-style JSON error."""
    return pb.ProcessingResponse(
        immediate_response=pb.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=error.http_status),
            headers=pb.HeaderMutation(set_headers=[_header("content-type", "application/json"),
                                                   *(_header(k, v) for k, v in error.headers.items())]),
            body=error.body(),
            details=f"epp_{error.code}",
        )
    )
