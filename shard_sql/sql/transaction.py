"""`SqlEventStore.transaction()`: several writes in one database transaction, the store's own or
a host application's (api.md 9; docs/embedding.md, docs/sql.md)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, NoReturn, Protocol

from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session, scoped_session

from shard_sql.errors import InvalidEvent, SeqConflict, ShardSqlError
from shard_sql.leases import check_fence
from shard_sql.ports import Item, Transaction
from shard_sql.sql.connections import BUSY_FIRST, Database
from shard_sql.sql.dialects import Conn
from shard_sql.sql.errors import translate
from shard_sql.sql.intents import SqlIntentQueue
from shard_sql.store_base import TransactionState, already_written, fence_space_matches
from shard_sql.validation import (
    Pending,
    check_checkpoint_name,
    check_items,
    check_position,
    check_seq,
    check_space,
    pending,
)
from shard_sql.values import Event, Lease, new_event

if TYPE_CHECKING:
    from sqlalchemy.engine.base import Transaction as SaTransaction

__all__ = ["SqlTransaction", "TransactionStore"]


class TransactionStore(Protocol):
    """What a transaction uses of its `SqlEventStore` (named here, so that the store module
    imports this one and not the other way round)."""

    database: Database
    _intents: SqlIntentQueue

    @property
    def engine(self) -> Engine: ...

    def feed_committed(self, cur: Any | None = None) -> None: ...

    def join_host(self, host: Connection) -> Conn: ...

    def _head(self, c: Conn, space: str) -> int: ...

    def _lease_record(self, c: Conn, space: str, *, locked: bool = False) -> Lease | None: ...


_now = datetime.now


class SqlTransaction(Transaction):
    """One `store.transaction(connection)` block: the context manager and the `Transaction`.

    Without `connection` the block takes a connection of the store, begins (SQLite: `BEGIN
    IMMEDIATE`, the write lock for the whole block), commits at a normal exit and rolls back
    otherwise. With a host's `Connection` or `Session` (already in a transaction) every write
    and check runs on the host's connection, inside its transaction, and the block commits
    nothing. A failed write dooms the transaction (`TransactionState`): at the block's end the
    store's own transaction rolls back, a host's transaction (the innermost, a savepoint if the
    block began inside one) is rolled back, and the first failure is raised again.
    Not thread-safe: one thread uses a transaction.
    """

    __slots__ = (
        "_c",
        "_db",
        "_entered",
        "_host",
        "_host_tx",
        "_intent_spaces",
        "_locked",
        "_sa",
        "_store",
        "_trying",
        "_woke",
        "_wrote",
        "state",
    )

    def __init__(self, store: TransactionStore, connection: object | None) -> None:
        self._store = store
        self._db: Database = store.database
        self.state = TransactionState()
        self._c: Conn | None = None
        self._sa: Connection | None = None
        self._host: Connection | None = None
        self._host_tx: SaTransaction | None = None
        self._locked = False
        self._entered = False
        self._wrote = False
        self._woke = False
        """A write announced the events to the feed's waiters already (a host's transaction)."""
        self._trying = -1
        """The seq the write under way tries (-1: the head, computed by the statement)."""
        self._intent_spaces: set[str] = set()
        if connection is not None:
            host = self._host = _host_connection(connection)
            self._host_tx = host.get_nested_transaction() or host.get_transaction()
            self._c = store.join_host(host)

    # -- the block -----------------------------------------------------------------------------

    def __enter__(self) -> SqlTransaction:
        if self._entered:
            raise InvalidEvent("transaction", "a transaction's block can be entered once")
        self._entered = True
        if self._host is not None:
            self._db.writing(1)  # the host's connection may hold SQLite's write lock
        return self

    def _ready(self, one_statement: bool = False) -> Conn:
        """The connection, in the write transaction: the store's own is taken and begun at the
        block's first write (so that a lease can still be granted before it on SQLite); in a
        host's, SQLite's write lock is taken before the first write's checks (`one_statement`:
        the write is one statement whose checks run under the lock it takes)."""
        if not self._entered:
            raise InvalidEvent("transaction", "use it inside its with block")
        c = self._c
        if c is None:
            c = self._c = self._begin()
        elif not self._locked:
            d = self._db.dialect
            self._locked = d.lock_for_write(c, first_statement_writes=one_statement)
        return c

    def _begin(self) -> Conn:
        """A connection of the store, in a write transaction (SQLite: busy retries until the
        busy timeout, as the store's calls)."""
        db = self._db
        d = db.dialect
        c = db.pool.get()
        deadline = time.monotonic() + db.busy_timeout
        delay = BUSY_FIRST
        try:
            while True:
                try:
                    d.begin_write(c)
                    self._locked = True
                    db.writing(1)
                    return c
                except Exception as e:
                    if not d.is_busy(e):
                        raise
                    db.check_not_writing()
                    delay = db.backoff(deadline, delay, e)
        except BaseException:
            self._release(c, healthy=d.healthy(c))
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        state, c = self.state, self._c
        if state.ended or not self._entered:
            return
        state.ended = True
        if c is not None:
            self._db.writing(-1)
            joined = self._host is not None and (self._woke or not self._wrote)
            if joined and exc is None and state.failure is None:
                self._c = None  # joined, nothing to announce or roll back: the host commits
                return
        self._close_connection_view()
        if c is None:  # nothing written, nothing begun
            if exc is None:
                state.raise_failure()
            return
        try:
            if self._host is None:
                self._end_own(c, exc)
            else:
                self._end_joined(c, exc)
        finally:
            self._c = None

    def _end_own(self, c: Conn, exc: BaseException | None) -> None:
        d, store = self._db.dialect, self._store
        healthy = True
        try:
            if exc is None and self.state.failure is None:
                d.commit(c)
                if self._wrote:
                    store.feed_committed()
                    for space in self._intent_spaces:
                        store._intents.waits.events_written(space)  # a forwarder may wait
                return
            d.rollback(c)
        except BaseException as e:
            healthy = False
            try:
                d.rollback(c)
                healthy = d.healthy(c)
            except Exception:
                pass
            if exc is not None and isinstance(e, Exception):
                # The block's own error goes on (a lost connection's rollback fails too: a raw
                # driver error in its place would escape every caller's handling).
                return
            if isinstance(e, ShardSqlError) or not isinstance(e, Exception):
                raise
            self._raise_translated(e)
        finally:
            self._release(c, healthy)
        if exc is None:
            self.state.raise_failure()

    def _end_joined(self, c: Conn, exc: BaseException | None) -> None:
        try:
            if self.state.failure is not None:
                tx = self._host_tx
                if tx is not None and tx.is_active:
                    tx.rollback()  # the host's commit then fails: nothing of it commits
            elif exc is None and self._wrote and not self._woke:
                # PostgreSQL: the feed's waiters are woken when the host commits.
                self._store.feed_committed(c.cur)
        except ShardSqlError:
            raise
        except Exception as e:
            if exc is None:
                self._raise_translated(e)
        if exc is None:
            self.state.raise_failure()

    def _release(self, c: Conn, healthy: bool) -> None:
        self._db.pool.put(c, healthy)

    # -- the Transaction -----------------------------------------------------------------------

    @property
    def connection(self) -> Connection:
        """The SQLAlchemy `Connection` the writes run on: the host's, or (the store's own
        transaction) one over the store's connection, inside its transaction, valid until the
        block ends. Do not commit or roll it back: the block (or the host) does."""
        if self._host is not None:
            if self.state.ended:
                raise InvalidEvent("transaction", "its block ended; open a new transaction")
            return self._host
        if self.state.ended:
            raise InvalidEvent("transaction", "its block ended; open a new transaction")
        c = self._ready()
        if self._sa is None:
            # The store's connection seen through SQLAlchemy, in a SQLAlchemy transaction that
            # issues nothing (`_has_events=False`: the store engine's BEGIN IMMEDIATE hook
            # stays out), so that a Session bound to it joins instead of committing.
            sa = Connection(
                self._store.engine, connection=c.pooled, _has_events=False, _allow_revalidate=False
            )
            sa.begin()
            self._sa = sa
        return self._sa

    def _close_connection_view(self) -> None:
        sa = self._sa
        if sa is not None:
            self._sa = None
            # Closed for its holder, without giving the store's connection back to the pool.
            sa._dbapi_connection = None

    def append(
        self,
        space: str,
        type: str,
        payload: dict[str, Any],
        *,
        expected_seq: int | None = None,
        fence: Lease | None = None,
        intent_id: str | None = None,
    ) -> Event:
        """As `store.append`; `expected_seq=None`: at the space's head in this transaction."""
        state = self.state
        if state.ended or state.failure is not None:
            state.check_open()
        try:
            check_space(space)
            p = pending(type, payload, intent_id)
            if expected_seq is not None:
                check_seq("expected_seq", expected_seq)
            if fence is not None:
                fence_space_matches(fence, space)
            return self._append(space, p, expected_seq, fence)
        except BaseException as e:
            self._failed(e, space, expected_seq)

    def _append(self, space: str, p: Pending, seq: int | None, fence: Lease | None) -> Event:
        c = self._c if self._locked else self._ready(one_statement=True)
        assert c is not None
        d = self._db.dialect
        at = _now(UTC)
        writer, gen = (fence.holder, fence.generation) if fence is not None else ("", 0)
        cur = c.cur
        done: tuple[int, int | None] | None
        self._trying = -1 if seq is None else seq
        try:
            if seq is None:
                wake = self._host is not None and not self._woke
                done = d.write_at_head(c, space, p, at, writer, gen, fence, wake=wake)
                if wake and done is not None:
                    self._woke = True
            else:
                cur.execute(*d.append_one(space, p, seq, at, writer, gen, fence))
                position = d.inserted(cur)
                done = None if position is None else (seq, position or None)
        except Exception as e:
            if not d.is_check_failure(e):
                raise
            done = None
        if done is None:
            # Nothing written: say why (the checks, in the reference adapter's order).
            return self._checked(c, space, [p], seq, fence)[0][0]
        self._wrote = True
        if p.intent_id is not None:
            self._intent_spaces.add(space)
        event: Event = new_event(
            space, done[0], p.type, p.payload, at, writer, gen, p.intent_id, done[1]
        )
        return event

    def append_many(
        self,
        space: str,
        items: Iterable[Item],
        *,
        expected_seq: int | None = None,
        fence: Lease | None = None,
    ) -> list[Event]:
        """As `store.append_many`; `expected_seq=None`: at the space's head in this
        transaction."""
        self.state.check_open()
        try:
            check_space(space)
            batch = check_items(items)
            if expected_seq is not None:
                check_seq("expected_seq", expected_seq)
            fence_space_matches(fence, space)
            return self._append_many(space, batch, expected_seq, fence)
        except BaseException as e:
            self._failed(e, space, expected_seq)

    def _append_many(
        self, space: str, batch: list[Pending], seq: int | None, fence: Lease | None
    ) -> list[Event]:
        c = self._c if self._locked else self._ready()
        assert c is not None
        d = self._db.dialect
        found, head = self._checked(c, space, batch, seq, fence, explain=False)
        if found:
            return found
        self._trying = head
        now = _now(UTC)
        time_text = d.time(now)
        writer, gen = (fence.holder, fence.generation) if fence is not None else ("", 0)
        positions = d.insert_rows(
            c,
            [
                (space, head + n, p.type, p.payload_json, time_text, writer, gen, p.intent_id)
                for n, p in enumerate(batch)
            ],
        )
        self._wrote = True
        if any(p.intent_id is not None for p in batch):
            self._intent_spaces.add(space)
        make = new_event
        return [
            make(space, head + n, p.type, p.payload, now, writer, gen, p.intent_id, k)
            for n, (p, k) in enumerate(zip(batch, positions, strict=True))
        ]

    def _checked(
        self,
        c: Conn,
        space: str,
        batch: Sequence[Pending],
        seq: int | None,
        fence: Lease | None,
        *,
        explain: bool = True,
    ) -> tuple[list[Event], int]:
        """The write's checks in the transaction, in the reference adapter's order: the events
        already written for the batch's intent ids (returned, with the head), the fence
        (`StaleLease`), the head against `seq` (`SeqConflict`). `explain`: the write wrote
        nothing already, so one of them must say why (else `SeqConflict`)."""
        store, d = self._store, self._db.dialect
        ids = [p.intent_id for p in batch if p.intent_id is not None]
        if ids:
            hits = d.events_by_intent(c, space, ids)
            done = already_written([hits.get(p.intent_id or "") for p in batch], batch)
            if done is not None:
                return done, -1
        if fence is not None:
            check_fence(fence, store._lease_record(c, space, locked=True))
        head = store._head(c, space)
        if seq is not None and head != seq:
            raise SeqConflict(space, seq, head)
        if explain:
            raise SeqConflict(space, head if seq is None else seq)  # changed meanwhile
        return [], head

    def save_checkpoint(self, name: str, position: int, *, fence: Lease | None = None) -> None:
        """Store checkpoint `name` at `position` in this transaction; `SeqConflict` below the
        stored position, `StaleLease` unless `fence` (a lease of any name) is current."""
        self.state.check_open()
        try:
            check_checkpoint_name(name)
            check_position("position", position)
            if fence is not None and not isinstance(fence, Lease):
                raise InvalidEvent("fence", f"must be a Lease, not {type(fence).__name__}")
            c = self._ready()
            d = self._db.dialect
            d.save_checkpoint(c.cur, name, position, fence, _now(UTC))
        except BaseException as e:
            self._failed(e, None, None)

    def _failed(self, e: BaseException, space: str | None, seq: int | None) -> NoReturn:
        """Doom the transaction with `e` (a driver error translated) and raise it. A unique
        violation is the `SeqConflict` of the write at `seq` (else the seq it tried: on
        PostgreSQL another transaction wrote that seq first; -1: at a head not known here)."""
        if isinstance(e, Exception) and not isinstance(e, ShardSqlError):
            tried = self._trying if seq is None else seq
            err = translate(e, self._db.site, space=space, expected_seq=tried)
            if err is not None:
                if isinstance(err, SeqConflict) and tried < 0:
                    err.args = (f"space {space!r}: another transaction wrote at its head first",)
                self.state.failed(err)
                raise err from e
        self.state.failed(e)
        raise e

    def _raise_translated(self, e: Exception) -> NoReturn:
        err = translate(e, self._db.site)
        if err is None:
            raise e
        raise err from e


# -- the host's connection -----------------------------------------------------------------------


def _host_connection(connection: object) -> Connection:
    """The SQLAlchemy `Connection` of a host's `Connection`, `Session` or `scoped_session`, in
    a transaction; `InvalidEvent("connection")` for anything else."""
    if type(connection) is Connection:
        # The common case in one look (open, valid: a driver connection; in a transaction).
        root = connection.get_transaction()
        if root is not None and root.is_active and connection._dbapi_connection is not None:
            return connection
    elif isinstance(connection, scoped_session):
        connection = connection()
    if isinstance(connection, Session):
        if not connection.in_transaction():
            raise InvalidEvent(
                "connection",
                "the Session is not in a transaction (closed, or nothing begun yet): call "
                "session.begin(), or write with it first (add and flush)",
            )
        try:
            connection = connection.connection()
        except Exception as e:
            raise InvalidEvent("connection", f"the Session has no connection: {e}") from e
    if not isinstance(connection, Connection):
        raise InvalidEvent(
            "connection",
            "must be a SQLAlchemy Connection or Session (or nothing: the store's own "
            f"transaction), not {type(connection).__name__}",
        )
    if connection.closed or connection.invalidated:
        raise InvalidEvent("connection", "is closed")
    if not connection.in_transaction():
        raise InvalidEvent(
            "connection", "is not in a transaction: begin one (connection.begin()) first"
        )
    return connection


class HostConnections:
    """The host connections a store's transactions joined: each checked once (the same kind of
    database, and the same database: one read), then its cursor kept in the connection's
    `info` (SQLAlchemy's per driver connection dict) for the next transactions."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._key = f"shard_sql.cursor.{uuid.uuid4().hex}"
        self._own: object = None

    def join(self, host: Connection) -> Conn:
        """A cursor of `host`'s driver connection; `InvalidEvent("connection")` unless it is on
        the store's database, in a transaction that the store's writes can join."""
        db = self._db
        pooled = host._dbapi_connection  # open and valid (`_host_connection`)
        if pooled is None:
            try:
                pooled = host.connection
            except Exception as e:
                raise InvalidEvent("connection", f"is not usable: {e}") from e
        c: Conn | None = pooled.info.get(self._key)
        if c is None:
            c = self._check(host, pooled)
            pooled.info[self._key] = c
        problem = db.dialect.host_problem(c.raw)
        if problem is not None:
            raise InvalidEvent("connection", problem)
        return c

    def _check(self, host: Connection, pooled: Any) -> Conn:
        db, d = self._db, self._db.dialect
        kind = host.engine.dialect.name
        if kind != d.name:
            raise InvalidEvent("connection", f"is a {kind} connection; the store is on {db.site}")
        try:
            c = Conn.of_driver(pooled.dbapi_connection)
            try:
                if host.engine is not db.engine:
                    if self._own is None:
                        self._own = db.call(d.identity)
                    if not _same_identity(self._own, d.identity(c)):
                        raise InvalidEvent(
                            "connection",
                            f"is a connection to another database than the store's ({db.site}): "
                            "its engine must point at the same database",
                        )
                d.join(c, pooled.info)
            except BaseException:
                c.cur.close()
                raise
        except ShardSqlError:
            raise
        except Exception as e:
            err = translate(e, db.site)
            if err is None:
                raise
            raise err from e
        return c


def _same_identity(a: object, b: object) -> bool:
    """Equal identities (`Dialect.identity`); a part one side could not read (None) is
    skipped."""
    if not isinstance(a, tuple) or not isinstance(b, tuple) or len(a) != len(b):
        return a == b
    return all(x == y for x, y in zip(a, b, strict=True) if x is not None and y is not None)
