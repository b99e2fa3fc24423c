"""Who may read /metrics: upstream's `--metrics-endpoint-auth` (on by default).

Upstream serves metrics through controller-runtime's
`filters.WithAuthenticationAndAuthorization`: the scraper's bearer token is checked with
a TokenReview (authentication.k8s.io/v1), then a SubjectAccessReview
(authorization.k8s.io/v1) asks whether that user (with its groups, uid and extra) may
`get` the non-resource URL `/metrics`. A missing or invalid token is 401, a token
without the grant 403. Answers are cached as upstream's delegating authenticator and
authorizer cache them (tokens 1 min, allowed 5 min, denied 30 s; bounded), so a
Prometheus scraping every few seconds costs the API server almost nothing. An API error
is never cached as a denial: the scrape gets 503 (upstream: 500) and the next one asks
again; a missing grant for epp itself (it may not create TokenReviews) is 500 and logged
once with the rule to add.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx2
from lightkube import ApiError, AsyncClient
from lightkube.models.authentication_v1 import TokenReviewSpec
from lightkube.models.authorization_v1 import NonResourceAttributes, SubjectAccessReviewSpec
from lightkube.resources.authentication_v1 import TokenReview
from lightkube.resources.authorization_v1 import SubjectAccessReview

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class Decision:
    """The answer to one request: `status` 200 lets it through; otherwise `reason` is the body."""

    status: int
    reason: str = ""
    user: str = ""

    @property
    def allowed(self) -> bool:
        return self.status == 200


@dataclass(frozen=True)
class Identity:
    username: str
    uid: str
    groups: tuple[str, ...]
    extra: tuple[tuple[str, tuple[str, ...]], ...]


class _Unavailable(Exception):
    """The API server could not answer (after retries): not a decision about the caller."""


class _Misconfigured(Exception):
    """epp itself may not ask (403 on the review): the operator must add a grant."""


class _TTLCache:
    """At most `size` entries, least recently used out first, each with its own expiry."""

    def __init__(self, size: int, clock: Callable[[], float]) -> None:
        self.size, self.clock = size, clock
        self._data: OrderedDict[Hashable, tuple[float, Any]] = OrderedDict()

    def get(self, key: Hashable) -> tuple[bool, Any]:
        hit = self._data.get(key)
        if hit is None:
            return False, None
        if hit[0] <= self.clock():
            del self._data[key]
            return False, None
        self._data.move_to_end(key)
        return True, hit[1]

    def put(self, key: Hashable, value: Any, ttl: float) -> None:
        if ttl <= 0:
            return
        self._data[key] = (self.clock() + ttl, value)
        self._data.move_to_end(key)
        while len(self._data) > self.size:
            self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)


def bearer_token(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, as the API server's bearer authenticator reads it."""
    if not header:
        return None
    parts = header.strip().split(" ")
    if len(parts) < 2 or parts[0].lower() != "bearer" or not parts[1]:
        return None
    return parts[1]


