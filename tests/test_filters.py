"""The decision-tree profile's filters and the weighted-random picker, on hand-built metrics."""

from collections import Counter

import pytest

from epp.errors import ConfigError
from epp.scheduling import picker_config
from epp.scheduling.framework import CycleState
from epp.scheduling.plugins.least_kv_cache_filter import LeastKvCacheFilter
from epp.scheduling.plugins.least_queue_filter import LeastQueueFilter
from epp.scheduling.plugins.lora_affinity_filter import LoraAffinityFilter
from epp.scheduling.plugins.low_queue_filter import LowQueueFilter
from epp.scheduling.plugins.weighted_random_picker import WeightedRandomPicker
from tests.helpers import NOW, endpoint, request


def state() -> CycleState:
    return CycleState(NOW, staleness=2.0)


def ports(eps):
    return [ep.port for ep in eps]


def test_least_queue_keeps_the_band_near_the_minimum() -> None:
    # min 0, max 30, 3 endpoints: keep queue <= 0 + 30/3 = 10.
    eps = [endpoint(1, waiting=0), endpoint(2, waiting=10), endpoint(3, waiting=30)]
    assert ports(LeastQueueFilter().filter(state(), request(), eps)) == [1, 2]


def test_least_kv_keeps_the_band_near_the_minimum() -> None:
    eps = [endpoint(1, kv=0.5), endpoint(2, kv=0.2), endpoint(3, kv=0.8), endpoint(4, kv=0.35)]
    # band: 0.2 .. 0.2 + 0.6/4 = 0.35
    assert ports(LeastKvCacheFilter().filter(state(), request(), eps)) == [2, 4]


def test_least_filters_drop_unknown_endpoints_but_never_empty_the_pool() -> None:
    eps = [endpoint(1, waiting=None), endpoint(2, waiting=7)]
    assert ports(LeastQueueFilter().filter(state(), request(), eps)) == [2]
    unknown = [endpoint(1, waiting=None), endpoint(2, waiting=3, age=10.0)]
    assert ports(LeastQueueFilter().filter(state(), request(), unknown)) == [1, 2]


def test_low_queue_threshold_is_inclusive_and_unknown_fails() -> None:
    eps = [endpoint(1, waiting=128), endpoint(2, waiting=129), endpoint(3, waiting=None)]
    assert ports(LowQueueFilter().filter(state(), request(), eps)) == [1]
    assert ports(LowQueueFilter(threshold=0).filter(state(), request(), eps)) == []


def test_lora_affinity_filter_prefers_servers_with_the_adapter() -> None:
    eps = [
        endpoint(1, active=("a",), max_lora=2),
        endpoint(2, waiting_loras=("a",), max_lora=2),
        endpoint(3, active=("b",), max_lora=2),  # room to load
        endpoint(4, active=("b", "c"), max_lora=2),  # full
    ]
    f = LoraAffinityFilter(seed=1)
    assert ports(f.filter(state(), request(model="a"), eps)) == [1, 2]
    # threshold 0: always the servers with a free slot instead (spreading the adapter)
    assert ports(LoraAffinityFilter(threshold=0.0).filter(state(), request(model="a"), eps)) == [3]
    # nobody has it: those with room
    assert ports(f.filter(state(), request(model="z"), eps)) == [1, 2, 3]


def test_weighted_random_picker_follows_scores() -> None:
    eps = [endpoint(1), endpoint(2), endpoint(3)]
    picker = WeightedRandomPicker(seed=7)
    counts = Counter(picker.pick(state(), request(), eps, [3.0, 1.0, 0.0])[0].port for _ in range(8000))
    assert counts[3] == 0  # zero score: never while another scores > 0
    assert counts[1] / 8000 == pytest.approx(0.75, abs=0.03)


def test_weighted_random_picker_all_zero_is_uniform_and_fallbacks_distinct() -> None:
    eps = [endpoint(1), endpoint(2), endpoint(3)]
    picker = WeightedRandomPicker(max_endpoints=3, seed=3)
    counts = Counter()
    for _ in range(3000):
        picked = picker.pick(state(), request(), eps, [0.0, 0.0, 0.0])
        assert sorted(ports(picked)) == [1, 2, 3]
        counts[picked[0].port] += 1
    assert min(counts.values()) > 900


GIE_DECISION_TREE = """
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: low-queue-filter
  parameters:
    threshold: 128
- type: lora-affinity-filter
  parameters:
    threshold: 0.999
- type: least-queue-filter
- type: least-kv-cache-filter
- type: decision-tree-filter
  name: low-latency-filter
  parameters:
    current:
      pluginRef: low-queue-filter
    nextOnSuccess:
      decisionTree:
        current:
          pluginRef: lora-affinity-filter
        nextOnSuccessOrFailure:
          decisionTree:
            current:
              pluginRef: least-queue-filter
            nextOnSuccessOrFailure:
              decisionTree:
                current:
                  pluginRef: least-kv-cache-filter
    nextOnFailure:
      decisionTree:
        current:
          pluginRef: least-queue-filter
        nextOnSuccessOrFailure:
          decisionTree:
            current:
              pluginRef: lora-affinity-filter
            nextOnSuccessOrFailure:
              decisionTree:
                current:
                  pluginRef: least-kv-cache-filter
- type: random-picker
  parameters:
    maxNumOfEndpoints: 1
- type: single-profile-handler
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: low-latency-filter
  - pluginRef: random-picker
"""


def test_gie_decision_tree_profile_loads_and_routes() -> None:
    """The old default profile, as GIE's manifests wrote it, picks the adapter holder with the lightest load."""
    cfg = picker_config.load_text(GIE_DECISION_TREE, seed=1)
    eps = [
        endpoint(1, waiting=2, kv=0.9, active=("a",), max_lora=2),
        endpoint(2, waiting=1, kv=0.1, active=("a",), max_lora=2),
        endpoint(3, waiting=0, kv=0.0, active=("b",), max_lora=2),  # idle, but would have to load "a"
        endpoint(4, waiting=50, kv=0.2, active=("a",), max_lora=2),
    ]
    for _ in range(20):
        result, _ = cfg.scheduler.schedule(request(model="a"), eps, NOW, 2.0)
        assert result.endpoint.port == 2
    # Every queue over the threshold: least queue first, whatever the adapters.
    busy = [endpoint(1, waiting=300, active=("a",), max_lora=2), endpoint(2, waiting=200, active=("b",), max_lora=2)]
    result, _ = cfg.scheduler.schedule(request(model="a"), busy, NOW, 2.0)
    assert result.endpoint.port == 2


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ("current: {pluginRef: nowhere}", "pluginRef 'nowhere' names no plugin"),
        ("current: {pluginRef: random-picker}", "'random-picker' is not a filter"),
        ("nextOnSuccess: {pluginRef: least-queue-filter}", "a 'current' filter must be given"),
        ("current: {pluginRef: least-queue-filter, decisionTree: {}}", "exactly one of 'pluginRef' or 'decisionTree'"),
        ("current: {pluginRef: least-queue-filter}\n    nextOnMaybe: {pluginRef: least-queue-filter}",
         "unknown field(s) ['nextOnMaybe']"),
    ],
)
def test_decision_tree_config_errors_name_the_line(params: str, message: str) -> None:
    text = f"""\
plugins:
- type: least-queue-filter
- type: random-picker
- type: decision-tree-filter
  name: tree
  parameters:
    {params}
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: tree
"""
    with pytest.raises(ConfigError) as e:
        picker_config.load_text(text, "tree.yaml")
    assert message in str(e.value)
    assert "tree.yaml:4:" in str(e.value)
