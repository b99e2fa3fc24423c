"""ZMQ SUB sockets that feed a BlockIndex, on one thread of their own (never the serving loop).

Each source is one endpoint: a pod's own publisher (`tcp://<pod-ip>:5557`, connected to; the
events are that pod's whatever the topic says) or the central one (`tcp://*:5557`, bound by epp as
llm-d-router binds it; the model servers' publishers connect to it and the pod is read from each
topic, `kv@<pod>@<model>`). ZMQ reconnects by itself when a publisher goes away and comes back. Every
batch carries a sequence number: a gap (batches lost while disconnected, or dropped by a slow
subscriber) or a number going back (the server restarted) means the pod's index no longer
matches its cache, so the pod's blocks are dropped and rebuilt from the events that follow.
A message that is not a KV-event batch is counted and skipped.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass, field

import zmq

from epp.kvevents.events import MalformedEvent, decode_batch, decode_sequence, parse_topic
from epp.kvevents.index import BlockIndex

log = logging.getLogger(__name__)

POLL_MS = 50


@dataclass(slots=True)
class SubscriberStats:
    batches: int = 0
    malformed: int = 0
    gaps: int = 0  # sequence gaps and restarts: the pod's index was dropped
    last_error: str = ""


@dataclass(slots=True)
class _Source:
    endpoint: str
    pod: str  # "" for a central endpoint: the pod comes from the topic
    socket: zmq.Socket[bytes] | None = None
    sequences: dict[str, int] = field(default_factory=dict)  # topic -> last sequence


class Subscriber:
    """Subscribes to publishers as they are added; applies their batches to `index`."""

    def __init__(self, index: BlockIndex, topic_filter: str = "kv@") -> None:
        self.index = index
        self.topic_filter = topic_filter
        self.stats = SubscriberStats()
        self._commands: queue.SimpleQueue[tuple[str, str, str, str, bool]] = queue.SimpleQueue()
        self._sources: dict[str, _Source] = {}
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.connected: set[str] = set()  # source ids whose socket is set up (for tests and state)

    def add(self, source_id: str, endpoint: str, pod: str = "", *, bind: bool = False) -> None:
        """Subscribe to `endpoint`; with `pod`, every batch from it is that pod's.

        `bind`: listen on `endpoint` for publishers to connect (the central socket) instead of
        connecting to a publisher's.
        """
        self._commands.put(("add", source_id, endpoint, pod, bind))
        self._start()

    def remove(self, source_id: str) -> None:
        self._commands.put(("remove", source_id, "", "", False))

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="epp-kv-events", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        ctx = zmq.Context()
        poller = zmq.Poller()
        try:
            while not self._stop.is_set():
                self._drain_commands(ctx, poller)
                for sock, _ in poller.poll(POLL_MS):
                    self._receive(sock)
        finally:
            for src in self._sources.values():
                if src.socket is not None:
                    src.socket.close(linger=0)
            ctx.term()

    def _drain_commands(self, ctx: zmq.Context[zmq.Socket[bytes]], poller: zmq.Poller) -> None:
        while True:
            try:
                op, source_id, endpoint, pod, bind = self._commands.get_nowait()
            except queue.Empty:
                return
            old = self._sources.pop(source_id, None)
            if old is not None and old.socket is not None:
                poller.unregister(old.socket)
                old.socket.close(linger=0)
                self.connected.discard(source_id)
            if op != "add":
                continue
            sock = ctx.socket(zmq.SUB)
            sock.setsockopt(zmq.RECONNECT_IVL, 100)
            sock.setsockopt(zmq.RECONNECT_IVL_MAX, 5000)
            sock.setsockopt(zmq.RCVHWM, 100_000)
            sock.setsockopt_string(zmq.SUBSCRIBE, self.topic_filter)
            try:
                if bind:
                    sock.bind(endpoint)
                else:
                    sock.connect(endpoint)
            except zmq.ZMQError as e:
                sock.close(linger=0)
                self.stats.last_error = f"{endpoint}: {e}"
                log.warning("KV events: cannot %s %s: %s", "bind" if bind else "connect to", endpoint, e)
                continue
            if bind:
                log.info("KV events: listening on %s for the model servers' publishers", endpoint)
            src = _Source(endpoint, pod, sock)
            self._sources[source_id] = src
            poller.register(sock, zmq.POLLIN)
            self.connected.add(source_id)

    def _receive(self, sock: zmq.Socket[bytes]) -> None:
        src = next((s for s in self._sources.values() if s.socket is sock), None)
        for _ in range(1000):  # a bounded burst, then the poll loop looks at commands again
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if src is not None:
                self._handle(src, frames)

    def _handle(self, src: _Source, frames: list[bytes]) -> None:
        try:
            if len(frames) != 3:
                raise MalformedEvent(f"{len(frames)} frames, want [topic, sequence, payload]")
            topic = frames[0].decode("utf-8")
            seq = decode_sequence(frames[1])
            batch = decode_batch(frames[2])
        except (MalformedEvent, UnicodeDecodeError) as e:
            self.stats.malformed += 1
            self.stats.last_error = str(e)
            log.debug("KV events: malformed message from %s: %s", src.endpoint, e)
            return
        pod, model = parse_topic(topic)
        pod = src.pod or pod
        last = src.sequences.get(topic)
        if last is not None and seq != last + 1:
            self.stats.gaps += 1
            self.index.clear(pod)
            log.info("KV events: sequence %d after %d from %s: its index is rebuilt from here", seq, last, pod)
        src.sequences[topic] = seq
        self.stats.batches += 1
        self.index.apply(pod, model, batch)
