"""The SQL databases shard_sql runs on: a URL selects one `Dialect`."""

from __future__ import annotations

from sqlalchemy.engine import URL

from shard_sql.errors import InvalidEvent
from shard_sql.sql.dialects.base import Conn, Dialect, EngineOptions
from shard_sql.sql.dialects.postgres import PostgresDialect
from shard_sql.sql.dialects.sqlite import SqliteDialect, sqlite_file
from shard_sql.sql.urls import check_schema_name

__all__ = [
    "Conn",
    "Dialect",
    "EngineOptions",
    "PostgresDialect",
    "SqliteDialect",
    "dialect_for",
    "sqlite_file",
]


SQLITE_HAS_NO_SCHEMAS = (
    "SQLite has no schemas: keep shard_sql's log in a SQLite file of its own "
    "(sqlite:///log.db beside the application's), or use PostgreSQL (docs/embedding.md)"
)


def dialect_for(url: URL, *, busy_timeout: float, schema: str | None = None) -> Dialect:
    """The dialect of a URL that `shard_sql.sql.urls.normalize_url` accepted, with shard_sql's
    tables in `schema` (PostgreSQL; None: the search path's)."""
    schema = check_schema_name(schema)
    if url.get_backend_name() == "sqlite":
        if schema is not None:
            raise InvalidEvent("schema", SQLITE_HAS_NO_SCHEMAS)
        return SqliteDialect(busy_timeout)
    return PostgresDialect(schema)
