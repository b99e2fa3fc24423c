"""The flow controller: priority order, fairness, capacity, TTL, cancellation, and every request decided once.

A `Pool` stands in for the saturation detector over real endpoints: its saturation is
in-flight / capacity, as the concurrency detector computes it, and each dispatched request
counts itself in flight right after `admit` returns, as the director's pick does.
"""

from __future__ import annotations

import asyncio
import random

import orjson
import pytest

from epp.errors import EppError
from epp.flowcontrol import (
    DROPPED_REASON_HEADER,
    FlowControlConfig,
    FlowControlError,
    FlowController,
    Outcome,
    UsageLimitPolicy,
)
from epp.flowcontrol.config import EDF, PRIORITY_HOLDBACK, ROUND_ROBIN, BandConfig
from epp.metrics import EppMetrics
from epp.requests import InferenceRequest
from tests.helpers import request, until


class Pool:
    def __init__(self, capacity: int, endpoints: int = 1) -> None:
        self.capacity, self.inflight, self.eps = capacity, 0, endpoints
        self.reads = 0

    def saturation(self) -> float:
        self.reads += 1
        return self.inflight / self.capacity if self.eps else 1.0

    def endpoints(self) -> int:
        return self.eps


def req(name: str, priority: int = 0, flow: str = "default-flow", size: int = 10) -> InferenceRequest:
    r = request(prompt=name)
    r.priority, r.fairness_id, r.request_id = priority, flow, name
    r.body = b"x" * size
    return r


def controller(pool: Pool, cfg: FlowControlConfig | None = None,
               metrics: EppMetrics | None = None) -> FlowController:
    return FlowController(cfg or FlowControlConfig(), pool.saturation, pool.endpoints, metrics=metrics,
                          pool_name="pool")


async def serve(fc: FlowController, pool: Pool, r: InferenceRequest, served: list[str]) -> None:
    """Admit, then count in flight at once (the director's pick), as epp does."""
    await fc.admit(r)
    pool.inflight += 1
    served.append(r.request_id)


def finish_one(fc: FlowController, pool: Pool) -> None:
    pool.inflight -= 1
    fc.capacity_changed()


async def queued(fc: FlowController, n: int) -> None:
    await until(lambda: fc.count == n, 2, f"{n} requests queued")


async def test_an_unsaturated_pool_admits_at_once_without_queueing() -> None:
    pool = Pool(capacity=2)
    fc = controller(pool)
    assert await fc.admit(req("a")) == 0.0
    assert fc.count == 0


async def test_bands_dispatch_highest_priority_first_and_first_come_first_within_a_band() -> None:
    pool = Pool(capacity=1)
    pool.inflight = 1  # saturated
    fc = controller(pool)
    served: list[str] = []
    order = [("low1", -1), ("mid1", 0), ("high1", 10), ("low2", -1), ("high2", 10), ("mid2", 0)]
    tasks = []
    for name, prio in order:
        tasks.append(asyncio.create_task(serve(fc, pool, req(name, prio), served)))
        await queued(fc, len(tasks))
    assert fc.band_sizes() == {10: 2, 0: 2, -1: 2}
    for i in range(len(order)):
        finish_one(fc, pool)  # one slot frees: exactly one request takes it
        await until(lambda i=i: len(served) == i + 1, 2, "the next dispatch")
        await asyncio.sleep(0.01)
        assert len(served) == i + 1, "a freed slot let more than one request through"
    await asyncio.gather(*tasks)
    assert served == ["high1", "high2", "mid1", "mid2", "low1", "low2"]


async def test_nothing_polls_while_requests_wait_and_nothing_changes() -> None:
    pool = Pool(capacity=1)
    pool.inflight = 1
    fc = controller(pool)
    task = asyncio.create_task(fc.admit(req("a")))
    await queued(fc, 1)
    await asyncio.sleep(0.05)
    reads = pool.reads
    await asyncio.sleep(0.3)
    assert pool.reads == reads, "the controller read saturation with no capacity signal"
    pool.inflight = 0
    fc.capacity_changed()
    assert await task >= 0.3


async def test_a_request_waits_out_its_ttl_then_gets_429_with_the_reason_header() -> None:
    pool = Pool(capacity=1)
    pool.inflight = 1
    fc = controller(pool, FlowControlConfig(default_request_ttl=0.2))
    loop = asyncio.get_running_loop()
    start = loop.time()
    with pytest.raises(FlowControlError) as e:
        await fc.admit(req("a"))
    waited = loop.time() - start
    assert 0.19 <= waited < 0.6
    err = e.value
    assert err.http_status == 429
    assert err.outcome is Outcome.EVICTED_TTL
    assert err.headers == {DROPPED_REASON_HEADER: "rejected-ttl-expired"}
    body = orjson.loads(err.body())
    assert body["error"]["code"] == "rejected-ttl-expired"
    assert "timed out in queue" in body["error"]["message"]
    assert fc.count == 0
    assert fc.bytes == 0


