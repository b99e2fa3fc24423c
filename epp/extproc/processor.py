"""The ext_proc ExternalProcessor service: one bidirectional stream per HTTP request.

Request phase. Headers arrive first. A request without a body is routed at once.
In BUFFERED mode the headers are acknowledged and the whole body arrives in one
message; the pick rides on the body response. In FULL_DUPLEX_STREAMED mode the
body arrives in chunks while the headers wait unanswered; once the body is
complete the pick rides on the headers response and the EPP sends the body back
itself. Errors end the HTTP request with an ImmediateResponse, never the stream.

Response phase, watched for status, time to first byte and `usage`, in one of two
layouts. Inline: the same stream carries response headers, body chunks (echoed
back in FULL_DUPLEX_STREAMED) and trailers, so every chunk waits on the EPP.
Observed: the pick stream ends with the request phase, and a second ext_proc
filter in `observability_mode` opens its own stream, which Envoy feeds without
waiting for answers; it names the exchange by the `x-epp-request-id` header the
pick set. Either way the request counts as finished exactly once: when the
response ends, when its stream ends early (client gone, upstream reset), or, for
a pick no stream watches, `observer_grace` seconds after the pick stream closed.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import orjson
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from epp import errors
from epp.director import Decision, Director
from epp.extproc import responses as R
from epp.metrics.epp_metrics import EppMetrics
from epp.requests import INFERENCE_KINDS, InferenceRequest, new_request, parse_body, rewrite_model

log = logging.getLogger(__name__)

SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"


def _body_modes() -> tuple[int, int]:
    from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2 as pm

    return pm.ProcessingMode.BUFFERED, pm.ProcessingMode.FULL_DUPLEX_STREAMED


MODE_BUFFERED, MODE_FULL_DUPLEX = _body_modes()
MAX_USAGE_BUFFER = 1 << 20  # a non-streamed response is kept (up to this) to read its usage
EXCHANGE_HEADER = "x-epp-request-id"  # names the exchange to the observer stream
EXPLAIN_ENDPOINT_HEADER = "x-epp-endpoint"
EXPLAIN_HEADER = "x-epp-explain"


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


class _Usage:
    """Token counts and timing observed in the response phase."""

    __slots__ = ("buffer", "completion_tokens", "first_byte_at", "prompt_tokens", "size", "status", "streaming")

    def __init__(self) -> None:
        self.status = 0
        self.size = 0
        self.first_byte_at = 0.0
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None
        self.streaming = False
        self.buffer: bytearray | None = None

    def observe(self, chunk: bytes) -> None:
        if not chunk:
            return
        if not self.first_byte_at:
            self.first_byte_at = time.monotonic()
        self.size += len(chunk)
        if self.streaming:
            if b'"usage"' in chunk:
                for line in chunk.split(b"\n"):
                    if line.startswith(b"data: {") and b'"usage"' in line:
                        self._take(line[6:])
        else:
            if self.buffer is None:
                self.buffer = bytearray()
            if len(self.buffer) + len(chunk) <= MAX_USAGE_BUFFER:
                self.buffer += chunk

    def finish(self) -> None:
        if self.buffer and not self.streaming:
            self._take(bytes(self.buffer))
        self.buffer = None

    def _take(self, raw: bytes) -> None:
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return
        usage = data.get("usage") if isinstance(data, dict) else None
        if isinstance(usage, dict):
            pt, ct = usage.get("prompt_tokens"), usage.get("completion_tokens")
            if isinstance(pt, int):
                self.prompt_tokens = pt
            if isinstance(ct, int):
                self.completion_tokens = ct


class _Exchange:
    """One routed request, from its pick to the end of its response; finished exactly once."""

    __slots__ = ("decision", "done", "key", "observed", "received_at", "req", "response_seen", "usage")

    def __init__(self, key: str, req: InferenceRequest, decision: Decision, received_at: float) -> None:
        self.key = key
        self.req = req
        self.decision = decision
        self.received_at = received_at
        self.usage = _Usage()
        self.done = False
        self.observed = False  # an observer stream watches the response
        self.response_seen = False  # the pick stream itself saw the response begin


class ExternalProcessor:
    """Serves envoy.service.ext_proc.v3.ExternalProcessor/Process."""

    def __init__(
        self,
        director: Director,
        metrics: EppMetrics | None = None,
        *,
        max_body_bytes: int = 16 << 20,
        explain_headers: bool = False,
        observer_grace: float = 2.0,
    ) -> None:
        self.director = director
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.explain_headers = explain_headers
        self.observer_grace = observer_grace
        self.active_streams = 0
        # Exchanges whose response is (or may yet be) watched by an observer stream. The key's
        # random prefix keeps another replica's observer from claiming this replica's exchanges.
        self.exchanges: dict[str, _Exchange] = {}
        self._key_prefix = secrets.token_hex(4)
        self._key_seq = itertools.count()

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
        req: InferenceRequest | None = None
        ex: _Exchange | None = None
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
                    if msg.request_headers.end_of_stream:
                        # No body (GET /v1/models, ...): route now.
                        try:
                            decision = self._decide(req, subset)
                        except errors.EppError as e:
                            yield self._fail(req, e)
                            return
                        ex = self._open(req, decision, received_at)
                        yield R.route_on_headers(decision.endpoint.hostport, decision.targets, None,
                                                 self._pick_headers(ex))
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
                    try:
                        ex, out = self._route_body(req, bytes(body), subset, body_mode, received_at)
                    except errors.EppError as e:
                        yield self._fail(req, e)
                        return
                    body = bytearray()
                    for r in out:
                        yield r
                elif kind == "request_trailers":
                    if req is not None and ex is None and body_mode == MODE_FULL_DUPLEX:
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
                        self._response_body(ex, chunk, eos)
                    if response_mode == MODE_FULL_DUPLEX:
                        for r in R.streamed_body(chunk, request=False, end_of_stream=eos):
                            yield r
                    else:
                        yield R.CONTINUE_RESPONSE_BODY
                elif kind == "response_trailers":
                    yield R.CONTINUE_RESPONSE_TRAILERS
                    if ex is not None:
                        ex.response_seen = True
                        self._finish(ex)
        finally:
            self.active_streams -= 1
            if ex is not None and not ex.done and not ex.observed:
                if ex.response_seen:
                    # The stream ended before the response did (client gone, upstream reset).
                    self._finish(ex)
                else:
                    # The proxy watches responses elsewhere (or not at all): wait for an observer.
                    asyncio.get_running_loop().call_later(self.observer_grace, self._expire, ex)

    # --- request phase -------------------------------------------------------
    def _decide(self, req: InferenceRequest, subset: list[str] | None) -> Decision:
        try:
            return self.director.decide(req, subset)
        except errors.EppError:
            raise
        except Exception as e:  # a bug: the client gets a 500, the server and other streams go on
            log.exception("scheduling failed for %s %s", req.kind, req.path)
            raise errors.EppError(errors.INTERNAL, f"internal error while scheduling: {type(e).__name__}") from e

    def _open(self, req: InferenceRequest, decision: Decision, received_at: float) -> _Exchange:
        key = f"{self._key_prefix}-{next(self._key_seq)}"
        ex = _Exchange(key, req, decision, received_at)
        self.exchanges[key] = ex
        return ex

    def _pick_headers(self, ex: _Exchange) -> dict[str, str]:
        """Request headers set with the pick: the exchange's name, and the why when asked for."""
        if not self.explain_headers:
            return {EXCHANGE_HEADER: ex.key}
        return {
            EXCHANGE_HEADER: ex.key,
            EXPLAIN_ENDPOINT_HEADER: ex.decision.endpoint.hostport,
            EXPLAIN_HEADER: self.director.explain(ex.decision),
        }

    def _route_body(
        self, req: InferenceRequest, body: bytes, subset: list[str] | None, body_mode: int, received_at: float
    ) -> tuple[_Exchange, list[bytes | pb.ProcessingResponse]]:
        parse_body(req, body)
        decision = self._decide(req, subset)
        new_body = rewrite_model(req)
        m = self.metrics
        if m is not None and req.kind in INFERENCE_KINDS:
            m.request_total.labels(req.model, req.target_model, str(req.priority)).inc()
            m.request_sizes.labels(req.model, req.target_model).observe(len(body))
            m.running_requests.labels(req.model).inc()
        ex = self._open(req, decision, received_at)
        ep = decision.endpoint.hostport
        extra = self._pick_headers(ex)
        if body_mode == MODE_FULL_DUPLEX:
            out: list[bytes | pb.ProcessingResponse] = [
                R.route_on_headers(ep, decision.targets, len(new_body), extra)
            ]
            out.extend(R.streamed_body(new_body, request=True, end_of_stream=True))
            return ex, out
        return ex, [R.route_on_body(ep, decision.targets, new_body if new_body is not body else None, extra)]

    def _fail(self, req: InferenceRequest | None, e: errors.EppError) -> pb.ProcessingResponse:
        if e.http_status >= 500:
            log.warning("request %s failed: %s", req.path if req else "?", e.message)
        else:
            log.debug("request %s rejected: %s", req.path if req else "?", e.message)
        if self.metrics is not None and req is not None:
            self.metrics.request_error_total.labels(req.model, req.target_model or req.model, e.code).inc()
        return R.immediate(e)

    # --- response phase ------------------------------------------------------
    async def _observe(self, first: pb.ProcessingRequest, requests: AsyncIterator[pb.ProcessingRequest]) -> None:
        """An observer stream: Envoy sends without waiting, so nothing is answered."""
        key = _headers(first.request_headers).get(EXCHANGE_HEADER) if first.HasField("request_headers") else None
        ex = self.exchanges.get(key) if key else None
        if ex is None or ex.done or ex.observed:
            # Another replica's pick, one already released, or no pick at all: ending the stream
            # tells Envoy to send nothing more.
            log.debug("observer stream for unknown exchange %r", key)
            return
        ex.observed = True
        try:
            async for msg in requests:
                kind = msg.WhichOneof("request")
                if kind == "response_headers":
                    self._response_headers(ex, msg.response_headers)
                elif kind == "response_body":
                    self._response_body(ex, msg.response_body.body, msg.response_body.end_of_stream)
                elif kind == "response_trailers":
                    self._finish(ex)
                if ex.done:
                    return
        finally:
            if not ex.done:
                self._finish(ex)  # the stream ended before the response did

    def _response_headers(self, ex: _Exchange, hm: pb.HttpHeaders) -> None:
        headers = _headers(hm)
        status = headers.get(":status", "")
        ex.usage.status = int(status) if status.isdigit() else 0
        ex.usage.streaming = headers.get("content-type", "").startswith("text/event-stream")
        if hm.end_of_stream:
            self._finish(ex)

    def _response_body(self, ex: _Exchange, chunk: bytes, eos: bool) -> None:
        usage = ex.usage
        if chunk and not usage.first_byte_at:
            self.director.started(ex.req, ex.decision)
        usage.observe(chunk)
        if eos:
            self._finish(ex)

    def _expire(self, ex: _Exchange) -> None:
        """No observer claimed this exchange after its pick stream closed: release it now."""
        if not ex.done and not ex.observed:
            self._finish(ex)

    def _finish(self, ex: _Exchange) -> None:
        if ex.done:
            return
        ex.done = True
        self.exchanges.pop(ex.key, None)
        req, usage = ex.req, ex.usage
        self.director.finish(req, ex.decision)
        m = self.metrics
        if m is None or req.kind not in INFERENCE_KINDS or req.parsed is None:
            return  # only parsed inference requests were counted in _route_body
        model, target = req.model, req.target_model
        m.running_requests.labels(model).dec()
        if not usage.status:
            return  # ended before any response: nothing more to record
        usage.finish()
        if usage.status >= 400:
            m.request_error_total.labels(model, target, errors.MODEL_SERVER_ERROR).inc()
            return
        now = time.monotonic()
        m.request_duration.labels(model, target).observe(now - ex.received_at)
        if usage.first_byte_at:
            m.request_ttft.labels(model, target).observe(usage.first_byte_at - ex.received_at)
        m.response_sizes.labels(model, target).observe(usage.size)
        if usage.prompt_tokens is not None:
            m.input_tokens.labels(model, target).observe(usage.prompt_tokens)
        if usage.completion_tokens is not None:
            m.output_tokens.labels(model, target).observe(usage.completion_tokens)
