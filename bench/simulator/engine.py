"""A small model of a vLLM server's engine: batch slots, a waiting queue, a prefix cache, LoRA slots.

Time is real (asyncio sleeps), so latency seen through the gateway is what the
model says: prefill costs per uncached token, decode costs per output token and
grows with the batch. Tokens are approximated as 4 characters, as the EPP does.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import xxhash

CHARS_PER_TOKEN = 4


@dataclass
class EngineConfig:
    max_num_seqs: int = 8
    num_gpu_blocks: int = 4096
    block_size: int = 16  # tokens
    prefill_ms_per_token: float = 0.02
    decode_ms_per_token: float = 1.0
    decode_batch_penalty: float = 0.05  # each extra running request slows a decode step by 5%
    max_lora: int = 2
    lora_load_ms: float = 20.0
    models: list[str] = field(default_factory=lambda: ["meta-llama/Llama-3.1-8B-Instruct"])
    lora_adapters: list[str] = field(default_factory=list)


def prompt_blocks(model: str, text: str, block_chars: int) -> list[int]:
    """Chained hashes of the prompt's full blocks (the engine caches only full blocks)."""
    data = text.encode()
    prev = xxhash.xxh64_intdigest(model.encode())
    out = []
    for start in range(0, len(data) - block_chars + 1, block_chars):
        prev = xxhash.xxh64_intdigest(data[start : start + block_chars], seed=prev)
        out.append(prev)
    return out


class Engine:
    def __init__(self, cfg: EngineConfig) -> None:
        self.cfg = cfg
        self.slots = asyncio.Semaphore(cfg.max_num_seqs)
        self.waiting = 0
        self.running = 0
        self.blocks_in_use = 0
        self.cache: OrderedDict[int, None] = OrderedDict()  # prefix-cache block hashes, LRU
        self.active_loras: OrderedDict[str, None] = OrderedDict()
        self.waiting_loras: dict[str, int] = {}
        self.prefix_queries = 0  # tokens looked up
        self.prefix_hits = 0  # tokens found cached
        self.requests_total = 0
        self.started_at = time.time()

    # --- cache ---------------------------------------------------------------
    def cached_prefix_blocks(self, blocks: list[int]) -> int:
        n = 0
        for h in blocks:
            if h not in self.cache:
                break
            self.cache.move_to_end(h)
            n += 1
        return n

    def insert_blocks(self, blocks: list[int]) -> None:
        for h in blocks:
            self.cache[h] = None
            self.cache.move_to_end(h)
        while len(self.cache) > self.cfg.num_gpu_blocks:
            self.cache.popitem(last=False)

    @property
    def kv_usage(self) -> float:
        return min(1.0, self.blocks_in_use / self.cfg.num_gpu_blocks)

    # --- a request -----------------------------------------------------------
    async def admit(self, model: str) -> None:
        """Wait for a batch slot (and a LoRA slot, for adapters)."""
        self.waiting += 1
        is_lora = model in self.cfg.lora_adapters
        if is_lora:
            self.waiting_loras[model] = self.waiting_loras.get(model, 0) + 1
        try:
            await self.slots.acquire()
        finally:
            self.waiting -= 1
            if is_lora:
                self.waiting_loras[model] -= 1
                if not self.waiting_loras[model]:
                    del self.waiting_loras[model]
        self.running += 1
        if is_lora:
            if model not in self.active_loras:
                if len(self.active_loras) >= self.cfg.max_lora:
                    self.active_loras.popitem(last=False)
                await asyncio.sleep(self.cfg.lora_load_ms / 1000)
                self.active_loras[model] = None
            self.active_loras.move_to_end(model)

    def release(self, blocks_held: int) -> None:
        self.running -= 1
        self.blocks_in_use -= blocks_held
        self.slots.release()

    async def prefill(self, model: str, prompt: str) -> tuple[int, int, int]:
        """Returns (prompt tokens, cached tokens, blocks held)."""
        tokens = max(1, len(prompt) // CHARS_PER_TOKEN)
        block_chars = self.cfg.block_size * CHARS_PER_TOKEN
        blocks = prompt_blocks(model, prompt, block_chars)
        cached = self.cached_prefix_blocks(blocks)
        cached_tokens = cached * self.cfg.block_size
        self.prefix_queries += tokens
        self.prefix_hits += cached_tokens
        held = -(-tokens // self.cfg.block_size)
        self.blocks_in_use += held
        uncached = max(0, tokens - cached_tokens)
        await asyncio.sleep(uncached * self.cfg.prefill_ms_per_token / 1000)
        self.insert_blocks(blocks)
        self.requests_total += 1
        return tokens, cached_tokens, held

    def decode_step_seconds(self) -> float:
        c = self.cfg
        return c.decode_ms_per_token * (1 + c.decode_batch_penalty * max(0, self.running - 1)) / 1000

    def metrics_text(self, model: str) -> str:
        c = self.cfg
        labels = f'model_name="{model}"'
        running = ",".join(self.active_loras)
        waiting = ",".join(self.waiting_loras)
        lines = [
            "# HELP vllm:num_requests_running Number of requests in model execution batches.",
            "# TYPE vllm:num_requests_running gauge",
            f"vllm:num_requests_running{{{labels}}} {self.running}",
            "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.",
            "# TYPE vllm:num_requests_waiting gauge",
            f"vllm:num_requests_waiting{{{labels}}} {self.waiting}",
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
            lines += [
                "# HELP vllm:lora_requests_info Running stats on lora requests.",
                "# TYPE vllm:lora_requests_info gauge",
                f'vllm:lora_requests_info{{max_lora="{c.max_lora}",running_lora_adapters="{running}",'
                f'waiting_lora_adapters="{waiting}"}} {time.time()}',
            ]
        return "\n".join(lines) + "\n"
