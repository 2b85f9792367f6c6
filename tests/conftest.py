"""Shared fixtures: a PostgreSQL database per test (empty, or at the head schema), SQLite
files, git paths; a raw connection to a holder's hand-off socket.

The PostgreSQL server comes from `SHARD_SQL_TEST_PG_URL` (a SQLAlchemy URL of a database to
connect to for CREATE DATABASE), default `postgresql+psycopg://postgres@127.0.0.1:5432/postgres`.
Without a server the PostgreSQL tests skip with the reason, except under `CI=true`, where they fail.
Databases at the head schema are copies of a template migrated once (`migrated_template`),
handed from test to test while a test leaves the catalog unchanged (`give_back`).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import socket
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import psycopg
import pytest

from shard_sql import migrate
from shard_sql.handoff import Endpoints

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


def _migrations_digest(salt: str = "") -> str:
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256(salt.encode())
    for path in sorted((root / "migrations").rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


_templates: dict[str, str] = {}

KEPT_TEMPLATES = 3
"""Templates of one kind kept on the server, the newest: older ones (made by other versions of
the migrations, by runs of other branches) are dropped when a new one is made."""


def kept_template(kind: str, make: Callable[[str], None], salt: str = "") -> str:
    """The name of a database `shard_test_<kind>_<digest of the migrations and salt>` that
    `make(url)` made from an empty one, to copy (`salt`: what else `make` puts in it, e.g. its
    DDL): made by the first test run that needs it and kept for later runs. Concurrent runs
    race safely: each makes a database of its own, renames it to the template's name, and the
    loser drops its copy. Nobody connects to the template (which CREATE DATABASE ... TEMPLATE
    requires)."""
    if kind in _templates:
        return _templates[kind]
    _require_pg()
    name = f"shard_test_{kind}_{_migrations_digest(salt)}"
    with psycopg.connect(_libpq(pg_admin_url()), autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
    if exists is None:
        scratch = new_pg_database()
        make(scratch)  # leaves no connection behind
        with psycopg.connect(_libpq(pg_admin_url()), autocommit=True) as conn:
            try:
                conn.execute(f'ALTER DATABASE "{scratch.rpartition("/")[2]}" RENAME TO "{name}"')
            except psycopg.errors.DuplicateDatabase:
                drop_pg_database(scratch)  # another run made it first
            older = conn.execute(
                "SELECT datname FROM pg_database WHERE datname ~ %s ORDER BY oid DESC OFFSET %s",
                (f"^shard_test_{kind}_[0-9a-f]{{16}}$", KEPT_TEMPLATES),
            ).fetchall()
            for (old,) in older:
                with suppress(psycopg.Error):  # not WITH (FORCE): one being copied stays
                    conn.execute(f'DROP DATABASE IF EXISTS "{old}"')
    _templates[kind] = name
    return name


def migrated_template() -> str:
    """The name of a database at the head schema, to copy (see `kept_template`)."""
    return kept_template("template", migrate)  # migrate disposes its engine


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


# -- copies of a template, reset and handed to the next test ---------------------------------
#
# CREATE DATABASE ... TEMPLATE and DROP DATABASE cost ~0.25 s a test (a few hundred tests use a
# migrated database). A copy a test gave back with its catalog as the template's (same tables,
# columns, constraints, indexes, functions, triggers, grants, comments, settings, version row) is
# emptied instead (other sessions terminated, every table but the version table truncated,
# sequences restarted: ~20 ms) and handed to the next test. Anything else is dropped as before.

_CATALOG = """
SELECT md5(string_agg(x, E'\\n' ORDER BY x)) FROM (
  SELECT 'rel ' || c.oid::regclass::text || ' ' || c.relkind::text || ' '
         || coalesce(c.relacl::text, '') || ' ' || coalesce(obj_description(c.oid), '') || ' '
         || c.relpersistence::text AS x
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
   WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')
  UNION ALL
  SELECT 'col ' || a.attrelid::regclass::text || '.' || a.attname || ' '
         || format_type(a.atttypid, a.atttypmod) || ' ' || a.attnotnull::text || ' '
         || coalesce(pg_get_expr(d.adbin, d.adrelid), '') || ' '
         || coalesce(col_description(a.attrelid, a.attnum), '') || ' '
         || coalesce(a.attacl::text, '')
    FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
    JOIN pg_namespace n ON n.oid = c.relnamespace
    LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
   WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')
     AND a.attnum > 0 AND NOT a.attisdropped
  UNION ALL
  SELECT 'con ' || conrelid::regclass::text || ' ' || conname || ' ' || pg_get_constraintdef(oid)
    FROM pg_constraint
   WHERE connamespace NOT IN ('pg_catalog'::regnamespace, 'information_schema'::regnamespace)
  UNION ALL
  SELECT 'idx ' || indexrelid::regclass::text || ' ' || pg_get_indexdef(indexrelid)
    FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid
   WHERE c.relnamespace NOT IN ('pg_catalog'::regnamespace, 'information_schema'::regnamespace,
                                'pg_toast'::regnamespace)
  UNION ALL
  SELECT 'fn ' || p.oid::regprocedure::text || ' ' || md5(pg_get_functiondef(p.oid)) || ' '
         || coalesce(p.proacl::text, '') || ' ' || coalesce(obj_description(p.oid), '')
    FROM pg_proc p
   WHERE p.pronamespace NOT IN ('pg_catalog'::regnamespace, 'information_schema'::regnamespace)
  UNION ALL
  SELECT 'trg ' || tgrelid::regclass::text || ' ' || tgname || ' ' || tgenabled::text
    FROM pg_trigger WHERE NOT tgisinternal
  UNION ALL
  SELECT 'ns ' || nspname || ' ' || coalesce(nspacl::text, '') || ' ' || nspowner::regrole::text
    FROM pg_namespace
  UNION ALL
  SELECT 'type ' || t.oid::regtype::text FROM pg_type t
   WHERE t.typnamespace NOT IN ('pg_catalog'::regnamespace, 'information_schema'::regnamespace,
                                'pg_toast'::regnamespace) AND t.typrelid = 0
  UNION ALL
  SELECT 'ext ' || extname || ' ' || extversion FROM pg_extension
  UNION ALL
  SELECT 'set ' || setrole::text || ' ' || array_to_string(setconfig, ';') FROM pg_db_role_setting
   WHERE setdatabase = (SELECT oid FROM pg_database WHERE datname = current_database())
  UNION ALL
  SELECT 'db ' || datconnlimit::text || ' ' || datallowconn::text || ' '
         || coalesce(datacl::text, '')
    FROM pg_database WHERE datname = current_database()
  UNION ALL
  SELECT 'pol ' || polrelid::regclass::text || ' ' || polname FROM pg_policy
) catalog
"""

_given_back: dict[str, list[str]] = {}
"""Per template: copies given back, emptied, ready for the next test."""
_catalogs: dict[str, str] = {}
"""Per template: the catalog fingerprint of a fresh copy."""


def copy_of(template: str) -> str:
    """A database at the template's state for one test: one given back, or a new copy."""
    ready = _given_back.setdefault(template, [])
    if ready:
        return ready.pop()
    url = new_pg_database(template)
    if template not in _catalogs:
        with psycopg.connect(_libpq(url), autocommit=True) as conn:
            _catalogs[template] = _catalog_and_version(conn)
    return url


