"""The fence on PostgreSQL under READ COMMITTED: an append and a new grant of the same space
are ordered by the lease row's lock, so no write under generation g commits after the grant of
g + 1 committed."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest

from shard_sql import LeaseRegistry, SqlEventStore, StaleLease
from shard_sql.sql.dialects.postgres import append_one_sql
from shard_sql.testing import ManualClock

pytestmark = pytest.mark.postgres


@pytest.fixture
def store(pg_migrated_url: str) -> Iterator[SqlEventStore]:
    with SqlEventStore(pg_migrated_url) as s:
        yield s


def libpq(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


class Background(threading.Thread):
    def __init__(self, fn: Any) -> None:
        super().__init__(daemon=True)
        self.fn, self.result, self.error, self.done_at = fn, None, None, 0.0

    def run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as e:
            self.error = e
        self.done_at = time.monotonic()


def test_new_grant_waits_for_an_append_in_flight(
    store: SqlEventStore, pg_migrated_url: str
) -> None:
    clock = ManualClock()
    registry = LeaseRegistry(store, clock=clock)
    lease = registry.acquire("s", "a", 10)
    # The store's own fenced append statement, in a transaction held open: it has passed the
    # fence (FOR SHARE on the lease row) and inserted, but not committed yet.
    sql = append_one_sql(fence=True, intent=False)
    now = datetime.now(UTC)
    params = ("s", 0, "t", "{}", now, "a", lease.generation, None, "s", 0)
    params += ("s", "a", lease.generation)
    with psycopg.connect(libpq(pg_migrated_url)) as slow_writer:
        assert slow_writer.execute(sql, params).rowcount == 1
        clock.advance(11)  # a's lease lapsed: b may take the space
        grant = Background(lambda: registry.acquire("s", "b", 10))
        grant.start()
        time.sleep(0.4)
        assert grant.is_alive(), "the new grant must wait for the append holding the fence"
        committed_at = time.monotonic()
        slow_writer.commit()
        grant.join(10)
    assert grant.error is None and grant.done_at >= committed_at
    assert grant.result is not None and grant.result.generation == lease.generation + 1
    [e] = store.events("s")
    assert (e.writer, e.generation) == ("a", lease.generation)


@pytest.mark.parametrize("batch", [False, True], ids=["append", "append_many"])
def test_append_waits_for_a_grant_in_flight_then_is_stale(
    store: SqlEventStore, pg_migrated_url: str, batch: bool
) -> None:
    registry = LeaseRegistry(store, clock=ManualClock())
    lease = registry.acquire("s", "a", 10)

    def write() -> object:
        if batch:
            return store.append_many("s", [("t", {})] * 3, expected_seq=0, fence=lease)
        return store.append("s", "t", {}, expected_seq=0, fence=lease)

    with psycopg.connect(libpq(pg_migrated_url)) as granter:
        granter.execute(
            "UPDATE leases SET holder = 'b', generation = generation + 1 WHERE space = 's'"
        )
        append = Background(write)
        append.start()
        time.sleep(0.4)
        assert append.is_alive(), "the fenced append must wait for the grant in flight"
        granter.commit()
        append.join(10)
    assert isinstance(append.error, StaleLease)
    assert store.head("s") == 0


def test_renewal_does_not_change_the_fence(store: SqlEventStore) -> None:
    clock = ManualClock()
    registry = LeaseRegistry(store, clock=clock)
    lease = registry.acquire("s", "a", 10)
    clock.advance(5)
    renewed = registry.renew(lease)
    assert renewed.generation == lease.generation
    # The old Lease value (same holder, same generation) still passes the fence: expiry is
    # not the token, the generation is.
    store.append("s", "t", {}, expected_seq=0, fence=lease)
    clock.advance(100)
    store.append("s", "t", {}, expected_seq=1, fence=lease)
    registry.acquire("s", "b", 10)
    with pytest.raises(StaleLease):
        store.append("s", "t", {}, expected_seq=2, fence=lease)
