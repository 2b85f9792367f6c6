"""Forwarding through a SQL database: `SqlEventStore` as an `IntentQueue`, on SQLite and
PostgreSQL.

What is SQL's own: the `intents` table (one row per put, applied rows deleted and swept,
corrupt rows skipped, the schema and its migration); waiting (LISTEN/NOTIFY on PostgreSQL, the
`-wal` file and `PRAGMA data_version` on SQLite); the database clock; and processes: the holder
woken by NOTIFY, a killed listener connection, a database that goes away. The contracts every
store passes (intent queue, forwarding, processes) run in tests/test_sql_store.py.
"""

from __future__ import annotations

import gc
import logging
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from alembic import command
from sqlalchemy import create_engine, inspect

from shard_sql import (
    AppendAuthority,
    InvalidEvent,
    LeaseRegistry,
    SchemaError,
    SqlEventStore,
    StoreUnavailable,
    migrate,
)
from shard_sql.sql import alembic_config, migration_connection
from shard_sql.sql.listener import intents_channel
from shard_sql.sql.poller import WalWatch
from shard_sql.testing.processes import CTX, stop_all
from shard_sql.validation import pending
from shard_sql.verify import verify


def libpq(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def admin(url: str) -> psycopg.Connection[Any]:
    return psycopg.connect(libpq(url), autocommit=True)


# -- the intents table ----------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/shard.db"
    pg: str = request.getfixturevalue("pg_migrated_url")
    return pg


@pytest.fixture
def store(url: str) -> Iterator[SqlEventStore]:
    with SqlEventStore(url) as s:
        yield s


def rows(url: str, sql: str) -> list[tuple[Any, ...]]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.exec_driver_sql(sql)]
    finally:
        engine.dispose()


def execute(url: str, sql: str, params: tuple[Any, ...] = ()) -> None:
    with migration_connection(url) as conn:
        conn.exec_driver_sql(sql, params)


def test_a_put_is_one_row(store: SqlEventStore, url: str) -> None:
    store.put_intent("wiki", pending("alias.set", {"page": "Home"}, "k1"), holder="node-a")
    store.put_intent("wiki", pending("alias.set", {"page": "Other"}, "k1"), holder="node-b")
    [(space, intent_id, type_, holder, at)] = rows(
        url, "SELECT space, intent_id, type, holder, submitted_at FROM intents"
    )
    assert (space, intent_id, type_, holder) == ("wiki", "k1", "alias.set", "node-a")
    assert at is not None


def test_applied_rows_are_deleted_or_swept(store: SqlEventStore, url: str) -> None:
    ids = ["a", "b", "c", "d"]
    for n, i in enumerate(ids):
        store.put_intent("s", pending("t", {"n": n}, i), holder="h")
    store.append("s", "t", {"n": 0}, expected_seq=0, intent_id="a")
    store.append("s", "t", {"n": 2}, expected_seq=1, intent_id="c")
    # forget deletes the rows of applied intents only.
    store.forget_intents("s", ["a", "b", "never-put"])
    recorded = {r[0] for r in rows(url, "SELECT intent_id FROM intents")}
    assert "a" not in recorded and "b" in recorded
    # "c" applied but not forgotten (its holder died in between): swept by the next read.
    assert "c" in recorded
    assert [p.intent_id for p in store.pending_intents("s", limit=100)] == ["b", "d"]
    assert "c" not in {r[0] for r in rows(url, "SELECT intent_id FROM intents")}
    # A late retry of an applied intent records nothing.
    store.put_intent("s", pending("t", {"n": 0}, "a"), holder="h")
    assert "a" not in {r[0] for r in rows(url, "SELECT intent_id FROM intents")}


def test_bad_arguments(store: SqlEventStore) -> None:
    # Beyond the contract's (tests/test_sql_store.py): a string where a list goes, a negative wait.
    with pytest.raises(InvalidEvent):
        store.forget_intents("s", "abc")
    with pytest.raises(InvalidEvent):
        store.wait_for_change("s", 0.1)
    with pytest.raises(InvalidEvent):
        store.wait_for_change(["s"], -1)
    assert store.pending_intents("s", limit=10) == []


