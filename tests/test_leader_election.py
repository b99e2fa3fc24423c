"""Leader election on a Lease, through lightkube, against the stand-in API server (tests/kubeapi.py)."""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from lightkube import AsyncClient

from epp.discovery.kubernetes import load_kube_config
from epp.leader_election import GIE_LEASE_SUFFIX, LeaderElector, lease_name
from tests.kubeapi import KubeApi

NS = "prod"
LEASE = lease_name(NS, "llama")
LEASES = ["leases.coordination.k8s.io"]


@pytest.fixture
def api() -> Iterator[KubeApi]:
    with KubeApi() as server:
        yield server


class Replicas:
    """EPP replicas, each with its own client and token, and one timeline of who claimed leadership when."""

    def __init__(self, api: KubeApi, tmp: Path) -> None:
        self.api, self.tmp = api, tmp
        self.timeline: list[tuple[float, str, bool]] = []
        self.electors: dict[str, LeaderElector] = {}
        self.tokens: dict[str, str] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.clients: list[AsyncClient] = []

    def add(self, who: str, **kw: Any) -> LeaderElector:
        token, user = self.api.service_account(NS, "epp")
        self.api.grant(user, ["get", "create", "update"], LEASES, namespace=NS)
        client = AsyncClient(load_kube_config(self.api.kubeconfig(self.tmp / f"kc-{who}", token)))
        self.clients.append(client)
        kw = {"lease_duration": 1.0, "renew_deadline": 0.6, "retry_period": 0.1, **kw}

        def changed(leading: bool) -> None:
            self.timeline.append((time.monotonic(), who, leading))
            assert sum(e.is_leader for e in self.electors.values()) <= 1, f"two leaders: {self.timeline}"

        e = LeaderElector(client, LEASE, NS, identity=who, on_change=changed, rng=random.Random(len(self.electors)),
                          **kw)
        self.electors[who], self.tokens[who] = e, token
        self.tasks[who] = asyncio.create_task(e.run())
        return e

    async def stop(self, who: str) -> None:
        self.tasks[who].cancel()
        with pytest.raises(asyncio.CancelledError):
            await self.tasks[who]

    async def close(self) -> None:
        for who, t in self.tasks.items():
            if not t.done():
                await self.stop(who)
        for c in self.clients:
            await c.close()

    def lease(self) -> dict[str, Any]:
        obj = self.api.get("coordination.k8s.io/v1", "Lease", NS, LEASE)
        assert obj is not None
        return obj["spec"]


@pytest.fixture
async def replicas(api: KubeApi, tmp_path: Path) -> AsyncIterator[Replicas]:
    r = Replicas(api, tmp_path)
    yield r
    await r.close()


