"""Shared fixtures: a fresh PostgreSQL database per test (empty, or at the head schema), SQLite
files, git paths.

The PostgreSQL server comes from `SHARD_SQL_TEST_PG_URL` (a SQLAlchemy URL of a database to
connect to for CREATE DATABASE), default `postgresql+psycopg://postgres@127.0.0.1:5432/postgres`.
Without a server the PostgreSQL tests skip with the reason, except under `CI=true`, where they fail.
Databases at the head schema are copies of a template migrated once (`migrated_template`).
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from shard_sql import migrate

DEFAULT_PG = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


def pg_admin_url() -> str:
    return os.environ.get("SHARD_SQL_TEST_PG_URL", DEFAULT_PG)


def _libpq(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


_unreachable: str | None = None


def _require_pg() -> None:
    global _unreachable
    if _unreachable is None:
        try:
            with psycopg.connect(_libpq(pg_admin_url()), connect_timeout=5):
                _unreachable = ""
        except psycopg.Error as e:
            _unreachable = f"PostgreSQL at {pg_admin_url()} unreachable: {e}".strip()
    if _unreachable:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{_unreachable} (CI=true: PostgreSQL tests may not skip)")
        pytest.skip(_unreachable)


def _url_of(name: str) -> str:
    base, _, _ = pg_admin_url().rpartition("/")
    return f"{base}/{name}"


def new_pg_database(template: str | None = None) -> str:
    """Create a database, empty or a copy of `template`; return its SQLAlchemy URL."""
    _require_pg()
    name = f"shard_test_{uuid.uuid4().hex[:12]}"
    copy = f' TEMPLATE "{template}"' if template else ""
    with psycopg.connect(_libpq(pg_admin_url()), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"{copy}')
    return _url_of(name)


def _migrations_digest() -> str:
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for path in sorted((root / "migrations").rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


_template: str | None = None


def migrated_template() -> str:
    """The name of a database at the head schema, to copy: `shard_test_template_<digest of the
    migrations>`, made by the first test run that needs it and kept for later runs. Concurrent
    runs race safely: each migrates a database of its own, renames it to the template's name,
    and the loser drops its copy. Nobody connects to the template (which CREATE DATABASE ...
    TEMPLATE requires)."""
    global _template
    if _template is not None:
        return _template
    _require_pg()
    name = f"shard_test_template_{_migrations_digest()}"
    with psycopg.connect(_libpq(pg_admin_url()), autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
    if exists is None:
        scratch = new_pg_database()
        migrate(scratch)  # disposes its engine: no connection stays behind
        with psycopg.connect(_libpq(pg_admin_url()), autocommit=True) as conn:
            try:
                conn.execute(f'ALTER DATABASE "{scratch.rpartition("/")[2]}" RENAME TO "{name}"')
            except psycopg.errors.DuplicateDatabase:
                drop_pg_database(scratch)  # another run made it first
    _template = name
    return name


def drop_pg_database(url: str) -> None:
    name = url.rpartition("/")[2]
    with psycopg.connect(_libpq(pg_admin_url()), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test (dropped afterwards)."""
    url = new_pg_database()
    try:
        yield url
    finally:
        drop_pg_database(url)


@pytest.fixture
def pg_migrated_url() -> Iterator[str]:
    """A fresh PostgreSQL database at the head schema for one test (dropped afterwards)."""
    url = new_pg_database(migrated_template())
    try:
        yield url
    finally:
        drop_pg_database(url)


@pytest.fixture
def sqlite_url(tmp_path: os.PathLike[str]) -> str:
    """A SQLite file URL in the test's temporary folder (the file does not exist yet)."""
    return f"sqlite:///{os.fspath(tmp_path)}/shard.db"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print the fault-injection runs: operations, faults injected by kind, violations."""
    from faults.harness import SUMMARY

    if SUMMARY:
        terminalreporter.section("fault injection")
        for line in SUMMARY:
            terminalreporter.write_line(line)
