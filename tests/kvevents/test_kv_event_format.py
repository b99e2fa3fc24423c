"""vLLM's KV-event batches decode as vLLM encodes them; anything else is MalformedEvent, never a crash."""

import msgpack
import pytest

from epp.kvevents.events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EventBatch,
    MalformedEvent,
    decode_batch,
    decode_sequence,
    encode_batch,
    encode_sequence,
    parse_topic,
    topic,
)


def test_a_batch_as_vllm_sends_it_decodes() -> None:
    """msgspec array_like + tag: [ts, [[tag, fields...], ...]]; sha256 block hashes arrive as bytes."""
    h1, h2 = (1).to_bytes(32, "big"), (2).to_bytes(32, "big")
    payload = msgpack.packb([1700000000.5, [
        ["BlockStored", [h1, h2], None, list(range(32)), 16, None, "GPU"],
        ["BlockStored", [7], 2, list(range(16)), 16, 3, "GPU", "adapter-a"],
        ["BlockRemoved", [h1], "GPU"],
        ["AllBlocksCleared"],
    ], 0], use_bin_type=True)
    batch = decode_batch(payload)
    assert batch.ts == 1700000000.5
    assert batch.data_parallel_rank == 0
    stored, lora, removed, cleared = batch.events
    assert stored == BlockStored([1, 2], None, list(range(32)), 16, None, "GPU")
    assert lora == BlockStored([7], 2, list(range(16)), 16, 3, "GPU", "adapter-a")
    assert removed == BlockRemoved([1], "GPU")
    assert cleared == AllBlocksCleared()


def test_map_encoded_events_decode_too() -> None:
    payload = msgpack.packb([1.0, [{"type": "BlockRemoved", "block_hashes": [5], "medium": None}]])
    assert decode_batch(payload).events == [BlockRemoved([5])]


def test_what_epp_encodes_is_what_it_decodes() -> None:
    batch = EventBatch(2.0, [BlockStored([1], None, [1, 2], 2), BlockRemoved([1]), AllBlocksCleared()])
    assert decode_batch(encode_batch(batch)) == batch
    # Trailing defaults are left out, as msgspec's omit_defaults does.
    assert msgpack.unpackb(encode_batch(batch))[1][1] == ["BlockRemoved", [1], None]


def test_topic_and_sequence_frames() -> None:
    assert parse_topic(topic("10.0.0.1:8000", "meta/llama")) == ("10.0.0.1:8000", "meta/llama")
    assert parse_topic("other") == ("other", "")
    assert decode_sequence(encode_sequence(2**40 + 3)) == 2**40 + 3
    with pytest.raises(MalformedEvent):
        decode_sequence(b"\x01")


@pytest.mark.parametrize("payload", [
    b"\xc1",  # not msgpack
    msgpack.packb({"ts": 1}),
    msgpack.packb([1.0]),
    msgpack.packb(["x", []]),
    msgpack.packb([1.0, [["Nope"]]]),
    msgpack.packb([1.0, [["BlockStored", [1], None]]]),
    msgpack.packb([1.0, [["BlockStored", "x", None, [], 16]]]),
    msgpack.packb([1.0, [["BlockStored", [1.5], None, [], 16]]]),
    msgpack.packb([1.0, [["BlockStored", [1], None, ["a"], 16]]]),
    msgpack.packb([1.0, [["BlockRemoved"]]]),
    msgpack.packb([1.0, [[1, 2]]]),
])
def test_malformed_payloads_are_refused(payload: bytes) -> None:
    with pytest.raises(MalformedEvent):
        decode_batch(payload)
