"""The feed and checkpoints on the SQL adapter (a SQLite file, a real PostgreSQL): the contract
suites, positions as each database assigns them, migration 0004 numbering the events already
there, PostgreSQL's placement function, what wakes `wait_feed`, the checkpoint statement."""

from __future__ import annotations

import multiprocessing
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from alembic import command
from sqlalchemy import create_engine, text
from test_sql_store import Postgres, SqliteFile

from shard_sql import InvalidEvent, LeaseRegistry, SeqConflict, SqlEventStore, StaleLease, migrate
from shard_sql.sql.schema import alembic_config, migration_connection
from shard_sql.testing import FeedContract, SubscriptionContract

CTX = multiprocessing.get_context("spawn")


def libpq(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


class TestSqliteFeed(SqliteFile, FeedContract):
    pass


class TestPostgresFeed(Postgres, FeedContract):
    pass


class TestSqliteSubscription(SqliteFile, SubscriptionContract):
    pass


class TestPostgresSubscription(Postgres, SubscriptionContract):
    pass


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, sqlite_url: str) -> str:
    if request.param == "sqlite":
        return sqlite_url
    return str(request.getfixturevalue("pg_migrated_url"))


@pytest.fixture
def store(url: str) -> Iterator[SqlEventStore]:
    with SqlEventStore(url) as s:
        yield s


# -- positions -----------------------------------------------------------------------------


def test_sqlite_appends_return_their_positions(sqlite_url: str) -> None:
    with SqlEventStore(sqlite_url) as store:
        lease = LeaseRegistry(store).acquire("b", "me", 30)
        assert store.append("a", "t", {}, expected_seq=0).position == 1
        assert [e.position for e in store.append_many("b", [("t", {})] * 3, expected_seq=0)] == [
            2,
            3,
            4,
        ]
        assert store.append("b", "t", {}, expected_seq=3, fence=lease).position == 5
        again = store.append("a", "t", {"k": 1}, expected_seq=1, intent_id="i")
        assert store.append("a", "t", {"k": 1}, expected_seq=1, intent_id="i").position == 6
        assert again.position == 6
        assert [e.position for e in store.events("b")] == [2, 3, 4, 5]
        assert store.feed() == store.events("a")[:1] + store.events("b") + store.events("a")[1:]


def test_postgres_places_after_commit(pg_migrated_url: str) -> None:
    with SqlEventStore(pg_migrated_url) as store:
        e = store.append("a", "t", {}, expected_seq=0)
        assert e.position is None  # placed after the commit, by the next reader
        assert store.events("a")[0].position is None
        assert store.feed() == [e]
        assert store.feed()[0].position == 1
        assert store.events("a")[0].position == 1
        written = store.append_many("b", [("t", {})] * 12, expected_seq=0)  # COPY
        assert {x.position for x in written} == {None}
        assert store.feed_head() == 13
        assert [x.position for x in store.feed(1)] == list(range(2, 14))