async def until(check: Callable[[], bool], timeout: float = 5.0) -> float:
    """Wait for `check`; returns when it held (time.monotonic())."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met")
        await asyncio.sleep(0.005)
    return time.monotonic()


async def test_the_standby_takes_over_when_the_leader_stops_renewing(api: KubeApi, replicas: Replicas) -> None:
    a = replicas.add("epp-a")
    await until(lambda: a.is_leader)
    spec = replicas.lease()
    assert (spec["holderIdentity"], spec["leaseDurationSeconds"], spec["leaseTransitions"]) == ("epp-a", 1, 0)
    b = replicas.add("epp-b")
    await until(lambda: b.holder == "epp-a")
    renewed = replicas.lease()["renewTime"]
    await until(lambda: replicas.lease()["renewTime"] != renewed)  # the leader renews
    assert not b.is_leader

    api.revoke_token(replicas.tokens["epp-a"])  # the leader's renewals now fail (as if partitioned)
    killed = time.monotonic()
    took_over = await until(lambda: b.is_leader)
    stepped_down = next(t for t, who, leading in replicas.timeline if who == "epp-a" and not leading)
    assert not a.is_leader
    assert killed < stepped_down < took_over  # never two leaders
    assert stepped_down - killed <= 0.6 + 0.1 + 0.2  # within the renew deadline
    assert 0.5 <= took_over - killed <= 1.0 + 3 * 0.1 + 0.3  # not before the lease expires, soon after
    spec = replicas.lease()
    assert (spec["holderIdentity"], spec["leaseTransitions"]) == ("epp-b", 1)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", spec["acquireTime"])  # MicroTime


async def test_a_graceful_stop_releases_the_lease(api: KubeApi, replicas: Replicas) -> None:
    kw = {"lease_duration": 3.0, "renew_deadline": 2.0, "retry_period": 0.1}
    a = replicas.add("epp-a", **kw)
    await until(lambda: a.is_leader)
    b = replicas.add("epp-b", **kw)
    await until(lambda: b.holder == "epp-a")
    stopped = time.monotonic()
    await replicas.stop("epp-a")
    assert not a.is_leader
    took_over = await until(lambda: b.is_leader)
    assert took_over - stopped < 1.0  # at the standby's next retry, not after the 3 s lease
    spec = replicas.lease()
    assert (spec["holderIdentity"], spec["leaseTransitions"]) == ("epp-b", 1)


async def test_racing_candidates_elect_exactly_one(api: KubeApi, replicas: Replicas) -> None:
    for who in ("epp-a", "epp-b", "epp-c"):
        replicas.add(who)
    await until(lambda: any(e.is_leader for e in replicas.electors.values()))
    leader = next(w for w, e in replicas.electors.items() if e.is_leader)
    rv = int(api.get("coordination.k8s.io/v1", "Lease", NS, LEASE)["metadata"]["resourceVersion"])
    await until(lambda: int(api.get("coordination.k8s.io/v1", "Lease", NS, LEASE)["metadata"]["resourceVersion"])
                >= rv + 5)  # several renewals later, still the same single leader
    assert [w for w, e in replicas.electors.items() if e.is_leader] == [leader]
    assert replicas.lease()["holderIdentity"] == leader
    # Nobody overwrote the winner: a refused create or update (409) never becomes a takeover.
    assert not replicas.lease().get("leaseTransitions")


async def test_the_leader_steps_down_at_once_when_another_holds_the_lease(api: KubeApi, replicas: Replicas) -> None:
    a = replicas.add("epp-a")
    await until(lambda: a.is_leader)

    def intrude(o: dict) -> None:
        o["spec"]["holderIdentity"] = "intruder"
    api.modify("coordination.k8s.io/v1", "Lease", NS, LEASE, intrude)
    taken = time.monotonic()
    stepped_down = await until(lambda: not a.is_leader)
    assert stepped_down - taken < 0.5  # at its next renewal, not after the renew deadline
    # The intruder's claim is honoured until it expires (1 s after epp-a saw it), then epp-a takes it back.
    back = await until(lambda: a.is_leader)
    assert back - taken >= 0.8
    assert replicas.lease()["leaseTransitions"] == 1


async def test_an_api_outage_makes_the_leader_step_down_then_resume(api: KubeApi, replicas: Replicas,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    a = replicas.add("epp-a")
    await until(lambda: a.is_leader)
    acquired = replicas.lease()["acquireTime"]
    api.outage("unavailable")
    down = time.monotonic()
    stepped_down = await until(lambda: not a.is_leader)
    assert stepped_down - down <= 0.6 + 0.2
    api.outage(None)
    await until(lambda: a.is_leader)
    spec = replicas.lease()
    assert (spec["acquireTime"], spec["leaseTransitions"]) == (acquired, 0)  # still its own lease
    warnings = [r for r in caplog.records if "cannot reach Lease" in r.getMessage()]
    assert len(warnings) == 1


async def test_missing_rbac_is_named(api: KubeApi, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    token, _ = api.service_account(NS, "epp-no-leases")
    async with AsyncClient(load_kube_config(api.kubeconfig(tmp_path / "kc", token))) as client:
        e = LeaderElector(client, LEASE, NS, lease_duration=1.0, renew_deadline=0.6, retry_period=0.05)
        task = asyncio.create_task(e.run())
        await until(lambda: api.calls_to("/leases") >= 4)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert not e.is_leader
    warnings = [r.getMessage() for r in caplog.records if "cannot reach Lease" in r.getMessage()]
    assert len(warnings) == 1
    assert "HTTP 403" in warnings[0]
    assert "grant get, create and update on coordination.k8s.io leases" in warnings[0]


def test_lease_names_and_timing_checks() -> None:
    assert lease_name("prod", "llama") == "epp-prod-llama.llm-d.ai"
    assert lease_name("prod", "llama", GIE_LEASE_SUFFIX) == "epp-prod-llama.gateway-api-inference-extension.sigs.k8s.io"
    with pytest.raises(ValueError, match="retry period < renew deadline < lease duration"):
        LeaderElector(None, "l", "ns", lease_duration=10, renew_deadline=15)  # type: ignore[arg-type]
