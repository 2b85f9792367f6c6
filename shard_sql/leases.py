"""Leases: time-bounded, re-grantable rights to append to a space."""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from shard_sql.errors import InvalidEvent
from shard_sql.memory import MemoryLeases, check_ttl
from shard_sql.store import BatchWriter, Clock, LeaseStore, check_fence, system_clock
from shard_sql.validation import Pending, check_space, check_text
from shard_sql.values import Event, Lease

if TYPE_CHECKING:
    from shard_sql.authority import AppendAuthority

DEFAULT_TTL = 30.0
_now = datetime.now


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
        self._nodes: weakref.WeakValueDictionary[str, AppendAuthority] = (
            weakref.WeakValueDictionary()
        )

    def now(self) -> datetime:
        """The registry clock's time; it must be timezone-aware."""
        if self._clock is system_clock:
            return _now(UTC)  # the default clock: aware by construction, no checks
        now = self._clock()
        if not isinstance(now, datetime) or now.tzinfo is None or now.utcoffset() is None:
            raise InvalidEvent("clock", "must return a timezone-aware datetime")
        return now

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
        ttl = ttl_seconds
        if ttl is None:
            ttl = self._ttls.get((lease.space, lease.holder, lease.generation), DEFAULT_TTL)
        new = self._records.lease_renew(lease, check_ttl(ttl), self.now())
        self._ttls[(lease.space, lease.holder, lease.generation)] = ttl
        return new

    def release(self, lease: Lease) -> None:
        """End `lease` now so another node can acquire at once; a lost lease is left alone."""
        self._records.lease_release(lease, self.now())
        self._ttls.pop((lease.space, lease.holder, lease.generation), None)

    def current(self, space: str) -> Lease | None:
        """The space's valid lease, if any."""
        check_space(space)
        return self._records.lease_current(space, self.now())

    def revoke(self, space: str) -> Lease | None:
        """Operators: end the space's lease now and bump its generation, fencing its holder."""
        check_space(space)
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

    def register(self, node: AppendAuthority) -> None:
        self._nodes[node.node_id] = node

    def local_node(self, node_id: str) -> AppendAuthority | None:
        return self._nodes.get(node_id)

    def fences(self, store: object) -> bool:
        """Whether this registry can fence writes to `store`."""
        return self.store is None or self.store is store
