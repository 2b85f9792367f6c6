"""What a SQL database must provide to the store; the statements both dialects share."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar, TypeVar

from sqlalchemy.engine import URL, Connection, Engine

from shard_sql.errors import SeqConflict
from shard_sql.leases import check_fence
from shard_sql.orm import (
    APPEND_PLACED,
    CHECKPOINTS,
    EVENTS,
    INTENTS,
    LEASES,
    PLACE_FEED,
    VERSION_TABLE,
)
from shard_sql.sql.errors import DEFAULT_BUSY_TIMEOUT, Site
from shard_sql.sql.waits import Waits
from shard_sql.store_base import checkpoint_conflict
from shard_sql.validation import Pending
from shard_sql.values import Event, Lease

__all__ = ["COLUMNS", "FEED_COLUMNS", "Conn", "Dialect", "EngineOptions", "Statement", "Tables"]

COLUMNS = "space, seq, type, payload, recorded_at, writer, generation, intent_id"
READ_COLUMNS = "seq, type, payload, recorded_at, writer, generation, intent_id, position"
FEED_COLUMNS = f"space, {READ_COLUMNS}"

Statement = tuple[str, tuple[Any, ...]]
"""SQL text and its parameters."""


@dataclass(frozen=True, slots=True)
class Tables:
    """shard_sql's tables and feed function as its statements name them: qualified with the
    store's schema (`"log".events`), or bare, as the search path finds them."""

    events: str = EVENTS
    leases: str = LEASES
    intents: str = INTENTS
    checkpoints: str = CHECKPOINTS
    version: str = VERSION_TABLE
    place_feed: str = PLACE_FEED
    append_placed: str = APPEND_PLACED

    @classmethod
    def in_schema(cls, schema: str | None) -> Tables:
        if schema is None:
            return cls()
        q = f'"{schema}".'
        return cls(
            *(
                q + n
                for n in (
                    EVENTS,
                    LEASES,
                    INTENTS,
                    CHECKPOINTS,
                    VERSION_TABLE,
                    PLACE_FEED,
                    APPEND_PLACED,
                )
            )
        )


_R = TypeVar("_R")


@dataclass(frozen=True, slots=True)
class EngineOptions:
    """How a store opens its own engine."""

    synchronous: str = "FULL"
    """SQLite's `synchronous` setting (FULL, NORMAL or EXTRA)."""
    busy_timeout: float = DEFAULT_BUSY_TIMEOUT
    pool_size: int = 5
    """Connections the pool keeps open."""
    max_overflow: int = 5
    """Connections opened beyond `pool_size` under load, closed when they come back."""
    pool_timeout: float = 30.0
    """Seconds a call waits for a free connection before `StoreUnavailable`."""
    schema: str | None = None
    """PostgreSQL: the schema of shard_sql's tables (None: the search path's)."""


class Conn:
    """A driver connection the store holds, with a reusable cursor."""

    __slots__ = ("cur", "pooled", "prepared", "raw", "restore")

    def __init__(self, pooled: Any) -> None:
        self.pooled = pooled
        """The pool's proxy of the connection (`sqlalchemy.pool.PoolProxiedConnection`)."""
        self.raw: Any = pooled.dbapi_connection
        self.cur: Any = self.raw.cursor()
        self.restore: Any = None
        """What `Dialect.setup` changed on a host's connection, for `Dialect.teardown`."""
        self.prepared: set[bytes] | None = None
        """PostgreSQL: the statements prepared on this connection (`dialects.prepared`), None
        where the store prepares none."""

    @classmethod
    def of_driver(cls, raw: Any) -> Conn:
        """A cursor of a driver connection the store does not hold (a host's)."""
        c = cls.__new__(cls)
        c.pooled, c.raw, c.cur, c.restore, c.prepared = None, raw, raw.cursor(), None, None
        return c


