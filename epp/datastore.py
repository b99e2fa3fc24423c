"""The pool's current state, shared by discovery, the scraper and the request path.

One owner per field: discovery adds and removes endpoints and sets readiness; the
scraper replaces `Endpoint.metrics` with a new immutable snapshot (a single
attribute store, safe across threads); the request path alone changes `inflight`.
Readers never lock: they see either the old snapshot or the new one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from epp.rewrites import ModelRewrites


@dataclass(frozen=True, slots=True)
class EndpointMetrics:
    """One scrape of a model server, in server-neutral terms."""

    waiting: int = 0
    running: int = 0
    kv_usage: float = 0.0  # fraction 0..1
    active_adapters: frozenset[str] = frozenset()
    waiting_adapters: frozenset[str] = frozenset()
    max_lora: int = 0
    scraped_at: float = 0.0  # time.monotonic()
    # The server's KV cache configuration (vLLM's cache_config_info); 0: not reported.
    cache_block_size: int = 0  # tokens per block
    cache_num_blocks: int = 0  # blocks on the GPU
    # epp's own requests in flight to the server while it was scraped (the most during the scrape):
    # of the requests the scrape shows, these may be epp's; the rest are other clients'.
    own_inflight: int = 0


@dataclass(eq=False, slots=True)
class Endpoint:
    """A model-server endpoint of the pool. Identity is the object; `hostport` is its key."""

    address: str
    port: int
    name: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    ready: bool = True
    metrics_port: int | None = None
    metrics: EndpointMetrics | None = None
    scrape_error: str | None = None
    # Requests the EPP sent here that have not finished: exact and fresher than any scrape.
    inflight: int = 0
    hostport: str = ""

    def __post_init__(self) -> None:
        self.hostport = f"{self.host}:{self.port}"
        if not self.name:
            self.name = self.hostport

    def fresh_metrics(self, now: float, staleness: float) -> EndpointMetrics | None:
        """The last scrape if it is recent enough to trust, else None (unknown, not idle)."""
        m = self.metrics
        if m is None or now - m.scraped_at > staleness:
            return None
        return m

    @property
    def host(self) -> str:
        """The address as it goes in a URL or ip:port (IPv6 in brackets)."""
        return f"[{self.address}]" if ":" in self.address else self.address

    def metrics_url(self, path: str, scheme: str = "http") -> str:
        return f"{scheme}://{self.host}:{self.metrics_port or self.port}{path}"


def parse_hostport(text: str) -> tuple[str, int]:
    """'10.0.0.1:8000' or '[::1]:8000' -> (address, port), with a clear error for anything else."""
    text = text.strip()
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"invalid endpoint {text!r}: expected ip:port")
    return host, int(port)


Listener = Callable[[list["Endpoint"], list["Endpoint"]], None]


class Datastore:
    """Endpoints of one InferencePool. Readers get a cached tuple: no per-request copy."""

    def __init__(self, staleness: float = 2.0) -> None:
        self.staleness = staleness
        self._by_key: dict[str, Endpoint] = {}
        self._ready: tuple[Endpoint, ...] = ()
        self._listeners: list[Listener] = []
        # False until discovery has reported the pool once: gRPC health stays NOT_SERVING.
        self.pool_synced = False
        # InferenceObjective name -> priority (absent means priority 0).
        self.objectives: dict[str, int] = {}
        # InferenceModelRewrite rules of the pool; replaced whole on reload.
        self.rewrites = ModelRewrites()

    # --- readers -----------------------------------------------------------
    def ready_endpoints(self) -> tuple[Endpoint, ...]:
        return self._ready

    def all_endpoints(self) -> list[Endpoint]:
        return list(self._by_key.values())

    def get(self, hostport: str) -> Endpoint | None:
        return self._by_key.get(hostport)

    def now(self) -> float:
        return time.monotonic()

    # --- discovery ---------------------------------------------------------
    def subscribe(self, listener: Listener) -> None:
        """Called with (added, removed) after every change, on the thread that made it."""
        self._listeners.append(listener)

    def set_endpoints(self, endpoints: Iterable[Endpoint]) -> None:
        """Replace the pool's membership. Known endpoints keep their metrics and in-flight counts."""
        incoming = {ep.hostport: ep for ep in endpoints}
        added: list[Endpoint] = []
        removed = [ep for key, ep in self._by_key.items() if key not in incoming]
        merged: dict[str, Endpoint] = {}
        for key, ep in incoming.items():
            old = self._by_key.get(key)
            if old is None:
                merged[key] = ep
                added.append(ep)
            else:
                old.name, old.labels, old.ready, old.metrics_port = ep.name, ep.labels, ep.ready, ep.metrics_port
                merged[key] = old
        self._by_key = merged
        self._ready = tuple(ep for ep in merged.values() if ep.ready)
        self.pool_synced = True
        if added or removed:
            for listener in self._listeners:
                listener(added, removed)
