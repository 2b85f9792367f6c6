"""Bad input to the SQL adapter: each a typed error with a clear message, and nothing written.

Wrong credentials: the test server trusts every local login (any password is accepted), so a
wrong password cannot be produced here; a role and a database that do not exist stand in for it
(the server refuses the login the same way, before any statement runs).
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from alembic import command

from shard_sql import (
    InvalidEvent,
    LeaseRegistry,
    SchemaError,
    ShardSqlError,
    SqlEventStore,
    StoreUnavailable,
    migrate,
)
from shard_sql.orm import SCHEMA_REVISION, VERSION_TABLE
from shard_sql.sql import alembic_config, migration_connection


def assert_from_driver(err: ShardSqlError) -> None:
    """Ours, raised from the driver's error (`raise ... from e`)."""
    assert err.__cause__ is not None
    assert not isinstance(err.__cause__, ShardSqlError)


def pg_url_for(
    *,
    user: str = "postgres",
    password: str | None = None,
    port: int = 5432,
    database: str = "postgres",
) -> str:
    auth = user if password is None else f"{user}:{password}"
    return f"postgresql+psycopg://{auth}@127.0.0.1:{port}/{database}"


# -- unreachable, wrong login --------------------------------------------------------------


def test_unreachable_server() -> None:
    url = pg_url_for(password="s3cret-pw", port=1)
    for attempt in (lambda: SqlEventStore(url), lambda: migrate(url)):
        with pytest.raises(StoreUnavailable) as info:
            attempt()
        message = str(info.value)
        assert "127.0.0.1:1" in message and "refused" in message
        assert "s3cret-pw" not in message
        assert_from_driver(info.value)


@pytest.mark.postgres
def test_unknown_role(pg_url: str) -> None:
    url = pg_url.replace("postgres@", "no_such_role:s3cret-pw@", 1)
    with pytest.raises(StoreUnavailable) as info:
        SqlEventStore(url, migrate=True)
    message = str(info.value)
    assert "no_such_role" in message and "does not exist" in message
    assert "s3cret-pw" not in message
    assert_from_driver(info.value)


@pytest.mark.postgres
def test_unknown_database(pg_url: str) -> None:
    url = pg_url.rpartition("/")[0] + "/no_such_database_xyz"
    with pytest.raises(StoreUnavailable) as info:
        SqlEventStore(url, migrate=True)
    assert "no_such_database_xyz" in str(info.value) and "does not exist" in str(info.value)


@pytest.mark.parametrize(
    "url",
    ["", "not a url", "mysql://u@h/db", "postgresql+psycopg2://u@h/db", "oracle://x"],
)
def test_bad_urls(url: str) -> None:
    with pytest.raises(InvalidEvent) as info:
        SqlEventStore(url)
    assert info.value.field == "url"


def test_bad_options(tmp_path: Path) -> None:
    with pytest.raises(InvalidEvent):
        SqlEventStore(f"sqlite:///{tmp_path}/x.db", sqlite_synchronous="OFF")
    with pytest.raises(InvalidEvent):
        SqlEventStore(f"sqlite:///{tmp_path}/x.db?synchronous=bogus")
    with pytest.raises(InvalidEvent):
        SqlEventStore(f"sqlite:///{tmp_path}/x.db", busy_timeout=-1)
    with pytest.raises(InvalidEvent):
        SqlEventStore(42)  # type: ignore[arg-type]
    assert not (tmp_path / "x.db").exists()


# -- schema ---------------------------------------------------------------------------------


@pytest.mark.postgres
def test_unmigrated_postgres(pg_url: str) -> None:
    with pytest.raises(SchemaError) as info:
        SqlEventStore(pg_url)
    message = str(info.value)
    assert "shard-sql migrate --url" in message and "migrate=True" in message
    assert "127.0.0.1" in message


def downgrade_one(url: str) -> None:
    with migration_connection(url) as conn:
        command.downgrade(alembic_config(conn), "-1")


