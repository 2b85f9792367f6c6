"""Engines and connections: the store's calls run on driver connections from SQLAlchemy's
`QueuePool`, kept between calls, with retries of a busy SQLite file and of a lost PostgreSQL
connection."""

from __future__ import annotations

import os
import random
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, ClassVar, TypeVar

from sqlalchemy.engine import URL, Engine

from shard_sql.errors import InvalidEvent, ShardSqlError, StoreUnavailable
from shard_sql.sql.dialects import Conn, Dialect, EngineOptions, dialect_for
from shard_sql.sql.errors import DEFAULT_BUSY_TIMEOUT, Site
from shard_sql.sql.urls import SCHEMA_PARAMETER, masked, normalize_url, split_schema

__all__ = ["BUSY_FIRST", "BUSY_MAX", "ConnectionPool", "Database", "open_engine", "site_of"]

BUSY_FIRST = 0.00005
BUSY_MAX = 0.002
"""Seconds: a call that found the SQLite database busy is retried after 50 us, growing to 2 ms
between tries (see `Database.call`)."""

_R = TypeVar("_R")


class _Writing(threading.local):
    n = 0
    """Transactions this thread holds open that may hold the write lock (`Database.writing`)."""


def open_engine(
    url_or_engine: str | URL | Engine, options: EngineOptions
) -> tuple[Engine, bool, Dialect]:
    """The engine a store runs on, whether the store owns (and disposes) it, and its dialect.

    A PostgreSQL engine passed in is used as is (and left open). For a SQLite engine the store
    opens its own connections to the same file, since it needs its own transaction control.
    """
    if isinstance(url_or_engine, Engine):
        url = normalize_url(url_or_engine.url)
        dialect = dialect_for(url, busy_timeout=options.busy_timeout, schema=options.schema)
        engine, owned = dialect.adopt_engine(url_or_engine, options)
        return engine, owned, dialect
    if not isinstance(url_or_engine, str | URL):
        raise InvalidEvent(
            "url_or_engine",
            f"must be a database URL or a SQLAlchemy Engine, not {type(url_or_engine).__name__}",
        )
    url, schema = split_schema(normalize_url(url_or_engine), options.schema)
    dialect = dialect_for(url, busy_timeout=options.busy_timeout, schema=schema)
    return dialect.create_engine(url, options), True, dialect


def site_of(engine: Engine, dialect: Dialect, busy_timeout: float = DEFAULT_BUSY_TIMEOUT) -> Site:
    """Where the store's tables are, for messages: the URL (with its schema, so that the
    command a message names finds them) without secrets."""
    url = engine.url
    if dialect.schema is not None:
        url = url.update_query_dict({SCHEMA_PARAMETER: dialect.schema})
    return Site(dialect.describe(engine.url), masked(url), busy_timeout)


