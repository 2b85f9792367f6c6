"""Shared fixtures: a fresh PostgreSQL database per test, SQLite files, git paths.

The PostgreSQL server comes from `SHARD_SQL_TEST_PG_URL` (a SQLAlchemy URL of a database to
connect to for CREATE DATABASE), default `postgresql+psycopg://postgres@127.0.0.1:5432/postgres`.
Without a server the PostgreSQL tests skip with the reason, except under `CI=true`, where they fail.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import psycopg
import pytest

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


def new_pg_database() -> str:
    """Create an empty database; return its SQLAlchemy URL."""
    _require_pg()
    name = f"shard_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(_libpq(pg_admin_url()), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base, _, _ = pg_admin_url().rpartition("/")
    return f"{base}/{name}"


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
