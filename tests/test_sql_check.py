"""`check_schema` and `shard-sql migrate --check`: shard_sql's own schema checked in a database it
shares with an application, on SQLite and PostgreSQL; nothing is changed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import Column, Integer, MetaData, Table, create_engine, inspect, text

from shard_sql import SchemaError, migrate
from shard_sql.cli import main
from shard_sql.orm import SCHEMA_REVISION
from shard_sql.sql import alembic_config, check_schema, migration_connection


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def url(request: pytest.FixtureRequest, sqlite_url: str) -> str:
    if request.param == "sqlite":
        return sqlite_url
    pg: str = request.getfixturevalue("pg_url")
    return pg


def execute(url: str, *statements: str) -> None:
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            for sql in statements:
                conn.execute(text(sql))
    finally:
        engine.dispose()


def add_host_tables(url: str) -> None:
    host = MetaData()
    Table("orders", host, Column("id", Integer, primary_key=True))
    engine = create_engine(url)
    try:
        host.create_all(engine)
    finally:
        engine.dispose()


def refused(url: str) -> str:
    with pytest.raises(SchemaError) as e:
        check_schema(url)
    message = str(e.value)
    assert "\n" not in message
    return message


def test_at_head_in_a_shared_database(url: str) -> None:
    if url.startswith("sqlite"):
        open(url.removeprefix("sqlite:///"), "w").close()
    add_host_tables(url)
    assert "has no shard_sql schema" in refused(url)
    migrate(url)
    assert check_schema(url) == SCHEMA_REVISION
    # An index a DBA added (docs/dba.md) is fine.
    execute(url, "CREATE INDEX events_writer_idx ON events (writer, recorded_at)")
    assert check_schema(url) == SCHEMA_REVISION


def test_behind_foreign_or_different(url: str) -> None:
    migrate(url)
    with migration_connection(url) as conn:
        command.downgrade(alembic_config(conn), "0003")
    assert "at shard_sql schema revision 0003, older than" in refused(url)
    migrate(url)
    execute(url, "DROP INDEX events_unplaced_idx")
    message = refused(url)
    assert "differ" in message and "index events_unplaced_idx on events missing" in message
    execute(url, "DROP TABLE checkpoints", "DROP TABLE intents", "DROP TABLE shard_sql_version")
    assert "another application's" in refused(url)


def test_a_missing_sqlite_file_is_not_created(tmp_path: Path) -> None:
    path = tmp_path / "none.db"
    assert "does not exist" in refused(f"sqlite:///{path}")
    assert not path.exists()


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_migrate_check_on_the_command_line(
    url: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, out, err = cli(capsys, "migrate", "--check", "--url", url)
    assert code == 1 and out == ""
    assert err.startswith("shard-sql: error: ") and err.count("\n") == 1
    assert "no shard_sql schema" in err or "does not exist" in err
    assert not url.startswith("sqlite") or not os.path.exists(url.removeprefix("sqlite:///"))
    migrate(url)
    assert cli(capsys, "migrate", "--check", "--url", url) == (
        0,
        f"{url}: at {SCHEMA_REVISION} (head)\n",
        "",
    )
    code, out, _ = cli(capsys, "migrate", "--check", "--url", url, "--json")
    assert (code, json.loads(out)) == (0, {"url": url, "ok": True, "revision": SCHEMA_REVISION})
    git = f"git+file://{tmp_path}/log.git"
    assert cli(capsys, "migrate", "--check", "--url", git) == (
        0,
        f"{git}: no schema to check\n",
        "",
    )
    assert not (tmp_path / "log.git").exists()


def test_an_applications_table_by_one_of_our_names_is_left_alone(url: str) -> None:
    execute(url, "CREATE TABLE checkpoints (id INTEGER PRIMARY KEY)")
    with pytest.raises(SchemaError, match="tables named checkpoints but no shard_sql_version"):
        migrate(url)
    assert "another application's" in refused(url)
    engine = create_engine(url)
    try:
        assert set(inspect(engine).get_table_names()) == {"checkpoints"}
    finally:
        engine.dispose()
