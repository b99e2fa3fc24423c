"""utilization-detector: upstream's roofline saturation, and as a filter the servers under threshold."""

import pytest

from epp.errors import ConfigError
from epp.scheduling.params import Params
from epp.scheduling.plugins.utilization_detector import UtilizationDetectorPlugin
from tests.helpers import NOW, cycle_state, endpoint, request


def make(**params) -> UtilizationDetectorPlugin:
    plugin = UtilizationDetectorPlugin.from_parameters("u", Params("utilization-detector", params))
    assert isinstance(plugin, UtilizationDetectorPlugin)
    return plugin


def test_saturation_is_the_average_of_each_servers_tighter_resource() -> None:
    d = make().detector
    eps = [endpoint(1, waiting=10, kv=0.4), endpoint(2, waiting=0, kv=0.4)]  # max(2, 0.5) and max(0, 0.5)
    assert d.saturation(eps, NOW) == pytest.approx(1.25)
    assert d.saturated(eps, NOW)
    assert d.saturation([endpoint(1, waiting=None)], NOW) == 1.0  # unknown metrics count as full
    assert d.saturation([], NOW) == 1.0


def test_thresholds_and_staleness() -> None:
    d = make(queueDepthThreshold=10, kvCacheUtilThreshold=0.5, metricsStalenessThreshold="1s").detector
    assert d.saturation([endpoint(1, waiting=5, kv=0.1, age=0.5)], NOW) == pytest.approx(0.5)


def test_as_a_filter_headroom_allows_bursts_and_none_passing_keeps_all() -> None:
    f = make(headroom=0.2)  # queue limit 6
    eps = [endpoint(1, waiting=5), endpoint(2, waiting=6), endpoint(3, waiting=None)]
    assert f.filter(cycle_state(), request(), eps) == [eps[0]]
    assert f.filter(cycle_state(), request(), eps[1:]) == eps[1:]


@pytest.mark.parametrize("params", [{"queueDepthThreshold": 0}, {"kvCacheUtilThreshold": 1.5},
                                    {"metricsStalenessThreshold": "0s"}, {"headroom": -1}])
def test_bad_thresholds(params) -> None:
    with pytest.raises(ConfigError):
        make(**params)
