"""Leases: time-bounded, re-grantable rights to append to a space."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

from shard_sql.errors import InvalidEvent, LeaseHeld, StaleLease
from shard_sql.ports import BatchWriter, Clock, LeaseStore, system_clock
from shard_sql.validation import (
    Pending,
    check_clock_time,
    check_lease,
    check_space,
    check_stored_space,
    check_text,
)
from shard_sql.values import Event, Lease

DEFAULT_TTL = 30.0
RENEW_WHEN_LEFT = 2 / 3
"""A holder renews its lease once less than this share of its TTL is left (a third of it has
passed): its serving thread, with rounds every TTL/6 at most, gets several tries before the lease
lapses, and an append renews at most every third of a TTL."""
_now = datetime.now


# -- the lease rules: pure functions of the current record and now ---------------------------
# Every adapter applies these (memory and git in Python, SQL in statements that mirror them;
# one contract test holds all of them to the same answers).


def check_ttl(ttl_seconds: object) -> float:
    if isinstance(ttl_seconds, bool) or not isinstance(ttl_seconds, int | float):
        raise InvalidEvent("ttl_seconds", "must be a number")
    if not 0 < ttl_seconds <= 86_400 * 365:
        raise InvalidEvent("ttl_seconds", "must be > 0 and at most a year")
    return float(ttl_seconds)


def granted(cur: Lease | None, space: str, holder: str, ttl_seconds: float, now: datetime) -> Lease:
    """The record after `holder` acquires `space`: a renewal while it holds it, a new grant
    (generation + 1) when the lease lapsed; `LeaseHeld` while another holder's lease is valid."""
    expires = now + timedelta(seconds=check_ttl(ttl_seconds))
    if cur is not None and cur.valid_at(now):
        if cur.holder != holder:
            raise LeaseHeld(cur)
        return Lease(space, holder, max(expires, cur.expires_at), cur.generation)
    return Lease(space, holder, expires, (cur.generation if cur else 0) + 1)


def renewed(cur: Lease | None, lease: Lease, ttl_seconds: float, now: datetime) -> Lease:
    """The record after `lease` is renewed; `StaleLease` unless it is still the valid grant."""
    expires = now + timedelta(seconds=check_ttl(ttl_seconds))
    if (
        cur is None
        or (cur.holder, cur.generation) != (lease.holder, lease.generation)
        or not cur.valid_at(now)
    ):
        raise StaleLease(lease, "lost before renewal")
    return Lease(lease.space, lease.holder, max(expires, cur.expires_at), cur.generation)


def released(cur: Lease | None, lease: Lease, now: datetime) -> Lease | None:
    """The record after `lease` is released (ended at `now`), or None: it is not current."""
    if cur is None or (cur.holder, cur.generation) != (lease.holder, lease.generation):
        return None
    return Lease(lease.space, lease.holder, min(now, cur.expires_at), cur.generation)


def revoked(cur: Lease | None, space: str, now: datetime) -> Lease | None:
    """The record after an operator revokes the space's lease: ended now, generation + 1 (its
    holder is fenced); None when the space never had a lease."""
    if cur is None:
        return None
    return Lease(space, cur.holder, min(now, cur.expires_at), cur.generation + 1)


ADVANCED_HOLDER = "shard-sql import"
"""The holder of a record that `advanced` creates (it is never valid)."""


def advanced(cur: Lease | None, space: str, generation: int, now: datetime) -> Lease | None:
    """The record after an import wrote events under generations up to `generation`: at least
    that generation, so the next grant is newer than every one in the log; a lease of a lower
    generation ends now (its holder is fenced, as by a revocation). None: nothing to change."""
    if generation < 1 or (cur is not None and cur.generation >= generation):
        return None
    if cur is None:
        return Lease(space, ADVANCED_HOLDER, now, generation)
    return Lease(space, cur.holder, min(now, cur.expires_at), generation)


def valid(cur: Lease | None, now: datetime) -> Lease | None:
    """`cur` if it is valid at `now`."""
    return cur if cur is not None and cur.valid_at(now) else None


def renewal_due(lease: Lease, now: datetime, ttl_seconds: float) -> bool:
    """Whether the holder of `lease` (granted for `ttl_seconds`) renews it at `now`."""
    return (lease.expires_at - now).total_seconds() < ttl_seconds * RENEW_WHEN_LEFT


def renewal_not_due_before(lease: Lease, ttl_seconds: float) -> datetime:
    """A time before which `renewal_due(lease, now, ttl_seconds)` is False (a second early, so
    no rounding matters): a holder that compares it with now asks `renewal_due` only after."""
    return lease.expires_at - timedelta(seconds=ttl_seconds * RENEW_WHEN_LEFT + 1)


def check_fence(fence: Lease | None, current: Lease | None) -> None:
    """Raise `StaleLease` unless `fence` is the current grant (same holder and generation).

    Adapters call this inside the write's transaction, with `current` read in it.
    """
    if fence is None:
        return
    if current is None:
        raise StaleLease(fence, "the space has no lease record")
    if current.holder != fence.holder or current.generation != fence.generation:
        raise StaleLease(
            fence, f"the current grant is {current.holder!r} generation {current.generation}"
        )


