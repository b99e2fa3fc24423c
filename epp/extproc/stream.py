"""One ext_proc stream as a state machine: a handler per message kind, each returning the answers.

Request phase. Headers arrive first. A request without a body is routed at once.
In BUFFERED mode the headers are acknowledged and the whole body arrives in one
message; the pick rides on the body response. In FULL_DUPLEX_STREAMED mode the
body arrives in chunks while the headers wait unanswered; once the body is
complete the pick rides on the headers response and epp sends the body back
itself. Errors end the HTTP request with an ImmediateResponse, never the stream.

A stream whose headers carry `x-epp-rewrite-body` belongs to the HTTP pick layout:
the pick was made over HTTP, and this stream only sends the hand-off (the rewritten
body, or the 5xx error the pick ended in; `epp.handoff`).

With flow control on, a pick may wait: the handler that completes the request leaves
the pick in `pending` (a coroutine) and the processor awaits it before answering
anything else; a stream cancelled meanwhile (the client left) leaves the queue.

Response phase (the inline layout, where the same stream carries the response):
status, body chunks (echoed back in FULL_DUPLEX_STREAMED) and trailers feed the
exchange. Messages out of order (a second set of request headers, a body after
the pick) never open a second exchange: each stream opens at most one, released once.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Coroutine
from typing import Any, TypeAlias

from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2 as pm
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from epp import errors
from epp.exchanges import Exchange, Exchanges
from epp.extproc import responses as R
from epp.handoff import Handoff, Handoffs
from epp.protocol import (
    DESTINATION_NAMESPACE,
    DESTINATION_SERVED_HEADER,
    EXCHANGE_HEADER,
    HANDOFF_HEADER,
    SUBSET_KEY,
    SUBSET_NAMESPACE,
)
from epp.requests import InferenceRequest, new_request, parse_body

MODE_BUFFERED = pm.ProcessingMode.BUFFERED
MODE_FULL_DUPLEX = pm.ProcessingMode.FULL_DUPLEX_STREAMED

Answer: TypeAlias = bytes | pb.ProcessingResponse


class Phase(enum.Enum):
    HEADERS = "awaiting request headers"
    BODY = "reading the request body"
    HANDOFF = "reading the body an HTTP pick's hand-off replaces"
    ROUTED = "routed; watching the response"
    ENDED = "answered with an immediate response"


def headers_of(hm: pb.HttpHeaders) -> dict[str, str]:
    out = {}
    for h in hm.headers.headers:
        out[h.key] = h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value
    return out


def served_endpoint(msg: pb.ProcessingRequest, headers: dict[str, str]) -> str:
    """The endpoint the proxy reports having sent the request to: its `envoy.lb` metadata on the
    response (as upstream reads it), else a response header of the same name."""
    fm = msg.metadata_context.filter_metadata
    if DESTINATION_NAMESPACE in fm:
        value = fm[DESTINATION_NAMESPACE].fields.get(DESTINATION_SERVED_HEADER)
        if value is not None and value.HasField("string_value"):
            return value.string_value
    return headers.get(DESTINATION_SERVED_HEADER, "")


def subset_hint(msg: pb.ProcessingRequest) -> list[str] | None:
    """The proxy's list of allowed endpoints (filter metadata), or None when it sets none."""
    fm = msg.metadata_context.filter_metadata
    if SUBSET_NAMESPACE not in fm:
        return None
    value = fm[SUBSET_NAMESPACE].fields.get(SUBSET_KEY)
    if value is None:
        return None
    if value.HasField("list_value"):
        return [v.string_value for v in value.list_value.values]
    if value.HasField("string_value"):
        return [s.strip() for s in value.string_value.split(",") if s.strip()]
    return None


