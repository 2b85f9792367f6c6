"""The SQL adapter: SQLite files and PostgreSQL (psycopg 3) through SQLAlchemy 2.

`SqlEventStore` and `migrate`; the parts are named after what they do (see docs/sql.md).
"""

from __future__ import annotations

from shard_sql.sql.dialects.sqlite import SYNCHRONOUS, sqlite_file
from shard_sql.sql.errors import DEFAULT_BUSY_TIMEOUT
from shard_sql.sql.schema import (
    Migration,
    alembic_config,
    check_schema,
    migrate,
    migration_connection,
    migrations_dir,
    upgrade,
)
from shard_sql.sql.store import SqlEventStore
from shard_sql.sql.urls import masked, normalize_url

__all__ = [
    "DEFAULT_BUSY_TIMEOUT",
    "SYNCHRONOUS",
    "Migration",
    "SqlEventStore",
    "alembic_config",
    "check_schema",
    "masked",
    "migrate",
    "migration_connection",
    "migrations_dir",
    "normalize_url",
    "sqlite_file",
    "upgrade",
]
