"""context-length-aware: servers labelled with a token range; in range beats out of range (llm-d-router)."""

import pytest

from epp.datastore import Endpoint
from epp.scheduling.params import Params
from epp.scheduling.plugins.context_length_aware import ContextLengthAware, range_score
from tests.helpers import cycle_state, request

LABEL = "llm-d.ai/context-length-range"


def ep(port: int, value: str | None) -> Endpoint:
    return Endpoint("10.0.0.1", port, labels={} if value is None else {LABEL: value})


def test_documented_scores() -> None:
    assert range_score(100, 0, 0) == pytest.approx(0.3 / 1.1)  # out of range, 100 tokens away
    assert range_score(0, 0, 0) == 1.0
    # In range: 0.3 + 0.7 * (0.7 / (1 + 2048/10000) + 0.3 * (2048 - 1000) / 2048)
    assert range_score(1000, 0, 2048) == pytest.approx(0.3 + 0.7 * (0.7 / 1.2048 + 0.3 * 1048 / 2048))
    # 9000 tokens prefer max 8192 to max 2048 (proximity), both below any in-range score.
    assert range_score(9000, 0, 2048) < range_score(9000, 2048, 8192) < 0.3 < range_score(9000, 0, 20000)


def test_scores_unlabelled_neutral_and_bad_labels_zero() -> None:
    eps = [ep(1, "0-2048"), ep(2, "2048-8192"), ep(3, None), ep(4, "oops")]
    scores = ContextLengthAware().score(cycle_state(), request("x" * 400), eps)  # 100 tokens
    assert scores[0] > 0.3 > scores[1]
    assert scores[2:] == [0.5, 0.0]


def test_filtering_keeps_in_range_and_unlabelled() -> None:
    f = ContextLengthAware.from_parameters("c", Params("context-length-aware", {"enableFiltering": True}))
    eps = [ep(1, "0-50"), ep(2, "51-5000"), ep(3, None), ep(4, "10-1")]
    assert f.filter(cycle_state(), request("x" * 400), eps) == [eps[1], eps[2]]  # type: ignore[attr-defined]


def test_without_filtering_every_candidate_passes() -> None:
    eps = [ep(1, "0-50"), ep(2, "51-5000")]
    assert ContextLengthAware().filter(cycle_state(), request("x" * 400), eps) == eps


def test_custom_label() -> None:
    f = ContextLengthAware.from_parameters("c", Params("context-length-aware", {"label": "ctx"}))
    e = Endpoint("10.0.0.1", 1, labels={"ctx": "0-10"})
    assert f.score(cycle_state(), request("x" * 400), [e])[0] < 0.3  # type: ignore[attr-defined]
