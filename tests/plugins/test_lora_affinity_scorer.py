"""lora-affinity-scorer: running the adapter beats room to load it, beats queued for it, beats none."""

from epp.scheduling.plugins.lora_affinity_scorer import LoraAffinityScorer
from tests.helpers import cycle_state, endpoint, request


def test_lora_affinity_order() -> None:
    eps = [
        endpoint(1, active=("a",), max_lora=2),  # running it
        endpoint(2, active=("b",), max_lora=2),  # room to load it
        endpoint(3, active=("b", "c"), waiting_loras=("a",), max_lora=2),  # queued for it, no room
        endpoint(4, active=("b", "c"), max_lora=2),  # none
    ]
    assert LoraAffinityScorer().score(cycle_state(), request(model="a"), eps) == [1.0, 0.8, 0.6, 0.0]