def _catalog_and_version(conn: psycopg.Connection[tuple[object, ...]]) -> str:
    [(catalog,)] = conn.execute(_CATALOG).fetchall()
    versions = []
    for (table,) in conn.execute(  # shard_sql's, in whichever schema it was migrated to
        "SELECT format('%I.%I', schemaname, tablename) FROM pg_tables "
        "WHERE tablename = 'shard_sql_version' ORDER BY 1"
    ).fetchall():
        found = conn.execute(
            f"SELECT string_agg(format('%s', v), ',') FROM (SELECT t::text AS v FROM "
            f"{table} t ORDER BY 1) v"
        ).fetchone()
        versions.append(f"{table} {found}")
    return f"{catalog} {versions}"


def give_back(template: str, url: str, *refill: str) -> None:
    """Empty `url` for the next test if its catalog is still the template's (then run the
    `refill` statements: the rows of the template's other tables); else drop it."""
    try:
        with psycopg.connect(_libpq(url), autocommit=True) as conn:
            conn.execute("SET lock_timeout = '5s'")
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
            for _ in range(500):  # until the terminated sessions are gone (tests count them)
                (others,) = conn.execute(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                ).fetchone() or (0,)
                if not others:
                    break
                time.sleep(0.01)
            else:
                raise TimeoutError("sessions stayed")
            (prepared,) = conn.execute(
                "SELECT count(*) FROM pg_prepared_xacts WHERE database = current_database()"
            ).fetchone() or (0,)
            if prepared or _catalog_and_version(conn) != _catalogs.get(template):
                raise LookupError("changed")
            tables = [
                t
                for (t,) in conn.execute(
                    "SELECT format('%I.%I', schemaname, tablename) FROM pg_tables "
                    "WHERE schemaname NOT IN ('pg_catalog', 'information_schema') "
                    "AND tablename <> 'shard_sql_version'"
                ).fetchall()
            ]
            if tables:
                conn.execute(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY")
            for (seq,) in conn.execute(
                "SELECT format('%I.%I', schemaname, sequencename) FROM pg_sequences "
                "WHERE schemaname NOT IN ('pg_catalog', 'information_schema')"
            ).fetchall():
                conn.execute(f"ALTER SEQUENCE {seq} RESTART")
            for statement in refill:
                conn.execute(statement)
    except (psycopg.Error, LookupError, TimeoutError, ValueError):
        drop_pg_database(url)
        return
    _given_back.setdefault(template, []).append(url)


def drop_given_back() -> None:
    """At the end of the run: drop the copies waiting for a test."""
    for ready in _given_back.values():
        while ready:
            drop_pg_database(ready.pop())


@pytest.fixture(scope="session", autouse=True)
def _drop_copies_at_the_end() -> Iterator[None]:
    yield
    if _given_back:
        with _turn(exclusive=False):  # not while the other worker restarts the server
            drop_given_back()


@pytest.fixture
def pg_migrated_url() -> Iterator[str]:
    """A PostgreSQL database at the head schema for one test: a fresh copy of the template, or
    one an earlier test gave back unchanged, emptied (see `give_back`)."""
    template = migrated_template()
    url = copy_of(template)
    try:
        yield url
    finally:
        give_back(template, url)


@pytest.fixture
def sqlite_url(tmp_path: os.PathLike[str]) -> str:
    """A SQLite file URL in the test's temporary folder (the file does not exist yet)."""
    return f"sqlite:///{os.fspath(tmp_path)}/shard.db"


def raw_connection(store: Any, node_id: str) -> socket.socket:
    """A bare connection to `node_id`'s hand-off socket (Unix) in `store`'s hand-off folder, for
    writing the wire format by hand (tests/test_handoff*.py)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(Endpoints(store.handoff_dir()).address(node_id))
    return sock


# -- two pytest-xdist workers (pyproject's addopts: -n 2) --------------------------------------
#
# A test marked `exclusive` runs alone: a test of the other worker that is running finishes
# first, and the other worker's next test waits until it is done (the PostgreSQL fault test
# restarts the server under CI; the fault runs count on the machine's two cores). Every test
# takes a shared lock, an exclusive one takes it exclusively; a gate taken before either keeps a
# waiting exclusive test from being overtaken by the other worker's next tests. Without xdist:
# no lock.


@contextmanager
def _turn(*, exclusive: bool) -> Iterator[None]:
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if not run:
        yield
        return
    base = os.path.join(tempfile.gettempdir(), f"shard_sql_tests_{run}")
    gate = os.open(base + ".gate", os.O_CREAT | os.O_RDWR, 0o600)
    lock = os.open(base + ".lock", os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(gate, fcntl.LOCK_EX)
        fcntl.flock(lock, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        fcntl.flock(gate, fcntl.LOCK_UN)
        yield
    finally:
        os.close(lock)  # releases the locks
        os.close(gate)


def pytest_sessionfinish(session: pytest.Session) -> None:
    """A worker that is done removes the lock files (the other worker, if still running, makes
    new ones for its next test and removes them when it is done)."""
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if run:
        base = os.path.join(tempfile.gettempdir(), f"shard_sql_tests_{run}")
        for name in (base + ".gate", base + ".lock"):
            with suppress(FileNotFoundError):
                os.unlink(name)


@pytest.fixture(autouse=True)
def _one_at_a_time_when_exclusive(request: pytest.FixtureRequest) -> Iterator[None]:
    with _turn(exclusive=request.node.get_closest_marker("exclusive") is not None):
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Hand the fault-injection lines of a test to the report (from a worker to the controller)."""
    outcome = yield
    from faults.harness import SUMMARY

    if call.when == "call" and SUMMARY:
        report: pytest.TestReport = outcome.get_result()
        report.user_properties.extend(("fault injection", line) for line in SUMMARY)
        SUMMARY.clear()


_fault_lines: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _fault_lines.extend(str(v) for k, v in report.user_properties if k == "fault injection")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print the fault-injection runs: operations, faults injected by kind, violations."""
    if _fault_lines:
        terminalreporter.section("fault injection")
        for line in _fault_lines:
            terminalreporter.write_line(line)