def test_corrupt_rows_are_skipped_not_applied(
    store: SqlEventStore, url: str, caplog: pytest.LogCaptureFixture
) -> None:
    store.put_intent("s", pending("t", {"ok": 1}, "good"), holder="h")
    insert = (
        "INSERT INTO intents (space, intent_id, type, payload, submitted_at, holder) "
        "VALUES ('s', ?, ?, ?, '2026-01-01 00:00:00.000000', 'h')"
    )
    bad = [("empty-type", "", "{}"), ("array", "t", "[1, 2]"), ("control", "a\nb", "{}")]
    if url.startswith("sqlite"):
        bad.append(("not-json", "t", "{nope"))
    else:
        insert = insert.replace("?", "%s")
    for row in bad:
        execute(url, insert, row)
    with caplog.at_level(logging.WARNING, logger="shard_sql.sql"):
        assert [p.intent_id for p in store.pending_intents("s", limit=10)] == ["good"]
        assert [p.intent_id for p in store.pending_intents("s", limit=2)] == ["good"]
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == len(bad)  # once per row, not per poll
    assert all("DELETE FROM intents WHERE id =" in w for w in warned)
    holder = AppendAuthority("holder", store, LeaseRegistry(store))
    holder.acquire("s")
    assert holder.serve("s") == 1
    assert [e.intent_id for e in store.events("s")] == ["good"]
    assert len(rows(url, "SELECT id FROM intents")) == len(bad)  # left for an operator


def test_wait_for_change(store: SqlEventStore, url: str) -> None:
    store.wait_for_change(["s", "t"], 0.5)  # a first wait ends at once (or when listening)
    if url.startswith("postgresql"):
        listener = store.listener
        assert listener is not None
        deadline = time.monotonic() + 10
        # Up, and listening to the channels of both spaces' intents (a holder's waits).
        channels = {intents_channel("s"), intents_channel("t")}
        while not (listener.signal.up and channels <= listener.active):
            assert time.monotonic() < deadline, "the listener did not connect"
            time.sleep(0.005)
        store.wait_for_change(["s", "t"], 0.5)  # ended by the listener's start (changes missed?)
    start = time.monotonic()
    store.wait_for_change(["s"], 0.2)
    assert time.monotonic() - start >= 0.19  # nothing changed: the whole timeout
    other = SqlEventStore(url)

    def later(action: Any) -> float:
        timer = threading.Timer(0.1, action)
        timer.start()
        t0 = time.monotonic()
        store.wait_for_change(["s", "t"], 10)
        timer.join()
        return time.monotonic() - t0

    assert later(lambda: other.put_intent("t", pending("x", {}, "w1"), holder="h")) < 5
    if url.startswith("postgresql"):
        listener = store.listener
        assert listener is not None and listener.signal.received >= 1
        assert listener.signal.woken >= 1
    # A change between two waits of a thread ends the next one at once.
    other.put_intent("s", pending("x", {}, "w2"), holder="h")
    deadline = time.monotonic() + 5
    while store.listener is not None and store.listener.signal.last.get(("i", "s")) is None:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    t0 = time.monotonic()
    store.wait_for_change(["s"], 10)
    assert time.monotonic() - t0 < 5
    other.close()
    store.close()
    with pytest.raises(StoreUnavailable):
        store.wait_for_change(["s"], 0.01)


def test_database_clock(store: SqlEventStore, url: str) -> None:
    a = store.database_clock()
    b = store.database_clock()
    assert a.tzinfo is not None and a.utcoffset() == timedelta(0)
    assert a <= b
    if url.startswith("postgresql"):
        [(server,)] = rows(url, "SELECT clock_timestamp()")
        assert abs((server - store.database_clock()).total_seconds()) < 1
    else:
        assert abs((datetime.now(UTC) - a).total_seconds()) < 1
    registry = LeaseRegistry(store, clock=store.database_clock)
    lease = registry.acquire("s", "node-a", 10)
    assert registry.current("s") == lease
    assert store.append("s", "t", {}, expected_seq=0, fence=lease).writer == "node-a"


