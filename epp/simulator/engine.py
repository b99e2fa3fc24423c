"""A step-by-step model of a vLLM engine: continuous batching, paged KV cache, prefix caching, LoRA.

One loop per server runs engine steps, as vLLM's V1 scheduler does: every running
sequence that has finished prefill decodes one token; the rest of the step's token
budget (`max_num_batched_tokens`, chunked prefill) goes to prompts being prefilled,
oldest first. A step lasts what the latency model says, in real time (asyncio
sleeps), so latency seen through a gateway is the model's.

Latency model (milliseconds), fitted to a model of Llama-3.1-8B's shape measured on
an H100 (bench/calibration/, bf16, CUDA graphs for decode):

    step = max(D0 + D1*decodes + D2*kv_tokens_read,  P1*(prefill_tokens + decodes) + P2*sum(chunk^2))
           + LORA_LOAD for each adapter loaded this step

The first term is memory-bound decode (weights once per step, plus every running
sequence's KV cache); the second is compute-bound prefill (linear layers, plus
attention's quadratic part). Measured: decode 6.5 ms at batch 1, 10.2 ms at 128 x
512 tokens of context, 18.5 ms at 128 x 2048; prefill 26 ms for 1024 tokens, 106 ms
for 4096, 230 ms for 8192.

KV cache: `num_gpu_blocks` blocks of `block_size` (16) tokens. A sequence reserves
blocks for its prompt and output at admission (no preemption); full prompt blocks
are hashed (chained on the previous, seeded by the model) and stay cached after the
sequence ends, until least-recently-used eviction needs their space. Prefill skips
the cached leading blocks. Tokens are approximated as 4 characters, as the EPP does; with KV
events on, a token is 4 bytes of the prompt's UTF-8 (epp.kvevents.hashing.simulator_token_ids),
and a prompt given as token ids is hashed over those ids.

KV events: with a sink set (`Engine.events`), every block the prefix cache stores is reported as a
BlockStored (its hash, its parent's, its token ids), every eviction as a BlockRemoved, a reset as
AllBlocksCleared, in vLLM's format (epp/kvevents/events.py); the server publishes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import xxhash

from epp.kvevents.events import AllBlocksCleared, BlockRemoved, BlockStored, Event
from epp.kvevents.hashing import simulator_token_ids

CHARS_PER_TOKEN = 4


@dataclass
class EngineConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 8192
    num_gpu_blocks: int = 8192  # 131072 tokens: an H100 with an 8B model keeps roughly this much
    block_size: int = 16  # tokens
    # Latency model (ms), see the module docstring.
    decode_base_ms: float = 6.45
    decode_per_seq_ms: float = 0.0077
    decode_per_kv_token_ms: float = 4.23e-5
    prefill_per_token_ms: float = 0.0255
    prefill_quadratic_ms: float = 3.3e-7
    lora_load_ms: float = 25.0
    max_lora: int = 4
    time_scale: float = 1.0  # >1 runs everything slower (for slow machines), all ratios kept
    models: list[str] = field(default_factory=lambda: ["meta-llama/Llama-3.1-8B-Instruct"])
    lora_adapters: list[str] = field(default_factory=list)

    def step_ms(self, decodes: int, kv_tokens: int, prefill_tokens: int, chunk_sq: int) -> float:
        decode = self.decode_base_ms + self.decode_per_seq_ms * decodes + self.decode_per_kv_token_ms * kv_tokens
        compute = self.prefill_per_token_ms * (prefill_tokens + decodes) + self.prefill_quadratic_ms * chunk_sq
        return max(decode, compute)


def prompt_blocks(model: str, text: str, block_chars: int) -> list[int]:
    """Chained hashes of the prompt's full blocks (the engine caches only full blocks)."""
    data = text.encode()
    prev = xxhash.xxh64_intdigest(model.encode())
    out = []
    for start in range(0, len(data) - block_chars + 1, block_chars):
        prev = xxhash.xxh64_intdigest(data[start : start + block_chars], seed=prev)
        out.append(prev)
    return out


def token_blocks(model: str, tokens: list[int], block_size: int) -> list[int]:
    """Chained hashes of a token-id prompt's full blocks (each block's ids packed as uint32)."""
    prev = xxhash.xxh64_intdigest(model.encode())
    out = []
    for start in range(0, len(tokens) - block_size + 1, block_size):
        chunk = tokens[start : start + block_size]
        prev = xxhash.xxh64_intdigest(struct.pack(f"<{block_size}I", *(t & 0xFFFFFFFF for t in chunk)), seed=prev)
        out.append(prev)
    return out


