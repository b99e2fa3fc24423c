"""The flow controller: requests wait here while the pool is saturated and leave by priority as capacity returns.

`await controller.admit(request)` returns when the request may be scheduled, or raises
`FlowControlError` (an EppError with upstream's status, reason header and message):

| outcome                  | when                                             | HTTP | x-llm-d-request-dropped-reason |
|--------------------------|--------------------------------------------------|------|--------------------------------|
| Dispatched               | capacity (the band's ceiling above saturation)   | -    | -                              |
| RejectedCapacity         | its band, or all bands, full (count or bytes)    | 429  | rejected-saturated             |
| RejectedNoEndpoints      | full while the pool has no endpoints             | 503  | rejected-no-endpoints          |
| EvictedTTL               | waited its whole queue-wait budget               | 429  | rejected-ttl-expired           |
| EvictedNoEndpoints       | ... while the pool had no endpoints              | 503  | rejected-no-endpoints          |
| EvictedContextCancelled  | the waiting task was cancelled (client gone)     | -    | (CancelledError propagates)    |
| Rejected/EvictedOther    | the controller is closing                        | 503  | rejected-shutting-down         |

Dispatch is event driven: nothing runs while nothing changes. A request that finds no one
waiting at or above its priority and the pool below its band's ceiling passes at once.
Otherwise it is queued, and each capacity signal (`capacity_changed`: an exchange finished,
a scrape landed, endpoints changed) runs one dispatch cycle: from the highest band down,
stop at the first band whose ceiling the saturation reaches (head-of-line blocking, as
upstream), else hand the band's next request (fairness picks the flow, ordering its head)
its turn. After a dispatch the next cycle is scheduled behind the dispatched request's own
task, so the caller must commit the pick (in-flight +1) before it next awaits; the cycle
then reads a saturation that counts it. Each waiting request has one timer for its TTL. A
saturation read from scraped metrics changes with no signal here, so while requests wait
behind it the controller looks again every `recheck` seconds (the scrape interval); idle, never.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from epp import errors
from epp.flowcontrol.config import FlowControlConfig
from epp.flowcontrol.queue import Band, Item

if TYPE_CHECKING:
    from epp.metrics import EppMetrics

# llm-d-router's response header naming why a request was dropped.
DROPPED_REASON_HEADER = "x-llm-d-request-dropped-reason"
REASON_SATURATED = "rejected-saturated"
REASON_NO_ENDPOINTS = "rejected-no-endpoints"
REASON_TTL_EXPIRED = "rejected-ttl-expired"
REASON_CONTEXT_CANCELLED = "rejected-context-cancelled"
REASON_SHUTTING_DOWN = "rejected-shutting-down"


class Outcome(enum.Enum):
    """How a request left flow control (upstream's QueueOutcome names: the `outcome` metric label)."""

    DISPATCHED = "Dispatched"
    REJECTED_CAPACITY = "RejectedCapacity"
    REJECTED_NO_ENDPOINTS = "RejectedNoEndpoints"
    REJECTED_OTHER = "RejectedOther"
    EVICTED_TTL = "EvictedTTL"
    EVICTED_NO_ENDPOINTS = "EvictedNoEndpoints"
    EVICTED_CONTEXT_CANCELLED = "EvictedContextCancelled"
    EVICTED_OTHER = "EvictedOther"


class FlowControlError(errors.EppError):
    """A request flow control did not dispatch; `headers` go on the error response."""

    def __init__(self, outcome: Outcome, code: str, message: str, reason: str) -> None:
        super().__init__(code, message, reason=reason, headers={DROPPED_REASON_HEADER: reason})
        self.outcome = outcome


def outcome_error(outcome: Outcome) -> FlowControlError:
    """The client's error for an outcome that is not a dispatch (upstream's translation)."""
    if outcome is Outcome.REJECTED_CAPACITY:
        return FlowControlError(outcome, errors.RESOURCE_EXHAUSTED,
                                "request rejected by flow control: the queue is at capacity", REASON_SATURATED)
    if outcome is Outcome.REJECTED_NO_ENDPOINTS:
        return FlowControlError(outcome, errors.SERVICE_UNAVAILABLE,
                                "no endpoints available: the flow-control queue is at capacity", REASON_NO_ENDPOINTS)
    if outcome is Outcome.EVICTED_TTL:
        return FlowControlError(outcome, errors.RESOURCE_EXHAUSTED,
                                "request timed out in queue: the pool stayed saturated for the request's TTL",
                                REASON_TTL_EXPIRED)
    if outcome is Outcome.EVICTED_NO_ENDPOINTS:
        return FlowControlError(outcome, errors.SERVICE_UNAVAILABLE,
                                "request timed out in queue and no endpoints are available", REASON_NO_ENDPOINTS)
    if outcome is Outcome.EVICTED_CONTEXT_CANCELLED:
        return FlowControlError(outcome, errors.SERVICE_UNAVAILABLE, "client disconnected while queued",
                                REASON_CONTEXT_CANCELLED)
    return FlowControlError(outcome, errors.SERVICE_UNAVAILABLE, "flow controller shutting down", REASON_SHUTTING_DOWN)


class FlowController:
    """Priority bands of waiting requests over one pool.

    `saturation()` is the pool's saturation level (the detector's; 1.0 is saturated) and
    `endpoints()` the number of candidate endpoints; both are read on the event loop.
    """

    def __init__(self, config: FlowControlConfig, saturation: Callable[[], float], endpoints: Callable[[], int], *,
                 metrics: EppMetrics | None = None, pool_name: str = "", recheck: float = 0.0) -> None:
        self.config = config
        # A detector that reads scraped metrics moves without any signal here: while requests wait
        # behind a saturated pool, look again every `recheck` seconds (0: only on signals).
        self.recheck = recheck
        self._recheck_handle: asyncio.TimerHandle | None = None
        self.saturation = saturation
        self.endpoints = endpoints
        self.metrics = metrics
        self.pool_name = pool_name
        self.bands: list[Band] = []  # highest priority first
        self._by_priority: dict[int, Band] = {}
        self._ceilings: list[float] = []
        self.count = 0  # live requests waiting, all bands
        self.bytes = 0
        self._seq = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pump_scheduled = False
        self._empty = False  # the pool had no endpoints at the last look (the no-endpoint TTL regime)
        self._closed = False

    # --- the request's side --------------------------------------------------------------------
    async def admit(self, request: Any, size: int | None = None, ttl: float | None = None) -> float:
        """Wait for the request's turn; the seconds it waited. Raises FlowControlError; a cancelled
        wait leaves the queue at once. `ttl` may shorten the request's budget (and its EDF deadline)."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        band = self._band(request.priority)
        size = len(request.body) if size is None else size
        if self._closed:
            self._finished(request, band, Outcome.REJECTED_OTHER, 0.0)
            raise outcome_error(Outcome.REJECTED_OTHER)
        if not self._waiting_at_or_above(band) and self.saturation() < self._ceiling(band):
            self._finished(request, band, Outcome.DISPATCHED, 0.0)
            return 0.0
        started = time.perf_counter()
        now = loop.time()
        self._check_regime(now)
        c = self.config
        full = (not band.fits(size) or (c.max_requests and self.count + 1 > c.max_requests)
                or (c.max_bytes and self.bytes + size > c.max_bytes))
        if full:
            outcome = Outcome.REJECTED_NO_ENDPOINTS if self._empty else Outcome.REJECTED_CAPACITY
            self._finished(request, band, outcome, 0.0)
            if self.metrics is not None:
                self.metrics.flow_enqueue_time(request, band.priority, outcome.value, time.perf_counter() - started)
            raise outcome_error(outcome)
        hint = ttl if ttl is not None and ttl > 0 else 0.0
        budget = self._budget_for(hint)
        self._seq += 1
        item = Item(request, size, self._seq, now, budget, loop.create_future(), hint)
        band.add(item)
        self.count += 1
        self.bytes += size
        if budget > 0:
            item.timer = loop.call_at(now + budget, self._expire, item)
        m = self.metrics
        if m is not None:
            m.flow_queued(request, band.priority, size, +1)
            m.flow_enqueue_time(request, band.priority, "NotYetFinalized", time.perf_counter() - started)
        self._schedule_pump()
        try:
            outcome = await item.future
        except asyncio.CancelledError:
            if item.live:
                self._leave(item, Outcome.EVICTED_CONTEXT_CANCELLED)
            elif item.future.done() and not item.future.cancelled() and item.future.result() is Outcome.DISPATCHED:
                # Its turn came but the client left before it could use it: counted as cancelled, and
                # the turn goes to the next.
                self._finished(request, band, Outcome.EVICTED_CONTEXT_CANCELLED, loop.time() - item.enqueued)
                self._schedule_pump()
            raise
        waited = loop.time() - item.enqueued
        if outcome is Outcome.DISPATCHED:
            self._finished(request, band, outcome, waited)
            return waited
        raise outcome_error(outcome)

    # --- capacity signals ----------------------------------------------------------------------
    def capacity_changed(self) -> None:
        """Something that moves saturation happened (an exchange ended, metrics or endpoints changed)."""
        if self.count and not self._pump_scheduled:
            self._schedule_pump()

    def capacity_changed_threadsafe(self) -> None:
        """`capacity_changed` from another thread (the scraper's); free while nothing waits."""
        loop = self._loop
        if self.count and loop is not None and not self._pump_scheduled:
            loop.call_soon_threadsafe(self.capacity_changed)

    def close(self) -> None:
        """Stop: every waiting request gets 503 (shutting down), and so does every later one."""
        self._closed = True
        for band in self.bands:
            while (item := band.select()) is not None:
                self.count -= 1
                self.bytes -= item.size
                self._finalize(item, Outcome.EVICTED_OTHER)

    # --- what the explain API and tests read ------------------------------------------------------
    def band_sizes(self) -> dict[int, int]:
        return {b.priority: b.count for b in self.bands if b.count}

    # --- inside ---------------------------------------------------------------------------------------
    def _band(self, priority: int) -> Band:
        band = self._by_priority.get(priority)
        if band is None:
            band = self._by_priority[priority] = Band(self.config.band(priority))
            self.bands = sorted(self._by_priority.values(), key=lambda b: -b.priority)
            self._ceilings = self.config.usage_limit.ceilings([b.priority for b in self.bands])
        return band

    def _ceiling(self, band: Band) -> float:
        return self._ceilings[self.bands.index(band)]

    def _waiting_at_or_above(self, band: Band) -> bool:
        if not self.count:
            return False
        for b in self.bands:
            if b.count:
                return True
            if b is band:
                return False
        return False

    def _budget_for(self, hint: float) -> float:
        """The queue-wait budget in the current regime, shortened by the request's own TTL if it has one."""
        c = self.config
        budget = c.no_endpoint_request_ttl if self._empty else c.default_request_ttl
        if hint:
            return min(budget, hint) if budget > 0 else hint
        return budget

    def _check_regime(self, now: float) -> None:
        """Endpoints appeared or all left: every waiting request starts a fresh budget of the new regime,
        never past the longer of the two budgets from its arrival (upstream's bound)."""
        empty = self.endpoints() == 0
        if empty == self._empty:
            return
        self._empty = empty
        if not self.count:
            return
        c = self.config
        longest = max(c.default_request_ttl, c.no_endpoint_request_ttl)
        bounded = c.default_request_ttl > 0 and c.no_endpoint_request_ttl > 0
        assert self._loop is not None
        for band in self.bands:
            for flow in band.flows.values():
                for _, _, item in flow.heap:
                    if not item.live:
                        continue
                    if item.timer is not None:
                        item.timer.cancel()
                        item.timer = None
                    budget = self._budget_for(item.hint)
                    if budget > 0:
                        deadline = now + budget
                        if bounded:
                            deadline = min(deadline, item.enqueued + longest)
                        item.timer = self._loop.call_at(deadline, self._expire, item)

    def _schedule_pump(self) -> None:
        if not self._pump_scheduled and self._loop is not None:
            self._pump_scheduled = True
            self._loop.call_soon(self._pump)

    def _pump(self) -> None:
        """One dispatch cycle: at most one request gets its turn."""
        self._pump_scheduled = False
        if not self.count:
            return
        started = time.perf_counter()
        assert self._loop is not None
        self._check_regime(self._loop.time())
        saturation = self.saturation()
        dispatched = False
        for band, ceiling in zip(self.bands, self._ceilings, strict=True):
            if saturation >= ceiling:
                break  # head-of-line blocking: nothing below a saturated band goes either
            item = band.select()
            if item is None:
                continue
            self.count -= 1
            self.bytes -= item.size
            self._finalize(item, Outcome.DISPATCHED)
            dispatched = True
            break
        m = self.metrics
        if m is not None:
            m.flow_saturation(self.pool_name, saturation)
            m.flow_dispatch_cycle(time.perf_counter() - started)
        if dispatched and self.count:
            self._schedule_pump()  # runs after the dispatched request's task has committed its pick
        elif self.count and self.recheck > 0 and self._recheck_handle is None:
            self._recheck_handle = self._loop.call_later(self.recheck, self._recheck)

    def _recheck(self) -> None:
        self._recheck_handle = None
        self.capacity_changed()

    def _expire(self, item: Item) -> None:
        if item.live:
            self._check_regime(self._loop.time() if self._loop else 0.0)
            self._leave(item, Outcome.EVICTED_NO_ENDPOINTS if self._empty else Outcome.EVICTED_TTL)

    def _leave(self, item: Item, outcome: Outcome) -> None:
        """A live item leaves without its turn."""
        band = item.band
        assert band is not None
        band.discard(item)
        self.count -= 1
        self.bytes -= item.size
        self._finalize(item, outcome)

    def _finalize(self, item: Item, outcome: Outcome) -> None:
        """The one place an item's outcome is decided: once (a dispatch is counted by `admit`, when taken)."""
        item.live = False
        if item.timer is not None:
            item.timer.cancel()
            item.timer = None
        if not item.future.done():
            item.future.set_result(outcome)
        band = item.band
        assert band is not None
        waited = (self._loop.time() - item.enqueued) if self._loop is not None else 0.0
        if self.metrics is not None:
            self.metrics.flow_queued(item.request, band.priority, item.size, -1)
        if outcome is not Outcome.DISPATCHED:  # a dispatch is counted when its waiter takes it (admit)
            self._finished(item.request, band, outcome, waited)

    def _finished(self, request: Any, band: Band, outcome: Outcome, waited: float) -> None:
        if self.metrics is not None:
            self.metrics.flow_outcome(request, band.priority, outcome.value, self.pool_name, waited)