# -- docs/dba.md ----------------------------------------------------------------------------------


def test_dba_query_of_waiting_intents(store: SqlEventStore, url: str) -> None:
    LeaseRegistry(store).acquire("wiki/home", "node-a", 60)
    for i in range(3):
        store.put_intent("wiki/home", pending("t", {"i": i}, f"req-{i}"), holder="node-a")
    store.append("wiki/home", "t", {"i": 1}, expected_seq=0, intent_id="req-1")  # applied
    waiting = "now() - i.submitted_at AS waiting"
    if url.startswith("sqlite"):
        waiting = "(julianday('now') - julianday(i.submitted_at)) * 86400 AS waiting_seconds"
    found = rows(
        url,
        "SELECT i.space, i.intent_id, i.holder, i.submitted_at, " + waiting + ", "
        "l.holder AS current_holder, l.expires_at "
        "FROM intents i LEFT JOIN leases l ON l.space = i.space "
        "WHERE NOT EXISTS (SELECT 1 FROM events e WHERE e.space = i.space "
        "AND e.intent_id = i.intent_id) ORDER BY i.id LIMIT 50",
    )
    assert [(r[0], r[1], r[2], r[5]) for r in found] == [
        ("wiki/home", "req-0", "node-a", "node-a"),
        ("wiki/home", "req-2", "node-a", "node-a"),
    ]
    assert all(r[4] is not None for r in found)


@pytest.mark.postgres
def test_dba_application_role_can_forward(pg_migrated_url: str) -> None:
    """The privileges docs/dba.md lists for the application's role are enough to forward."""
    role = f"shard_app_{uuid.uuid4().hex[:12]}"
    database = pg_migrated_url.rpartition("/")[2]
    with admin(pg_migrated_url) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'change-me'")
        try:
            conn.execute(f'GRANT CONNECT ON DATABASE "{database}" TO {role}')
            conn.execute(f"GRANT USAGE ON SCHEMA public TO {role}")
            conn.execute(f"GRANT SELECT, INSERT ON events TO {role}")
            conn.execute(f"GRANT SELECT, INSERT, UPDATE ON leases TO {role}")
            conn.execute(f"GRANT SELECT, INSERT, DELETE ON intents TO {role}")
            conn.execute(f"GRANT SELECT ON shard_sql_version TO {role}")
            with SqlEventStore(
                pg_migrated_url.replace("postgres@", f"{role}:change-me@", 1)
            ) as app:
                app.put_intent("s", pending("t", {}, "fwd-1"), holder="h")
                holder = AppendAuthority("h", app, LeaseRegistry(app, clock=app.database_clock))
                holder.acquire("s")
                assert holder.serve("s") == 1
                app.wait_for_change(["s"], 0.05)
                assert app.find_intent("s", "fwd-1") is not None
        finally:
            conn.execute(f"DROP OWNED BY {role}")
            conn.execute(f"DROP ROLE {role}")


# -- the schema and its migration -----------------------------------------------------------------


@pytest.mark.postgres
def test_intents_schema_on_postgres(pg_migrated_url: str) -> None:
    engine = create_engine(pg_migrated_url)
    try:
        insp = inspect(engine)
        assert insp.get_table_comment("intents")["text"]
        columns = {c["name"]: c for c in insp.get_columns("intents")}
        assert set(columns) == {
            "id",
            "space",
            "intent_id",
            "type",
            "payload",
            "submitted_at",
            "holder",
            "reply_to",
        }
        assert columns["reply_to"]["nullable"]
        for name, column in columns.items():
            assert column.get("comment"), name
        assert str(columns["payload"]["type"]) == "JSONB"
        assert columns["id"].get("identity") is not None
        indexes = {i["name"] for i in insp.get_indexes("intents")}
        assert "intents_space_id_idx" in indexes
        uniques = {u["name"] for u in insp.get_unique_constraints("intents")}
        assert uniques == {"intents_space_intent_id_key"}
    finally:
        engine.dispose()
    [(comment,)] = rows(
        pg_migrated_url,
        "SELECT obj_description(t.oid, 'pg_trigger') FROM pg_trigger t "
        "WHERE t.tgname = 'events_notify_applied'",
    )
    assert "NOTIFY" in comment


