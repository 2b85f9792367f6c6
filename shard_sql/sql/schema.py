"""The schema: alembic migrations (`migrations/`, shipped as `shard_sql.migrations`), run under a
lock, and the revision check a store makes when it opens."""

from __future__ import annotations

import importlib.util
import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Table
from sqlalchemy.engine import URL, Connection, Engine
from sqlalchemy.sql.schema import SchemaItem

from shard_sql.errors import SchemaError, ShardSqlError
from shard_sql.orm import (
    CHECKPOINTS,
    EVENTS,
    INTENTS,
    LEASES,
    SCHEMA_REVISION,
    TABLES,
    VERSION_TABLE,
)
from shard_sql.sql.connections import Database, open_engine, site_of
from shard_sql.sql.dialects import Conn, Dialect, EngineOptions
from shard_sql.sql.errors import DEFAULT_BUSY_TIMEOUT, Site, translate

if TYPE_CHECKING:
    from alembic.config import Config

__all__ = [
    "Migration",
    "alembic_config",
    "check_schema",
    "migrate",
    "migration_connection",
    "migrations_dir",
    "open_schema",
    "upgrade",
]


_PACKAGE = Path(__file__).resolve().parent.parent


def migrations_dir() -> Path:
    """The alembic script directory: inside the installed package (a wheel ships it as
    `shard_sql/migrations`), else `migrations/` at the top of a source checkout."""
    for candidate in (_PACKAGE / "migrations", _PACKAGE.parent / "migrations"):
        if (candidate / "env.py").is_file():
            return candidate
    spec = importlib.util.find_spec("shard_sql.migrations")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            if (Path(location) / "env.py").is_file():
                return Path(location)
    raise SchemaError("shard_sql's migrations are missing from this installation")


def alembic_config(connection: Connection | None = None, *, schema: str | None = None) -> Config:
    """An alembic `Config` for shard_sql's migrations, optionally bound to an open connection
    (of `migration_connection`, with `schema` if it has one)."""
    # alembic loads only when a migration runs (it is slow to import; a store at head never
    # needs it).
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()).replace("%", "%%"))
    if connection is not None:
        cfg.attributes["connection"] = connection
    cfg.attributes["schema"] = schema
    return cfg


@contextmanager
def migration_connection(
    url_or_engine: str | URL | Engine,
    *,
    busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
    schema: str | None = None,
) -> Iterator[Connection]:
    """A connection in a transaction that holds shard_sql's migration lock, committed on exit
    (used by `migrations/env.py` when alembic runs from the command line). With a `schema`
    (PostgreSQL), created if missing, the transaction's search path is that schema."""
    options = EngineOptions(busy_timeout=busy_timeout, schema=schema)
    engine, owned, dialect = open_engine(url_or_engine, options)
    try:
        with dialect.migration_transaction(engine) as conn:
            yield conn
    finally:
        if owned:
            engine.dispose()


@dataclass(frozen=True, slots=True)
class Migration:
    """What `upgrade` did: the revision it found (None: no shard_sql schema yet) and the one it
    left (the head)."""

    before: str | None
    after: str

    @property
    def changed(self) -> bool:
        return self.before != self.after


Rows = Callable[[str, tuple[Any, ...]], Sequence[Sequence[Any]]]
"""Runs a statement with its parameters; its rows."""

_OUR_TABLES = (EVENTS, LEASES, INTENTS, CHECKPOINTS)


def found_revision(rows: Rows, dialect: Dialect, site: Site) -> str | None:
    """The schema revision in the version table; None when the database has no shard_sql
    schema and none of its tables' names (a migration creates them). `SchemaError` saying what
    was found for a schema that is foreign or damaged: tables by our names (an application's
    `checkpoints` too) without a version table, an empty version table beside our tables, more
    than one version row."""
    names = (VERSION_TABLE, *_OUR_TABLES)
    present = {row[0] for row in rows(dialect.tables_sql(len(names)), names)}
    ours = ", ".join(n for n in _OUR_TABLES if n in present)
    if VERSION_TABLE not in present:
        if ours:
            raise SchemaError(
                f"{site} has tables named {ours} but no {VERSION_TABLE}: another application's "
                "tables, or shard_sql's with their version table dropped. shard_sql neither uses "
                "nor changes them: give it a database (or PostgreSQL schema, schema=...) of its "
                "own, or restore the version table"
            )
        return None
    versions = [str(row[0]) for row in rows(dialect.version_sql, ())]
    if len(versions) > 1:
        raise SchemaError(
            f"{site}: {VERSION_TABLE} holds {len(versions)} rows ({', '.join(versions)}); it "
            "holds one, the schema revision: delete the wrong ones"
        )
    if not versions:
        if ours:
            raise SchemaError(
                f"{site}: {VERSION_TABLE} is empty beside the tables {ours}: insert the "
                "revision they are at (shard_sql cannot tell)"
            )
        return None
    return versions[0]


