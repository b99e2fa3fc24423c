"""Leader election on a coordination.k8s.io/v1 Lease, as upstream's `--ha-enable-leader-election`.

Upstream (controller-runtime over client-go's leaderelection) holds a Lease named
`epp-<namespace>-<pool>.llm-d.ai` (GIE v1.5: `...gateway-api-inference-extension.sigs.k8s.io`)
in the pool's namespace, with lease duration 15 s, renew deadline 10 s, retry period 2 s,
and releases it on a graceful stop. Only the leader reports ready; the others keep their
datastore warm and take over once the lease expires.

The algorithm is client-go's: a candidate reads the Lease every retry period (jittered)
and takes it when it is free or its holder has not renewed it for the lease duration, as
measured on this replica's own clock from when it last saw the record change (no clock
skew between replicas matters). Every write carries the resourceVersion last read, so two
candidates racing for it cannot both win (409 Conflict). The leader renews every retry
period and stops claiming leadership as soon as it sees another holder, or when it could
not renew for the renew deadline, which is shorter than the lease duration, so it has
stepped down before anyone else may take over. Unlike upstream, which exits the process
when it loses the lease, it goes back to being a candidate.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import random
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from lightkube import ApiError, AsyncClient
from lightkube.models.coordination_v1 import LeaseSpec
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.coordination_v1 import Lease

log = logging.getLogger(__name__)

LLMD_LEASE_SUFFIX = "llm-d.ai"
GIE_LEASE_SUFFIX = "gateway-api-inference-extension.sigs.k8s.io"


def lease_name(namespace: str, pool_name: str, suffix: str = LLMD_LEASE_SUFFIX) -> str:
    """Upstream's Lease name for the EPP of one pool (`epp-<namespace>-<pool>.<suffix>`)."""
    return f"epp-{namespace}-{pool_name}.{suffix}"


def default_identity() -> str:
    """`<hostname>_<uuid>`, as controller-runtime names a candidate (the pod name is the hostname)."""
    return f"{socket.gethostname()}_{uuid.uuid4()}"


def _micro_now() -> datetime.datetime:
    # The API server decodes Lease times as MicroTime, which needs all six fractional digits; the encoder
    # drops the fraction when it is zero, so a whole second is nudged by one microsecond.
    t = datetime.datetime.now(datetime.UTC)
    return t if t.microsecond else t.replace(microsecond=1)


@dataclass(frozen=True)
class _Record:
    holder: str
    duration: int
    acquire: datetime.datetime | None
    renew: datetime.datetime | None
    transitions: int


def _record(lease: Lease) -> _Record:
    s = lease.spec or LeaseSpec()
    return _Record(s.holderIdentity or "", s.leaseDurationSeconds or 0, s.acquireTime, s.renewTime,
                   s.leaseTransitions or 0)


