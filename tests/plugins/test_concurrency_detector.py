"""concurrency-detector: epp's own in-flight requests (or tokens) over the servers' capacity."""

import pytest

from epp.errors import ConfigError
from epp.scheduling.framework import SchedulingResult
from epp.scheduling.params import Params
from epp.scheduling.plugins.concurrency_detector import ConcurrencyDetectorPlugin
from epp.scheduling.plugins.inflight_load_producer import InFlightLoadProducer
from tests.helpers import NOW, cycle_state, endpoint, request


def make(**params) -> ConcurrencyDetectorPlugin:
    plugin = ConcurrencyDetectorPlugin.from_parameters("c", Params("concurrency-detector", params))
    assert isinstance(plugin, ConcurrencyDetectorPlugin)
    return plugin


def test_requests_mode_sums_over_capacity() -> None:
    d = make(maxConcurrency=4).detector
    eps = [endpoint(1, inflight=4), endpoint(2, inflight=2)]
    assert d.saturation(eps, NOW) == pytest.approx(0.75)
    assert not d.saturated(eps, NOW)
    assert d.saturated([endpoint(1, inflight=4)], NOW)


def test_tokens_and_hybrid_modes_read_the_in_flight_load() -> None:
    load = InFlightLoadProducer("inflight-load-producer")
    eps = [endpoint(1, inflight=1), endpoint(2)]
    load.pre_request(cycle_state(), request("x" * 4000), SchedulingResult([eps[0]], eps))  # 1000 tokens
    tokens = make(concurrencyMode="tokens", maxTokenConcurrency=1000)
    tokens.bind({"inflight-load-producer": load}.get)
    assert tokens.detector.saturation(eps, NOW) == pytest.approx(0.5)
    hybrid = make(concurrencyMode="hybrid", maxConcurrency=4, maxTokenConcurrency=500)
    hybrid.bind({"inflight-load-producer": load}.get)
    assert hybrid.detector.saturation(eps, NOW) == pytest.approx((2.0 + 0.0) / 2)
    assert hybrid.filter(cycle_state(), request(), eps) == [eps[1]]


def test_filter_drops_servers_at_the_limit_and_may_empty() -> None:
    f = make(maxConcurrency=2, headroom=0.5)  # limit 3
    eps = [endpoint(1, inflight=2), endpoint(2, inflight=3)]
    assert f.filter(cycle_state(), request(), eps) == [eps[0]]
    assert f.filter(cycle_state(), request(), eps[1:]) == []


@pytest.mark.parametrize("params", [{"maxConcurrency": 0}, {"concurrencyMode": "bytes"},
                                    {"maxTokenConcurrency": -5}, {"headroom": -0.1}])
def test_bad_parameters(params) -> None:
    with pytest.raises(ConfigError):
        make(**params)
