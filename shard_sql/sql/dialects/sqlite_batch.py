"""SQLite: a small batch (a holder's group commit) in one statement, instead of a transaction of
six (BEGIN IMMEDIATE, the intent ids, the lease, the head, the rows, COMMIT).

`INSERT ... SELECT` from the batch's rows (a `VALUES` list) `WHERE` the write's checks hold:
the head is the expected seq, the fence is the current grant, none of the batch's intent ids is
written yet. Every check is a subquery that names no column of the rows, so SQLite runs it once
per statement, before the first row is inserted (and an INSERT whose SELECT reads its own table
goes through a temporary table anyway): the batch is written whole or not at all, as one
append's statement is (`append_one_sql`). The rows take the feed positions after the highest,
read once in the statement under the write lock it holds: positions grow in commit order.
Written nothing: the store's usual checks say why (`SqlEventStore._check_write`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from shard_sql.orm import EVENTS
from shard_sql.sql.dialects.base import COLUMNS, Conn, Statement
from shard_sql.sql.dialects.sqlite_checks import (
    HIGHEST_POSITION,
    fence_holds,
    head_is,
    intent_unwritten,
)
from shard_sql.validation import Pending
from shard_sql.values import Event, Lease, new_event

SMALL_BATCH = 16
"""The most events written by one statement (more: one transaction): past 16 its checks and
parameters cost as much as the transaction saves (callgrind per event, 8: 116k -> 106k, 16:
102k -> 97k, 32: no gain)."""
ROW = 6
"""Parameters per row: type, payload, time, writer, generation, intent id."""
FIRST_ROW = 5
"""The number of a first row's first parameter: ?1 space, ?2 seq, ?3 and ?4 the fence."""

LAST_POSITION_SQL = f"SELECT position FROM {EVENTS} WHERE rowid = last_insert_rowid()"

_statements: dict[tuple[int, bool], str] = {}


def small_batch_sql(n: int, *, fence: bool) -> str:
    """The statement that writes `n` rows at seq ?2 of space ?1 (see the module)."""
    key = (n, fence)
    sql = _statements.get(key)
    if sql is not None:
        return sql
    rows = []
    ids = []
    for k in range(n):
        first = FIRST_ROW + ROW * k
        rows.append(f"({k}, " + ", ".join(f"?{first + i}" for i in range(ROW)) + ")")
        ids.append(f"?{first + ROW - 1}")
    checks = head_is("?1", "?2")
    if fence:
        checks += f" AND {fence_holds('?1', '?3', '?4')}"
    # One look per intent id (an `IN` list would build a temporary index per statement); a
    # NULL id (no intent) matches nothing.
    checks += "".join(f" AND {intent_unwritten('?1', i)}" for i in ids)
    sql = _statements[key] = (
        f"INSERT INTO {EVENTS} ({COLUMNS}, position) "
        "SELECT ?1, ?2 + column1, column2, column3, column4, column5, column6, column7, "
        f"{HIGHEST_POSITION} + 1 + column1 "
        f"FROM (VALUES {', '.join(rows)}) WHERE {checks}"
    )
    return sql


def batch_params(
    space: str,
    events: list[Event],
    batch: Sequence[Pending],
    fence: Lease | None,
    seq: int,
    time: Callable[[datetime], str],
) -> Statement:
    """`small_batch_sql`'s statement and parameters for `events` (stamped) at `seq`, checked
    against `fence` (None: no fence check); `time` formats a recorded time for SQLite."""
    params: list[Any] = [space, seq, None, None]
    if fence is not None:
        params[2], params[3] = fence.holder, fence.generation
    for e, p in zip(events, batch, strict=True):
        params += (e.type, p.payload_json, time(e.recorded_at), e.writer, e.generation, e.intent_id)
    return small_batch_sql(len(events), fence=fence is not None), tuple(params)


def write_small_batch(c: Conn, statement: Statement, events: list[Event]) -> bool:
    """Run `statement` (`batch_params`) on `c` (in autocommit): False when it wrote nothing (a
    check failed); else `events` get their feed positions (read back once: they follow each
    other)."""
    cur = c.cur
    cur.execute(*statement)
    if cur.rowcount != len(events):
        return False
    last = cur.execute(LAST_POSITION_SQL).fetchone()
    if last is None:  # not expected: the events stay unplaced (the feed has them)
        return True
    first = int(last[0]) - len(events) + 1
    make = new_event
    for n, e in enumerate(events):
        events[n] = make(
            e.space, e.seq, e.type, e.payload, e.recorded_at, e.writer, e.generation,
            e.intent_id, first + n,
        )  # fmt: skip
    return True
