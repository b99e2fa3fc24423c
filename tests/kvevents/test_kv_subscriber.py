"""The subscriber over real ZMQ: applies batches, survives garbage, recovers from a lost publisher."""

from collections.abc import AsyncIterator

import pytest
import zmq

from epp.kvevents.events import BlockStored, encode_sequence, topic
from epp.kvevents.hashing import block_keys, root_key
from epp.kvevents.index import BlockIndex
from epp.kvevents.subscriber import Subscriber
from epp.simulator.kv_publisher import KVEventPublisher, KVEventsConfig
from epp.stack import free_ports
from tests.helpers import until

MODEL = "m"
POD = "127.0.0.1:8000"
TOKENS = list(range(16))
KEYS = block_keys(root_key(MODEL), TOKENS, 16)


@pytest.fixture
async def sub() -> AsyncIterator[Subscriber]:
    s = Subscriber(BlockIndex())
    yield s
    s.close()


def publisher(port: int, *, bind: bool = False) -> KVEventPublisher:
    """A vLLM publisher: it connects to epp's central socket (bind=False) or binds its own (per-pod)."""
    return KVEventPublisher(KVEventsConfig(f"tcp://127.0.0.1:{port}", bind=bind), topic(POD, MODEL))


async def joined(sub: Subscriber, pub: KVEventPublisher, pod: str = POD) -> None:
    """Publish empty batches until the subscriber has one (ZMQ drops what is sent before it joins)."""
    start = sub.stats.batches

    def seen() -> bool:
        pub.publish([])
        return sub.stats.batches > start and sub.index.publishes(pod)

    await until(seen, what="the subscriber to join")


async def test_batches_from_a_central_endpoint_land_under_the_topics_pod(sub: Subscriber) -> None:
    port, = free_ports(1)
    pub = publisher(port)
    try:
        sub.add("central", f"tcp://127.0.0.1:{port}", bind=True)
        await joined(sub, pub)
        pub.publish([BlockStored([1], None, TOKENS, 16)])
        await until(lambda: sub.index.match(KEYS, [POD]) == {POD: 1}, what="the block")
    finally:
        pub.close()


async def test_the_central_socket_is_bound_by_epp_and_many_publishers_connect_to_it(sub: Subscriber) -> None:
    """llm-d's layout: the EPP listens on kvEventsConfig.zmqEndpoint, every vLLM connects to it."""
    port, = free_ports(1)
    sub.add("central", f"tcp://127.0.0.1:{port}", bind=True)
    await until(lambda: "central" in sub.connected, what="the bind")
    with pytest.raises(zmq.ZMQError):  # the port is epp's now
        KVEventPublisher(KVEventsConfig(f"tcp://127.0.0.1:{port}", bind=True), "t").close()
    pods = ["127.0.0.1:8000", "127.0.0.1:8001", "127.0.0.1:8002"]
    pubs = [KVEventPublisher(KVEventsConfig(f"tcp://127.0.0.1:{port}", bind=False), topic(p, MODEL)) for p in pods]
    try:
        for pub, pod in zip(pubs, pods, strict=True):
            await joined(sub, pub, pod)
        pubs[1].publish([BlockStored([1], None, TOKENS, 16)])
        await until(lambda: sub.index.match(KEYS, pods) == {pods[1]: 1}, what="the second pod's block")
    finally:
        for pub in pubs:
            pub.close()


async def test_a_pods_own_endpoint_names_the_pod_whatever_the_topic(sub: Subscriber) -> None:
    port, = free_ports(1)
    pub = KVEventPublisher(KVEventsConfig(f"tcp://127.0.0.1:{port}", bind=True), "kv@somebody-else@m")
    try:
        sub.add(POD, f"tcp://127.0.0.1:{port}", pod=POD)
        await joined(sub, pub)
        pub.publish([BlockStored([1], None, TOKENS, 16)])
        await until(lambda: sub.index.match(KEYS, [POD]) == {POD: 1}, what="the block")
        assert not sub.index.publishes("somebody-else")
        sub.remove(POD)
        await until(lambda: POD not in sub.connected, what="the unsubscribe")
    finally:
        pub.close()


async def test_malformed_messages_are_counted_and_skipped(sub: Subscriber) -> None:
    port, = free_ports(1)
    pub = publisher(port)
    try:
        sub.add("central", f"tcp://127.0.0.1:{port}", bind=True)
        await joined(sub, pub)
        t = topic(POD, MODEL).encode()
        pub.socket.send_multipart([t, encode_sequence(pub.seq), b"\xc1garbage"])
        pub.socket.send_multipart([t, b"\x00", b""])
        pub.socket.send_multipart([t, b"only two frames"])
        pub.socket.send_multipart([b"kv@\xff\xfe@m", encode_sequence(pub.seq), b""])
        pub.seq += 1  # the garbage took sequence numbers; the next real batch follows it
        pub.publish([BlockStored([1], None, TOKENS, 16)])
        await until(lambda: sub.index.match(KEYS, [POD]) == {POD: 1}, what="the block after the garbage")
        assert sub.stats.malformed == 4
    finally:
        pub.close()


async def test_a_sequence_gap_drops_the_pods_blocks_until_new_events_rebuild_them(sub: Subscriber) -> None:
    port, = free_ports(1)
    pub = publisher(port)
    try:
        sub.add("central", f"tcp://127.0.0.1:{port}", bind=True)
        await joined(sub, pub)
        pub.publish([BlockStored([1], None, TOKENS, 16)])
        await until(lambda: sub.index.blocks(POD) == 1, what="the block")
        pub.seq += 3  # three batches lost
        other = list(range(50, 66))
        pub.publish([BlockStored([2], None, other, 16)])
        await until(lambda: sub.stats.gaps == 1, what="the gap")
        assert sub.index.match(KEYS, [POD]) == {}  # it may have been evicted meanwhile: not trusted
        assert sub.index.match(block_keys(root_key(MODEL), other, 16), [POD]) == {POD: 1}
    finally:
        pub.close()


async def test_a_publisher_that_goes_away_and_comes_back_is_followed_again(sub: Subscriber) -> None:
    port, = free_ports(1)
    pub = publisher(port)
    sub.add("central", f"tcp://127.0.0.1:{port}", bind=True)
    await joined(sub, pub)
    pub.publish([BlockStored([1], None, TOKENS, 16)])
    await until(lambda: sub.index.blocks(POD) == 1, what="the block")
    pub.close()  # the server died
    # and restarted: its sequence starts again at 0, its cache is empty; it connects again.
    restarted: list[KVEventPublisher] = []

    def bound() -> bool:
        try:
            restarted.append(publisher(port))
        except zmq.ZMQError:
            return False
        return True

    await until(bound, what="the port to be free again")
    pub = restarted[0]
    try:
        other = list(range(50, 66))

        def rebuilt() -> bool:
            pub.publish([BlockStored([2], None, other, 16)])
            return sub.index.match(block_keys(root_key(MODEL), other, 16), [POD]) == {POD: 1}
        await until(rebuilt, timeout=10, what="events from the restarted publisher")
        assert sub.index.match(KEYS, [POD]) == {}  # what the old process held is gone with it
        assert sub.stats.gaps >= 1
    finally:
        pub.close()


async def test_an_endpoint_zmq_cannot_parse_is_reported_not_raised(sub: Subscriber) -> None:
    sub.add("bad", "not-an-endpoint")
    sub.add("good", f"tcp://127.0.0.1:{free_ports(1)[0]}")
    await until(lambda: "good" in sub.connected, what="the good endpoint")
    assert "bad" not in sub.connected
    assert "not-an-endpoint" in sub.stats.last_error
