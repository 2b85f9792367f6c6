"""The SQL databases shard_sql runs on: a URL selects one `Dialect`."""

from __future__ import annotations

from sqlalchemy.engine import URL

from shard_sql.sql.dialects.base import Conn, Dialect, EngineOptions
from shard_sql.sql.dialects.postgres import PostgresDialect
from shard_sql.sql.dialects.sqlite import SqliteDialect, sqlite_file

__all__ = [
    "Conn",
    "Dialect",
    "EngineOptions",
    "PostgresDialect",
    "SqliteDialect",
    "dialect_for",
    "sqlite_file",
]


def dialect_for(url: URL, *, busy_timeout: float) -> Dialect:
    """The dialect of a URL that `shard_sql.sql.urls.normalize_url` accepted."""
    if url.get_backend_name() == "sqlite":
        return SqliteDialect(busy_timeout)
    return PostgresDialect()
