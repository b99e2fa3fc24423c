"""One request's way through the EPP's decision: candidates, admission, scheduling, hooks.

The extproc layer calls `decide` once the request is parsed and `finish` once its
response has ended; it never scores. The director owns the in-flight counts: +1
when a pick is handed to the proxy, -1 exactly once when that request ends.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from epp import errors
from epp.admission import Admission, SaturationDetector
from epp.datastore import Datastore, Endpoint
from epp.metrics.epp_metrics import EppMetrics
from epp.requests import INFERENCE_KINDS, InferenceRequest
from epp.scheduling.framework import CycleState, SchedulingResult
from epp.scheduling.picker_config import PickerConfig


@dataclass(slots=True)
class Decision:
    result: SchedulingResult
    state: CycleState
    # The metadata value: the pick, then fallbacks, comma-separated.
    targets: str

    @property
    def endpoint(self) -> Endpoint:
        return self.result.targets[0]


@dataclass(slots=True)
class DryRun:
    """What scheduling a request would do now (see `Director.dry_run`)."""

    candidates: list[Endpoint]
    result: SchedulingResult | None = None
    rewrite: str | None = None
    saturated: bool = False
    error: errors.EppError | None = None


class Director:
    def __init__(self, datastore: Datastore, config: PickerConfig, metrics: EppMetrics | None = None) -> None:
        self.datastore = datastore
        self.config = config
        self.scheduler = config.scheduler
        self.metrics = metrics
        self.admission = Admission(datastore, SaturationDetector(config.saturation))
        datastore.subscribe(self.scheduler.endpoints_changed)

    def candidates(self, subset: Sequence[str] | None) -> list[Endpoint]:
        ready = self.datastore.ready_endpoints()
        if subset is None:
            return list(ready)
        allowed = set(subset)
        return [ep for ep in ready if ep.hostport in allowed]

    def candidates_or_fail(self, subset: Sequence[str] | None) -> list[Endpoint]:
        candidates = self.candidates(subset)
        if not candidates:
            if subset is not None:
                raise errors.EppError(
                    errors.SERVICE_UNAVAILABLE,
                    "none of the endpoints in the proxy's subset hint is a ready endpoint of the pool",
                    reason="no_endpoint",
                )
            raise errors.EppError(errors.SERVICE_UNAVAILABLE, "no ready endpoint in the pool", reason="no_endpoint")
        return candidates

    def decide(self, request: InferenceRequest, subset: Sequence[str] | None = None) -> Decision:
        """Pick an endpoint for the request, or raise EppError (429, 503)."""
        started = time.perf_counter()
        candidates = self.candidates_or_fail(subset)
        now = self.datastore.now()
        if request.kind in INFERENCE_KINDS:
            rewrite = self.admission.admit(request, candidates, now)
            if rewrite is not None and self.metrics is not None:
                self.metrics.model_rewrites.labels(rewrite, request.model, request.target_model).inc()
        result, state = self.scheduler.schedule(request, candidates, now, self.datastore.staleness)
        self.scheduler.pre_request(state, request, result)
        ep = result.targets[0]
        ep.inflight += 1
        targets = ep.hostport if len(result.targets) == 1 else ",".join(t.hostport for t in result.targets)
        m = self.metrics
        if m is not None:
            m.scheduler_e2e.observe(time.perf_counter() - started)
            m.scheduler_attempts.labels("success", request.target_model, ep.name, "", str(ep.port)).inc()
        return Decision(result, state, targets)

    def dry_run(self, request: InferenceRequest, subset: Sequence[str] | None = None) -> DryRun:
        """Everything `decide` would do, without doing it: no in-flight count, no hooks, nothing shed."""
        run = DryRun([])
        now = self.datastore.now()
        try:
            run.candidates = self.candidates_or_fail(subset)
            run.saturated = self.admission.detector.saturated(run.candidates, now)
            if request.kind in INFERENCE_KINDS:
                try:
                    run.rewrite = self.admission.admit(request, run.candidates, now)
                except errors.EppError as e:
                    run.error = e  # shed: still show how it would have been scored
            run.result, _ = self.scheduler.schedule(request, run.candidates, now, self.datastore.staleness)
        except errors.EppError as e:
            run.error = run.error or e
        return run

    def started(self, request: InferenceRequest, decision: Decision) -> None:
        """The first byte of the response arrived (the first token, when streaming)."""
        self.scheduler.response_started(request, decision.endpoint)

    def finish(self, request: InferenceRequest, decision: Decision) -> None:
        """The request's response ended (or its stream did). Call exactly once per decision."""
        ep = decision.endpoint
        ep.inflight -= 1
        self.scheduler.response_complete(request, ep)

    def explain(self, decision: Decision) -> str:
        """A one-line why: each candidate's total and per-scorer scores, the pick first."""
        r = decision.result
        picked = r.candidates.index(r.targets[0])
        order = [picked, *sorted((i for i in range(len(r.candidates)) if i != picked), key=lambda i: -r.totals[i])]
        parts = []
        for i in order:
            per = " ".join(f"{name.split('-')[0]}={vals[i]:.2f}" for name, vals in r.scores.items())
            parts.append(f"{r.candidates[i].name} total={r.totals[i]:.2f} ({per})")
        return "; ".join(parts)
