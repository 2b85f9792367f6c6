"""PostgreSQL: the hot statements as the session's own prepared statements, run through libpq.

A single append is one statement; psycopg's `cursor.execute` spends ~50k instructions of
Python on it (the query's conversion, the parameters' adaptation, the prepared-statement cache,
its generators and wait loop, the result's bookkeeping), as much as the rest of the append.
Here the statement is prepared once per connection under a name of its own (a hash of its text:
stores of other schemas on one connection never collide) and run with `PQexecPrepared` on the
connection's `pgconn` (psycopg's public libpq layer, which releases the GIL while it waits), its
parameters as text: 50k instructions less per append (measured with callgrind).

The connection is psycopg's and stays in psycopg's hands between statements: in autocommit, so
no transaction is left open; errors become psycopg's errors (`psycopg.errors.error_from_result`;
`OperationalError` for a lost connection), which `shard_sql.sql.errors.translate` translates as
before. A statement deallocated behind the store's back (`DEALLOCATE ALL`, `DISCARD ALL`, which
psycopg sends after some commands) is prepared again. Only where psycopg would prepare too
(`prepare_threshold` not None: a pooler such as PgBouncer in transaction mode keeps no prepared
statements) and with a UTF-8 client encoding; else, and for parameters of other types or with a
NUL character (which psycopg refuses with its own error), `cursor.execute` runs the statement.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from datetime import datetime
from typing import Any

__all__ = ["INT8", "TEXT", "TIMESTAMPTZ", "Prepared", "prepared_names", "run", "text_params"]

TEXT = 25
INT8 = 20
TIMESTAMPTZ = 1184
"""The parameters' types (`pg_type` oids), given when the statement is prepared."""

_COMMAND_OK = 1
_DONE = (_COMMAND_OK, 2)  # COMMAND_OK, TUPLES_OK
_CONNECTION_OK = 0
_SQLSTATE = ord("C")  # PG_DIAG_SQLSTATE
_UNDEFINED_PREPARED = b"26000"  # invalid_sql_statement_name: not (or no longer) prepared
_DUPLICATE_PREPARED = b"42P05"  # duplicate_prepared_statement: prepared already
PREPARED_KEY = "shard_sql_prepared"
"""The key, in the pool's per-connection `info` dict, of the names prepared on it."""


class Prepared:
    """One statement: its name and text for the server (`$n` placeholders), its types."""

    __slots__ = ("name", "sql", "types")

    def __init__(self, sql: str, types: Sequence[int]) -> None:
        if "%%" in sql or sql.count("%s") != len(types):
            raise ValueError("a statement with one %s per type, and no %%")
        parts = sql.split("%s")
        numbered = "".join(f"{part}${n}" for n, part in enumerate(parts[:-1], 1)) + parts[-1]
        self.sql = numbered.encode()
        digest = hashlib.blake2s(self.sql + repr(list(types)).encode(), digest_size=8)
        self.name = b"shard_sql_" + digest.hexdigest().encode()
        self.types = list(types)


def prepared_names(c: Any) -> set[bytes] | None:
    """The set of statements prepared on `c`'s connection (kept with the pool's record of it,
    which lives as long as the driver connection), or None where statements are not prepared
    here (see the module)."""
    raw, pooled = c.raw, c.pooled
    if pooled is None or raw.prepare_threshold is None or raw.info.encoding != "utf-8":
        return None
    names: set[bytes] = pooled.info.setdefault(PREPARED_KEY, set())
    return names


def text_params(params: Sequence[Any]) -> list[bytes | None] | None:
    """`params` as PostgreSQL's text input; None for a value of another type, or a string
    with a NUL character (libpq would cut it there: `cursor.execute` refuses it instead)."""
    out: list[bytes | None] = []
    add = out.append
    try:
        for v in params:
            t = type(v)
            if t is str:
                if "\x00" in v:
                    return None
                add(v.encode())
            elif t is int:
                add(b"%d" % v)
            elif v is None:
                add(None)
            elif t is datetime and v.tzinfo is not None:  # with its offset: any TimeZone
                add(v.isoformat().encode())
            else:
                return None
    except UnicodeEncodeError:  # a lone surrogate: psycopg's error says so
        return None
    return out


def run(c: Any, names: set[bytes], statement: Prepared, values: list[bytes | None]) -> Any:
    """Run `statement` with `values` on `c`'s connection (in autocommit), preparing it first if
    it is not yet; its `PGresult`, or psycopg's error."""
    pgconn = c.raw.pgconn
    name = statement.name
    if name not in names:
        _prepare(pgconn, names, statement)
    res = pgconn.exec_prepared(name, values)
    if res.status in _DONE:
        return res
    if res.error_field(_SQLSTATE) == _UNDEFINED_PREPARED:  # deallocated meanwhile
        names.clear()
        _prepare(pgconn, names, statement)
        res = pgconn.exec_prepared(name, values)
        if res.status in _DONE:
            return res
    raise _error(pgconn, res)


def _prepare(pgconn: Any, names: set[bytes], statement: Prepared) -> None:
    res = pgconn.prepare(statement.name, statement.sql, statement.types)
    if res.status != _COMMAND_OK and res.error_field(_SQLSTATE) != _DUPLICATE_PREPARED:
        raise _error(pgconn, res)
    names.add(statement.name)  # a duplicate name is this text: the name is its hash


def _error(pgconn: Any, res: Any) -> Exception:
    """psycopg's error for a failed `PGresult`: what `cursor.execute` would have raised."""
    from psycopg import OperationalError, errors

    if pgconn.status != _CONNECTION_OK:
        message = res.get_error_message("utf-8") or "the connection is lost"
        return OperationalError(f"consuming input failed: {message}")
    return errors.error_from_result(res, encoding="utf-8")
