"""What the response phase reads: status, time of the first byte, size, gaps between chunks, and token `usage`.

Streamed (SSE) responses carry `usage` in one of the last `data:` events; a whole
JSON response carries it at the top level, so it is kept (up to a bound) and read
once the response ends. `usage.prompt_tokens_details.cached_tokens` (OpenAI's and
vLLM's) is the part of the prompt the server read from its cache. For streamed
responses the time between consecutive chunks is kept for the inter-token latency.
"""

from __future__ import annotations

import time

import orjson

MAX_USAGE_BUFFER = 1 << 20  # a non-streamed response is kept (up to this) to read its usage
MAX_GAPS = 8192  # inter-chunk gaps kept per streamed response


class Usage:
    """Token counts and timing observed in the response phase."""

    __slots__ = ("buffer", "cached_tokens", "completion_tokens", "first_byte_at", "gaps", "last_chunk_at",
                 "processing", "prompt_tokens", "size", "status", "streaming")

    def __init__(self) -> None:
        self.status = 0
        self.size = 0
        self.first_byte_at = 0.0
        self.last_chunk_at = 0.0
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None
        self.cached_tokens: int | None = None
        self.streaming = False
        self.buffer: bytearray | None = None
        self.gaps: list[float] | None = None  # streamed: seconds between consecutive chunks
        # Seconds epp spent handling this response (the transport adds its per-chunk handler time).
        self.processing = 0.0

    def headers(self, status: str, content_type: str) -> None:
        self.status = int(status) if status.isdigit() else 0
        self.streaming = content_type.startswith("text/event-stream")

    def observe(self, chunk: bytes) -> None:
        if not chunk:
            return
        now = time.monotonic()
        if not self.first_byte_at:
            self.first_byte_at = now
        self.size += len(chunk)
        if self.streaming:
            if self.last_chunk_at:
                gaps = self.gaps
                if gaps is None:
                    gaps = self.gaps = []
                if len(gaps) < MAX_GAPS:
                    gaps.append(now - self.last_chunk_at)
            self.last_chunk_at = now
            if b'"usage"' in chunk:
                for line in chunk.split(b"\n"):
                    if line.startswith(b"data: {") and b'"usage"' in line:
                        self._take(line[6:])
        else:
            if self.buffer is None:
                self.buffer = bytearray()
            if len(self.buffer) + len(chunk) <= MAX_USAGE_BUFFER:
                self.buffer += chunk

    def finish(self) -> None:
        if self.buffer and not self.streaming:
            self._take(bytes(self.buffer))
        self.buffer = None

    def _take(self, raw: bytes) -> None:
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return
        usage = data.get("usage") if isinstance(data, dict) else None
        if isinstance(usage, dict):
            pt, ct = usage.get("prompt_tokens"), usage.get("completion_tokens")
            if isinstance(pt, int):
                self.prompt_tokens = pt
            if isinstance(ct, int):
                self.completion_tokens = ct
            details = usage.get("prompt_tokens_details")
            if isinstance(details, dict):
                cached = details.get("cached_tokens")
                if isinstance(cached, int) and not isinstance(cached, bool):
                    self.cached_tokens = cached
