"""Run a scheduling profile over the candidates: filters, weighted scorers, picker.

The scheduler owns the plugin instances built from the EndpointPickerConfig and
fans the request-lifecycle hooks out to the plugins that implement them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from time import perf_counter
from typing import TYPE_CHECKING

from epp import errors
from epp.datastore import Endpoint
from epp.requests import InferenceRequest
from epp.scheduling.framework import (
    Closes,
    CycleState,
    EndpointsChanged,
    Filter,
    Picker,
    Plugin,
    PrepareRequestData,
    PreRequest,
    ResponseComplete,
    ResponseHeaders,
    ResponseStarted,
    SchedulingResult,
    WeightedScorer,
)
from epp.scheduling.plugins.prefix_cache_scorer import PrefixCacheScorer

if TYPE_CHECKING:
    from epp.metrics import EppMetrics

log = logging.getLogger(__name__)


@dataclass(slots=True)
class SchedulingProfile:
    name: str
    filters: list[Filter] = field(default_factory=list)
    scorers: list[WeightedScorer] = field(default_factory=list)
    picker: Picker | None = None

    def run(self, state: CycleState, request: InferenceRequest, candidates: list[Endpoint],
            timed: Callable[[tuple[str, str, str], float], None] | None = None) -> SchedulingResult:
        """`timed(key, seconds)`, when given, is told each plugin's run: key (extension point, type, name)."""
        endpoints = candidates
        clock = perf_counter
        for f in self.filters:
            t0 = clock()
            endpoints = f.filter(state, request, endpoints)
            if timed is not None:
                timed(("Filter", f.type_name, f.name), clock() - t0)
            if not endpoints:
                raise errors.EppError(
                    errors.SERVICE_UNAVAILABLE,
                    f"no endpoint passed filter {f.name!r}",
                    reason="no_endpoint",
                )
        totals = [0.0] * len(endpoints)
        scores: dict[str, list[float]] = {}
        for ws in self.scorers:
            scorer = ws.scorer
            t0 = clock()
            values = scorer.score(state, request, endpoints)
            if timed is not None:
                timed(("Scorer", scorer.type_name, scorer.name), clock() - t0)
            scores[scorer.name] = values
            w = ws.weight
            for i, v in enumerate(values):
                totals[i] += v * w
        picker = self.picker
        assert picker is not None
        t0 = clock()
        targets = picker.pick(state, request, endpoints, totals)
        if timed is not None:
            timed(("Picker", picker.type_name, picker.name), clock() - t0)
        return SchedulingResult(targets, endpoints, scores, totals, self.name)


class Scheduler:
    """Schedules one request at a time; holds no per-request state between calls."""

    def __init__(self, profiles: list[SchedulingProfile], plugins: list[Plugin]) -> None:
        if not profiles:
            raise ValueError("at least one scheduling profile is required")
        self.profiles = profiles
        self.plugins = plugins
        self._pre_request = [p for p in plugins if isinstance(p, PreRequest)]
        self._response_started = [p for p in plugins if isinstance(p, ResponseStarted)]
        self._response_complete = [p for p in plugins if isinstance(p, ResponseComplete)]
        self._endpoints_changed = [p for p in plugins if isinstance(p, EndpointsChanged)]
        self._response_headers = [p for p in plugins if isinstance(p, ResponseHeaders)]
        self._preparers = [p for p in plugins if isinstance(p, PrepareRequestData)]
        # epp's own metrics (plugin durations, the prefix match of each pick); None: nothing recorded.
        self.metrics: EppMetrics | None = None
        # What knows a pick's cached prefix: each prefix-cache-scorer's producer, once.
        self._prefix_scorers: list[PrefixCacheScorer] = []
        producers: set[int] = set()
        for profile in profiles:
            for ws in profile.scorers:
                sc = ws.scorer
                if isinstance(sc, PrefixCacheScorer) and id(sc.producer) not in producers:
                    producers.add(id(sc.producer))
                    self._prefix_scorers.append(sc)

    @property
    def prepares(self) -> bool:
        """Some plugin has an async data step (`prepare`) to await before each cycle."""
        return bool(self._preparers)

    async def prepare(self, request: InferenceRequest) -> None:
        """Await every PrepareRequestData plugin (a tokenizer's HTTP call) before `schedule`.

        Each gets its own `prepare_timeout`; one that fails or runs past it leaves its data unset
        and the request is scheduled without it (counted by the plugin), never failed.
        """
        for p in self._preparers:
            try:
                async with asyncio.timeout(p.prepare_timeout):  # no task per call, unlike wait_for
                    await p.prepare(request)
            except Exception as e:  # a data step never fails the request
                log.debug("prepare of %s failed for %s: %r", p.name, request.request_id, e)

    async def aclose(self) -> None:
        """epp is stopping: plugins let go of their sockets and sessions."""
        for p in self.plugins:
            if isinstance(p, Closes):
                try:
                    await p.aclose()
                except Exception as e:  # one plugin's failure to close stops no other
                    log.warning("closing plugin %s failed: %r", p.name, e)

    def schedule(
        self, request: InferenceRequest, candidates: list[Endpoint], now: float, staleness: float
    ) -> tuple[SchedulingResult, CycleState]:
        state = CycleState(now, staleness)
        m = self.metrics
        # single-profile-handler: the first (only) profile decides.
        return self.profiles[0].run(state, request, candidates, None if m is None else m.plugin_duration.observe), state

    def pre_request(self, state: CycleState, request: InferenceRequest, result: SchedulingResult) -> None:
        m = self.metrics
        if m is None:
            for p in self._pre_request:
                p.pre_request(state, request, result)
            return
        # Before the hooks: the producers' indexes learn this pick in PreRequest.
        for sc in self._prefix_scorers:
            matched, total = sc.prefix_match(state, request, result.endpoint)
            m.prefix_match(sc.producer.name, sc.producer.type_name, matched, total)
        observe, clock = m.plugin_duration.observe, perf_counter
        for p in self._pre_request:
            t0 = clock()
            p.pre_request(state, request, result)
            observe(("PreRequest", p.type_name, p.name), clock() - t0)

    def response_started(self, request: InferenceRequest, endpoint: Endpoint) -> None:
        for p in self._response_started:
            p.response_started(request, endpoint)

    def response_headers(self, request: InferenceRequest, endpoint: Endpoint) -> tuple[tuple[str, str], ...]:
        """Headers the plugins add to the response sent to the client (session tokens, ...)."""
        hooks = self._response_headers
        if not hooks:
            return ()
        if len(hooks) == 1:
            return hooks[0].response_headers(request, endpoint)
        return tuple(h for p in hooks for h in p.response_headers(request, endpoint))

    def response_complete(self, request: InferenceRequest, endpoint: Endpoint) -> None:
        for p in self._response_complete:
            p.response_complete(request, endpoint)

    def endpoints_changed(self, added: list[Endpoint], removed: list[Endpoint]) -> None:
        for p in self._endpoints_changed:
            p.endpoints_changed(added, removed)