def test_payload_reads_extract_keys_as_text(store: SqlEventStore) -> None:
    """`PayloadReads` (the eventsourcing module's reads): the seq or position, space and type of
    what `events` and `feed` return, with the same bounds and filters, and the payload keys
    asked for as text (a string's own text, an integer's digits, None where missing or null).
    On PostgreSQL the feed's rows are placed first, as `feed` places them."""
    odd = "\u00e9\"'\\ \\u0041 \U0001f600\n"
    store.append_many("a", [("t", {"v": 0, "s": odd}), ("u", {"v": -7})], expected_seq=0)
    store.append("b", "t", {"v": 12345678901234, "s": "", "z": None}, expected_seq=0)
    store.append("a", "u", {"v": 3, "s": "x"}, expected_seq=2)
    keys = ("v", "s", "z", "missing")
    rows = [(0, "t", "0", odd, None, None), (1, "u", "-7", None, None, None)]
    rows.append((2, "u", "3", "x", None, None))
    assert store.event_fields("a", keys) == rows
    assert store.event_fields("a", keys, from_seq=1) == rows[1:]
    assert store.event_fields("a", keys, limit=2) == rows[:2]
    assert store.event_fields("a", keys, from_seq=1, limit=1) == rows[1:2]
    assert store.event_fields("a", keys, from_seq=9) == [] == store.event_fields("c", keys)
    assert store.event_fields("a", keys, limit=0) == []
    feed = store.feed_fields(["v", "s"])  # places (PostgreSQL) before it reads
    assert feed == [
        (1, "a", "t", "0", odd),
        (2, "a", "u", "-7", None),
        (3, "b", "t", "12345678901234", ""),
        (4, "a", "u", "3", "x"),
    ]
    assert [e.position for e in store.feed()] == [1, 2, 3, 4]
    assert store.feed_fields(["v", "s"], 1, limit=2) == feed[1:3]
    assert store.feed_fields(["v", "s"], types=["u"]) == [feed[1], feed[3]]
    assert store.feed_fields(["v"], types=[]) == [] == store.feed_fields(["v"], 4)
    for bad in ([], "v", ["v", "a.b"], ["$.v"], ["v'"], [1], ["v"] * 17):
        with pytest.raises(InvalidEvent):
            store.event_fields("a", bad)  # type: ignore[arg-type]
        with pytest.raises(InvalidEvent):
            store.feed_fields(bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidEvent):
        store.feed_fields(["v"], -1)


def _place(conn: Any) -> int:
    return int(conn.execute("SELECT shard_sql_place_feed()").fetchone()[0])


def test_placement_orders_by_running_max_of_time(pg_migrated_url: str) -> None:
    """Within one placement: the running max of recorded_at within the space by seq, then space
    and seq. A writer whose clock is behind cannot put seq 1 of a space before its seq 0."""
    with psycopg.connect(libpq(pg_migrated_url), autocommit=True) as conn:
        rows = [("b", 0, 5), ("a", 0, 3), ("a", 1, 1), ("b", 1, 6), ("a", 2, 7), ("c", 0, 3)]
        for space, seq, second in rows:
            conn.execute(
                "INSERT INTO events (space, seq, type, payload, recorded_at, writer, generation)"
                " VALUES (%s, %s, 't', '{}', %s, '', 0)",
                (space, seq, datetime(2026, 1, 1, 0, 0, second, tzinfo=UTC)),
            )
        assert _place(conn) == 6
        got = conn.execute("SELECT space, seq FROM events ORDER BY position").fetchall()
        assert got == [("a", 0), ("a", 1), ("c", 0), ("b", 0), ("b", 1), ("a", 2)]
        assert _place(conn) == 6  # nothing more: the head, without the lock


def test_placement_refuses_a_snapshot_older_than_its_lock(pg_migrated_url: str) -> None:
    with psycopg.connect(libpq(pg_migrated_url)) as conn:
        conn.execute(
            "INSERT INTO events (space, seq, type, payload, recorded_at, writer, generation)"
            " VALUES ('a', 0, 't', '{}', now(), '', 0)"
        )
        conn.commit()
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        with pytest.raises(psycopg.errors.RaiseException, match="READ COMMITTED"):
            _place(conn)
        conn.rollback()
        assert _place(conn) == 1


def test_placement_function_is_pinned_to_its_schema(pg_url: str) -> None:
    """Migrated into another schema (search_path), the function finds its tables from any
    session's search_path."""
    with psycopg.connect(libpq(pg_url), autocommit=True) as conn:
        conn.execute("CREATE SCHEMA feedtest")
    migrate(pg_url + "?options=-csearch_path%3Dfeedtest")
    with psycopg.connect(libpq(pg_url), autocommit=True) as conn:
        conn.execute(
            "INSERT INTO feedtest.events (space, seq, type, payload, recorded_at, writer, "
            "generation) VALUES ('a', 0, 't', '{}', now(), '', 0)"
        )
        assert conn.execute("SELECT feedtest.shard_sql_place_feed()").fetchone() == (1,)
        config = conn.execute(
            "SELECT proconfig FROM pg_proc WHERE proname = 'shard_sql_place_feed'"
        ).fetchone()
        assert config == (["search_path=feedtest, pg_temp"],)


