"""Which block keys each pod holds, from its KV-cache events: exact, bounded, per pod.

One writer (the subscriber's thread) applies event batches; the scheduler reads on the event
loop with membership tests only, which need no lock. Writes (a batch, a pod leaving) take a
lock held for one batch at most. Memory is bounded twice: an LRU cap of
keys per pod, and a cap over all pods (the pod holding most gives up its oldest first).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field

from epp.kvevents.events import AllBlocksCleared, BlockRemoved, BlockStored, EventBatch
from epp.kvevents.hashing import block_keys, root_key

GPU_MEDIA = (None, "", "gpu", "GPU")


@dataclass(slots=True)
class PodBlocks:
    keys: OrderedDict[int, None] = field(default_factory=OrderedDict)  # request keys, LRU order
    engine: OrderedDict[int, tuple[int, ...]] = field(default_factory=OrderedDict)  # engine hash -> its keys
    last: dict[int, int] = field(default_factory=dict)  # engine hash -> the key a child block chains on


@dataclass(slots=True)
class IndexStats:
    stored_blocks: int = 0
    removed_blocks: int = 0
    skipped_events: int = 0  # an unknown parent, another device tier, tokens that fill no block
    clears: int = 0


class BlockIndex:
    def __init__(self, *, block_size: int = 16, hash_seed: str = "", max_blocks_per_pod: int = 1 << 20,
                 max_blocks: int = 1 << 24) -> None:
        self.block_size = block_size
        self.hash_seed = hash_seed
        self.max_blocks_per_pod = max_blocks_per_pod
        self.max_blocks = max_blocks
        self._pods: dict[str, PodBlocks] = {}
        self._publishing: set[str] = set()  # pods an event batch has come from (kept across clears)
        self._total = 0
        self._lock = threading.Lock()
        self.stats = IndexStats()

    # --- reads (the event loop) -------------------------------------------------
    def publishes(self, pod: str) -> bool:
        """Whether events have ever come from this pod: its index is exact, not a guess."""
        return pod in self._publishing

    def match(self, keys: list[int], pods: Iterable[str]) -> dict[str, int]:
        """Leading blocks of `keys` each pod holds (pods holding none are left out)."""
        out: dict[str, int] = {}
        if not keys:
            return out
        for pod in pods:
            state = self._pods.get(pod)
            if state is None:
                continue
            held = state.keys
            n = 0
            for k in keys:
                if k not in held:
                    break
                n += 1
            if n:
                out[pod] = n
        return out

    def blocks(self, pod: str) -> int:
        state = self._pods.get(pod)
        return len(state.keys) if state is not None else 0

    def size(self) -> int:
        return self._total

    # --- writes (the subscriber) ------------------------------------------------
    def apply(self, pod: str, model: str, batch: EventBatch) -> None:
        with self._lock:
            self._publishing.add(pod)
            for ev in batch.events:
                if isinstance(ev, BlockStored):
                    self._stored(pod, model, ev)
                elif isinstance(ev, BlockRemoved):
                    self._removed(pod, ev)
                elif isinstance(ev, AllBlocksCleared):
                    self._clear(pod)
                    self.stats.clears += 1

    def clear(self, pod: str) -> None:
        """Forget what the pod holds (a reset, a gap in its events); it still counts as publishing."""
        with self._lock:
            self._clear(pod)

    def forget(self, pod: str) -> None:
        """The pod left the pool."""
        with self._lock:
            self._clear(pod)
            self._publishing.discard(pod)

    def _clear(self, pod: str) -> None:
        state = self._pods.pop(pod, None)
        if state is not None:
            self._total -= len(state.keys)

    def _salt(self, ev: BlockStored) -> str:
        """A cache salt, which vLLM gives among the first block's extra keys (beside a LoRA name)."""
        if not ev.extra_keys or not isinstance(ev.extra_keys[0], list):
            return ""
        parts = [k for k in ev.extra_keys[0] if isinstance(k, str) and k != ev.lora_name]
        return "".join(parts)

    def _stored(self, pod: str, model: str, ev: BlockStored) -> None:
        if ev.medium not in GPU_MEDIA or not ev.block_hashes:
            self.stats.skipped_events += 1
            return
        state = self._pods.get(pod)
        if state is None:
            state = self._pods[pod] = PodBlocks()
        if ev.parent_block_hash is None:
            parent = root_key(ev.lora_name or model, self.hash_seed, self._salt(ev))
        else:
            found = state.last.get(ev.parent_block_hash)
            if found is None:  # its prefix was never seen or is gone: the chain cannot be followed
                self.stats.skipped_events += 1
                return
            parent = found
        keys = block_keys(parent, ev.token_ids, self.block_size)
        n_engine = len(ev.block_hashes)
        engine_size = ev.block_size if ev.block_size > 0 and ev.block_size * n_engine == len(ev.token_ids) \
            else max(1, len(ev.token_ids) // n_engine)
        per_engine: list[list[int]] = [[] for _ in range(n_engine)]
        last: list[int | None] = [None] * n_engine
        for i, key in enumerate(keys):
            j = min(n_engine - 1, ((i + 1) * self.block_size - 1) // engine_size)
            per_engine[j].append(key)
        running: int | None = None
        for j in range(n_engine):
            if per_engine[j]:
                running = per_engine[j][-1]
            last[j] = running
        for j, ehash in enumerate(ev.block_hashes):
            state.engine[ehash] = tuple(per_engine[j])
            state.engine.move_to_end(ehash)
            chain = last[j]
            if chain is not None:
                state.last[ehash] = chain
        for key in keys:
            if key in state.keys:
                state.keys.move_to_end(key)
            else:
                state.keys[key] = None
                self._total += 1
        self.stats.stored_blocks += len(keys)
        self._bound(state)

    def _removed(self, pod: str, ev: BlockRemoved) -> None:
        if ev.medium not in GPU_MEDIA:
            self.stats.skipped_events += 1
            return
        state = self._pods.get(pod)
        if state is None:
            return
        for ehash in ev.block_hashes:
            state.last.pop(ehash, None)
            for key in state.engine.pop(ehash, ()):
                if state.keys.pop(key, 0) is None:
                    self._total -= 1
                    self.stats.removed_blocks += 1

    def _bound(self, state: PodBlocks) -> None:
        while len(state.keys) > self.max_blocks_per_pod:
            state.keys.popitem(last=False)
            self._total -= 1
        while len(state.engine) > self.max_blocks_per_pod:
            ehash, _ = state.engine.popitem(last=False)
            state.last.pop(ehash, None)
        while self._total > self.max_blocks:
            largest = max(self._pods.values(), key=lambda s: len(s.keys))
            largest.keys.popitem(last=False)
            self._total -= 1
