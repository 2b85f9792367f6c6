"""The store's connections: a cap on what it opens (`pool_size` + `max_overflow`, counted by the
server), callers queuing for a free one with a timeout, and a host's `Engine` whose pool the
store leaves free between calls."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from sqlalchemy import create_engine, text

from shard_sql import InvalidEvent, SqlEventStore, StoreUnavailable


def libpq(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


class ConnectionCounter(threading.Thread):
    """The most client connections the server saw on a database, sampled every millisecond
    from another database (so the counter itself is not counted)."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        base, _, self.database = url.rpartition("/")
        self.admin = libpq(base + "/postgres")
        self.most = 0
        self.stopping = threading.Event()

    def run(self) -> None:
        with psycopg.connect(self.admin, autocommit=True) as conn:
            while not self.stopping.is_set():
                row = conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = %s "
                    "AND backend_type = 'client backend'",
                    (self.database,),
                ).fetchone()
                assert row is not None
                self.most = max(self.most, int(row[0]))
                time.sleep(0.001)

    def __enter__(self) -> ConnectionCounter:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.join(10)


def run_threads(n: int, work: Any) -> list[BaseException]:
    errors: list[BaseException] = []
    barrier = threading.Barrier(n)

    def run(k: int) -> None:
        try:
            barrier.wait()
            work(k)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return errors


@pytest.mark.postgres
def test_thirty_threads_open_at_most_the_cap(pg_migrated_url: str) -> None:
    with (
        SqlEventStore(pg_migrated_url, pool_size=3, max_overflow=2) as store,
        ConnectionCounter(pg_migrated_url) as counter,
    ):

        def work(k: int) -> None:
            for i in range(20):
                store.append(f"s{k}", "t", {"i": i}, expected_seq=i)
                assert store.head(f"s{k}") == i + 1

        assert run_threads(30, work) == []
        assert sorted(store.spaces()) == sorted(f"s{k}" for k in range(30))
    # The cap is 3 + 2 for calls; the store's feed notifier has its own connection once the
    # store has committed (docs/dba.md, "Connections"). No thread waited: no listener.
    assert 1 <= counter.most <= 5 + 1, f"{counter.most} connections for a cap of 3 + 2 (+ 1)"


@pytest.mark.postgres
def test_a_caller_waits_for_a_free_connection_then_gives_up(pg_migrated_url: str) -> None:
    with SqlEventStore(pg_migrated_url, pool_size=1, max_overflow=0, pool_timeout=0.5) as store:
        store.append("s", "t", {}, expected_seq=0)
        with store.database.connection():  # the only connection, busy elsewhere
            started = time.monotonic()
            with pytest.raises(StoreUnavailable) as info:
                store.head("s")
            assert 0.4 <= time.monotonic() - started < 5
            assert "connection" in str(info.value) and "pool_size" in str(info.value)
        assert store.head("s") == 1  # free again


@pytest.mark.postgres
def test_a_waiting_caller_gets_the_connection_given_back(pg_migrated_url: str) -> None:
    with SqlEventStore(pg_migrated_url, pool_size=1, max_overflow=0, pool_timeout=10) as store:
        store.append("s", "t", {}, expected_seq=0)
        got: list[object] = []
        with store.database.connection():
            waiter = threading.Thread(target=lambda: got.append(store.head("s")))
            waiter.start()
            time.sleep(0.2)
            assert got == []  # waiting in the pool
        waiter.join(10)  # given back: the waiter has it at once, not after pool_timeout
        assert got == [1]


@pytest.fixture
def host_engine(pg_migrated_url: str) -> Iterator[Any]:
    engine = create_engine(pg_migrated_url, pool_size=2, max_overflow=0, pool_timeout=2)
    yield engine
    engine.dispose()


@pytest.mark.postgres
def test_a_host_engine_keeps_its_connections(host_engine: Any) -> None:
    """A host's engine with pool_size=2: between the store's calls both connections are free
    for the host (the store used to keep one: "QueuePool limit reached" until close())."""
    with SqlEventStore(host_engine) as store:
        store.append("s", "t", {}, expected_seq=0)
        assert store.head("s") == 1
        with host_engine.connect() as a, host_engine.connect() as b:
            assert a.execute(text("SELECT count(*) FROM events")).scalar() == 1
            assert b.execute(text("SELECT 1")).scalar() == 1
            # A host transaction is a transaction: the store left autocommit off.
            a.execute(text("CREATE TABLE host_t (x int)"))
            a.rollback()
            assert a.execute(text("SELECT to_regclass('host_t')")).scalar() is None
        # Many threads on the store beside the host: they share the host's two connections.
        errors = run_threads(8, lambda k: [store.append(f"h{k}", "t", {}, expected_seq=i)
                                          for i in range(10)])  # fmt: skip
        assert errors == []
        assert host_engine.pool.checkedout() == 0
    assert host_engine.pool.checkedout() == 0


def test_pool_options_are_checked(tmp_path: Any) -> None:
    url = f"sqlite:///{tmp_path}/p.db"
    for bad in (
        {"pool_size": 0},
        {"pool_size": 2.5},
        {"pool_size": True},
        {"max_overflow": -1},
        {"pool_timeout": -1},
        {"pool_timeout": float("nan")},
        {"pool_timeout": "1"},
    ):
        with pytest.raises(InvalidEvent):
            SqlEventStore(url, **bad)
