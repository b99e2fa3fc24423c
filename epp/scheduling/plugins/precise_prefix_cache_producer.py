"""precise-prefix-cache-producer: which servers hold each prompt's prefix, from their KV-cache events.

Servers publish what their prefix cache stores and evicts (vLLM's `--kv-events-config`); epp
subscribes (epp.kvevents), keys every stored block by its token ids and answers, per request,
how many leading blocks of the prompt each server holds: exact, not a guess from past picks.
`prefix-cache-scorer` with `prefixMatchInfoProducerName` naming this producer scores on it, as
in llm-d-router.

The prompt's token ids come from the config's `token-producer` (its `vllm` backend asks the
servers' render endpoint, as llm-d deploys it), else from the request itself (`tokenizer`).
Servers that have never published an event, and requests whose token ids epp does not know
(a text prompt with no token-producer, or one whose render failed), fall back to the
approximate index of approx-prefix-cache-producer, which this producer also keeps; a fallback
match is scaled to this producer's block count so both compare on one scale.

Parameters are llm-d-router's (tokenProcessorConfig, indexerConfig, kvEventsConfig,
speculativeIndexing, speculativeTTL); those that change nothing in epp are accepted with a
warning, those it cannot honour are refused by name. epp adds `tokenizer` (`request`: token ids
sent by the client; `simulator`: also epp's simulator's text tokenizer) and `maxBlocksPerPod`.
"""

from __future__ import annotations

import asyncio
from typing import Any

from epp.datastore import Endpoint
from epp.errors import ConfigError
from epp.kvevents.hashing import block_keys, root_key
from epp.kvevents.index import BlockIndex
from epp.kvevents.subscriber import Subscriber
from epp.kvevents.tokens import REQUEST, TOKENIZERS, cache_salt, tokenizer
from epp.requests import InferenceRequest
from epp.scheduling.framework import Binder, Closes, CycleState, Lookup, Plugin, SchedulingResult
from epp.scheduling.params import Params
from epp.scheduling.plugins.approx_prefix_cache_producer import DEFAULT_MAX_BLOCKS, ApproxPrefixCacheProducer
from epp.scheduling.plugins.token_producer import TokenProducer
from epp.scheduling.prefix_index import block_hashes

DEFAULT_BLOCK_SIZE = 16
DEFAULT_INDEX_SIZE = 100_000_000  # llm-d's in-memory index size (keys)
DEFAULT_BLOCKS_PER_POD = 1 << 20
DEFAULT_SOCKET_PORT = 5557
DEFAULT_TOPIC_FILTER = "kv@"

# Parameters whose nested objects the legacy precise-prefix-cache-scorer forwards unchanged.
PARAMETERS = ("tokenProcessorConfig", "indexerConfig", "kvEventsConfig", "speculativeIndexing", "speculativeTTL",
              "tokenizer", "maxBlocksPerPod")


