"""shard_sql in a PostgreSQL schema of its own (`schema=`), beside an application's own `events`
table in `public`: migrations, the store, a host's transaction, notifications, the command line;
the contract suites on a schema'd store. SQLite refuses `schema=`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from conftest import _libpq, _migrations_digest, drop_pg_database, new_pg_database, pg_admin_url
from sqlalchemy import create_engine, inspect, text

from shard_sql import InvalidEvent, SchemaError, migrate
from shard_sql.cli import main
from shard_sql.orm import SCHEMA_REVISION, TABLES
from shard_sql.sql import check_schema

pytestmark = pytest.mark.postgres

SCHEMA = "log"
HOST_EVENTS = "CREATE TABLE public.events (id serial PRIMARY KEY, what text NOT NULL)"

_template: str | None = None


def schema_template() -> str:
    """A database with the host's own `public.events` (one row) and shard_sql at head in `log`:
    made once per run of the migrations, copied by every test."""
    global _template
    if _template is None:
        name = f"shard_test_schema_{_migrations_digest()}"
        with psycopg.connect(_libpq(pg_admin_url()), autocommit=True) as conn:
            found = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            exists = found.fetchone() is not None
        if not exists:
            scratch = new_pg_database()
            execute(scratch, HOST_EVENTS, "INSERT INTO public.events (what) VALUES ('mine')")
            migrate(scratch, schema=SCHEMA)
            with psycopg.connect(_libpq(pg_admin_url()), autocommit=True) as conn:
                try:
                    conn.execute(
                        f'ALTER DATABASE "{scratch.rpartition("/")[2]}" RENAME TO "{name}"'
                    )
                except psycopg.errors.DuplicateDatabase:
                    drop_pg_database(scratch)
        _template = name
    return _template


@pytest.fixture
def shared_url() -> Iterator[str]:
    """A database shared with a host: its `public.events`, shard_sql in schema `log`."""
    url = new_pg_database(schema_template())
    try:
        yield url
    finally:
        drop_pg_database(url)


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
