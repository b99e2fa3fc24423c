"""The HTTP pick's hand-off to the ext_proc filter, for what ext_authz cannot carry.

Envoy's ext_authz cannot change the request body and turns a 5xx of its server into
its own bodiless status. So when a pick made over HTTP rewrote the model, or ended
in a 5xx, epp answers ext_authz with 200 and `x-epp-rewrite-body` plus a key, and
holds here what the layout's ext_proc filter must send instead: the new body, or
the error. The ext_proc stream that carries the key takes it, once. Unclaimed
hand-offs expire after `grace` seconds.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
from dataclasses import dataclass

from epp.errors import EppError


@dataclass(slots=True)
class Handoff:
    """A rewritten body to send in place of the client's (with the pick's targets), or an error to answer."""

    body: bytes = b""
    primary: str = ""  # the pick's ip:port
    targets: str = ""  # the pick, then fallbacks, comma-separated
    error: EppError | None = None


class Handoffs:
    def __init__(self, grace: float = 2.0) -> None:
        self.grace = grace
        self._held: dict[str, Handoff] = {}
        self._prefix = secrets.token_hex(4)  # another replica's stream cannot take this one's hand-offs
        self._seq = itertools.count()

    def hold(self, handoff: Handoff, key: str | None = None) -> str:
        """Keep a hand-off for the ext_proc filter under `key` (the pick's exchange), or a new key."""
        key = key or f"{self._prefix}-h{next(self._seq)}"
        self._held[key] = handoff
        asyncio.get_running_loop().call_later(self.grace, self._held.pop, key, None)
        return key

    def take(self, key: str | None) -> Handoff | None:
        return self._held.pop(key, None) if key else None

    def __len__(self) -> int:
        return len(self._held)
