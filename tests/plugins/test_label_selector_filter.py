"""label-selector-filter (and by-label-selector): a Kubernetes LabelSelector over the servers' labels."""

import pytest

from epp.datastore import Endpoint
from epp.scheduling import registry
from epp.scheduling.params import Params
from epp.scheduling.plugins.label_selector_filter import LabelSelectorFilter
from tests.helpers import cycle_state, request


def pool() -> list[Endpoint]:
    return [Endpoint("10.0.0.1", 1, labels={"role": "decode", "gpu": "H100"}),
            Endpoint("10.0.0.1", 2, labels={"role": "prefill", "gpu": "H100"}),
            Endpoint("10.0.0.1", 3, labels={"gpu": "L4"})]


def kept(params: dict) -> list[int]:
    f = LabelSelectorFilter.from_parameters("f", Params("label-selector-filter", params))
    return [ep.port for ep in f.filter(cycle_state(), request(), pool())]  # type: ignore[attr-defined]


def test_match_labels_all_must_match() -> None:
    assert kept({"matchLabels": {"gpu": "H100", "role": "decode"}}) == [1]


@pytest.mark.parametrize(("expr", "ports"), [
    ({"key": "role", "operator": "In", "values": ["decode", "prefill"]}, [1, 2]),
    ({"key": "role", "operator": "NotIn", "values": ["prefill"]}, [1, 3]),  # absent label: not in
    ({"key": "role", "operator": "Exists"}, [1, 2]),
    ({"key": "role", "operator": "DoesNotExist"}, [3]),
])
def test_match_expressions(expr, ports) -> None:
    assert kept({"matchExpressions": [expr]}) == ports


def test_empty_selector_keeps_everyone_and_the_old_name_is_the_same_filter() -> None:
    assert kept({}) == [1, 2, 3]
    assert registry.plugin_types()["by-label-selector"] is LabelSelectorFilter


@pytest.mark.parametrize(("params", "needle"), [
    ({"matchExpressions": [{"key": "role", "operator": "Like", "values": ["x"]}]}, "operator"),
    ({"matchExpressions": [{"key": "role", "operator": "In"}]}, "needs values"),
    ({"matchExpressions": [{"key": "role", "operator": "Exists", "values": ["x"]}]}, "takes no values"),
    ({"matchLabels": {"bad key!": "x"}}, "not a valid label key"),
    ({"matchLabels": {"k": "spaces are bad"}}, "not a valid label value"),
])
def test_invalid_selectors_are_refused(params, needle) -> None:
    with pytest.raises(ValueError, match=needle):
        kept(params)