@pytest.mark.postgres
def test_older_schema_on_postgres(pg_migrated_url: str) -> None:
    downgrade_one(pg_migrated_url)
    with pytest.raises(SchemaError) as info:
        SqlEventStore(pg_migrated_url)
    assert "shard-sql migrate --url" in str(info.value)
    with SqlEventStore(pg_migrated_url, migrate=True) as store:  # the named fix works
        assert store.head("s") == 0


def test_older_schema_on_sqlite_is_upgraded_on_open(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/old.db"
    migrate(url)
    downgrade_one(url)
    with SqlEventStore(url) as store:
        store.append("s", "t", {}, expected_seq=0)


def set_revision(url: str, revision: str) -> None:
    with migration_connection(url) as conn:
        conn.exec_driver_sql(f"UPDATE {VERSION_TABLE} SET version_num = '{revision}'")


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/m.db"
    url: str = request.getfixturevalue("pg_migrated_url")
    return url


def test_newer_schema_is_refused(db_url: str) -> None:
    migrate(db_url)
    with SqlEventStore(db_url) as store:
        store.append("s", "t", {}, expected_seq=0)
    set_revision(db_url, "9999_from_the_future")
    for attempt in (lambda: SqlEventStore(db_url), lambda: SqlEventStore(db_url, migrate=True)):
        with pytest.raises(SchemaError) as info:
            attempt()
        assert "9999_from_the_future" in str(info.value)
        assert "upgrade shard_sql" in str(info.value)
    with pytest.raises(SchemaError):
        migrate(db_url)
    set_revision(db_url, SCHEMA_REVISION)
    with SqlEventStore(db_url) as store:
        assert store.head("s") == 1


def test_tables_dropped_behind_the_stores_back(db_url: str) -> None:
    with SqlEventStore(db_url, migrate=True) as store:
        store.append("s", "t", {}, expected_seq=0)
        with migration_connection(db_url) as conn:
            conn.exec_driver_sql("DROP TABLE events")
        with pytest.raises(SchemaError) as info:
            store.append("s", "t", {}, expected_seq=1)
        assert "shard-sql migrate" in str(info.value)
        with pytest.raises(SchemaError):
            store.events("s")
        assert_from_driver(info.value)


def test_not_a_sqlite_file(tmp_path: Path) -> None:
    path = tmp_path / "text.db"
    path.write_text("this is not a database, just text " * 100)
    with pytest.raises(SchemaError) as info:
        SqlEventStore(f"sqlite:///{path}")
    assert "not a valid SQLite database" in str(info.value)
    assert path.read_text().startswith("this is not a database")


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(StoreUnavailable) as info:
        SqlEventStore(f"sqlite:///{tmp_path}/no/such/dir/x.db")
    assert "cannot open SQLite file" in str(info.value)
    assert not (tmp_path / "no").exists()


# -- read-only SQLite -------------------------------------------------------------------------


@pytest.fixture
def populated(tmp_path: Path) -> Path:
    path = tmp_path / "ro.db"
    with SqlEventStore(f"sqlite:///{path}") as store:
        store.append("s", "t", {"n": 0}, expected_seq=0)
    return path


def head_of(path: Path) -> int:
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute("SELECT count(*) FROM events").fetchone()[0])
    finally:
        conn.close()


def check_read_only(store: SqlEventStore, path: Path) -> None:
    assert [e.payload for e in store.events("s")] == [{"n": 0}]
    with pytest.raises(StoreUnavailable) as info:
        store.append("s", "t", {"n": 1}, expected_seq=1)
    assert "read-only" in str(info.value) and str(path) in str(info.value)
    assert_from_driver(info.value)
    with pytest.raises(StoreUnavailable):
        store.append_many("s", [("t", {})] * 3, expected_seq=1)
    with pytest.raises(StoreUnavailable):
        LeaseRegistry(store).acquire("s", "node", 10)
    assert head_of(path) == 1


def test_read_only_connection(populated: Path) -> None:
    with SqlEventStore(f"sqlite:///file:{populated}?mode=ro&uri=true") as store:
        check_read_only(store, populated)


