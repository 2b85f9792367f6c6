"""The SQL adapter: SQLite files and PostgreSQL (psycopg 3) through SQLAlchemy 2.

Design (see docs/dba.md for the DBA's view):

- The tables are the ORM models of `shard_sql._orm`, created by the alembic migrations in
  `migrations/`. The hot path runs hand-written statements on the driver's connection, taken
  from SQLAlchemy's pool once and kept by the store (measured: a pool checkout per call costs
  6-7 us, a large share of a SQLite `synchronous=NORMAL` append).
- One append is one statement, its own transaction (autocommit):
  `INSERT INTO events ... SELECT <values> WHERE <head = expected_seq> [AND <fence holds>]
  [AND <intent id not written>]`. One round trip on PostgreSQL. The fence subquery takes
  `FOR SHARE` on the space's `leases` row, so a new grant (an UPDATE of that row) waits for the
  append to commit, or the append sees the new generation and writes nothing: no write under
  generation g ever commits after the grant of g+1. On SQLite a write statement in autocommit takes
  the write lock when it starts, exactly like `BEGIN IMMEDIATE` (both go through the same
  btree-begin), so no lock upgrade can deadlock; a busy database is retried by the store
  (`_call`), SQLite's busy handler being off on its connections.
  Only when the statement writes nothing does a follow-up read tell why, in the order of the
  reference adapter: intent already written (return it), stale fence, seq conflict.
  The primary key (space, seq) is the last line of defence; its violation is `SeqConflict`.
- A batch is one transaction: `BEGIN IMMEDIATE` on SQLite, `BEGIN` on PostgreSQL; the same
  checks as statements (the lease row read `FOR SHARE` on PostgreSQL), then the rows by
  `executemany` on SQLite and by `COPY` on PostgreSQL (measured faster than pipelined
  `executemany` and than one `INSERT ... SELECT FROM unnest(arrays)`), then COMMIT.
- Leases are compare-and-set `UPDATE ... WHERE ...` statements (plus `INSERT ... ON CONFLICT DO
  NOTHING` for a space's first grant), checked by the rows they return. Rows are never deleted.
- Every driver error is translated in one place, `_translate`, into a `ShardSqlError`.
- Forwarded intents (`IntentQueue`: the `intents` table, LISTEN/NOTIFY or polling wake-ups) and
  `database_clock` live in the mixin `shard_sql._sql_intents.SqlIntents`.
"""

from __future__ import annotations

import functools
import os
import random
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Concatenate, ParamSpec, TypeVar
from urllib.parse import unquote

from sqlalchemy import create_engine, event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.pool import NullPool, StaticPool

from shard_sql._orm import EVENTS, LEASES, SCHEMA_REVISION, VERSION_TABLE
from shard_sql._sql_intents import SqlIntents
from shard_sql.errors import (
    InvalidEvent,
    LeaseHeld,
    SchemaError,
    SeqConflict,
    ShardSqlError,
    StaleLease,
    StoreUnavailable,
)
from shard_sql.leases import check_fence, check_ttl
from shard_sql.ports import LeaseStore, system_clock
from shard_sql.store_base import StoreBase, already_written, decode_payloads, stamp
from shard_sql.validation import Pending, check_seq, check_space, load_json
from shard_sql.values import Event, Lease, new_event
from shard_sql.wake import Bells

_now = datetime.now

if TYPE_CHECKING:
    from alembic.config import Config

__all__ = ["SqlEventStore", "migrate"]

SYNCHRONOUS = ("FULL", "NORMAL", "EXTRA")
"""SQLite `synchronous` settings a store accepts. FULL (the default): an acknowledged append
survives power loss. NORMAL: in WAL mode it survives a crash of the process but the last
transactions may roll back on power loss; several times faster."""

DEFAULT_BUSY_TIMEOUT = 30.0
"""Seconds a SQLite write waits for another connection's write lock before giving up."""


_COLUMNS = "space, seq, type, payload, recorded_at, writer, generation, intent_id"
_READ_COLUMNS = "seq, type, payload, recorded_at, writer, generation, intent_id"


# -- URLs and engines ------------------------------------------------------------------------


def normalize_url(url: str | URL) -> URL:
    """Parse a SQLAlchemy URL; plain `postgresql://` (and `postgres://`) select psycopg 3."""
    if isinstance(url, str) and not url.strip():
        raise InvalidEvent("url", "must be a non-empty database URL")
    try:
        parsed = make_url(url)
    except (sa_exc.ArgumentError, ValueError) as e:
        raise InvalidEvent("url", f"is not a database URL: {e}") from e
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    backend = parsed.get_backend_name()
    if backend == "postgresql" and parsed.get_driver_name() != "psycopg":
        raise InvalidEvent(
            "url", f"driver {parsed.drivername!r}: shard_sql uses psycopg 3, postgresql+psycopg://"
        )
    if backend == "sqlite" and parsed.get_driver_name() != "pysqlite":
        raise InvalidEvent("url", f"driver {parsed.drivername!r}: use sqlite:///path.db")
    if backend not in ("sqlite", "postgresql"):
        raise InvalidEvent("url", f"{backend!r}: shard_sql supports sqlite:// and postgresql://")
    return parsed


def _is_memory(url: URL) -> bool:
    db = url.database or ""
    return db in ("", ":memory:") or url.query.get("mode") == "memory"


def sqlite_file(url: URL) -> str | None:
    """The file a SQLite URL opens (also as `file:...?mode=ro` with `uri=true`); None in memory."""
    if _is_memory(url):
        return None
    path = str(url.database)
    if url.query.get("uri") in ("true", "1") and path.startswith("file:"):
        # https://www.sqlite.org/uri.html: an optional //authority (empty or localhost), then
        # the path, percent-encoded, before the query and the fragment.
        rest = path[len("file:") :].partition("?")[0].partition("#")[0]
        if rest.startswith("//"):
            rest = "/" + rest[2:].partition("/")[2]
        path = unquote(rest)
    return path


def _describe(url: URL) -> str:
    """Where the store is, for error messages: never the password."""
    if url.get_backend_name() == "sqlite":
        path = sqlite_file(url)
        if path is None:
            return "SQLite in-memory database"
        return f"SQLite file {path}"
    host = url.host or "the local socket"
    port = f":{url.port}" if url.port else ""
    return f"PostgreSQL at {host}{port} (database {url.database!r}, user {url.username!r})"


@dataclass(frozen=True, slots=True)
class _Site:
    """Where a store is, for error messages (never with the password), and how to migrate it."""

    where: str
    url: str
    busy_timeout: float = DEFAULT_BUSY_TIMEOUT

    @classmethod
    def of(cls, url: URL, busy_timeout: float = DEFAULT_BUSY_TIMEOUT) -> _Site:
        return cls(_describe(url), url.render_as_string(hide_password=True), busy_timeout)

    def __str__(self) -> str:
        return self.where

    @property
    def hint(self) -> str:
        return (
            f"run `shard-sql migrate --url '{self.url}'` "
            "or open it with SqlEventStore(url, migrate=True)"
        )


