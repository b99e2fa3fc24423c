"""inflight-load-producer: the prompt tokens epp has in flight per server, released at the first byte."""

import pytest

from epp.scheduling.framework import SchedulingResult
from epp.scheduling.params import Params
from epp.scheduling.plugins.approx_prefix_cache_producer import ApproxPrefixCacheProducer
from epp.scheduling.plugins.inflight_load_producer import InFlightLoadProducer
from tests.helpers import cycle_state, endpoint, request

PROMPT = "x" * 400  # 100 tokens at 4 characters a token


def test_tokens_held_until_the_first_byte() -> None:
    load = InFlightLoadProducer()
    eps = [endpoint(1), endpoint(2)]
    req, st = request(PROMPT), cycle_state()
    assert load.uncached(st, req, eps) == [100, 100]
    load.pre_request(st, req, SchedulingResult([eps[0]], eps))
    assert (load.tokens(eps[0]), load.tokens(eps[1])) == (100, 0)
    load.response_started(req, eps[0])
    assert load.tokens(eps[0]) == 0
    load.response_complete(req, eps[0])  # released once only
    assert load.tokens(eps[0]) == 0


def test_output_estimate_is_held_to_the_end_and_capped() -> None:
    load = InFlightLoadProducer.from_parameters("l", Params("inflight-load-producer", {
        "addEstimatedOutputTokens": True, "outputRatio": 2.0, "maxEstimatedOutputTokens": 50}))
    ep, req, st = endpoint(1), request(PROMPT), cycle_state()
    load.pre_request(st, req, SchedulingResult([ep], [ep]))  # type: ignore[attr-defined]
    assert load.tokens(ep) == 150  # type: ignore[attr-defined]  # 100 in + min(200, 50) out
    load.response_started(req, ep)  # type: ignore[attr-defined]
    assert load.tokens(ep) == 150  # type: ignore[attr-defined]
    load.response_complete(req, ep)  # type: ignore[attr-defined]
    assert load.tokens(ep) == 0  # type: ignore[attr-defined]


def test_the_cached_prefix_is_not_counted() -> None:
    prefix = ApproxPrefixCacheProducer()
    load = InFlightLoadProducer(prefix_producer="p")
    load.bind({"p": prefix}.get)
    eps = [endpoint(1), endpoint(2)]
    first, st = request(PROMPT), cycle_state()
    prefix.pre_request(st, first, SchedulingResult([eps[0]], eps))
    # Same 100-token prompt: the holder computes none of it, the other all of it.
    assert load.uncached(cycle_state(), request(PROMPT), eps) == [0, 100]


def test_removed_servers_are_forgotten() -> None:
    load = InFlightLoadProducer()
    ep = endpoint(1)
    load.pre_request(cycle_state(), request(PROMPT), SchedulingResult([ep], [ep]))
    load.endpoints_changed([], [ep])
    assert load.tokens(ep) == 0


def test_negative_ratio_is_refused() -> None:
    with pytest.raises(ValueError, match="outputRatio"):
        InFlightLoadProducer.from_parameters("l", Params("inflight-load-producer", {"outputRatio": -1}))