def run_migrations(engine: Engine, dialect: Dialect, site: Site) -> Migration:
    """Upgrade the database behind `engine` to head; the revisions before and after."""
    from alembic import command  # see alembic_config

    deadline = time.monotonic() + DEFAULT_BUSY_TIMEOUT
    while True:
        try:
            with dialect.migration_transaction(engine) as conn:

                def rows(sql: str, params: tuple[Any, ...]) -> Sequence[Sequence[Any]]:
                    return conn.exec_driver_sql(sql, params).fetchall()

                # Under the lock: what this call found; a foreign or damaged schema is left alone.
                before = found_revision(rows, dialect, site)
                command.upgrade(alembic_config(conn, schema=dialect.schema), "head")
            return Migration(before, SCHEMA_REVISION)
        except ShardSqlError:
            raise
        except Exception as e:
            if dialect.is_busy(e) and time.monotonic() < deadline:
                time.sleep(0.01 + random.random() * 0.05)
                continue
            err = translate(e, site)
            if err is None:
                raise
            raise err from e


def upgrade(url_or_engine: str | URL | Engine, *, schema: str | None = None) -> Migration:
    """Upgrade the database to the head schema (creating the tables in an empty one); what it
    found and left. Safe to run concurrently and repeatedly. `schema` (PostgreSQL, also
    `?shard_sql_schema=` in the URL): shard_sql's tables live there, created if missing."""
    engine, owned, dialect = open_engine(url_or_engine, EngineOptions(schema=schema))
    try:
        return run_migrations(engine, dialect, site_of(engine, dialect))
    finally:
        if owned:
            engine.dispose()


def migrate(url_or_engine: str | URL | Engine, *, schema: str | None = None) -> str:
    """Upgrade the database to the head schema (creating the tables in an empty one) and return
    the head revision. Safe to run concurrently and repeatedly. `schema`: see `upgrade`."""
    return upgrade(url_or_engine, schema=schema).after


def _known_revision(revision: str) -> bool:
    from alembic.script import ScriptDirectory  # see alembic_config

    try:
        return ScriptDirectory(str(migrations_dir())).get_revision(revision) is not None
    except Exception:
        return False


def _revision_problem(site: Site, revision: str) -> str:
    if _known_revision(revision):
        return (
            f"{site} is at shard_sql schema revision {revision}, older than {SCHEMA_REVISION}: "
            f"{site.hint}"
        )
    return (
        f"{site} is at shard_sql schema revision {revision!r}, unknown to this version of "
        f"shard_sql (it expects {SCHEMA_REVISION}): a newer shard_sql migrated it; upgrade "
        "shard_sql"
    )


def open_schema(db: Database, migrate_now: bool) -> None:
    """Check that the database is at the head schema; migrate it there when `migrate_now` and
    it is an older shard_sql schema or none. Else `SchemaError` saying what to do."""
    try:
        revision = db.call(_revision, db)
    except Exception as e:
        err = translate(e, db.site)
        if err is None:
            raise
        raise err from e
    if revision == SCHEMA_REVISION:
        return
    if revision is not None and (not migrate_now or not _known_revision(revision)):
        raise SchemaError(_revision_problem(db.site, revision))
    if not migrate_now:
        raise SchemaError(f"{db.site} has no shard_sql schema: {db.site.hint}")
    run_migrations(db.engine, db.dialect, db.site)


def _revision(c: Conn, db: Database) -> str | None:
    try:  # one statement when all is well
        c.cur.execute(db.dialect.version_sql)
        versions = c.cur.fetchall()
    except Exception as e:
        if not isinstance(translate(e, db.site), SchemaError):
            raise
    else:
        if len(versions) == 1:
            return str(versions[0][0])

    def rows(sql: str, params: tuple[Any, ...]) -> Sequence[Sequence[Any]]:
        c.cur.execute(sql, params)
        result: Sequence[Sequence[Any]] = c.cur.fetchall()
        return result

    return found_revision(rows, db.dialect, db.site)


