"""Exchanges (epp.exchanges): each routed request from its pick to the end of its response, finished once."""

from __future__ import annotations

import time

import pytest

from epp import errors
from epp.exchanges import Exchanges
from epp.metrics import EppMetrics
from tests.helpers import director, endpoint, request, until


def running(metrics: EppMetrics) -> float:
    return metrics.registry.get_sample_value("inference_objective_running_requests", {"model_name": "m"}) or 0.0


def test_finish_counts_once_however_often_it_is_called() -> None:
    metrics = EppMetrics()
    ep = endpoint(1)
    xs = Exchanges(director(ep, metrics=metrics), metrics)
    ex = xs.open(request(), None, time.monotonic())
    assert (ep.inflight, len(xs), running(metrics)) == (1, 1, 1)
    xs.finish(ex)  # the response ended...
    xs.finish(ex)  # ...and then its stream did
    assert (ep.inflight, len(xs), running(metrics)) == (0, 0, 0)
    assert xs.claim(ex.key) is None  # an observer arriving late finds nothing to watch


def test_an_observer_claims_an_exchange_once() -> None:
    xs = Exchanges(director(endpoint(1)))
    ex = xs.open(request(), None, time.monotonic())
    assert xs.claim(ex.key) is ex
    assert xs.claim(ex.key) is None
    assert xs.claim("another-replica-0") is None
    assert xs.claim(None) is None


async def test_an_unwatched_pick_is_released_after_the_grace() -> None:
    ep = endpoint(1)
    xs = Exchanges(director(ep), observer_grace=0.05)
    ex = xs.open(request(), None, time.monotonic())
    xs.release_later(ex)
    assert ep.inflight == 1
    await until(lambda: ep.inflight == 0, what="the grace to end")
    assert ex.done


def test_a_plugin_bug_is_a_500_for_that_request_only() -> None:
    ep = endpoint(1)
    d = director(ep)
    scorer = d.scheduler.profiles[0].scorers[0].scorer
    healthy = scorer.score
    scorer.score = lambda *_: 1 / 0  # type: ignore[method-assign]
    xs = Exchanges(d)
    with pytest.raises(errors.EppError) as e:
        xs.open(request(), None, time.monotonic())
    assert e.value.http_status == 500
    assert "ZeroDivisionError" in e.value.message
    assert ep.inflight == 0
    scorer.score = healthy  # type: ignore[method-assign]
    assert xs.open(request(), None, time.monotonic()).decision.endpoint is ep
