"""alembic environment of shard_sql.

Three ways in:
- `shard_sql.migrate(url)` / `SqlEventStore(url, migrate=True)` / `shard-sql migrate` pass an open
  connection (in `config.attributes["connection"]`) already inside a transaction that holds the
  migration lock (and whose search path is the schema in `config.attributes["schema"]`, if any);
  the migrations run in that transaction and the caller commits.
- `alembic upgrade head` from the repository root: the URL comes from `-x url=...`, else
  `sqlalchemy.url` in alembic.ini, else SHARD_SQL_URL, else sqlite:///shard.db; the schema from
  `-x schema=...` or the URL's `?shard_sql_schema=`; the connection is opened the way shard_sql
  opens it (SQLite: WAL and BEGIN IMMEDIATE; PostgreSQL: an advisory lock), so concurrent
  migrations queue up instead of colliding.
- `alembic upgrade head --sql`: offline, prints the SQL.
"""

from __future__ import annotations

from logging.config import fileConfig
from typing import Any

from alembic import context
from sqlalchemy.engine import URL

from shard_sql.orm import VERSION_TABLE, metadata

config = context.config

if config.config_file_name is not None and not config.attributes.get("connection"):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

OPTIONS: dict[str, Any] = {
    "target_metadata": metadata,
    "version_table": VERSION_TABLE,
    "compare_type": True,
    # Future ALTERs on SQLite need "move and copy" batch mode; autogenerate renders it.
    "render_as_batch": True,
}


def database_url() -> tuple[URL, str | None]:
    """The URL from the command line (without its `?shard_sql_schema=`) and the schema."""
    from shard_sql.sql.urls import normalize_url, split_schema
    from shard_sql.urls import default_url

    x = context.get_x_argument(as_dictionary=True)
    url = x.get("url") or config.get_main_option("sqlalchemy.url") or default_url()
    return split_schema(normalize_url(url), x.get("schema"))


def run_offline() -> None:
    url, schema = database_url()
    context.configure(url=url, literal_binds=True, version_table_schema=schema, **OPTIONS)
    with context.begin_transaction():
        if schema is not None:
            context.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
            context.execute(f'SET LOCAL search_path TO "{schema}"')
        context.run_migrations()


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        schema = config.attributes.get("schema")
        context.configure(connection=connection, version_table_schema=schema, **OPTIONS)
        with context.begin_transaction():
            context.run_migrations()
        return
    from shard_sql.sql import migration_connection

    url, schema = database_url()
    with migration_connection(url, schema=schema) as connection:
        context.configure(connection=connection, version_table_schema=schema, **OPTIONS)
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
