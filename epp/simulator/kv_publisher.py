"""The simulator's KV-event publisher: a ZMQ PUB socket sending vLLM's multipart messages.

Configured as vLLM is, by `--kv-events-config '{"publisher": "zmq", "endpoint": ..., "topic": ...}'`
or the shorthand `--kv-events-endpoint tcp://127.0.0.1:PORT` (always bound). vLLM's config binds or
connects by the endpoint's form, and so does this: a wildcard (`tcp://*:5557`, `tcp://0.0.0.0:5557`,
`::`) or an `ipc://`/`inproc://` endpoint is bound (the subscriber connects to the pod); any other
(`tcp://epp.ns.svc:5557`) is connected to, the subscriber's central socket (llm-d's EPP binds it).
One batch per engine step that stored or evicted blocks; the sequence number counts
batches from 0. A subscriber too slow to keep up loses batches (ZMQ drops past the high-water
mark), which it sees as a gap in the sequence.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any

import zmq

from epp.kvevents.events import Event, EventBatch, encode_batch, encode_sequence

# vLLM's KVEventsConfig keys; the ones the simulator does not model are refused by name.
_KNOWN = {"enable_kv_cache_events", "publisher", "endpoint", "topic", "hwm", "buffer_steps", "max_queue_size",
          "replay_endpoint"}


@dataclass(slots=True)
class KVEventsConfig:
    endpoint: str
    topic: str = ""  # "" means kv@<host:port>@<model>
    hwm: int = 100_000
    bind: bool = True  # False: connect to a subscriber's bound socket


def parse_kv_events_config(text: str) -> KVEventsConfig | None:
    """vLLM's `--kv-events-config` JSON; None when events are off (publisher "null" or disabled)."""
    try:
        raw: Any = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--kv-events-config is not JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ValueError("--kv-events-config must be a JSON object")
    unknown = sorted(set(raw) - _KNOWN)
    if unknown:
        raise ValueError(f"--kv-events-config: unknown key(s) {unknown}")
    if raw.get("replay_endpoint"):
        raise ValueError("--kv-events-config: the simulator has no replay socket (replay_endpoint)")
    publisher = raw.get("publisher", "zmq" if raw.get("enable_kv_cache_events") else "null")
    if publisher in (None, "null") or raw.get("enable_kv_cache_events") is False:
        return None
    if publisher != "zmq":
        raise ValueError(f"--kv-events-config: publisher {publisher!r} is not supported (zmq or null)")
    endpoint = str(raw.get("endpoint") or "tcp://*:5557")
    return KVEventsConfig(endpoint, str(raw.get("topic") or ""), int(raw.get("hwm") or 100_000),
                          vllm_binds(endpoint))


def vllm_binds(endpoint: str) -> bool:
    """vLLM's rule: bind a wildcard or local-transport endpoint, connect to any other."""
    return ("*" in endpoint or "::" in endpoint or "0.0.0.0" in endpoint
            or endpoint.startswith(("ipc://", "inproc://")))


def server_config(cfg: KVEventsConfig, i: int) -> KVEventsConfig:
    """The i-th server's config when one process runs several: a bound endpoint's port plus i
    (each needs its own); a connected one is shared, as every vLLM of a pool connects to one EPP."""
    endpoint = offset_endpoint(cfg.endpoint, i) if cfg.bind else cfg.endpoint
    return KVEventsConfig(endpoint, cfg.topic, cfg.hwm, cfg.bind)


def offset_endpoint(endpoint: str, i: int) -> str:
    """The i-th server's endpoint when one process runs several: the port plus i."""
    if i == 0:
        return endpoint
    head, _, port = endpoint.rpartition(":")
    return f"{head}:{int(port) + i}"


class KVEventPublisher:
    def __init__(self, cfg: KVEventsConfig, topic: str) -> None:
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self.socket = self.ctx.socket(zmq.PUB)
        self.socket.setsockopt(zmq.SNDHWM, cfg.hwm)
        self.socket.setsockopt(zmq.LINGER, 0)
        try:
            if cfg.bind:
                self.socket.bind(cfg.endpoint)
            else:
                self.socket.connect(cfg.endpoint)
        except zmq.ZMQError:
            self.socket.close(linger=0)
            raise
        self.endpoint = cfg.endpoint
        self.topic = topic.encode()
        self.seq = 0
        self.sent = 0

    def publish(self, events: list[Event]) -> None:
        """Send one batch without blocking the server's loop (a full queue drops it, as ZMQ PUB does)."""
        payload = encode_batch(EventBatch(time.time(), events))
        try:
            self.socket.send_multipart([self.topic, encode_sequence(self.seq), payload], zmq.NOBLOCK)
            self.sent += 1
        except zmq.Again:
            pass
        self.seq += 1

    def close(self) -> None:
        self.socket.close(linger=0)

    @classmethod
    async def open(cls, cfg: KVEventsConfig, topic: str, wait: float = 5.0) -> KVEventPublisher:
        """A publisher on `cfg`'s endpoint. ZMQ releases a closed socket's address in its I/O thread,
        after close() returns, so a server started again at once on the same address (a restart, the
        next benchmark run) may find it bound a moment longer: the bind is retried until `wait`."""
        deadline = time.monotonic() + wait
        while True:
            try:
                return cls(cfg, topic)
            except zmq.ZMQError as e:
                if e.errno != zmq.EADDRINUSE or time.monotonic() >= deadline:
                    raise
            await asyncio.sleep(0.01)