def _sqlite_connect_hook(synchronous: str, busy_ms: int, memory: bool) -> Callable[..., None]:
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        # The driver must not open transactions itself: the store emits BEGIN IMMEDIATE, or runs
        # single statements in autocommit (see the module docstring).
        dbapi_connection.isolation_level = None
        cur = dbapi_connection.cursor()
        try:
            cur.execute(f"PRAGMA busy_timeout = {busy_ms}")
            if not memory:
                cur.execute("PRAGMA journal_mode = WAL").fetchall()
            cur.execute(f"PRAGMA synchronous = {synchronous}")
        finally:
            cur.close()

    return on_connect


def _sqlite_begin(conn: Connection) -> None:
    # SQLAlchemy-level transactions (migrations) take the write lock at their start.
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def _pg_connect(dbapi_connection: Any, _record: Any) -> None:
    # Engine-level AUTOCOMMIT is set before this hook runs, so the setting sticks.
    dbapi_connection.execute("SET TIME ZONE 'UTC'")


def _create_engine(url: URL, *, synchronous: str, busy_timeout: float) -> Engine:
    if url.get_backend_name() == "sqlite":
        sync = str(url.query.get("synchronous", synchronous)).upper()
        if sync not in SYNCHRONOUS:
            raise InvalidEvent("sqlite_synchronous", f"must be one of {', '.join(SYNCHRONOUS)}")
        url = url.difference_update_query(["synchronous"])
        memory = _is_memory(url)
        engine = create_engine(
            url,
            connect_args={"timeout": busy_timeout, "check_same_thread": False},
            poolclass=StaticPool if memory else NullPool,
        )
        event.listen(
            engine, "connect", _sqlite_connect_hook(sync, int(busy_timeout * 1000), memory)
        )
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    connect_args: dict[str, Any] = {}
    if "connect_timeout" not in url.query:
        connect_args["connect_timeout"] = 10
    engine = create_engine(
        url, isolation_level="AUTOCOMMIT", poolclass=NullPool, connect_args=connect_args
    )
    event.listen(engine, "connect", _pg_connect)
    return engine


def _open_engine(
    url_or_engine: str | URL | Engine,
    *,
    synchronous: str = "FULL",
    busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
) -> tuple[Engine, bool]:
    """The engine the store runs on, and whether the store owns (and disposes) it.

    A PostgreSQL engine passed in is used as is (and left open). For a SQLite engine the store
    opens its own connections to the same file, since it needs its own transaction control.
    """
    if isinstance(url_or_engine, Engine):
        url = normalize_url(url_or_engine.url)
        if url.get_backend_name() == "postgresql":
            return url_or_engine, False
        if _is_memory(url):
            raise InvalidEvent(
                "url_or_engine", "an in-memory SQLite engine cannot be shared: pass 'sqlite://'"
            )
        return _create_engine(url, synchronous=synchronous, busy_timeout=busy_timeout), True
    if not isinstance(url_or_engine, str | URL):
        raise InvalidEvent(
            "url_or_engine",
            f"must be a database URL or a SQLAlchemy Engine, not {type(url_or_engine).__name__}",
        )
    url = normalize_url(url_or_engine)
    return _create_engine(url, synchronous=synchronous, busy_timeout=busy_timeout), True


# -- error translation: the one place driver errors become shard_sql errors -----------------

_SQLITE_BUSY = (5, 6)  # SQLITE_BUSY, SQLITE_LOCKED (and their extended codes)


def _root(e: BaseException) -> BaseException:
    if isinstance(e, sa_exc.DBAPIError) and e.orig is not None:
        return e.orig
    return e


