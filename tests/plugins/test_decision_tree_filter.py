"""decision-tree-filter: GIE's old default profile (a tree of filters) loads and routes; bad trees name the line."""

import pytest

from epp.errors import ConfigError
from epp.scheduling import picker_config
from tests.helpers import NOW, endpoint, request

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
