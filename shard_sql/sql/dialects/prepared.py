"""PostgreSQL: the hot statements as the session's own prepared statements, run through libpq.

A single append is one statement; psycopg's `cursor.execute` spends ~50k instructions of
Python on it (the query's conversion, the parameters' adaptation, the prepared-statement cache,
its generators and wait loop, the result's bookkeeping), as much as the rest of the append.
Here the statement is prepared once per connection under a name of its own (a hash of its text:
stores of other schemas on one connection never collide) and run with `PQexecPrepared` on the
connection's `pgconn` (psycopg's public libpq layer, which releases the GIL while it waits), its
parameters as text but the time, binary (`append_values`): 50k instructions less per append
(measured with callgrind).

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
import struct
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

__all__ = [
    "Prepared",
    "append_types",
    "append_values",
    "at_head_types",
    "at_head_values",
    "binary_time",
    "prepared_names",
    "run",
    "run_first",
]

TEXT = 25
INT8 = 20
TIMESTAMPTZ = 1184
"""The parameters' types (`pg_type` oids), given when the statement is prepared."""
_PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
_int8 = struct.Struct(">q").pack

_COMMAND_OK = 1
_DONE = (_COMMAND_OK, 2)  # COMMAND_OK, TUPLES_OK
_CONNECTION_OK = 0
_IDLE = 0  # PQTRANS_IDLE: no transaction open on the server
_TUPLES_OK = 2
_SQLSTATE = ord("C")  # PG_DIAG_SQLSTATE
_UNDEFINED_PREPARED = b"26000"  # invalid_sql_statement_name: not (or no longer) prepared
_DUPLICATE_PREPARED = b"42P05"  # duplicate_prepared_statement: prepared already
PREPARED_KEY = "shard_sql_prepared"
"""The key, in the pool's per-connection `info` dict, of the names prepared on it."""


class Prepared:
    """One statement: its name and text for the server (`$n` placeholders), its parameters'
    types and formats (a time binary, every other parameter as text)."""

    __slots__ = ("formats", "name", "sql", "types")

    def __init__(self, sql: str, types: Sequence[int], *, numbered: bool = False) -> None:
        """`sql` with one `%s` per type, or (`numbered`) with `$n` placeholders already."""
        if not numbered:
            if "%%" in sql or sql.count("%s") != len(types):
                raise ValueError("a statement with one %s per type, and no %%")
            parts = sql.split("%s")
            sql = "".join(f"{part}${n}" for n, part in enumerate(parts[:-1], 1)) + parts[-1]
        self.sql = sql.encode()
        digest = hashlib.blake2s(self.sql + repr(list(types)).encode(), digest_size=8)
        self.name = b"shard_sql_" + digest.hexdigest().encode()
        self.types = list(types)
        self.formats = [int(t == TIMESTAMPTZ) for t in types]


def prepared_names(c: Any) -> set[bytes] | None:
    """The set of statements prepared on `c`'s connection (kept with the pool's record of it,
    which lives as long as the driver connection), or None where statements are not prepared
    here (see the module)."""
    raw, pooled = c.raw, c.pooled
    if pooled is None or raw.prepare_threshold is None or raw.info.encoding != "utf-8":
        return None
    names: set[bytes] = pooled.info.setdefault(PREPARED_KEY, set())
    return names