class Sequence:
    """One request inside the engine. `tokens` yields once per generated token, then None."""

    __slots__ = ("arrived", "blocks", "cached_tokens", "done", "expected_uncached", "first_token_clock", "generated",
                 "lora", "max_tokens", "model", "prefill_left", "prompt_tokens", "reserved", "shared_blocks",
                 "submit_clock", "token_ids", "tokens")

    def __init__(self, model: str, lora: str | None, blocks: list[int], prompt_tokens: int, max_tokens: int) -> None:
        self.model, self.lora, self.blocks = model, lora, blocks
        self.prompt_tokens, self.max_tokens = prompt_tokens, max(1, max_tokens)
        self.cached_tokens = 0
        self.prefill_left = prompt_tokens
        self.expected_uncached = prompt_tokens  # while waiting: what prefill will cost, judged at submit
        self.generated = 0
        self.reserved = 0
        self.shared_blocks = 0  # leading prompt blocks found in the prefix cache at admission
        self.arrived = time.monotonic()
        self.submit_clock = 0.0  # the engine's modelled clock (ms) at submit and at the first token
        self.first_token_clock = 0.0
        self.token_ids: list[int] | None = None  # the prompt's tokens, kept only while KV events are on
        self.tokens: asyncio.Queue[int | None] = asyncio.Queue()
        self.done = False

    @property
    def context(self) -> int:
        return self.prompt_tokens + self.generated


