"""The SQL lease records: each statement mirrors a rule of `shard_sql.leases` (the statements
are the dialect's). A part of `SqlEventStore`, kept in its own module for size."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from shard_sql.errors import LeaseHeld, StaleLease, StoreUnavailable
from shard_sql.leases import ADVANCED_HOLDER, check_ttl
from shard_sql.ports import LeaseStore
from shard_sql.sql.connections import Database
from shard_sql.sql.dialects import Conn
from shard_sql.sql.dialects.base import Dialect
from shard_sql.sql.errors import Site, guarded
from shard_sql.sql.intents import SqlIntentQueue
from shard_sql.validation import check_stored_space
from shard_sql.values import Lease

__all__ = ["SqlLeaseRecords"]


class SqlLeaseRecords(LeaseStore):
    """`LeaseStore` over the `leases` table; the store sets the attributes below."""

    database: Database
    where: str
    _site: Site
    _dialect: Dialect
    _intents: SqlIntentQueue

    def _lease_record(self, c: Conn, space: str, *, locked: bool = False) -> Lease | None:
        d = self._dialect
        c.cur.execute(d.lease_locked_sql if locked else d.lease_sql, (space,))
        row = c.cur.fetchone()
        return None if row is None else d.lease(space, row)

    @guarded
    def lease_record(self, space: str) -> Lease | None:
        """The space's lease record, valid or not (None: never leased)."""
        check_stored_space(space)
        return self.database.call(self._lease_record, space)

    def _returning(self, c: Conn, sql: str, params: Sequence[Any]) -> Any:
        c.cur.execute(sql, params)
        rows = c.cur.fetchall()
        return rows[0] if rows else None

    @guarded
    def lease_acquire(self, space: str, holder: str, ttl_seconds: float, now: datetime) -> Lease:
        expires = now + timedelta(seconds=check_ttl(ttl_seconds))
        lease = self.database.call(self._acquire, space, holder, expires, now)
        # This process's waits end once, so that a serving thread waiting on the spaces it held
        # before waits on its new set.
        self._intents.waits.lease_granted()
        return lease

    def _acquire(self, c: Conn, space: str, holder: str, expires: datetime, now: datetime) -> Lease:
        d = self._dialect
        t_now, t_exp = d.time(now), d.time(expires)
        grant = (holder, t_now, holder, t_now, t_exp, t_exp, holder, space, holder, t_now)

        def attempt() -> Lease | None:
            row = self._returning(c, d.grant_sql, grant)
            if row is None:
                row = self._returning(c, d.first_grant_sql, (space, holder, t_exp))
            if row is not None:
                return d.lease(space, row)
            cur = self._lease_record(c, space)
            if cur is not None and cur.valid_at(now) and cur.holder != holder:
                raise LeaseHeld(cur)
            return None  # the record changed between the statements: try again

        for _ in range(100):
            lease = d.lease_transaction(c, attempt)
            if lease is not None:
                return lease
        raise StoreUnavailable(f"{self.where}: lease on {space!r} kept changing; try again")

    @guarded
    def lease_renew(self, lease: Lease, ttl_seconds: float, now: datetime) -> Lease:
        expires = now + timedelta(seconds=check_ttl(ttl_seconds))
        d = self._dialect
        params = (d.time(expires), lease.space, lease.holder, lease.generation, d.time(now))
        row = self.database.call(self._returning, d.renew_sql, params)
        if row is None:
            raise StaleLease(lease, "lost before renewal")
        return d.lease(lease.space, row)

    @guarded
    def lease_release(self, lease: Lease, now: datetime) -> None:
        d = self._dialect
        params = (d.time(now), lease.space, lease.holder, lease.generation)
        self.database.call(self._execute, d.release_sql, params)

    def _execute(self, c: Conn, sql: str, params: Sequence[Any]) -> None:
        c.cur.execute(sql, params)

    @guarded
    def lease_current(self, space: str, now: datetime) -> Lease | None:
        d = self._dialect
        row = self.database.call(self._returning, d.current_sql, (space, d.time(now)))
        return None if row is None else d.lease(space, row)

    @guarded
    def lease_revoke(self, space: str, now: datetime) -> Lease | None:
        d = self._dialect
        row = self.database.call(self._returning, d.revoke_sql, (d.time(now), space), retry=False)
        return None if row is None else d.lease(space, row)

    @guarded
    def lease_advance(self, space: str, generation: int, now: datetime) -> Lease | None:
        check_stored_space(space)
        if generation < 1:
            return None
        return self.database.call(self._advance, space, generation, now)

    def _advance(self, c: Conn, space: str, generation: int, now: datetime) -> Lease | None:
        d = self._dialect
        t_now = d.time(now)

        def attempt() -> tuple[Lease | None] | None:
            row = self._returning(c, d.advance_sql, (t_now, generation, space, generation))
            if row is None:
                first = (space, ADVANCED_HOLDER, t_now, generation)
                row = self._returning(c, d.first_advance_sql, first)
            if row is not None:
                return (d.lease(space, row),)
            cur = self._lease_record(c, space)
            if cur is not None and cur.generation >= generation:
                return (None,)  # there already
            return None  # the record changed between the statements: try again

        for _ in range(100):
            done = d.lease_transaction(c, attempt)
            if done is not None:
                return done[0]
        raise StoreUnavailable(f"{self.where}: lease on {space!r} kept changing; try again")
