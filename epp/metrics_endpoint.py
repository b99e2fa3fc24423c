"""epp's own Prometheus endpoint (`--metrics-port`, 9090): GET /metrics on the event loop.

The exposition is rendered in a worker thread (`generate_latest` walks every collector,
which can take milliseconds with many series), so a scrape never stalls the picker.
Requests go through the authorizer first when `--metrics-endpoint-auth` is on (see
epp.metrics_auth). The text format is the classic one (upstream's promhttp does not
offer OpenMetrics), version 0.0.4 as promhttp labels it, gzip-compressed when the scraper accepts it, as promhttp does.
Upstream serves this port over plain HTTP; llm-d-router adds TLS when given
`--metrics-cert-dir`, which `ssl_context` covers.
"""

from __future__ import annotations

import asyncio
import gzip
import logging
import ssl

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from epp.metrics_auth import KubernetesAuthorizer

log = logging.getLogger(__name__)

METRICS_PATH = "/metrics"


def _render(registry: CollectorRegistry, compress: bool) -> bytes:
    body = generate_latest(registry)
    return gzip.compress(body, compresslevel=1) if compress else body


class MetricsEndpoint:
    """An aiohttp server for /metrics; `start()` binds (port 0 picks one: see `port`), `stop()` closes."""

    def __init__(
        self,
        registry: CollectorRegistry,
        host: str,
        port: int,
        *,
        authorizer: KubernetesAuthorizer | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.registry, self.host, self.port = registry, host, port
        self.authorizer, self.ssl_context = authorizer, ssl_context
        self.scrapes = 0
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get(METRICS_PATH, self._metrics)  # HEAD too
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host or None, self.port, ssl_context=self.ssl_context)
        await site.start()
        sockets = getattr(site._server, "sockets", None)
        if sockets:
            self.port = sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _metrics(self, request: web.Request) -> web.StreamResponse:
        if self.authorizer is not None:
            decision = await self.authorizer.check(request.headers.get("Authorization"), request.path,
                                                   request.method.lower())
            if not decision.allowed:
                return web.Response(status=decision.status, text=decision.reason + "\n",
                                    headers={"X-Content-Type-Options": "nosniff"})
        compress = "gzip" in request.headers.get("Accept-Encoding", "")
        body = await asyncio.to_thread(_render, self.registry, compress)
        self.scrapes += 1
        resp = web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_PLAIN_0_0_4})
        if compress:
            resp.headers["Content-Encoding"] = "gzip"
        return resp
