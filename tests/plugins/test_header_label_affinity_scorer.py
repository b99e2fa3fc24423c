"""header-label-affinity-scorer: 1 where the server's label equals the request's header."""

import pytest

from epp.datastore import Endpoint
from epp.requests import new_request, parse_body
from epp.scheduling.params import Params
from epp.scheduling.plugins.header_label_affinity_scorer import HeaderLabelAffinityScorer
from tests.helpers import cycle_state


def test_matching_label_scores_one() -> None:
    s = HeaderLabelAffinityScorer.from_parameters("s", Params("header-label-affinity-scorer", {
        "headerName": "X-Region", "labelKey": "topology.kubernetes.io/region"}))
    eps = [Endpoint("10.0.0.1", 1, labels={"topology.kubernetes.io/region": "eu"}), Endpoint("10.0.0.1", 2)]
    r = parse_body(new_request("/v1/completions", {"x-region": "eu"}), b'{"model": "m", "prompt": "hi"}')
    assert s.score(cycle_state(), r, eps) == [1.0, 0.0]  # type: ignore[attr-defined]
    r = parse_body(new_request("/v1/completions", {}), b'{"model": "m", "prompt": "hi"}')
    assert s.score(cycle_state(), r, eps) == [0.0, 0.0]  # type: ignore[attr-defined]


def test_both_parameters_are_required() -> None:
    with pytest.raises(ValueError, match="required"):
        HeaderLabelAffinityScorer.from_parameters("s", Params("header-label-affinity-scorer", {"headerName": "x"}))
