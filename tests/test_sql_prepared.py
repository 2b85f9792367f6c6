"""PostgreSQL: a single append runs as the connection's own prepared statement through libpq
(`shard_sql.sql.dialects.prepared`): prepared once per connection, prepared again when it was
deallocated behind the store's back, never where psycopg would not prepare, its errors
translated as psycopg's are."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from shard_sql import LeaseRegistry, SchemaError, SeqConflict, SqlEventStore, StaleLease
from shard_sql.sql.dialects.prepared import Prepared, append_values

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
