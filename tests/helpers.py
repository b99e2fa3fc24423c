"""Hand-built endpoints and requests for unit tests, and the one poller tests wait with."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import orjson

from epp.datastore import Datastore, Endpoint, EndpointMetrics
from epp.director import Director
from epp.metrics import EppMetrics
from epp.requests import InferenceRequest, new_request, parse_body
from epp.scheduling import picker_config
from epp.scheduling.framework import CycleState
from epp.server import EppServer

NOW = 1000.0

# What the `start_epp` fixture (tests/conftest.py) gives: `await start_epp(**options)` -> a running EppServer.
StartEpp = Callable[..., Awaitable[EppServer]]


def endpoint(port: int, *, waiting: int | None = 0, kv: float = 0.0, active: tuple[str, ...] = (),
             waiting_loras: tuple[str, ...] = (), max_lora: int = 0, age: float = 0.0, inflight: int = 0) -> Endpoint:
    """An endpoint whose last scrape was taken while epp's `inflight` requests were already there:
    the scrape's counts include them."""
    ep = Endpoint("10.0.0.1", port)
    if waiting is not None:
        ep.metrics = EndpointMetrics(waiting=waiting, kv_usage=kv, active_adapters=frozenset(active),
                                     waiting_adapters=frozenset(waiting_loras), max_lora=max_lora,
                                     scraped_at=NOW - age,
                                     own_inflight=inflight)
    ep.inflight = inflight
    return ep


def request(prompt: str = "hello world", model: str = "m") -> InferenceRequest:
    return parse_body(new_request("/v1/completions", {}), orjson.dumps({"model": model, "prompt": prompt}))


def director(*eps: Endpoint, objectives: dict[str, int] | None = None, metrics: EppMetrics | None = None,
             config: picker_config.PickerConfig | None = None) -> Director:
    """A director over these endpoints with the clock stopped at NOW; the default profile, seeded."""
    ds = Datastore()
    ds.now = lambda: NOW  # type: ignore[method-assign]
    ds.set_endpoints(eps)
    ds.objectives = {"batch": -1, "critical": 10} if objectives is None else objectives
    return Director(ds, config or picker_config.default_config(seed=1), metrics)


def cycle_state(now: float = NOW) -> CycleState:
    """A scheduling cycle at `now`, trusting metrics up to 2 s old (the default staleness)."""
    return CycleState(now, staleness=2.0)


async def until(cond: Callable[[], object], timeout: float = 5.0, what: str = "the condition") -> None:
    """Wait until `cond()` is true, polling on the event loop; TimeoutError names `what` it waited for."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        if loop.time() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.005)
