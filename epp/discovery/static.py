"""A fixed pool given on the command line: `--endpoints 10.0.0.1:8000,10.0.0.2:8000`."""

from __future__ import annotations

from collections.abc import Iterable

from epp.datastore import Endpoint, parse_hostport


def static_endpoints(items: Iterable[str], metrics_port: int | None = None) -> list[Endpoint]:
    """Endpoints from 'ip:port' strings (comma-separated lists allowed); duplicates collapse."""
    seen: dict[str, Endpoint] = {}
    for item in items:
        for text in item.split(","):
            if not text.strip():
                continue
            host, port = parse_hostport(text)
            ep = Endpoint(host, port, metrics_port=metrics_port)
            seen.setdefault(ep.hostport, ep)
    return list(seen.values())
