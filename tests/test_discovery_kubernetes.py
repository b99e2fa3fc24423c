"""Discovery from the Kubernetes API, through the real lightkube client, against the stand-in server.

tests/kubeapi.py is a stand-in for kube-apiserver (none runs here); it speaks the
list/watch protocol, RBAC, 404s for missing CRDs and 410 for expired watches.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from lightkube import AsyncClient

from epp.discovery.kubernetes import (
    KubeConfigError,
    KubernetesDiscovery,
    deployment_name,
    load_kube_config,
    pool_namespace,
)
from epp.discovery.manifests import PoolSnapshot
from epp.discovery.selectors import LabelSelector
from epp.rewrites import ModelRewrites
from tests.kubeapi import LLMD_GROUP, V1_GROUP, X_GROUP, KubeApi

NS = "prod"
LOGGER = "epp.discovery.kubernetes"
READ = ["get", "list", "watch"]
RESOURCES = ["pods", f"inferencepools.{V1_GROUP}", f"inferencepools.{X_GROUP}",
             f"inferenceobjectives.{X_GROUP}", f"inferencemodelrewrites.{X_GROUP}",
             f"inferenceobjectives.{LLMD_GROUP}", f"inferencemodelrewrites.{LLMD_GROUP}"]


def pool(selector: dict[str, str] | None = None, ports: tuple[int, ...] = (8000,), name: str = "llama") -> dict:
    return {"apiVersion": f"{V1_GROUP}/v1", "kind": "InferencePool", "metadata": {"name": name, "namespace": NS},
            "spec": {"selector": {"matchLabels": selector or {"app": "vllm"}},
                     "targetPorts": [{"number": p} for p in ports], "endpointPickerRef": {"name": "epp"}}}


def pod(name: str, ip: str | None, *, ready: bool = True, labels: dict[str, str] | None = None,
        annotations: dict[str, str] | None = None) -> dict:
    status: dict[str, Any] = {"phase": "Running" if ip else "Pending",
                              "conditions": [{"type": "PodScheduled", "status": "True"},
                                             {"type": "Ready", "status": "True" if ready else "False"}]}
    if ip:
        status["podIP"] = ip
    meta: dict[str, Any] = {"name": name, "namespace": NS, "labels": labels or {"app": "vllm"}}
    if annotations:
        meta["annotations"] = annotations
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta,
            "spec": {"containers": [{"name": "vllm", "image": "vllm/vllm-openai"}]}, "status": status}


def objective(name: str, priority: int, group: str = LLMD_GROUP, pool_name: str = "llama") -> dict:
    return {"apiVersion": f"{group}/v1alpha2", "kind": "InferenceObjective",
            "metadata": {"name": name, "namespace": NS},
            "spec": {"priority": priority, "poolRef": {"group": V1_GROUP, "kind": "InferencePool", "name": pool_name}}}


def rewrite(name: str, model: str, target: str, group: str = LLMD_GROUP) -> dict:
    return {"apiVersion": f"{group}/v1alpha2", "kind": "InferenceModelRewrite",
            "metadata": {"name": name, "namespace": NS},
            "spec": {"poolRef": {"group": V1_GROUP, "name": "llama"},
                     "rules": [{"matches": [{"model": {"type": "Exact", "value": model}}],
                                "targets": [{"modelRewrite": target}]}]}}


@pytest.fixture
def api() -> Iterator[KubeApi]:
    with KubeApi() as server:
        yield server


@pytest.fixture
def epp_token(api: KubeApi) -> str:
    token, user = api.service_account(NS, "epp")
    api.grant(user, READ, RESOURCES, namespace=NS)
    return token


@pytest.fixture
async def client(api: KubeApi, epp_token: str, tmp_path: Path) -> AsyncIterator[AsyncClient]:
    c = AsyncClient(load_kube_config(api.kubeconfig(tmp_path / "kubeconfig", epp_token)))
    yield c
    await c.close()


class Discovery:
    """A running KubernetesDiscovery and every snapshot it applied."""

    def __init__(self, client: AsyncClient, **kw: Any) -> None:
        self.snaps: list[PoolSnapshot] = []
        kw.setdefault("pool_name", "llama")
        self.disc = KubernetesDiscovery(client, self.snaps.append, namespace=NS, coalesce=0.01,
                                        backoff_initial=0.02, backoff_max=0.2, crd_retry=0.2,
                                        rng=random.Random(7), **kw)

    async def __aenter__(self) -> Discovery:
        self.task = asyncio.create_task(self.disc.run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await self.task

    @property
    def last(self) -> PoolSnapshot:
        return self.snaps[-1]

    def endpoints(self) -> list[tuple[str, str, bool]]:
        return sorted((e.name, e.hostport, e.ready) for e in self.last.endpoints) if self.snaps else []

    async def until(self, check: Callable[[], bool], timeout: float = 5.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while not check():
            if self.task.done():
                self.task.result()
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"condition not met; last snapshot: {self.endpoints()}")
            await asyncio.sleep(0.01)

    async def synced(self) -> None:
        await asyncio.wait_for(self.disc.synced.wait(), 5)


def messages(caplog: pytest.LogCaptureFixture, level: int, part: str) -> list[str]:
    return [m for r in caplog.records if r.name == LOGGER and r.levelno == level and part in (m := r.getMessage())]


async def test_pods_scaling_up_and_down(api: KubeApi, client: AsyncClient) -> None:
    api.apply(pool())
    api.apply(pod("a", "10.0.0.1"))
    api.apply(pod("b", "10.0.0.2"))
    api.apply(pod("other", "10.0.0.9", labels={"app": "web"}))
    async with Discovery(client) as d:
        await d.synced()
        assert d.endpoints() == [("a", "10.0.0.1:8000", True), ("b", "10.0.0.2:8000", True)]
        await d.until(lambda: api.watch_selectors("pods") == ["app=vllm"])  # the API server filters, not epp
        api.apply(pod("c", "10.0.0.3"))
        await d.until(lambda: len(d.endpoints()) == 3)
        api.delete("v1", "Pod", NS, "a")
        api.delete("v1", "Pod", NS, "b")
        await d.until(lambda: d.endpoints() == [("c", "10.0.0.3:8000", True)])
        # A pod relabelled out of the pool leaves it (the watch sees it as DELETED).
        api.modify("v1", "Pod", NS, "c", lambda o: o["metadata"]["labels"].update(app="web"))
        await d.until(lambda: d.endpoints() == [])
        assert d.last.has_pool


async def test_a_pod_going_unready_or_terminating_stops_being_ready(api: KubeApi, client: AsyncClient) -> None:
    api.apply(pool())
    api.apply(pod("a", "10.0.0.1"))
    api.apply(pod("b", "10.0.0.2"))
    api.apply(pod("pending", None))
    async with Discovery(client) as d:
        await d.synced()
        assert d.endpoints() == [("a", "10.0.0.1:8000", True), ("b", "10.0.0.2:8000", True)]
        api.modify("v1", "Pod", NS, "a", lambda o: o["status"]["conditions"][1].update(status="False"))
        await d.until(lambda: ("a", "10.0.0.1:8000", False) in d.endpoints())

        def terminate(o: dict) -> None:
            o["metadata"]["deletionTimestamp"] = "2030-01-01T00:00:00Z"
            o["metadata"]["deletionGracePeriodSeconds"] = 30
        api.modify("v1", "Pod", NS, "b", terminate)  # still Ready, but terminating: no new work
        await d.until(lambda: ("b", "10.0.0.2:8000", False) in d.endpoints())
        api.modify("v1", "Pod", NS, "a", lambda o: o["status"]["conditions"][1].update(status="True"))
        await d.until(lambda: ("a", "10.0.0.1:8000", True) in d.endpoints())
        api.modify("v1", "Pod", NS, "pending", lambda o: o["status"].update(podIP="10.0.0.4", phase="Running"))
        await d.until(lambda: ("pending", "10.0.0.4:8000", True) in d.endpoints())


async def test_the_pools_selector_changing_rewatches_its_pods(api: KubeApi, client: AsyncClient) -> None:
    api.apply(pool({"app": "vllm"}))
    api.apply(pod("old", "10.0.0.1"))
    api.apply(pod("new", "10.0.0.2", labels={"app": "sglang"}))
    async with Discovery(client) as d:
        await d.synced()
        assert d.endpoints() == [("old", "10.0.0.1:8000", True)]
        api.modify(f"{V1_GROUP}/v1", "InferencePool", NS, "llama",
                   lambda o: o["spec"]["selector"].update(matchLabels={"app": "sglang"}))
        await d.until(lambda: d.endpoints() == [("new", "10.0.0.2:8000", True)])
        await d.until(lambda: api.watch_selectors("pods") == ["app=sglang"])
        # The switch went straight from the old pods to the new: never an empty pool in between.
        assert all(s.endpoints for s in d.snaps)


async def test_two_target_ports_give_one_endpoint_per_port(api: KubeApi, client: AsyncClient) -> None:
    api.apply(pool(ports=(8000, 8001)))
    api.apply(pod("a", "10.0.0.1"))
    api.apply(pod("b", "10.0.0.2", annotations={"inference.networking.k8s.io/active-ports": "8001"}))
    async with Discovery(client) as d:
        await d.synced()
        assert d.endpoints() == [("a-rank-0", "10.0.0.1:8000", True), ("a-rank-1", "10.0.0.1:8001", True),
                                 ("b-rank-1", "10.0.0.2:8001", True)]
        assert d.last.target_ports == [8000, 8001]
        api.modify(f"{V1_GROUP}/v1", "InferencePool", NS, "llama",
                   lambda o: o["spec"].update(targetPorts=[{"number": 8000}]))
        await d.until(lambda: d.endpoints() == [("a", "10.0.0.1:8000", True)])


async def test_objective_priority_change_and_rewrite_added(api: KubeApi, client: AsyncClient,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, LOGGER)
    api.apply(pool())
    api.apply(pod("a", "10.0.0.1"))
    api.apply(objective("batch", -1))
    api.apply(objective("chat", 10))
    api.apply(objective("elsewhere", 3, pool_name="other-pool"))
    api.apply(objective("legacy", 7, group=X_GROUP))  # both groups installed: the legacy one is ignored
    async with Discovery(client) as d:
        await d.synced()
        assert d.last.objectives == {"batch": -1, "chat": 10}
        api.modify(f"{LLMD_GROUP}/v1alpha2", "InferenceObjective", NS, "batch",
                   lambda o: o["spec"].update(priority=5))
        await d.until(lambda: d.last.objectives == {"batch": 5, "chat": 10})
        api.apply(rewrite("to-v2", "food-review", "food-review-v2"))
        await d.until(lambda: len(d.last.rewrites) == 1)
        assert ModelRewrites(d.last.rewrites, seed=1).rewrite("food-review") == ("food-review-v2", "to-v2")
        api.delete(f"{LLMD_GROUP}/v1alpha2", "InferenceObjective", NS, "chat")
        await d.until(lambda: d.last.objectives == {"batch": 5})
    assert len(messages(caplog, logging.WARNING, "ignoring the legacy")) == 2  # objectives and rewrites, once each


async def test_legacy_group_alone_is_watched(api: KubeApi, client: AsyncClient) -> None:
    api.uninstall(LLMD_GROUP)
    api.apply(pool())
    api.apply(objective("batch", -1, group=X_GROUP))
    async with Discovery(client) as d:
        await d.synced()
        assert d.last.objectives == {"batch": -1}
        api.apply(objective("chat", 2, group=X_GROUP))
        await d.until(lambda: d.last.objectives == {"batch": -1, "chat": 2})


async def test_an_invalid_objective_is_left_out_and_logged_once(api: KubeApi, client: AsyncClient,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    api.apply(pool())
    api.apply(objective("good", 1))
    bad = objective("bad", 1)
    bad["spec"]["priority"] = "high"  # the CRD's schema would refuse it; the stand-in stores it as given
    api.apply(bad)
    async with Discovery(client) as d:
        await d.synced()
        assert d.last.objectives == {"good": 1}
        api.apply(objective("more", 2))
        await d.until(lambda: d.last.objectives == {"good": 1, "more": 2})
    assert len(messages(caplog, logging.ERROR, "priority must be an integer")) == 1


@pytest.mark.parametrize("mode", ["refuse", "unavailable"])
async def test_api_outage_keeps_endpoints_and_resyncs_after(api: KubeApi, client: AsyncClient, mode: str,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, LOGGER)
    api.apply(pool())
    api.apply(pod("a", "10.0.0.1"))
    api.apply(pod("b", "10.0.0.2"))
    async with Discovery(client) as d:
        await d.synced()
        applied = d.disc.applied
        api.outage(mode)
        await d.until(lambda: not d.disc.api_reachable)
        # Changes while the API is down (they happen in etcd; epp cannot see them yet).
        api.delete("v1", "Pod", NS, "a")
        api.apply(pod("c", "10.0.0.3"))
        assert d.disc.applied == applied
        assert d.endpoints() == [("a", "10.0.0.1:8000", True), ("b", "10.0.0.2:8000", True)]
        api.outage(None)
        await d.until(lambda: d.endpoints() == [("b", "10.0.0.2:8000", True), ("c", "10.0.0.3:8000", True)])
        assert d.disc.api_reachable
    assert len(messages(caplog, logging.WARNING, "Kubernetes API unreachable")) == 1
    assert len(messages(caplog, logging.INFO, "Kubernetes API reachable again")) == 1
    assert all(len(s.endpoints) >= 2 for s in d.snaps)  # the pool was never emptied


async def test_expired_watch_relists(api: KubeApi, client: AsyncClient) -> None:
    api.apply(pool())
    api.apply(pod("a", "10.0.0.1"))
    api.apply(pod("b", "10.0.0.2"))
    async with Discovery(client) as d:
        await d.synced()
        pod_lists = api.calls_to("/pods")
        api.outage("refuse")
        api.delete("v1", "Pod", NS, "a")  # a deletion the resumed watch would need to replay...
        api.compact()  # ...but the history is gone: resuming gets 410 Gone
        api.outage(None)
        await d.until(lambda: d.endpoints() == [("b", "10.0.0.2:8000", True)])
        assert api.calls_to("/pods") > pod_lists


async def test_expired_resume_after_a_clean_close_relists(api: KubeApi, client: AsyncClient) -> None:
    api.apply(pool())
    api.apply(pod("a", "10.0.0.1"))
    async with Discovery(client) as d:
        await d.synced()
        api.compact()
        assert api.close_watches("pods") == 1  # the server ends it; the client resumes from its version: 410
        api.apply(pod("b", "10.0.0.2"))
        await d.until(lambda: len(d.endpoints()) == 2)
        await d.until(lambda: api.watch_count("pods") == 1)


async def test_dropped_and_closed_watches_reconnect(api: KubeApi, client: AsyncClient) -> None:
    api.apply(pool())
    api.apply(pod("a", "10.0.0.1"))
    async with Discovery(client) as d:
        await d.synced()
        await d.until(lambda: api.watch_count("pods") == 1)
        # A clean close (the server's timeoutSeconds): the watch resumes from its resourceVersion, no relist.
        api.close_watches("pods")
        api.apply(pod("b", "10.0.0.2"))
        await d.until(lambda: len(d.endpoints()) == 2)
        pod_lists = [c for c in api.calls if c.path.endswith("/pods") and c.query.get("watch") != "true"]
        assert len(pod_lists) == 1
        # A cut connection: reconnect (relisting), and changes after it arrive.
        api.drop_watches("pods")
        api.apply(pod("c", "10.0.0.3"))
        await d.until(lambda: len(d.endpoints()) == 3)
        await d.until(lambda: api.watch_count("pods") == 1)


async def test_the_servers_watch_timeout_resumes_without_relisting(api: KubeApi, client: AsyncClient) -> None:
    api.apply(pool())
    api.apply(pod("a", "10.0.0.1"))
    async with Discovery(client, watch_timeout=0.5) as d:  # timeoutSeconds=1: the server ends each watch
        await d.synced()
        watches = lambda: [c for c in api.calls if c.path.endswith("/pods") and c.query.get("watch")]  # noqa: E731
        await d.until(lambda: len(watches()) >= 1)  # synced after the list; the watch opens just after
        assert watches()[0].query["timeoutSeconds"] == "1"
        await d.until(lambda: len(watches()) >= 2)
        api.apply(pod("b", "10.0.0.2"))
        await d.until(lambda: len(d.endpoints()) == 2)
        assert len([c for c in api.calls if c.path.endswith("/pods") and not c.query.get("watch")]) == 1


async def test_bookmarks_keep_the_resume_point_fresh(api: KubeApi, client: AsyncClient) -> None:
    api.apply(pool())
    api.apply(pod("a", "10.0.0.1"))
    async with Discovery(client) as d:
        await d.synced()
        await d.until(lambda: api.watch_count("pods") == 1)
        for i in range(5):  # churn elsewhere moves the global resourceVersion on
            api.apply(objective(f"o{i}", i, pool_name="other"))
        assert all(c.query.get("allowWatchBookmarks") == "true" for c in api.calls if c.query.get("watch"))
        api.send_bookmarks()  # the stream carries the bookmark, then (below) its end
        bookmark_rv = api.resource_version
        api.compact()
        lists = len([c for c in api.calls if c.path.endswith("/pods") and c.query.get("watch") != "true"])
        api.close_watches("pods")
        api.apply(pod("b", "10.0.0.2"))
        await d.until(lambda: len(d.endpoints()) == 2)
        # Resumed from the bookmark's version: still inside the (compacted) history, so no 410 and no relist.
        assert len([c for c in api.calls if c.path.endswith("/pods") and c.query.get("watch") != "true"]) == lists
        resumed = [c for c in api.calls if c.path.endswith("/pods") and c.query.get("watch")][-1]
        assert resumed.query["resourceVersion"] == bookmark_rv


async def test_absent_crd_groups_are_not_watched_and_probed_again(api: KubeApi, client: AsyncClient,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, LOGGER)
    api.uninstall(LLMD_GROUP)
    api.uninstall(X_GROUP, "inferenceobjectives")
    api.uninstall(X_GROUP, "inferencemodelrewrites")
    api.apply(pool())
    api.apply(pod("a", "10.0.0.1"))
    async with Discovery(client) as d:
        await d.synced()
        assert d.last.objectives == {}
        probes = api.calls_to("inferenceobjectives")
        await d.until(lambda: api.calls_to("inferenceobjectives") >= probes + 4)  # probed again, rarely
        api.install(X_GROUP)
        api.apply(objective("batch", -1, group=X_GROUP))
        await d.until(lambda: d.last.objectives == {"batch": -1})
        api.uninstall(X_GROUP, "inferenceobjectives")  # the CRD is deleted while watched: its objects go
        await d.until(lambda: d.last.objectives == {})
        assert d.endpoints() == [("a", "10.0.0.1:8000", True)]
        # Once when absent at start, once more after it came and went (at the next probe).
        await d.until(lambda: len(messages(caplog, logging.INFO, "no InferenceObjective CRD is installed")) >= 2)
        probes = api.calls_to("inferenceobjectives")
        await d.until(lambda: api.calls_to("inferenceobjectives") >= probes + 3)
    # Per absence, not per probe: the probes since said nothing more.
    assert len(messages(caplog, logging.INFO, "no InferenceObjective CRD is installed")) == 2


async def test_forbidden_resources_are_logged_once(api: KubeApi, tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    token, user = api.service_account(NS, "epp-no-crds")
    api.grant(user, READ, ["pods", f"inferencepools.{V1_GROUP}"], namespace=NS)
    api.apply(pool())
    api.apply(pod("a", "10.0.0.1"))
    async with AsyncClient(load_kube_config(api.kubeconfig(tmp_path / "kc", token))) as c, Discovery(c) as d:
        await d.synced()  # objectives not granted: the pool is served without them
        assert d.endpoints() == [("a", "10.0.0.1:8000", True)]
        tries = api.calls_to("inferenceobjectives")
        await d.until(lambda: api.calls_to("inferenceobjectives") >= tries + 6)
        api.grant(user, READ, [f"inferenceobjectives.{LLMD_GROUP}"], namespace=NS)
        api.apply(objective("batch", 4))
        await d.until(lambda: d.last.objectives == {"batch": 4})
    forbidden = messages(caplog, logging.ERROR, "403 Forbidden")
    assert sorted(m.split(" in namespace")[0] for m in forbidden) == sorted(
        f"epp may not list/watch {kind} ({g})" for g in (LLMD_GROUP, X_GROUP)
        for kind in ("InferenceObjectives", "InferenceModelRewrites"))
    assert "cannot list resource" in forbidden[0]


async def test_forbidden_pods_never_sync_and_say_why(api: KubeApi, tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    token, user = api.service_account(NS, "epp-no-pods")
    api.grant(user, READ, [r for r in RESOURCES if r != "pods"], namespace=NS)
    api.apply(pool())
    async with AsyncClient(load_kube_config(api.kubeconfig(tmp_path / "kc", token))) as c, Discovery(c) as d:
        await d.until(lambda: api.calls_to("/pods") >= 3)
        assert not d.disc.synced.is_set()
        assert d.snaps == []
    assert len(messages(caplog, logging.ERROR, "may not list/watch Pods")) == 1


async def test_pool_deleted_and_recreated(api: KubeApi, client: AsyncClient) -> None:
    api.apply(pool())
    api.apply(pod("a", "10.0.0.1"))
    async with Discovery(client) as d:
        await d.synced()
        api.delete(f"{V1_GROUP}/v1", "InferencePool", NS, "llama")
        await d.until(lambda: not d.last.has_pool)
        assert d.last.endpoints == []
        api.apply(pool())
        await d.until(lambda: d.last.has_pool and len(d.endpoints()) == 1)


async def test_pool_not_there_at_start_is_not_synced(api: KubeApi, client: AsyncClient) -> None:
    api.apply(pod("a", "10.0.0.1"))
    async with Discovery(client) as d:
        await d.until(lambda: bool(d.snaps))
        assert not d.last.has_pool
        assert not d.disc.synced.is_set()
        api.apply(pool())
        await d.synced()
        assert d.endpoints() == [("a", "10.0.0.1:8000", True)]


async def test_alpha_pool_group(api: KubeApi, client: AsyncClient) -> None:
    api.apply({"apiVersion": f"{X_GROUP}/v1alpha2", "kind": "InferencePool", "metadata": {"name": "llama",
               "namespace": NS}, "spec": {"selector": {"app": "vllm"}, "targetPortNumber": 8000,
                                          "extensionRef": {"name": "epp"}}})
    api.apply(pool({"app": "not-this-one"}))  # a v1 pool of the same name is another object
    api.apply(pod("a", "10.0.0.1"))
    api.apply({**objective("batch", -1), "spec": {"priority": -1, "poolRef": {"group": X_GROUP, "name": "llama"}}})
    api.apply(objective("for-v1-pool", 9))
    async with Discovery(client, pool_group=X_GROUP) as d:
        await d.synced()
        assert d.endpoints() == [("a", "10.0.0.1:8000", True)]
        assert d.last.objectives == {"batch": -1}  # poolRef must name the pool's group too, as upstream


async def test_pool_less_mode_watches_pods_by_selector_only(api: KubeApi, client: AsyncClient) -> None:
    api.apply(pod("a", "10.0.0.1", labels={"app": "vllm", "track": "stable"}))
    api.apply(pod("b", "10.0.0.2", labels={"app": "sglang", "track": "stable"}))
    api.apply(pod("canary", "10.0.0.3", labels={"app": "vllm", "track": "stable", "canary": "yes"}))
    api.apply(pod("web", "10.0.0.4", labels={"app": "web", "track": "stable"}))
    selector = LabelSelector.parse("app in (vllm, sglang),!canary")
    async with Discovery(client, pool_name="epp", endpoint_selector=selector, target_ports=[8000, 8002]) as d:
        await d.synced()
        assert [n for n, _, _ in d.endpoints()] == ["a-rank-0", "a-rank-1", "b-rank-0", "b-rank-1"]
        await d.until(lambda: api.watch_selectors("pods") == ["app in (sglang,vllm),!canary"])
        api.modify("v1", "Pod", NS, "a", lambda o: o["metadata"]["labels"].update(canary="yes"))
        await d.until(lambda: [n for n, _, _ in d.endpoints()] == ["b-rank-0", "b-rank-1"])
    assert api.calls_to("inferencepools") == api.calls_to("inferenceobjectives") == 0


async def test_a_burst_of_changes_is_one_snapshot(api: KubeApi, client: AsyncClient) -> None:
    api.apply(pool())
    async with Discovery(client) as d:
        await d.synced()
        before = d.disc.applied
        d.disc.coalesce = 0.2
        for i in range(40):
            api.apply(pod(f"p{i}", f"10.0.1.{i}"))
        await d.until(lambda: len(d.endpoints()) == 40)
        assert d.disc.applied - before <= 3
        # Status churn that changes nothing epp uses (a new resourceVersion) is not applied again.
        applied = d.disc.applied
        api.modify("v1", "Pod", NS, "p0", lambda o: o["status"].update(hostIP="192.168.0.1"))
        api.apply(pod("marker", "10.0.2.1"))
        await d.until(lambda: len(d.endpoints()) == 41)
        assert d.disc.applied == applied + 1


async def test_in_cluster_service_account_and_token_rotation(api: KubeApi, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    token, user = api.service_account(NS, "epp")
    api.grant(user, READ, RESOURCES, namespace=NS)
    sa = tmp_path / "serviceaccount"
    for k, v in api.service_account_dir(sa, token, NS).items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.delenv("NAMESPACE", raising=False)
    conf = load_kube_config(None, service_account_dir=str(sa))
    assert pool_namespace(None, service_account_dir=str(sa)) == NS
    api.apply(pool())
    api.apply(pod("a", "10.0.0.1"))
    async with AsyncClient(conf) as c, Discovery(c) as d:
        await d.synced()
        # The kubelet rotates the token: the old one stops working, the file holds the new one.
        new_token = "sa.rotated"
        api.add_token(new_token, user, groups=["system:serviceaccounts"])
        (sa / "token").write_text(new_token)
        api.revoke_token(token)
        api.drop_watches()
        api.apply(pod("b", "10.0.0.2"))
        await d.until(lambda: len(d.endpoints()) == 2)
        assert any(c.status == 401 for c in api.calls)


def test_kubeconfig_flag_env_and_errors(api: KubeApi, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = api.kubeconfig(tmp_path / "config", "t0k3n", namespace=NS)
    assert load_kube_config(path).get().cluster.server == api.url
    monkeypatch.setenv("KUBECONFIG", f"{tmp_path / 'missing'}:{path}")
    assert load_kube_config(None).get().cluster.server == api.url
    with pytest.raises(KubeConfigError, match=r"--kubeconfig .*missing.*not found"):
        load_kube_config(str(tmp_path / "missing"))
    (tmp_path / "broken").write_text("clusters: 3\n")
    with pytest.raises(KubeConfigError, match="broken is not a valid kubeconfig"):
        load_kube_config(str(tmp_path / "broken"))
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "nope"))
    with pytest.raises(KubeConfigError, match="KUBECONFIG names no existing file"):
        load_kube_config(None)
    monkeypatch.delenv("KUBECONFIG")
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(KubeConfigError, match="no Kubernetes configuration"):
        load_kube_config(None)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    with pytest.raises(KubeConfigError, match=r"lacks token, ca\.crt, namespace"):
        load_kube_config(None, service_account_dir=str(tmp_path / "no-sa"))


def test_pool_namespace_and_pool_less_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NAMESPACE", raising=False)
    sa = tmp_path / "sa"
    assert pool_namespace(None, service_account_dir=str(sa)) == "default"
    sa.mkdir()
    (sa / "namespace").write_text("from-sa")
    assert pool_namespace(None, service_account_dir=str(sa)) == "from-sa"
    monkeypatch.setenv("NAMESPACE", "from-env")
    assert pool_namespace(None, service_account_dir=str(sa)) == "from-env"
    assert pool_namespace("from-flag", service_account_dir=str(sa)) == "from-flag"
    assert deployment_name("vllm-llama3-epp-7d9f8b6c4-x2x9z") == "vllm-llama3-epp"
    with pytest.raises(ValueError, match="POD_NAME"):
        deployment_name(None)
    with pytest.raises(ValueError, match="cannot tell the Deployment"):
        deployment_name("standalone")


async def test_bad_settings_are_refused(client: AsyncClient) -> None:
    with pytest.raises(ValueError, match="not an InferencePool group"):
        KubernetesDiscovery(client, print, pool_name="p", namespace=NS, pool_group="example.com")
    with pytest.raises(ValueError, match="1 to 8 port numbers"):
        KubernetesDiscovery(client, print, pool_name="p", namespace=NS, endpoint_selector=LabelSelector.parse("a=b"))
    with pytest.raises(ValueError, match="must select something"):
        KubernetesDiscovery(client, print, pool_name="p", namespace=NS, endpoint_selector=LabelSelector(),
                            target_ports=[8000])
