"""Exchanges: each routed request, from its pick to the end of its response, finished exactly once.

Both pick transports (ext_proc's gRPC stream and the HTTP pick for Envoy's ext_authz)
open an exchange with `open`; whoever sees the response (the ext_proc stream inline,
or the observer stream named by `x-epp-request-id`) reports it here. Finishing
releases the endpoint's in-flight count and records the request's metrics. A pick
nobody watches is released `observer_grace` seconds after its transport let go.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
from collections.abc import Sequence

from epp import errors
from epp.director import Decision, Director
from epp.metrics import EppMetrics
from epp.protocol import EXCHANGE_HEADER, EXPLAIN_ENDPOINT_HEADER, EXPLAIN_HEADER
from epp.requests import InferenceRequest
from epp.usage import Usage

log = logging.getLogger(__name__)


class Exchange:
    """One routed request, from its pick to the end of its response."""

    __slots__ = ("decision", "done", "key", "observed", "received_at", "req", "response_seen", "usage")

    def __init__(self, key: str, req: InferenceRequest, decision: Decision, received_at: float) -> None:
        self.key = key
        self.req = req
        self.decision = decision
        self.received_at = received_at
        self.usage = Usage()
        self.done = False
        self.observed = False  # an observer stream watches the response
        self.response_seen = False  # the pick's own transport saw the response begin

    def pick_headers(self) -> dict[str, str]:
        """Request headers set with the pick: the exchange's name, and the why when explain headers are on."""
        if self.decision.explain is None:
            return {EXCHANGE_HEADER: self.key}
        return {
            EXCHANGE_HEADER: self.key,
            EXPLAIN_ENDPOINT_HEADER: self.decision.endpoint.hostport,
            EXPLAIN_HEADER: self.decision.explain,
        }


class Exchanges:
    """The open exchanges of this replica, by key."""

    def __init__(self, director: Director, metrics: EppMetrics | None = None, *, observer_grace: float = 2.0) -> None:
        self.director = director
        self.metrics = metrics
        self.observer_grace = observer_grace
        self.open_exchanges: dict[str, Exchange] = {}
        # The key's random prefix keeps another replica's observer from claiming this replica's exchanges.
        self._key_prefix = secrets.token_hex(4)
        self._key_seq = itertools.count()

    # --- the pick --------------------------------------------------------------
    @property
    def awaits(self) -> bool:
        """Picks may await (flow control, a plugin's data step): the transports await `open_async`."""
        return self.director.awaits

    def open(self, req: InferenceRequest, subset: Sequence[str] | None, received_at: float) -> Exchange:
        """Decide where the parsed request goes and open its exchange. Raises EppError."""
        try:
            decision = self.director.decide(req, subset, received_at=received_at)
        except errors.EppError:
            raise
        except Exception as e:  # a bug: the client gets a 500, the server and other requests go on
            raise self._internal(req, e) from e
        return self._opened(req, decision, received_at)

    async def open_async(self, req: InferenceRequest, subset: Sequence[str] | None, received_at: float) -> Exchange:
        """`open` with the pick's awaited steps: plugins' data steps, then flow control's wait while the
        pool is saturated. A cancelled wait (the client left) leaves the queue at once; raises EppError
        (flow control's 429 / 503 included)."""
        try:
            decision = await self.director.decide_async(req, subset, received_at=received_at)
        except errors.EppError:
            raise
        except Exception as e:
            raise self._internal(req, e) from e
        return self._opened(req, decision, received_at)

    @staticmethod
    def _internal(req: InferenceRequest, e: Exception) -> errors.EppError:
        """A bug: the client gets a 500, the server and other requests go on."""
        log.exception("scheduling failed for %s %s", req.kind, req.path)
        return errors.EppError(errors.INTERNAL, f"internal error while scheduling: {type(e).__name__}")

    def _opened(self, req: InferenceRequest, decision: Decision, received_at: float) -> Exchange:
        if self.metrics is not None:
            self.metrics.picked(req, len(req.body))
        key = f"{self._key_prefix}-{next(self._key_seq)}"
        ex = Exchange(key, req, decision, received_at)
        self.open_exchanges[key] = ex
        return ex

    def failed(self, req: InferenceRequest | None, e: errors.EppError) -> None:
        """Count and log a request that ends with an error of epp's instead of a pick."""
        if e.http_status >= 500:
            log.warning("request %s failed: %s", req.path if req else "?", e.message)
        else:
            log.debug("request %s rejected: %s", req.path if req else "?", e.message)
        if self.metrics is not None and req is not None:
            self.metrics.rejected(req, e.code)

    # --- the response ------------------------------------------------------------
    def claim(self, key: str | None) -> Exchange | None:
        """An observer stream names the exchange it watches; None if unknown, done or watched already."""
        ex = self.open_exchanges.get(key) if key else None
        if ex is None or ex.done or ex.observed:
            return None
        ex.observed = True
        return ex

    def response_headers(self, ex: Exchange, status: str, content_type: str, end_of_stream: bool,
                         served: str = "") -> tuple[tuple[str, str], ...]:
        """The response's headers arrived; `served` is the endpoint the proxy reports having sent the
        request to. Returns the headers the plugins add to the client's response."""
        ex.usage.headers(status, content_type)
        ex.req.response_status = ex.usage.status
        if served:
            ex.req.served_endpoint = served
        added = self.director.scheduler.response_headers(ex.req, ex.decision.endpoint)
        if end_of_stream:
            self.finish(ex)
        return added

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
        """The response ended, or its stream did. Safe to call more than once: only the first counts."""
        if ex.done:
            return
        ex.done = True
        self.open_exchanges.pop(ex.key, None)
        self.director.finish(ex.req, ex.decision)
        if self.metrics is not None:
            ex.usage.finish()
            self.metrics.finished(ex.req, ex.usage, ex.received_at)

    def __len__(self) -> int:
        return len(self.open_exchanges)