async def test_without_endpoints_a_request_waits_its_no_endpoint_budget_then_gets_503() -> None:
    pool = Pool(capacity=1, endpoints=0)
    fc = controller(pool, FlowControlConfig(default_request_ttl=5, no_endpoint_request_ttl=0.1))
    with pytest.raises(FlowControlError) as e:
        await fc.admit(req("a"))
    assert e.value.http_status == 503
    assert e.value.outcome is Outcome.EVICTED_NO_ENDPOINTS
    assert e.value.headers[DROPPED_REASON_HEADER] == "rejected-no-endpoints"


async def test_endpoints_appearing_give_waiting_requests_a_fresh_budget_and_their_turn() -> None:
    pool = Pool(capacity=1, endpoints=0)
    fc = controller(pool, FlowControlConfig(default_request_ttl=5, no_endpoint_request_ttl=0.3))
    task = asyncio.create_task(fc.admit(req("a")))
    await queued(fc, 1)
    await asyncio.sleep(0.2)
    pool.eps, pool.inflight = 1, 1  # an endpoint appears, busy
    fc.capacity_changed()
    await asyncio.sleep(0.3)  # past the no-endpoint budget: the default budget now runs
    assert not task.done()
    pool.inflight = 0
    fc.capacity_changed()
    assert await task >= 0.5


async def test_a_full_band_rejects_at_once_by_count_and_by_bytes() -> None:
    pool = Pool(capacity=1)
    pool.inflight = 1
    cfg = FlowControlConfig(bands={0: BandConfig(0, max_requests=2), 5: BandConfig(5, max_bytes=100)})
    fc = controller(pool, cfg)
    waiting = [asyncio.create_task(fc.admit(req(f"c{i}", 0))) for i in range(2)]
    await queued(fc, 2)
    with pytest.raises(FlowControlError) as e:
        await fc.admit(req("c2", 0))
    assert e.value.http_status == 429
    assert e.value.outcome is Outcome.REJECTED_CAPACITY
    assert e.value.headers[DROPPED_REASON_HEADER] == "rejected-saturated"
    waiting += [asyncio.create_task(fc.admit(req(f"b{i}", 5, size=40))) for i in range(2)]
    await queued(fc, 4)
    with pytest.raises(FlowControlError) as e:
        await fc.admit(req("b2", 5, size=40))  # 120 bytes > 100
    assert e.value.outcome is Outcome.REJECTED_CAPACITY
    waiting.append(asyncio.create_task(fc.admit(req("b3", 5, size=20))))  # 100 bytes: still fits
    await queued(fc, 5)
    fc.close()
    results = await asyncio.gather(*waiting, return_exceptions=True)
    assert all(isinstance(r, FlowControlError) and r.headers[DROPPED_REASON_HEADER] == "rejected-shutting-down"
               for r in results)


async def test_the_global_bounds_hold_across_bands() -> None:
    pool = Pool(capacity=1)
    pool.inflight = 1
    fc = controller(pool, FlowControlConfig(max_requests=2))
    tasks = [asyncio.create_task(fc.admit(req(f"r{i}", i))) for i in range(2)]
    await queued(fc, 2)
    with pytest.raises(FlowControlError):
        await fc.admit(req("r2", 99))
    fc.close()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_a_full_queue_with_no_endpoints_is_503_not_429() -> None:
    pool = Pool(capacity=1, endpoints=0)
    fc = controller(pool, FlowControlConfig(bands={0: BandConfig(0, max_requests=1)}))
    task = asyncio.create_task(fc.admit(req("a")))
    await queued(fc, 1)
    with pytest.raises(FlowControlError) as e:
        await fc.admit(req("b"))
    assert e.value.http_status == 503
    assert e.value.outcome is Outcome.REJECTED_NO_ENDPOINTS
    fc.close()
    await asyncio.gather(task, return_exceptions=True)


