"""The approximate prefix indexes, saved to a file and loaded again when epp starts.

The index is epp's record of what it sent each server, and the servers' caches outlive an epp
process (a crash, an OOM kill, a restarted container). A new process with an empty index places each
prompt's next request by load alone, mostly on a server that does not hold its prefix: one full
prefill per prompt in use, while the servers still hold every prefix the old process placed. With a
snapshot the new process starts from the old one's view, at most one interval old.

`--prefix-index-snapshot PATH` turns it on; the file is written every interval and when epp stops,
replaced atomically: the entries are copied on the event loop a server at a time, encoded and
written in a worker thread. A file older than
`--prefix-index-snapshot-max-age`, from an index with another block size, or unreadable is ignored
(logged): epp then starts empty, as without it. Servers that are no longer in the pool are not
written. The approximate indexes are kept (a precise producer's too, its fall-back for servers that
publish no events); the KV-event index learns the servers' true caches from their events again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from array import array
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import msgpack  # type: ignore[import-untyped]

from epp.errors import ConfigError
from epp.scheduling.framework import Plugin
from epp.scheduling.plugins.approx_prefix_cache_producer import ApproxPrefixCacheProducer
from epp.scheduling.plugins.prefix_cache_scorer import PrefixCacheScorer

log = logging.getLogger(__name__)

FORMAT = "epp-prefix-index/1"


def approximate_indexes(plugins: Iterable[Plugin]) -> dict[str, ApproxPrefixCacheProducer]:
    """The config's approximate indexes by plugin name: its producers, and the scorers' own."""
    out: dict[str, ApproxPrefixCacheProducer] = {}
    for p in plugins:
        if isinstance(p, ApproxPrefixCacheProducer):
            out[p.name] = p
        elif isinstance(p, PrefixCacheScorer) and p.own_producer is not None:
            out[p.name] = p.own_producer
    return out


def _packed(hashes: Iterable[int]) -> bytes:
    arr = array("Q", hashes)
    if sys.byteorder == "big":
        arr.byteswap()  # the file is little-endian everywhere
    return arr.tobytes()


def _unpacked(data: bytes) -> array[int]:
    arr = array("Q")
    arr.frombytes(data)
    if sys.byteorder == "big":
        arr.byteswap()
    return arr


class IndexSnapshots:
    """Saves `indexes` to `path` every `interval` seconds; `load` restores them at start."""

    def __init__(self, path: str, indexes: dict[str, ApproxPrefixCacheProducer], *, interval: float,
                 max_age: float, pool_servers: Callable[[], set[str]]) -> None:
        self.path = Path(path)
        self.indexes = indexes
        self.interval = interval
        self.max_age = max_age
        self.pool_servers = pool_servers
        self._failing = False  # the last write failed: logged once, until one succeeds
        if interval <= 0:
            raise ConfigError(f"--prefix-index-snapshot-interval must be positive, got {interval:g}s")
        if not self.path.parent.is_dir() or not os.access(self.path.parent, os.W_OK):
            raise ConfigError(f"--prefix-index-snapshot {path}: {self.path.parent} is not a writable directory")

    def load(self) -> int:
        """Restore the indexes from the file, if it is there, recent and for the same indexes; the
        entries restored."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return 0
        except OSError as e:
            log.warning("prefix index snapshot %s not read (%s): starting with an empty index", self.path, e)
            return 0
        try:
            age, found = self._parse(data)
        except (ValueError, KeyError, TypeError, AttributeError, msgpack.UnpackException) as e:
            log.warning("prefix index snapshot %s ignored (%s): starting with an empty index", self.path, e)
            return 0
        if age > self.max_age:
            log.info("prefix index snapshot %s is %.0fs old, past --prefix-index-snapshot-max-age: not loaded",
                     self.path, age)
            return 0
        restored = 0
        for producer, servers in found:
            for server, hashes in servers.items():
                producer.index.restore(server, hashes)
                restored += min(len(hashes), producer.index.capacity)
        log.info("prefix index snapshot %s loaded: %d entries, %.1fs old", self.path, restored, age)
        return restored

    def _parse(self, data: bytes) -> tuple[float, list[tuple[ApproxPrefixCacheProducer, dict[str, array[int]]]]]:
        """The file's age and, for each configured index it holds with the same block size, its
        servers' hashes. Raises on anything malformed, before any index is touched."""
        doc = msgpack.unpackb(data, raw=False)
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ValueError("not an epp prefix index snapshot")
        age = time.time() - float(doc["savedAt"])
        saved: dict[str, Any] = doc["indexes"]
        found = []
        for name, producer in self.indexes.items():
            entry = saved.get(name)
            if entry is None:
                continue
            if entry["blockChars"] != producer.block_chars:
                log.warning("prefix index snapshot %s: %s was saved with %s-character blocks, the config has %d: "
                            "not loaded", self.path, name, entry["blockChars"], producer.block_chars)
                continue
            found.append((producer, {str(server): _unpacked(packed) for server, packed in entry["servers"].items()}))
        return age, found

    async def _copy(self) -> dict[str, tuple[int, dict[str, list[int]]]]:
        """The indexes' entries, copied on the event loop one server at a time (a millisecond or two
        each), so requests are scheduled in between and no request changes a server's entries mid-copy."""
        live = self.pool_servers()
        out = {}
        for name, producer in self.indexes.items():
            servers = {}
            for server, hashes in list(producer.index.entries()):
                if not live or server in live:
                    servers[server] = list(hashes)
                    await asyncio.sleep(0)
            out[name] = (producer.block_chars, servers)
        return out

    @staticmethod
    def _encode(copies: dict[str, tuple[int, dict[str, list[int]]]]) -> bytes:
        indexes = {name: {"blockChars": block_chars, "servers": {s: _packed(h) for s, h in servers.items()}}
                   for name, (block_chars, servers) in copies.items()}
        return msgpack.packb({"format": FORMAT, "savedAt": time.time(), "indexes": indexes})

    def _write(self, data: bytes) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, self.path)  # a reader sees the old file or the new one, never half of one

    async def save(self) -> None:
        """Write the file now; a failure is logged (once until a write succeeds), never raised."""
        copies = await self._copy()
        try:
            await asyncio.to_thread(lambda: self._write(self._encode(copies)))
        except OSError as e:
            if not self._failing:
                log.warning("prefix index snapshot %s not written (%s); will retry every %gs",
                            self.path, e, self.interval)
            self._failing = True
            return
        if self._failing:
            log.info("prefix index snapshot %s written again", self.path)
        self._failing = False

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.save()