def _is_sqlite_busy(e: BaseException) -> bool:
    root = _root(e)
    if not isinstance(root, sqlite3.OperationalError):
        return False
    code = getattr(root, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in _SQLITE_BUSY
    return "locked" in str(root) or "busy" in str(root)


BUSY_FIRST = 0.00005
BUSY_MAX = 0.002
"""Seconds: a call that found the SQLite database busy is retried after 50 us, growing to 2 ms
between tries (see `SqlEventStore._call`)."""


def _is_unique_violation(e: BaseException) -> bool:
    root = _root(e)
    if isinstance(root, sqlite3.IntegrityError):
        return "UNIQUE" in str(root) or getattr(root, "sqlite_errorcode", 0) in (1555, 2067)
    return getattr(root, "sqlstate", None) == "23505"


def _one_line(text: str) -> str:
    text = " ".join(text.split())
    return text.removeprefix("connection failed: ")


def _translate(
    e: BaseException,
    where: _Site,
    *,
    space: str | None = None,
    expected_seq: int | None = None,
) -> ShardSqlError | None:
    """The shard_sql error for a driver, SQLAlchemy or alembic error; None for anything else
    (a bug, which must surface as itself)."""
    if isinstance(e, ShardSqlError):
        return e
    root = _root(e)
    if _is_unique_violation(root):
        if space is not None and expected_seq is not None:
            return SeqConflict(space, expected_seq)
        return SchemaError(f"{where}: unexpected unique violation: {_one_line(str(root))}")
    if isinstance(root, sqlite3.Error):
        return _sqlite_error(root, where)
    sqlstate = getattr(root, "sqlstate", None)
    if type(root).__module__.startswith("psycopg"):
        return _pg_error(root, sqlstate, where)
    if isinstance(e, sa_exc.TimeoutError):
        return StoreUnavailable(f"{where}: no free connection: {_one_line(str(e))}")
    if isinstance(e, sa_exc.SQLAlchemyError):
        return StoreUnavailable(f"{where}: {_one_line(str(e))}")
    if type(e).__module__.startswith("alembic"):
        return SchemaError(f"{where}: migration failed: {_one_line(str(e))}")
    return None


def _sqlite_error(e: sqlite3.Error, where: _Site) -> ShardSqlError:
    msg = _one_line(str(e))
    code = (getattr(e, "sqlite_errorcode", None) or 0) & 0xFF
    if isinstance(e, sqlite3.IntegrityError):
        return SchemaError(f"{where} refused a row: {msg}")
    if code in _SQLITE_BUSY or "database is locked" in msg:
        return StoreUnavailable(
            f"{where} stayed locked by another connection for over {where.busy_timeout:g}s ({msg})"
        )
    if code == 8 or "readonly" in msg or "read-only" in msg:
        return StoreUnavailable(
            f"{where} is read-only (file, directory or mount permissions, or mode=ro): {msg}"
        )
    if code == 14 or "unable to open" in msg:
        return StoreUnavailable(
            f"cannot open {where}: its directory must exist and be writable ({msg})"
        )
    if code in (11, 26) or "not a database" in msg or "malformed" in msg:
        return SchemaError(f"{where} is not a valid SQLite database: {msg}")
    if "no such table" in msg or "no such column" in msg:
        return SchemaError(f"{where} lacks the shard_sql schema ({msg}): {where.hint}")
    if code in (10, 13):  # SQLITE_IOERR, SQLITE_FULL
        return StoreUnavailable(f"{where}: disk error: {msg}")
    return StoreUnavailable(f"{where}: {msg}")


def _pg_error(e: BaseException, sqlstate: str | None, where: _Site) -> ShardSqlError:
    import psycopg

    msg = _one_line(str(e))
    state = sqlstate or ""
    if state.startswith("23"):
        return SchemaError(f"{where} refused a row: {msg}")
    if state in ("42P01", "42703", "42883", "3F000"):
        return SchemaError(f"{where} lacks the shard_sql schema ({msg}): {where.hint}")
    if state == "42501":
        return StoreUnavailable(f"{where}: permission denied for this role: {msg}")
    if state == "25006":
        return StoreUnavailable(f"{where} is read-only (a standby, or read-only transactions)")
    if state == "57014":
        return StoreUnavailable(f"{where}: statement canceled ({msg})")
    if state.startswith("28") or "authentication failed" in msg:
        return StoreUnavailable(f"cannot log in to {where}: {msg}")
    if state == "3D000":
        return StoreUnavailable(f"cannot connect to {where}: {msg}")
    if isinstance(e, psycopg.OperationalError) or state.startswith(("08", "57")):
        if str(e).startswith("connection failed") or "connection to server" in msg:
            return StoreUnavailable(f"cannot connect to {where}: {msg}")
        return StoreUnavailable(
            f"lost the connection to {where} ({msg}); a write's outcome is unknown: "
            "retry it with the same intent_id"
        )
    return StoreUnavailable(f"{where}: {msg}")


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _guarded(
    fn: Callable[Concatenate[SqlEventStore, _P], _R],
) -> Callable[Concatenate[SqlEventStore, _P], _R]:
    """Let no driver error out of a public method: translate it with `_translate`."""

    @functools.wraps(fn)
    def guarded(self: SqlEventStore, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return fn(self, *args, **kwargs)
        except ShardSqlError:
            raise
        except Exception as e:
            err = _translate(e, self._site)
            if err is None:
                raise
            raise err from e

    return guarded


# -- connections -----------------------------------------------------------------------------


class _Conn:
    """A driver connection the store keeps, with a reusable cursor."""

    __slots__ = ("cur", "fairy", "raw")

    def __init__(self, fairy: Any) -> None:
        self.fairy = fairy
        self.raw: Any = fairy.dbapi_connection
        self.cur: Any = self.raw.cursor()


class _Connections:
    """Driver connections taken from the engine's pool once and reused: a list pop/append per
    call (~0.1 us) instead of a pool checkout and reset (~6-7 us).

    At most `max_idle` are kept; an in-memory SQLite database has one connection, used by one
    thread at a time. After a fork the parent's connections are left alone (never closed).
    """

    _orphans: ClassVar[list[_Conn]] = []  # inherited over fork: referenced, never closed here
    _all: ClassVar[weakref.WeakSet[_Connections]] = weakref.WeakSet()

    def __init__(
        self,
        engine: Engine,
        setup: Callable[[_Conn], None],
        teardown: Callable[[_Conn], None],
        *,
        single: bool,
        max_idle: int = 32,
    ) -> None:
        self._engine = engine
        self._setup = setup
        self._teardown = teardown
        self._idle: list[_Conn] = []
        self._max_idle = max_idle
        self._closed = False
        self._serial = threading.Lock() if single else None
        self._all.add(self)

    @classmethod
    def _after_fork(cls) -> None:
        # In the child: the parent's connections are its own (a fork hook, not an os.getpid()
        # per call: that is a system call, 0.2 us).
        for conns in list(cls._all):
            cls._orphans.extend(conns._idle)
            conns._idle = []

    def get(self) -> _Conn:
        if self._serial is None:
            try:
                return self._idle.pop()
            except IndexError:
                pass
            return self._connect()
        self._serial.acquire()
        try:
            try:
                return self._idle.pop()
            except IndexError:
                pass
            return self._connect()
        except BaseException:
            self._serial.release()
            raise

    def _connect(self) -> _Conn:
        if self._closed:
            raise StoreUnavailable("the store is closed")
        fairy = self._engine.raw_connection()
        try:
            conn = _Conn(fairy)
            self._setup(conn)
        except BaseException:
            fairy.invalidate()
            raise
        return conn

    def put(self, conn: _Conn, healthy: bool = True) -> None:
        idle = self._idle
        if healthy and self._serial is None and not self._closed and len(idle) < self._max_idle:
            idle.append(conn)
            return
        try:
            if not healthy:
                conn.fairy.invalidate()
            elif self._closed or len(self._idle) >= self._max_idle:
                self._release(conn)
            else:
                self._idle.append(conn)
        finally:
            if self._serial is not None:
                self._serial.release()

    def drop_idle(self) -> None:
        """Forget the idle connections (after one was found dead, they likely are too)."""
        while self._idle:
            self._idle.pop().fairy.invalidate()

    def close(self) -> None:
        self._closed = True
        while self._idle:
            self._release(self._idle.pop())

    def _release(self, conn: _Conn) -> None:
        """Hand a connection back to the engine's pool as the store found it."""
        try:
            conn.cur.close()
            self._teardown(conn)
            conn.fairy.close()
        except Exception:
            conn.fairy.invalidate()


if hasattr(os, "register_at_fork"):  # pragma: no branch
    os.register_at_fork(after_in_child=_Connections._after_fork)


# -- values in and out -----------------------------------------------------------------------


_seconds: dict[tuple[int, ...], str] = {}


def _sqlite_time(dt: datetime) -> str:
    """UTC text, fixed width, in SQLAlchemy's SQLite DATETIME format: sorts as it compares."""
    if dt.tzinfo is not UTC:
        dt = dt.astimezone(UTC)
    # The text up to the second is formatted once per second (1.0 -> 0.5 us per time).
    key = (dt.second, dt.minute, dt.hour, dt.day, dt.month, dt.year)
    text = _seconds.get(key)
    if text is None:
        if len(_seconds) > 64:
            _seconds.clear()
        text = _seconds[key] = dt.isoformat(" ", "seconds")[:19]
    return f"{text}.{dt.microsecond:06d}"


_fromiso = datetime.fromisoformat


def _parse_sqlite_time(text: str) -> datetime:
    # Parsing "...+00:00" is several times cheaper than parsing and then .replace(tzinfo=UTC).
    return _fromiso(text + "+00:00")


def _pg_time(dt: datetime) -> datetime:
    return dt if dt.tzinfo is UTC else dt.astimezone(UTC)


# -- the dialects ----------------------------------------------------------------------------


def _insert_one_sql(p: str, *, pg: bool, fence: bool, intent: bool) -> str:
    payload = f"CAST({p} AS jsonb)" if pg else p
    sql = (
        f"INSERT INTO {EVENTS} ({_COLUMNS}) "
        f"SELECT {p}, {p}, {p}, {payload}, {p}, {p}, {p}, {p} "
        f"WHERE COALESCE((SELECT seq + 1 FROM {EVENTS} WHERE space = {p} "
        f"ORDER BY seq DESC LIMIT 1), 0) = {p}"
    )
    if fence:
        lock = " FOR SHARE" if pg else ""
        sql += (
            f" AND EXISTS (SELECT 1 FROM {LEASES} WHERE space = {p} AND holder = {p} "
            f"AND generation = {p}{lock})"
        )
    if intent:
        sql += f" AND NOT EXISTS (SELECT 1 FROM {EVENTS} WHERE space = {p} AND intent_id = {p})"
    return sql


def _insert_small_sql(fence: bool, intent: bool) -> str:
    """PostgreSQL: a small batch in one statement, rows from arrays in order (`WITH
    ORDINALITY` numbers them: seq = expected + n - 1), under the checks of `_insert_one_sql`
    (evaluated once: they do not depend on the row)."""
    sql = (
        f"INSERT INTO {EVENTS} ({_COLUMNS}) "
        "SELECT %s, %s + b.n - 1, b.t, CAST(b.p AS jsonb), b.at, b.w, b.g, b.i "
        "FROM unnest(%s::text[], %s::text[], %s::timestamptz[], %s::text[], %s::bigint[], "
        "%s::text[]) WITH ORDINALITY AS b(t, p, at, w, g, i, n) "
        f"WHERE COALESCE((SELECT seq + 1 FROM {EVENTS} WHERE space = %s "
        "ORDER BY seq DESC LIMIT 1), 0) = %s"
    )
    if fence:
        sql += (
            f" AND EXISTS (SELECT 1 FROM {LEASES} WHERE space = %s AND holder = %s "
            "AND generation = %s FOR SHARE)"
        )
    if intent:
        sql += f" AND NOT EXISTS (SELECT 1 FROM {EVENTS} WHERE space = %s AND intent_id = ANY(%s))"
    return sql


def _sqlite_insert_one_sql(*, fence: bool, intent: bool, own: bool = False) -> str:
    """SQLite's append of one event: `INSERT ... VALUES` whose seq is NULL unless the checks
    hold, so a failed check stops the statement with a NOT NULL violation and writes nothing.

    Not `INSERT ... SELECT ... WHERE` (the PostgreSQL form): an INSERT whose SELECT reads its own
    table goes through a temporary table, measured +3-4 us of ~20 us per append. The VALUES
    subqueries run after the statement took the write lock, before the row is inserted.
    Parameters: ?1-?8 the row; ?9, ?10 the fence's holder and generation, unless `own`: the
    fence is the row's writer and generation (?6, ?7), as in every append but an import."""
    checks = (
        f"COALESCE((SELECT seq + 1 FROM {EVENTS} WHERE space = ?1 "
        "ORDER BY seq DESC LIMIT 1), 0) = ?2"
    )
    if fence:
        holder, generation = ("?6", "?7") if own else ("?9", "?10")
        checks += (
            f" AND EXISTS (SELECT 1 FROM {LEASES} WHERE space = ?1 AND holder = {holder} "
            f"AND generation = {generation})"
        )
    if intent:
        checks += f" AND NOT EXISTS (SELECT 1 FROM {EVENTS} WHERE space = ?1 AND intent_id = ?8)"
    return (
        f"INSERT INTO {EVENTS} ({_COLUMNS}) "
        f"VALUES (?1, CASE WHEN {checks} THEN ?2 END, ?3, ?4, ?5, ?6, ?7, ?8)"
    )


def _is_check_failure(e: sqlite3.IntegrityError) -> bool:
    """The NOT NULL violation of `_sqlite_insert_one_sql`'s seq: a check did not hold."""
    return getattr(e, "sqlite_errorcode", 0) == 1299 and f"{EVENTS}.seq" in str(e)


class _Dialect:
    """What differs between SQLite and PostgreSQL: placeholders, times, payloads, statements."""

    name = ""
    p = "?"

    def __init__(self) -> None:
        p = self.p
        pg = self.name == "postgresql"
        self.insert_one = {
            (fence, intent): _insert_one_sql(p, pg=pg, fence=fence, intent=intent)
            for fence in (False, True)
            for intent in (False, True)
        }
        self.insert_own: dict[bool, str] = {}  # SQLite: the fence is the row's writer
        self.insert_values = f"INSERT INTO {EVENTS} ({_COLUMNS}) VALUES ({', '.join([p] * 8)})"
        self.head_sql = f"SELECT seq FROM {EVENTS} WHERE space = {p} ORDER BY seq DESC LIMIT 1"
        self.read_sql = (
            f"SELECT {_READ_COLUMNS} FROM {EVENTS} WHERE space = {p} AND seq >= {p} ORDER BY seq"
        )
        self.read_limit_sql = self.read_sql + f" LIMIT {p}"
        self.spaces_sql = (
            f"WITH RECURSIVE s(space) AS (SELECT min(space) FROM {EVENTS} "
            f"UNION ALL SELECT (SELECT min(space) FROM {EVENTS} WHERE space > s.space) "
            "FROM s WHERE s.space IS NOT NULL) SELECT space FROM s WHERE space IS NOT NULL"
        )
        self.lease_sql = f"SELECT holder, expires_at, generation FROM {LEASES} WHERE space = {p}"
        self.version_sql = f"SELECT version_num FROM {VERSION_TABLE}"
        greatest, least = ("GREATEST", "LEAST") if pg else ("max", "min")
        # A renewal by the holder of a valid lease keeps the generation; anything else (a new
        # holder over a lapsed or released lease, or the same holder after a lapse) is a new
        # grant: generation + 1. SET expressions all read the old row.
        self.grant_sql = (
            f"UPDATE {LEASES} SET "
            f"generation = CASE WHEN holder = {p} AND expires_at > {p} "
            "THEN generation ELSE generation + 1 END, "
            f"expires_at = CASE WHEN holder = {p} AND expires_at > {p} "
            f"THEN {greatest}(expires_at, {p}) ELSE {p} END, "
            f"holder = {p} "
            f"WHERE space = {p} AND (holder = {p} OR expires_at <= {p}) "
            "RETURNING holder, expires_at, generation"
        )
        self.first_grant_sql = (
            f"INSERT INTO {LEASES} (space, holder, expires_at, generation) "
            f"VALUES ({p}, {p}, {p}, 1) ON CONFLICT (space) DO NOTHING "
            "RETURNING holder, expires_at, generation"
        )
        self.renew_sql = (
            f"UPDATE {LEASES} SET expires_at = {greatest}(expires_at, {p}) "
            f"WHERE space = {p} AND holder = {p} AND generation = {p} AND expires_at > {p} "
            "RETURNING holder, expires_at, generation"
        )
        self.release_sql = (
            f"UPDATE {LEASES} SET expires_at = {least}(expires_at, {p}) "
            f"WHERE space = {p} AND holder = {p} AND generation = {p}"
        )
        self.current_sql = self.lease_sql + f" AND expires_at > {p}"
        # Within a write transaction: SQLite holds the write lock already; PostgreSQL adds
        # FOR SHARE (below) so a new grant waits for the write's commit.
        self.lease_locked_sql = self.lease_sql
        self.revoke_sql = (
            f"UPDATE {LEASES} SET expires_at = {least}(expires_at, {p}), "
            f"generation = generation + 1 WHERE space = {p} "
            "RETURNING holder, expires_at, generation"
        )

    # values
    def time(self, dt: datetime) -> Any:
        raise NotImplementedError

    def lease(self, space: str, row: Sequence[Any]) -> Lease:
        raise NotImplementedError

    def to_events(self, space: str, rows: list[Any]) -> list[Event]:
        raise NotImplementedError

    # transactions
    def begin_write(self, c: _Conn) -> None:
        """Start a multi-statement write transaction."""
        raise NotImplementedError

    def commit(self, c: _Conn) -> None:
        c.cur.execute("COMMIT")

    def rollback(self, c: _Conn) -> None:
        raise NotImplementedError

    def insert_rows(self, c: _Conn, rows: list[tuple[Any, ...]]) -> None:
        """Insert checked rows inside the open write transaction."""
        c.cur.executemany(self.insert_values, rows)


class _Sqlite(_Dialect):
    name = "sqlite"
    p = "?"

    def __init__(self) -> None:
        super().__init__()
        self.insert_one = {
            (fence, intent): _sqlite_insert_one_sql(fence=fence, intent=intent)
            for fence in (False, True)
            for intent in (False, True)
        }
        self.insert_own = {
            intent: _sqlite_insert_one_sql(fence=True, intent=intent, own=True)
            for intent in (False, True)
        }

    def time(self, dt: datetime) -> Any:
        return _sqlite_time(dt)

    def lease(self, space: str, row: Sequence[Any]) -> Lease:
        return Lease(space, row[0], _parse_sqlite_time(row[1]), row[2])

    def to_events(self, space: str, rows: list[Any]) -> list[Event]:
        fromiso, make = _fromiso, new_event
        payloads = decode_payloads([row[2] for row in rows])
        return [
            make(space, s, t, p, fromiso(at + "+00:00"), w, g, i)
            for (s, t, _, at, w, g, i), p in zip(rows, payloads, strict=True)
        ]

    def begin_write(self, c: _Conn) -> None:
        # Once the write lock is taken, nothing else in the transaction waits for it; a busy
        # database fails it at once, and `_call` retries.
        c.cur.execute("BEGIN IMMEDIATE")

    def rollback(self, c: _Conn) -> None:
        if c.raw.in_transaction:
            c.raw.rollback()


class _Postgres(_Dialect):
    name = "postgresql"
    p = "%s"

    def __init__(self) -> None:
        super().__init__()
        self.copy_sql = f"COPY {EVENTS} ({_COLUMNS}) FROM STDIN"
        self._small: dict[tuple[bool, bool], str] = {}
        self.lease_locked_sql = self.lease_sql + " FOR SHARE"

    def time(self, dt: datetime) -> Any:
        return dt

    def lease(self, space: str, row: Sequence[Any]) -> Lease:
        return Lease(space, row[0], _pg_time(row[1]), row[2])

    def to_events(self, space: str, rows: list[Any]) -> list[Event]:
        make = new_event
        if rows and rows[0][3].tzinfo is not UTC:  # a session not in UTC: convert
            return [make(space, s, t, p, _pg_time(at), w, g, i) for s, t, p, at, w, g, i in rows]
        return [make(space, s, t, p, at, w, g, i) for s, t, p, at, w, g, i in rows]

    def begin_write(self, c: _Conn) -> None:
        c.cur.execute("BEGIN")

    def rollback(self, c: _Conn) -> None:
        if c.raw.info.transaction_status != 0:  # not idle
            c.raw.rollback()

    SMALL_BATCH = 10
    SMALL_BATCH_INTENTS = 100
    """Batches up to SMALL_BATCH events (SMALL_BATCH_INTENTS if the first has an intent id)
    are one `INSERT ... SELECT FROM unnest(...)` statement in autocommit with the checks of
    `insert_one`; larger ones are BEGIN, checks, COPY, COMMIT. Measured (ms per batch, COPY
    against one statement): 2 events 0.60/0.38, 10 0.62/0.60, 30 0.82/1.19; with intent ids
    (checked before COPY) 10 1.31/0.83, 100 11.0/8.5."""

    def insert_small(
        self,
        space: str,
        events: list[Event],
        batch: Sequence[Pending],
        fence: Lease | None,
        expected_seq: int,
    ) -> tuple[str, tuple[Any, ...]]:
        """The statement and parameters writing `events` at `expected_seq`, or nothing."""
        intents = [e.intent_id for e in events if e.intent_id is not None]
        key = (fence is not None, bool(intents))
        sql = self._small.get(key)
        if sql is None:
            sql = self._small[key] = _insert_small_sql(*key)
        params: tuple[Any, ...] = (
            space,
            expected_seq,
            [e.type for e in events],
            [p.payload_json for p in batch],
            [e.recorded_at for e in events],
            [e.writer for e in events],
            [e.generation for e in events],
            [e.intent_id for e in events],
            space,
            expected_seq,
        )
        if fence is not None:
            params += (space, fence.holder, fence.generation)
        if intents:
            params += (space, intents)
        return sql, params

    def insert_rows(self, c: _Conn, rows: list[tuple[Any, ...]]) -> None:
        # COPY beats executemany (measured: 100 rows 1.5 ms against 1.8-2.0 ms, pipelined).
        with c.cur.copy(self.copy_sql) as copy:
            for row in rows:
                copy.write_row(row)


# -- the store -------------------------------------------------------------------------------


class SqlEventStore(StoreBase, LeaseStore, SqlIntents):
    """Events and leases in a SQL database: a SQLite file or a PostgreSQL server.

    `url_or_engine`: a SQLAlchemy URL (`sqlite:///path.db`, `postgresql+psycopg://...`; plain
    `postgresql://` selects psycopg too) or an `Engine`. A PostgreSQL engine is used as is and
    left open by `close()`; for a SQLite engine the store opens its own connections to its file.

    A SQLite file is migrated to the head schema when opened; any other database must already be
    at head (else `SchemaError`) unless `migrate=True`.

    SQLite options: `sqlite_synchronous` ("FULL", the default: an acknowledged append survives
    power loss; "NORMAL": faster, the last appends may be lost on power loss, never corrupted),
    also settable as `?synchronous=NORMAL` in the URL; `busy_timeout` (seconds a write waits for
    another process's write lock).
    """

    ITER_PAGE = 2000

    def __init__(
        self,
        url_or_engine: str | URL | Engine,
        *,
        migrate: bool = False,
        sqlite_synchronous: str = "FULL",
        busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
    ) -> None:
        if not isinstance(sqlite_synchronous, str) or sqlite_synchronous.upper() not in SYNCHRONOUS:
            raise InvalidEvent("sqlite_synchronous", f"must be one of {', '.join(SYNCHRONOUS)}")
        if isinstance(busy_timeout, bool) or not isinstance(busy_timeout, int | float):
            raise InvalidEvent("busy_timeout", "must be a number of seconds")
        if not 0 <= busy_timeout <= 3600:
            raise InvalidEvent("busy_timeout", "must be between 0 and 3600 seconds")
        self._busy_timeout = float(busy_timeout)
        self._closed = False
        self._init_intents()
        engine, self._owned = _open_engine(
            url_or_engine, synchronous=sqlite_synchronous.upper(), busy_timeout=busy_timeout
        )
        self._engine = engine
        self._site = _Site.of(engine.url, self._busy_timeout)
        self.where = self._site.where
        self._sqlite = engine.dialect.name == "sqlite"
        self._d: _Dialect = _Sqlite() if self._sqlite else _Postgres()
        database = sqlite_file(engine.url) if self._sqlite else None
        if database is not None:
            self._bells = Bells.beside(f"{database}-bells")
        self._conns = _Connections(
            engine, self._setup, self._teardown, single=self._sqlite and _is_memory(engine.url)
        )
        try:
            self._open_schema(migrate or self._sqlite)
        except BaseException:
            self.close()
            raise

    def __repr__(self) -> str:
        return f"SqlEventStore({self._engine.url.render_as_string(hide_password=True)!r})"

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine (for SQLite: the store's own)."""
        return self._engine

    def close(self) -> None:
        """Close the store's connections, and dispose the engine unless it was passed in."""
        if self._closed:
            return
        self._closed = True
        self._close_intents()
        self._conns.close()
        if self._owned:
            self._engine.dispose()

    def __enter__(self) -> SqlEventStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- connections, retries and errors ---------------------------------------------------

    def _setup(self, c: _Conn) -> None:
        if self._sqlite:
            # Busy waits are ours, in `_call`, finer than SQLite's busy handler, which sleeps 1,
            # 2, 5, 10, 15, 20, 25, ... ms between its tries (sqliteDefaultBusyCallback,
            # https://www.sqlite.org/c3ref/busy_timeout.html): beside a writer that takes the
            # lock again and again (a holder appending in a loop) a lease grant or a forwarded
            # intent waited 180-250 ms, and a holder's append 1-3 ms beside forwarders.
            c.cur.execute("PRAGMA busy_timeout = 0")
        elif not c.raw.autocommit:
            # A connection of an engine passed in: the store's statements are each their own
            # transaction, and it opens explicit ones with BEGIN.
            c.raw.autocommit = True
            c.raw.execute("SET TIME ZONE 'UTC'")
        if not self._sqlite:
            from psycopg.types.json import set_json_loads

            set_json_loads(load_json, c.cur)  # payloads read from a deep call stack too

    def _teardown(self, c: _Conn) -> None:
        if self._sqlite:
            c.raw.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}")
        elif not self._owned:
            c.raw.execute("RESET TIME ZONE")
            c.raw.autocommit = False

    def _healthy(self, c: _Conn) -> bool:
        if self._sqlite:
            return True
        return not (c.raw.closed or c.raw.broken)

    def _call(self, fn: Callable[..., _R], *args: Any, retry: bool = True) -> _R:
        """Run `fn(conn, *args)` on a kept connection; every failed attempt rolls back first, so
        nothing is half-written.

        SQLite busy errors (its busy handler is off: see `_setup`) are retried every 50 us growing
        to 2 ms until `busy_timeout` has passed since the call began. A PostgreSQL connection
        found dead (a server restart, a terminated backend) is dropped with every idle one, and
        with `retry` (the call is idempotent: a read, or a write whose intent ids make a repeat
        harmless) the call runs once more on a new connection.
        """
        deadline = time.monotonic() + self._busy_timeout
        delay = BUSY_FIRST
        reconnected = False
        while True:
            try:
                c = self._conns.get()
            except Exception as e:
                if self._sqlite and _is_sqlite_busy(e):
                    delay = self._backoff(deadline, delay, e)
                    continue
                raise
            healthy = True
            try:
                return fn(c, *args)
            except BaseException as e:
                try:
                    self._d.rollback(c)
                except Exception:
                    healthy = False
                healthy = healthy and self._healthy(c)
                if not isinstance(e, Exception) or isinstance(e, ShardSqlError):
                    raise
                if self._sqlite and _is_sqlite_busy(e):
                    delay = self._backoff(deadline, delay, e)
                    continue
                if not healthy:
                    self._conns.drop_idle()
                    if retry and not reconnected:
                        reconnected = True
                        continue
                raise
            finally:
                self._conns.put(c, healthy)

    def _backoff(self, deadline: float, delay: float, e: Exception) -> float:
        """Sleep `delay` (jittered) before the next try, or raise `e` past `deadline`; return the
        next delay."""
        if time.monotonic() >= deadline:
            raise e
        time.sleep(delay * (0.5 + random.random()))
        return min(delay * 1.5, BUSY_MAX)

    # -- schema ----------------------------------------------------------------------------

    def _open_schema(self, migrate_now: bool) -> None:
        try:
            revision = self._call(self._revision)
        except Exception as e:
            err = _translate(e, self._site)
            if err is None:
                raise
            raise err from e
        if revision == SCHEMA_REVISION:
            return
        if revision is not None and (not migrate_now or not _known_revision(revision)):
            raise SchemaError(_revision_problem(self._site, revision))
        if not migrate_now:
            raise SchemaError(f"{self.where} has no shard_sql schema: {self._site.hint}")
        _migrate(self._engine, self._site)

    def _revision(self, c: _Conn) -> str | None:
        try:
            c.cur.execute(self._d.version_sql)
            rows = c.cur.fetchall()
        except Exception as e:
            if isinstance(_translate(e, self._site), SchemaError):
                return None  # no version table: not a shard_sql database (yet)
            raise
        return str(rows[0][0]) if rows else None

    # -- reads -----------------------------------------------------------------------------

    @_guarded
    def events(self, space: str, *, from_seq: int = 0, limit: int | None = None) -> list[Event]:
        check_space(space)
        check_seq("from_seq", from_seq)
        if limit is not None and check_seq("limit", limit) == 0:
            return []
        return self._call(self._read, space, from_seq, limit)

    def _read(self, c: _Conn, space: str, from_seq: int, limit: int | None) -> list[Event]:
        cur = c.cur
        if limit is None:
            cur.execute(self._d.read_sql, (space, from_seq))
        else:
            cur.execute(self._d.read_limit_sql, (space, from_seq, limit))
        return self._d.to_events(space, cur.fetchall())

    @_guarded
    def head(self, space: str) -> int:
        check_space(space)
        return self._call(self._head, space)

    def _head(self, c: _Conn, space: str) -> int:
        c.cur.execute(self._d.head_sql, (space,))
        row = c.cur.fetchone()
        return 0 if row is None else int(row[0]) + 1

    @_guarded
    def spaces(self) -> list[str]:
        return self._call(self._spaces)

    def _spaces(self, c: _Conn) -> list[str]:
        c.cur.execute(self._d.spaces_sql)
        return [row[0] for row in c.cur.fetchall()]

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
        """Write `batch` at `expected_seq` in one transaction (see the module docstring)."""
        check = fence if verify_fence else None
        if len(batch) == 1:
            # One event: one statement in autocommit. Its checks run again (to say why) only
            # when it wrote nothing.
            p = batch[0]
            at = p.recorded_at or _now(UTC)
            writer = p.writer if p.writer is not None else fence.holder if fence else ""
            gen = p.generation if p.generation is not None else fence.generation if fence else 0
            intent_id = p.intent_id
            sql = self._d.insert_one[(check is not None, intent_id is not None)]
            if not self._sqlite:
                params: tuple[Any, ...] = (
                    space, expected_seq, p.type, p.payload_json, _pg_time(at), writer, gen,
                    intent_id, space, expected_seq,
                )  # fmt: skip
                if check is not None:
                    params += (space, check.holder, check.generation)
                if intent_id is not None:
                    params += (space, intent_id)
            elif check is None or (check.holder == writer and check.generation == gen):
                if check is not None:  # two parameters fewer
                    sql = self._d.insert_own[intent_id is not None]
                params = (
                    space, expected_seq, p.type, p.payload_json, _sqlite_time(at), writer, gen,
                    intent_id,
                )  # fmt: skip
            else:
                params = (
                    space, expected_seq, p.type, p.payload_json, _sqlite_time(at), writer, gen,
                    intent_id, check.holder, check.generation,
                )  # fmt: skip
            if self._sqlite and self._insert_once(sql, params):
                if intent_id is not None and self._bells is not None:
                    self._bells.ring("e", space)  # a forwarder may wait for it: `shard_sql._bells`
                return [
                    new_event(space, expected_seq, p.type, p.payload, at, writer, gen, intent_id)
                ]
            written = self._write_one(space, p, expected_seq, check, sql, params, at, writer, gen)
            if intent_id is not None and self._bells is not None:
                self._bells.ring("e", space)
            return written
        if not batch:
            raise InvalidEvent("items", "must not be empty")
        now = system_clock()
        events = [stamp(space, expected_seq + n, p, fence, now) for n, p in enumerate(batch)]
        # A write whose every event has an intent id can be repeated safely after a lost
        # connection: a committed first attempt is then found and returned, never doubled.
        repeatable = all(p.intent_id is not None for p in batch)
        try:
            for _ in range(3):
                done = self._call(
                    self._write, space, events, batch, check, expected_seq, retry=repeatable
                )
                if done is not None:
                    if self._bells is not None and any(p.intent_id for p in batch):
                        self._bells.ring("e", space)
                    return done
            # Three benign races in a row (the head moved between the write and the check).
            raise SeqConflict(space, expected_seq)
        except Exception as e:
            return self._write_failed(e, space, batch, expected_seq, check)

    def _insert_once(self, sql: str, params: tuple[Any, ...]) -> bool:
        """SQLite: one attempt at a single-event INSERT, without `_call`'s retry scaffolding
        (0.4 us of ~30). Whether it wrote the row; False after any error too: a statement in
        autocommit either committed or wrote nothing, so `_write_one` simply runs it again."""
        conns = self._conns
        try:
            c = conns.get()
        except Exception:
            return False
        healthy = True
        try:
            cur: sqlite3.Cursor = c.cur
            cur.execute(sql, params)
            return cur.rowcount == 1
        except Exception:
            try:
                self._d.rollback(c)
            except Exception:
                healthy = False
            return False
        finally:
            conns.put(c, healthy)

    def _write_one(
        self,
        space: str,
        p: Pending,
        seq: int,
        check: Lease | None,
        sql: str,
        params: tuple[Any, ...],
        at: datetime,
        writer: str,
        gen: int,
    ) -> list[Event]:
        """A single-event write through `_call` (retries, reconnects); when it writes nothing,
        `_precheck` says why."""
        batch = [p]
        try:
            for _ in range(3):
                if self._call(self._insert, sql, params, retry=p.intent_id is not None):
                    return [new_event(space, seq, p.type, p.payload, at, writer, gen, p.intent_id)]
                # Nothing written: say why (the same checks, in the reference adapter's order).
                done = self._call(self._precheck, space, batch, seq, check)
                if done is not None:
                    return done
            raise SeqConflict(space, seq)
        except Exception as e:
            return self._write_failed(e, space, batch, seq, check)

    def _insert(self, c: _Conn, sql: str, params: Sequence[Any]) -> bool:
        """Run a single-event INSERT; whether it wrote the row."""
        cur = c.cur
        try:
            cur.execute(sql, params)
        except sqlite3.IntegrityError as e:
            if _is_check_failure(e):
                return False
            raise
        return bool(cur.rowcount == 1)

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
        if isinstance(e, ShardSqlError):
            raise e
        err = _translate(e, self._site, space=space, expected_seq=expected_seq)
        if err is None:
            raise e
        if isinstance(err, SeqConflict) and any(p.intent_id for p in batch):
            # Lost a race with a writer of the same intent id: return what it wrote.
            done = self._guarded_call(self._precheck, space, batch, expected_seq, check)
            if done is not None:
                return done
        raise err from e

    @_guarded
    def _guarded_call(self, fn: Callable[..., _R], *args: Any) -> _R:
        return self._call(fn, *args)

    def _write(
        self,
        c: _Conn,
        space: str,
        events: list[Event],
        batch: Sequence[Pending],
        fence: Lease | None,
        expected_seq: int,
    ) -> list[Event] | None:
        """One attempt at a batch: the events written, the events an earlier call wrote for these
        intent ids, a raised error, or None (a benign race: try again)."""
        d = self._d
        if isinstance(d, _Postgres) and len(events) <= (
            d.SMALL_BATCH if events[0].intent_id is None else d.SMALL_BATCH_INTENTS
        ):
            # One statement, one round trip (BEGIN, checks, COPY, COMMIT are four): what a
            # holder applying a few forwarded intents at a time writes.
            c.cur.execute(*d.insert_small(space, events, batch, fence, expected_seq))
            if c.cur.rowcount == len(events):
                return events
            return self._precheck(c, space, batch, expected_seq, fence)
        d.begin_write(c)
        done = self._precheck(c, space, batch, expected_seq, fence, locked=True)
        if done is not None:
            d.rollback(c)
            return done
        # A batch shares one time (an import keeps each event's): format each time once.
        times = {t: d.time(t) for t in {e.recorded_at for e in events}}
        d.insert_rows(
            c,
            [
                (
                    space,
                    e.seq,
                    e.type,
                    p.payload_json,
                    times[e.recorded_at],
                    e.writer,
                    e.generation,
                    e.intent_id,
                )
                for e, p in zip(events, batch, strict=True)
            ],
        )
        d.commit(c)
        return events

    def _precheck(
        self,
        c: _Conn,
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
            found = self._by_intent(c, space, ids)
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

    def _by_intent(self, c: _Conn, space: str, ids: list[str]) -> dict[str, Event]:
        found: dict[str, Event] = {}
        p = self._d.p
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            c.cur.execute(
                f"SELECT {_READ_COLUMNS} FROM {EVENTS} WHERE space = {p} "
                f"AND intent_id IN ({', '.join([p] * len(chunk))})",
                (space, *chunk),
            )
            for e in self._d.to_events(space, c.cur.fetchall()):
                assert e.intent_id is not None
                found[e.intent_id] = e
        return found

    # -- leases ----------------------------------------------------------------------------

    def _lease_record(self, c: _Conn, space: str, *, locked: bool = False) -> Lease | None:
        c.cur.execute(self._d.lease_locked_sql if locked else self._d.lease_sql, (space,))
        row = c.cur.fetchone()
        return None if row is None else self._d.lease(space, row)

    @_guarded
    def lease_record(self, space: str) -> Lease | None:
        """The space's lease record, valid or not (None: never leased)."""
        check_space(space)
        return self._call(self._lease_record, space)

    def _returning(self, c: _Conn, sql: str, params: Sequence[Any]) -> Any:
        c.cur.execute(sql, params)
        rows = c.cur.fetchall()
        return rows[0] if rows else None

    def _in_write_tx(self, c: _Conn, body: Callable[[], _R]) -> _R:
        """SQLite: run `body` in a BEGIN IMMEDIATE transaction. PostgreSQL: each statement is
        its own compare-and-set, so `body` runs in autocommit."""
        if not self._sqlite:
            return body()
        self._d.begin_write(c)
        result = body()
        self._d.commit(c)
        return result

    @_guarded
    def lease_acquire(self, space: str, holder: str, ttl_seconds: float, now: datetime) -> Lease:
        expires = now + timedelta(seconds=check_ttl(ttl_seconds))
        lease = self._call(self._acquire, space, holder, expires, now)
        self._lease_granted()
        return lease

    def _acquire(
        self, c: _Conn, space: str, holder: str, expires: datetime, now: datetime
    ) -> Lease:
        d = self._d
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
            lease = self._in_write_tx(c, attempt)
            if lease is not None:
                return lease
        raise StoreUnavailable(f"{self.where}: lease on {space!r} kept changing; try again")

    @_guarded
    def lease_renew(self, lease: Lease, ttl_seconds: float, now: datetime) -> Lease:
        expires = now + timedelta(seconds=check_ttl(ttl_seconds))
        d = self._d
        params = (d.time(expires), lease.space, lease.holder, lease.generation, d.time(now))
        row = self._call(self._returning, d.renew_sql, params)
        if row is None:
            raise StaleLease(lease, "lost before renewal")
        return d.lease(lease.space, row)

    @_guarded
    def lease_release(self, lease: Lease, now: datetime) -> None:
        d = self._d
        params = (d.time(now), lease.space, lease.holder, lease.generation)
        self._call(self._execute, d.release_sql, params)

    def _execute(self, c: _Conn, sql: str, params: Sequence[Any]) -> None:
        c.cur.execute(sql, params)

    @_guarded
    def lease_current(self, space: str, now: datetime) -> Lease | None:
        d = self._d
        row = self._call(self._returning, d.current_sql, (space, d.time(now)))
        return None if row is None else d.lease(space, row)

    @_guarded
    def lease_revoke(self, space: str, now: datetime) -> Lease | None:
        d = self._d
        row = self._call(self._returning, d.revoke_sql, (d.time(now), space), retry=False)
        return None if row is None else d.lease(space, row)


# -- migrations ------------------------------------------------------------------------------


def migrations_dir() -> Path:
    """The alembic script directory: inside the installed package (a wheel ships it as
    `shard_sql/migrations`), else `migrations/` at the top of a source checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "migrations", here.parent / "migrations"):
        if (candidate / "env.py").is_file():
            return candidate
    import importlib.util

    spec = importlib.util.find_spec("shard_sql.migrations")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            if (Path(location) / "env.py").is_file():
                return Path(location)
    raise SchemaError("shard_sql's migrations are missing from this installation")


def alembic_config(connection: Connection | None = None) -> Config:
    """An alembic `Config` for shard_sql's migrations, optionally bound to an open connection."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()).replace("%", "%%"))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


@contextmanager
def migration_connection(
    url_or_engine: str | URL | Engine, *, busy_timeout: float = DEFAULT_BUSY_TIMEOUT
) -> Iterator[Connection]:
    """A connection in a transaction that holds shard_sql's migration lock, committed on exit
    (used by `migrations/env.py` when alembic runs from the command line)."""
    engine, owned = _open_engine(url_or_engine, busy_timeout=busy_timeout)
    try:
        with _locked_connection(engine) as conn:
            yield conn
    finally:
        if owned:
            engine.dispose()


@contextmanager
def _locked_connection(engine: Engine) -> Iterator[Connection]:
    """SQLite: BEGIN IMMEDIATE (the write lock). PostgreSQL: a transaction-level advisory lock.
    Concurrent migrations queue up; the later ones find the schema at head and do nothing."""
    with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            conn.execution_options(isolation_level="READ COMMITTED")
        with conn.begin():
            if engine.dialect.name == "postgresql":
                conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK})")
            yield conn


_MIGRATION_LOCK = 0x5A4D_5351_4C00_0001
"""The advisory lock key migrations take on PostgreSQL ("ZMSQL" + 1)."""


def _migrate(engine: Engine, where: _Site) -> str:
    from alembic import command

    deadline = time.monotonic() + DEFAULT_BUSY_TIMEOUT
    while True:
        try:
            with _locked_connection(engine) as conn:
                command.upgrade(alembic_config(conn), "head")
            return SCHEMA_REVISION
        except ShardSqlError:
            raise
        except Exception as e:
            if _is_sqlite_busy(e) and time.monotonic() < deadline:
                time.sleep(0.01 + random.random() * 0.05)
                continue
            err = _translate(e, where)
            if err is None:
                raise
            raise err from e


def migrate(url_or_engine: str | URL | Engine) -> str:
    """Upgrade the database to the head schema (creating the tables in an empty one) and return
    the head revision. Safe to run concurrently and repeatedly."""
    engine, owned = _open_engine(url_or_engine)
    try:
        return _migrate(engine, _Site.of(engine.url))
    finally:
        if owned:
            engine.dispose()


def _known_revision(revision: str) -> bool:
    from alembic.script import ScriptDirectory

    try:
        return ScriptDirectory(str(migrations_dir())).get_revision(revision) is not None
    except Exception:
        return False


def _revision_problem(where: _Site, revision: str) -> str:
    if _known_revision(revision):
        return (
            f"{where} is at shard_sql schema revision {revision}, older than {SCHEMA_REVISION}: "
            f"{where.hint}"
        )
    return (
        f"{where} is at shard_sql schema revision {revision!r}, unknown to this version of "
        f"shard_sql (it expects {SCHEMA_REVISION}): a newer shard_sql migrated it; upgrade "
        "shard_sql"
    )