class LeaderElector:
    """Campaigns for, holds and releases one Lease. `run()` returns only when cancelled.

    `is_leader` is this replica's current claim; `on_change(is_leader)` is called (on the
    event loop) and `changed` is set at every change. Cancelling `run()` releases a held
    lease first (`release_on_cancel`, upstream's LeaderElectionReleaseOnCancel), so a
    standby takes over at its next retry instead of after the lease duration.
    """

    def __init__(
        self,
        client: AsyncClient,
        name: str,
        namespace: str,
        *,
        identity: str | None = None,
        lease_duration: float = 15.0,
        renew_deadline: float = 10.0,
        retry_period: float = 2.0,
        release_on_cancel: bool = True,
        on_change: Callable[[bool], None] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if not 0 < retry_period < renew_deadline < lease_duration:
            raise ValueError(f"leader election needs retry period < renew deadline < lease duration, got "
                             f"{retry_period}s, {renew_deadline}s, {lease_duration}s")
        self.client, self.name, self.namespace = client, name, namespace
        self.identity = identity or default_identity()
        self.lease_duration, self.renew_deadline, self.retry_period = lease_duration, renew_deadline, retry_period
        self.release_on_cancel = release_on_cancel
        self.on_change = on_change
        self.rng = rng or random.Random()
        self.changed = asyncio.Event()
        self.transitions = 0  # leadership gained or lost here: for tests and the debug log
        self._leading = False
        self._lease: Lease | None = None  # the object last read or written: its resourceVersion
        self._observed: _Record | None = None
        self._observed_at = 0.0
        self._renewed_at = 0.0
        self._failing: str | None = None

    @property
    def is_leader(self) -> bool:
        return self._leading

    @property
    def holder(self) -> str:
        """The holder as last seen ("" if none or not yet read)."""
        return self._observed.holder if self._observed else ""

    def _set_leading(self, leading: bool, why: str = "") -> None:
        if leading == self._leading:
            return
        self._leading = leading
        self.transitions += 1
        if leading:
            log.info("this replica (%s) is now the leader (Lease %s/%s)", self.identity, self.namespace, self.name)
        else:
            log.warning("this replica (%s) is no longer the leader (Lease %s/%s): %s", self.identity,
                        self.namespace, self.name, why)
        if self.on_change is not None:
            self.on_change(leading)
        self.changed.set()

    async def run(self) -> None:
        try:
            while True:
                if self._leading:
                    left = self.renew_deadline - (time.monotonic() - self._renewed_at)
                    try:
                        async with asyncio.timeout(max(left, 0.001)):
                            ok = await self._try_acquire_or_renew()
                    except TimeoutError:
                        ok = False
                    if ok:
                        self._renewed_at = time.monotonic()
                    elif self._leading and time.monotonic() - self._renewed_at >= self.renew_deadline:
                        self._set_leading(False, f"could not renew it for {self.renew_deadline:g}s")
                    await asyncio.sleep(self.retry_period)
                else:
                    if await self._try_acquire_or_renew():
                        self._renewed_at = time.monotonic()
                        self._set_leading(True)
                        continue
                    await asyncio.sleep(self.retry_period * (1 + 1.2 * self.rng.random()))  # client-go's jitter
        except asyncio.CancelledError:
            if self.release_on_cancel and self._leading:
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    async with asyncio.timeout(self.retry_period):
                        await self.release()
            raise

    async def release(self) -> bool:
        """Stop claiming leadership, then hand the Lease back (holder empty), as client-go's release does."""
        if not self._leading or self._lease is None or self._observed is None:
            return True
        self._set_leading(False, "stepping down (graceful stop)")
        spec = LeaseSpec(holderIdentity="", leaseDurationSeconds=1, acquireTime=_micro_now(), renewTime=_micro_now(),
                         leaseTransitions=self._observed.transitions)
        try:
            self._lease = await self.client.replace(self._lease_with(spec))
        except Exception as e:
            log.warning("could not release Lease %s/%s (the standby takes over when it expires): %s",
                        self.namespace, self.name, e)
            return False
        log.info("released Lease %s/%s", self.namespace, self.name)
        return True

    def _lease_with(self, spec: LeaseSpec) -> Lease:
        rv = self._lease.metadata.resourceVersion if self._lease and self._lease.metadata else None
        return Lease(metadata=ObjectMeta(name=self.name, namespace=self.namespace, resourceVersion=rv), spec=spec)

    def _observe(self, lease: Lease) -> None:
        rec = _record(lease)
        if rec != self._observed:
            self._observed, self._observed_at = rec, time.monotonic()
        self._lease = lease

    def _spec(self, now: datetime.datetime, *, acquire: datetime.datetime | None, transitions: int) -> LeaseSpec:
        return LeaseSpec(holderIdentity=self.identity, leaseDurationSeconds=max(1, round(self.lease_duration)),
                         acquireTime=acquire or now, renewTime=now, leaseTransitions=transitions)

    async def _try_acquire_or_renew(self) -> bool:
        now = _micro_now()
        try:
            # The leader first writes over the record it last saw; a conflict sends it down the slow path.
            if self._leading and self._lease is not None and self._observed is not None:
                try:
                    lease = await self.client.replace(self._lease_with(self._spec(
                        now, acquire=self._observed.acquire, transitions=self._observed.transitions)))
                    self._observe(lease)
                    self._ok()
                    return True
                except ApiError as e:
                    if e.status.code != 409:
                        raise
            try:
                current = await self.client.get(Lease, self.name, namespace=self.namespace)
            except ApiError as e:
                if e.status.code != 404:
                    raise
                self._lease = None
                try:
                    created = await self.client.create(self._lease_with(self._spec(now, acquire=None,
                                                                                   transitions=0)))
                except ApiError as e2:
                    if e2.status.code == 409:  # another candidate created it first
                        return False
                    raise
                self._observe(created)
                self._ok()
                return True
            self._observe(current)
            rec = self._observed
            assert rec is not None
            valid = time.monotonic() < self._observed_at + rec.duration
            if rec.holder and rec.holder != self.identity and valid:
                if self._leading:
                    self._set_leading(False, f"the Lease is held by {rec.holder}")
                self._ok()
                return False
            ours = rec.holder == self.identity
            spec = self._spec(now, acquire=rec.acquire if ours else None,
                              transitions=rec.transitions if ours else rec.transitions + 1)
            try:
                self._observe(await self.client.replace(self._lease_with(spec)))
            except ApiError as e:
                if e.status.code == 409:  # someone wrote it since we read it: read again next time
                    return False
                raise
            self._ok()
            return True
        except (asyncio.CancelledError, TimeoutError):
            raise
        except Exception as e:
            self._failed(e)
            return False

    def _failed(self, err: Exception) -> None:
        what = f"HTTP {err.status.code}: {err.status.message}" if isinstance(err, ApiError) else (
            f"{type(err).__name__}: {err}")
        if self._failing is None:
            hint = ""
            if isinstance(err, ApiError) and err.status.code == 403:
                hint = " (grant get, create and update on coordination.k8s.io leases to epp's ServiceAccount)"
            log.warning("leader election cannot reach Lease %s/%s: %s%s; retrying every %gs", self.namespace,
                        self.name, what, hint, self.retry_period)
        self._failing = what

    def _ok(self) -> None:
        if self._failing is not None:
            log.info("leader election reaches Lease %s/%s again", self.namespace, self.name)
            self._failing = None