def test_a_reader_that_may_not_write(pg_migrated_url: str) -> None:
    """A role with SELECT only places through the function (SECURITY DEFINER); a read-only
    session cannot place, and reads what others placed (safely, only later)."""
    role = f"feed_reader_{uuid.uuid4().hex[:8]}"
    admin = psycopg.connect(libpq(pg_migrated_url), autocommit=True)
    admin.execute(f"CREATE ROLE {role} LOGIN")
    try:
        admin.execute(f"GRANT SELECT ON events, leases, intents, checkpoints TO {role}")
        admin.execute(f"GRANT SELECT ON shard_sql_version TO {role}")
        url = pg_migrated_url.replace("://postgres@", f"://{role}@", 1)
        with SqlEventStore(pg_migrated_url) as writer:
            writer.append("a", "t", {}, expected_seq=0)
            with SqlEventStore(url) as reader:
                assert [e.seq for e in reader.feed()] == [0]
            admin.execute(f"ALTER ROLE {role} SET default_transaction_read_only = on")
            writer.append("a", "t", {}, expected_seq=1)
            with SqlEventStore(url) as reader:
                assert reader.feed_head() == 1  # not placed: this session may not write
                assert [e.seq for e in reader.feed()] == [0]
                assert writer.feed_head() == 2
                assert [e.seq for e in reader.feed(1)] == [1]
    finally:
        admin.execute(f"DROP OWNED BY {role}")
        admin.execute(f"DROP ROLE {role}")
        admin.close()


# -- migration 0004 --------------------------------------------------------------------------


def _at_0003(url: str) -> None:
    with migration_connection(url) as conn:
        command.upgrade(alembic_config(conn), "0003")


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_url(request: pytest.FixtureRequest, sqlite_url: str) -> str:
    if request.param == "sqlite":
        return sqlite_url
    return str(request.getfixturevalue("pg_url"))


def test_migration_numbers_the_events_already_there(empty_url: str) -> None:
    _at_0003(empty_url)
    engine = create_engine(empty_url)
    rows = [("b", 0, 5), ("a", 0, 3), ("a", 1, 1), ("b", 1, 6), ("a", 2, 7), ("c", 0, 3)]
    try:
        with engine.begin() as conn:
            for space, seq, second in rows:
                conn.execute(
                    text(
                        "INSERT INTO events (space, seq, type, payload, recorded_at, writer, "
                        "generation) VALUES (:s, :q, 't', '{}', :t, '', 0)"
                    ),
                    {"s": space, "q": seq, "t": f"2026-01-01 00:00:0{second}.000000+00:00"[:26]},
                )
    finally:
        engine.dispose()
    migrate(empty_url)
    with SqlEventStore(empty_url) as store:
        got = [(e.space, e.seq, e.position) for e in store.feed()]
        assert got == [("a", 0, 1), ("a", 1, 2), ("c", 0, 3), ("b", 0, 4), ("b", 1, 5), ("a", 2, 6)]
        e = store.append("c", "t", {}, expected_seq=1)
        assert store.feed(6) == [e]
        assert store.feed_head() == 7


# -- wait_feed -------------------------------------------------------------------------------


def _append_later(url: str, space: str, delay: float, raw: bool, committed: Any = None) -> None:
    """Append to `space` after `delay`; set `committed` (a shared double) to the monotonic
    time of the commit (one clock for every process of the host)."""
    time.sleep(delay)
    _append_now(url, space, raw)
    if committed is not None:
        committed.value = time.monotonic()


def _append_now(url: str, space: str, raw: bool) -> None:
    if raw:  # a commit that no store announces
        engine = create_engine(url)
        with engine.begin() as conn:
            position = "(SELECT COALESCE(MAX(position), 0) + 1 FROM events)"
            if engine.dialect.name == "postgresql":
                position = "NULL"
            conn.execute(
                text(
                    "INSERT INTO events (space, seq, type, payload, recorded_at, writer, "
                    f"generation, position) VALUES (:s, 0, 't', '{{}}', "
                    f"'2026-01-01 00:00:00.000000', '', 0, {position})"
                ),
                {"s": space},
            )
        engine.dispose()
        return
    with SqlEventStore(url) as store:
        store.append(space, "t", {}, expected_seq=0)


