"""One epp picker per InferencePool, in the gateway's process.

Each pool gets its own `EppServer`: its datastore, scraper, scheduler (with its own
prefix index, so affinity stays within the pool), metrics and a gRPC ext_proc port
on loopback that its Envoy cluster points at. In one process rather than one
`epp serve` per pool: a pool added to the manifests is picking within milliseconds
(no interpreter to start), and every pool is updated from the same consistent read of
the manifests. The price is one event loop for all pools' picks; where a pool needs a
core of its own, run `epp serve` for it and an Envoy of your own.

The server reads its pool from a pool file written beside it (the pool's objects as the
manifests give them), which is what `epp serve --pool-file` would read; updates are
applied to the running server directly, and the file is rewritten to match.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import tempfile
from pathlib import Path

from epp.discovery import manifests as pool_manifests
from epp.gateway.httproute import PoolRef
from epp.gateway.manifests import Pool
from epp.server import EppServer, ServeOptions
from epp.stack import free_ports

log = logging.getLogger(__name__)

NEVER = 365 * 24 * 3600.0  # the pool file is not polled: the gateway applies its changes itself


class PoolPicker:
    """The picker of one pool: start, update, stop."""

    def __init__(self, pool: Pool, template: ServeOptions, workdir: Path) -> None:
        self.ref: PoolRef = pool.ref
        self.pool = pool
        self.path = workdir / f"{pool.ref.namespace}.{pool.ref.name}.yaml"
        self.path.write_text(pool.document, encoding="utf-8")
        (port,) = free_ports(1)
        opts = dataclasses.replace(
            template, grpc_port=port, grpc_health_port=port, metrics_port=0, http_pick_port=0,
            bind_address="127.0.0.1", endpoints=[], pool_file=str(self.path), pool_file_reload_interval=NEVER,
            pool_name=pool.ref.name, pool_namespace=pool.ref.namespace, secure_serving=False,
            metrics_endpoint_auth=False)
        self.server = EppServer(opts)

    @property
    def port(self) -> int:
        return self.server.opts.grpc_port

    @property
    def in_flight(self) -> int:
        """Picks whose responses are not finished yet."""
        return len(self.server.exchanges)

    async def start(self) -> None:
        await self.server.start()
        log.info("pool %s: picker on 127.0.0.1:%d, %d endpoints (%d ready), %d objectives, %d rewrite rules",
                 self.ref, self.port, len(self.pool.snapshot.endpoints),
                 sum(ep.ready for ep in self.pool.snapshot.endpoints), len(self.pool.snapshot.objectives),
                 len(self.pool.snapshot.rewrites))

    def update(self, pool: Pool) -> bool:
        """Apply the pool's new objects; False when nothing changed."""
        if pool.document == self.pool.document:
            return False
        self.pool = pool
        self.path.write_text(pool.document, encoding="utf-8")
        # Fresh endpoint objects: the datastore keeps its own (metrics, in-flight) for those it knows.
        snap = pool_manifests.parse(pool.document, str(self.path), pool.ref.name, pool.ref.namespace)
        self.server.apply_pool_file(snap)
        log.info("pool %s updated: %d endpoints, %d objectives, %d rewrite rules", self.ref, len(snap.endpoints),
                 len(snap.objectives), len(snap.rewrites))
        return True

    async def stop(self, grace: float) -> None:
        """Refuse new picks; picks in flight (their responses still streaming) get `grace` seconds."""
        await self.server.stop(grace)
        with contextlib.suppress(OSError):
            self.path.unlink()


def workdir() -> tempfile.TemporaryDirectory[str]:
    return tempfile.TemporaryDirectory(prefix="epp-gateway-")
