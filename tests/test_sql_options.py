"""SqlEventStore's options and ways in: engines, in-memory SQLite, synchronous, URLs, streaming;
and a smoke run of the benchmark with tiny counts."""

from __future__ import annotations

import sqlite3
import threading
from datetime import UTC
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from shard_sql import LeaseRegistry, SqlEventStore
from shard_sql.testing import StoreContract
from shard_sql.urls import open_store


class TestSqliteMemoryStore(StoreContract):
    """`sqlite://`: one connection, used by one thread at a time."""

    def make_store(self) -> SqlEventStore:
        return SqlEventStore("sqlite://")


def pragma(store: SqlEventStore, name: str) -> object:
    with store.database.connection() as c:
        c.cur.execute(f"PRAGMA {name}")
        return c.cur.fetchone()[0]


def test_sqlite_settings(tmp_path: Path) -> None:
    with SqlEventStore(f"sqlite:///{tmp_path}/a.db") as store:
        assert pragma(store, "journal_mode") == "wal"
        assert pragma(store, "synchronous") == 2  # FULL
        # SQLite's busy handler is off on the store's connections: the store retries a busy
        # database itself, finer, for busy_timeout seconds (test_sqlite_lock_held_too_long).
        assert pragma(store, "busy_timeout") == 0
        assert store.database.busy_timeout == 30
    with SqlEventStore(f"sqlite:///{tmp_path}/a.db", sqlite_synchronous="normal") as store:
        assert pragma(store, "synchronous") == 1  # NORMAL
    with SqlEventStore(f"sqlite:///{tmp_path}/a.db?synchronous=NORMAL", busy_timeout=2) as store:
        assert pragma(store, "synchronous") == 1
        assert store.database.busy_timeout == 2
        store.append("s", "t", {}, expected_seq=0)


def test_open_store_selects_the_sql_adapter(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path}/o.db")
    try:
        assert isinstance(store, SqlEventStore)
    finally:
        store.close()


def test_sqlite_engine_passed_in(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path}/e.db")
    with SqlEventStore(engine) as store:
        store.append("s", "t", {}, expected_seq=0)
    with engine.connect() as conn:  # the caller's engine still works, and sees the event
        assert conn.execute(text("SELECT count(*) FROM events")).scalar() == 1
    engine.dispose()


@pytest.mark.postgres
def test_postgres_engine_passed_in(pg_url: str) -> None:
    engine = create_engine(pg_url, connect_args={"options": "-c timezone=America/New_York"})
    with SqlEventStore(engine, migrate=True) as store:
        e = store.append("s", "t", {"x": 1}, expected_seq=0)
        [back] = store.events("s")
        assert back == e and back.recorded_at.tzinfo is UTC
        lease = LeaseRegistry(store).acquire("s", "a", 10)
        assert lease.expires_at.tzinfo is UTC
    # close() leaves the caller's engine open, its connections as they were.
    with engine.connect() as conn:
        assert conn.execute(text("SHOW TimeZone")).scalar() == "America/New_York"
        conn.execute(text("CREATE TABLE t (x int)"))
        conn.rollback()  # a real transaction: the table is gone
        assert conn.execute(text("SELECT to_regclass('t')")).scalar() is None
    engine.dispose()


@pytest.mark.postgres
def test_plain_postgresql_url_uses_psycopg(pg_url: str) -> None:
    plain = pg_url.replace("postgresql+psycopg://", "postgresql://", 1)
    with SqlEventStore(plain, migrate=True) as store:
        assert store.engine.dialect.driver == "psycopg"
        assert "***" not in repr(store) and "postgres@" in repr(store)


def test_iteration_holds_no_connection_between_pages() -> None:
    # The in-memory database has a single connection: a write between two pages of an
    # iteration would deadlock if the iteration kept it.
    with SqlEventStore("sqlite://") as store:
        store.ITER_PAGE = 10
        store.append_many("s", [("t", {"i": i}) for i in range(25)], expected_seq=0)
        it = store.iter_events("s")
        first = [next(it) for _ in range(10)]
        store.append("s", "t", {"i": 25}, expected_seq=25)
        rest = list(it)
        assert [e.seq for e in first + rest] == list(range(26))


def test_threads_share_one_file(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/threads.db"
    stores = [SqlEventStore(url) for _ in range(3)]
    errors: list[BaseException] = []

    def work(store: SqlEventStore, w: int) -> None:
        try:
            registry = LeaseRegistry(store)
            for i in range(20):
                lease = None
                while lease is None:
                    try:
                        lease = registry.acquire(f"space-{i % 2}", f"node-{w}", 5)
                    except Exception as e:  # LeaseHeld: another thread holds it now
                        if type(e).__name__ != "LeaseHeld":
                            raise
                head = store.head(f"space-{i % 2}")
                store.append(f"space-{i % 2}", "t", {"w": w}, expected_seq=head, fence=lease)
                registry.release(lease)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(s, w)) for w, s in enumerate(stores)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for s in stores:
        s.close()
    conn = sqlite3.connect(tmp_path / "threads.db")
    assert conn.execute("SELECT count(*) FROM events").fetchone()[0] == 60
    conn.close()


def test_benchmark_smoke(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent))
    from benchmarks.sql_bench import run

    rows = run(quick=True, rounds=1, backends=("sqlite-full", "postgresql"))
    works = [r["work"] for r in rows]
    assert any("fenced append via AppendAuthority" in w for w in works)
    for r in rows:
        if r["figure"] is not None:
            assert r["figure"] > 0 and r["baseline"] > 0 and r["ratio"] > 0


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def any_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/any.db"
    pg: str = request.getfixturevalue("pg_migrated_url")
    return pg


def test_import_keeps_writer_generation_and_time(any_url: str) -> None:
    from datetime import datetime, timedelta, timezone

    from shard_sql.validation import Pending, pending

    then = datetime(2020, 5, 17, 8, 30, 0, 123456, tzinfo=timezone(timedelta(hours=2)))
    base = pending("t", {"k": 1}, "imp-0")
    copied = Pending(base.type, base.payload_json, base.payload, base.intent_id, then, "old", 7)
    more = [
        Pending(b.type, b.payload_json, b.payload, b.intent_id, then, "old", 8)
        for b in (pending("t", {"k": 2}), pending("t", {"k": 3}, "imp-2"))
    ]
    with SqlEventStore(any_url, migrate=True) as store:
        store.write("s", [copied], expected_seq=0, fence=None, verify_fence=False)
        store.write("s", more, expected_seq=1, fence=None, verify_fence=False)
        got = store.events("s")
    assert [(e.seq, e.writer, e.generation, e.intent_id) for e in got] == [
        (0, "old", 7, "imp-0"),
        (1, "old", 8, None),
        (2, "old", 8, "imp-2"),
    ]
    assert all(e.recorded_at == then and e.recorded_at.tzinfo is UTC for e in got)


def test_racing_writers_of_one_intent_write_it_once(any_url: str) -> None:
    with SqlEventStore(any_url, migrate=True) as store:
        results: list[object] = []
        barrier = threading.Barrier(6)

        def work() -> None:
            barrier.wait()
            for _ in range(50):
                try:
                    results.append(
                        store.append(
                            "s", "t", {"v": 1}, expected_seq=store.head("s"), intent_id="k"
                        )
                    )
                    return
                except Exception as e:  # SeqConflict: the head moved; try again
                    if type(e).__name__ != "SeqConflict":
                        results.append(e)
                        return
            results.append("gave up")

        threads = [threading.Thread(target=work) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert store.head("s") == 1
        [event] = store.events("s")
        assert results == [event] * 6
