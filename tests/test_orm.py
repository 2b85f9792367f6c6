"""shard_sql.orm in a host application: its own Session reads the log through the mapped
classes, and its alembic autogenerate (with `include_object`) leaves shard_sql's tables alone,
on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Column, Integer, MetaData, String, Table, create_engine, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from shard_sql import LeaseRegistry, SqlEventStore, migrate
from shard_sql.orm import (
    TABLES,
    CheckpointRecord,
    EventRecord,
    IntentRecord,
    LeaseRecord,
    include_object,
    metadata,
)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def url(request: pytest.FixtureRequest, sqlite_url: str) -> str:
    if request.param == "sqlite":
        return sqlite_url
    pg: str = request.getfixturevalue("pg_url")
    return pg


@pytest.fixture
def host(url: str) -> Iterator[Engine]:
    """The host application's engine (on PostgreSQL, a session in another time zone)."""
    args = {"options": "-c TimeZone=Asia/Tokyo"} if url.startswith("postgresql") else {}
    engine = create_engine(url, connect_args=args)
    yield engine
    engine.dispose()


def test_the_host_reads_the_log_with_its_own_session(url: str, host: Engine) -> None:
    with SqlEventStore(url, migrate=True) as store:
        store.append("orders/1", "order.placed", {"total": 12}, expected_seq=0)
        store.append("orders/1", "order.paid", {"by": "card"}, expected_seq=1, intent_id="p-1")
        store.append("orders/2", "order.placed", {"total": 3}, expected_seq=0)
        lease = LeaseRegistry(store).acquire("orders/2", "node-a", 30)
        written = store.events("orders/1")
    with Session(host) as session:
        rows = session.scalars(
            select(EventRecord).where(EventRecord.space == "orders/1").order_by(EventRecord.seq)
        ).all()
        assert [r.to_event() for r in rows] == written
        assert all(r.recorded_at.tzinfo is UTC for r in rows)
        assert rows[1].payload == {"by": "card"} and rows[1].intent_id == "p-1"
        # An aware bound value in another zone compares as the instant it is.
        later = rows[1].recorded_at.astimezone(timezone(timedelta(hours=-7)))
        newer = select(EventRecord.seq).where(EventRecord.recorded_at >= later)
        assert session.scalars(newer.where(EventRecord.space == "orders/1")).all() == [1]

        record = session.get(LeaseRecord, "orders/2")
        assert record is not None
        assert (record.holder, record.generation) == ("node-a", lease.generation)
        assert record.expires_at == lease.expires_at and record.expires_at.tzinfo is UTC
        assert session.scalars(select(IntentRecord)).all() == []
        assert session.scalars(select(CheckpointRecord)).all() == []


def test_the_models_cover_every_table() -> None:
    assert set(metadata.tables) == TABLES - {"shard_sql_version"}
    for record in (EventRecord, LeaseRecord, IntentRecord, CheckpointRecord):
        assert record.__doc__ and "read model" in record.__doc__


HOST = MetaData()
Table("orders", HOST, Column("id", Integer, primary_key=True), Column("item", String(50)))


def differences(engine: Engine, target: Any, **opts: Any) -> list[Any]:
    with engine.connect() as conn:
        context = MigrationContext.configure(
            conn, opts={"compare_type": True, "target_metadata": target, **opts}
        )
        diffs: list[Any] = compare_metadata(context, target)
        return diffs


def names(diffs: list[Any]) -> set[tuple[str, str]]:
    """(kind, table) of each table added or removed; (kind, "") of anything else."""
    found = set()
    for d in diffs:
        d = d[0] if isinstance(d, list) else d
        found.add((d[0], d[1].name if d[0] in ("add_table", "remove_table") else ""))
    return found


def test_autogenerate_leaves_shard_sqls_tables_alone(url: str, host: Engine) -> None:
    migrate(url)
    # Without the filter, a host's autogenerate would drop the log.
    assert {("remove_table", t) for t in TABLES} <= names(differences(host, HOST))
    filtered = differences(host, HOST, include_object=include_object)
    assert names(filtered) == {("add_table", "orders")}
    HOST.create_all(host)
    assert differences(host, HOST, include_object=include_object) == []
    # A host that lists shard_sql's models in its target metadata: nothing either.
    assert differences(host, [HOST, metadata], include_object=include_object) == []


@pytest.mark.postgres
def test_autogenerate_over_every_schema(pg_url: str) -> None:
    migrate(pg_url)
    engine = create_engine(pg_url)
    try:
        HOST.create_all(engine)
        assert differences(engine, HOST, include_object=include_object, include_schemas=True) == []
    finally:
        engine.dispose()


def test_include_object_keeps_the_hosts_own_tables() -> None:
    mine = MetaData()
    events = Table("events", mine, Column("id", Integer, primary_key=True))
    reflected = Table("events", MetaData(), Column("id", Integer, primary_key=True))
    # The host's own `events` model (shard_sql in another schema) is compared as usual ...
    assert include_object(events, "events", "table", False, reflected)
    assert include_object(events, "events", "table", False, None)
    assert include_object(events.c.id, "id", "column", False, reflected.c.id)
    # ... a table by shard_sql's names that the host does not declare is left alone.
    assert not include_object(reflected, "events", "table", True, None)
    assert not include_object(metadata.tables["leases"], "leases", "table", False, None)
    assert not include_object(metadata.tables["events"].c.seq, "seq", "column", False, None)
    assert include_object(Table("orders", MetaData()), "orders", "table", True, None)
    assert not include_object(reflected, "shard_sql_version", "table", True, None)


def test_event_record_to_event_keeps_the_values() -> None:
    at = datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=UTC)
    record = EventRecord(
        space="s", seq=3, type="t", payload={"a": [1]}, recorded_at=at, writer="w",
        generation=2, intent_id=None, position=9,
    )  # fmt: skip
    event = record.to_event()
    assert (event.space, event.seq, event.payload, event.recorded_at) == ("s", 3, {"a": [1]}, at)
    assert (event.writer, event.generation, event.intent_id, event.position) == ("w", 2, None, 9)