def trigger_count(url: str) -> int:
    return len(rows(url, "SELECT 1 FROM pg_trigger WHERE tgname = 'events_notify_applied'"))


def test_older_schema_is_refused_then_migrated(url: str) -> None:
    SqlEventStore(url).close()
    with migration_connection(url) as conn:
        command.downgrade(alembic_config(conn), "0001")
    engine = create_engine(url)
    try:
        assert "intents" not in inspect(engine).get_table_names()
    finally:
        engine.dispose()
    if url.startswith("postgresql"):
        assert trigger_count(url) == 0
        with pytest.raises(SchemaError) as info:
            SqlEventStore(url)
        message = str(info.value)
        assert "0001" in message and "shard-sql migrate --url" in message
        migrate(url)
        assert trigger_count(url) == 1
    with SqlEventStore(url) as store:  # SQLite: migrated on open
        store.put_intent("s", pending("t", {"n": 1}, "after-migrate"), holder="h")
        holder = AppendAuthority("holder", store, LeaseRegistry(store))
        holder.acquire("s")
        assert holder.serve("s") == 1
        assert store.find_intent("s", "after-migrate") is not None


# -- across processes ----------------------------------------------------------------------------


def holder_proc(
    url: str, space: str, ttl: float, ready: Any, stop: Any, out: Any, stats: Any = None
) -> None:
    """The contract's holder (shard_sql.testing.processes), reporting its listener's counts."""
    store = SqlEventStore(url)
    node = AppendAuthority("holder", store, LeaseRegistry(store), ttl_seconds=ttl)
    # Takes the space before serving: the serving thread then waits for intents at once, not
    # after a first idle pause of min(ttl / 6, 2 s) (see shard_sql.serving).
    e = node.append(space, "t", {"by": "holder"}, intent_id="holder-0")
    with node:
        out.put(("holder", [(e.intent_id, e.seq, e.writer, e.generation)]))
        out.close()
        out.join_thread()  # flushed before `ready`: the test may SIGSTOP this process then
        ready.set()
        stop.wait(120)
        listener = store.listener
        if stats is not None and listener is not None:
            stats.put((listener.intents, listener.applied + listener.signal.woken))
    store.close()


@pytest.mark.slow
@pytest.mark.postgres
def test_notify_wakes_the_holder_and_the_forwarder(pg_migrated_url: str) -> None:
    """The holder serves on a notification, not on its polling interval (TTL / 6 = 2 s here),
    and the forwarder is woken by the NOTIFY its event's commit sends."""
    ready, stop, out, stats = CTX.Event(), CTX.Event(), CTX.Queue(), CTX.Queue()
    holder = CTX.Process(
        target=holder_proc, args=(pg_migrated_url, "s", 600.0, ready, stop, out, stats)
    )
    holder.start()
    n = 10
    store = SqlEventStore(pg_migrated_url)
    try:
        assert ready.wait(60)
        node = AppendAuthority("fwd", store, LeaseRegistry(store), handoff=False)  # notified
        for i in range(3):  # both listeners up (until then, waits are 50 ms sleeps)
            node.append("s", "t", {"warm-up": i})
        for i in range(n):
            assert node.append("s", "t", {"i": i}).writer == "holder"
        listener = store.listener
        assert listener is not None
        # The events' commits notified this process (each "e:<the event>"), which ended its
        # waits.
        assert any(kind == "e" and key.startswith("s\0") for kind, key in listener.signal.last)
        assert listener.signal.woken >= 1
    finally:
        stop.set()
        notified, acted = stats.get(timeout=30)
        stop_all([holder])
        store.close()
    # Every forwarded intent was announced to the holder (a "j:" notification on the space's
    # channel), and such announcements were acted on: applied on its listener thread, or by its
    # serving thread woken for them (or busy at it already, which counts as neither).
    assert notified >= n and acted >= 1


def until(check: Any, store: SqlEventStore, timeout: float = 20.0) -> Any:
    """Wait (on the store's notifications) until `check()` is truthy; return it."""
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, "timed out"
        store.wait_for_change(["s"], 0.05)
    return value


