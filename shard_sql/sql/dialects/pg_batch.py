"""PostgreSQL: a small batch (what a holder's group commit writes) as one prepared statement.

`append_small_batch_sql` sends the rows as six arrays through `cursor.execute`. Measured on
this machine, a batch of 2 forwarded items cost about 2x a single append: psycopg's
adaptation of the lists (~120k instructions more than the single append's libpq call), and on
the server a custom plan every time: the generic plan's estimate of `intent_id = ANY($n)` (10
elements for any array) stays above the custom plans', so the plan cache never settles and every
execution is planned again (~0.2 ms; batch of 2, `synchronous_commit` off: 291 us against 137 us
with the generic plan forced).

Here a batch of `n` rows is `INSERT ... SELECT FROM (VALUES (...), ...)` with one scalar
parameter per value, prepared once per connection and size (up to `PREPARED_ROWS`), run through
libpq as the single append is (`prepared.run`): the time binary, the rest text, no arrays to
build or parse. Its checks are `append_one_sql`'s, evaluated once; the intent check names the
rows' intent parameters (`IN ($6, $12, ...)`; a NULL one matches nothing), whose generic plan
costs what the custom plans do, so the server plans it a few times, then never again.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from shard_sql.sql.dialects.base import COLUMNS, Tables
from shard_sql.sql.dialects.pg_checks import fence_holds, head_is, intent_unwritten
from shard_sql.sql.dialects.prepared import INT8, TEXT, TIMESTAMPTZ, Prepared, binary_time
from shard_sql.values import Event, Lease

__all__ = [
    "PREPARED_ROWS",
    "BatchStatements",
    "append_small_batch_sql",
    "array_params",
    "batch_values",
]

PREPARED_ROWS = 16
"""The largest batch written by a prepared statement (one per size and kind, prepared on a
connection when first used); larger small batches go through `cursor.execute`."""

UNQUALIFIED = Tables()
"""The tables of a store without a schema (the search path's)."""

_ROW = (TEXT, TEXT, TIMESTAMPTZ, TEXT, INT8, TEXT)
"""The parameters of one row: type, payload, time, writer, generation, intent id."""


def append_small_batch_sql(*, fence: bool, intent: bool, t: Tables = UNQUALIFIED) -> str:
    """A small batch in one statement, rows from arrays in order (`WITH ORDINALITY` numbers them:
    seq = expected + n - 1), under the checks of `append_one_sql` (evaluated once: they do not
    depend on the row)."""
    sql = (
        f"INSERT INTO {t.events} ({COLUMNS}) "
        "SELECT %s, %s + b.n - 1, b.t, CAST(b.p AS jsonb), b.at, b.w, b.g, b.i "
        "FROM unnest(%s::text[], %s::text[], %s::timestamptz[], %s::text[], %s::bigint[], "
        "%s::text[]) WITH ORDINALITY AS b(t, p, at, w, g, i, n) "
        f"WHERE {head_is(t, '%s', '%s')}"
    )
    if fence:
        sql += f" AND {fence_holds(t, '%s', '%s', '%s')}"
    if intent:
        sql += f" AND {intent_unwritten(t, '%s', '= ANY(%s)')}"
    return sql


def array_params(
    space: str, events: Sequence[Event], batch: Sequence[Any], fence: Lease | None, seq: int
) -> tuple[Any, ...]:
    """The parameters of `append_small_batch_sql` for `events` (stamped) and `batch`."""
    intents = [e.intent_id for e in events if e.intent_id is not None]
    params: tuple[Any, ...] = (
        space,
        seq,
        [e.type for e in events],
        [p.payload_json for p in batch],
        [e.recorded_at for e in events],
        [e.writer for e in events],
        [e.generation for e in events],
        [e.intent_id for e in events],
        space,
        seq,
    )
    if fence is not None:
        params += (space, fence.holder, fence.generation)
    if intents:
        params += (space, intents)
    return params


def values_batch_sql(n: int, *, fence: bool, intent: bool, t: Tables) -> str:
    """The batch of `n` rows at a given seq, under `append_one_sql`'s checks, with numbered
    placeholders. Parameters: the rows' 6 each, space, seq; then holder, generation if fenced.
    The intent check refers to the rows' own intent parameters."""
    width = len(_ROW)
    rows = ", ".join(
        f"({r}, " + ", ".join(f"${width * r + k}" for k in range(1, width + 1)) + ")"
        for r in range(n)
    )
    space, seq = f"${width * n + 1}", f"${width * n + 2}"
    sql = (
        f"INSERT INTO {t.events} ({COLUMNS}) "
        f"SELECT {space}, {seq} + v.n, v.t, CAST(v.p AS jsonb), v.at, v.w, v.g, v.i "
        f"FROM (VALUES {rows}) AS v(n, t, p, at, w, g, i) "
        f"WHERE {head_is(t, space, seq)}"
    )
    if fence:
        sql += f" AND {fence_holds(t, space, f'${width * n + 3}', f'${width * n + 4}')}"
    if intent:
        ids = ", ".join(f"${width * r + width}" for r in range(n))
        sql += f" AND {intent_unwritten(t, space, f'IN ({ids})')}"
    return sql


class BatchStatements:
    """The prepared batch statements of one dialect (its tables), made when first asked for."""

    def __init__(self, t: Tables) -> None:
        self._t = t
        self._made: dict[tuple[int, bool, bool], Prepared] = {}

    def get(self, n: int, *, fence: bool, intent: bool) -> Prepared:
        key = (n, fence, intent)
        statement = self._made.get(key)
        if statement is None:
            sql = values_batch_sql(n, fence=fence, intent=intent, t=self._t)
            types = [*_ROW * n, TEXT, INT8] + ([TEXT, INT8] if fence else [])
            statement = self._made.setdefault(key, Prepared(sql, types, numbered=True))
        return statement


def batch_values(
    space: str, seq: int, events: Sequence[Event], batch: Sequence[Any], fence: Lease | None
) -> list[bytes | None] | None:
    """The parameters of `values_batch_sql` for `events` (stamped) and `batch` (their
    `Pending`s, whose payload text is written): None where the statement cannot take them (a
    writer or holder with a NUL character, a naive time, a generation not an int):
    `cursor.execute` runs the array statement instead."""
    values: list[bytes | None] = []
    add = values.extend
    try:
        for e, p in zip(events, batch, strict=True):
            writer, generation, at, intent_id = e.writer, e.generation, e.recorded_at, e.intent_id
            if "\x00" in writer or type(generation) is not int or at.tzinfo is None:
                return None
            add((
                e.type.encode(), p.payload_json.encode(), binary_time(at),
                writer.encode(), b"%d" % generation,
                None if intent_id is None else intent_id.encode(),
            ))  # fmt: skip
        values += (space.encode(), b"%d" % seq)
        if fence is not None:
            if "\x00" in fence.holder or type(fence.generation) is not int:
                return None
            values += (fence.holder.encode(), b"%d" % fence.generation)
    except (AttributeError, TypeError, UnicodeEncodeError):  # not text: psycopg says what
        return None
    return values