def check_schema(url_or_engine: str | URL | Engine, *, schema: str | None = None) -> str:
    """Check shard_sql's own schema, also in a database it shares with an application (whose
    tables are not looked at): at the head revision, with every table, column, index and
    constraint of the models (in `schema`, if given). Returns the head revision; else
    `SchemaError`, one line saying what is behind, newer, foreign or different. Changes nothing
    (an index a DBA added is fine)."""
    engine, owned, dialect = open_engine(url_or_engine, EngineOptions(schema=schema))
    site = site_of(engine, dialect)
    try:
        if not dialect.exists(engine.url):
            raise SchemaError(f"{site} does not exist")
        with engine.connect() as conn:

            def rows(sql: str, params: tuple[Any, ...]) -> Sequence[Sequence[Any]]:
                return conn.exec_driver_sql(sql, params).fetchall()

            revision = found_revision(rows, dialect, site)
            if revision is None:
                raise SchemaError(f"{site} has no shard_sql schema: {site.hint}")
            if revision != SCHEMA_REVISION:
                raise SchemaError(_revision_problem(site, revision))
            differences = schema_differences(conn, dialect.schema)
        if differences:
            raise SchemaError(
                f"{site} is at shard_sql schema revision {SCHEMA_REVISION}, but its tables "
                f"differ from it: {'; '.join(differences)}"
            )
        return SCHEMA_REVISION
    except ShardSqlError:
        raise
    except Exception as e:
        err = translate(e, site)
        if err is None:
            raise
        raise err from e
    finally:
        if owned:
            engine.dispose()


def _is_ours(
    obj: SchemaItem, name: str | None, type_: str, reflected: bool, compare_to: SchemaItem | None
) -> bool:
    table = obj if isinstance(obj, Table) else getattr(obj, "table", None)
    return isinstance(table, Table) and table.name in TABLES


def schema_differences(conn: Connection, schema: str | None = None) -> list[str]:
    """How shard_sql's tables in the database (in `schema`, if given) differ from the models
    (alembic's autogenerate comparison, on those tables only), one phrase each; indexes the
    models lack are allowed."""
    from alembic.autogenerate import compare_metadata  # see alembic_config
    from alembic.migration import MigrationContext
    from sqlalchemy import MetaData

    from shard_sql.orm import metadata

    target = metadata
    if schema is not None:
        target = MetaData()
        for table in metadata.tables.values():
            table.to_metadata(target, schema=schema)

    def include_name(name: str | None, type_: str, parents: dict[str, str | None]) -> bool:
        if type_ == "schema":
            return name == schema
        return type_ != "table" or name in TABLES

    context = MigrationContext.configure(
        conn,
        opts={
            "version_table": VERSION_TABLE,
            "version_table_schema": schema,
            "compare_type": True,
            "include_schemas": schema is not None,
            "include_object": _is_ours,
            "include_name": include_name,
        },
    )
    found = [_describe(diff) for diff in compare_metadata(context, target)]
    return [d for d in found if d]


def _describe(diff: Any) -> str:
    """One of alembic's differences as a phrase ('' for an index only the database has)."""
    if isinstance(diff, list):  # modify_* come as a list per column
        diff = diff[0]
    kind = str(diff[0])
    if kind == "remove_index":
        return ""
    if kind in ("add_table", "remove_table"):
        return f"table {diff[1].name} {'missing' if kind == 'add_table' else 'extra'}"
    if kind in ("add_column", "remove_column"):
        missing = "missing" if kind == "add_column" else "not in shard_sql's models"
        return f"column {diff[2]}.{diff[3].name} {missing}"
    if kind in ("add_index", "add_constraint", "remove_constraint"):
        item = diff[1]
        where = getattr(getattr(item, "table", None), "name", "?")
        what = "index" if kind == "add_index" else "constraint"
        state = "extra" if kind.startswith("remove") else "missing"
        return f"{what} {item.name} on {where} {state}"
    if kind.startswith("modify_") and len(diff) > 3 and isinstance(diff[3], str):
        return f"column {diff[2]}.{diff[3]}: {kind.removeprefix('modify_')} differs"
    return f"{kind.replace('_', ' ')} on {diff[2] if len(diff) > 2 else '?'}"
