"""One request's decision: candidates, model rewrite, admission, scheduling, and the body to forward.

`plan` computes all of it without side effects; `decide` (a real pick) and
`dry_run` (the explain API) both go through it, so what explain shows is what a
pick does. The transports call `decide` (or, with flow control on, `decide_async`)
once a request is parsed and `finish` once its response has ended; they never score.
The director owns the in-flight counts: +1 when a pick is handed to the proxy, -1
exactly once when it ends.

With the flowControl gate on, `decide_async` first resolves the request's target
model and priority, then waits in the flow controller while the pool is saturated
(its outcome error, 429 or 503, is raised as is); once dispatched the pick is committed
before anything else runs, so the controller's next look at saturation counts it.
Every `finish` is a capacity signal. Sheddable requests are then never shed here:
flow control decides who waits and who is dropped, as upstream's flow-control admission.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from epp import errors, logs
from epp.admission import Admission, SaturationDetector
from epp.datastore import Datastore, Endpoint
from epp.flowcontrol import FlowController
from epp.metrics import EppMetrics
from epp.requests import INFERENCE_KINDS, InferenceRequest
from epp.scheduling.framework import CycleState, SchedulingResult
from epp.scheduling.picker_config import PickerConfig


@dataclass(slots=True)
class Plan:
    """What picking the request would do now, before anything is committed."""

    candidates: list[Endpoint]
    rewrite: str | None = None  # the InferenceModelRewrite that chose the target model
    result: SchedulingResult | None = None
    state: CycleState | None = None
    # Why it would not be picked: shed (429) or no endpoint (503). A shed plan is still scored.
    error: errors.EppError | None = None
    unschedulable: bool = False  # scheduling ran and found no endpoint (filters left none)


@dataclass(slots=True)
class Decision:
    """A committed pick: the scheduling result, the body to forward, and what the proxy is told."""

    result: SchedulingResult
    state: CycleState
    targets: str  # the metadata value: the pick, then fallbacks, comma-separated
    body: bytes  # the body to forward: the client's, or with the target model
    body_changed: bool
    explain: str | None = None  # the why, when explain headers are on
    scores: dict[str, float] | None = None  # each target's total score, with --emit-endpoint-scores

    @property
    def endpoint(self) -> Endpoint:
        return self.result.targets[0]


class Director:
    def __init__(
        self, datastore: Datastore, config: PickerConfig, metrics: EppMetrics | None = None, *,
        explain_headers: bool = False, emit_endpoint_scores: bool = False, honor_subset_hint: bool = True,
        flow_recheck: float = 0.05,
    ) -> None:
        self.datastore = datastore
        self.config = config
        self.scheduler = config.scheduler
        self.scheduler.metrics = metrics  # per-plugin durations and the pick's prefix match
        self.metrics = metrics
        self.explain_headers = explain_headers
        self.emit_endpoint_scores = emit_endpoint_scores
        # --disable-endpoint-subset-filter: the proxy's subset hint is not respected.
        self.honor_subset_hint = honor_subset_hint
        self.admission = Admission(datastore, SaturationDetector(config.saturation))
        datastore.subscribe(self.scheduler.endpoints_changed)
        # --tracing: one span per pick (or error); None: off, and nothing is built per request.
        self.tracer: logs.RequestTracer | None = None
        self.flow: FlowController | None = None
        if config.flow_control is not None:
            self.flow = FlowController(config.flow_control, self.pool_saturation,
                                       lambda: len(self.datastore.ready_endpoints()), metrics=metrics,
                                       pool_name=metrics.pool_name if metrics is not None else "",
                                       recheck=flow_recheck if config.saturation.type_name != "concurrency-detector"
                                       else 0.0)
            flow = self.flow
            datastore.subscribe(lambda added, removed: flow.capacity_changed_threadsafe())

    def pool_saturation(self) -> float:
        """The configured detector's saturation over the pool's candidates (flow control's gate)."""
        return self.admission.detector.saturation(self.candidates(None), self.datastore.now())

    def candidates(self, subset: Sequence[str] | None) -> list[Endpoint]:
        """Ready endpoints (within the proxy's subset hint), those with fresh metrics only if any have them.

        A pod whose metrics are unknown or stale (killed, restarting, its /metrics failing) is not
        trusted to be idle: it gets no picks while a pod epp can see exists. If none can be seen
        (at start, or every scrape failing), all ready endpoints remain candidates.
        """
        ready = self.datastore.ready_endpoints()
        if subset is not None and self.honor_subset_hint:
            allowed = set(subset)
            ready = tuple(ep for ep in ready if ep.hostport in allowed)
        ds = self.datastore
        now, staleness = ds.now(), ds.staleness
        fresh = [ep for ep in ready if ep.fresh_metrics(now, staleness) is not None]
        return fresh or list(ready)

    def plan(self, request: InferenceRequest, subset: Sequence[str] | None = None, *, score_shed: bool = True,
             admitted: bool = False, rewrite: str | None = None) -> Plan:
        """Candidates, rewrite and priority, admission, scheduling: every step, no side effect.

        A request admission sheds is still scored when `score_shed` (to show why), else not.
        `admitted`: flow control has resolved the request (its rewrite is `rewrite`) and let it go.
        """
        plan = Plan(self.candidates(subset), rewrite)
        if not plan.candidates:
            message = ("none of the endpoints in the proxy's subset hint is a ready endpoint of the pool"
                       if subset is not None else "no ready endpoint in the pool")
            plan.error = errors.EppError(errors.SERVICE_UNAVAILABLE, message, reason="no_endpoint")
            return plan
        now = self.datastore.now()
        if request.kind in INFERENCE_KINDS and not admitted:
            plan.rewrite = self.admission.resolve(request)
            if self.flow is None:  # with flow control on, it decides who waits and who is dropped
                plan.error = self.admission.shed(request, plan.candidates, now)
            if plan.error is not None and not score_shed:
                return plan
        try:
            plan.result, plan.state = self.scheduler.schedule(request, plan.candidates, now, self.datastore.staleness)
        except errors.EppError as e:
            plan.error = plan.error or e
            plan.unschedulable = True
        return plan

    def decide(self, request: InferenceRequest, subset: Sequence[str] | None = None, *,
               received_at: float | None = None) -> Decision:
        """Pick an endpoint for the parsed request and commit it, or raise EppError (429, 503).
        Where picks await (`awaits`: flow control, or a plugin's data step), transports call
        `decide_async` instead."""
        started = time.perf_counter()
        return self._commit(request, subset, self.plan(request, subset, score_shed=False), received_at, 0.0, started)

    async def decide_async(self, request: InferenceRequest, subset: Sequence[str] | None = None, *,
                           received_at: float | None = None) -> Decision:
        """`decide` after the awaited steps: plugins' data steps (`Scheduler.prepare`), then, with flow
        control on, the request's turn while the pool is saturated. Raises the flow-control outcome's
        error (429 / 503 with the dropped-reason header)."""
        if self.scheduler.prepares:
            await self.scheduler.prepare(request)  # e.g. the token-producer's tokenization over HTTP
        flow = self.flow
        if flow is None or request.kind not in INFERENCE_KINDS:
            return self.decide(request, subset, received_at=received_at)
        rewrite = self.admission.resolve(request)
        try:
            waited = await flow.admit(request)
        except errors.EppError as e:
            self._traced(request, None, received_at, e, 0.0)
            raise
        started = time.perf_counter()
        # No await from here to the commit: the controller's next cycle sees this pick in flight.
        plan = self.plan(request, subset, score_shed=False, admitted=True, rewrite=rewrite)
        return self._commit(request, subset, plan, received_at, waited, started)

    @property
    def awaits(self) -> bool:
        """A pick may await (flow control's queue, a plugin's data step): transports use `decide_async`."""
        return self.flow is not None or self.scheduler.prepares

    def _commit(self, request: InferenceRequest, subset: Sequence[str] | None, plan: Plan,
                received_at: float | None, waited: float, started: float) -> Decision:
        if plan.error is not None:
            if plan.unschedulable and self.metrics is not None:
                self.metrics.schedule_failed(request)  # scheduling ran and found no endpoint
            self._traced(request, None, received_at, plan.error, waited)
            if self.flow is not None:
                self.flow.capacity_changed()  # its turn went unused: the next may take it
            raise plan.error
        result, state = plan.result, plan.state
        assert result is not None
        assert state is not None
        self.scheduler.pre_request(state, request, result)
        ep = result.targets[0]
        ep.inflight += 1
        targets = ep.hostport if len(result.targets) == 1 else ",".join(t.hostport for t in result.targets)
        body = request.forwarded_body()
        decision = Decision(result, state, targets, body, body is not request.body)
        if self.explain_headers:
            decision.explain = self.explain(result)
        if self.emit_endpoint_scores:
            total = dict(zip(map(id, result.candidates), result.totals, strict=True))
            decision.scores = {t.hostport: total.get(id(t), 0.0) for t in result.targets}
        m = self.metrics
        if m is not None:
            if plan.rewrite is not None:
                m.rewritten(plan.rewrite, request)
            m.scheduled(request, ep, time.perf_counter() - started)
        logs.log_pick(request, result, waited)  # returns at once unless epp.pick logs at debug
        self._traced(request, result, received_at, None, waited)
        return decision

    def _traced(self, request: InferenceRequest, result: SchedulingResult | None, received_at: float | None,
                error: errors.EppError | None, waited: float) -> None:
        tracer = self.tracer
        if tracer is not None:
            tracer.request(request, result, received_at=time.monotonic() if received_at is None else received_at,
                           error=error, waited=waited)

    def dry_run(self, request: InferenceRequest, subset: Sequence[str] | None = None) -> Plan:
        """What `decide` would do, without doing it: no in-flight count, no hooks, nothing shed."""
        return self.plan(request, subset)

    def saturated(self, candidates: Sequence[Endpoint]) -> bool:
        return self.admission.detector.saturated(candidates, self.datastore.now())

    def started(self, request: InferenceRequest, decision: Decision) -> None:
        """The first byte of the response arrived (the first token, when streaming)."""
        self.scheduler.response_started(request, decision.endpoint)

    def finish(self, request: InferenceRequest, decision: Decision) -> None:
        """The request's response ended (or its stream did). Call exactly once per decision."""
        ep = decision.endpoint
        ep.inflight -= 1
        self.scheduler.response_complete(request, ep)
        if self.flow is not None:
            self.flow.capacity_changed()  # a slot came back: a waiting request may go

    @staticmethod
    def explain(r: SchedulingResult) -> str:
        """A one-line why: each candidate's total and per-scorer scores, the pick first."""
        picked = r.candidates.index(r.targets[0])
        order = [picked, *sorted((i for i in range(len(r.candidates)) if i != picked), key=lambda i: -r.totals[i])]
        parts = []
        for i in order:
            per = " ".join(f"{name.split('-')[0]}={vals[i]:.2f}" for name, vals in r.scores.items())
            parts.append(f"{r.candidates[i].name} total={r.totals[i]:.2f} ({per})")
        return "; ".join(parts)
