"""The ext_proc ExternalProcessor service: one bidirectional stream per HTTP request.

Request phase. Headers arrive first. A request without a body is routed at once.
In BUFFERED mode the headers are acknowledged and the whole body arrives in one
message; the pick rides on the body response. In FULL_DUPLEX_STREAMED mode the
body arrives in chunks while the headers wait unanswered; once the body is
complete the pick rides on the headers response and the EPP sends the body back
itself. Errors end the HTTP request with an ImmediateResponse, never the stream.
In the HTTP pick layout (`epp.http_pick`) a stream whose headers carry
`x-epp-rewrite-body` and a pick's `x-epp-request-id` only swaps in that pick's
rewritten body, or answers with the 5xx error that pick ended in.

Response phase, watched for status, time to first byte and `usage`, in one of two
layouts. Inline: the same stream carries response headers, body chunks (echoed
back in FULL_DUPLEX_STREAMED) and trailers, so every chunk waits on the EPP.
Observed: the pick stream ends with the request phase, and a second ext_proc
filter in `observability_mode` opens its own stream, which Envoy feeds without
waiting for answers; it names the exchange by the `x-epp-request-id` header the
pick set. Either way the request counts as finished exactly once: when the
response ends, when its stream ends early (client gone, upstream reset), or, for
a pick no stream watches, `observer_grace` seconds after the pick stream closed
(the bookkeeping is `epp.exchanges`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from epp import errors
from epp.exchanges import EXCHANGE_HEADER, REWRITE_HEADER, Exchange, Exchanges
from epp.extproc import responses as R
from epp.requests import InferenceRequest, new_request

log = logging.getLogger(__name__)

SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"


def _body_modes() -> tuple[int, int]:
    from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2 as pm

    return pm.ProcessingMode.BUFFERED, pm.ProcessingMode.FULL_DUPLEX_STREAMED


MODE_BUFFERED, MODE_FULL_DUPLEX = _body_modes()


def _serialize(msg: bytes | pb.ProcessingResponse) -> bytes:
    return msg if type(msg) is bytes else msg.SerializeToString()


def _headers(hm: pb.HttpHeaders) -> dict[str, str]:
    out = {}
    for h in hm.headers.headers:
        out[h.key] = h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value
    return out


def _subset_hint(msg: pb.ProcessingRequest) -> list[str] | None:
    fm = msg.metadata_context.filter_metadata
    if R.SUBSET_NAMESPACE not in fm:
        return None
    value = fm[R.SUBSET_NAMESPACE].fields.get(R.SUBSET_KEY)
    if value is None:
        return None
    if value.HasField("list_value"):
        return [v.string_value for v in value.list_value.values]
    if value.HasField("string_value"):
        return [s.strip() for s in value.string_value.split(",") if s.strip()]
    return None


class ExternalProcessor:
    """Serves envoy.service.ext_proc.v3.ExternalProcessor/Process."""

    def __init__(self, exchanges: Exchanges, *, max_body_bytes: int = 16 << 20) -> None:
        self.exchanges = exchanges
        self.max_body_bytes = max_body_bytes
        self.active_streams = 0

    def handler(self) -> grpc.GenericRpcHandler:
        method = grpc.stream_stream_rpc_method_handler(
            self.process,
            request_deserializer=pb.ProcessingRequest.FromString,
            response_serializer=_serialize,
        )
        return grpc.method_handlers_generic_handler(SERVICE, {"Process": method})

    async def process(
        self, requests: AsyncIterator[pb.ProcessingRequest], context: Any
    ) -> AsyncIterator[bytes | pb.ProcessingResponse]:
        xs = self.exchanges
        req: InferenceRequest | None = None
        ex: Exchange | None = None
        picked_ex: Exchange | None = None  # a rewrite-only stream's exchange, picked over HTTP
        body = bytearray()
        body_mode = MODE_BUFFERED
        response_mode = MODE_BUFFERED
        subset: list[str] | None = None
        received_at = time.monotonic()
        self.active_streams += 1
        try:
            async for msg in requests:
                kind = msg.WhichOneof("request")
                if msg.observability_mode:
                    await self._observe(msg, requests)
                    return
                if kind == "request_headers":
                    if msg.HasField("protocol_config"):
                        body_mode = msg.protocol_config.request_body_mode
                        response_mode = msg.protocol_config.response_body_mode
                    subset = _subset_hint(msg)
                    headers = _headers(msg.request_headers)
                    req = new_request(headers.get(":path", "/"), headers)
                    if REWRITE_HEADER in headers:
                        # The HTTP pick layout: picked already, this stream only carries the new body,
                        # or the 5xx error the pick ended with.
                        deferred = xs.take_deferred_error(headers.get(EXCHANGE_HEADER))
                        if deferred is not None:
                            yield R.immediate(deferred)
                            return
                        picked = xs.get(headers.get(EXCHANGE_HEADER))
                        if picked is not None and picked.new_body is not None:
                            req, picked_ex = picked.req, picked
                    if msg.request_headers.end_of_stream:
                        # No body (GET /v1/models, ...): route now.
                        try:
                            ex = xs.pick_without_body(req, subset, received_at)
                        except errors.EppError as e:
                            yield self._fail(req, e)
                            return
                        yield R.route_on_headers(ex.decision.endpoint.hostport, ex.decision.targets, None,
                                                 xs.pick_headers(ex))
                    elif body_mode != MODE_FULL_DUPLEX:
                        yield R.CONTINUE_REQUEST_HEADERS
                elif kind == "request_body":
                    if req is None:
                        continue
                    if ex is not None:
                        # Only reachable if the proxy sends body after we routed; pass it on unchanged.
                        yield (R.streamed_body(msg.request_body.body, request=True,
                                               end_of_stream=msg.request_body.end_of_stream)[0]
                               if body_mode == MODE_FULL_DUPLEX else R.CONTINUE_REQUEST_BODY)
                        continue
                    body += msg.request_body.body
                    if len(body) > self.max_body_bytes:
                        yield self._fail(req, errors.bad_request(
                            f"request body exceeds the limit of {self.max_body_bytes} bytes",
                            reason="request_too_large"))
                        return
                    if not msg.request_body.end_of_stream:
                        if body_mode not in (MODE_BUFFERED, MODE_FULL_DUPLEX):
                            yield R.CONTINUE_REQUEST_BODY
                        continue
                    if picked_ex is not None:
                        for r in self._rewrite_body(picked_ex, body_mode):
                            yield r
                        req = picked_ex = None
                        continue
                    try:
                        ex, out = self._route_body(req, bytes(body), subset, body_mode, received_at)
                    except errors.EppError as e:
                        yield self._fail(req, e)
                        return
                    body = bytearray()
                    for r in out:
                        yield r
                elif kind == "request_trailers":
                    if picked_ex is not None and body_mode == MODE_FULL_DUPLEX:
                        for r in self._rewrite_body(picked_ex, body_mode):
                            yield r
                        req = picked_ex = None
                    elif req is not None and ex is None and body_mode == MODE_FULL_DUPLEX:
                        # The body ended with trailers rather than an end-of-stream chunk.
                        try:
                            ex, out = self._route_body(req, bytes(body), subset, body_mode, received_at)
                        except errors.EppError as e:
                            yield self._fail(req, e)
                            return
                        for r in out:
                            yield r
                    yield R.CONTINUE_REQUEST_TRAILERS
                elif kind == "response_headers":
                    if ex is not None:
                        ex.response_seen = True
                        self._response_headers(ex, msg.response_headers)
                    yield R.CONTINUE_RESPONSE_HEADERS
                elif kind == "response_body":
                    chunk = msg.response_body.body
                    eos = msg.response_body.end_of_stream
                    if ex is not None:
                        ex.response_seen = True
                        xs.response_body(ex, chunk, eos)
                    if response_mode == MODE_FULL_DUPLEX:
                        for r in R.streamed_body(chunk, request=False, end_of_stream=eos):
                            yield r
                    else:
                        yield R.CONTINUE_RESPONSE_BODY
                elif kind == "response_trailers":
                    yield R.CONTINUE_RESPONSE_TRAILERS
                    if ex is not None:
                        ex.response_seen = True
                        xs.finish(ex)
        finally:
            self.active_streams -= 1
            if ex is not None and not ex.done and not ex.observed:
                if ex.response_seen:
                    # The stream ended before the response did (client gone, upstream reset).
                    xs.finish(ex)
                else:
                    # The proxy watches responses elsewhere (or not at all): wait for an observer.
                    xs.release_later(ex)

    def _route_body(
        self, req: InferenceRequest, body: bytes, subset: list[str] | None, body_mode: int, received_at: float
    ) -> tuple[Exchange, list[bytes | pb.ProcessingResponse]]:
        ex, new_body = self.exchanges.pick(req, body, subset, received_at)
        d = ex.decision
        extra = self.exchanges.pick_headers(ex)
        if body_mode == MODE_FULL_DUPLEX:
            out: list[bytes | pb.ProcessingResponse] = [
                R.route_on_headers(d.endpoint.hostport, d.targets, len(new_body), extra)
            ]
            out.extend(R.streamed_body(new_body, request=True, end_of_stream=True))
            return ex, out
        return ex, [R.route_on_body(d.endpoint.hostport, d.targets, new_body if new_body is not body else None, extra)]

    def _rewrite_body(self, ex: Exchange, body_mode: int) -> list[bytes | pb.ProcessingResponse]:
        """The body a pick made over HTTP rewrote, sent in place of the client's; the pick is repeated."""
        new_body, ex.new_body = ex.new_body or b"", None
        d = ex.decision
        if body_mode == MODE_FULL_DUPLEX:
            out: list[bytes | pb.ProcessingResponse] = [
                R.route_on_headers(d.endpoint.hostport, d.targets, len(new_body))
            ]
            out.extend(R.streamed_body(new_body, request=True, end_of_stream=True))
            return out
        return [R.route_on_body(d.endpoint.hostport, d.targets, new_body)]

    def _fail(self, req: InferenceRequest | None, e: errors.EppError) -> pb.ProcessingResponse:
        self.exchanges.failed(req, e)
        return R.immediate(e)

    # --- response phase ------------------------------------------------------
    async def _observe(self, first: pb.ProcessingRequest, requests: AsyncIterator[pb.ProcessingRequest]) -> None:
        """An observer stream: Envoy sends without waiting, so nothing is answered."""
        xs = self.exchanges
        key = _headers(first.request_headers).get(EXCHANGE_HEADER) if first.HasField("request_headers") else None
        ex = xs.claim(key)
        if ex is None:
            # Another replica's pick, one already released, or no pick at all: ending the stream
            # tells Envoy to send nothing more.
            log.debug("observer stream for unknown exchange %r", key)
            return
        try:
            async for msg in requests:
                kind = msg.WhichOneof("request")
                if kind == "response_headers":
                    self._response_headers(ex, msg.response_headers)
                elif kind == "response_body":
                    xs.response_body(ex, msg.response_body.body, msg.response_body.end_of_stream)
                elif kind == "response_trailers":
                    xs.finish(ex)
                if ex.done:
                    return
        finally:
            if not ex.done:
                xs.finish(ex)  # the stream ended before the response did

    def _response_headers(self, ex: Exchange, hm: pb.HttpHeaders) -> None:
        headers = _headers(hm)
        self.exchanges.response_headers(ex, headers.get(":status", ""), headers.get("content-type", ""),
                                        hm.end_of_stream)