@pytest.mark.postgres
def test_notifications_carry_intents_and_events(pg_migrated_url: str) -> None:
    """PostgreSQL: a holder's inbox has each intent as its notification brought it, and the
    forwarder gets its event from its commit's notification, equal to the stored event. A body
    too large for a notification is announced by space only: the inbox is out of sync until the
    next read."""
    with SqlEventStore(pg_migrated_url) as holder, SqlEventStore(pg_migrated_url) as fwd:
        for s in (holder, fwd):
            s.wait_for_change(["s"], 0)  # starts its listener
            until(lambda s=s: s.listener is not None and s.listener.signal.up, s)
        assert holder.notified_intents("s", limit=10) is None  # never read: not in sync
        # In sync after a read once the space's intents come to its listener (LISTEN to the
        # space's channel, asked for by the first read or wait).
        until(
            lambda: (
                holder.pending_intents("s", limit=10) == []
                and holder.notified_intents("s", limit=10) == []
            ),
            holder,
        )
        payload = {"n": 1, "é": [1.5, None, {"deep": "x"}], "t": True}
        fwd.put_intent("s", pending("page.edited", payload, "k1"), holder="h")
        [p] = until(lambda: holder.notified_intents("s", limit=10), holder)
        assert (p.type, p.payload, p.intent_id) == ("page.edited", payload, "k1")
        written = holder.append("s", p.type, p.payload, expected_seq=0, intent_id="k1")
        listener = fwd.listener
        assert listener is not None
        until(lambda: ("s", "k1") in listener.results, fwd)
        found = fwd.find_intent("s", "k1")
        assert found == written == holder.events("s")[0]
        assert found is not None and found.recorded_at == written.recorded_at
        assert not listener.results and not listener.expected
        # Applied by a plain append (a holder drops what it applies): offered until a read.
        assert holder.pending_intents("s", limit=10) == []
        assert holder.notified_intents("s", limit=10) == []
        big = {"blob": "x" * 9000}
        fwd.put_intent("s", pending("t", big, "k2"), holder="h")
        until(lambda: holder.notified_intents("s", limit=10) is None, holder)
        assert [p.intent_id for p in holder.pending_intents("s", limit=10)] == ["k2"]
        [p] = holder.notified_intents("s", limit=10) or []
        assert p.payload == big
        written = holder.append("s", "t", big, expected_seq=1, intent_id="k2")
        assert fwd.find_intent("s", "k2") == written  # announced by space only: read


def test_serving_thread_forgets_applied_intents(url: str) -> None:
    """A holder in a `with` block deletes the records of the intents it applied in batches
    (later, off the path of the next append); none is left once its block has exited."""
    with SqlEventStore(url) as a, SqlEventStore(url) as b:
        holder = AppendAuthority("holder", a, LeaseRegistry(a), ttl_seconds=30)
        fwd = AppendAuthority("fwd", b, LeaseRegistry(b), ttl_seconds=30, forward_timeout=20)
        with holder:
            holder.acquire("s")
            events = [fwd.append("s", "t", {"i": i}) for i in range(20)]
            assert [e.writer for e in events] == ["holder"] * 20
            assert [e.seq for e in events] == list(range(20))
        assert rows(url, "SELECT count(*) FROM intents") == [(0,)]
        assert verify(a).ok


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify is Linux's")
def test_sqlite_waiters_sleep_on_the_wal_file(tmp_path: Path) -> None:
    """On Linux a SQLite waiter sleeps on inotify of the `-wal` file: a commit by another
    connection (another process would do the same) wakes it."""
    url = f"sqlite:///{tmp_path}/shard.db"
    assert WalWatch.open(f"{tmp_path}/missing.db-wal") is None
    with SqlEventStore(url) as store, SqlEventStore(url) as other:
        store.append("s", "t", {}, expected_seq=0)
        watch = WalWatch.open(f"{tmp_path}/shard.db-wal")
        assert watch is not None
        try:
            watch.drain()
            assert not watch.wait(0)
            other.append("s", "t", {}, expected_seq=1)
            assert watch.wait(10)
            assert not watch.wait(0)  # drained
        finally:
            watch.close()
        store.wait_for_change(["s"], 0)  # sets this thread's baseline
        done = threading.Event()

        def commit_soon() -> None:
            done.wait(10)
            other.put_intent("s", pending("t", {}, "k"), holder="h")

        thread = threading.Thread(target=commit_soon)
        thread.start()
        done.set()
        store.wait_for_change(["s"], 30)
        thread.join()
        assert [p.intent_id for p in store.pending_intents("s", limit=10)] == ["k"]


