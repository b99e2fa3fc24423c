"""vLLM's KV-cache events on the wire: ZMQ multipart [topic, sequence, msgpack payload].

The payload is a `KVEventBatch` encoded as a msgpack array `[ts, events, data_parallel_rank?]`;
each event is a tagged array whose first element is its class name, its fields in declaration
order, trailing defaults left out (msgspec's `array_like`, `tag`, `omit_defaults`):

    ["BlockStored", block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium,
     lora_name?, extra_keys?, ...]
    ["BlockRemoved", block_hashes, medium, ...]
    ["AllBlocksCleared"]

Block hashes are integers or (vLLM's sha256 hashes) bytes; both become an integer key. The
topic is `kv@<pod>@<model>`; the sequence number is 8 bytes big-endian, one per batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgpack  # type: ignore[import-untyped]

STORED = "BlockStored"
REMOVED = "BlockRemoved"
CLEARED = "AllBlocksCleared"


class MalformedEvent(ValueError):
    """A message that is not a KV-event batch epp can read; the subscriber counts and skips it."""


@dataclass(slots=True)
class BlockStored:
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    medium: str | None = None
    lora_name: str | None = None
    extra_keys: list[Any] | None = None


@dataclass(slots=True)
class BlockRemoved:
    block_hashes: list[int]
    medium: str | None = None


@dataclass(slots=True)
class AllBlocksCleared:
    pass


Event = BlockStored | BlockRemoved | AllBlocksCleared


@dataclass(slots=True)
class EventBatch:
    ts: float
    events: list[Event] = field(default_factory=list)
    data_parallel_rank: int | None = None


def topic(pod: str, model: str) -> str:
    """vLLM's topic for a pod's events (`kv@<pod>@<model>`), as llm-d's deployments set it."""
    return f"kv@{pod}@{model}"


def parse_topic(value: str) -> tuple[str, str]:
    """(pod, model) from `kv@<pod>@<model>`; a topic of another shape is the pod, model unknown."""
    parts = value.split("@")
    if len(parts) == 3:
        return parts[1], parts[2]
    return value, ""


def encode_sequence(seq: int) -> bytes:
    return seq.to_bytes(8, "big")


def decode_sequence(raw: bytes) -> int:
    if len(raw) != 8:
        raise MalformedEvent(f"sequence frame of {len(raw)} bytes, want 8")
    return int.from_bytes(raw, "big")


def _trim(fields: list[Any], required: int) -> list[Any]:
    """Trailing None fields left out, as msgspec's omit_defaults does."""
    while len(fields) > required and fields[-1] is None:
        fields.pop()
    return fields


def _encode_event(ev: Event) -> list[Any]:
    if isinstance(ev, BlockStored):
        return _trim([STORED, ev.block_hashes, ev.parent_block_hash, ev.token_ids, ev.block_size, ev.lora_id,
                      ev.medium, ev.lora_name, ev.extra_keys], 7)
    if isinstance(ev, BlockRemoved):
        return _trim([REMOVED, ev.block_hashes, ev.medium], 3)
    return [CLEARED]


def encode_batch(batch: EventBatch) -> bytes:
    body: list[Any] = [batch.ts, [_encode_event(e) for e in batch.events]]
    if batch.data_parallel_rank is not None:
        body.append(batch.data_parallel_rank)
    return msgpack.packb(body, use_bin_type=True)


def _hash(raw: Any) -> int:
    if isinstance(raw, bool):
        raise MalformedEvent(f"block hash {raw!r} is not an integer or bytes")
    if isinstance(raw, int):
        return raw & 0xFFFFFFFFFFFFFFFF
    if isinstance(raw, bytes) and raw:
        return int.from_bytes(raw[-8:], "big")
    raise MalformedEvent(f"block hash {raw!r} is not an integer or bytes")


def _hashes(raw: Any) -> list[int]:
    if not isinstance(raw, list):
        raise MalformedEvent(f"block_hashes is not an array: {type(raw).__name__}")
    return [_hash(h) for h in raw]


def _optional_str(raw: Any, name: str) -> str | None:
    if raw is None or isinstance(raw, str):
        return raw
    raise MalformedEvent(f"{name} is not a string: {type(raw).__name__}")


def _int(raw: Any, name: str) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int):
        raise MalformedEvent(f"{name} is not an integer: {raw!r}")
    return raw


def _field(fields: list[Any], i: int) -> Any:
    return fields[i] if i < len(fields) else None


def _decode_event(raw: Any) -> Event:
    if isinstance(raw, dict):  # msgspec without array_like: a map with a "type" tag
        tag = str(raw.get("type"))
        order = {STORED: ("block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id", "medium",
                          "lora_name", "extra_keys"),
                 REMOVED: ("block_hashes", "medium")}.get(tag, ())
        raw = [tag, *(raw.get(k) for k in order)]
    if not isinstance(raw, list) or not raw or not isinstance(raw[0], str):
        raise MalformedEvent("event is not a tagged array")
    tag = raw[0]
    if tag == STORED:
        if len(raw) < 5:
            raise MalformedEvent(f"BlockStored has {len(raw) - 1} fields, want at least 4")
        tokens = raw[3]
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            raise MalformedEvent("BlockStored token_ids is not an array of integers")
        lora_id = _field(raw, 5)
        extra = _field(raw, 8)
        if extra is not None and not isinstance(extra, list):
            raise MalformedEvent("BlockStored extra_keys is not an array")
        return BlockStored(
            _hashes(raw[1]), None if raw[2] is None else _hash(raw[2]), tokens, _int(raw[4], "block_size"),
            None if lora_id is None else _int(lora_id, "lora_id"), _optional_str(_field(raw, 6), "medium"),
            _optional_str(_field(raw, 7), "lora_name"), extra)
    if tag == REMOVED:
        if len(raw) < 2:
            raise MalformedEvent("BlockRemoved has no block_hashes")
        return BlockRemoved(_hashes(raw[1]), _optional_str(_field(raw, 2), "medium"))
    if tag == CLEARED:
        return AllBlocksCleared()
    raise MalformedEvent(f"unknown event tag {tag!r}")


def decode_batch(payload: bytes) -> EventBatch:
    """The batch in `payload`; MalformedEvent if any part of it is not vLLM's format."""
    try:
        body = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except Exception as e:  # msgpack raises several types (ExtraData, FormatError, ValueError...)
        raise MalformedEvent(f"not msgpack: {e}") from None
    if not isinstance(body, list) or len(body) < 2 or not isinstance(body[1], list):
        raise MalformedEvent("payload is not a [ts, events, ...] array")
    ts = body[0]
    if isinstance(ts, bool) or not isinstance(ts, int | float):
        raise MalformedEvent(f"batch ts is not a number: {ts!r}")
    rank = _field(body, 2)
    return EventBatch(float(ts), [_decode_event(e) for e in body[1]], None if rank is None else _int(rank, "rank"))
