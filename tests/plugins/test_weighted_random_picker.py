"""weighted-random-picker: picks in proportion to the scores; fallbacks are distinct endpoints."""

from collections import Counter

import pytest

from epp.scheduling.plugins.weighted_random_picker import WeightedRandomPicker
from tests.helpers import cycle_state, endpoint, request


def test_weighted_random_picker_follows_scores() -> None:
    eps = [endpoint(1), endpoint(2), endpoint(3)]
    picker = WeightedRandomPicker(seed=7)
    counts = Counter(picker.pick(cycle_state(), request(), eps, [3.0, 1.0, 0.0])[0].port for _ in range(8000))
    assert counts[3] == 0  # zero score: never while another scores > 0
    assert counts[1] / 8000 == pytest.approx(0.75, abs=0.03)


def test_weighted_random_picker_all_zero_is_uniform_and_fallbacks_distinct() -> None:
    eps = [endpoint(1), endpoint(2), endpoint(3)]
    picker = WeightedRandomPicker(max_endpoints=3, seed=3)
    counts = Counter()
    for _ in range(3000):
        picked = picker.pick(cycle_state(), request(), eps, [0.0, 0.0, 0.0])
        assert sorted(ep.port for ep in picked) == [1, 2, 3]
        counts[picked[0].port] += 1
    assert min(counts.values()) > 900
