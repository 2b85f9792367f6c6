"""docs/dba.md stays true: its queries run on both databases and answer what they claim, and the
read-only role it describes can read the log but not write it."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import create_engine, text

from shard_sql import LeaseRegistry, SqlEventStore, StoreUnavailable

SQLITE_NOW = "strftime('%Y-%m-%d %H:%M:%f000', 'now')"
"""The current UTC time in the text format shard_sql keeps on SQLite (see docs/dba.md)."""


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/dba.db"
    pg: str = request.getfixturevalue("pg_migrated_url")
    return pg


@pytest.fixture
def populated(url: str) -> Iterator[str]:
    with SqlEventStore(url, migrate=True) as store:
        registry = LeaseRegistry(store)
        a = registry.acquire("wiki/home", "node-a", 60)
        for n in range(5):
            store.append(
                "wiki/home",
                "page.edited",
                {"page": "Home", "n": n},
                expected_seq=n,
                fence=a,
                intent_id=f"req-{n}",
            )
        registry.revoke("wiki/home")
        b = registry.acquire("wiki/home", "node-b", 60)
        store.append_many(
            "wiki/home", [("page.edited", {"page": "Home", "n": 5})], expected_seq=5, fence=b
        )
        store.append("other", "alias.set", {"alias": "x"}, expected_seq=0)
    yield url


def query(url: str, sql: str) -> list[tuple[Any, ...]]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(text(sql))]
    finally:
        engine.dispose()


def test_tail_and_follow(populated: str) -> None:
    rows = query(
        populated,
        "SELECT seq, type, payload, recorded_at, writer, generation "
        "FROM events WHERE space = 'wiki/home' ORDER BY seq DESC LIMIT 20",
    )
    assert [r[0] for r in rows] == [5, 4, 3, 2, 1, 0]
    rows = query(
        populated,
        "SELECT seq, type, payload, recorded_at FROM events "
        "WHERE space = 'wiki/home' AND seq > 3 ORDER BY seq",
    )
    assert [r[0] for r in rows] == [4, 5]


def test_heads(populated: str) -> None:
    rows = query(
        populated,
        "SELECT space, max(seq) + 1 AS head, max(recorded_at) AS last_write "
        "FROM events GROUP BY space ORDER BY space",
    )
    assert [(r[0], r[1]) for r in rows] == [("other", 1), ("wiki/home", 6)]
    rows = query(
        populated,
        """
        WITH RECURSIVE s(space) AS (
            SELECT min(space) FROM events
            UNION ALL
            SELECT (SELECT min(space) FROM events WHERE space > s.space) FROM s
            WHERE s.space IS NOT NULL
        )
        SELECT s.space,
               (SELECT seq + 1 FROM events e WHERE e.space = s.space ORDER BY seq DESC LIMIT 1)
        FROM s WHERE s.space IS NOT NULL
        """,
    )
    assert rows == [("other", 1), ("wiki/home", 6)]


def test_current_leases(populated: str) -> None:
    now = "now()" if populated.startswith("postgresql") else SQLITE_NOW
    rows = query(
        populated,
        f"SELECT space, holder, generation, expires_at > {now} AS valid FROM leases ORDER BY space",
    )
    assert [(r[0], r[1], r[2], bool(r[3])) for r in rows] == [("wiki/home", "node-b", 3, True)]


def test_by_writer_and_generation(populated: str) -> None:
    rows = query(
        populated,
        "SELECT space, seq, type, recorded_at FROM events WHERE writer = 'node-a' "
        "ORDER BY recorded_at DESC LIMIT 100",
    )
    assert sorted(r[1] for r in rows) == [0, 1, 2, 3, 4]
    rows = query(
        populated,
        "SELECT seq, type, writer, recorded_at FROM events "
        "WHERE space = 'wiki/home' AND generation = 3 ORDER BY seq",
    )
    assert [(r[0], r[2]) for r in rows] == [(5, "node-b")]
    rows = query(
        populated,
        "SELECT space, generation, writer, count(*) AS events, min(seq), max(seq) FROM events "
        "GROUP BY space, generation, writer ORDER BY space, generation",
    )
    assert rows == [
        ("other", 0, "", 1, 0, 0),
        ("wiki/home", 1, "node-a", 5, 0, 4),
        ("wiki/home", 3, "node-b", 1, 5, 5),
    ]


def test_payload_and_intent_queries(populated: str) -> None:
    if populated.startswith("postgresql"):
        sql = (
            "SELECT seq, payload->>'page' AS page FROM events "
            "WHERE space = 'wiki/home' AND payload @> '{\"n\": 2}'"
        )
    else:
        sql = (
            "SELECT seq, json_extract(payload, '$.page') AS page FROM events "
            "WHERE space = 'wiki/home' AND json_extract(payload, '$.n') = 2"
        )
    assert query(populated, sql) == [(2, "Home")]
    rows = query(
        populated,
        "SELECT seq, recorded_at, writer FROM events "
        "WHERE space = 'wiki/home' AND intent_id = 'req-3'",
    )
    assert [(r[0], r[2]) for r in rows] == [(3, "node-a")]


def test_sanity_checks_find_nothing(populated: str) -> None:
    for sql in (
        "SELECT space FROM events GROUP BY space HAVING max(seq) + 1 <> count(*)",
        "SELECT space, seq, generation FROM (SELECT space, seq, generation, lag(generation) "
        "OVER (PARTITION BY space ORDER BY seq) AS prev FROM events) x WHERE generation < prev",
        "SELECT space, generation FROM events WHERE generation > 0 "
        "GROUP BY space, generation HAVING count(DISTINCT writer) > 1",
    ):
        assert query(populated, sql) == []


def test_revoke_by_hand(populated: str) -> None:
    now = "now()" if populated.startswith("postgresql") else SQLITE_NOW
    least = "LEAST" if populated.startswith("postgresql") else "min"
    engine = create_engine(populated)
    with engine.begin() as conn:
        conn.execute(
            text(
                f"UPDATE leases SET generation = generation + 1, "
                f"expires_at = {least}(expires_at, {now}) WHERE space = 'wiki/home'"
            )
        )
    engine.dispose()
    with SqlEventStore(populated) as store:
        registry = LeaseRegistry(store)
        record = store.lease_record("wiki/home")
        assert record is not None and record.generation == 4
        assert registry.current("wiki/home") is None


@pytest.mark.postgres
def test_read_the_feed_and_the_lag(populated: str) -> None:
    if populated.startswith("postgresql"):  # alone, committed
        engine = create_engine(populated, isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            assert conn.execute(text("SELECT shard_sql_place_feed()")).scalar() == 7
        engine.dispose()
    rows = query(
        populated,
        "SELECT position, space, seq, type, payload FROM events "
        "WHERE position > 4 ORDER BY position LIMIT 500",
    )
    assert [r[:3] for r in rows] == [(5, "wiki/home", 4), (6, "wiki/home", 5), (7, "other", 0)]
    with SqlEventStore(populated) as store:
        d = store.database.dialect
        with store.database.connection() as c:
            d.begin_write(c)
            d.save_checkpoint(c.cur, "relay", 5, None, datetime.now(UTC))
            d.commit(c)
    rows = query(
        populated,
        "SELECT c.name, c.position, (SELECT coalesce(max(position), 0) FROM events) - c.position "
        "AS lag, c.holder, c.updated_at FROM checkpoints c ORDER BY c.name",
    )
    assert [r[:4] for r in rows] == [("relay", 5, 2, None)]


def test_read_only_role(pg_migrated_url: str) -> None:
    with SqlEventStore(pg_migrated_url) as store:
        store.append("s", "t", {"n": 0}, expected_seq=0)
        LeaseRegistry(store).acquire("s", "node-a", 60)
    role = f"shard_reader_{uuid.uuid4().hex[:8]}"
    database = pg_migrated_url.rpartition("/")[2]
    admin = pg_migrated_url.replace("postgresql+psycopg://", "postgresql://", 1)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'change-me'")
        try:
            conn.execute(f'GRANT CONNECT ON DATABASE "{database}" TO {role}')
            conn.execute(f"GRANT USAGE ON SCHEMA public TO {role}")
            conn.execute(
                f"GRANT SELECT ON events, leases, checkpoints, shard_sql_version TO {role}"
            )
            conn.execute(
                f"ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON TABLES TO {role}"
            )
            conn.execute(f"ALTER ROLE {role} SET default_transaction_read_only = on")
            reader_url = pg_migrated_url.replace("postgres@", f"{role}:change-me@", 1)
            with SqlEventStore(reader_url) as reader:
                assert [e.payload for e in reader.events("s")] == [{"n": 0}]
                assert reader.head("s") == 1 and reader.spaces() == ["s"]
                assert [e.seq for e in reader.iter_events("s")] == [0]
                assert LeaseRegistry(reader).current("s") is not None
                assert reader.feed() == [] and reader.checkpoints() == {}  # nobody placed yet
                with SqlEventStore(pg_migrated_url) as store:
                    assert store.feed_head() == 1
                assert [e.seq for e in reader.feed()] == [0]
                for write in (
                    lambda: reader.append("s", "t", {}, expected_seq=1),
                    lambda: reader.append_many("s", [("t", {})] * 2, expected_seq=1),
                    lambda: LeaseRegistry(reader).acquire("s2", "node-r", 10),
                ):
                    with pytest.raises(StoreUnavailable) as info:
                        write()
                    assert "read-only" in str(info.value) or "permission denied" in str(info.value)
            with (
                psycopg.connect(admin, user=role) as r,
                pytest.raises(psycopg.errors.ReadOnlySqlTransaction),
            ):
                r.execute("INSERT INTO events VALUES ('s', 1, 't', '{}', now(), '', 0, NULL)")
            with SqlEventStore(pg_migrated_url) as store:
                assert store.head("s") == 1 and store.head("s2") == 0
        finally:
            with psycopg.connect(admin, autocommit=True) as owner:
                owner.execute(f"DROP OWNED BY {role}")
            conn.execute(f"DROP ROLE {role}")
