"""`SqlEventStore`: events and leases in a SQLite file or a PostgreSQL database.

Reads, the write path and the lease statements; the forwarded intents are `SqlIntentQueue`'s.
How and why (one statement per append, the fence's row lock, retries): docs/sql.md.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy.engine import URL, Connection, Engine

from shard_sql.errors import InvalidEvent, SeqConflict
from shard_sql.leases import check_fence
from shard_sql.ports import (
    FeedStore,
    IntentInbox,
    IntentQueue,
    SpaceWakeups,
    Transaction,
    system_clock,
)
from shard_sql.sql.clock import DatabaseClock
from shard_sql.sql.connections import Database
from shard_sql.sql.dialects import Conn, EngineOptions
from shard_sql.sql.dialects.base import Statement
from shard_sql.sql.dialects.sqlite import SYNCHRONOUS
from shard_sql.sql.errors import DEFAULT_BUSY_TIMEOUT, guarded, translate
from shard_sql.sql.intents import SqlIntentQueue
from shard_sql.sql.lease_records import SqlLeaseRecords
from shard_sql.sql.listener import Listener
from shard_sql.sql.payload_reads import SqlPayloadReads
from shard_sql.sql.schema import open_schema
from shard_sql.sql.transaction import HostConnections, SqlTransaction
from shard_sql.sql.urls import check_schema_name
from shard_sql.sql.waits import FEED_POLL
from shard_sql.store_base import StoreBase, already_written, feed_pages, stamp
from shard_sql.validation import (
    Pending,
    check_checkpoint_name,
    check_events_read,
    check_feed_read,
    check_position,
    check_stored_space,
    check_timeout,
    check_types,
)
from shard_sql.values import Event, Lease, new_event

__all__ = ["SqlEventStore"]

_now = datetime.now
_R = TypeVar("_R")


def _check_options(
    sqlite_synchronous: object,
    busy_timeout: object,
    pool_size: object,
    max_overflow: object,
    pool_timeout: object,
    schema: object,
) -> EngineOptions:
    if not isinstance(sqlite_synchronous, str) or sqlite_synchronous.upper() not in SYNCHRONOUS:
        raise InvalidEvent("sqlite_synchronous", f"must be one of {', '.join(SYNCHRONOUS)}")
    for name, value in (("busy_timeout", busy_timeout), ("pool_timeout", pool_timeout)):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidEvent(name, "must be a number of seconds")
        if not 0 <= value <= 3600:  # also refuses NaN
            raise InvalidEvent(name, "must be between 0 and 3600 seconds")
    for name, value, low in (("pool_size", pool_size, 1), ("max_overflow", max_overflow, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= 10_000:
            raise InvalidEvent(name, f"must be a whole number from {low} to 10000")
    assert isinstance(busy_timeout, int | float) and isinstance(pool_timeout, int | float)
    assert isinstance(pool_size, int) and isinstance(max_overflow, int)
    return EngineOptions(
        synchronous=sqlite_synchronous.upper(),
        busy_timeout=float(busy_timeout),
        pool_size=pool_size,
        max_overflow=max_overflow,
        pool_timeout=float(pool_timeout),
        schema=check_schema_name(schema),
    )


class SqlEventStore(
    StoreBase, FeedStore, SqlPayloadReads, SqlLeaseRecords, IntentQueue, IntentInbox, SpaceWakeups
):
    """Events and leases in a SQL database: a SQLite file or a PostgreSQL server.

    `url_or_engine`: a SQLAlchemy URL (`sqlite:///path.db`, `postgresql+psycopg://...`; plain
    `postgresql://` selects psycopg too) or an `Engine`. A PostgreSQL engine is used as is and
    left open by `close()`; the store holds its connections only while it uses them. For a
    SQLite engine the store opens its own connections to its file.

    A SQLite file is migrated to the head schema when opened; any other database must already be
    at head (else `SchemaError`) unless `migrate=True`.

    `schema` (PostgreSQL; also `?shard_sql_schema=NAME` in the URL): shard_sql's tables live in
    that schema, named in every statement, beside an application's own tables of the same names
    (docs/embedding.md). SQLite has none: `InvalidEvent`.

    Connections (of the store's own engine): `pool_size` kept open, up to `max_overflow` more
    under load; a call that finds none free waits `pool_timeout` seconds, then
    `StoreUnavailable`. SQLite options: `sqlite_synchronous` ("FULL", the default: an
    acknowledged append survives power loss; "NORMAL": faster, the last appends may be lost on
    power loss, never corrupted), also settable as `?synchronous=NORMAL` in the URL;
    `busy_timeout` (seconds a write waits for another process's write lock).
    """

    ITER_PAGE = 2000

    def __init__(
        self,
        url_or_engine: str | URL | Engine,
        *,
        migrate: bool = False,
        sqlite_synchronous: str = "FULL",
        busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
        pool_size: int = 5,
        max_overflow: int = 5,
        pool_timeout: float = 30.0,
        schema: str | None = None,
    ) -> None:
        options = _check_options(
            sqlite_synchronous, busy_timeout, pool_size, max_overflow, pool_timeout, schema
        )
        self._closed = False
        self.database = Database(url_or_engine, options)
        """The store's engine, dialect and connections (for tools and tests)."""
        db = self.database
        self._site = db.site
        self.where = db.site.where
        self._dialect = db.dialect
        self._insert_once = db.insert_once if db.dialect.retry_free_insert else None
        self._intents = SqlIntentQueue(db)
        self._clock = DatabaseClock(db)
        self._feed_written = self._intents.waits.feed_written
        self._next_position = 0
        """SQLite: the position after the one this store wrote last (0: unknown), tried first by
        the next single append (`Dialect.append_at`: no `RETURNING` to read back)."""
        self._guess_backoff = 0
        self._guess_pause = 0
        self._hosts = HostConnections(db)
        try:
            open_schema(db, migrate or self._dialect.migrates_on_open)
        except BaseException:
            self.close()
            raise

    def __repr__(self) -> str:
        return f"SqlEventStore({self._site.url!r})"

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine (for SQLite: the store's own)."""
        return self.database.engine

    @property
    def listener(self) -> Listener | None:
        """PostgreSQL: this process's notification listener, once a wait started it."""
        return self._intents.listener

    def database_clock(self) -> datetime:
        """The database server's current time (aware, UTC), for `LeaseRegistry(store,
        clock=store.database_clock)`: every host then judges lease expiry by one clock.
        PostgreSQL: `clock_timestamp()`, read at most once a second and extrapolated with the
        local monotonic clock in between. SQLite: the system clock."""
        return self._clock()

    def close(self) -> None:
        """Close the store's connections, and dispose the engine unless it was passed in."""
        if self._closed:
            return
        self._closed = True
        self._intents.close()
        self.database.close()

    def __enter__(self) -> SqlEventStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reads -----------------------------------------------------------------------------

    @guarded
    def events(self, space: str, *, from_seq: int = 0, limit: int | None = None) -> list[Event]:
        if check_events_read(space, from_seq, limit):
            return []
        return self.database.call(self._read, space, from_seq, limit)

    def _read(self, c: Conn, space: str, from_seq: int, limit: int | None) -> list[Event]:
        cur, d = c.cur, self._dialect
        if limit is None:
            cur.execute(d.read_sql, (space, from_seq))
        else:
            cur.execute(d.read_limit_sql, (space, from_seq, limit))
        return d.to_events(space, cur.fetchall())

    @guarded
    def head(self, space: str) -> int:
        check_stored_space(space)
        return self.database.call(self._head, space)

    def _head(self, c: Conn, space: str) -> int:
        c.cur.execute(self._dialect.head_sql, (space,))
        row = c.cur.fetchone()
        return 0 if row is None else int(row[0]) + 1

    @guarded
    def spaces(self) -> list[str]:
        return self.database.call(self._spaces)

    def _spaces(self, c: Conn) -> list[str]:
        c.cur.execute(self._dialect.spaces_sql)
        return [row[0] for row in c.cur.fetchall()]

    # -- the feed and checkpoints (FeedStore; docs/feed.md) ----------------------------------

    @guarded
    def feed(
        self,
        after: int = 0,
        *,
        limit: int | None = None,
        types: Collection[str] | None = None,
    ) -> list[Event]:
        nothing, wanted = check_feed_read(after, limit, types)
        if nothing:
            return []
        return self.database.call(self._feed, after, limit, wanted, True)

    def _feed(
        self, c: Conn, after: int, limit: int | None, types: frozenset[str] | None, place: bool
    ) -> list[Event]:
        d = self._dialect
        if place:
            d.place_feed(c)  # committed before the read below starts
        c.cur.execute(*d.feed_statement(after, limit, types))
        return d.to_feed_events(c.cur.fetchall())

    def iter_feed(self, after: int = 0, *, types: Collection[str] | None = None) -> Iterator[Event]:
        """Pages of `ITER_PAGE` events, placed once before the first page (events committed
        later are placed above what this reads: a later `feed` finds them)."""
        check_position("after", after)
        wanted = check_types(types)
        return self._iter_feed(after, wanted)

    def _iter_feed(self, after: int, types: frozenset[str] | None) -> Iterator[Event]:
        if types is not None and not types:
            return
        self.feed_head()

        def read(after: int, limit: int) -> list[Event]:
            return self._call_translated(self._feed, after, limit, types, False)

        yield from feed_pages(read, after, self.ITER_PAGE)

    @guarded
    def feed_head(self) -> int:
        return self.database.call(self._dialect.place_feed)

    def wait_feed(self, after: int, *, timeout: float) -> bool:
        """True as soon as an event above `after` is readable, False after `timeout` seconds.
        Between looks at the head it sleeps until a commit may have happened (PostgreSQL: a
        notification; SQLite: `data_version` and inotify), at most `FEED_POLL` seconds."""
        check_position("after", after)
        deadline = time.monotonic() + check_timeout(timeout)
        waits = self._intents.waits
        while True:
            if self._call_translated(self._dialect.feed_beyond, after):
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            waits.wait_feed(min(remaining, FEED_POLL))

    @guarded
    def checkpoint(self, name: str) -> int:
        check_checkpoint_name(name)
        row = self.database.call(self._returning, self._dialect.checkpoint_sql, (name,))
        return 0 if row is None else int(row[0])

    @guarded
    def checkpoints(self) -> dict[str, int]:
        return dict(self.database.call(self._rows, self._dialect.checkpoints_sql))

    def _rows(self, c: Conn, sql: str) -> list[tuple[Any, ...]]:
        c.cur.execute(sql)
        return [tuple(row) for row in c.cur.fetchall()]

    def feed_committed(self, cur: Any | None = None) -> None:
        """Events were committed by a write outside `write` (a transaction): wake the feed's
        waiters. `cur`: a cursor inside a transaction the store does not commit itself (a
        host's), to announce the events when that transaction commits."""
        if cur is not None:
            self._dialect.notify_feed(cur)
        elif self._feed_written is not None:
            self._feed_written()

    def transaction(self, connection: object | None = None) -> AbstractContextManager[Transaction]:
        """A block whose writes commit together (`SqlTransaction`): the store's own transaction,
        or, with `connection` (the host's SQLAlchemy `Connection` or `Session`, in a
        transaction, on the store's database), the host's transaction, which the block joins
        and does not commit. `InvalidEvent("connection")` for a closed session or connection,
        one not in a transaction, in autocommit, or on another database."""
        return SqlTransaction(self, connection)

    def join_host(self, host: Connection) -> Conn:
        """A cursor of a host's connection for a transaction's writes; `InvalidEvent` unless
        it can take them (`HostConnections`)."""
        return self._hosts.join(host)

    # -- the write path --------------------------------------------------------------------

    def write(
        self,
        space: str,
        batch: Sequence[Pending],
        *,
        expected_seq: int,
        fence: Lease | None,
        verify_fence: bool = True,
    ) -> list[Event]:
        """Write `batch` at `expected_seq` in one transaction, all or nothing: one event is one
        statement (`Dialect.append_one`) whose checks run again, to say why, only when it wrote
        nothing; a batch is one transaction (or one statement, `Dialect.append_small_batch`)."""
        check = fence if verify_fence else None
        if len(batch) == 1:
            p = batch[0]
            at = p.recorded_at or _now(UTC)
            writer = p.writer if p.writer is not None else fence.holder if fence else ""
            gen = p.generation if p.generation is not None else fence.generation if fence else 0
            insert_once = self._insert_once
            position = None
            if insert_once is not None:  # SQLite
                guess = self._next_position
                if guess:  # the position after the one this store wrote last: no RETURNING
                    statement = self._dialect.append_at(
                        space, p, expected_seq, at, writer, gen, check, guess
                    )
                    if statement is not None and insert_once(*statement) is not None:
                        position = guess
                        self._next_position = guess + 1
                        self._guess_backoff = 0
                    else:
                        self._missed_guess()
                if position is None:
                    sql, params = self._dialect.append_one(
                        space, p, expected_seq, at, writer, gen, check
                    )
                    position = insert_once(sql, params)
                    if position:
                        self._expect_next(position)
            if position is not None:
                written = [
                    new_event(
                        space, expected_seq, p.type, p.payload, at, writer, gen, p.intent_id,
                        position or None,
                    )
                ]  # fmt: skip
            else:
                statement = self._dialect.append_one(space, p, expected_seq, at, writer, gen, check)
                written = self._write_one(space, p, expected_seq, check, statement, at, writer, gen)
            if p.intent_id is not None:
                self._intents.waits.events_written(space)  # a forwarder may wait for it
        elif not batch:
            raise InvalidEvent("items", "must not be empty")
        else:
            written = self._write_batch(space, batch, expected_seq, fence, check)
        if self._feed_written is not None:
            self._feed_written()  # PostgreSQL: the feed's waiters (docs/feed.md)
        return written

    def _missed_guess(self) -> None:
        """SQLite: the append at the guessed position wrote nothing (another writer came
        between, or a check failed: it is written the usual way). No guess for the next 1, 2,
        4, ... 256 appends: other writers are busy."""
        self._guess_backoff = min(2 * self._guess_backoff or 1, 256)
        self._guess_pause = self._guess_backoff
        self._next_position = 0

    def _expect_next(self, position: int) -> None:
        """An append wrote `position` the usual way: guess the next one, unless paused."""
        if self._guess_pause:
            self._guess_pause -= 1
        else:
            self._next_position = position + 1

    def _write_one(
        self,
        space: str,
        p: Pending,
        seq: int,
        check: Lease | None,
        statement: Statement,
        at: datetime,
        writer: str,
        gen: int,
    ) -> list[Event]:
        """A single-event write through `Database.call` (retries, reconnects); when it writes
        nothing, `_check_write` says why."""
        batch = [p]
        try:
            for _ in range(3):
                position = self.database.call(
                    self._insert, *statement, retry=p.intent_id is not None
                )
                if position is not None:
                    return [
                        new_event(
                            space, seq, p.type, p.payload, at, writer, gen, p.intent_id,
                            position or None,
                        )
                    ]  # fmt: skip
                # Nothing written: say why (the same checks, in the reference adapter's order).
                done = self.database.call(self._check_write, space, batch, seq, check)
                if done is not None:
                    return done
            raise SeqConflict(space, seq)
        except Exception as e:
            return self._write_failed(e, space, batch, seq, check)

    def _insert(self, c: Conn, sql: str, params: Sequence[Any]) -> int | None:
        """Run a single-event INSERT: None if it wrote nothing, else the row's position (0: to
        be placed after the commit)."""
        try:
            return self._dialect.insert_one(c, sql, params)
        except Exception as e:
            if self._dialect.is_check_failure(e):
                return None
            raise

    def _write_batch(
        self,
        space: str,
        batch: Sequence[Pending],
        expected_seq: int,
        fence: Lease | None,
        check: Lease | None,
    ) -> list[Event]:
        now = system_clock()
        # A write whose every event has an intent id can be repeated safely after a lost
        # connection: a committed first attempt is then found and returned, never doubled.
        repeatable = all(p.intent_id is not None for p in batch)
        try:
            for _ in range(3):
                done = self.database.call(
                    self._write, space, batch, fence, check, expected_seq, now, retry=repeatable
                )
                if done is not None:
                    if any(p.intent_id for p in batch):
                        self._intents.waits.events_written(space)
                    return done
            # Three benign races in a row (the head moved between the write and the check).
            raise SeqConflict(space, expected_seq)
        except Exception as e:
            return self._write_failed(e, space, batch, expected_seq, check)

    def _write_failed(
        self,
        e: Exception,
        space: str,
        batch: Sequence[Pending],
        expected_seq: int,
        check: Lease | None,
    ) -> list[Event]:
        """Called in a failed write's `except`: raise its `ShardSqlError` (a driver error
        translated), or return the events of a writer of the same intent ids that won a race."""
        err = translate(e, self._site, space=space, expected_seq=expected_seq)
        if err is None:
            raise e
        if err is e:
            raise err
        if isinstance(err, SeqConflict) and any(p.intent_id for p in batch):
            # Lost a race with a writer of the same intent id: return what it wrote.
            done = self._call_translated(self._check_write, space, batch, expected_seq, check)
            if done is not None:
                return done
        raise err from e

    @guarded
    def _call_translated(self, fn: Callable[..., _R], *args: Any) -> _R:
        return self.database.call(fn, *args)

    def _write(
        self,
        c: Conn,
        space: str,
        batch: Sequence[Pending],
        fence: Lease | None,
        check: Lease | None,
        expected_seq: int,
        now: datetime,
    ) -> list[Event] | None:
        """One attempt at a batch: the events written, the events an earlier call wrote for these
        intent ids, a raised error, or None (a benign race: try again). `fence` stamps the
        events (writer, generation), `check` is the fence checked."""
        d = self._dialect
        if d.small_batch(batch):
            events = [stamp(space, expected_seq + n, p, fence, now) for n, p in enumerate(batch)]
            if d.write_small_batch(c, space, events, batch, check, expected_seq):
                return events
            return self._check_write(c, space, batch, expected_seq, check)
        d.begin_write(c)
        done = self._check_write(c, space, batch, expected_seq, check, locked=True)
        if done is not None:
            d.rollback(c)
            return done
        # Each event is built once, when its position is known (SQLite). A batch shares one
        # time, writer and generation (an import keeps each event's).
        at = d.time(now)
        writer, generation = (fence.holder, fence.generation) if fence else ("", 0)
        rows = [
            (space, expected_seq + n, p.type, p.payload_json,
             at if p.recorded_at is None else d.time(p.recorded_at),
             writer if p.writer is None else p.writer,
             generation if p.generation is None else p.generation, p.intent_id)
            for n, p in enumerate(batch)
        ]  # fmt: skip
        positions = d.insert_rows(c, rows)
        d.commit(c)
        make = new_event
        return [
            make(space, row[1], p.type, p.payload, p.recorded_at or now, row[5], row[6],
                 p.intent_id, position)
            for row, p, position in zip(rows, batch, positions, strict=True)
        ]  # fmt: skip

    def _check_write(
        self,
        c: Conn,
        space: str,
        batch: Sequence[Pending],
        expected_seq: int,
        fence: Lease | None,
        *,
        locked: bool = False,
    ) -> list[Event] | None:
        """The write's checks, in the reference adapter's order: intent ids already written
        (returns their events; `InvalidEvent` if only some are), the fence (`StaleLease`), the
        head (`SeqConflict`). None: nothing stands in the way. `locked`: inside the write's
        transaction, the lease row is read with the lock that orders it before a new grant."""
        ids = [p.intent_id for p in batch if p.intent_id is not None]
        if ids:
            found = self._dialect.events_by_intent(c, space, ids)
            done = already_written(
                [found.get(p.intent_id) if p.intent_id else None for p in batch], batch
            )
            if done is not None:
                return done
        if fence is not None:
            check_fence(fence, self._lease_record(c, space, locked=locked))
        head = self._head(c, space)
        if head != expected_seq:
            raise SeqConflict(space, expected_seq, head)
        return None

    # -- forwarded intents: `SqlIntentQueue` ------------------------------------------------

    def put_intent(self, space: str, item: Pending, *, holder: str) -> None:
        self._intents.put_intent(space, item, holder=holder)

    def find_intent(self, space: str, intent_id: str) -> Event | None:
        return self._intents.find_intent(space, intent_id)

    def pending_intents(self, space: str, *, limit: int) -> list[Pending]:
        return self._intents.pending_intents(space, limit=limit)

    def forget_intents(self, space: str, intent_ids: Sequence[str]) -> None:
        self._intents.forget_intents(space, intent_ids)

    def wait_for_change(self, spaces: Sequence[str], timeout: float) -> None:
        self._intents.wait_for_change(spaces, timeout)

    def wakes_per_space(self) -> bool:
        return self._intents.wakes_per_space()

    def notified_intents(self, space: str, *, limit: int) -> list[Pending] | None:
        return self._intents.notified_intents(space, limit=limit)

    def awaited_event(self, space: str, intent_id: str) -> tuple[Event | None, bool]:
        return self._intents.awaited_event(space, intent_id)

    def drop_notified(self, space: str, intent_ids: Sequence[str]) -> None:
        self._intents.drop_notified(space, intent_ids)

    def watch_intents(self, callback: Callable[[str], bool]) -> Callable[[], None]:
        return self._intents.watch_intents(callback)

    def handoff_dir(self) -> str | None:
        return self._dialect.handoff_dir(self.database.engine.url)