@pytest.mark.parametrize("raw", [False, True], ids=["store", "raw-sql"])
def test_wait_feed_wakes_on_another_process_commit(store: SqlEventStore, raw: bool) -> None:
    """A plain append in another process wakes the wait at once; a commit nobody announced (a
    row inserted by hand, on PostgreSQL) within the fallback poll."""
    head = store.feed_head()
    assert store.wait_feed(head, timeout=0.2) is False  # the waiting machinery is up
    committed = CTX.Value("d", 0.0)
    url = store.engine.url.render_as_string(False)
    proc = CTX.Process(target=_append_later, args=(url, "x", 0.5, raw, committed))
    proc.start()
    try:
        assert store.wait_feed(head, timeout=30) is True
        woken = time.monotonic()
    finally:
        proc.join(30)
    assert proc.exitcode == 0
    assert [e.space for e in store.feed(head)] == ["x"]
    # From the commit on (the other process's start-up, however slow, does not count).
    waited = woken - committed.value
    announced = not raw or store.engine.dialect.name == "sqlite"
    assert waited < (5 if announced else 10), waited


def test_wait_feed_sees_an_unplaced_commit(pg_migrated_url: str) -> None:
    """PostgreSQL: a committed row not placed yet counts (the next read places it above)."""
    with SqlEventStore(pg_migrated_url) as store, psycopg.connect(libpq(pg_migrated_url)) as c:
        store.append("a", "t", {}, expected_seq=0)
        head = store.feed_head()
        c.execute(
            "INSERT INTO events (space, seq, type, payload, recorded_at, writer, generation)"
            " VALUES ('a', 1, 't', '{}', now(), '', 0)"
        )
        c.commit()
        assert store.wait_feed(head, timeout=0) is True
        assert store.wait_feed(head + 1, timeout=0) is False
        assert [e.seq for e in store.feed(head)] == [1]


# -- the checkpoint statement -------------------------------------------------------------------


def _save(store: SqlEventStore, name: str, position: int, fence: Any = None) -> None:
    d = store.database.dialect
    with store.database.connection() as c:
        d.begin_write(c)
        try:
            d.save_checkpoint(c.cur, name, position, fence, datetime.now(UTC))
        except BaseException:
            d.rollback(c)
            raise
        d.commit(c)


def test_checkpoint_statement(store: SqlEventStore) -> None:
    """What a transaction saves (`Dialect.save_checkpoint` on its cursor): never backwards,
    fenced like an append; holder and generation of the fence recorded."""
    assert store.checkpoint("c") == 0
    _save(store, "c", 3)
    _save(store, "c", 3)
    with pytest.raises(SeqConflict):
        _save(store, "c", 2)
    registry = LeaseRegistry(store)
    lease = registry.acquire("subscription:c", "node-1", 30)
    _save(store, "c", 7, lease)
    registry.revoke("subscription:c")
    with pytest.raises(StaleLease):
        _save(store, "c", 8, lease)
    _save(store, "b", 0)
    assert store.checkpoints() == {"b": 0, "c": 7}
    with store.database.connection() as c:
        c.cur.execute("SELECT name, holder, generation FROM checkpoints ORDER BY name")
        assert [tuple(r) for r in c.cur.fetchall()] == [
            ("b", None, None),
            ("c", "node-1", lease.generation),
        ]


def test_new_database_has_no_unplaced_index_entries_on_sqlite(sqlite_url: str) -> None:
    with SqlEventStore(sqlite_url) as store:
        store.append("a", "t", {}, expected_seq=0)
        with store.database.connection() as c:
            c.cur.execute("SELECT sql FROM sqlite_master WHERE name = 'events_unplaced_idx'")
            assert c.cur.fetchone()[0].endswith("WHERE 0")
