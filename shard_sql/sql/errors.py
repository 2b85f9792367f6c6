"""The one place where driver, SQLAlchemy and alembic errors become `ShardSqlError`s."""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from typing import Concatenate, NoReturn, ParamSpec, Protocol, TypeVar

from sqlalchemy import exc as sa_exc

from shard_sql.errors import SchemaError, SeqConflict, ShardSqlError, StoreUnavailable

__all__ = ["Site", "guarded", "is_sqlite_busy", "raise_translated", "translate"]

DEFAULT_BUSY_TIMEOUT = 30.0
"""Seconds a SQLite write waits for another connection's write lock before giving up."""


@dataclass(frozen=True, slots=True)
class Site:
    """Where a store is, for error messages (never with a secret), and how to migrate it."""

    where: str
    """e.g. "SQLite file /srv/shard.db", "PostgreSQL at db:5432 (database 'app', user 'me')"."""
    url: str
    """The URL with every secret masked."""
    busy_timeout: float = DEFAULT_BUSY_TIMEOUT

    def __str__(self) -> str:
        return self.where

    @property
    def hint(self) -> str:
        return (
            f"run `shard-sql migrate --url '{self.url}'` "
            "or open it with SqlEventStore(url, migrate=True)"
        )


_SQLITE_BUSY = (5, 6)  # SQLITE_BUSY, SQLITE_LOCKED (and their extended codes)


def _root(e: BaseException) -> BaseException:
    if isinstance(e, sa_exc.DBAPIError) and e.orig is not None:
        return e.orig
    return e


