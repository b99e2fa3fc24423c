"""Exchanges: each routed request, from its pick to the end of its response, finished exactly once.

Both pick transports (ext_proc's gRPC stream and the HTTP pick for Envoy's ext_authz)
open an exchange through `Exchanges.pick`; whoever sees the response (the ext_proc
stream inline, or the observer stream named by `x-epp-request-id`) reports it here.
Finishing releases the endpoint's in-flight count and records the request's metrics.
A pick nobody watches is released `observer_grace` seconds after its transport let go.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time

import orjson

from epp import errors
from epp.director import Decision, Director
from epp.metrics.epp_metrics import EppMetrics
from epp.requests import INFERENCE_KINDS, InferenceRequest, parse_body, rewrite_model

log = logging.getLogger(__name__)

MAX_USAGE_BUFFER = 1 << 20  # a non-streamed response is kept (up to this) to read its usage
EXCHANGE_HEADER = "x-epp-request-id"  # names the exchange to the observer stream
# Set with a pick made over HTTP whose body must change: the layout's ext_proc filter then runs.
REWRITE_HEADER = "x-epp-rewrite-body"
EXPLAIN_ENDPOINT_HEADER = "x-epp-endpoint"
EXPLAIN_HEADER = "x-epp-explain"


class Usage:
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


class Exchange:
    """One routed request, from its pick to the end of its response."""

    __slots__ = ("decision", "done", "key", "new_body", "observed", "received_at", "req", "response_seen", "usage")

    def __init__(self, key: str, req: InferenceRequest, decision: Decision, received_at: float) -> None:
        self.key = key
        self.req = req
        self.decision = decision
        self.received_at = received_at
        self.usage = Usage()
        self.done = False
        self.observed = False  # an observer stream watches the response
        self.response_seen = False  # the pick's own transport saw the response begin
        # The rewritten body, held for the layout's ext_proc filter when the pick came over HTTP.
        self.new_body: bytes | None = None


class Exchanges:
    """The open exchanges of this replica, by key, and the request-level metrics they record."""

    def __init__(
        self, director: Director, metrics: EppMetrics | None = None, *,
        explain_headers: bool = False, observer_grace: float = 2.0,
    ) -> None:
        self.director = director
        self.metrics = metrics
        self.explain_headers = explain_headers
        self.observer_grace = observer_grace
        # The key's random prefix keeps another replica's observer from claiming this replica's exchanges.
        self.open: dict[str, Exchange] = {}
        # 5xx errors of picks made over HTTP, held for the layout's ext_proc filter to answer with
        # (ext_authz turns a 5xx from its server into its own bodiless status_on_error).
        self.deferred_errors: dict[str, errors.EppError] = {}
        self._key_prefix = secrets.token_hex(4)
        self._key_seq = itertools.count()

    def get(self, key: str | None) -> Exchange | None:
        return self.open.get(key) if key else None

    # --- the pick --------------------------------------------------------------
    def decide(self, req: InferenceRequest, subset: list[str] | None) -> Decision:
        try:
            return self.director.decide(req, subset)
        except errors.EppError:
            raise
        except Exception as e:  # a bug: the client gets a 500, the server and other requests go on
            log.exception("scheduling failed for %s %s", req.kind, req.path)
            raise errors.EppError(errors.INTERNAL, f"internal error while scheduling: {type(e).__name__}") from e

    def pick_without_body(self, req: InferenceRequest, subset: list[str] | None, received_at: float) -> Exchange:
        """Route a request that has no body (GET /v1/models, ...). Raises EppError."""
        return self._open(req, self.decide(req, subset), received_at)

    def pick(
        self, req: InferenceRequest, body: bytes, subset: list[str] | None, received_at: float
    ) -> tuple[Exchange, bytes]:
        """Parse, decide and open the exchange; returns it and the body to forward. Raises EppError."""
        parse_body(req, body)
        decision = self.decide(req, subset)
        new_body = rewrite_model(req)
        m = self.metrics
        if m is not None and req.kind in INFERENCE_KINDS:
            m.request_total.labels(req.model, req.target_model, str(req.priority)).inc()
            m.request_sizes.labels(req.model, req.target_model).observe(len(body))
            m.running_requests.labels(req.model).inc()
        return self._open(req, decision, received_at), new_body

    def failed(self, req: InferenceRequest | None, e: errors.EppError) -> None:
        """Count and log a request that ends with an error of epp's instead of a pick."""
        if e.http_status >= 500:
            log.warning("request %s failed: %s", req.path if req else "?", e.message)
        else:
            log.debug("request %s rejected: %s", req.path if req else "?", e.message)
        if self.metrics is not None and req is not None:
            self.metrics.request_error_total.labels(req.model, req.target_model or req.model, e.code).inc()

    def defer_error(self, e: errors.EppError) -> str:
        """Hold an error for the ext_proc filter to send; returns the key that names it (kept for the grace)."""
        key = f"{self._key_prefix}-{next(self._key_seq)}"
        self.deferred_errors[key] = e
        asyncio.get_running_loop().call_later(self.observer_grace, self.deferred_errors.pop, key, None)
        return key

    def take_deferred_error(self, key: str | None) -> errors.EppError | None:
        return self.deferred_errors.pop(key, None) if key else None

    def pick_headers(self, ex: Exchange) -> dict[str, str]:
        """Request headers set with the pick: the exchange's name, and the why when asked for."""
        if not self.explain_headers:
            return {EXCHANGE_HEADER: ex.key}
        return {
            EXCHANGE_HEADER: ex.key,
            EXPLAIN_ENDPOINT_HEADER: ex.decision.endpoint.hostport,
            EXPLAIN_HEADER: self.director.explain(ex.decision),
        }

    def _open(self, req: InferenceRequest, decision: Decision, received_at: float) -> Exchange:
        key = f"{self._key_prefix}-{next(self._key_seq)}"
        ex = Exchange(key, req, decision, received_at)
        self.open[key] = ex
        return ex

    # --- the response ------------------------------------------------------------
    def claim(self, key: str | None) -> Exchange | None:
        """An observer stream names the exchange it watches; None if unknown, done or watched already."""
        ex = self.get(key)
        if ex is None or ex.done or ex.observed:
            return None
        ex.observed = True
        return ex

    def response_headers(self, ex: Exchange, status: str, content_type: str, end_of_stream: bool) -> None:
        ex.usage.status = int(status) if status.isdigit() else 0
        ex.usage.streaming = content_type.startswith("text/event-stream")
        if end_of_stream:
            self.finish(ex)

    def response_body(self, ex: Exchange, chunk: bytes, eos: bool) -> None:
        usage = ex.usage
        if chunk and not usage.first_byte_at:
            self.director.started(ex.req, ex.decision)
        usage.observe(chunk)
        if eos:
            self.finish(ex)

    def release_later(self, ex: Exchange) -> None:
        """The pick's transport let go before seeing the response: wait for an observer, then release."""
        asyncio.get_running_loop().call_later(self.observer_grace, self._expire, ex)

    def _expire(self, ex: Exchange) -> None:
        if not ex.done and not ex.observed:
            self.finish(ex)

    def finish(self, ex: Exchange) -> None:
        if ex.done:
            return
        ex.done = True
        self.open.pop(ex.key, None)
        req, usage = ex.req, ex.usage
        self.director.finish(req, ex.decision)
        m = self.metrics
        if m is None or req.kind not in INFERENCE_KINDS or req.parsed is None:
            return  # only parsed inference requests were counted in `pick`
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
