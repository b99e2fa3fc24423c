"""How fast each server reaches a first token, relative to the pool: from epp's own streamed requests.

Costs in prompt tokens assume every server prefills a token in the same time. During a node
rollout, or in a pool of mixed accelerators, one server may take twice as long. epp times each
streamed request from the pick to its first response byte and divides by the work it expected
there: a fixed `step_tokens` (a first token takes at least one engine step) plus the server's
prefill backlog at the pick plus the request's own uncached tokens. Since the backlog is in the
divisor, a server that is merely busy does not look slow; one that takes longer per token does.

A server's time per token of work is the median over its last `WINDOW` timed requests (from
`MIN_SAMPLES` on), and its relative speed that over the pool's median. A median, because single
timings can be far off for reasons that are not the server's speed: a prefix epp took as cached
and the server had evicted makes one request look ten times slow; a slow server is slow on every
request. A server counts as off the pool's speed once its median differs by more than
`tolerance` with confidence (beyond it by `CONFIDENCE` standard errors of the median, from its
timings' spread: a server twice as slow with steady timings is found within a few requests, one
with erratic timings takes more), and until it is back within half of it (so one near the edge
does not flap); within it, differences are noise (batch make-up, network) and a pool of like
servers routes exactly as without the estimate. A server with no sample for `MAX_AGE` seconds
falls back to the pool's speed, so one that was slow once is tried again. Non-streamed responses
are not timed: their first byte comes only with the answer.

`PrefixDemand` is why a slow server's cache is not the end of the story. Request by request, a
prefix held only by a server twice as slow stays there: one more request there costs less than
prefilling the prefix again elsewhere. But every later request for it pays the slow server's
extra time too. epp forecasts, per prefix, its requests in the next `DEMAND_SECONDS` from its rate
so far (a decayed count, corrected for a prefix first asked for less than that long ago), and
charges a slower holder that many times its extra time per request, so a prefix in demand moves
to a faster server once, and the copy then serves its requests faster.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections import deque
from collections.abc import Callable, Iterable

log = logging.getLogger(__name__)

MIN_SAMPLES = 8
WINDOW = 32  # the timed requests per server whose median is its speed
CONFIDENCE = 2.0  # standard errors of a server's median, beyond the tolerance, before it counts as off
MAX_AGE = 60.0  # seconds without a sample before a server's estimate is dropped
DEMAND_SECONDS = 60.0  # a prefix's demand: its requests over about this long (exponential decay)
_DEMAND_MIN_AGE = 10.0  # seconds: a prefix asked for since less than this is forecast from this long
_MEDIAN_ERROR = 1.4826 * 1.2533  # a median's standard error per sqrt(sample) in units of the MAD, for normal data
_RECOMPUTE_EVERY = 0.1  # seconds: relative speeds are refreshed at most this often
_LIMIT = 16.0  # relative speeds are clamped to [1/16, 16]
_MAX_PREFIXES = 16384  # prefixes whose demand is tracked, the least recently asked for dropped first


class ServerSpeeds:
    """Per server, how much longer than the pool's median it takes per token of expected work."""

    def __init__(self, step_tokens: int, tolerance: float, clock: Callable[[], float]) -> None:
        self.step_tokens = step_tokens
        self.tolerance = tolerance
        self.clock = clock
        self.relative: dict[str, float] = {}  # hostport -> relative time per token; absent: 1.0
        self._samples: dict[str, deque[float]] = {}  # hostport -> log(seconds per token of work), latest last
        self._last: dict[str, float] = {}  # hostport -> when it was last timed
        self._computed_at = float("-inf")

    def observe(self, hostport: str, seconds: float, work_tokens: int) -> None:
        """A request expected `work_tokens` of prefill there (backlog + its own) and took `seconds`."""
        now = self.clock()
        samples = self._samples.get(hostport)
        if samples is None:
            samples = self._samples[hostport] = deque(maxlen=WINDOW)
        samples.append(math.log(max(seconds, 1e-6) / (self.step_tokens + max(work_tokens, 0) or 1)))
        self._last[hostport] = now
        if now - self._computed_at >= _RECOMPUTE_EVERY:
            self._recompute(now)

    def _recompute(self, now: float) -> None:
        self._computed_at = now
        for hostport in [h for h, at in self._last.items() if now - at > MAX_AGE]:
            self.forget(hostport)
        medians = {h: statistics.median(xs) for h, xs in self._samples.items() if len(xs) >= MIN_SAMPLES}
        relative: dict[str, float] = {}
        if len(medians) >= 2:
            pool = statistics.median(medians.values())
            enter, leave = math.log(1.0 + self.tolerance), math.log(1.0 + self.tolerance / 2)
            for hostport, median in medians.items():
                d = median - pool
                if hostport in self.relative:
                    off = abs(d) > leave
                else:  # beyond the tolerance by more than its timings' spread allows
                    xs = self._samples[hostport]
                    mad = statistics.median(abs(x - median) for x in xs)
                    off = abs(d) - CONFIDENCE * _MEDIAN_ERROR * mad / math.sqrt(len(xs)) > enter
                if off:
                    relative[hostport] = min(_LIMIT, max(1.0 / _LIMIT, math.exp(d)))
        if relative.keys() != self.relative.keys():  # rare: a server becomes slow or fast, or recovers
            log.info("servers off the pool's median speed (time per token of work): %s",
                     ", ".join(f"{h} {r:.2f}x" for h, r in sorted(relative.items())) or "none")
        self.relative = relative

    def apply(self, hostports: Iterable[str], costs: list[int]) -> list[int]:
        """Costs in tokens at the pool's median speed: each server's work, step included, times its
        relative speed. Unchanged when every server runs at the pool's speed."""
        relative = self.relative
        if not relative:
            return costs
        step = self.step_tokens
        return [int(relative.get(h, 1.0) * (step + c)) - step for h, c in zip(hostports, costs, strict=True)]

    def forget(self, hostport: str) -> None:
        self._samples.pop(hostport, None)
        self._last.pop(hostport, None)
        self.relative.pop(hostport, None)


class PrefixDemand:
    """Per prefix (the hash of its last block), its forecast requests over the next `DEMAND_SECONDS`."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self._counts: dict[int, tuple[float, float, float]] = {}  # block hash -> (decayed count, when, first)

    def requests(self, key: int) -> float:
        entry = self._counts.get(key)
        if entry is None:
            return 0.0
        count, at, first = entry
        now = self.clock()
        # A decayed count that started at zero undercounts a young prefix's rate; divide by the share
        # of a steady count it can have reached (an EWMA's bias correction).
        reached = 1.0 - math.exp(-max(_DEMAND_MIN_AGE, now - first) / DEMAND_SECONDS)
        return count * math.exp((at - now) / DEMAND_SECONDS) / reached

    def add(self, key: int) -> None:
        now = self.clock()
        counts = self._counts
        entry = counts.pop(key, None)  # re-inserted last: the dict's order is recency
        if entry is None:
            counts[key] = (1.0, now, now)
        else:
            counts[key] = (1.0 + entry[0] * math.exp((entry[1] - now) / DEMAND_SECONDS), now, entry[2])
        if len(counts) > _MAX_PREFIXES:
            del counts[next(iter(counts))]
