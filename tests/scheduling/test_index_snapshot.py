"""The prefix index snapshot: a restarted epp sends each prompt where the old process sent its prefix."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from pathlib import Path

import msgpack  # type: ignore[import-untyped]
import pytest

from epp.errors import ConfigError
from epp.scheduling.framework import SchedulingResult
from epp.scheduling.index_snapshot import IndexSnapshots, approximate_indexes
from epp.scheduling.picker_config import default_config, load_text
from epp.server import EppServer
from tests.extproc_messages import completion
from tests.helpers import NOW, StartEpp, endpoint, request, until

rng = random.Random(5)
# Six documents of ~1500 characters, each the prefix of several questions.
DOCS = [" ".join(f"{rng.choice('abcdefgh')}{rng.randrange(10**6)}" for _ in range(180)) for _ in range(6)]


def snapshots(path: Path, scheduler_plugins: list, *, max_age: float = 300.0, pool: set[str] | None = None
              ) -> IndexSnapshots:
    return IndexSnapshots(str(path), approximate_indexes(scheduler_plugins), interval=5.0, max_age=max_age,
                          pool_servers=lambda: pool or set())


def route_docs(eps: list) -> tuple[object, dict[int, str]]:
    """A fresh default profile routes each document's first question; where each went."""
    scheduler = default_config(seed=1).scheduler
    placed = {}
    for i, doc in enumerate(DOCS):
        req = request(doc + " first question?")
        result, state = scheduler.schedule(req, eps, NOW, 2.0)
        scheduler.pre_request(state, req, SchedulingResult([result.endpoint], eps))
        scheduler.response_complete(req, result.endpoint)
        placed[i] = result.endpoint.hostport
    return scheduler, placed


def next_picks(scheduler, eps: list) -> dict[int, str]:
    return {i: scheduler.schedule(request(doc + " another question?"), eps, NOW, 2.0)[0].endpoint.hostport
            for i, doc in enumerate(DOCS)}


async def test_a_new_scheduler_loaded_from_the_snapshot_routes_each_prefix_where_it_went(tmp_path: Path) -> None:
    eps = [endpoint(p) for p in (1, 2, 3)]
    old, placed = route_docs(eps)
    assert len(set(placed.values())) > 1  # spread over the pool, so a match is no accident
    path = tmp_path / "index"
    await snapshots(path, old.plugins).save()

    fresh = default_config(seed=2).scheduler
    assert next_picks(fresh, eps) != placed  # an empty index places by load: elsewhere for some
    restored = default_config(seed=2).scheduler
    assert snapshots(path, restored.plugins).load() > 0
    assert next_picks(restored, eps) == placed


async def test_an_old_snapshot_is_not_loaded(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    eps = [endpoint(p) for p in (1, 2, 3)]
    old, _ = route_docs(eps)
    path = tmp_path / "index"
    await snapshots(path, old.plugins).save()
    then = time.time() - 600
    doc = msgpack.unpackb(path.read_bytes())
    doc["savedAt"] = then
    path.write_bytes(msgpack.packb(doc))
    fresh = default_config().scheduler
    with caplog.at_level(logging.INFO):
        assert snapshots(path, fresh.plugins, max_age=300).load() == 0
    assert "past --prefix-index-snapshot-max-age" in caplog.text
    assert all(fresh_index.index.size() == 0 for fresh_index in approximate_indexes(fresh.plugins).values())


async def test_a_snapshot_of_another_block_size_or_a_corrupt_file_is_ignored(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    eps = [endpoint(p) for p in (1, 2, 3)]
    old, _ = route_docs(eps)
    path = tmp_path / "index"
    await snapshots(path, old.plugins).save()
    other = load_text("""\
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: approx-prefix-cache-producer
  parameters: {blockSizeTokens: 32}
- type: prefix-cache-scorer
schedulingProfiles:
- name: default
  plugins: [{pluginRef: prefix-cache-scorer}]
""").scheduler
    assert snapshots(path, other.plugins).load() == 0
    assert "blocks, the config has" in caplog.text

    for garbage in (b"\x00 not msgpack at all",
                    msgpack.packb({"format": "epp-prefix-index/1", "savedAt": time.time(), "indexes": [1, 2]}),
                    msgpack.packb({"format": "epp-prefix-index/1", "savedAt": time.time(),
                                   "indexes": {"approx-prefix-cache-producer": {"blockChars": 64,
                                                                                "servers": {"a:1": 7}}}})):
        path.write_bytes(garbage)
        caplog.clear()
        fresh = default_config().scheduler
        assert snapshots(path, fresh.plugins).load() == 0
        assert "ignored" in caplog.text
        assert all(p.index.size() == 0 for p in approximate_indexes(fresh.plugins).values())


async def test_servers_no_longer_in_the_pool_are_not_saved(tmp_path: Path) -> None:
    eps = [endpoint(p) for p in (1, 2, 3)]
    old, placed = route_docs(eps)
    path = tmp_path / "index"
    keep = {eps[0].hostport}
    await snapshots(path, old.plugins, pool=keep).save()
    doc = msgpack.unpackb(path.read_bytes())
    saved = {server for index in doc["indexes"].values() for server in index["servers"]}
    assert saved == keep & set(placed.values())


def test_a_snapshot_path_in_a_missing_directory_fails_at_start(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a writable directory"):
        snapshots(tmp_path / "no-such-dir" / "index", default_config().scheduler.plugins)


async def test_a_restarted_epp_picks_the_pods_the_old_one_sent_each_prefix_to(
        start_epp: StartEpp, tmp_path: Path) -> None:
    """Through the HTTP pick: epp stops (writing the file), a new one starts from it."""
    path = tmp_path / "index"
    pool = [f"127.0.0.1:{p}" for p in (1, 2, 3)]

    async def picks(server: EppServer, question: str, order: list[int]) -> dict[int, str]:
        out = {}
        for i in order:
            doc = DOCS[i]
            r = await server.http.post("/pick/v1/completions", content=completion(doc + question))
            assert r.status_code == 200, r.text
            out[i] = r.headers["x-gateway-destination-endpoint"]
            await until(lambda: len(server.exchanges) == 0, what="the pick released")  # no load left behind
        return out

    first = await start_epp(endpoints=pool, http_pick=True, prefix_index_snapshot=str(path))
    placed = await picks(first, " first question?", list(range(len(DOCS))))
    assert len(set(placed.values())) > 1
    await first.stop(grace=0, drain=0)
    written = await asyncio.to_thread(lambda: sorted((p.name, p.stat().st_size > 0) for p in tmp_path.iterdir()))
    assert written == [("index", True)]  # replaced whole: no temporary file left

    # Another seed and the documents in another order: from an empty index it would place them otherwise.
    second = await start_epp(endpoints=pool, http_pick=True, prefix_index_snapshot=str(path), seed=7)
    assert await picks(second, " another question?", list(reversed(range(len(DOCS))))) == placed