def is_sqlite_busy(e: BaseException) -> bool:
    """SQLite found the database locked by another connection (worth a retry)."""
    root = _root(e)
    if not isinstance(root, sqlite3.OperationalError):
        return False
    code = getattr(root, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in _SQLITE_BUSY
    return "locked" in str(root) or "busy" in str(root)


_LOST_RACE = ("40P01", "40001")
"""PostgreSQL: deadlock detected, serialization failure. During a write in a transaction (two
transactions inserting into the same spaces in another order wait on each other's new rows),
that write's `SeqConflict`: another transaction wrote there."""


def _is_unique_violation(root: BaseException) -> bool:
    if isinstance(root, sqlite3.IntegrityError):
        return "UNIQUE" in str(root) or getattr(root, "sqlite_errorcode", 0) in (1555, 2067)
    return getattr(root, "sqlstate", None) == "23505"


def _one_line(text: str) -> str:
    text = " ".join(text.split())
    return text.removeprefix("connection failed: ")


def translate(
    e: BaseException,
    site: Site,
    *,
    space: str | None = None,
    expected_seq: int | None = None,
) -> ShardSqlError | None:
    """The shard_sql error for a driver, SQLAlchemy or alembic error; None for anything else
    (a bug, which must surface as itself). A unique violation of a write at `expected_seq` in
    `space`, or a deadlock or serialization failure during it, is that write's `SeqConflict`."""
    if isinstance(e, ShardSqlError):
        return e
    root = _root(e)
    if _is_unique_violation(root) or (
        space is not None and getattr(root, "sqlstate", None) in _LOST_RACE
    ):
        if space is not None and expected_seq is not None:
            return SeqConflict(space, expected_seq)
        return SchemaError(f"{site}: unexpected unique violation: {_one_line(str(root))}")
    if isinstance(root, sqlite3.Error):
        return _sqlite_error(root, site)
    if type(root).__module__.startswith("psycopg"):
        return _postgres_error(root, site)
    if isinstance(e, sa_exc.TimeoutError):
        return StoreUnavailable(
            f"{site}: every connection of the pool is in use and none came free in time "
            f"({_one_line(str(e))}); raise pool_size or pool_timeout, or use fewer threads"
        )
    if isinstance(e, sa_exc.SQLAlchemyError):
        return StoreUnavailable(f"{site}: {_one_line(str(e))}")
    if type(e).__module__.startswith("alembic"):
        return SchemaError(f"{site}: migration failed: {_one_line(str(e))}")
    return None


def raise_translated(e: Exception, site: Site) -> NoReturn:
    """Raise `e`'s translation (from `e`), or `e` itself when it has none."""
    err = translate(e, site)
    if err is None or err is e:
        raise e
    raise err from e


def _sqlite_error(e: sqlite3.Error, site: Site) -> ShardSqlError:
    msg = _one_line(str(e))
    code = (getattr(e, "sqlite_errorcode", None) or 0) & 0xFF
    if isinstance(e, sqlite3.IntegrityError):
        return SchemaError(f"{site} refused a row: {msg}")
    if code in _SQLITE_BUSY or "database is locked" in msg:
        return StoreUnavailable(
            f"{site} stayed locked by another connection for over {site.busy_timeout:g}s ({msg})"
        )
    if code == 8 or "readonly" in msg or "read-only" in msg:
        return StoreUnavailable(
            f"{site} is read-only (file, directory or mount permissions, or mode=ro): {msg}"
        )
    if code == 14 or "unable to open" in msg:
        return StoreUnavailable(
            f"cannot open {site}: its directory must exist and be writable ({msg})"
        )
    if code in (11, 26) or "not a database" in msg or "malformed" in msg:
        return SchemaError(f"{site} is not a valid SQLite database: {msg}")
    if "no such table" in msg or "no such column" in msg:
        return SchemaError(f"{site} lacks the shard_sql schema ({msg}): {site.hint}")
    if code in (10, 13):  # SQLITE_IOERR, SQLITE_FULL
        return StoreUnavailable(f"{site}: disk error: {msg}")
    return StoreUnavailable(f"{site}: {msg}")


def _postgres_error(e: BaseException, site: Site) -> ShardSqlError:
    # Only reached with a psycopg error in hand: the import finds the loaded module (a top-level
    # import would load psycopg, and its libpq, for SQLite stores too).
    import psycopg

    msg = _one_line(str(e))
    state = getattr(e, "sqlstate", None) or ""
    if state.startswith("23"):
        return SchemaError(f"{site} refused a row: {msg}")
    if state in ("42P01", "42703", "42883", "3F000"):
        return SchemaError(f"{site} lacks the shard_sql schema ({msg}): {site.hint}")
    if state == "42501":
        return StoreUnavailable(f"{site}: permission denied for this role: {msg}")
    if state == "25006":
        return StoreUnavailable(f"{site} is read-only (a standby, or read-only transactions)")
    if state == "57014":
        return StoreUnavailable(f"{site}: statement canceled ({msg})")
    if state.startswith("28") or "authentication failed" in msg:
        return StoreUnavailable(f"cannot log in to {site}: {msg}")
    if state == "3D000":
        return StoreUnavailable(f"cannot connect to {site}: {msg}")
    if isinstance(e, psycopg.OperationalError) or state.startswith(("08", "57")):
        if str(e).startswith("connection failed") or "connection to server" in msg:
            return StoreUnavailable(f"cannot connect to {site}: {msg}")
        return StoreUnavailable(
            f"lost the connection to {site} ({msg}); a write's outcome is unknown: "
            "retry it with the same intent_id"
        )
    return StoreUnavailable(f"{site}: {msg}")


class Located(Protocol):
    """An object whose errors name its `Site` (the store, its intent queue)."""

    _site: Site


_S = TypeVar("_S", bound=Located)
_P = ParamSpec("_P")
_R = TypeVar("_R")


def guarded(fn: Callable[Concatenate[_S, _P], _R]) -> Callable[Concatenate[_S, _P], _R]:
    """Let no driver error out of a public method: translate it with `translate`."""

    @functools.wraps(fn)
    def wrapper(self: _S, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return fn(self, *args, **kwargs)
        except ShardSqlError:
            raise
        except Exception as e:
            err = translate(e, self._site)
            if err is None:
                raise
            raise err from e

    return wrapper
