"""by-label (deprecated upstream): one label with allowed values, and optionally servers without it."""

import pytest

from epp.datastore import Endpoint
from epp.scheduling.params import Params
from epp.scheduling.plugins.by_label_filter import ByLabelFilter
from tests.helpers import cycle_state, request


def test_valid_values_and_unlabelled_servers() -> None:
    eps = [Endpoint("10.0.0.1", 1, labels={"gpu": "a100"}), Endpoint("10.0.0.1", 2, labels={"gpu": "l4"}),
           Endpoint("10.0.0.1", 3)]
    p = Params("by-label", {"label": "gpu", "validValues": ["a100"], "allowsNoLabel": True})
    f = ByLabelFilter.from_parameters("f", p)
    assert [e.port for e in f.filter(cycle_state(), request(), eps)] == [1, 3]  # type: ignore[attr-defined]
    assert any("deprecated" in w for w in p.warnings)


def test_needs_values_or_allows_no_label() -> None:
    with pytest.raises(ValueError, match="validValues"):
        ByLabelFilter.from_parameters("f", Params("by-label", {"label": "gpu"}))
