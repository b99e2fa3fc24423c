"""The pick over plain HTTP, for Envoy's ext_authz filter (`http_service`): the low-latency layout.

Envoy buffers the request body and sends it, with the few headers epp reads, as one
HTTP/1.1 request on a kept-alive connection. epp answers 200 with the pick in response
headers (x-gateway-destination-endpoint, x-epp-request-id), which ext_authz copies onto the
upstream request, or with an OpenAI-style error that Envoy returns to the client as is.
One request and one answer, handled on epp's event loop, cost a fraction of an ext_proc
gRPC stream, whose every message crosses grpc's threads (docs/design.md, "Why the HTTP pick layout exists").

ext_authz cannot change the body, and turns any 5xx of its server into its own bodiless
status. When the pool rewrites the model, or epp's answer is a 5xx error, the answer is
200 with `x-epp-rewrite-body`; the layout's ext_proc filter runs only for such requests,
and epp sends the new body, or the error, there (`epp.handoff`). The response is
watched by the same observer filter as in the ext_proc layout.

With flow control on the answer waits while the pool is saturated; Envoy closing the
connection (its client gone) cancels the wait and the request leaves the queue. A
connection that sends a request's headers slower than `header_timeout` (slowloris) is
closed: aiohttp itself bounds only idle keep-alive time.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping

import orjson
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from epp import errors
from epp.exchanges import Exchanges
from epp.handoff import Handoff, Handoffs
from epp.protocol import DESTINATION_HEADER, DESTINATION_LIST_HEADER, EXCHANGE_HEADER, HANDOFF_HEADER, SUBSET_KEY
from epp.requests import new_request, parse_body

log = logging.getLogger(__name__)

PATH_PREFIX = "/pick"  # ext_authz's path_prefix: /pick/v1/completions asks about /v1/completions
HEALTH_PATH = "/healthz"
_JSON = {"content-type": "application/json"}
# Envoy lets a request's headers reach 60 KiB (max_request_headers_kb) and passes them on to ext_authz:
# one header line may be that long here too (aiohttp's own limit is 8 KiB).
MAX_HEADER_BYTES = 64 << 10


class _NoRequestBytes(logging.Filter):
    """aiohttp logs a request it cannot parse with the bytes it read (an Authorization header's token,
    say); keep the kind of error and drop the bytes."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            record.msg = "bad HTTP request on the pick port: %s"
            record.args = (type(record.exc_info[1]).__name__,)
            record.exc_info = None
            record.exc_text = None
        return True


logging.getLogger("aiohttp.server").addFilter(_NoRequestBytes())


def _subset(headers: Mapping[str, str]) -> list[str] | None:
    """The gateway's subset hint, which the shipped layout copies from filter metadata into this header:
    a comma-separated list, or a JSON list when the metadata value was a list. Absent or empty: none."""
    hint = headers.get(SUBSET_KEY, "").strip()
    if not hint:
        return None
    if hint.startswith("["):
        try:
            values = orjson.loads(hint)
        except orjson.JSONDecodeError:
            values = None
        if isinstance(values, list):
            return [str(v).strip() for v in values if str(v).strip()]
    return [s.strip() for s in hint.split(",") if s.strip()]


class _HeaderTimeoutHandler(RequestHandler):
    """aiohttp's connection handler, closing a connection whose request headers take longer than
    `header_timeout` seconds from the request's first byte to its blank line."""

    header_timeout = 10.0

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._header_timer: asyncio.TimerHandle | None = None

    def data_received(self, data: bytes) -> None:
        before = self._request_count
        super().data_received(data)
        timer = self._header_timer
        if self._request_count != before:  # a request's headers are complete
            if timer is not None:
                timer.cancel()
                self._header_timer = None
        elif (timer is None and data and not self._request_in_progress and not self._messages
              and not self._force_close):
            self._header_timer = self._loop.call_later(self.header_timeout, self._headers_too_slow)

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        log.debug("closing a pick connection: its request headers took over %gs", self.header_timeout)
        self.force_close()
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        super().connection_lost(exc)


class _Server(web.Server):
    """aiohttp's server, making `_HeaderTimeoutHandler` connections."""

    header_timeout = 10.0

    def __call__(self) -> RequestHandler:
        handler = _HeaderTimeoutHandler(self, loop=self._loop, **self._kwargs)
        handler.header_timeout = self.header_timeout
        return handler


