"""shard_sql in a PostgreSQL schema of its own (`schema=`), beside an application's own `events`
table in `public`: migrations, the store, a host's transaction, notifications, the command line;
the contract suites on a schema'd store. SQLite refuses `schema=`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from conftest import _libpq, copy_of, give_back, kept_template
from sqlalchemy import create_engine, inspect, select, text
from sqlalchemy.orm import Session

from shard_sql import (
    AppendAuthority,
    InvalidEvent,
    LeaseRegistry,
    SchemaError,
    SqlEventStore,
    migrate,
)
from shard_sql.cli import main
from shard_sql.orm import SCHEMA_REVISION, TABLES, EventRecord
from shard_sql.ports import EventStore
from shard_sql.sql import check_schema
from shard_sql.testing import (
    AdapterCase,
    AuthorityContract,
    AuthorityTransactionContract,
    FeedContract,
    ForwardingContract,
    IntentQueueContract,
    LeaseRulesContract,
    ProcessForwardingContract,
    StoreContract,
    SubscriptionContract,
    TransactionContract,
)

pytestmark = pytest.mark.postgres

SCHEMA = "log"
HOST_EVENTS = "CREATE TABLE public.events (id serial PRIMARY KEY, what text NOT NULL)"
HOST_ROW = "INSERT INTO public.events (what) VALUES ('mine')"


def _make_schema_template(url: str) -> None:
    execute(url, HOST_EVENTS, HOST_ROW)
    migrate(url, schema=SCHEMA)


def schema_template() -> str:
    """A database with the host's own `public.events` (one row) and shard_sql at head in `log`,
    kept for later runs (conftest's `kept_template`); tests get copies of it (`copy_of`)."""
    return kept_template("schema", _make_schema_template, f"{HOST_EVENTS} {HOST_ROW} {SCHEMA}")


@pytest.fixture
def shared_url() -> Iterator[str]:
    """A database shared with a host: its `public.events`, shard_sql in schema `log`."""
    template = schema_template()
    url = copy_of(template)
    try:
        yield url
    finally:
        give_back(template, url, HOST_ROW)


def execute(url: str, *statements: str) -> None:
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            for sql in statements:
                conn.execute(text(sql))
    finally:
        engine.dispose()


def rows(url: str, sql: str) -> list[tuple[object, ...]]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(text(sql))]
    finally:
        engine.dispose()


def test_migrate_puts_everything_in_the_schema(pg_url: str) -> None:
    execute(pg_url, HOST_EVENTS)
    with pytest.raises(SchemaError, match=r"schema=\.\.\."):
        migrate(pg_url)  # the host's events table: not shard_sql's
    assert migrate(pg_url, schema=SCHEMA) == SCHEMA_REVISION
    assert migrate(f"{pg_url}?shard_sql_schema={SCHEMA}") == SCHEMA_REVISION  # again: nothing
    engine = create_engine(pg_url)
    try:
        insp = inspect(engine)
        assert set(insp.get_table_names(schema=SCHEMA)) == TABLES
        assert insp.get_table_names() == ["events"]  # public: the host's only
    finally:
        engine.dispose()
    functions = rows(
        pg_url,
        "SELECT proname, pronamespace::regnamespace::text, proconfig FROM pg_proc "
        "WHERE proname LIKE 'shard_sql%' ORDER BY proname",
    )
    assert functions == [
        ("shard_sql_append_placed", SCHEMA, [f"search_path={SCHEMA}, pg_temp"]),
        ("shard_sql_notify_applied", SCHEMA, [f"search_path={SCHEMA}, pg_temp"]),
        ("shard_sql_place_feed", SCHEMA, [f"search_path={SCHEMA}, pg_temp"]),
    ]
    triggers = rows(pg_url, "SELECT tgrelid::regclass::text FROM pg_trigger WHERE NOT tgisinternal")
    assert triggers == [(f"{SCHEMA}.events",)]
    assert check_schema(pg_url, schema=SCHEMA) == SCHEMA_REVISION
    with pytest.raises(SchemaError, match="tables named events but no shard_sql_version"):
        check_schema(pg_url)


def test_a_missing_schema_is_not_created_by_a_check(pg_url: str) -> None:
    with pytest.raises(SchemaError, match="has no shard_sql schema"):
        check_schema(pg_url, schema="nowhere")
    assert rows(pg_url, "SELECT 1 FROM pg_namespace WHERE nspname = 'nowhere'") == []


