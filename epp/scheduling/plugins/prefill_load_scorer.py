"""prefill-load-scorer: prefer the endpoint that reaches this request's first token soonest.

Time to first token is dominated by prefill: the prompt tokens an endpoint must
compute before it can start this request, which are (a) the uncached tokens of the
requests already sent there that have not started streaming, and (b) this request's
own tokens that the endpoint does not hold in its prefix cache. The EPP knows (a)
exactly for its own traffic, with no scrape delay: it adds a request's estimated
uncached tokens when it sends the pick and removes them at the response's first byte
(or at its end, when the proxy does not send response bodies). (b) comes from the
prefix-cache scorer's index.

(c) When the request names a LoRA adapter the endpoint does not hold, the load
comes first: `loraLoadTokens`, default 2048. A 25 ms load is about 1000 prompt
tokens of an 8B model's prefill on an H100, and the load also stalls every request
in the endpoint's batch, hence twice that. An endpoint holds the adapter if its
last scrape shows it running or waiting, or if epp sent it a request for that
adapter since that scrape.
Without (c) the adapter's first requests, landing while every endpoint still has a
free slot, scatter it over the pool; each endpoint then spends its slots on copies
of the popular adapters and the rest keep being loaded and evicted.

(d) With `scrapedLoad: true`, the server's own scrape enters (a): epp cannot see requests
other clients send straight to a server, but the server's queue shows them. The requests the
scrape shows beyond epp's own in flight there when it was taken (waiting + running - epp's count
then) are other clients'; each waiting one adds tokens per request, each running one
`runningRequestTokens`. epp's requests that the scrape also shows are not counted twice, nor are
those that ended since the scrape taken for other clients', and epp's exact count still moves the
cost between two scrapes. Tokens per request is a moving average of the prompts epp routes (a
waiting request's prompt has not been prefilled). KV-cache use above `kvCacheThreshold` adds up
to `kvCacheTokens` at 100%, scaled by the share of the prompt the server would newly store: what a
new prompt there evicts of cached prefixes, or preempts; a prefix holder stores little of it, so
KV pressure never pushes a request off its cache. An endpoint with unknown or stale metrics costs
`unknownMetricsTokens`: busy, never idle. All in tokens, not min-max normalised per signal, so a
prefix holder keeps winning while its real backlog is smaller than the prefill it saves.

(e) With `serverSpeed: true`, a server that takes longer per token of work than the pool's
median (epp times its own streamed requests, `epp.scheduling.server_speed`) has its cost, plus
`stepTokens` for the engine step every first token takes, scaled by how much longer: in time, at
the pool's median speed, still counted in tokens. A slower server that alone holds the prompt's
prefix also pays its extra time for the requests that prefix is forecast to get
(`PrefixDemand`), so a prefix in demand moves to a fast server once and stays there.

Cost = (a) + (b) + (c), in tokens (then (e)). Score = 1 - (cost - cheapest) / max(spread, tokenScale),
so the cheapest endpoint scores 1, and differences smaller than `tokenScale` tokens
stay small rather than being stretched to the full 0..1 range.

Without it, a prefix holder busy prefilling another long prompt still wins on cache
affinity, and every request that follows waits behind that prefill; the scraped
queue length cannot show it, since a request being prefilled is already running.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from epp.datastore import Endpoint
from epp.errors import ConfigError
from epp.requests import InferenceRequest
from epp.scheduling.framework import (
    CycleState,
    EndpointsChanged,
    Plugin,
    PreRequest,
    ResponseComplete,
    ResponseStarted,
    SchedulingResult,
    Scorer,
)
from epp.scheduling.params import Params
from epp.scheduling.plugins.prefix_cache_scorer import AVERAGE_CHARS_PER_TOKEN, PrefixCacheScorer
from epp.scheduling.server_speed import PrefixDemand, ServerSpeeds

_COST_KEY = "prefill-load.cost"
_MAX_KNOWN_ADAPTERS = 4096


class PrefillLoadScorer(Scorer, PreRequest, ResponseStarted, ResponseComplete, EndpointsChanged):
    type_name = "prefill-load-scorer"

    def __init__(self, name: str = "", *, prefix_scorer: str = "prefix-cache-scorer", token_scale: int = 1024,
                 occupancy_tokens: int = 512, lora_load_tokens: int = 2048, scraped_load: bool = False,
                 running_request_tokens: int = 256, kv_cache_threshold: float = 0.8, kv_cache_tokens: int = 4096,
                 unknown_metrics_tokens: int = 8192, server_speed: bool = False, step_tokens: int = 512,
                 speed_tolerance: float = 0.5, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(name)
        self.clock = clock
        self.speeds = ServerSpeeds(step_tokens, speed_tolerance, clock) if server_speed else None
        self.demand = PrefixDemand(clock)
        self.scraped_load = scraped_load
        self.running_request_tokens = running_request_tokens
        self.kv_cache_threshold = kv_cache_threshold
        self.kv_cache_tokens = kv_cache_tokens
        self.unknown_metrics_tokens = unknown_metrics_tokens
        self.tokens_per_request = float(token_scale)  # moving average of routed prompts' tokens
        self.prefix_scorer_name = prefix_scorer
        self.token_scale = token_scale
        self.occupancy_tokens = occupancy_tokens
        self.lora_load_tokens = lora_load_tokens
        self.prefix: PrefixCacheScorer | None = None
        self.backlog: dict[str, int] = {}  # hostport -> uncached prompt tokens not yet prefilled
        # id(request) -> (hostport, its tokens in the backlog, tokens of work ahead of its first token, sent at)
        self._pending: dict[int, tuple[str, int, int, float | None]] = {}
        # hostport -> {adapter: when epp last sent it there}; trusted only until the next scrape.
        self._adapters_sent: dict[str, dict[str, float]] = {}
        self._known_adapters: dict[str, None] = {}  # names scrapes have shown as adapters, oldest first

    @classmethod
    def from_parameters(cls, name: str, params: Params) -> Plugin:
        prefix = params.str("prefixScorer", "prefix-cache-scorer")
        scale = params.int("tokenScale", 1024, minimum=1)
        occupancy = params.int("occupancyTokens", 512, minimum=0)
        lora_load = params.int("loraLoadTokens", 2048, minimum=0)
        scraped = params.bool("scrapedLoad", False)
        if not scraped:
            for key in ("runningRequestTokens", "kvCacheThreshold", "kvCacheTokens", "unknownMetricsTokens"):
                if params.has(key):
                    raise ConfigError(f"{name}: {key} is used only with scrapedLoad: true")
        running = params.int("runningRequestTokens", 256, minimum=0)
        kv_threshold = params.float("kvCacheThreshold", 0.8, minimum=0.0, maximum=1.0)
        kv_tokens = params.int("kvCacheTokens", 4096, minimum=0)
        unknown = params.int("unknownMetricsTokens", 8192, minimum=0)
        speed = params.bool("serverSpeed", False)
        if not speed:
            for key in ("stepTokens", "speedTolerance"):
                if params.has(key):
                    raise ConfigError(f"{name}: {key} is used only with serverSpeed: true")
        step = params.int("stepTokens", 512, minimum=0)
        tolerance = params.float("speedTolerance", 0.5, minimum=0.0)
        params.done()
        return cls(name, prefix_scorer=prefix, token_scale=scale, occupancy_tokens=occupancy,
                   lora_load_tokens=lora_load, scraped_load=scraped, running_request_tokens=running,
                   kv_cache_threshold=kv_threshold, kv_cache_tokens=kv_tokens, unknown_metrics_tokens=unknown,
                   server_speed=speed, step_tokens=step, speed_tolerance=tolerance)

    def bind(self, lookup: Callable[[str], Plugin | None]) -> None:
        plugin = lookup(self.prefix_scorer_name)
        if plugin is not None and not isinstance(plugin, PrefixCacheScorer):
            raise ConfigError(f"{self.name}: prefixScorer {self.prefix_scorer_name!r} is not a prefix-cache-scorer")
        self.prefix = plugin  # None: no cache knowledge, every endpoint must prefill the whole prompt

    def costs(self, state: CycleState, request: InferenceRequest, endpoints: list[Endpoint]) -> list[int]:
        return self._costs(state, request, endpoints)[0]

    def _costs(
        self, state: CycleState, request: InferenceRequest, endpoints: list[Endpoint]
    ) -> tuple[list[int], list[int], list[int]]:
        """Each endpoint's cost, the tokens it would have to prefill for this request itself, and the
        prefill backlog ahead of them."""
        cached = state.data.get(_COST_KEY)
        if cached is not None and cached[0] is endpoints:
            return cached[1], cached[2], cached[3]
        tokens = len(request.prompt) // AVERAGE_CHARS_PER_TOKEN
        matched: dict[str, int] = {}
        block_tokens = 1
        if self.prefix is not None and tokens:
            matched = self.prefix.matched_blocks(state, request, endpoints)
            block_tokens = self.prefix.block_tokens
        if matched:
            depth = matched.get
            uncached = [max(0, tokens - depth(ep.hostport, 0) * block_tokens) for ep in endpoints]
        else:
            uncached = [tokens] * len(endpoints)
        backlogs = self._backlogs(state, endpoints)
        costs = [b + u for b, u in zip(backlogs, uncached, strict=True)]
        if self.scraped_load and self.kv_cache_tokens and tokens:
            # KV pressure costs in proportion to what the request would newly store there: the blocks
            # it evicts. A prefix holder stores little and keeps its requests under pressure, where a
            # flat penalty would push them onto servers that must store (and evict) the whole prompt.
            costs = [c + p * u // tokens
                     for c, p, u in zip(costs, self._kv_pressure(state, endpoints), uncached, strict=True)]
        if self.prefix is not None and self.occupancy_tokens and tokens:
            # Spread new prefixes over the pool's cache: the larger a server's share of the index, the
            # more a new copy there is likely to evict what another request will want. Only the part
            # of the prompt the server would newly store counts, so a prefix holder pays nothing.
            index = self.prefix.index
            blocks = [index.blocks(ep.hostport) for ep in endpoints]
            most = max(blocks)
            if most:
                costs = [c + self.occupancy_tokens * b * u // (most * tokens)
                         for c, b, u in zip(costs, blocks, uncached, strict=True)]
        if self.lora_load_tokens:
            held = self._holds_adapter(state, request.target_model or request.model, endpoints)
            if held is not None:
                load = self.lora_load_tokens
                costs = [c if h else c + load for c, h in zip(costs, held, strict=True)]
        if self.speeds is not None and self.speeds.relative:
            costs = self.speeds.apply((ep.hostport for ep in endpoints), costs)
            if matched:
                costs = self._slow_holders_pay_demand(state, request, endpoints, matched, uncached, costs)
        state.data[_COST_KEY] = (endpoints, costs, uncached, backlogs)
        return costs, uncached, backlogs

    def _slow_holders_pay_demand(self, state: CycleState, request: InferenceRequest, endpoints: list[Endpoint],
                                 matched: dict[str, int], uncached: list[int], costs: list[int]) -> list[int]:
        """A server slower than the pool that holds more of the prompt than any server at the pool's
        speed pays, besides this request, the extra time of the prefix's coming requests there."""
        assert self.prefix is not None
        assert self.speeds is not None
        relative = self.speeds.relative
        depth = [matched.get(ep.hostport, 0) for ep in endpoints]
        fast = max((d for ep, d in zip(endpoints, depth, strict=True) if relative.get(ep.hostport, 1.0) <= 1.0),
                   default=0)
        hashes = self.prefix.hashes(state, request)
        step = self.speeds.step_tokens
        out = costs
        for i, ep in enumerate(endpoints):
            r, d = relative.get(ep.hostport, 1.0), depth[i]
            if r > 1.0 and d > fast:
                if out is costs:
                    out = list(costs)
                out[i] += int(self.demand.requests(hashes[d - 1]) * (r - 1.0) * (step + uncached[i]))
        return out

    def _backlogs(self, state: CycleState, endpoints: list[Endpoint]) -> list[int]:
        """Each endpoint's prefill work ahead of a new request, in tokens: epp's own, and with
        `scrapedLoad` what the server's scrape shows of other clients' requests."""
        backlog = self.backlog
        own = [backlog.get(ep.hostport, 0) for ep in endpoints]
        if not self.scraped_load:
            return own
        per_request = self.tokens_per_request
        out = []
        unknown, running_tokens = self.unknown_metrics_tokens, self.running_request_tokens
        for m, mine in zip(state.metrics_of(endpoints), own, strict=True):
            if m is None:
                out.append(mine + unknown)
                continue
            # The scrape's requests beyond epp's own in flight there at the time are other clients';
            # taken as waiting first, since a queue is what delays a new request most. Against the
            # count at scrape time, not now: epp's requests that ended since are not others' queue.
            waiting = m.waiting
            unseen = waiting + m.running - m.own_inflight
            if unseen <= 0:
                out.append(mine)
                continue
            unseen_waiting = waiting if waiting < unseen else unseen
            out.append(mine + int(unseen_waiting * per_request) + (unseen - unseen_waiting) * running_tokens)
        return out

    def _kv_pressure(self, state: CycleState, endpoints: list[Endpoint]) -> list[int]:
        """Per endpoint, tokens for a whole prompt stored under its KV-cache use: 0 up to the
        threshold, `kvCacheTokens` when full (unknown metrics already cost as busy)."""
        threshold, full = self.kv_cache_threshold, self.kv_cache_tokens
        out = []
        for m in state.metrics_of(endpoints):
            over = 0.0 if m is None else m.kv_usage - threshold
            out.append(int(full * min(1.0, over / max(1e-9, 1.0 - threshold))) if over > 0 else 0)
        return out

    def _holds_adapter(self, state: CycleState, model: str, endpoints: list[Endpoint]) -> list[bool] | None:
        """Per endpoint, whether it holds `model` as a LoRA adapter; None when `model` is not a
        known adapter (a base model, or an adapter no scrape has shown yet): then no endpoint
        pays a load, as far as epp can tell."""
        scraped = state.metrics_of(endpoints)
        held = [m is not None and (model in m.active_adapters or model in m.waiting_adapters) for m in scraped]
        known = self._known_adapters
        if any(held):
            if model not in known:
                known[model] = None
                if len(known) > _MAX_KNOWN_ADAPTERS:
                    del known[next(iter(known))]
        elif model not in known:
            return None
        for i, (ep, m) in enumerate(zip(endpoints, scraped, strict=True)):
            sent = self._adapters_sent.get(ep.hostport)
            at = sent.get(model) if sent and not held[i] else None
            if at is not None:
                held[i] = m is None or at >= m.scraped_at
        return held

    def score(self, state: CycleState, request: InferenceRequest, endpoints: list[Endpoint]) -> list[float]:
        costs = self.costs(state, request, endpoints)
        lo, hi = min(costs), max(costs)
        span = max(hi - lo, self.token_scale)
        return [1.0 - (c - lo) / span for c in costs]

    def pre_request(self, state: CycleState, request: InferenceRequest, result: SchedulingResult) -> None:
        ep = result.endpoint
        if self.lora_load_tokens:
            self._note_adapter(state, request, ep)
        if self.scraped_load:
            prompt = len(request.prompt) // AVERAGE_CHARS_PER_TOKEN
            self.tokens_per_request += (prompt - self.tokens_per_request) / 64
        candidates = result.candidates or [ep]
        if ep in candidates:
            i = candidates.index(ep)
            _, uncached, backlogs = self._costs(state, request, candidates)
            own, ahead = uncached[i], backlogs[i]
        else:
            own, ahead = len(request.prompt) // AVERAGE_CHARS_PER_TOKEN, self.backlog.get(ep.hostport, 0)
        if self.speeds is not None and self.prefix is not None:
            self._count_demand(state, request, candidates)
        timed = self.speeds is not None and request.stream and self._unqueued(state, ep)
        if own <= 0 and not timed:
            return
        self._pending[id(request)] = (ep.hostport, own, ahead + own, self.clock() if timed else None)
        if own > 0:
            self.backlog[ep.hostport] = self.backlog.get(ep.hostport, 0) + own

    def _unqueued(self, state: CycleState, ep: Endpoint) -> bool:
        """Whether a request sent to `ep` now starts at once: nothing of epp's still prefilling there,
        and a fresh scrape that shows no queue and KV-cache use below `kvCacheThreshold`. Only such
        requests time the server's speed; behind a queue or a full cache (waiting for blocks,
        preemptions) the wait depends on the batch's make-up, not on the speed, and under high load
        it made like servers look up to twice as fast or slow as each other."""
        if self.backlog.get(ep.hostport, 0):
            return False
        m = state.metrics(ep)
        return m is not None and not m.waiting and m.kv_usage < self.kv_cache_threshold

    def _count_demand(self, state: CycleState, request: InferenceRequest, candidates: list[Endpoint]) -> None:
        """One more request for the longest prefix of this prompt that some server holds."""
        assert self.prefix is not None
        matched = self.prefix.matched_blocks(state, request, candidates)
        deepest = max(matched.values(), default=0)
        if deepest:
            self.demand.add(self.prefix.hashes(state, request)[deepest - 1])

    def _note_adapter(self, state: CycleState, request: InferenceRequest, ep: Endpoint) -> None:
        """Remember that `ep` is loading (or holds) the request's adapter, until its next scrape says."""
        m = state.metrics(ep)
        if m is None or not m.max_lora:
            return  # the endpoint serves no adapters (or its state is unknown)
        model = request.target_model or request.model
        if model not in self._known_adapters:
            return  # a base model, or an adapter not seen yet
        sent = self._adapters_sent.setdefault(ep.hostport, {})
        sent[model] = state.now
        if len(sent) > 4 * m.max_lora:  # bounded: drop what a scrape has since overtaken
            for name in [n for n, at in sent.items() if at < m.scraped_at]:
                del sent[name]

    def _release(self, request: InferenceRequest, started: bool) -> None:
        entry = self._pending.pop(id(request), None)
        if entry is None:
            return
        hostport, tokens, work, sent_at = entry
        if started and sent_at is not None and self.speeds is not None and 200 <= request.response_status < 300:
            self.speeds.observe(hostport, self.clock() - sent_at, work)
        if not tokens:
            return
        left = self.backlog.get(hostport, 0) - tokens
        if left > 0:
            self.backlog[hostport] = left
        else:
            self.backlog.pop(hostport, None)

    def response_started(self, request: InferenceRequest, endpoint: Endpoint) -> None:
        self._release(request, started=True)

    def response_complete(self, request: InferenceRequest, endpoint: Endpoint) -> None:
        self._release(request, started=False)

    def endpoints_changed(self, added: list[Endpoint], removed: list[Endpoint]) -> None:
        for ep in removed:
            self.backlog.pop(ep.hostport, None)
            self._adapters_sent.pop(ep.hostport, None)
            if self.speeds is not None:
                self.speeds.forget(ep.hostport)