class _Runner(web.AppRunner):
    """An AppRunner whose server is a `_Server` with this header timeout."""

    def __init__(self, app: web.Application, header_timeout: float, **kwargs: object) -> None:
        super().__init__(app, **kwargs)  # type: ignore[arg-type]
        self.header_timeout = header_timeout

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _Server  # the same object, making connections of the subclass
        server.header_timeout = self.header_timeout  # type: ignore[attr-defined]
        return server


class HttpPick:
    """An aiohttp server answering ext_authz checks with epp's pick."""

    def __init__(self, exchanges: Exchanges, handoffs: Handoffs, *, max_body_bytes: int = 16 << 20,
                 grace_period: float = 30.0, header_timeout: float = 10.0) -> None:
        if header_timeout <= 0:
            raise ValueError(f"the pick port's header timeout must be positive, got {header_timeout}")
        self.exchanges = exchanges
        self.header_timeout = header_timeout
        self.handoffs = handoffs
        self.max_body_bytes = max_body_bytes
        self.grace_period = grace_period  # on stop, requests in flight get this long to be answered
        self.serving = False  # /healthz: the pool is known and epp is not stopping
        self._runner: web.AppRunner | None = None

    def app(self) -> web.Application:
        # aiohttp's own limit refuses bigger bodies before they are read in full; one byte more
        # than ours so that epp, not aiohttp, words the error.
        app = web.Application(client_max_size=self.max_body_bytes + 1)
        app.router.add_get(HEALTH_PATH, self.health)
        app.router.add_route("*", PATH_PREFIX + "{path:.*}", self.pick)
        return app

    async def start(self, host: str, port: int) -> None:
        # handler_cancellation: Envoy closing the connection (its client gone) ends a pick waiting in
        # flow control at once.
        self._runner = _Runner(self.app(), self.header_timeout, access_log=None, handle_signals=False,
                               shutdown_timeout=self.grace_period, handler_cancellation=True,
                               max_line_size=MAX_HEADER_BYTES, max_field_size=MAX_HEADER_BYTES)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port, reuse_address=True).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def _processed(self, received_at: float) -> None:
        m = self.exchanges.metrics
        if m is not None:
            m.request_processed(time.monotonic() - received_at)

    def _too_large(self) -> errors.EppError:
        return errors.bad_request(f"request body exceeds the limit of {self.max_body_bytes} bytes",
                                  reason="request_too_large")

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self.serving else 503)

    async def pick(self, request: web.Request) -> web.Response:
        received_at = time.monotonic()
        xs = self.exchanges
        headers = request.headers
        path = request.raw_path[len(PATH_PREFIX):] or "/"
        req = new_request(path, headers, xs.director.config.parsers)  # type: ignore[arg-type]
        try:
            if request.content_length and request.content_length > self.max_body_bytes:
                raise self._too_large()
            try:
                body = await request.read()
            except web.HTTPRequestEntityTooLarge:  # no content-length: aiohttp counted the bytes
                raise self._too_large() from None
            subset = _subset(headers)
            if body:
                parse_body(req, body)
            # Without a body (GET /v1/models and the like) the request is routed unread, as over ext_proc.
            ex = await xs.open_async(req, subset, received_at) if xs.awaits else xs.open(req, subset, received_at)
        except errors.EppError as e:
            xs.failed(req, e)
            self._processed(received_at)
            if e.http_status >= 500:
                # ext_authz would answer a 5xx with its own bodiless status_on_error: the layout's
                # ext_proc filter sends this error instead.
                key = self.handoffs.hold(Handoff(error=e))
                return web.Response(status=200, headers={EXCHANGE_HEADER: key, HANDOFF_HEADER: "1"})
            return web.Response(status=e.http_status, body=e.body(), headers={**_JSON, **e.headers})
        self._processed(received_at)
        d = ex.decision
        out = ex.pick_headers()
        out[DESTINATION_HEADER] = d.endpoint.hostport
        out[DESTINATION_LIST_HEADER] = d.targets  # Envoy retries along it where the pick is unreachable
        if d.body_changed:
            self.handoffs.hold(Handoff(d.body, d.endpoint.hostport, d.targets), key=ex.key)
            out[HANDOFF_HEADER] = "1"
        # Nothing more reaches this transport: the observer filter claims the exchange, or it expires.
        xs.release_later(ex)
        return web.Response(status=200, headers=out)


__all__ = ["HEALTH_PATH", "PATH_PREFIX", "HttpPick"]