class Engine:
    def __init__(self, cfg: EngineConfig) -> None:
        self.cfg = cfg
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.cache: OrderedDict[int, None] = OrderedDict()  # prefix-cache block hashes, LRU order
        self.reserved_blocks = 0  # blocks held by running sequences beyond their cached prefix
        self.active_loras: OrderedDict[str, None] = OrderedDict()
        self.prefix_queries = 0  # tokens looked up
        self.prefix_hits = 0  # tokens found cached
        self.requests_total = 0
        # Wall-clock seconds from submit to the first token, per request: the server's own share of
        # TTFT, without the gateway's or the client's (the routing benchmark reports both).
        self.server_ttfts: list[float] = []
        self.steps = 0
        self.clock_ms = 0.0  # modelled time elapsed, whatever time_scale is
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # Where KV events go (the server's publisher), or None: then nothing is recorded.
        self.events: Callable[[list[Event]], None] | None = None
        self._lora_ids = {name: i + 1 for i, name in enumerate(cfg.lora_adapters)}

    # --- what a router may look at (the oracle reads these directly) ----------
    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def kv_usage(self) -> float:
        """Blocks the running sequences hold / all blocks, as vLLM's block pool counts them: a cached
        prefix block that several sequences share is one block, and cached blocks no running sequence
        uses are free (evictable), not used."""
        shared: set[int] = set()
        own: set[int] = set()
        private = 0
        for s in self.running:
            n = s.shared_blocks
            shared.update(s.blocks[:n])
            own.update(s.blocks[n:])  # computed by this sequence: in its private count
            private += -(-s.context // self.cfg.block_size) - n
        return min(1.0, (private + len(shared - own)) / self.cfg.num_gpu_blocks)

    @property
    def waiting_loras(self) -> set[str]:
        return {s.lora for s in self.waiting if s.lora}

    def cached_blocks(self, blocks: list[int]) -> int:
        """Leading blocks the cache holds now (no LRU touch: a peek)."""
        n = 0
        for h in blocks:
            if h not in self.cache:
                break
            n += 1
        return n

    def queued_prefill_tokens(self) -> int:
        """Prefill work ahead of a new request: what waiting and prefilling sequences still need."""
        return sum(s.expected_uncached for s in self.waiting) + sum(s.prefill_left for s in self.running)

    # --- requests ------------------------------------------------------------
    def submit(self, model: str, prompt: str, max_tokens: int, token_ids: list[int] | None = None) -> Sequence:
        """A request: its prompt text, or (token-id prompts) the ids themselves."""
        lora = model if model in self.cfg.lora_adapters else None
        if token_ids is not None:
            tokens = max(1, len(token_ids))
            blocks = token_blocks(model, token_ids, self.cfg.block_size)
        else:
            tokens = max(1, len(prompt) // CHARS_PER_TOKEN)
            blocks = prompt_blocks(model, prompt, self.cfg.block_size * CHARS_PER_TOKEN)
        seq = Sequence(model, lora, blocks, tokens, max_tokens)
        if self.events is not None:
            seq.token_ids = token_ids if token_ids is not None else simulator_token_ids(prompt)
        need = -(-(seq.prompt_tokens + seq.max_tokens) // self.cfg.block_size)
        if need > self.cfg.num_gpu_blocks:
            raise ValueError(f"prompt and max_tokens need {need} KV blocks; the cache has {self.cfg.num_gpu_blocks}")
        seq.submit_clock = self.clock_ms
        seq.expected_uncached = max(1, tokens - self.cached_blocks(blocks) * self.cfg.block_size)
        self.waiting.append(seq)
        self._ensure_running()
        self._wake.set()
        return seq

    def abort(self, seq: Sequence) -> None:
        """The client went away: free what the sequence holds."""
        if seq.done:
            return
        if seq in self.waiting:
            self.waiting.remove(seq)
            seq.done = True
        elif seq in self.running:
            self._finish(seq)

    async def close(self) -> None:
        """Stop the engine loop (the server is shutting down)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def _ensure_running(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._loop())

    # --- the engine loop -----------------------------------------------------
    def _admit(self) -> float:
        """Move waiting sequences into the batch while slots, KV blocks and LoRA slots allow; returns load ms."""
        c = self.cfg
        load_ms = 0.0
        skipped: list[Sequence] = []
        while self.waiting and len(self.running) < c.max_num_seqs:
            seq = self.waiting[0]
            if seq.lora and seq.lora not in self.active_loras:
                in_use = {s.lora for s in self.running if s.lora}
                if len(self.active_loras) >= c.max_lora:
                    victim = next((a for a in self.active_loras if a not in in_use), None)
                    if victim is None:  # every adapter slot busy: this one waits, others may go
                        skipped.append(self.waiting.popleft())
                        continue
                    del self.active_loras[victim]
                self.active_loras[seq.lora] = None
                load_ms += c.lora_load_ms
            cached = 0
            for h in seq.blocks:
                if h not in self.cache:
                    break
                cached += 1
            need = -(-(seq.prompt_tokens + seq.max_tokens) // c.block_size) - cached
            if self.reserved_blocks + need > c.num_gpu_blocks:
                break  # KV cache full: wait for a sequence to finish
            self.waiting.popleft()
            for h in seq.blocks[:cached]:
                self.cache.move_to_end(h)
            seq.cached_tokens = min(cached * c.block_size, seq.prompt_tokens - 1)
            seq.shared_blocks = cached
            seq.prefill_left = seq.prompt_tokens - seq.cached_tokens
            seq.reserved = need
            self.reserved_blocks += need
            self.prefix_queries += seq.prompt_tokens
            self.prefix_hits += seq.cached_tokens
            if seq.lora:
                self.active_loras.move_to_end(seq.lora)
            self.running.append(seq)
        self.waiting.extendleft(reversed(skipped))
        return load_ms

    def _finish(self, seq: Sequence) -> None:
        seq.done = True
        self.running.remove(seq)
        self.reserved_blocks -= seq.reserved
        seq.tokens.put_nowait(None)

    def _cache_prompt(self, seq: Sequence) -> None:
        events: list[Event] | None = [] if self.events is not None else None
        run_start = -1  # first block of a run of newly stored blocks
        for i, h in enumerate(seq.blocks):
            new = h not in self.cache
            if events is not None:
                if new and run_start < 0:
                    run_start = i
                elif not new and run_start >= 0:
                    events.append(self._stored(seq, run_start, i))
                    run_start = -1
            self.cache[h] = None
            self.cache.move_to_end(h)
        if events is not None and run_start >= 0:
            events.append(self._stored(seq, run_start, len(seq.blocks)))
        # Cached blocks live in the space running sequences do not hold.
        room = max(0, self.cfg.num_gpu_blocks - self.reserved_blocks)
        evicted = []
        while len(self.cache) > room:
            evicted.append(self.cache.popitem(last=False)[0])
        if events is not None and self.events is not None:
            if evicted:
                events.append(BlockRemoved(evicted))
            if events:
                self.events(events)

    def _stored(self, seq: Sequence, start: int, end: int) -> BlockStored:
        bs = self.cfg.block_size
        ids = seq.token_ids or []
        return BlockStored(seq.blocks[start:end], seq.blocks[start - 1] if start else None,
                           ids[start * bs : end * bs], bs, self._lora_ids.get(seq.lora or ""),
                           "GPU", seq.lora)

    def reset_prefix_cache(self) -> None:
        """Drop every cached block nobody runs on (vLLM's /reset_prefix_cache)."""
        self.cache.clear()
        if self.events is not None:
            self.events([AllBlocksCleared()])

    async def _loop(self) -> None:
        c = self.cfg
        while True:
            if not self.running and not self.waiting:
                self._wake.clear()
                await self._wake.wait()
            load_ms = self._admit()
            if not self.running:
                self._wake.clear()
                await self._wake.wait()  # blocked on KV or LoRA: wait for a change
                continue
            budget = c.max_num_batched_tokens
            decodes = [s for s in self.running if s.prefill_left == 0]
            budget -= len(decodes)
            chunks: list[tuple[Sequence, int]] = []
            for s in self.running:
                if s.prefill_left and budget > 0:
                    take = min(s.prefill_left, budget)
                    chunks.append((s, take))
                    budget -= take
            kv = sum(s.context for s in decodes)
            prefill = sum(t for _, t in chunks)
            ms = c.step_ms(len(decodes), kv, prefill, sum(t * t for _, t in chunks)) + load_ms
            await asyncio.sleep(ms * c.time_scale / 1000)
            self.steps += 1
            self.clock_ms += ms
            for s in decodes:
                if s.done:
                    continue
                s.generated += 1
                s.tokens.put_nowait(s.generated)
                if s.generated >= s.max_tokens:
                    self._finish(s)
            for s, take in chunks:
                if s.done:
                    continue
                s.prefill_left -= take
                if s.prefill_left == 0:  # the prefill step samples the first token
                    self._cache_prompt(s)
                    self.requests_total += 1
                    s.generated = 1
                    s.first_token_clock = self.clock_ms
                    self.server_ttfts.append(time.monotonic() - s.arrived)
                    s.tokens.put_nowait(1)
                    if s.max_tokens == 1:
                        self._finish(s)

    def metrics_text(self, model: str) -> str:
        c = self.cfg
        labels = f'engine="0",model_name="{model}"'
        lines = [
            "# HELP vllm:num_requests_running Number of requests in model execution batches.",
            "# TYPE vllm:num_requests_running gauge",
            f"vllm:num_requests_running{{{labels}}} {len(self.running)}",
            "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.",
            "# TYPE vllm:num_requests_waiting gauge",
            f"vllm:num_requests_waiting{{{labels}}} {len(self.waiting)}",
            "# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.",
            "# TYPE vllm:kv_cache_usage_perc gauge",
            f"vllm:kv_cache_usage_perc{{{labels}}} {self.kv_usage}",
            "# HELP vllm:prefix_cache_queries_total Prefix cache queries, in terms of number of queried tokens.",
            "# TYPE vllm:prefix_cache_queries_total counter",
            f"vllm:prefix_cache_queries_total{{{labels}}} {self.prefix_queries}",
            "# HELP vllm:prefix_cache_hits_total Prefix cache hits, in terms of number of cached tokens.",
            "# TYPE vllm:prefix_cache_hits_total counter",
            f"vllm:prefix_cache_hits_total{{{labels}}} {self.prefix_hits}",
            "# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig",
            "# TYPE vllm:cache_config_info gauge",
            f'vllm:cache_config_info{{block_size="{c.block_size}",num_gpu_blocks="{c.num_gpu_blocks}"}} 1.0',
        ]
        if c.lora_adapters:
            running = ",".join(self.active_loras)
            waiting = ",".join(sorted(self.waiting_loras))
            lines += [
                "# HELP vllm:lora_requests_info Running stats on lora requests.",
                "# TYPE vllm:lora_requests_info gauge",
                f'vllm:lora_requests_info{{max_lora="{c.max_lora}",running_lora_adapters="{running}",'
                f'waiting_lora_adapters="{waiting}"}} {time.time()}',
            ]
        return "\n".join(lines) + "\n"
