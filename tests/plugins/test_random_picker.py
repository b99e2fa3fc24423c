"""random-picker: uniform over the candidates, whatever their scores."""

from epp.scheduling.plugins.random_picker import RandomPicker
from tests.helpers import cycle_state, endpoint, request


def test_random_picker_spreads() -> None:
    eps = [endpoint(i) for i in range(3)]
    p = RandomPicker(seed=3)
    assert {p.pick(cycle_state(), request(), eps, [9, 0, 0])[0].port for _ in range(60)} == {0, 1, 2}