class ConnectionPool:
    """The store's connections: checked out of the engine's pool, set up once (`Dialect.setup`)
    and kept between calls, at most `keep` of them idle. A call takes one with a list pop and
    gives it back with an append (~0.1 us); a `QueuePool` checkout and return costs ~5 us, a
    large share of a ~20 us SQLite append. The engine's pool still opens, caps and times out:
    a caller that finds no idle connection waits there (`pool_timeout`), and a connection given
    back while someone waits goes back to the engine's pool, to that caller.

    `keep=0` (a host's engine): every connection goes back to the host's pool after each call.
    `single`: one connection used by one thread at a time (an in-memory SQLite database).
    After a fork, the child leaves the parent's connections alone (never closed).
    """

    _orphans: ClassVar[list[object]] = []  # inherited over fork: referenced, never closed here
    _all: ClassVar[weakref.WeakSet[ConnectionPool]] = weakref.WeakSet()

    def __init__(
        self, engine: Engine, dialect: Dialect, *, keep: int, single: bool, owned: bool
    ) -> None:
        self._engine = engine
        self._dialect = dialect
        self._keep = max(keep, 1) if single else keep
        self._owned = owned
        self._idle: list[Conn] = []
        self._waiting = 0
        self._lock = threading.Lock()
        self._closed = False
        self._serial = threading.Lock() if single else None
        self._owner: int | None = None
        """The thread holding the single connection (`single`)."""
        self._all.add(self)

    @classmethod
    def after_fork(cls) -> None:
        # In the child (a fork hook, not an os.getpid() per call: that is a system call, 0.2 us).
        for pool in list(cls._all):
            cls._orphans.extend(pool._idle)
            pool._idle = []
            pool._waiting = 0
            pool._lock = threading.Lock()
            if pool._serial is not None:
                pool._serial = threading.Lock()
                pool._owner = None
            if pool._owned:
                # The engine's pool holds the parent's connections: a new, empty one.
                cls._orphans.append(pool._engine.pool)
                pool._engine.dispose(close=False)

    def get(self) -> Conn:
        if self._serial is not None:
            return self._get_serial()
        try:
            return self._idle.pop()
        except IndexError:
            return self._checkout()

    def _get_serial(self) -> Conn:
        assert self._serial is not None
        me = threading.get_ident()
        if self._owner == me:  # waiting would wait forever
            raise InvalidEvent(
                "transaction",
                "this thread holds the in-memory database's only connection in an open "
                "transaction: write through it (tx.append), read after its block",
            )
        self._serial.acquire()
        self._owner = me
        try:
            try:
                return self._idle.pop()
            except IndexError:
                return self._connect()
        except BaseException:
            self._owner = None
            self._serial.release()
            raise

    def _checkout(self) -> Conn:
        with self._lock:
            self._waiting += 1
        try:
            try:
                return self._idle.pop()  # given back meanwhile, before it saw this caller
            except IndexError:
                return self._connect()
        finally:
            with self._lock:
                self._waiting -= 1

    def _connect(self) -> Conn:
        if self._closed:
            raise StoreUnavailable("the store is closed")
        pooled = self._engine.raw_connection()
        try:
            conn = Conn(pooled)
            self._dialect.setup(conn)
        except BaseException:
            pooled.invalidate()
            raise
        return conn

    def put(self, conn: Conn, healthy: bool = True) -> None:
        if self._serial is not None:
            self._put_serial(conn, healthy)
            return
        idle = self._idle
        if healthy and not self._waiting and len(idle) < self._keep and not self._closed:
            idle.append(conn)
            if self._waiting:  # a caller began to wait in between: it gets one
                try:
                    conn = idle.pop()
                except IndexError:
                    return
                self._release(conn)
            return
        if healthy:
            self._release(conn)
        else:
            conn.pooled.invalidate()

    def _put_serial(self, conn: Conn, healthy: bool) -> None:
        assert self._serial is not None
        try:
            if not healthy:
                conn.pooled.invalidate()
            elif self._closed:
                self._release(conn)
            else:
                self._idle.append(conn)
        finally:
            self._owner = None
            self._serial.release()

    def drop_idle(self) -> None:
        """Forget the idle connections, and those in the store's own engine's pool: after one
        was found dead (a server restart, a terminated backend) they likely are too."""
        while self._idle:
            try:
                conn = self._idle.pop()
            except IndexError:
                break
            conn.pooled.invalidate()
        if self._owned:
            self._engine.dispose()  # connections in use go on, then leave with the old pool

    def close(self) -> None:
        self._closed = True
        while self._idle:
            try:
                conn = self._idle.pop()
            except IndexError:
                return
            self._release(conn)

    def _release(self, conn: Conn) -> None:
        """Hand a connection back to the engine's pool as the store found it."""
        try:
            conn.cur.close()
            self._dialect.teardown(conn)
            conn.pooled.close()
        except Exception:
            conn.pooled.invalidate()


if hasattr(os, "register_at_fork"):  # pragma: no branch
    os.register_at_fork(after_in_child=ConnectionPool.after_fork)


