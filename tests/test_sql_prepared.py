"""PostgreSQL: a single append, and a small batch (`pg_batch`), run as the connection's own
prepared statements through libpq (`shard_sql.sql.dialects.prepared`): prepared once per
connection, prepared again when it was
deallocated behind the store's back, never where psycopg would not prepare, its errors
translated as psycopg's are."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from shard_sql import (
    InvalidEvent,
    Lease,
    LeaseRegistry,
    SchemaError,
    SeqConflict,
    SqlEventStore,
    StaleLease,
)
from shard_sql.sql.dialects.base import Tables
from shard_sql.sql.dialects.pg_batch import PREPARED_ROWS, batch_values, values_batch_sql
from shard_sql.sql.dialects.prepared import Prepared, append_values
from shard_sql.validation import pending
from shard_sql.values import new_event

PREPARED = "SELECT name FROM pg_prepared_statements WHERE name LIKE 'shard_sql%%' ORDER BY name"


def prepared_here(store: SqlEventStore) -> list[str]:
    with store.database.connection() as c:
        c.cur.execute(PREPARED)
        return [row[0] for row in c.cur.fetchall()]


@pytest.mark.postgres
def test_an_append_runs_a_statement_prepared_once(pg_migrated_url: str) -> None:
    with SqlEventStore(pg_migrated_url, pool_size=1, max_overflow=0) as store:
        registry = LeaseRegistry(store)
        lease = registry.acquire("s", "n", 60)
        for i in range(3):
            store.append("s", "t", {"i": i}, expected_seq=i, fence=lease)
        [name] = prepared_here(store)  # the fenced append, prepared once
        with store.database.connection() as c:
            c.cur.execute("DEALLOCATE ALL")
        # Deallocated behind the store's back: prepared again, the append goes through.
        assert store.append("s", "t", {"i": 3}, expected_seq=3, fence=lease).seq == 3
        assert prepared_here(store) == [name]
        # Its checks say no as before.
        with pytest.raises(SeqConflict):
            store.append("s", "t", {}, expected_seq=3, fence=lease)
        registry.release(lease)
        registry.acquire("s", "m", 60)
        with pytest.raises(StaleLease):
            store.append("s", "t", {}, expected_seq=4, fence=lease)
        # Another statement (unfenced, with an intent id) is prepared beside it.
        store.append("s", "t", {"i": 4}, expected_seq=4, intent_id="k")
        assert store.append("s", "t", {"i": 4}, expected_seq=5, intent_id="k").seq == 4
        assert len(prepared_here(store)) == 2
        events = store.events("s")
        assert [e.payload.get("i") for e in events] == [0, 1, 2, 3, 4]
        assert [e.writer for e in events] == ["n"] * 4 + [""]
        assert events[4].intent_id == "k"


@pytest.mark.postgres
def test_times_and_text_are_written_as_given(pg_migrated_url: str) -> None:
    with SqlEventStore(pg_migrated_url) as store:
        payload = {"name": "Zoë ☃ 𝄞", "n": 10**18, "f": 0.1}
        e = store.append("ünï ☃", "t.ÿ", payload, expected_seq=0)
        [read] = store.events("ünï ☃")
        assert read == e and read.payload == payload
        assert read.recorded_at == e.recorded_at  # to the microsecond
        assert read.recorded_at.tzinfo is UTC


@pytest.mark.postgres
def test_no_statement_is_prepared_where_psycopg_prepares_none(pg_migrated_url: str) -> None:
    # A pooler in transaction mode (PgBouncer) keeps no prepared statement: such a host turns
    # psycopg's preparing off, and the store follows.
    engine = create_engine(
        pg_migrated_url, pool_size=1, max_overflow=0, connect_args={"prepare_threshold": None}
    )
    try:
        with SqlEventStore(engine) as store:
            for i in range(3):
                store.append("s", "t", {}, expected_seq=i)
            assert store.head("s") == 3
        with engine.connect() as conn:
            assert conn.execute(text(PREPARED)).all() == []
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_a_failed_prepare_is_the_drivers_error(pg_migrated_url: str) -> None:
    with SqlEventStore(pg_migrated_url) as store:
        with store.database.connection() as c:
            c.cur.execute("ALTER TABLE events RENAME TO events_away")
        try:
            with pytest.raises(SchemaError, match="lacks the shard_sql schema"):
                store.append("s", "t", {}, expected_seq=0)
        finally:
            with store.database.connection() as c:
                c.cur.execute("ALTER TABLE events_away RENAME TO events")
        assert store.append("s", "t", {}, expected_seq=0).seq == 0


def test_append_values() -> None:
    at = datetime(2000, 1, 1, 0, 0, 1, 5, tzinfo=UTC)
    row = ("s", 5, "t", '{"a":"ü"}', at, "w", 2, None, "s", 5)
    assert append_values(row) == [
        b"s", b"5", b"t", '{"a":"ü"}'.encode(), (1_000_005).to_bytes(8, "big"), b"w", b"2",
        None, b"s", b"5",
    ]  # fmt: skip
    fenced = append_values((*row, "s", "h", 3))
    assert fenced is not None and fenced[10:] == [b"s", b"h", b"3"]
    both = append_values((*row[:7], "k", *row[8:], "s", "h", 3, "s", "k"))
    assert both is not None and both[7] == b"k" and both[13:] == [b"s", b"k"]
    east = datetime(2000, 1, 1, 5, 30, tzinfo=timezone(timedelta(hours=5, minutes=30)))
    assert append_values((*row[:4], east, *row[5:])) == [*row_values(row)[:4], bytes(8),
                                                        *row_values(row)[5:]]  # fmt: skip
    before = datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)
    assert append_values((*row[:4], before, *row[5:]))[4] == (-1).to_bytes(8, "big", signed=True)  # type: ignore[index]
    # What libpq would cut or psycopg adapts otherwise: left to cursor.execute.
    assert append_values((*row[:5], "a\x00b", *row[6:])) is None
    assert append_values((*row, "s", "a\x00b", 3)) is None
    assert append_values((*row, "s", "h", 3.5)) is None
    assert append_values((*row[:6], 2.0, *row[7:])) is None
    assert append_values((*row[:4], datetime(2000, 1, 1), *row[5:])) is None
    assert append_values((*row[:5], "\ud800", *row[6:])) is None
    assert append_values((*row[:5], None, *row[6:])) is None


def row_values(row: tuple[Any, ...]) -> list[bytes | None]:
    values = append_values(row)
    assert values is not None
    return values


def test_prepared_statement_text() -> None:
    p = Prepared("SELECT %s, %s WHERE x = %s", [25, 20, 25])
    assert p.sql == b"SELECT $1, $2 WHERE x = $3"
    assert p.name.startswith(b"shard_sql_")
    assert Prepared("SELECT %s", [25]).name != Prepared("SELECT %s", [20]).name
    with pytest.raises(ValueError):
        Prepared("SELECT %s", [25, 25])


@pytest.mark.postgres
def test_a_small_batch_runs_a_statement_prepared_per_size(pg_migrated_url: str) -> None:
    with SqlEventStore(pg_migrated_url, pool_size=1, max_overflow=0) as store:
        registry = LeaseRegistry(store)
        lease = registry.acquire("s", "n", 60)
        payload = {"name": "Zoë ☃ 𝄞", "quote": '"\\', "n": 10**18}
        two = [("t", {"i": 0}), ("t.ÿ", payload)]
        written = store.append_many("s", two, expected_seq=0, fence=lease)
        assert [e.seq for e in written] == [0, 1]
        [name] = prepared_here(store)
        # Same size and kind: the same statement; with intent ids, another.
        store.append_many("s", two, expected_seq=2, fence=lease)
        assert prepared_here(store) == [name]
        mixed = [("t", {"i": 4}, "a"), ("t", {"i": 5}), ("t", {}, "b")]
        third = store.append_many("s", mixed, expected_seq=4, fence=lease)
        assert [(e.seq, e.intent_id) for e in third] == [(4, "a"), (5, None), (6, "b")]
        assert len(prepared_here(store)) == 2
        # Written as given, read back equal (times to the microsecond, in UTC).
        events = store.events("s")
        assert events[:2] == written and events[4:] == third
        assert events[1].payload == payload and events[1].type == "t.ÿ"
        assert events[4].recorded_at.tzinfo is UTC and events[4].writer == "n"
        # The checks: the same intent ids return what was written, nothing twice (a row
        # without an intent id among them: part of the batch is written, as the reference says).
        with pytest.raises(InvalidEvent, match="part of this batch"):
            store.append_many("s", mixed, expected_seq=7, fence=lease)
        ids = [("t", {"i": 7}, "c"), ("t", {}, "d")]
        fourth = store.append_many("s", ids, expected_seq=7, fence=lease)
        assert store.append_many("s", ids, expected_seq=9, fence=lease) == fourth
        assert store.head("s") == 9
        with pytest.raises(SeqConflict):
            store.append_many("s", two, expected_seq=8, fence=lease)
        with store.database.connection() as c:
            c.cur.execute("DEALLOCATE ALL")
        store.append_many("s", two, expected_seq=9, fence=lease)  # prepared again
        registry.release(lease)
        registry.acquire("s", "m", 60)
        with pytest.raises(StaleLease):
            store.append_many("s", two, expected_seq=11, fence=lease)
        assert store.head("s") == 11


@pytest.mark.postgres
def test_a_large_or_odd_batch_goes_through_the_cursor(pg_migrated_url: str) -> None:
    with SqlEventStore(pg_migrated_url, pool_size=1, max_overflow=0) as store:
        items = [("t", {"i": i}) for i in range(PREPARED_ROWS + 1)]
        ids = [("t", {}, f"k{i}") for i in range(PREPARED_ROWS + 1)]
        store.append_many("s", ids, expected_seq=0)  # a small batch of intents, by arrays
        store.append_many("s", items[:3], expected_seq=PREPARED_ROWS + 1)
        assert len(prepared_here(store)) == 1  # the 3 only
        assert store.head("s") == PREPARED_ROWS + 4
        assert [e.intent_id for e in store.events("s")][: PREPARED_ROWS + 1] == [
            f"k{i}" for i in range(PREPARED_ROWS + 1)
        ]


def test_batch_values() -> None:
    at = datetime(2000, 1, 1, 0, 0, 1, 5, tzinfo=UTC)
    batch = [pending("t", {"a": "ü"}), pending("u", {}, intent_id="k")]
    events = [new_event("s", 5 + n, p.type, p.payload, at, "w", 2, p.intent_id)
              for n, p in enumerate(batch)]  # fmt: skip
    time = (1_000_005).to_bytes(8, "big")
    assert batch_values("s", 5, events, batch, None) == [
        b"t", '{"a":"ü"}'.encode(), time, b"w", b"2", None,
        b"u", b"{}", time, b"w", b"2", b"k", b"s", b"5",
    ]  # fmt: skip
    lease = Lease("s", "h", at, 3)
    assert batch_values("s", 5, events, batch, lease)[-2:] == [b"h", b"3"]  # type: ignore[index]
    # What libpq would cut, or psycopg adapts otherwise: left to cursor.execute.
    assert batch_values("s", 5, events, batch, Lease("s", "a\x00b", at, 3)) is None
    odd = [events[0], new_event("s", 6, "u", {}, at, "w\x00", 2, "k")]
    assert batch_values("s", 5, odd, batch, None) is None
    naive = [events[0], new_event("s", 6, "u", {}, datetime(2000, 1, 1), "w", 2, "k")]
    assert batch_values("s", 5, naive, batch, None) is None


def test_batch_statement_text() -> None:
    sql = values_batch_sql(2, fence=True, intent=True, t=Tables())
    assert "VALUES (0, $1, $2, $3, $4, $5, $6), (1, $7, $8, $9, $10, $11, $12)" in sql
    assert "space = $13" in sql and "= $14" in sql
    assert "holder = $15 AND generation = $16 FOR SHARE" in sql
    assert "intent_id IN ($6, $12)" in sql
    assert "$17" not in sql and "%s" not in sql