async def test_a_cancelled_wait_leaves_the_queue_at_once_and_the_next_request_gets_the_slot() -> None:
    pool = Pool(capacity=1)
    pool.inflight = 1
    metrics = EppMetrics("pool")
    fc = controller(pool, metrics=metrics)
    served: list[str] = []
    first = asyncio.create_task(serve(fc, pool, req("first", size=70), served))
    await queued(fc, 1)
    second = asyncio.create_task(serve(fc, pool, req("second", size=30), served))
    await queued(fc, 2)
    assert metrics.registry.get_sample_value("llm_d_epp_flow_control_queue_bytes", {
        "fairness_id": "default-flow", "priority": "0", "inference_pool": "pool", "model_name": "m",
        "target_model_name": "m"}) == 100
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    assert fc.count == 1
    assert fc.bytes == 30
    assert metrics.registry.get_sample_value("llm_d_epp_flow_control_requests_total", {
        "outcome": "EvictedContextCancelled", "priority": "0", "inference_pool": "pool"}) == 1
    finish_one(fc, pool)
    await second
    assert served == ["second"]


async def test_a_request_cancelled_just_as_its_turn_came_passes_the_turn_on() -> None:
    pool = Pool(capacity=1)
    pool.inflight = 1
    fc = controller(pool)
    served: list[str] = []
    first = asyncio.create_task(serve(fc, pool, req("first"), served))
    second = asyncio.create_task(serve(fc, pool, req("second"), served))
    await queued(fc, 2)
    pool.inflight = 0
    fc.capacity_changed()
    await asyncio.sleep(0)  # the dispatch cycle runs: `first` gets its turn ...
    first.cancel()  # ... and is cancelled before it resumes
    await asyncio.gather(first, return_exceptions=True)
    await asyncio.wait_for(second, 1)
    assert served == ["second"]
    assert fc.count == 0


async def test_round_robin_serves_two_flows_alike_however_unequal_their_backlog() -> None:
    pool = Pool(capacity=1)
    pool.inflight = 1
    fc = controller(pool, FlowControlConfig(default_band=BandConfig(fairness=ROUND_ROBIN)))
    served: list[str] = []
    tasks = [asyncio.create_task(serve(fc, pool, req(f"heavy{i}", flow="heavy"), served)) for i in range(40)]
    await queued(fc, 40)
    tasks += [asyncio.create_task(serve(fc, pool, req(f"light{i}", flow="light"), served)) for i in range(10)]
    await queued(fc, 50)
    for n in range(20):
        finish_one(fc, pool)
        await until(lambda n=n: len(served) == n + 1, 2, "the next dispatch")
    light = sum(1 for s in served if s.startswith("light"))
    assert 9 <= light <= 10, served  # half the turns, though it has a fifth of the backlog
    fc.close()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_global_strict_fairness_keeps_arrival_order_across_flows() -> None:
    pool = Pool(capacity=1)
    pool.inflight = 1
    fc = controller(pool)
    served: list[str] = []
    tasks = [asyncio.create_task(serve(fc, pool, req(f"heavy{i}", flow="heavy"), served)) for i in range(5)]
    await queued(fc, 5)
    tasks += [asyncio.create_task(serve(fc, pool, req(f"light{i}", flow="light"), served)) for i in range(2)]
    await queued(fc, 7)
    for n in range(7):
        finish_one(fc, pool)
        await until(lambda n=n: len(served) == n + 1, 2, "the next dispatch")
    assert served == [f"heavy{i}" for i in range(5)] + ["light0", "light1"]
    await asyncio.gather(*tasks)


async def test_edf_dispatches_the_earliest_deadline_first() -> None:
    pool = Pool(capacity=1)
    pool.inflight = 1
    fc = controller(pool, FlowControlConfig(default_band=BandConfig(ordering=EDF)))
    served: list[str] = []

    async def with_ttl(name: str, ttl: float) -> None:
        await fc.admit(req(name), ttl=ttl)
        pool.inflight += 1
        served.append(name)

    tasks = []
    for name, ttl in (("loose", 50.0), ("tight", 5.0), ("medium", 20.0)):
        tasks.append(asyncio.create_task(with_ttl(name, ttl)))
        await queued(fc, len(tasks))
    for n in range(3):
        finish_one(fc, pool)
        await until(lambda n=n: len(served) == n + 1, 2, "the next dispatch")
    assert served == ["tight", "medium", "loose"]
    await asyncio.gather(*tasks)


async def test_priority_holdback_lets_high_priority_through_while_low_priority_waits() -> None:
    pool = Pool(capacity=10)
    pool.inflight = 6  # saturation 0.6: above the low band's ceiling (0.5), below the high band's (1.0)
    holdback = UsageLimitPolicy(PRIORITY_HOLDBACK, min_ceiling=0.5, max_ceiling=1.0)
    fc = controller(pool, FlowControlConfig(usage_limit=holdback))
    assert await fc.admit(req("high0", 10)) == 0.0
    low = asyncio.create_task(fc.admit(req("low", -1)))  # two bands now: ceilings 1.0 and 0.5
    await queued(fc, 1)
    assert await asyncio.wait_for(fc.admit(req("high", 10)), 1) == 0.0
    assert not low.done()
    pool.inflight = 4
    fc.capacity_changed()
    await asyncio.wait_for(low, 1)


