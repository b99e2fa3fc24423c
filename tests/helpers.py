"""Hand-built endpoints and requests for unit tests."""

from __future__ import annotations

from epp.datastore import Endpoint, EndpointMetrics
from epp.requests import InferenceRequest, new_request, parse_body

NOW = 1000.0


def endpoint(port: int, *, waiting: int | None = 0, kv: float = 0.0, active: tuple[str, ...] = (),
             waiting_loras: tuple[str, ...] = (), max_lora: int = 0, age: float = 0.0, inflight: int = 0) -> Endpoint:
    ep = Endpoint("10.0.0.1", port)
    if waiting is not None:
        ep.metrics = EndpointMetrics(waiting=waiting, kv_usage=kv, active_adapters=frozenset(active),
                                     waiting_adapters=frozenset(waiting_loras), max_lora=max_lora,
                                     scraped_at=NOW - age)
    ep.inflight = inflight
    return ep


def request(prompt: str = "hello world", model: str = "m") -> InferenceRequest:
    import orjson

    return parse_body(new_request("/v1/completions", {}), orjson.dumps({"model": model, "prompt": prompt}))
