"""header-based-testing-filter (GIE, llm-d-router; for conformance tests): keep exactly the servers
the `test-epp-endpoint-selection` header lists ("ip" or "ip:port", comma-separated, in that order,
each once). Without the header nothing is kept, so the request fails with 503.
"""

from __future__ import annotations

from epp.datastore import Endpoint
from epp.requests import InferenceRequest
from epp.scheduling.framework import CycleState, Filter

HEADER = "test-epp-endpoint-selection"


class HeaderBasedTestingFilter(Filter):
    type_name = "header-based-testing-filter"
    ignores_parameters = True

    def filter(self, state: CycleState, request: InferenceRequest, endpoints: list[Endpoint]) -> list[Endpoint]:
        wanted = request.headers.get(HEADER, "").strip()
        if not wanted:
            return []
        by_address = {ep.address: ep for ep in endpoints}
        by_hostport = {f"{ep.address}:{ep.port}": ep for ep in endpoints}
        out: list[Endpoint] = []
        seen: set[str] = set()
        for item in wanted.split(","):
            item = item.strip()
            if not item:
                continue
            host, port = item, ""
            if item.startswith("["):  # [v6]:port or [v6]
                host, _, rest = item[1:].partition("]")
                port = rest[1:] if rest.startswith(":") else ""
            elif item.count(":") == 1:
                host, port = item.split(":")
            ep = by_hostport.get(f"{host}:{port}") if port else by_address.get(host)
            if ep is not None and ep.address not in seen:
                seen.add(ep.address)
                out.append(ep)
        return out