class Dialect:
    """Everything that differs between SQLite and PostgreSQL, one subclass each; the store and
    its intent queue never ask which database they run on."""

    name: ClassVar[str] = ""
    parallel_space_writes: ClassVar[bool] = False
    """Whether writes to different spaces commit concurrently (each on its own connection),
    rather than one after another (SQLite's one writer)."""
    p: ClassVar[str] = "?"
    """The driver's placeholder."""
    GREATEST: ClassVar[str] = "GREATEST"
    LEAST: ClassVar[str] = "LEAST"
    retry_free_insert: ClassVar[bool] = False
    """A single-event insert may be tried once without the store's retry scaffolding: one that
    failed wrote nothing for sure (SQLite: local, and a statement either commits or not)."""
    migrates_on_open: ClassVar[bool] = False
    """A store opening a database below the head schema migrates it (SQLite files)."""
    has_server_clock: ClassVar[bool] = False
    """The server has a clock of its own (`server_time`) that every host can share."""
    schema: str | None = None
    """The schema of shard_sql's tables (PostgreSQL), named in every statement (`t`); None:
    unqualified names, found through the search path."""

    def __init__(self) -> None:
        self.t = Tables.in_schema(self.schema)
        p, t = self.p, self.t
        self.insert_values = f"INSERT INTO {t.events} ({COLUMNS}) VALUES ({', '.join([p] * 8)})"
        self.head_sql = f"SELECT seq FROM {t.events} WHERE space = {p} ORDER BY seq DESC LIMIT 1"
        self.read_sql = (
            f"SELECT {READ_COLUMNS} FROM {t.events} WHERE space = {p} AND seq >= {p} ORDER BY seq"
        )
        self.read_limit_sql = self.read_sql + f" LIMIT {p}"
        self._fields: dict[tuple[int, bool], str] = {}
        """`fields_sql`'s statements, made once."""
        # Skips through the primary key: milliseconds for millions of rows (docs/dba.md).
        self.spaces_sql = (
            f"WITH RECURSIVE s(space) AS (SELECT min(space) FROM {t.events} "
            f"UNION ALL SELECT (SELECT min(space) FROM {t.events} WHERE space > s.space) "
            "FROM s WHERE s.space IS NOT NULL) SELECT space FROM s WHERE space IS NOT NULL"
        )
        self.version_sql = f"SELECT version_num FROM {t.version}"
        self.feed_sql = f"SELECT {FEED_COLUMNS} FROM {t.events} WHERE position > {p}"
        self.checkpoint_sql = f"SELECT position FROM {t.checkpoints} WHERE name = {p}"
        self.checkpoints_sql = f"SELECT name, position FROM {t.checkpoints} ORDER BY name"
        self.pending_intents_sql = (
            f"SELECT id, intent_id, type, payload, EXISTS (SELECT 1 FROM {t.events} e "
            f"WHERE e.space = {t.intents}.space AND e.intent_id = {t.intents}.intent_id) "
            f"FROM {t.intents} WHERE space = {p} AND id > {p} ORDER BY id LIMIT {p}"
        )
        self._lease_statements()

    def _lease_statements(self) -> None:
        """Each statement is the rule of the same name in `shard_sql.leases` as one
        compare-and-set (`granted`, `renewed`, `released`, `revoked`, `valid`, `advanced`); the
        lease contract tests hold them to the same answers. SET expressions all read the old
        row."""
        p, t, greatest, least = self.p, self.t, self.GREATEST, self.LEAST
        returning = "RETURNING holder, expires_at, generation"
        self.lease_sql = f"SELECT holder, expires_at, generation FROM {t.leases} WHERE space = {p}"
        self.lease_locked_sql = self.lease_sql
        """The lease row read inside a write, ordered before a new grant (see the dialects)."""
        # granted: the holder of a valid lease renews it (same generation); anyone over a lapsed
        # lease, or the same holder after a lapse, gets a new grant (generation + 1).
        # Parameters: holder, now, holder, now, expires, expires, holder, space, holder, now.
        self.grant_sql = (
            f"UPDATE {t.leases} SET "
            f"generation = CASE WHEN holder = {p} AND expires_at > {p} "
            "THEN generation ELSE generation + 1 END, "
            f"expires_at = CASE WHEN holder = {p} AND expires_at > {p} "
            f"THEN {greatest}(expires_at, {p}) ELSE {p} END, "
            f"holder = {p} "
            f"WHERE space = {p} AND (holder = {p} OR expires_at <= {p}) {returning}"
        )
        # granted, on a space without a record: generation 1.
        self.first_grant_sql = (
            f"INSERT INTO {t.leases} (space, holder, expires_at, generation) "
            f"VALUES ({p}, {p}, {p}, 1) ON CONFLICT (space) DO NOTHING {returning}"
        )
        # renewed: only the valid current grant, never shortened.
        self.renew_sql = (
            f"UPDATE {t.leases} SET expires_at = {greatest}(expires_at, {p}) "
            f"WHERE space = {p} AND holder = {p} AND generation = {p} AND expires_at > {p} "
            f"{returning}"
        )
        # released: the current grant ends now (or stays ended).
        self.release_sql = (
            f"UPDATE {t.leases} SET expires_at = {least}(expires_at, {p}) "
            f"WHERE space = {p} AND holder = {p} AND generation = {p}"
        )
        # valid
        self.current_sql = self.lease_sql + f" AND expires_at > {p}"
        # revoked: ends now, generation + 1 (its holder is fenced).
        self.revoke_sql = (
            f"UPDATE {t.leases} SET expires_at = {least}(expires_at, {p}), "
            f"generation = generation + 1 WHERE space = {p} {returning}"
        )
        # advanced: the generation raised to the one given, the lease ended now (if lower).
        # Parameters: now, generation, space, generation.
        self.advance_sql = (
            f"UPDATE {t.leases} SET expires_at = {least}(expires_at, {p}), generation = {p} "
            f"WHERE space = {p} AND generation < {p} {returning}"
        )
        # advanced, on a space without a record: a record that is not valid, at that generation.
        self.first_advance_sql = (
            f"INSERT INTO {t.leases} (space, holder, expires_at, generation) "
            f"VALUES ({p}, {p}, {p}, {p}) ON CONFLICT (space) DO NOTHING {returning}"
        )

    def tables_sql(self, n: int) -> str:
        """The names, among `n` given, of the tables (or views) the store's statements see."""
        raise NotImplementedError

    # -- engines and connections -------------------------------------------------------------

    def create_engine(self, url: URL, options: EngineOptions) -> Engine:
        """The store's own engine for `url`."""
        raise NotImplementedError

    def adopt_engine(self, engine: Engine, options: EngineOptions) -> tuple[Engine, bool]:
        """The engine a store passed a host's `engine` runs on, and whether the store owns it."""
        raise NotImplementedError

    def describe(self, url: URL) -> str:
        """Where the database is, for messages (never a secret)."""
        raise NotImplementedError

    def migration_transaction(self, engine: Engine) -> AbstractContextManager[Connection]:
        """A connection in a transaction holding the migration lock, committed on exit:
        concurrent migrations queue up, and the later ones find the schema at head."""
        raise NotImplementedError

    def exists(self, url: URL) -> bool:
        """The database is there (connecting would not create it)."""
        return True

    def single_connection(self, url: URL) -> bool:
        """The database has one connection, used by one thread at a time."""
        return False

    def setup(self, c: Conn) -> None:
        """Prepare a connection the store takes from the pool."""

    def teardown(self, c: Conn) -> None:
        """Undo `setup` before the connection goes back to the pool."""

    def healthy(self, c: Conn) -> bool:
        """After a failed call: whether the connection is still usable."""
        return True

    def is_busy(self, e: BaseException) -> bool:
        """The database was busy: the call is retried after a pause."""
        return False

    def dedicated(self, raw: Any) -> None:
        """Prepare a driver connection taken out of the pool for good (a listener's)."""

    def waits(self, url: URL, connect: Callable[[], Any], site: Site) -> Waits:
        """How waits for forwarded intents and their events end on this database."""
        raise NotImplementedError

    def handoff_dir(self, url: URL) -> str | None:
        """Where holders on this host listen for direct hand-offs (`shard_sql.handoff`)."""
        return None

    # -- values --------------------------------------------------------------------------------

    def time(self, dt: datetime) -> Any:
        """A timezone-aware datetime as the driver stores it."""
        raise NotImplementedError

    def lease(self, space: str, row: Sequence[Any]) -> Lease:
        """A `Lease` from a (holder, expires_at, generation) row."""
        raise NotImplementedError

    def to_events(self, space: str, rows: list[Any]) -> list[Event]:
        """`Event`s from rows of `READ_COLUMNS` (a NULL position: not placed yet)."""
        raise NotImplementedError

    def payload(self, value: Any) -> Any:
        """A payload column's value as Python data."""
        return value

    # -- a host's transaction (`shard_sql.sql.transaction`) ----------------------------------

    def host_problem(self, raw: Any) -> str | None:
        """Why a host's driver connection, in a SQLAlchemy transaction, cannot take the store's
        writes (they would not commit or roll back with its transaction); None: it can."""
        return None

    def join(self, c: Conn, info: dict[Any, Any]) -> None:
        """Prepare the cursor of a host's connection (`Conn` over its pooled connection, whose
        per driver connection `info` dict keeps it)."""

    def lock_for_write(self, c: Conn, *, first_statement_writes: bool = False) -> bool:
        """Before a write in a host's transaction: take what the store's own write transactions
        take first (SQLite: the write lock); whether it is held now. `first_statement_writes`:
        the write is one statement with its checks inside, which may take the lock itself."""
        return True

    def identity(self, c: Conn) -> object:
        """What tells this database apart from any other, read on `c` (a store's connection or a
        host's): two connections to the same database give equal values."""
        raise NotImplementedError

    # -- transactions --------------------------------------------------------------------------

    def begin_write(self, c: Conn) -> None:
        """Start a multi-statement write transaction."""
        raise NotImplementedError

    def commit(self, c: Conn) -> None:
        c.cur.execute("COMMIT")

    def rollback(self, c: Conn) -> None:
        """Roll back a transaction left open (no statement when there is none)."""
        raise NotImplementedError

    def insert_rows(self, c: Conn, rows: list[tuple[Any, ...]]) -> list[int | None]:
        """Insert checked rows (`COLUMNS`) inside the open write transaction; their feed
        positions (None: placed after the commit)."""
        c.cur.executemany(self.insert_values, rows)
        return [None] * len(rows)

    def lease_transaction(self, c: Conn, body: Callable[[], _R]) -> _R:
        """Run the statements of one lease grant (`body`) as one unit."""
        return body()

    @contextmanager
    def relaxed(self, c: Conn) -> Iterator[None]:
        """Commits inside need not wait for the disk (an intent's record, deleting garbage)."""
        yield

    # -- statements ----------------------------------------------------------------------------

    def append_one(
        self,
        space: str,
        p: Pending,
        seq: int,
        at: datetime,
        writer: str,
        generation: int,
        fence: Lease | None,
    ) -> Statement:
        """One event written at `seq` in one statement, or nothing when a check fails: the head
        is `seq`, `fence` (if any) is the current grant, `p`'s intent id is not written yet."""
        raise NotImplementedError

    def append_at(
        self,
        space: str,
        p: Pending,
        seq: int,
        at: datetime,
        writer: str,
        generation: int,
        fence: Lease | None,
        position: int,
    ) -> Statement | None:
        """`append_one` at feed position `position`, which the caller expects to be the next
        (the one after the position it wrote last): the statement also writes nothing unless
        `position` is above every position. None: this database places events after commit."""
        return None

    def is_check_failure(self, e: BaseException) -> bool:
        """`e` is how `append_one`'s statement says that a check failed (else: no row)."""
        return False

    def insert_one(self, c: Conn, sql: str, params: Sequence[Any]) -> int | None:
        """Run `append_one`'s statement on `c` (in autocommit): None if it wrote nothing, else
        the row's feed position (0: placed after the commit)."""
        cur = c.cur
        cur.execute(sql, params)
        return self.inserted(cur)

    def inserted(self, cur: Any) -> int | None:
        """After `append_one`'s statement ran on `cur`: None if it wrote nothing, else the
        row's feed position (0: placed after the commit)."""
        return 0 if cur.rowcount == 1 else None

    def append_at_head(
        self,
        space: str,
        p: Pending,
        at: datetime,
        writer: str,
        generation: int,
        fence: Lease | None,
        *,
        wake: bool = False,
    ) -> Statement:
        """One event written at the space's head, inside a write transaction (`transaction`),
        or nothing when `fence` (its holder and generation are the row's writer and generation)
        is not the current grant or `p`'s intent id is written already (`write_at_head` runs it).
        `wake`: when it writes, it also does what `notify_feed` does (in the same round trip)."""
        raise NotImplementedError

    def write_at_head(
        self,
        c: Conn,
        space: str,
        p: Pending,
        at: datetime,
        writer: str,
        generation: int,
        fence: Lease | None,
        *,
        wake: bool = False,
    ) -> tuple[int, int | None] | None:
        """Run `append_at_head`'s statement on `c`: None if it wrote nothing, else the row's seq
        and feed position (None: placed after the commit; this statement returns the seq)."""
        cur = c.cur
        cur.execute(*self.append_at_head(space, p, at, writer, generation, fence, wake=wake))
        row = cur.fetchone()
        return None if row is None else (row[0], None)

    def small_batch(self, batch: Sequence[Pending]) -> bool:
        """`batch` is written faster by `append_small_batch`'s one statement than in a
        transaction (`insert_rows`)."""
        return False

    def append_small_batch(
        self,
        space: str,
        events: list[Event],
        batch: Sequence[Pending],
        fence: Lease | None,
        seq: int,
    ) -> Statement:
        """A `small_batch` in one statement under `append_one`'s checks."""
        raise NotImplementedError

    def write_small_batch(
        self,
        c: Conn,
        space: str,
        events: list[Event],
        batch: Sequence[Pending],
        fence: Lease | None,
        seq: int,
    ) -> bool:
        """Run `append_small_batch`'s statement on `c` (in autocommit): whether it wrote every
        event (else it wrote nothing). A dialect that places events as it writes them (SQLite)
        gives `events` their positions."""
        c.cur.execute(*self.append_small_batch(space, events, batch, fence, seq))
        return bool(c.cur.rowcount == len(events))

    def events_by_intent(self, c: Conn, space: str, ids: list[str]) -> dict[str, Event]:
        """The events written in `space` for these intent ids."""
        found: dict[str, Event] = {}
        p, t = self.p, self.t
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            c.cur.execute(
                f"SELECT {READ_COLUMNS} FROM {t.events} WHERE space = {p} "
                f"AND intent_id IN ({', '.join([p] * len(chunk))})",
                (space, *chunk),
            )
            for e in self.to_events(space, c.cur.fetchall()):
                assert e.intent_id is not None
                found[e.intent_id] = e
        return found

    def put_intent(
        self, space: str, item: Pending, holder: str, reply_to: str | None, now: datetime
    ) -> Statement:
        """Record a forwarded intent unless it is recorded or applied already."""
        raise NotImplementedError

    def forget_intents(self, c: Conn, space: str, ids: list[str]) -> None:
        """Delete the records of those intents whose event exists."""
        raise NotImplementedError

    # -- the feed and checkpoints --------------------------------------------------------------

    def place_feed(self, c: Conn) -> int:
        """Make every committed event readable in the feed; the feed's head (highest position).
        Runs in its own transaction, never inside one of the store's or a host's."""
        raise NotImplementedError

    def feed_beyond(self, c: Conn, after: int) -> bool:
        """Whether an event above `after` is committed: placed above it, or to be placed above it
        by the next `place_feed` (a look that places nothing and takes no lock)."""
        return self.place_feed(c) > after

    types_sql: ClassVar[str] = ""
    """The feed's type filter, one parameter (`types_param`)."""

    def types_param(self, types: frozenset[str]) -> Any:
        raise NotImplementedError

    def feed_statement(
        self,
        after: int,
        limit: int | None,
        types: frozenset[str] | None,
        fields: Sequence[str] = (),
    ) -> Statement:
        """The placed events above `after` in position order (at most `limit`, only `types`):
        `feed_sql`'s columns, or with `fields`, those of `fields_sql`."""
        sql = self.fields_sql(len(fields), True) if fields else self.feed_sql
        params: list[Any] = [*fields, after]
        if types is not None:
            sql += self.types_sql
            params.append(self.types_param(types))
        sql += " ORDER BY position"
        if limit is not None:
            sql += f" LIMIT {self.p}"
            params.append(limit)
        return sql, tuple(params)

    def to_feed_events(self, rows: list[Any]) -> list[Event]:
        """`Event`s from rows of `FEED_COLUMNS`."""
        raise NotImplementedError

    field_column: ClassVar[str] = ""
    """A payload's top-level key (the parameter) as text: a string's own text, an integer's
    digits, None where the key is missing or null (`PayloadReads`)."""

    def fields_sql(self, n: int, feed: bool) -> str:
        """`seq, type` and `n` payload keys (`field_column`, the first `n` parameters) of a
        space's events from a seq; `feed`: `position, space, type` and the keys of the feed's
        events above a position, open for `feed_statement`'s filters."""
        sql = self._fields.get((n, feed))
        if sql is None:
            t, p, cols = self.t, self.p, ", ".join([self.field_column] * n)
            sql = self._fields[(n, feed)] = (
                f"SELECT position, space, type, {cols} FROM {t.events} WHERE position > {p}"
                if feed
                else f"SELECT seq, type, {cols} FROM {t.events} WHERE space = {p} "
                f"AND seq >= {p} ORDER BY seq"
            )
        return sql

    def notify_feed(self, cur: Any) -> None:
        """Inside a transaction the store will not commit itself (a host's): wake the feed's
        waiters when it commits (PostgreSQL; SQLite's waiters see every commit)."""

    save_checkpoint_sql: tuple[str, str] = ("", "")
    """The checkpoint save, without and with the fence: an upsert that writes only when the
    stored position is not higher (and the fence holds), RETURNING the position.
    Parameters: name, position, updated_at, holder, generation [, lease name, holder,
    generation]."""

    def save_checkpoint(
        self, cur: Any, name: str, position: int, fence: Lease | None, now: datetime
    ) -> None:
        """Save checkpoint `name` at `position` with `cur`, a cursor inside a write transaction
        (the store's or a host's): one statement. A position below the stored one raises
        `SeqConflict`; `fence` (a `Lease`, any name) raises `StaleLease` unless it is still
        that lease's current grant, checked in the same transaction."""
        holder, generation = (fence.holder, fence.generation) if fence else (None, None)
        params: tuple[Any, ...] = (name, position, self.time(now), holder, generation)
        if fence is not None:
            params += (fence.space, fence.holder, fence.generation)
        cur.execute(self.save_checkpoint_sql[fence is not None], params)
        if cur.fetchall():
            return
        # Nothing written: say why, in the reference adapter's order.
        cur.execute(self.checkpoint_sql, (name,))
        row = cur.fetchone()
        stored = 0 if row is None else int(row[0])
        if stored > position:
            raise checkpoint_conflict(name, position, stored)
        if fence is not None:
            cur.execute(self.lease_locked_sql, (fence.space,))
            found = cur.fetchone()
            check_fence(fence, None if found is None else self.lease(fence.space, found))
        raise SeqConflict(name, position, stored)  # changed in between: the caller retries

    def server_time(self, c: Conn) -> Any:
        """The database server's clock, if it `has_server_clock`."""
        raise NotImplementedError
