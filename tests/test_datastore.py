"""The pool's state (epp.datastore): membership changes keep what epp knows of the endpoints that stay."""

from __future__ import annotations

import pytest

from epp.datastore import Datastore, Endpoint, EndpointMetrics, parse_hostport


def pool(*ports: int, ready: bool = True) -> list[Endpoint]:
    return [Endpoint("10.0.0.1", p, name=f"pod-{p}", ready=ready) for p in ports]


def test_set_endpoints_keeps_metrics_and_inflight_of_known_endpoints() -> None:
    ds = Datastore()
    ds.set_endpoints(pool(1, 2))
    known = ds.get("10.0.0.1:1")
    assert known is not None
    known.metrics = EndpointMetrics(waiting=3, scraped_at=1.0)
    known.inflight = 2
    # Discovery reports the pool again with fresh objects (a relabelled pod, a new one).
    again = pool(1, 3)
    again[0].labels = {"version": "v2"}
    ds.set_endpoints(again)
    kept = ds.get("10.0.0.1:1")
    assert kept is known  # the same object: requests in flight hold it
    assert kept.metrics == EndpointMetrics(waiting=3, scraped_at=1.0)
    assert kept.inflight == 2
    assert kept.labels == {"version": "v2"}  # what discovery says is taken
    assert ds.get("10.0.0.1:2") is None
    assert ds.get("10.0.0.1:3") is again[1]
    assert {ep.hostport for ep in ds.all_endpoints()} == {"10.0.0.1:1", "10.0.0.1:3"}


def test_readiness_filters_ready_endpoints() -> None:
    ds = Datastore()
    eps = [*pool(1, 2), *pool(3, ready=False)]
    ds.set_endpoints(eps)
    assert [ep.port for ep in ds.ready_endpoints()] == [1, 2]
    assert len(ds.all_endpoints()) == 3
    # A known endpoint turning unready leaves the ready set but keeps its state.
    ds.get("10.0.0.1:1").inflight = 1
    ds.set_endpoints([*pool(1, ready=False), *pool(2, 3)])
    assert [ep.port for ep in ds.ready_endpoints()] == [2, 3]
    assert ds.get("10.0.0.1:1").inflight == 1


def test_listeners_get_added_and_removed_endpoints() -> None:
    ds = Datastore()
    calls: list[tuple[list[int], list[int]]] = []
    ds.subscribe(lambda added, removed: calls.append(([e.port for e in added], [e.port for e in removed])))
    ds.set_endpoints(pool(1, 2))
    ds.set_endpoints(pool(2, 3))
    ds.set_endpoints(pool(2, 3))  # no change: no call
    ds.set_endpoints([*pool(2, ready=False), *pool(3)])  # readiness only: membership is the same
    ds.set_endpoints([])
    assert calls == [([1, 2], []), ([3], [1]), ([], [2, 3])]


def test_pool_synced_once_discovery_has_reported_the_pool() -> None:
    ds = Datastore()
    assert not ds.pool_synced
    ds.set_endpoints([])  # an empty pool is still a known pool
    assert ds.pool_synced
    assert ds.ready_endpoints() == ()


def test_ipv6_endpoints_are_keyed_and_addressed_in_brackets() -> None:
    ep = Endpoint("fd00::1", 8000, metrics_port=9090)
    assert ep.hostport == "[fd00::1]:8000"
    assert ep.metrics_url("/metrics") == "http://[fd00::1]:9090/metrics"
    ds = Datastore()
    ds.set_endpoints([ep])
    assert ds.get("[fd00::1]:8000") is ep


@pytest.mark.parametrize(("text", "parsed"), [("10.0.0.1:8000", ("10.0.0.1", 8000)), (" [::1]:9 ", ("::1", 9))])
def test_parse_hostport(text: str, parsed: tuple[str, int]) -> None:
    assert parse_hostport(text) == parsed


@pytest.mark.parametrize("text", ["10.0.0.1", ":8000", "10.0.0.1:", "10.0.0.1:0", "10.0.0.1:65536", "h:port", "[::1]"])
def test_parse_hostport_rejects_what_is_not_ip_port(text: str) -> None:
    with pytest.raises(ValueError, match="expected ip:port"):
        parse_hostport(text)