class PickStream:
    """The request phase and, inline, the response phase of one ext_proc stream."""

    __slots__ = ("_body", "body_mode", "ex", "exchanges", "handoff", "handoffs", "max_body_bytes", "pending", "phase",
                 "received_at", "req", "response_mode", "subset")

    def __init__(self, exchanges: Exchanges, handoffs: Handoffs, max_body_bytes: int) -> None:
        self.exchanges = exchanges
        self.handoffs = handoffs
        self.max_body_bytes = max_body_bytes
        self.phase = Phase.HEADERS
        self.received_at = time.monotonic()
        self.req: InferenceRequest | None = None
        self.ex: Exchange | None = None
        self.handoff: Handoff | None = None
        self._body = bytearray()
        self.body_mode = MODE_BUFFERED
        self.response_mode = MODE_BUFFERED
        self.subset: list[str] | None = None
        # A pick waiting in flow control: the processor awaits it, then sends its answers first.
        self.pending: Coroutine[Any, Any, list[Answer]] | None = None

    @property
    def ended(self) -> bool:
        return self.phase is Phase.ENDED

    # --- request phase -------------------------------------------------------------
    def request_headers(self, msg: pb.ProcessingRequest) -> list[Answer]:
        if self.phase is not Phase.HEADERS:
            return [R.CONTINUE_REQUEST_HEADERS]  # out of order: never a second pick on one stream
        if msg.HasField("protocol_config"):
            self.body_mode = msg.protocol_config.request_body_mode
            self.response_mode = msg.protocol_config.response_body_mode
        self.subset = subset_hint(msg)
        headers = headers_of(msg.request_headers)
        self.req = new_request(headers.get(":path", "/"), headers, self.exchanges.director.config.parsers)
        if HANDOFF_HEADER in headers:
            handoff = self.handoffs.take(headers.get(EXCHANGE_HEADER))
            if handoff is not None and handoff.error is not None:
                self.phase = Phase.ENDED
                return [R.immediate(handoff.error)]
            self.handoff = handoff  # None (expired, another replica's): pick here as usual
        if msg.request_headers.end_of_stream:
            return self._route(headers_only=True)  # no body (GET /v1/models, ...): route now
        self.phase = Phase.HANDOFF if self.handoff is not None else Phase.BODY
        return [] if self.body_mode == MODE_FULL_DUPLEX else [R.CONTINUE_REQUEST_HEADERS]

    def request_body(self, msg: pb.ProcessingRequest) -> list[Answer]:
        chunk, eos = msg.request_body.body, msg.request_body.end_of_stream
        if self.phase is Phase.ROUTED:
            # Only if the proxy sends body after the pick: pass it on unchanged.
            if self.body_mode == MODE_FULL_DUPLEX:
                return list(R.streamed_body(chunk, request=True, end_of_stream=eos))
            return [R.CONTINUE_REQUEST_BODY]
        if self.phase not in (Phase.BODY, Phase.HANDOFF):
            return []
        self._body += chunk
        if len(self._body) > self.max_body_bytes:
            return self._fail(errors.bad_request(
                f"request body exceeds the limit of {self.max_body_bytes} bytes", reason="request_too_large"))
        if not eos:
            # STREAMED mode acknowledges each chunk; BUFFERED and FULL_DUPLEX_STREAMED answer once.
            return [] if self.body_mode in (MODE_BUFFERED, MODE_FULL_DUPLEX) else [R.CONTINUE_REQUEST_BODY]
        return self._body_complete()

    def request_trailers(self, msg: pb.ProcessingRequest) -> list[Answer]:
        out: list[Answer] = []
        if self.phase in (Phase.BODY, Phase.HANDOFF) and self.body_mode == MODE_FULL_DUPLEX:
            out = self._body_complete()  # the body ended with trailers, not an end-of-stream chunk
            if self.ended:
                return out
        out.append(R.CONTINUE_REQUEST_TRAILERS)
        return out

    def _body_complete(self) -> list[Answer]:
        body, self._body = bytes(self._body), bytearray()
        if self.phase is Phase.HANDOFF and self.handoff is not None:
            h, self.handoff = self.handoff, None
            self.phase = Phase.ROUTED  # the HTTP pick's exchange is watched by the observer, not here
            return self._pick_answer(h.primary, h.targets, h.body, True, None)
        assert self.req is not None
        try:
            parse_body(self.req, body)
        except errors.EppError as e:
            return self._fail(e)
        return self._route(headers_only=False)

    def _route(self, *, headers_only: bool) -> list[Answer]:
        req = self.req
        assert req is not None
        if self.exchanges.awaits:
            self.phase = Phase.ROUTED  # nothing more opens a pick on this stream while it waits
            self.pending = self._route_async(headers_only)
            return []
        try:
            ex = self.exchanges.open(req, self.subset, self.received_at)
        except errors.EppError as e:
            return self._fail(e)
        return self._routed(ex, headers_only)

    async def _route_async(self, headers_only: bool) -> list[Answer]:
        req = self.req
        assert req is not None
        try:
            ex = await self.exchanges.open_async(req, self.subset, self.received_at)
        except errors.EppError as e:
            return self._fail(e)
        return self._routed(ex, headers_only)

    def take_pending(self) -> Coroutine[Any, Any, list[Answer]] | None:
        pending, self.pending = self.pending, None
        return pending

    def _routed(self, ex: Exchange, headers_only: bool) -> list[Answer]:
        self.ex, self.phase = ex, Phase.ROUTED
        m = self.exchanges.metrics
        if m is not None:
            m.request_processed(time.monotonic() - self.received_at)
        d = ex.decision
        return self._pick_answer(d.endpoint.hostport, d.targets, None if headers_only else d.body, d.body_changed,
                                 ex.pick_headers(), d.scores)

    def _pick_answer(self, primary: str, targets: str, body: bytes | None, changed: bool,
                     extra: dict[str, str] | None, scores: dict[str, float] | None = None) -> list[Answer]:
        if body is None:  # headers-only request
            return [R.route_on_headers(primary, targets, None, extra, scores)]
        if self.body_mode == MODE_FULL_DUPLEX:
            return [R.route_on_headers(primary, targets, len(body), extra, scores),
                    *R.streamed_body(body, request=True, end_of_stream=True)]
        return [R.route_on_body(primary, targets, body if changed else None, extra, scores)]

    def _fail(self, e: errors.EppError) -> list[Answer]:
        xs = self.exchanges
        xs.failed(self.req, e)
        self.phase = Phase.ENDED
        if xs.metrics is not None:
            xs.metrics.request_processed(time.monotonic() - self.received_at)
        return [R.immediate(e)]

    # --- response phase (inline layout) -----------------------------------------------
    def response_headers(self, msg: pb.ProcessingRequest) -> list[Answer]:
        ex = self.ex
        if ex is not None:
            ex.response_seen = True
            hm = msg.response_headers
            h = headers_of(hm)
            added = self.exchanges.response_headers(ex, h.get(":status", ""), h.get("content-type", ""),
                                                    hm.end_of_stream, served_endpoint(msg, h))
            if added:
                return [R.response_headers_mutation(added)]
        return [R.CONTINUE_RESPONSE_HEADERS]

    def response_body(self, msg: pb.ProcessingRequest) -> list[Answer]:
        chunk, eos = msg.response_body.body, msg.response_body.end_of_stream
        if self.ex is not None:
            self.ex.response_seen = True
            self.exchanges.response_body(self.ex, chunk, eos)
        if self.response_mode == MODE_FULL_DUPLEX:
            return list(R.streamed_body(chunk, request=False, end_of_stream=eos))
        return [R.CONTINUE_RESPONSE_BODY]

    def response_trailers(self, msg: pb.ProcessingRequest) -> list[Answer]:
        if self.ex is not None:
            self.ex.response_seen = True
            self.exchanges.finish(self.ex)
        return [R.CONTINUE_RESPONSE_TRAILERS]

    def close(self) -> None:
        """The stream ended, however it ended: release the exchange, or hand it to the observer."""
        pending = self.take_pending()
        if pending is not None:
            pending.close()  # never awaited (the stream ended first): it never queued
        ex = self.ex
        if ex is None or ex.done or ex.observed:
            return
        if ex.response_seen:
            self.exchanges.finish(ex)  # the stream ended before the response did (client gone, reset)
        else:
            self.exchanges.release_later(ex)  # the proxy watches responses elsewhere (or not at all)


HANDLERS = {
    "request_headers": PickStream.request_headers,
    "request_body": PickStream.request_body,
    "request_trailers": PickStream.request_trailers,
    "response_headers": PickStream.response_headers,
    "response_body": PickStream.response_body,
    "response_trailers": PickStream.response_trailers,
}
