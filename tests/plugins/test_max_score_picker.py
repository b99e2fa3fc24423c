"""max-score-picker: the highest total wins, ties broken at random (seeded), fallbacks best first."""

from epp.scheduling.plugins.max_score_picker import MaxScorePicker
from tests.helpers import cycle_state, endpoint, request


def test_max_score_picker_breaks_ties_at_random_seeded() -> None:
    eps = [endpoint(i) for i in range(4)]
    picks = {MaxScorePicker(seed=s).pick(cycle_state(), request(), eps, [1, 3, 3, 2])[0].port for s in range(30)}
    assert picks == {1, 2}
    assert MaxScorePicker(seed=1).pick(cycle_state(), request(), eps, [0, 1, 5, 2])[0].port == 2


def test_max_score_picker_returns_fallbacks_best_first() -> None:
    eps = [endpoint(i) for i in range(4)]
    out = MaxScorePicker(max_endpoints=3, seed=0).pick(cycle_state(), request(), eps, [0.1, 0.9, 0.5, 0.7])
    assert [e.port for e in out] == [1, 3, 2]