class KubernetesAuthorizer:
    """TokenReview + SubjectAccessReview with caches; `check()` never raises for a caller's mistake."""

    def __init__(
        self,
        client: AsyncClient,
        *,
        authn_ttl: float = 60.0,
        allow_ttl: float = 300.0,
        deny_ttl: float = 30.0,
        max_entries: int = 1024,
        retry_initial: float = 0.5,
        retry_factor: float = 1.5,
        retry_steps: int = 5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.authn_ttl, self.allow_ttl, self.deny_ttl = authn_ttl, allow_ttl, deny_ttl
        self.retry_initial, self.retry_factor, self.retry_steps = retry_initial, retry_factor, retry_steps
        self._tokens = _TTLCache(max_entries, clock)
        self._access = _TTLCache(max_entries, clock)
        self._pending: dict[Hashable, asyncio.Future[Any]] = {}
        self._down_since: float | None = None
        self._logged: set[str] = set()

    async def check(self, authorization: str | None, path: str, verb: str) -> Decision:
        """May the bearer of this `Authorization` header `verb` (lower-case HTTP method) the URL `path`?"""
        token = bearer_token(authorization)
        if token is None:
            return Decision(401, "Unauthorized")
        try:
            who = await self._authenticate(token)
            if who is None:
                return Decision(401, "Unauthorized")
            allowed = await self._authorize(who, path, verb)
        except _Unavailable:
            return Decision(503, "Authentication and authorization are unavailable: the Kubernetes API does not answer")
        except _Misconfigured as e:
            return Decision(500, str(e))
        if not allowed:
            return Decision(403, f"Authorization denied for user {who.username}", who.username)
        return Decision(200, "", who.username)

    async def _authenticate(self, token: str) -> Identity | None:
        key = hashlib.sha256(token.encode()).digest()  # the cache never holds a token itself
        hit, who = self._tokens.get(key)
        if hit:
            return who
        who = await self._once(("authn", key), lambda: self._token_review(token))
        self._tokens.put(key, who, self.authn_ttl)
        return who

    async def _token_review(self, token: str) -> Identity | None:
        review = await self._call("TokenReview", "tokenreviews.authentication.k8s.io",
                                  lambda: self.client.create(TokenReview(spec=TokenReviewSpec(token=token))))
        st = review.status
        if st is None or not st.authenticated or st.user is None:
            return None
        u = st.user
        extra = tuple(sorted((k, tuple(v)) for k, v in (u.extra or {}).items()))
        return Identity(u.username or "", u.uid or "", tuple(u.groups or ()), extra)

    async def _authorize(self, who: Identity, path: str, verb: str) -> bool:
        key = (who, path, verb)
        hit, allowed = self._access.get(key)
        if hit:
            return bool(allowed)
        allowed = bool(await self._once(("authz", key), lambda: self._access_review(who, path, verb)))
        self._access.put(key, allowed, self.allow_ttl if allowed else self.deny_ttl)
        return allowed

    async def _access_review(self, who: Identity, path: str, verb: str) -> bool:
        spec = SubjectAccessReviewSpec(user=who.username, uid=who.uid or None, groups=list(who.groups) or None,
                                       extra={k: list(v) for k, v in who.extra} or None,
                                       nonResourceAttributes=NonResourceAttributes(path=path, verb=verb))
        review = await self._call("SubjectAccessReview", "subjectaccessreviews.authorization.k8s.io",
                                  lambda: self.client.create(SubjectAccessReview(spec=spec)))
        return bool(review.status and review.status.allowed)

    async def _once(self, key: Hashable, ask: Callable[[], Awaitable[T]]) -> T:
        """One API call for concurrent requests asking the same question."""
        pending = self._pending.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[key] = fut
        try:
            result = await ask()
        except BaseException as e:
            fut.set_exception(e)
            fut.exception()  # retrieved: waiters re-raise it, nobody warns about it
            raise
        else:
            fut.set_result(result)
            return result
        finally:
            del self._pending[key]

    async def _call(self, what: str, resource: str, send: Callable[[], Awaitable[T]]) -> T:
        delay = self.retry_initial
        for attempt in range(max(1, self.retry_steps)):
            try:
                result = await send()
            except ApiError as e:
                code = e.status.code or 0
                if code == 403:
                    self._log_once(f"403:{resource}", "metrics authentication is misconfigured: epp may not create "
                                   "%s (%s); grant `create` on %s to epp's ServiceAccount (a ClusterRole)",
                                   resource, e.status.message, resource)
                    raise _Misconfigured(f"{what} failed: epp may not create {resource}") from None
                if code < 500 and code != 429:
                    log.error("%s refused by the Kubernetes API: HTTP %s %s", what, code, e.status.message)
                    raise _Misconfigured(f"{what} failed: HTTP {code}") from None
                err: Exception = e
            except (httpx2.HTTPError, OSError) as e:
                err = e
            else:
                if self._down_since is not None:
                    log.info("metrics authentication reaches the Kubernetes API again after %.1fs",
                             time.monotonic() - self._down_since)
                    self._down_since = None
                return result
            if attempt + 1 < self.retry_steps:
                await asyncio.sleep(delay)
                delay *= self.retry_factor
        if self._down_since is None:
            self._down_since = time.monotonic()
            log.warning("metrics authentication cannot reach the Kubernetes API (%s: %s); /metrics answers 503 to "
                        "scrapers not already cached until it is back", type(err).__name__, err)
        raise _Unavailable from None

    def _log_once(self, key: str, msg: str, *args: Any) -> None:
        if key not in self._logged:
            self._logged.add(key)
            log.error(msg, *args)
