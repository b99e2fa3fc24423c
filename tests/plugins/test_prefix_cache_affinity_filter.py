"""prefix-cache-affinity-filter: narrow to the servers holding the prefix, unless their backlog is too long."""

from epp.scheduling.framework import SchedulingResult
from epp.scheduling.params import Params
from epp.scheduling.plugins.approx_prefix_cache_producer import ApproxPrefixCacheProducer
from epp.scheduling.plugins.inflight_load_producer import InFlightLoadProducer
from epp.scheduling.plugins.prefix_cache_affinity_filter import PrefixCacheAffinityFilter
from tests.helpers import cycle_state, endpoint, request

DOC = "a shared system prompt. " * 40


def setup(**params):
    prefix, load = ApproxPrefixCacheProducer("p"), InFlightLoadProducer("l")
    f = PrefixCacheAffinityFilter.from_parameters("f", Params("prefix-cache-affinity-filter", {
        "prefixMatchInfoProducerName": "p", "inFlightLoadProducerName": "l", **params}))
    f.bind({"p": prefix, "l": load}.get)
    eps = [endpoint(1), endpoint(2), endpoint(3)]
    prefix.pre_request(cycle_state(), request(DOC), SchedulingResult([eps[1]], eps))
    return f, load, eps


def test_narrows_to_the_sticky_server() -> None:
    f, _, eps = setup()
    assert f.filter(cycle_state(), request(DOC + "question"), eps) == [eps[1]]


def test_no_sticky_server_keeps_all() -> None:
    f, _, eps = setup()
    assert f.filter(cycle_state(), request("something else entirely"), eps) == eps


def test_a_long_backlog_on_the_sticky_server_breaks_stickiness() -> None:
    f, load, eps = setup(maxTTFTPenaltyMs=1000, peakPrefillThroughput=1000)
    big = request("z" * 8000)  # 2000 tokens queued there: 2 s at 1000 tokens/s
    load.pre_request(cycle_state(), big, SchedulingResult([eps[1]], [eps[1]]))
    assert f.filter(cycle_state(), request(DOC + "q"), eps) == eps
    load.response_started(big, eps[1])  # prefilled: the backlog is gone
    assert f.filter(cycle_state(), request(DOC + "q"), eps) == [eps[1]]


def test_exploration_skips_the_gate() -> None:
    f, _, eps = setup(explorationProbability=1.0)
    assert f.filter(cycle_state(), request(DOC + "q"), eps) == eps


def test_latency_predictor_source_is_refused() -> None:
    import pytest

    with pytest.raises(ValueError, match="latency predictor"):
        PrefixCacheAffinityFilter.from_parameters("f", Params("prefix-cache-affinity-filter", {
            "ttftSource": "latencyPredictor"}))