class Database:
    """One store's database: its engine, dialect and connections, and `call`, which runs a
    function on a connection with the retries it may need."""

    def __init__(self, url_or_engine: str | URL | Engine, options: EngineOptions) -> None:
        engine, self.owned, self.dialect = open_engine(url_or_engine, options)
        self.engine = engine
        self.busy_timeout = options.busy_timeout
        self.site = site_of(engine, self.dialect, self.busy_timeout)
        self.pool = ConnectionPool(
            engine,
            self.dialect,
            keep=options.pool_size if self.owned else 0,
            single=self.dialect.single_connection(engine.url),
            owned=self.owned,
        )
        self.closed = False
        self._writing = _Writing()

    def close(self) -> None:
        """Close the connections, and dispose the engine unless it was passed in."""
        self.closed = True
        self.pool.close()
        if self.owned:
            self.engine.dispose()

    @contextmanager
    def connection(self) -> Iterator[Conn]:
        """A connection of the store, as its calls get it (for tests and tools)."""
        c = self.pool.get()
        healthy = True
        try:
            yield c
        except BaseException:
            healthy = False
            raise
        finally:
            self.pool.put(c, healthy)

    def call(self, fn: Callable[..., _R], *args: Any, retry: bool = True) -> _R:
        """Run `fn(conn, *args)` on a connection; every failed attempt rolls back first, so
        nothing is half-written.

        A busy database (`Dialect.is_busy`: SQLite, whose busy handler is off) is retried every
        50 us growing to 2 ms until `busy_timeout` has passed since the call began. A connection
        found dead (a server restart, a terminated backend) is dropped with every idle one, and
        with `retry` (the call is idempotent: a read, or a write whose intent ids make a repeat
        harmless) the call runs once more on a new connection.
        """
        d = self.dialect
        deadline = time.monotonic() + self.busy_timeout
        delay = BUSY_FIRST
        reconnected = False
        while True:
            try:
                c = self.pool.get()
            except Exception as e:
                if d.is_busy(e):
                    delay = self.backoff(deadline, delay, e)
                    continue
                raise
            healthy = True
            try:
                return fn(c, *args)
            except BaseException as e:
                try:
                    d.rollback(c)
                except Exception:
                    healthy = False
                healthy = healthy and d.healthy(c)
                if not isinstance(e, Exception) or isinstance(e, ShardSqlError):
                    raise
                if d.is_busy(e):
                    self.check_not_writing()
                    delay = self.backoff(deadline, delay, e)
                    continue
                if not healthy:
                    self.pool.drop_idle()
                    if retry and not reconnected:
                        reconnected = True
                        continue
                raise
            finally:
                self.pool.put(c, healthy)

    def writing(self, n: int) -> None:
        """This thread opened (+1) or ended (-1) a transaction that may hold the database's
        write lock (see `check_not_writing`)."""
        self._writing.n += n

    def check_not_writing(self) -> None:
        """A call found the database busy: if this thread holds a transaction open on it, the
        lock is likely its own, and waiting would only wait out the busy timeout."""
        if self._writing.n:
            raise InvalidEvent(
                "transaction",
                f"{self.site} is locked, likely by this thread's open transaction: write "
                "through it (tx.append), or after its block",
            )

    def backoff(self, deadline: float, delay: float, e: Exception) -> float:
        """Sleep `delay` (jittered) before the next try, or raise `e` past `deadline`; return the
        next delay."""
        if time.monotonic() >= deadline:
            raise e
        time.sleep(delay * (0.5 + random.random()))
        return min(delay * 1.5, BUSY_MAX)

    def insert_once(self, sql: str, params: tuple[Any, ...]) -> int | None:
        """One attempt at a single-event insert, without `call`'s retry scaffolding (0.4 us of
        ~30; `Dialect.retry_free_insert` only). None if it wrote nothing, also after any error:
        the statement either committed or wrote nothing, and the caller runs it again through
        `call`; else the row's position (`Dialect.inserted`)."""
        pool = self.pool
        try:
            c = pool.get()
        except Exception:
            return None
        healthy = True
        try:
            cur = c.cur
            cur.execute(sql, params)
            return self.dialect.inserted(cur)
        except Exception:
            try:
                self.dialect.rollback(c)
            except Exception:
                healthy = False
            return None
        finally:
            pool.put(c, healthy)

    def dedicated_connection(self) -> Any:
        """A driver connection of the engine (its connect hooks and arguments), taken out of the
        pool for good and not counted in it: a listener's or a poller's own."""
        pooled = self.engine.raw_connection()
        try:
            pooled.detach()
            raw: Any = pooled.dbapi_connection
            self.dialect.dedicated(raw)
        except BaseException:
            pooled.invalidate()
            raise
        return raw