async def test_a_client_that_leaves_as_its_turn_comes_is_counted_cancelled_and_the_turn_passes_on() -> None:
    """The dispatch decision and the client's disconnect land in the same loop iteration: the client
    never gets the request through, so the metrics say cancelled, and the next waiter is served."""
    pool = Pool(capacity=1)
    pool.inflight = 1
    metrics = EppMetrics("pool")
    fc = controller(pool, metrics=metrics)
    first = asyncio.create_task(fc.admit(req("first")))
    await queued(fc, 1)
    second = asyncio.create_task(fc.admit(req("second")))
    await queued(fc, 2)
    finish_one(fc, pool)  # schedules the dispatch cycle that gives `first` its turn ...
    asyncio.get_running_loop().call_soon(first.cancel)  # ... and right after it, before `first` resumes
    with pytest.raises(asyncio.CancelledError):
        await first
    await asyncio.wait_for(second, 1)

    def count(outcome: str) -> float:
        return metrics.registry.get_sample_value("llm_d_epp_flow_control_requests_total", {
            "outcome": outcome, "priority": "0", "inference_pool": "pool"}) or 0
    assert count("Dispatched") == 1
    assert count(Outcome.EVICTED_CONTEXT_CANCELLED.value) == 1


async def test_every_request_is_decided_exactly_once_under_churn() -> None:
    rng = random.Random(7)
    pool = Pool(capacity=4)
    metrics = EppMetrics("pool")
    cfg = FlowControlConfig(default_request_ttl=0.15, bands={-1: BandConfig(-1, max_requests=6)},
                            default_band=BandConfig(fairness=ROUND_ROBIN))
    fc = controller(pool, cfg, metrics)
    outcomes: dict[str, str] = {}
    running: set[str] = set()

    async def client(name: str, prio: int, flow: str, give_up: float | None) -> None:
        r = req(name, prio, flow)
        task = asyncio.current_task()
        assert task is not None
        # The client disconnects while it waits (it would not once served: the timer is cancelled then).
        timer = asyncio.get_running_loop().call_later(give_up, task.cancel) if give_up is not None else None
        try:
            await fc.admit(r)
        except FlowControlError as e:
            assert name not in outcomes
            outcomes[name] = e.outcome.value
            return
        except asyncio.CancelledError:
            assert name not in outcomes
            outcomes[name] = "cancelled"
            return
        if timer is not None:
            timer.cancel()
        assert name not in outcomes
        assert name not in running
        outcomes[name] = "dispatched"
        pool.inflight += 1
        running.add(name)
        await asyncio.sleep(rng.uniform(0.005, 0.03))
        running.discard(name)
        finish_one(fc, pool)

    tasks = []
    for i in range(150):
        prio = rng.choice((-1, 0, 5))
        give_up = rng.uniform(0.01, 0.2) if rng.random() < 0.2 else None
        tasks.append(asyncio.create_task(client(f"r{i}", prio, rng.choice("abc"), give_up)))
        if rng.random() < 0.5:
            await asyncio.sleep(rng.uniform(0, 0.004))
    await asyncio.gather(*tasks)
    assert len(outcomes) == 150
    kinds = set(outcomes.values())
    assert {"dispatched", "cancelled", "EvictedTTL", "RejectedCapacity"} <= kinds, kinds
    assert fc.count == 0
    assert fc.bytes == 0
    assert pool.inflight == 0
    assert not running
    total = sum(metrics.registry.get_sample_value("llm_d_epp_flow_control_requests_total", {
        "outcome": o, "priority": p, "inference_pool": "pool"}) or 0
        for o in (x.value for x in Outcome) for p in ("-1", "0", "5"))
    assert total == 150
    dispatched = sum(1 for v in outcomes.values() if v == "dispatched")
    assert dispatched == sum(metrics.registry.get_sample_value("llm_d_epp_flow_control_requests_total", {
        "outcome": "Dispatched", "priority": p, "inference_pool": "pool"}) or 0 for p in ("-1", "0", "5"))
    for p in ("-1", "0", "5"):
        for f in "abc":
            labels = {"fairness_id": f, "priority": p, "inference_pool": "pool", "model_name": "m",
                      "target_model_name": "m"}
            assert (metrics.registry.get_sample_value("llm_d_epp_flow_control_queue_size", labels) or 0) == 0


async def test_a_closed_controller_refuses_new_requests_with_503() -> None:
    fc = controller(Pool(capacity=1))
    fc.close()
    with pytest.raises(EppError) as e:
        await fc.admit(req("late"))
    assert e.value.http_status == 503
