"""lora-affinity-filter: servers with the adapter (running or queued) first, else those with room to load it."""

from epp.scheduling.plugins.lora_affinity_filter import LoraAffinityFilter
from tests.helpers import cycle_state, endpoint, request


def ports(eps):
    return [ep.port for ep in eps]


def test_lora_affinity_filter_prefers_servers_with_the_adapter() -> None:
    eps = [
        endpoint(1, active=("a",), max_lora=2),
        endpoint(2, waiting_loras=("a",), max_lora=2),
        endpoint(3, active=("b",), max_lora=2),  # room to load
        endpoint(4, active=("b", "c"), max_lora=2),  # full
    ]
    f = LoraAffinityFilter(seed=1)
    assert ports(f.filter(cycle_state(), request(model="a"), eps)) == [1, 2]
    # threshold 0: always the servers with a free slot instead (spreading the adapter)
    assert ports(LoraAffinityFilter(threshold=0.0).filter(cycle_state(), request(model="a"), eps)) == [3]
    # nobody has it: those with room
    assert ports(f.filter(cycle_state(), request(model="z"), eps)) == [1, 2, 3]
