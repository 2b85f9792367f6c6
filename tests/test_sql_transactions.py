"""`SqlEventStore.transaction()`: the transaction contract on a SQLite file and PostgreSQL, and
the writes joining a host application's transaction (its `Session` or `Connection`)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import copy_of, give_back, kept_template
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, scoped_session
from sqlalchemy.schema import CreateTable

from shard_sql import (
    AppendAuthority,
    InvalidEvent,
    LeaseHeld,
    LeaseRegistry,
    SchemaError,
    SeqConflict,
    SqlEventStore,
    StaleLease,
    migrate,
)
from shard_sql.ports import EventStore
from shard_sql.testing import (
    AdapterCase,
    AuthorityTransactionContract,
    TransactionContract,
)

# The host rolls back a transaction the store already rolled back (a failed write): SQLAlchemy
# says so.
pytestmark = pytest.mark.filterwarnings("ignore:.*already deassociated from connection")


class SqliteFile(AdapterCase):
    def make_store(self) -> EventStore:
        return SqlEventStore(f"sqlite:///{self.tmp_path}/shard.db")


class Postgres(AdapterCase):
    def make_store(self) -> EventStore:
        return SqlEventStore(self.request.getfixturevalue("pg_migrated_url"))


class TestSqliteTransactions(SqliteFile, TransactionContract):
    pass


class TestSqliteNodeTransactions(SqliteFile, AuthorityTransactionContract):
    pass


@pytest.mark.postgres
class TestPostgresTransactions(Postgres, TransactionContract):
    pass


@pytest.mark.postgres
class TestPostgresNodeTransactions(Postgres, AuthorityTransactionContract):
    pass


# -- a host application: its own table and engine, in the store's database ---------------------


class Base(DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "orders"
    id: Mapped[int] = mapped_column(primary_key=True)
    item: Mapped[str]


class Host:
    """The store and the application's engine on one database."""

    def __init__(self, url: str, other_url: Callable[[], str]) -> None:
        self.url, self._other_url = url, other_url
        self.store = SqlEventStore(url)
        self.engine = sa.create_engine(url)
        Base.metadata.create_all(self.engine)

    @property
    def other_url(self) -> str:
        """Another database (made when a test asks for it)."""
        return self._other_url()

    def orders(self) -> list[str]:
        with Session(self.engine) as s:
            return list(s.scalars(sa.select(Order.item).order_by(Order.id)))

    def close(self) -> None:
        self.store.close()
        self.engine.dispose()


def _make_host_template(url: str) -> None:
    migrate(url)
    engine = sa.create_engine(url)
    try:
        Base.metadata.create_all(engine)
    finally:
        engine.dispose()


