"""alembic migrations: one head, up and down on both databases, ORM and migrations agree,
the alembic command line from the repository root, and the migrations inside a built wheel."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect

from shard_sql import SchemaError, SqlEventStore, migrate
from shard_sql.orm import SCHEMA_REVISION, VERSION_TABLE, metadata
from shard_sql.sql import alembic_config, migration_connection, migrations_dir

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/m.db"
    url: str = request.getfixturevalue("pg_url")
    return url


def tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def revision(url: str) -> str | None:
    with migration_connection(url) as conn:
        return MigrationContext.configure(
            conn, opts={"version_table": VERSION_TABLE}
        ).get_current_revision()


def test_single_head_is_the_orm_revision() -> None:
    script = ScriptDirectory(str(migrations_dir()))
    assert script.get_heads() == [SCHEMA_REVISION], (
        "the migrations must have one head, and shard_sql.orm.SCHEMA_REVISION must name it"
    )
    assert migrations_dir() == REPO / "migrations"


def test_upgrade_and_downgrade(db_url: str) -> None:
    assert tables(db_url) == set()
    assert migrate(db_url) == SCHEMA_REVISION
    assert {"events", "leases", VERSION_TABLE} <= tables(db_url)
    assert revision(db_url) == SCHEMA_REVISION
    assert migrate(db_url) == SCHEMA_REVISION  # again: nothing to do

    with migration_connection(db_url) as conn:
        command.downgrade(alembic_config(conn), "base")
    assert tables(db_url) - {VERSION_TABLE} == set()
    assert revision(db_url) is None

    migrate(db_url)
    with SqlEventStore(db_url) as store:
        store.append("s", "t", {"back": True}, expected_seq=0)
        assert store.head("s") == 1


def test_orm_and_migrations_agree(db_url: str) -> None:
    migrate(db_url)
    with migration_connection(db_url) as conn:
        context = MigrationContext.configure(
            conn, opts={"version_table": VERSION_TABLE, "compare_type": True}
        )
        diff = compare_metadata(context, metadata)
    assert diff == []


def test_every_table_and_column_has_a_comment(pg_url: str) -> None:
    migrate(pg_url)
    engine = create_engine(pg_url)
    try:
        insp = inspect(engine)
        for table in ("events", "leases", VERSION_TABLE):
            assert insp.get_table_comment(table)["text"], table
            for column in insp.get_columns(table):
                assert column.get("comment"), f"{table}.{column['name']}"
        cols = {c["name"]: c for c in insp.get_columns("events")}
        assert str(cols["payload"]["type"]) == "JSONB"
        assert str(cols["recorded_at"]["type"]) == "TIMESTAMP"
        assert cols["recorded_at"]["type"].timezone  # type: ignore[attr-defined]
    finally:
        engine.dispose()
    for table in metadata.tables.values():
        assert table.comment, table.name
        for column in table.columns:
            assert column.comment, f"{table.name}.{column.name}"


def test_sqlite_file_is_migrated_on_open(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/new.db"
    with SqlEventStore(url) as store:
        assert store.head("s") == 0
    assert revision(url) == SCHEMA_REVISION


@pytest.mark.postgres
def test_postgres_is_not_migrated_on_open(pg_url: str) -> None:
    with pytest.raises(SchemaError) as info:
        SqlEventStore(pg_url)
    assert "shard-sql migrate --url" in str(info.value)
    assert "migrate=True" in str(info.value)
    assert tables(pg_url) == set()
    with SqlEventStore(pg_url, migrate=True) as store:
        assert store.head("s") == 0


def alembic_cli(*args: str, cwd: Path = REPO, env: dict[str, str] | None = None) -> str:
    exe = Path(sys.executable).with_name("alembic")
    proc = subprocess.run(
        [str(exe), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout + proc.stderr


def test_alembic_command_line_from_the_repository_root(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/cli.db"
    alembic_cli("-x", f"url={url}", "upgrade", "head")
    assert revision(url) == SCHEMA_REVISION
    # `alembic check`: autogenerate finds nothing to do against the migrated database.
    out = alembic_cli("check", env={"SHARD_SQL_URL": url})
    assert "No new upgrade operations detected" in out
    alembic_cli("-x", f"url={url}", "downgrade", "base")
    assert revision(url) is None


# -- the migrations inside a wheel -----------------------------------------------------------


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A wheel built from a copy of the repository (so no build/ lands in the work tree)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md", "alembic.ini"):
        if (REPO / name).exists():
            shutil.copy(REPO / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / "shard_sql", src / "shard_sql", ignore=ignore)
    shutil.copytree(REPO / "migrations", src / "migrations", ignore=ignore)
    shutil.copytree(REPO / "benchmarks", src / "benchmarks", ignore=ignore)  # shard_sql.bench
    shutil.copytree(REPO / "examples", src / "examples", ignore=ignore)  # must stay out
    out = tmp_path_factory.mktemp("wheel")
    run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(src))
    [whl] = out.glob("shard_sql-*.whl")
    yield whl


def run(*args: str, cwd: Path | None = None) -> str:
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{args}: {proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.mark.slow
def test_wheel_migrates_a_new_sqlite_file(wheel: Path, tmp_path: Path) -> None:
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True, system_site_packages=False).create(env_dir)
    python = str(env_dir / "bin" / "python")
    # Only what migrate(url) on SQLite needs; pip's cache keeps this fast after the first run.
    run(
        python,
        "-m",
        "pip",
        "install",
        "-q",
        "--disable-pip-version-check",
        "sqlalchemy>=2.0.30",
        "alembic>=1.13",
    )
    run(python, "-m", "pip", "install", "-q", "--no-deps", str(wheel))
    db = tmp_path / "fresh.db"
    script = (
        "import shard_sql, shard_sql.sql as s, sys\n"
        f"print(shard_sql.migrate('sqlite:///{db}'))\n"
        "print(s.migrations_dir())\n"
        "store = shard_sql.SqlEventStore(sys.argv[1])\n"
        "print(store.append('s', 't', {'from': 'wheel'}, expected_seq=0).seq)\n"
    )
    out = run(python, "-c", script, f"sqlite:///{db}", cwd=tmp_path).split()
    assert out[0] == SCHEMA_REVISION
    assert str(env_dir) in out[1] and out[1].endswith("shard_sql/migrations")
    assert out[2] == "0"
    assert {"events", "leases", VERSION_TABLE} <= tables(f"sqlite:///{db}")


@pytest.mark.slow
def test_wheel_ships_the_cli_and_the_benchmark_suites_not_the_examples(wheel: Path) -> None:
    import zipfile

    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"shard_sql/cli/__init__.py", "shard_sql/transfer.py"} <= names
    assert {"shard_sql/bench/perf_bench.py", "shard_sql/bench/sql_bench.py"} <= names
    assert not [n for n in names if "orders_app" in n or "examples" in n]


def test_version_table_is_our_own(db_url: str) -> None:
    migrate(db_url)
    names = tables(db_url)
    assert VERSION_TABLE in names and "alembic_version" not in names