class PrecisePrefixCacheProducer(ApproxPrefixCacheProducer, Closes):
    type_name = "precise-prefix-cache-producer"

    def __init__(self, name: str = "", *, block_size: int = DEFAULT_BLOCK_SIZE, hash_seed: str = "",
                 zmq_endpoint: str = "", topic_filter: str = DEFAULT_TOPIC_FILTER, discover_pods: bool = True,
                 socket_port: int = DEFAULT_SOCKET_PORT, max_blocks: int = DEFAULT_INDEX_SIZE,
                 max_blocks_per_pod: int = DEFAULT_BLOCKS_PER_POD, tokenizer_kind: str = REQUEST,
                 max_prefix_blocks: int = DEFAULT_MAX_BLOCKS) -> None:
        super().__init__(name, block_size_tokens=block_size, max_prefix_blocks=max_prefix_blocks)
        self.block_size = block_size
        self.hash_seed = hash_seed
        self.zmq_endpoint = zmq_endpoint
        self.topic_filter = topic_filter
        self.discover_pods = discover_pods
        self.socket_port = socket_port
        self.tokenizer_kind = tokenizer_kind
        self._tokens = tokenizer(tokenizer_kind)
        self.events = BlockIndex(block_size=block_size, hash_seed=hash_seed, max_blocks_per_pod=max_blocks_per_pod,
                                 max_blocks=max_blocks)
        self.subscriber = Subscriber(self.events, topic_filter)
        self._central_started = False
        self.token_source: TokenProducer | None = None  # the config's token-producer, if any
        self._keys_key = object()
        self._approx_key = object()
        self._match_key = object()

    @classmethod
    def from_parameters(cls, name: str, params: Params) -> Plugin:
        return cls(name, **precise_parameters(params))

    def bind(self, lookup: Lookup) -> None:
        """Read token ids from the config's token-producer when it has one (none is created: upstream
        would create an estimate one, whose ids never match a server's blocks)."""
        super().bind(lookup)
        if isinstance(lookup, Binder):
            self.token_source = lookup.find(TokenProducer)
        else:
            found = lookup(TokenProducer.type_name)
            self.token_source = found if isinstance(found, TokenProducer) else None

    def describe(self) -> dict[str, Any]:
        return {"tokenProcessorConfig": {"blockSizeTokens": self.block_size, "hashSeed": self.hash_seed},
                "kvEventsConfig": {"zmqEndpoint": self.zmq_endpoint, "topicFilter": self.topic_filter,
                                   "discoverPods": self.discover_pods,
                                   "podDiscoveryConfig": {"socketPort": self.socket_port}},
                "indexerConfig": {"kvBlockIndexConfig": {"inMemoryConfig": {"size": self.events.max_blocks}}},
                "maxBlocksPerPod": self.events.max_blocks_per_pod, "tokenizer": self.tokenizer_kind}

    def start(self) -> None:
        """Bind the central endpoint (once) for publishers to connect to, as llm-d-router does;
        per-pod publishers are connected to as pods join."""
        if self.zmq_endpoint and not self._central_started:
            self._central_started = True
            self.subscriber.add("central", self.zmq_endpoint, bind=True)

    def close(self) -> None:
        self.subscriber.close()

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)  # joins the subscriber's thread: not on the event loop

    # --- per request -----------------------------------------------------------
    def precise_keys(self, state: CycleState, request: InferenceRequest) -> list[int] | None:
        """The prompt's block keys, or None when epp does not know its token ids."""
        if self._keys_key in state.data:
            keys: list[int] | None = state.data[self._keys_key]
            return keys
        ids = self.token_source.token_ids(request) if self.token_source is not None else None
        if ids is None:
            ids = self._tokens(request)
        keys = None
        if ids is not None:
            parent = root_key(request.target_model, self.hash_seed, cache_salt(request))
            keys = block_keys(parent, ids, self.block_size, self.max_prefix_blocks)
        state.data[self._keys_key] = keys
        return keys

    def approx_hashes(self, state: CycleState, request: InferenceRequest) -> list[int]:
        hashes: list[int] | None = state.data.get(self._approx_key)
        if hashes is None:
            hashes = block_hashes(request.target_model, request.prompt, self.block_chars, self.max_prefix_blocks)
            state.data[self._approx_key] = hashes
        return hashes

    def hashes(self, state: CycleState, request: InferenceRequest) -> list[int]:
        keys = self.precise_keys(state, request)
        return keys if keys is not None else self.approx_hashes(state, request)

    def matched_blocks(self, state: CycleState, request: InferenceRequest, endpoints: list[Endpoint]) -> dict[str, int]:
        matched: dict[str, int] | None = state.data.get(self._match_key)
        if matched is not None:
            return matched
        self.start()
        keys = self.precise_keys(state, request)
        approx = self.approx_hashes(state, request)
        if keys is None:
            matched = self.index.match(approx, (ep.hostport for ep in endpoints)) if approx else {}
        else:
            publishing = [ep.hostport for ep in endpoints if self.events.publishes(ep.hostport)]
            matched = self.events.match(keys, publishing)
            silent = [ep.hostport for ep in endpoints if not self.events.publishes(ep.hostport)]
            if silent and approx and keys:
                for pod, n in self.index.match(approx, silent).items():
                    scaled = n * len(keys) // len(approx)
                    if scaled:
                        matched[pod] = scaled
        state.data[self._match_key] = matched
        return matched

    def pre_request(self, state: CycleState, request: InferenceRequest, result: SchedulingResult) -> None:
        # The approximate index learns every pick: it answers for servers that do not publish.
        hashes = self.approx_hashes(state, request)
        if hashes:
            self.index.add(result.endpoint.hostport, hashes)

    def endpoints_changed(self, added: list[Endpoint], removed: list[Endpoint]) -> None:
        super().endpoints_changed(added, removed)
        self.start()
        for ep in removed:
            if self.discover_pods:
                self.subscriber.remove(ep.hostport)
            self.events.forget(ep.hostport)
        if self.discover_pods:
            for ep in added:
                self.subscriber.add(ep.hostport, f"tcp://{ep.host}:{self.socket_port}", pod=ep.hostport)

    def prefix_index_size(self) -> int:
        return self.index.size() + self.events.size()