@pytest.mark.postgres
def test_channels_of_spaces_given_up_are_unlistened(
    pg_migrated_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A space's intents channel is LISTENed while a holder here waits on it, UNLISTENed once
    nobody asked for it in CHANNEL_IDLE seconds (its inbox then out of sync), and LISTENed
    again when asked."""
    import shard_sql.sql.listener as listener_module

    monkeypatch.setattr(listener_module, "CHANNEL_IDLE", 0.6)
    with SqlEventStore(pg_migrated_url) as store:
        store.wait_for_change(["a", "b"], 0)
        listener = store.listener
        assert listener is not None
        channels = {intents_channel("a"), intents_channel("b")}
        deadline = time.monotonic() + 20
        while not channels <= listener.active:
            assert time.monotonic() < deadline
            store.wait_for_change(["a", "b"], 0.05)
        until(
            lambda: (
                store.pending_intents("a", limit=1) == []
                and store.notified_intents("a", limit=1) == []
            ),
            store,
        )
        # Only "b" is asked for from now on: "a" goes.
        while intents_channel("a") in listener.active:
            assert time.monotonic() < deadline
            store.wait_for_change(["b"], 0.05)
        assert intents_channel("b") in listener.active
        assert store.notified_intents("a", limit=1) is None
        store.wait_for_change(["a"], 0)
        while intents_channel("a") not in listener.active:
            assert time.monotonic() < deadline
            store.wait_for_change(["a"], 0.05)


def test_sqlite_has_no_inbox(tmp_path: Path) -> None:
    with SqlEventStore(f"sqlite:///{tmp_path}/shard.db") as store:
        store.put_intent("s", pending("t", {}, "k"), holder="h")
        assert [p.intent_id for p in store.pending_intents("s", limit=10)] == ["k"]
        assert store.notified_intents("s", limit=10) is None
        calls: list[str] = []
        stop = store.watch_intents(lambda space: calls.append(space) is None)
        store.put_intent("s", pending("t", {}, "k2"), holder="h")
        stop()
        assert calls == []


@pytest.mark.slow
@pytest.mark.postgres
def test_listener_connection_terminated(pg_migrated_url: str) -> None:
    ready, stop, out, stats = CTX.Event(), CTX.Event(), CTX.Queue(), CTX.Queue()
    holder = CTX.Process(
        target=holder_proc, args=(pg_migrated_url, "s", 600.0, ready, stop, out, stats)
    )
    holder.start()
    store = SqlEventStore(pg_migrated_url)
    try:
        assert ready.wait(60)
        node = AppendAuthority("fwd", store, LeaseRegistry(store), handoff=False)  # notified
        node.append("s", "t", {"before": True})
        listener = store.listener
        assert listener is not None
        listening = (
            "FROM pg_stat_activity WHERE datname = current_database() "
            "AND query LIKE 'LISTEN shard_sql%'"
        )
        with admin(pg_migrated_url) as conn:
            # The holder's serving thread starts listening at its first wait (holding a space).
            deadline = time.monotonic() + 20
            while len(conn.execute(f"SELECT pid {listening}").fetchall()) < 2:
                assert time.monotonic() < deadline, "the holder is not listening"
                time.sleep(0.01)
            assert listener.connections == 1
            killed = conn.execute(f"SELECT pg_terminate_backend(pid) {listening}").fetchall()
        assert len(killed) == 2  # this process's listener and the holder's
        deadline = time.monotonic() + 20
        while listener.connections < 2:
            assert time.monotonic() < deadline, "the listener did not reconnect"
            time.sleep(0.01)
        assert listener.backend_pid is not None
        for i in range(5):
            assert node.append("s", "t", {"after": i}).writer == "holder"
    finally:
        stop.set()
        stats.get(timeout=30)
        stop_all([holder])
        store.close()
    assert holder.exitcode == 0


@pytest.mark.postgres
def test_listener_ends_with_its_store(pg_migrated_url: str) -> None:

    def listening() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name.startswith("shard-sql-listener")]

    before = set(listening())
    store = SqlEventStore(pg_migrated_url)
    store.wait_for_change(["s"], 0.1)
    [thread] = set(listening()) - before
    store.close()
    assert not thread.is_alive()
    store = SqlEventStore(pg_migrated_url)  # dropped without close(): the listener goes with it
    store.wait_for_change(["s"], 0.1)
    [thread] = set(listening()) - before
    del store
    gc.collect()
    thread.join(10)
    assert not thread.is_alive()


@pytest.mark.postgres
def test_database_going_away_is_store_unavailable(pg_migrated_url: str) -> None:
    """A connection lost mid-statement, then no connection possible (as during a restart):
    `StoreUnavailable`; waits fall back to bounded sleeps; all is well when it is back."""
    database = pg_migrated_url.rpartition("/")[2]
    store = SqlEventStore(pg_migrated_url)
    store.wait_for_change(["s"], 1)  # starts the listener
    listener = store.listener
    assert listener is not None
    deadline = time.monotonic() + 10
    while listener.connections < 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    errors: list[BaseException] = []
    with (
        admin(pg_migrated_url) as locker,
        admin(pg_migrated_url.rpartition("/")[0] + "/postgres") as postgres,
    ):
        locker.execute("BEGIN")
        locker.execute("LOCK TABLE intents IN ACCESS EXCLUSIVE MODE")

        def put() -> None:
            try:
                store.put_intent("s", pending("t", {}, "mid-commit"), holder="h")
            except BaseException as e:
                errors.append(e)

        thread = threading.Thread(target=put)
        thread.start()
        deadline = time.monotonic() + 10
        while True:  # the put waits for the lock: it is in flight
            waiting = postgres.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = %s AND wait_event_type = 'Lock'",
                (database,),
            ).fetchall()
            if waiting:
                break
            assert time.monotonic() < deadline, "the put never reached the server"
            time.sleep(0.01)
        postgres.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false')
        try:
            postgres.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> %s",
                (database, locker.info.backend_pid),
            )
            thread.join(30)
            assert not thread.is_alive()
            [err] = errors
            assert isinstance(err, StoreUnavailable), err
            assert "connect" in str(err)
            # The listener is down: a wait is a bounded sleep, not an error.
            deadline = time.monotonic() + 10
            while listener.signal.up:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            t0 = time.monotonic()
            store.wait_for_change(["s"], 5)
            assert time.monotonic() - t0 < 2
            with pytest.raises(StoreUnavailable):
                store.find_intent("s", "mid-commit")
        finally:
            postgres.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')
            locker.execute("ROLLBACK")
    deadline = time.monotonic() + 20
    while listener.connections < 2:  # back, with back-off
        assert time.monotonic() < deadline, "the listener did not reconnect"
        time.sleep(0.01)
    store.put_intent("s", pending("t", {}, "mid-commit"), holder="h")
    assert [p.intent_id for p in store.pending_intents("s", limit=10)] == ["mid-commit"]
    store.close()


# -- the benchmark ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_forwarding_bench_smoke() -> None:
    """benchmarks/forwarding_bench.py runs (tiny counts, SQLite only: the figures mean nothing)."""
    import sys

    root = str(Path(__file__).resolve().parent.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    from benchmarks import forwarding_bench

    got = forwarding_bench.run(appends=25, rounds=1, ttl=0.5, backends=("sqlite",))
    assert [r["unit"] for r in got] == ["ms", "ms", "s", "s"]
    for r in got:
        assert r["figure"] > 0 and r["baseline"] > 0
    assert got[3]["ok"] in (True, False)