def binary_time(at: datetime) -> bytes:
    """An aware time as a binary `timestamptz` parameter (microseconds since 2000)."""
    return _int8((at - _PG_EPOCH) // _MICROSECOND)


def append_types(*, fence: bool, intent: bool) -> list[int]:
    """The types of the parameters of `postgres.append_one_sql`."""
    types = [TEXT, INT8, TEXT, TEXT, TIMESTAMPTZ, TEXT, INT8, TEXT, TEXT, INT8]
    if fence:
        types += [TEXT, TEXT, INT8]
    if intent:
        types += [TEXT, TEXT]
    return types


def at_head_types(*, fence: bool, intent: bool) -> list[int]:
    """The types of the parameters of `postgres.append_at_head_sql`."""
    types = [TEXT, TEXT, TEXT, TEXT, TIMESTAMPTZ, TEXT, INT8, TEXT]
    if fence:
        types += [TEXT, TEXT, INT8]
    if intent:
        types += [TEXT, TEXT]
    return types


def at_head_values(
    space: str, p: Any, at: Any, writer: str, generation: int, fence: Any
) -> list[bytes | None] | None:
    """The parameters of `postgres.append_at_head_sql` for its prepared statement (`p`: a
    `Pending`, checked), as `append_values` (None: `cursor.execute` runs it)."""
    if "\x00" in writer or type(generation) is not int or at.tzinfo is None:
        return None
    s = space.encode()
    intent_id = p.intent_id
    i = None if intent_id is None else intent_id.encode()
    values = [
        s, s, p.type.encode(), p.payload_json.encode(), _int8((at - _PG_EPOCH) // _MICROSECOND),
        writer.encode(), b"%d" % generation, i,
    ]  # fmt: skip
    if fence is not None:
        if "\x00" in fence.holder or type(fence.generation) is not int:
            return None
        values += (s, fence.holder.encode(), b"%d" % fence.generation)
    if intent_id is not None:
        values += (s, i)
    return values


def append_values(params: Sequence[Any]) -> list[bytes | None] | None:
    """The parameters of `PostgresDialect.append_one` (the row, space and seq; then space,
    holder, generation if fenced; then space and intent id if it has one) for its prepared
    statement: the time binary (microseconds since 2000, 3.6k instructions where `isoformat` is
    12k), the rest as text. None (`cursor.execute` runs it) for a naive time, a generation that
    is not an int, or a writer or holder with a NUL character (libpq would cut the text there;
    the space, type, payload and intent id are checked: no NUL)."""
    n = len(params)
    space, seq, type_, payload, at, writer, generation, intent_id = params[:8]
    try:
        if "\x00" in writer or type(generation) is not int or at.tzinfo is None:
            return None
        s = space.encode()
        q = b"%d" % seq
        i = None if intent_id is None else intent_id.encode()
        values = [
            s, q, type_.encode(), payload.encode(), _int8((at - _PG_EPOCH) // _MICROSECOND),
            writer.encode(), b"%d" % generation, i, s, q,
        ]  # fmt: skip
        if n == 13 or n == 15:  # fenced
            holder, fenced_generation = params[11], params[12]
            if "\x00" in holder or type(fenced_generation) is not int:
                return None
            values += (s, holder.encode(), b"%d" % fenced_generation)
        if n == 12 or n == 15:  # with an intent id
            values += (s, i)
    except (AttributeError, TypeError, UnicodeEncodeError):  # not text: psycopg says what
        return None
    return values


def run(c: Any, names: set[bytes], statement: Prepared, values: list[bytes | None]) -> Any:
    """Run `statement` with `values` on `c`'s connection (in autocommit), preparing it first if
    it is not yet; its `PGresult`, or psycopg's error."""
    pgconn = c.raw.pgconn
    name = statement.name
    if name not in names:
        _prepare(pgconn, names, statement)
    formats = statement.formats
    res = pgconn.exec_prepared(name, values, formats)
    if res.status in _DONE:
        return res
    if res.error_field(_SQLSTATE) == _UNDEFINED_PREPARED:  # deallocated meanwhile
        names.clear()
        _prepare(pgconn, names, statement)
        res = pgconn.exec_prepared(name, values, formats)
        if res.status in _DONE:
            return res
    raise _error(pgconn, res)


def run_first(
    c: Any, names: set[bytes], statement: Prepared, values: list[bytes | None]
) -> Any | None:
    """Run `statement` as the first statement of a host's transaction: the transaction is begun
    on the SQLAlchemy side but not yet on the server (psycopg sends its BEGIN before the first
    statement). The same BEGIN (`begin_command`) is sent here, then the prepared statement:
    its `PGresult`, or psycopg's error (the transaction is then failed, as after
    `cursor.execute`). None where this does not apply (the server's transaction is open
    already, a pipeline, no prepared statements, another encoding): `cursor.execute` runs it.
    A statement deallocated behind the store's back fails inside the new transaction, which
    holds nothing else yet: it is rolled back, the statement prepared again and run in a
    new one."""
    raw = c.raw
    pgconn = raw.pgconn
    if (
        pgconn.transaction_status != _IDLE
        or pgconn.pipeline_status
        or raw.autocommit
        or raw.prepare_threshold is None
        or pgconn.parameter_status(b"client_encoding") != b"UTF8"
    ):
        return None
    name, formats = statement.name, statement.formats
    if name not in names:
        _prepare(pgconn, names, statement)  # outside the transaction: a failure leaves none
    begin = begin_command(raw)
    for again in (False, True):
        res = pgconn.exec_(begin)
        if res.status != _COMMAND_OK:
            raise _error(pgconn, res)
        res = pgconn.exec_prepared(name, values, formats)
        if res.status == _TUPLES_OK or res.status == _COMMAND_OK:
            return res
        if again or res.error_field(_SQLSTATE) != _UNDEFINED_PREPARED:
            raise _error(pgconn, res)
        res = pgconn.exec_(b"ROLLBACK")  # only the BEGIN above is undone
        if res.status != _COMMAND_OK:
            raise _error(pgconn, res)
        names.clear()
        _prepare(pgconn, names, statement)
    raise AssertionError("unreachable")


def begin_command(raw: Any) -> bytes:
    """The BEGIN psycopg sends before a transaction's first statement on `raw` (its isolation
    level, read-only and deferrable settings)."""
    iso, read_only, deferrable = raw.isolation_level, raw.read_only, raw.deferrable
    if iso is None and read_only is None and deferrable is None:
        return b"BEGIN"
    parts = [b"BEGIN"]
    if iso is not None:
        parts += (b"ISOLATION LEVEL", iso.name.replace("_", " ").encode())
    if read_only is not None:
        parts.append(b"READ ONLY" if read_only else b"READ WRITE")
    if deferrable is not None:
        parts.append(b"DEFERRABLE" if deferrable else b"NOT DEFERRABLE")
    return b" ".join(parts)


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