def test_schema_names_are_checked(pg_url: str, sqlite_url: str) -> None:
    for bad in ("Log", "a-b", "pg_log", "information_schema", "", "x" * 41, 3):
        with pytest.raises(InvalidEvent, match="schema"):
            migrate(pg_url, schema=bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidEvent, match="differs from the URL"):
        migrate(f"{pg_url}?shard_sql_schema=a", schema="b")
    with pytest.raises(InvalidEvent, match="SQLite has no schemas: keep shard_sql's log in a"):
        migrate(sqlite_url, schema=SCHEMA)
    with pytest.raises(InvalidEvent, match="SQLite has no schemas"):
        migrate(f"{sqlite_url}?shard_sql_schema={SCHEMA}")
    with pytest.raises(InvalidEvent, match="SQLite has no schemas"):
        SqlEventStore(sqlite_url, schema=SCHEMA)
    with pytest.raises(InvalidEvent, match="schema"):
        SqlEventStore(pg_url, schema="Bad Name")
    assert not Path(sqlite_url.removeprefix("sqlite:///")).exists()


def test_the_command_line_takes_schema(
    shared_url: str, pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--schema", SCHEMA, "migrate", "--check", "--url", shared_url]) == 0
    out = capsys.readouterr().out
    assert out == f"{shared_url}?shard_sql_schema={SCHEMA}: at {SCHEMA_REVISION} (head)\n"
    assert main(["migrate", "--url", pg_url, "--schema", "other"]) == 0
    assert "migrated from none" in capsys.readouterr().out
    assert check_schema(pg_url, schema="other") == SCHEMA_REVISION
    assert main(["migrate", "--check", "--url", shared_url]) == 1
    assert "tables named events but no shard_sql_version" in capsys.readouterr().err


def test_the_hosts_autogenerate_leaves_the_schema_alone(shared_url: str) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    from sqlalchemy import Column, Integer, MetaData, Table, Text

    from shard_sql.orm import include_object

    host = MetaData()
    Table(
        "events",
        host,
        Column("id", Integer, primary_key=True),
        Column("what", Text, nullable=False),
    )
    engine = create_engine(shared_url)
    try:
        with engine.connect() as conn:
            for every_schema in (False, True):
                context = MigrationContext.configure(
                    conn,
                    opts={
                        "target_metadata": host,
                        "include_object": include_object,
                        "include_schemas": every_schema,
                    },
                )
                assert compare_metadata(context, host) == [], every_schema
    finally:
        engine.dispose()


def host_rows(url: str) -> list[tuple[object, ...]]:
    return rows(url, "SELECT what FROM public.events ORDER BY id")


def test_the_store_beside_the_hosts_events(shared_url: str) -> None:
    with SqlEventStore(shared_url, schema=SCHEMA) as store:
        assert repr(store).endswith(f"?shard_sql_schema={SCHEMA}')")
        store.append("orders/1", "order.placed", {"n": 1}, expected_seq=0)
        store.append_many("orders/2", [("order.placed", {}), ("order.paid", {})], expected_seq=0)
        assert store.spaces() == ["orders/1", "orders/2"]
        assert [e.position for e in store.feed()] == [1, 2, 3]
        with store.transaction() as tx:
            tx.append("orders/1", "order.paid", {})
            tx.save_checkpoint("mailer", 3)
        assert store.checkpoint("mailer") == 3 and store.feed_head() == 4
    assert host_rows(shared_url) == [("mine",)]
    assert rows(shared_url, f"SELECT count(*) FROM {SCHEMA}.events") == [(4,)]
    with SqlEventStore(f"{shared_url}?shard_sql_schema={SCHEMA}") as same:
        assert same.head("orders/2") == 2
    with pytest.raises(SchemaError, match="tables named events but no shard_sql_version"):
        SqlEventStore(shared_url)  # public holds the host's events only
    with pytest.raises(SchemaError, match="has no shard_sql schema"):
        SqlEventStore(shared_url, schema="elsewhere")


def test_the_hosts_transaction_with_its_own_search_path(shared_url: str) -> None:
    """The host's connection finds its own `events` first: shard_sql's statements, trigger and
    fence checks name theirs."""
    host = create_engine(shared_url)
    store = SqlEventStore(host, schema=SCHEMA)
    node = AppendAuthority("web-1", store, LeaseRegistry(store))
    try:
        node.acquire("orders/1")
        with Session(host) as session, session.begin():
            session.execute(text("INSERT INTO events (what) VALUES ('placed 1')"))
            with store.transaction(session) as tx:
                tx.append("orders/1", "order.placed", {}, intent_id="req-1")
            with node.transaction(session) as tx:
                tx.append("orders/1", "order.paid", {})
        with pytest.raises(RuntimeError), Session(host) as session, session.begin():
            session.execute(text("INSERT INTO events (what) VALUES ('placed 2')"))
            with store.transaction(session) as tx:
                tx.append("orders/2", "order.placed", {})
            raise RuntimeError
        assert host_rows(shared_url) == [("mine",), ("placed 1",)]
        assert [(e.space, e.type) for e in store.feed()] == [
            ("orders/1", "order.placed"),
            ("orders/1", "order.paid"),
        ]
        # The host reads them with its Session through shard_sql.orm.
        with Session(host) as session:
            found = session.scalars(
                select(EventRecord.type).order_by(EventRecord.seq),
                execution_options={"schema_translate_map": {None: SCHEMA}},
            )
            assert list(found) == ["order.placed", "order.paid"]
    finally:
        node.release("orders/1")
        store.close()
        host.dispose()


def test_each_schema_notifies_its_own_channels(pg_url: str) -> None:
    migrate(pg_url, schema="a")
    migrate(pg_url, schema="b")
    with psycopg.connect(_libpq(pg_url), autocommit=True) as listen:
        for channel in ("shard_sql_feed", "shard_sql_a_feed", "shard_sql_b_feed"):
            listen.execute(f"LISTEN {channel}")
        with SqlEventStore(pg_url, schema="a") as a, SqlEventStore(pg_url, schema="b") as b:
            channels_a, channels_b = a.database.dialect.channels, b.database.dialect.channels
            assert channels_a.intents("s") != channels_b.intents("s")
            assert (channels_a.main, channels_b.main) == ("shard_sql_a", "shard_sql_b")
            host = create_engine(pg_url)
            try:
                with host.begin() as conn, a.transaction(conn) as tx:
                    tx.append("s", "t", {})  # notifies at the host's commit
            finally:
                host.dispose()
            b.append("s", "t", {}, expected_seq=0)  # the store's notifier
            assert a.wait_feed(0, timeout=5) and b.wait_feed(0, timeout=5)
        heard = {n.channel for n in listen.notifies(timeout=1.0, stop_after=10)}
    assert heard == {"shard_sql_a_feed", "shard_sql_b_feed"}


# -- the contracts on a store in schema `log`, beside the host's `events` ----------------------


class InSchema(AdapterCase):
    """A store in schema `log` of a database whose `public.events` is the host's."""

    def make_store(self) -> EventStore:
        return SqlEventStore(self.store_url())

    def store_url(self) -> str:
        if not hasattr(self, "_pg"):
            self._pg: str = self.request.getfixturevalue("shared_url")
        return f"{self._pg}?shard_sql_schema={SCHEMA}"

    def check_after(self, *, holder_killed: bool) -> None:
        assert host_rows(self._pg) == [("mine",)]
        if not holder_killed:
            assert rows(self._pg, f"SELECT count(*) FROM {SCHEMA}.intents") == [(0,)]


class TestSchemaStore(InSchema, StoreContract):
    pass


class TestSchemaAuthority(InSchema, AuthorityContract):
    pass


class TestSchemaLeaseRules(InSchema, LeaseRulesContract):
    pass


class TestSchemaIntentQueue(InSchema, IntentQueueContract):
    pass


class TestSchemaForwarding(InSchema, ForwardingContract):
    pass


class TestSchemaProcesses(InSchema, ProcessForwardingContract):
    pass


class TestSchemaFeed(InSchema, FeedContract):
    pass


class TestSchemaSubscription(InSchema, SubscriptionContract):
    pass


class TestSchemaTransactions(InSchema, TransactionContract):
    pass


class TestSchemaNodeTransactions(InSchema, AuthorityTransactionContract):
    pass