@pytest.fixture
def read_only_file(populated: Path) -> Iterator[Path]:
    """The database file made read-only for real: chmod, or (as root, who ignores permission
    bits) the immutable attribute."""
    if os.geteuid() != 0:
        populated.chmod(0o444)
        try:
            yield populated
        finally:
            populated.chmod(0o644)
        return
    proc = subprocess.run(["chattr", "+i", str(populated)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"running as root and chattr +i is refused: {proc.stderr.strip()}")
    try:
        yield populated
    finally:
        subprocess.run(["chattr", "-i", str(populated)], check=True)


def test_read_only_file(read_only_file: Path) -> None:
    with SqlEventStore(f"sqlite:///{read_only_file}") as store:
        check_read_only(store, read_only_file)


# -- locks, lost connections, closed stores ----------------------------------------------------


def test_sqlite_lock_held_too_long(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/busy.db"
    with SqlEventStore(url, busy_timeout=0.3) as store:
        store.append("s", "t", {}, expected_seq=0)
        other = sqlite3.connect(tmp_path / "busy.db", isolation_level=None, check_same_thread=False)
        other.execute("BEGIN IMMEDIATE")
        started = time.monotonic()
        with pytest.raises(StoreUnavailable) as info:
            store.append("s", "t", {}, expected_seq=1)
        assert time.monotonic() - started >= 0.3
        assert "locked" in str(info.value) and "0.3s" in str(info.value)
        # A batch (BEGIN IMMEDIATE, retried inside the store's call) waits one busy_timeout in
        # all, not one per layer of retries.
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            store.append_many("s", [("t", {})], expected_seq=1)
        assert 0.3 <= time.monotonic() - started < 0.55
        # A lock released in time: the append waits for it and goes through.
        threading.Timer(0.1, other.rollback).start()
        assert store.append("s", "t", {}, expected_seq=1).seq == 1
        other.close()
        assert store.head("s") == 2


def terminate_backends(url: str) -> int:
    """Kill every server process serving the database `url` names (from the admin database)."""
    base, _, name = url.rpartition("/")
    admin = base.replace("postgresql+psycopg://", "postgresql://", 1) + "/postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            (name,),
        ).fetchall()
    return len(rows)


@pytest.mark.postgres
def test_connection_lost(pg_migrated_url: str) -> None:
    pg_url = pg_migrated_url
    with SqlEventStore(pg_url) as store:
        store.append("s", "t", {}, expected_seq=0)
        assert terminate_backends(pg_url) >= 1
        # A read is repeated on a new connection.
        assert store.head("s") == 1
        terminate_backends(pg_url)
        # A write without an intent id has an unknown outcome on a lost connection: it says so.
        with pytest.raises(StoreUnavailable) as info:
            store.append("s", "t", {}, expected_seq=1)
        assert "retry it with the same intent_id" in str(info.value)
        assert_from_driver(info.value)
        assert store.head("s") == 1  # the store reconnects
        terminate_backends(pg_url)
        # With an intent id the store repeats it safely itself.
        e = store.append("s", "t", {}, expected_seq=1, intent_id="k")
        assert e.seq == 1 and store.head("s") == 2


def test_closed_store(tmp_path: Path) -> None:
    store = SqlEventStore(f"sqlite:///{tmp_path}/c.db")
    store.close()
    store.close()
    with pytest.raises(StoreUnavailable):
        store.head("s")


# -- secrets in URLs ---------------------------------------------------------------------------

SECRETS = ("pw-in-userinfo", "pw-in-query", "sslpw-in-query")


def with_secrets(url: str) -> str:
    """`url` with a password in its userinfo and two in its query (the test server trusts every
    local login: any password is accepted; libpq takes the query's `password` over the other)."""
    return (
        url.replace("postgres@", "postgres:pw-in-userinfo@", 1)
        + "?password=pw-in-query&sslpassword=sslpw-in-query"
    )


def assert_no_secret(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text, text


@pytest.mark.postgres
def test_url_secrets_are_masked_everywhere(pg_url: str) -> None:
    url = with_secrets(pg_url)
    with pytest.raises(SchemaError) as info:  # not migrated: the hint names the command
        SqlEventStore(url)
    assert "shard-sql migrate --url" in str(info.value)
    assert "password=***" in str(info.value)
    assert_no_secret(str(info.value))
    cli = subprocess.run(
        [sys.executable, "-m", "shard_sql", "--url", url, "migrate"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert cli.returncode == 0, cli.stderr
    assert_no_secret(cli.stdout + cli.stderr)
    with SqlEventStore(url) as store:
        assert_no_secret(repr(store) + store.where)
        assert "***" in repr(store)
    downgrade_one(url)
    with pytest.raises(SchemaError) as info:  # an older schema: the hint again
        SqlEventStore(url)
    assert_no_secret(str(info.value))


def test_masked_keeps_what_is_not_secret() -> None:
    from shard_sql.sql import masked

    assert masked("postgresql://u:p@ss@h:5/db?sslmode=require&PassWord=x&token_x=y#f") == (
        "postgresql://u:***@h:5/db?sslmode=require&PassWord=***&token_x=***#f"
    )
    assert masked("postgresql://u@h/db?application_name=a") == (
        "postgresql://u@h/db?application_name=a"
    )
    assert masked("sqlite:////srv/a@b.db?synchronous=NORMAL") == (
        "sqlite:////srv/a@b.db?synchronous=NORMAL"
    )
    assert masked("postgresql://u:pw@h:notaport/db") == "postgresql://u:***@h:notaport/db"


# -- foreign or damaged schemas ---------------------------------------------------------------


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/foreign.db"
    url: str = request.getfixturevalue("pg_url")
    return url


def execute(url: str, *statements: str) -> None:
    with migration_connection(url) as conn:
        for statement in statements:
            conn.exec_driver_sql(statement)


def refused(url: str) -> list[str]:
    """The messages of every way in: each must be a SchemaError."""
    messages = []
    for attempt in (
        lambda: SqlEventStore(url),
        lambda: SqlEventStore(url, migrate=True),
        lambda: migrate(url),
    ):
        with pytest.raises(SchemaError) as info:
            attempt()
        messages.append(str(info.value))
    return messages


def test_another_applications_events_table(empty_url: str) -> None:
    execute(
        empty_url,
        "CREATE TABLE events (id integer PRIMARY KEY, body text)",
        "INSERT INTO events VALUES (1, 'theirs')",
    )
    for message in refused(empty_url):
        assert "events" in message and VERSION_TABLE in message, message
    with migration_connection(empty_url) as conn:  # left as it was
        assert conn.exec_driver_sql("SELECT id, body FROM events").fetchall() == [(1, "theirs")]


def test_version_table_dropped(empty_url: str) -> None:
    migrate(empty_url)
    execute(empty_url, f"DROP TABLE {VERSION_TABLE}")
    for message in refused(empty_url):
        assert f"no {VERSION_TABLE}" in message and "events, leases, intents" in message, message


def test_version_table_emptied(empty_url: str) -> None:
    migrate(empty_url)
    execute(empty_url, f"DELETE FROM {VERSION_TABLE}")
    for message in refused(empty_url):
        assert f"{VERSION_TABLE} is empty" in message, message
    execute(empty_url, f"INSERT INTO {VERSION_TABLE} VALUES ('{SCHEMA_REVISION}')")  # the fix
    with SqlEventStore(empty_url) as store:
        assert store.head("s") == 0


def test_version_table_with_two_rows(empty_url: str) -> None:
    migrate(empty_url)
    execute(empty_url, f"INSERT INTO {VERSION_TABLE} VALUES ('0002')")
    for message in refused(empty_url):
        assert f"{VERSION_TABLE} holds 2 rows" in message and "0002" in message, message
    execute(empty_url, f"DELETE FROM {VERSION_TABLE} WHERE version_num = '0002'")
    with SqlEventStore(empty_url) as store:
        assert store.head("s") == 0
