"""Seeded, reproducible request streams for the routing benchmark.

Each workload is a list of timed requests (Poisson arrivals at `rate` per second for
`duration` seconds) built from one seed, so every router sees exactly the same
requests at the same offsets. Text is words drawn from a fixed vocabulary; a token
is about 4 characters (as both the simulator and epp approximate).

- shared-prefix: many users behind a few long system prompts (high prefix reuse)
- multi-turn:    chats that come back with their whole history, turn after turn
- rag:           long documents reused across questions, popular ones more often (Zipf)
- lora:          many LoRA adapters, popular ones more often, more than a server holds at once
- mixed-priority: shared-prefix traffic where half is sheddable (objective `batch`, priority -1)
- random:        unrelated prompts, no reuse (the control: only load balancing matters)
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

BASE_MODEL = "meta-llama/Llama-3.1-8B-Instruct"
_VOCAB = [
    "model",
    "server",
    "cache",
    "prefix",
    "token",
    "route",
    "gateway",
    "request",
    "latency",
    "batch",
    "queue",
    "memory",
    "adapter",
    "document",
    "question",
    "answer",
    "system",
    "user",
    "assistant",
    "the",
    "a",
    "of",
    "to",
    "and",
    "in",
    "is",
    "for",
    "on",
    "with",
    "as",
    "by",
    "at",
    "from",
    "this",
    "that",
    "it",
    "be",
    "are",
    "was",
    "were",
    "has",
    "have",
    "will",
    "can",
    "should",
    "would",
    "could",
    "may",
    "might",
    "must",
]
SHEDDABLE_OBJECTIVE = "batch"


@dataclass
class TimedRequest:
    at: float  # seconds after the start
    path: str
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)
    tag: str = ""  # e.g. the objective, for per-class results; "bypass": sent past the router
    stage: int = 0  # the index of its load stage, for staged workloads


@dataclass
class Workload:
    name: str
    requests: list[TimedRequest]
    lora_adapters: list[str] = field(default_factory=list)
    description: str = ""


def words(rng: random.Random, tokens: int) -> str:
    """About `tokens` tokens of text (4 characters each)."""
    out: list[str] = []
    size = 0
    while size < tokens * 4:
        w = rng.choice(_VOCAB)
        out.append(w)
        size += len(w) + 1
    return " ".join(out)


def _arrivals(rng: random.Random, rate: float, duration: float) -> list[float]:
    t, out = 0.0, []
    while True:
        t += rng.expovariate(rate)
        if t >= duration:
            return out
        out.append(t)


def _zipf(rng: random.Random, n: int, s: float = 1.1) -> int:
    weights = [1 / (k + 1) ** s for k in range(n)]
    return rng.choices(range(n), weights=weights)[0]


def _chat(system: str, user: str, max_tokens: int, model: str = BASE_MODEL) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def shared_prefix(
    rate: float,
    duration: float,
    seed: int,
    *,
    prompts: int = 24,
    prompt_tokens: int = 2000,
    question_tokens: int = 40,
    max_tokens: int = 24,
    sheddable_share: float = 0.0,
) -> Workload:
    rng = random.Random(seed)
    systems = [f"You are assistant #{i}. " + words(rng, prompt_tokens) for i in range(prompts)]
    reqs = []
    for at in _arrivals(rng, rate, duration):
        body = _chat(rng.choice(systems), words(rng, question_tokens), max_tokens)
        tag, headers = "", {}
        if sheddable_share and rng.random() < sheddable_share:
            tag, headers = SHEDDABLE_OBJECTIVE, {"x-gateway-inference-objective": SHEDDABLE_OBJECTIVE}
        reqs.append(TimedRequest(at, "/v1/chat/completions", body, headers, tag))
    name = "mixed-priority" if sheddable_share else "shared-prefix"
    return Workload(
        name,
        reqs,
        description=f"{prompts} system prompts of ~{prompt_tokens} tokens, "
        f"~{question_tokens}-token questions, {max_tokens} output tokens",
    )


def multi_turn(
    rate: float,
    duration: float,
    seed: int,
    *,
    turns: int = 5,
    think_s: float = 3.0,
    system_tokens: int = 600,
    turn_tokens: int = 150,
    max_tokens: int = 24,
) -> Workload:
    """`rate` is requests per second overall; conversations start at rate / turns."""
    rng = random.Random(seed)
    reqs = []
    answer = " ".join(
        ("the", "model", "routes", "tokens", "quickly", "and", "prefix", "cache", "hits", "well")[i % 10]
        for i in range(max_tokens)
    )  # what the simulator answers
    for start in _arrivals(rng, rate / turns, duration):
        messages = [{"role": "system", "content": words(rng, system_tokens)}]
        for k in range(turns):
            at = start + k * think_s * (0.5 + rng.random())
            if at >= duration:
                break
            messages.append({"role": "user", "content": words(rng, turn_tokens)})
            body = {
                "model": BASE_MODEL,
                "messages": [dict(m) for m in messages],
                "max_tokens": max_tokens,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            reqs.append(TimedRequest(at, "/v1/chat/completions", body))
            messages.append({"role": "assistant", "content": answer})
    reqs.sort(key=lambda r: r.at)
    return Workload(
        "multi-turn",
        reqs,
        description=f"{turns}-turn chats, ~{system_tokens}-token system prompt, "
        f"~{turn_tokens} tokens a turn, history resent each turn",
    )


def rag(
    rate: float, duration: float, seed: int, *, documents: int = 32, doc_tokens: int = 3000, max_tokens: int = 24
) -> Workload:
    rng = random.Random(seed)
    docs = [f"Document {i}.\n" + words(rng, doc_tokens) for i in range(documents)]
    reqs = [
        TimedRequest(
            at,
            "/v1/completions",
            {
                "model": BASE_MODEL,
                "prompt": docs[_zipf(rng, documents)] + "\nQuestion: " + words(rng, 30) + "\nAnswer:",
                "max_tokens": max_tokens,
                "stream": True,
                "stream_options": {"include_usage": True},
            },
        )
        for at in _arrivals(rng, rate, duration)
    ]
    return Workload("rag", reqs, description=f"{documents} documents of ~{doc_tokens} tokens, Zipf popularity")


def lora(
    rate: float, duration: float, seed: int, *, adapters: int = 16, prompt_tokens: int = 300, max_tokens: int = 24
) -> Workload:
    rng = random.Random(seed)
    names = [f"adapter-{i:02d}" for i in range(adapters)]
    reqs = [
        TimedRequest(
            at,
            "/v1/completions",
            {
                "model": names[_zipf(rng, adapters)],
                "prompt": words(rng, prompt_tokens),
                "max_tokens": max_tokens,
                "stream": True,
                "stream_options": {"include_usage": True},
            },
        )
        for at in _arrivals(rng, rate, duration)
    ]
    return Workload(
        "lora", reqs, lora_adapters=names, description=f"{adapters} adapters (Zipf), ~{prompt_tokens}-token prompts"
    )


def random_prompts(
    rate: float, duration: float, seed: int, *, prompt_tokens: int = 600, max_tokens: int = 24
) -> Workload:
    rng = random.Random(seed)
    reqs = [
        TimedRequest(
            at,
            "/v1/completions",
            {
                "model": BASE_MODEL,
                "prompt": words(rng, int(prompt_tokens * (0.5 + rng.random()))),
                "max_tokens": max_tokens,
                "stream": True,
                "stream_options": {"include_usage": True},
            },
        )
        for at in _arrivals(rng, rate, duration)
    ]
    return Workload("random", reqs, description=f"unrelated prompts of ~{prompt_tokens} tokens")


BUILDERS = {
    "shared-prefix": shared_prefix,
    "multi-turn": multi_turn,
    "rag": rag,
    "lora": lora,
    # Overload on purpose (2.5x the rate): half the traffic is sheddable, and shedding it is the point.
    "mixed-priority": lambda rate, duration, seed: shared_prefix(rate * 2.5, duration, seed, sheddable_share=0.5),
    "random": random_prompts,
}


def build(name: str, rate: float, duration: float, seed: int) -> Workload:
    if name not in BUILDERS:
        raise ValueError(f"unknown workload {name!r}; known: {', '.join(BUILDERS)}")
    return BUILDERS[name](rate, duration, seed)


# inference-perf's shared_prefix data as GIE's prefix-cache-aware benchmark publishes it
# (benchmarking/prefix-cache-aware, "short questions, many system prompts"): a Poisson ladder of
# rates, each (rate req/s, duration s); the first stage is its warm-up.
UPSTREAM_STAGES = ((15, 50), (10, 20), (15, 20), (20, 38), (25, 30), (30, 25), (35, 21), (40, 38), (45, 36),
                   (50, 30), (55, 27), (60, 25))


def upstream_shared_prefix(
    seed: int,
    *,
    stages: tuple[tuple[float, float], ...] = UPSTREAM_STAGES,
    scale: float = 1.0,
    groups: int = 150,
    prompts_per_group: int = 5,
    system_tokens: int = 6000,
    question_tokens: int = 1200,
    output_tokens: int = 1000,
) -> Workload:
    """groups x prompts_per_group fixed prompts (a group's system prompt + one of its questions), each
    request one of them at random, Poisson within each stage; `scale` multiplies every token count."""
    rng = random.Random(seed)
    sys_t, q_t, out_t = (max(1, round(n * scale)) for n in (system_tokens, question_tokens, output_tokens))
    prompts = []
    for g in range(groups):
        system = f"System prompt {g}. " + words(rng, sys_t)
        prompts.append([system + f"\nQuestion {p}: " + words(rng, q_t) for p in range(prompts_per_group)])
    reqs, offset = [], 0.0
    for k, (rate, duration) in enumerate(stages):
        for at in _arrivals(rng, rate, duration):
            body = {"model": BASE_MODEL, "prompt": rng.choice(rng.choice(prompts)), "max_tokens": out_t,
                    "stream": True, "stream_options": {"include_usage": True}}
            reqs.append(TimedRequest(offset + at, "/v1/completions", body, stage=k))
        offset += duration
    ladder = ", ".join(f"{r:g}/s x {d:g} s" for r, d in stages)
    return Workload("upstream-shared-prefix", reqs, description=(
        f"inference-perf shared_prefix: {groups} groups x {prompts_per_group} prompts, system prompt {sys_t} tokens, "
        f"question {q_t}, output {out_t} (token counts x {scale:g} of upstream's 6000/1200/1000); Poisson stages "
        f"{ladder}"))