def _no_effect(params: Params, *keys: str, why: str) -> None:
    params.deprecated(*keys, why=why)


def precise_parameters(params: Params) -> dict[str, Any]:
    """llm-d-router's parameters of precise-prefix-cache-producer (and of the legacy scorer)."""
    out: dict[str, Any] = {}
    tp = params.sub("tokenProcessorConfig", params.mapping("tokenProcessorConfig"))
    size = tp.int("blockSizeTokens", 0, minimum=0)
    legacy = tp.int("blockSize", 0, minimum=0)
    out["block_size"] = size or legacy or DEFAULT_BLOCK_SIZE
    out["hash_seed"] = tp.str("hashSeed", "", empty=True)
    if tp.has("hashAlgorithm"):
        tp.str("hashAlgorithm", "", empty=True, choices=("", "cbor-fnv", "xxh64"))
        params.warnings.append(f"plugin {params.plugin_type!r}: hashAlgorithm has no effect: block keys are internal "
                               "to epp's index (xxh64 over token ids), and both sides of a match use the same")
    tp.done()

    ix = params.sub("indexerConfig", params.mapping("indexerConfig"))
    if ix.has("tokenizersPoolConfig"):
        raise ConfigError(f"plugin {params.plugin_type!r}: indexerConfig.tokenizersPoolConfig is not supported "
                          "(as upstream): configure a token-producer plugin instead (its vllm backend renders "
                          "prompts with the servers' tokenizer)")
    if ix.has("kvCacheBackendConfigs"):
        raise ConfigError(f"plugin {params.plugin_type!r}: indexerConfig.kvCacheBackendConfigs is not supported: "
                          "epp indexes the GPU tier only")
    kb = ix.sub("kvBlockIndexConfig", ix.mapping("kvBlockIndexConfig"))
    for backend in ("redisConfig", "costAwareMemoryConfig"):
        if kb.has(backend):
            raise ConfigError(f"plugin {params.plugin_type!r}: kvBlockIndexConfig.{backend} is not supported: "
                              "epp keeps the index in memory (inMemoryConfig)")
    mem = kb.sub("inMemoryConfig", kb.mapping("inMemoryConfig"))
    out["max_blocks"] = mem.int("size", DEFAULT_INDEX_SIZE, minimum=1)
    _no_effect(mem, "podCacheSize", why="epp keeps keys per pod, bounded by size and maxBlocksPerPod")
    mem.done()
    _no_effect(kb, "enableMetrics", "metricsLoggingInterval", why="epp reports the index size as "
               "inference_extension_prefix_indexer_size")
    kb.done()
    ix.done()

    ev = params.sub("kvEventsConfig", params.mapping("kvEventsConfig"))
    out["zmq_endpoint"] = ev.str("zmqEndpoint", "", empty=True)
    out["topic_filter"] = ev.str("topicFilter", DEFAULT_TOPIC_FILTER, empty=True)
    if ev.has("concurrency"):
        ev.int("concurrency", 4, minimum=1)
        params.warnings.append(f"plugin {params.plugin_type!r}: kvEventsConfig.concurrency has no effect: epp "
                               "applies events on one thread of its own, each pod's in order")
    ev.str("engineType", "vllm", choices=("vllm",))
    out["discover_pods"] = ev.bool("discoverPods", True)
    pd = ev.sub("podDiscoveryConfig", ev.mapping("podDiscoveryConfig"))
    out["socket_port"] = pd.int("socketPort", DEFAULT_SOCKET_PORT, minimum=1, maximum=65535)
    _no_effect(pd, "podLabelSelector", "podNamespace",
               why="epp subscribes to every endpoint of its pool, which its discovery already selects")
    if pd.int("replaySocketPort", 0) > 0:
        params.warnings.append(f"plugin {params.plugin_type!r}: replaySocketPort has no effect: epp does not "
                               "request replays; after a gap it drops the pod's blocks and rebuilds from new events")
    pd.done()
    ev.done()

    if params.bool("speculativeIndexing", False):
        raise ConfigError(f"plugin {params.plugin_type!r}: speculativeIndexing is not supported by epp: its index "
                          "holds what servers report; servers that do not publish use the approximate index")
    params.duration("speculativeTTL", 2.0)
    out["tokenizer_kind"] = params.str("tokenizer", REQUEST, choices=TOKENIZERS)
    out["max_blocks_per_pod"] = params.int("maxBlocksPerPod", DEFAULT_BLOCKS_PER_POD, minimum=1)
    params.done()
    return out