def _host_ddl() -> str:
    dialect = postgresql.dialect()  # type: ignore[no-untyped-call]
    return ";".join(
        str(CreateTable(t).compile(dialect=dialect)) for t in Base.metadata.sorted_tables
    )


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def host(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[Host]:
    if request.param == "sqlite":
        h = Host(f"sqlite:///{tmp_path}/shared.db", lambda: f"sqlite:///{tmp_path}/other.db")
        SqlEventStore(h.other_url).close()  # another shard_sql database
        try:
            yield h
        finally:
            h.close()
        return
    # A copy of a template at the head schema with the host's tables, handed on (conftest).
    template = kept_template("host", _make_host_template, _host_ddl())
    url = copy_of(template)
    h = Host(url, lambda: str(request.getfixturevalue("pg_url")))
    try:
        yield h
    finally:
        h.close()
        give_back(template, url)


def test_session_rollback_leaves_neither_commit_leaves_both(host: Host) -> None:
    store = host.store
    with Session(host.engine) as session:
        session.add(Order(item="lost"))
        session.flush()
        with store.transaction(session) as tx:
            e = tx.append("orders", "order.placed", {"item": "lost"})
            assert tx.connection is session.connection()
        assert e.seq == 0
        session.rollback()
    assert host.orders() == []
    assert store.head("orders") == 0
    assert store.feed() == []

    start = time.monotonic()
    with Session(host.engine) as session, session.begin():
        session.add(Order(item="kept"))
        session.flush()  # SQLite: the session's connection holds the write lock from here
        with store.transaction(session) as tx:
            e = tx.append("orders", "order.placed", {"item": "kept"})
            more = tx.append_many("orders", [("order.paid", {}), ("order.sent", {}, "i1")])
        assert store.head("orders") == 0  # not committed yet
    assert time.monotonic() - start < 5  # never waited for the lock its own connection held
    assert host.orders() == ["kept"]
    assert store.events("orders") == [e, *more]
    assert [x.type for x in store.feed()] == ["order.placed", "order.paid", "order.sent"]


def test_connection_and_scoped_session_and_several_spaces(host: Host) -> None:
    store = host.store
    with host.engine.connect() as conn:
        with conn.begin():
            conn.execute(sa.insert(Order).values(item="a"))
            with store.transaction(conn) as tx:
                tx.append("s1", "t", {})
                tx.append("s2", "t", {})
                tx.append_many("s1", [("t", {}), ("t", {})], expected_seq=1)
                tx.save_checkpoint("c", 7)
        assert (store.head("s1"), store.head("s2"), store.checkpoint("c")) == (3, 1, 7)
        with conn.begin():
            with store.transaction(conn) as tx:
                tx.append("s1", "t", {})
                tx.append("s3", "t", {})
                tx.save_checkpoint("c", 8)
            conn.rollback()
    assert (store.head("s1"), store.head("s3"), store.checkpoint("c")) == (3, 0, 7)
    factory = scoped_session(sa.orm.sessionmaker(host.engine))
    try:
        with factory.begin():
            factory.add(Order(item="b"))
            factory.flush()
            with store.transaction(factory) as tx:
                tx.append("s3", "t", {})
    finally:
        factory.remove()
    assert host.orders() == ["a", "b"]
    assert store.head("s3") == 1


def test_a_failed_write_rolls_the_host_transaction_back(host: Host) -> None:
    store = host.store
    store.append("a", "t", {}, expected_seq=0)
    with Session(host.engine) as session:
        session.begin()
        session.add(Order(item="doomed"))
        session.flush()
        with pytest.raises(SeqConflict), store.transaction(session) as tx:
            tx.append("b", "t", {})
            with pytest.raises(SeqConflict):
                tx.append("a", "t", {}, expected_seq=0)  # caught: the block still fails
        with pytest.raises(sa.exc.InvalidRequestError):
            session.commit()  # the transaction it joined is gone
        session.rollback()
    assert host.orders() == []
    assert store.head("b") == 0


def test_a_savepoint_keeps_the_outer_transaction(host: Host) -> None:
    store = host.store
    with Session(host.engine) as session, session.begin():
        session.add(Order(item="outer"))
        session.flush()
        with (
            pytest.raises(SeqConflict),
            session.begin_nested(),
            store.transaction(session) as tx,
        ):
            tx.append("a", "t", {})
            tx.append("a", "t", {}, expected_seq=5)
        with store.transaction(session) as tx:
            tx.append("b", "t", {})
    assert host.orders() == ["outer"]
    assert (store.head("a"), store.head("b")) == (0, 1)


def test_a_regranted_lease_fences_the_host_transaction(host: Host) -> None:
    store = host.store
    registry = LeaseRegistry(store)
    lease = registry.acquire("a", "me", 30)
    with Session(host.engine) as session:
        session.begin()
        session.add(Order(item="fenced"))
        session.flush()
        with store.transaction(session) as tx:
            tx.append("a", "t", {}, fence=lease)
        session.commit()
        registry.revoke("a")
        registry.acquire("a", "other", 30)
        session.begin()
        session.add(Order(item="stale"))
        session.flush()
        with pytest.raises(StaleLease), store.transaction(session) as tx:
            tx.append("a", "t", {}, fence=lease)
        with pytest.raises(sa.exc.InvalidRequestError):
            session.commit()
        session.rollback()
    assert host.orders() == ["fenced"]
    assert [e.generation for e in store.events("a")] == [lease.generation]


def test_refused_connections_write_nothing(host: Host) -> None:
    store = host.store
    other = sa.create_engine(host.other_url)
    closed = Session(host.engine)
    closed.close()
    permanently = Session(host.engine, close_resets_only=False)
    permanently.close()
    try:
        with other.connect() as conn, conn.begin():
            with pytest.raises(InvalidEvent) as info, store.transaction(conn) as tx:
                tx.append("a", "t", {})
            assert info.value.field == "connection"
        with (
            host.engine.connect() as conn,
            pytest.raises(InvalidEvent, match="not in a transaction"),
        ):
            store.transaction(conn)
        conn.close()
        refused: list[Any] = [closed, permanently, conn, Session, "sqlite://", 5]
        for thing in refused:
            with pytest.raises(InvalidEvent) as info, store.transaction(thing) as tx:
                tx.append("a", "t", {})
            assert info.value.field == "connection"
    finally:
        other.dispose()
    assert store.feed() == []


def test_a_database_without_the_tables_is_a_schema_error(host: Host) -> None:
    store = host.store
    with host.engine.connect() as conn, conn.begin():
        conn.execute(sa.insert(Order).values(item="x"))  # SQLite: the DROP below in its BEGIN
        conn.exec_driver_sql("DROP TABLE events")
        with pytest.raises(SchemaError), store.transaction(conn) as tx:
            tx.append("a", "t", {})
        conn.rollback()
    assert store.head("a") == 0


def test_use_after_the_block(host: Host) -> None:
    store = host.store
    with Session(host.engine) as session, session.begin():
        with store.transaction(session) as tx:
            tx.append("a", "t", {})
        with pytest.raises(InvalidEvent):
            tx.append("a", "t", {})
        with pytest.raises(InvalidEvent):
            _ = tx.connection
    with store.transaction() as own:
        view = own.connection  # type: ignore[attr-defined]
        assert view.exec_driver_sql("SELECT count(*) FROM events").scalar() == 1
    with pytest.raises(sa.exc.ResourceClosedError):
        view.exec_driver_sql("SELECT 1")


def test_a_session_on_the_store_transaction_joins_it(host: Host) -> None:
    store = host.store
    for fail in (False, True):
        with pytest.raises(RuntimeError) if fail else _nothing(), store.transaction() as tx:
            session = Session(bind=tx.connection)  # type: ignore[attr-defined]
            session.add(Order(item=f"fail={fail}"))
            tx.append("a", "t", {"fail": fail})
            session.commit()  # joins: the block commits
            if fail:
                raise RuntimeError
    assert host.orders() == ["fail=False"]
    assert [e.payload for e in store.events("a")] == [{"fail": False}]


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def test_sqlite_same_thread_write_outside_the_block_fails_at_once(tmp_path: Any) -> None:
    for url in (f"sqlite:///{tmp_path}/s.db", "sqlite://"):
        with SqlEventStore(url) as store, store.transaction() as tx:
            tx.append("a", "t", {})
            start = time.monotonic()
            with pytest.raises(InvalidEvent) as info:
                store.append("a", "t", {}, expected_seq=0)
            assert info.value.field == "transaction"
            assert time.monotonic() - start < 2


@pytest.mark.postgres
def test_postgres_host_commit_wakes_the_feed_and_orders_a_regrant(pg_migrated_url: str) -> None:
    """The feed's waiters wake at the host's commit; a new grant of a space written under its
    fence in the host's transaction waits for that commit (the lease row's FOR SHARE)."""
    store = SqlEventStore(pg_migrated_url)
    engine = sa.create_engine(pg_migrated_url)
    registry = LeaseRegistry(store)
    lease = registry.acquire("a", "me", 30)
    woke = threading.Event()
    revoked = threading.Event()

    def wait() -> None:
        if store.wait_feed(0, timeout=20):
            woke.set()

    def revoke() -> None:
        registry.revoke("a")
        revoked.set()

    try:
        waiter = threading.Thread(target=wait)
        waiter.start()
        with engine.connect() as conn:
            conn.begin()
            with store.transaction(conn) as tx:
                e = tx.append("a", "t", {}, fence=lease)
            assert e.position is None  # placed after the commit
            revoker = threading.Thread(target=revoke)
            revoker.start()
            time.sleep(0.5)
            assert not revoked.is_set()  # waits for the host's commit
            assert not woke.is_set()
            conn.commit()
        revoker.join(10)
        waiter.join(10)
        assert revoked.is_set() and woke.is_set()
        assert [x.seq for x in store.feed()] == [0]
        with (
            engine.connect() as conn,
            conn.begin(),
            pytest.raises(StaleLease),
            store.transaction(conn) as tx,
        ):
            tx.append("a", "t", {}, fence=lease)
        with engine.connect() as conn:  # an engine in autocommit cannot join
            auto = conn.execution_options(isolation_level="AUTOCOMMIT")
            auto.begin()
            with pytest.raises(InvalidEvent, match="autocommit"):
                store.transaction(auto)
    finally:
        store.close()
        engine.dispose()


def test_sqlite_grants_a_lease_only_before_the_transaction_writes(tmp_path: Any) -> None:
    """SQLite has one writer: once the transaction wrote, a grant (a write on the store's own
    connection) would wait for it. The node says so at once; a space held already is fine."""
    with SqlEventStore(f"sqlite:///{tmp_path}/s.db") as store:
        node = AppendAuthority("node-a", store, LeaseRegistry(store))
        node.acquire("held")
        start = time.monotonic()
        with pytest.raises(InvalidEvent) as info, node.transaction() as tx:
            tx.append("held", "t", {})
            tx.append("fresh", "t", {})
        assert info.value.field == "space" and "node.acquire" in str(info.value)
        assert time.monotonic() - start < 2
        assert store.head("held") == 0
        node.acquire("fresh")
        with node.transaction() as tx:
            tx.append("held", "t", {})
            tx.append("fresh", "t", {})
        assert (store.head("held"), store.head("fresh")) == (1, 1)


def test_the_node_writes_the_spaces_it_holds_in_the_host_transaction(host: Host) -> None:
    store = host.store
    node = AppendAuthority("node-a", store, LeaseRegistry(store))
    other = AppendAuthority("node-b", store, node.registry)
    node.acquire("mine")
    other.acquire("theirs")
    with Session(host.engine) as session, session.begin():
        session.add(Order(item="placed"))
        session.flush()
        with node.transaction(session) as tx:
            e = tx.append("mine", "order.placed", {})
    assert (e.writer, host.orders()) == ("node-a", ["placed"])
    with Session(host.engine) as session:
        session.begin()
        session.add(Order(item="refused"))
        session.flush()
        start = time.monotonic()
        with pytest.raises(LeaseHeld, match="node-b"), node.transaction(session) as tx:
            tx.append("mine", "t", {})
            tx.append("theirs", "t", {})
        assert time.monotonic() - start < 5
        with pytest.raises(sa.exc.InvalidRequestError):
            session.commit()
        session.rollback()
    assert host.orders() == ["placed"]
    assert (store.head("mine"), store.head("theirs")) == (1, 0)


@pytest.mark.postgres
def test_postgres_crossed_writes_deadlock_into_a_seq_conflict(pg_migrated_url: str) -> None:
    """Two host transactions write the same two spaces in opposite orders: each waits for the
    other's new row; PostgreSQL breaks the deadlock, and the write it fails is a SeqConflict."""
    store = SqlEventStore(pg_migrated_url)
    engine = sa.create_engine(pg_migrated_url)
    outcome: dict[str, str] = {}

    def write(name: str, first: str, second: str, ready: threading.Barrier) -> None:
        with engine.connect() as conn:
            conn.begin()
            try:
                with store.transaction(conn) as tx:
                    tx.append(first, "t", {"by": name})
                    ready.wait(10)
                    tx.append(second, "t", {"by": name})
                conn.commit()
                outcome[name] = "committed"
            except SeqConflict:
                outcome[name] = "conflict"

    try:
        ready = threading.Barrier(2)
        threads = [
            threading.Thread(target=write, args=("t1", "a", "b", ready)),
            threading.Thread(target=write, args=("t2", "b", "a", ready)),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert sorted(outcome.values()) == ["committed", "conflict"]
        winner = next(n for n, o in outcome.items() if o == "committed")
        assert [e.payload["by"] for e in store.events("a") + store.events("b")] == [winner] * 2
    finally:
        store.close()
        engine.dispose()


@pytest.mark.postgres
def test_postgres_first_statement_begins_as_psycopg_would(pg_migrated_url: str) -> None:
    """The host's transaction's first statement (a prepared one, run through libpq) begins it
    with the connection's settings; a statement deallocated behind the store's back (psycopg's
    DEALLOCATE ALL after a rollback) is prepared again; a rollback leaves nothing."""
    store = SqlEventStore(pg_migrated_url)
    engine = sa.create_engine(pg_migrated_url)
    try:
        with engine.connect() as conn:
            serializable = conn.execution_options(isolation_level="SERIALIZABLE")
            serializable.begin()
            with store.transaction(serializable) as tx:
                assert tx.append("s", "t", {"n": 0}).seq == 0
            level = serializable.exec_driver_sql("SHOW transaction_isolation").scalar()
            assert level == "serializable"
            serializable.commit()
        with engine.connect() as conn:
            for n in (1, 2):
                conn.exec_driver_sql("DEALLOCATE ALL")
                conn.commit()
                conn.begin()
                with store.transaction(conn) as tx:
                    assert tx.append("s", "t", {"n": n}).seq == n
                conn.commit()
            conn.begin()
            with store.transaction(conn) as tx:
                tx.append("s", "t", {"n": 3})
            conn.rollback()
            conn.begin()
            conn.exec_driver_sql("SELECT 1")  # the server's transaction is open: cursor.execute
            with store.transaction(conn) as tx:
                assert tx.append("s", "t", {"n": 3}).seq == 3
            conn.commit()
        assert [e.payload["n"] for e in store.events("s")] == [0, 1, 2, 3]
    finally:
        store.close()
        engine.dispose()
