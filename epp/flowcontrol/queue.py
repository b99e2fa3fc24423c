"""The waiting requests: priority bands of flows, each flow a queue ordered by the band's ordering policy.

Plain data structures, no clock and no event loop: the controller owns time and outcomes.
A flow is the requests of one fairness id within one band; it exists only while it holds
a live request, so fairness policies see active flows only. A request that leaves early
(cancelled, expired) is marked dead and counted out at once; its heap entry is dropped
when it reaches the head.
"""

from __future__ import annotations

import heapq
from bisect import bisect_right
from typing import Any

from epp.flowcontrol.config import EDF, ROUND_ROBIN, BandConfig


class Item:
    """One waiting request. `live` until it is dispatched or leaves; finalised exactly once."""

    __slots__ = ("band", "enqueued", "flow", "future", "hint", "key", "live", "request", "seq", "size", "timer", "ttl")

    def __init__(self, request: Any, size: int, seq: int, enqueued: float, ttl: float, future: Any,
                 hint: float = 0.0) -> None:
        self.request = request
        self.size = size
        self.seq = seq
        self.enqueued = enqueued
        self.ttl = ttl  # the budget it was enqueued under (0: none); EDF's deadline is enqueued + ttl
        self.hint = hint  # the request's own TTL, if it named one (0: none)
        self.future = future
        self.key = 0.0
        self.live = True
        self.timer: Any = None
        self.band: Band | None = None
        self.flow: Flow | None = None


class Flow:
    """The live requests of one fairness id in one band, as a heap on (ordering key, arrival)."""

    __slots__ = ("count", "fairness_id", "heap")

    def __init__(self, fairness_id: str) -> None:
        self.fairness_id = fairness_id
        self.heap: list[tuple[float, int, Item]] = []
        self.count = 0

    def push(self, item: Item) -> None:
        heapq.heappush(self.heap, (item.key, item.seq, item))
        self.count += 1

    def head(self) -> tuple[float, int, Item]:
        heap = self.heap
        while not heap[0][2].live:
            heapq.heappop(heap)
        return heap[0]

    def pop(self) -> Item:
        self.head()
        item = heapq.heappop(self.heap)[2]
        self.count -= 1
        return item


class Band:
    """One priority level: its flows, occupancy, and the policies that pick its next request."""

    __slots__ = ("bytes", "config", "count", "edf", "flows", "priority", "round_robin", "rr_last")

    def __init__(self, config: BandConfig) -> None:
        self.config = config
        self.priority = config.priority
        self.edf = config.ordering == EDF
        self.round_robin = config.fairness == ROUND_ROBIN
        self.flows: dict[str, Flow] = {}
        self.count = 0
        self.bytes = 0
        self.rr_last: str | None = None  # round-robin's cursor: the last flow served

    def fits(self, size: int) -> bool:
        c = self.config
        return self.count + 1 <= c.max_requests and self.bytes + size <= c.max_bytes

    def add(self, item: Item) -> None:
        fid = item.request.fairness_id
        flow = self.flows.get(fid)
        if flow is None:
            flow = self.flows[fid] = Flow(fid)
        item.key = item.enqueued + item.ttl if self.edf and item.ttl > 0 else (
            float("inf") if self.edf else float(item.seq))
        item.band, item.flow = self, flow
        flow.push(item)
        self.count += 1
        self.bytes += item.size

    def discard(self, item: Item) -> None:
        """A live item leaves without being dispatched (cancelled, expired)."""
        flow = item.flow
        assert flow is not None
        flow.count -= 1
        self._counted_out(item, flow)

    def select(self) -> Item | None:
        """Remove and return the next request: the fairness policy picks the flow, the ordering its head."""
        if not self.count:
            return None
        if self.round_robin:
            ids = sorted(self.flows)
            start = 0 if self.rr_last is None else bisect_right(ids, self.rr_last)
            flow = self.flows[ids[start % len(ids)]]
            self.rr_last = flow.fairness_id
        else:  # global strict: the best head across every flow, as if the band were one queue
            flow = min(self.flows.values(), key=Flow.head)
        item = flow.pop()
        self._counted_out(item, flow)
        return item

    def _counted_out(self, item: Item, flow: Flow) -> None:
        self.count -= 1
        self.bytes -= item.size
        if not flow.count:
            del self.flows[flow.fairness_id]