class MemoryLeases(LeaseStore):
    """Lease records in memory behind one lock; used by `InMemoryEventStore` and by a
    `LeaseRegistry()` that has no store."""

    def __init__(self, lock: threading.RLock | None = None) -> None:
        self._lock = lock or threading.RLock()
        self._leases: dict[str, Lease] = {}

    def locked(self) -> threading.RLock:
        """The lock guarding the records (and, in `InMemoryEventStore`, the logs)."""
        return self._lock

    def lease_record(self, space: str) -> Lease | None:
        """The space's lease record, valid or not."""
        with self._lock:
            return self._leases.get(space)

    def lease_acquire(self, space: str, holder: str, ttl_seconds: float, now: datetime) -> Lease:
        with self._lock:
            new = granted(self._leases.get(space), space, holder, ttl_seconds, now)
            self._leases[space] = new
            return new

    def lease_renew(self, lease: Lease, ttl_seconds: float, now: datetime) -> Lease:
        with self._lock:
            new = renewed(self._leases.get(lease.space), lease, ttl_seconds, now)
            self._leases[lease.space] = new
            return new

    def lease_release(self, lease: Lease, now: datetime) -> None:
        with self._lock:
            new = released(self._leases.get(lease.space), lease, now)
            if new is not None:
                self._leases[lease.space] = new

    def lease_current(self, space: str, now: datetime) -> Lease | None:
        with self._lock:
            return valid(self._leases.get(space), now)

    def lease_revoke(self, space: str, now: datetime) -> Lease | None:
        with self._lock:
            new = revoked(self._leases.get(space), space, now)
            if new is not None:
                self._leases[space] = new
            return new

    def lease_advance(self, space: str, generation: int, now: datetime) -> Lease | None:
        with self._lock:
            new = advanced(self._leases.get(space), space, generation, now)
            if new is not None:
                self._leases[space] = new
            return new


class LeaseRegistry:
    """Grants, renews and releases leases.

    `store=None` keeps the leases in this registry's memory (one process). With a store that keeps
    leases (`SqlEventStore`, `GitEventStore`, `InMemoryEventStore`), every process opening that
    store shares them and a fenced append is checked in the write's own transaction.
    `clock` returns an aware `datetime`; the default is the system clock in UTC.
    """

    def __init__(self, store: object | None = None, *, clock: Clock | None = None) -> None:
        if store is None:
            self._records: LeaseStore = MemoryLeases()
        elif isinstance(store, LeaseStore):
            self._records = store
        else:
            raise InvalidEvent("store", f"{type(store).__name__} keeps no leases")
        self.store: object | None = store
        self._clock = clock or system_clock
        self._ttls: dict[tuple[str, str, int], float] = {}

    def now(self) -> datetime:
        """The registry clock's time; it must be timezone-aware."""
        if self._clock is system_clock:
            return _now(UTC)  # the default clock: aware by construction, no checks
        return check_clock_time(self._clock())

    def acquire(self, space: str, holder: str, ttl_seconds: float = DEFAULT_TTL) -> Lease:
        """Grant `space` to `holder` for `ttl_seconds` (renew it if `holder` already holds it).

        Raises `LeaseHeld`, carrying the current lease, while another holder's lease is valid.
        """
        check_space(space)
        check_text("holder", holder)
        ttl = check_ttl(ttl_seconds)
        lease = self._records.lease_acquire(space, holder, ttl, self.now())
        self._ttls[(space, holder, lease.generation)] = ttl
        return lease

    def renew(self, lease: Lease, *, ttl_seconds: float | None = None) -> Lease:
        """Extend `lease` (same generation) by its TTL from now; `StaleLease` if it was lost."""
        check_lease("lease", lease)
        ttl = ttl_seconds
        if ttl is None:
            ttl = self._ttls.get((lease.space, lease.holder, lease.generation), DEFAULT_TTL)
        new = self._records.lease_renew(lease, check_ttl(ttl), self.now())
        self._ttls[(lease.space, lease.holder, lease.generation)] = ttl
        return new

    def release(self, lease: Lease) -> None:
        """End `lease` now so another node can acquire at once; a lost lease is left alone."""
        check_lease("lease", lease)
        self._records.lease_release(lease, self.now())
        self._ttls.pop((lease.space, lease.holder, lease.generation), None)

    def current(self, space: str) -> Lease | None:
        """The space's valid lease, if any."""
        check_stored_space(space)
        return self._records.lease_current(space, self.now())

    def revoke(self, space: str) -> Lease | None:
        """Operators: end the space's lease now and bump its generation, fencing its holder."""
        check_stored_space(space)
        return self._records.lease_revoke(space, self.now())

    # -- used by AppendAuthority -------------------------------------------------------------

    def fenced_write(
        self,
        store: BatchWriter,
        space: str,
        batch: Sequence[Pending],
        *,
        expected_seq: int,
        lease: Lease,
    ) -> list[Event]:
        """Write under `lease`, the fence checked atomically with the write."""
        if self.store is store:
            # The store keeps the lease records: it checks the fence in the write's transaction.
            return store.write(space, batch, expected_seq=expected_seq, fence=lease)
        assert isinstance(self._records, MemoryLeases)
        # Leases in this process's memory: holding their lock across the check and the write
        # keeps any new grant from slipping in between.
        with self._records.locked():
            check_fence(lease, self._records.lease_record(space))
            return store.write(
                space, batch, expected_seq=expected_seq, fence=lease, verify_fence=False
            )

    @contextmanager
    def fenced(self, store: object, lease: Lease) -> Iterator[Lease | None]:
        """A block whose writes to `store` are fenced by `lease`: yields the `fence=` to pass
        them. Leases kept in `store`: `lease` itself (the store checks it in the write's
        transaction). Leases in this registry's memory: checked here, their lock held through
        the block so no new grant slips in, and None. `StaleLease` if it is not current."""
        if self.store is store:
            yield lease
            return
        if not isinstance(self._records, MemoryLeases):
            raise InvalidEvent("registry", "keeps its leases in another store")
        with self._records.locked():
            check_fence(lease, self._records.lease_record(lease.space))
            yield None

    def fences(self, store: object) -> bool:
        """Whether this registry can fence writes to `store`."""
        return self.store is None or self.store is store
