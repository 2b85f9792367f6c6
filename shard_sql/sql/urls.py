"""Database URLs: parsing (which databases shard_sql runs on), and showing them without secrets."""

from __future__ import annotations

import re

from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, make_url

from shard_sql.errors import InvalidEvent

__all__ = ["SCHEMA_PARAMETER", "check_schema_name", "masked", "normalize_url", "split_schema"]

SCHEMA_PARAMETER = "shard_sql_schema"
"""The URL query parameter that names shard_sql's PostgreSQL schema (`?shard_sql_schema=log`)."""

_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,39}")


def normalize_url(url: str | URL) -> URL:
    """Parse a SQLAlchemy URL; plain `postgresql://` (and `postgres://`) select psycopg 3."""
    if isinstance(url, str) and not url.strip():
        raise InvalidEvent("url", "must be a non-empty database URL")
    try:
        parsed = make_url(url)
    except (sa_exc.ArgumentError, ValueError) as e:
        raise InvalidEvent("url", f"is not a database URL: {e}") from e
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    backend = parsed.get_backend_name()
    if backend == "postgresql" and parsed.get_driver_name() != "psycopg":
        raise InvalidEvent(
            "url", f"driver {parsed.drivername!r}: shard_sql uses psycopg 3, postgresql+psycopg://"
        )
    if backend == "sqlite" and parsed.get_driver_name() != "pysqlite":
        raise InvalidEvent("url", f"driver {parsed.drivername!r}: use sqlite:///path.db")
    if backend not in ("sqlite", "postgresql"):
        raise InvalidEvent("url", f"{backend!r}: shard_sql supports sqlite:// and postgresql://")
    return parsed


def check_schema_name(schema: object) -> str | None:
    """A PostgreSQL schema name for shard_sql's tables (None: the search path's)."""
    if schema is None:
        return None
    if (
        not isinstance(schema, str)
        or not _SCHEMA_NAME.fullmatch(schema)
        or schema.startswith("pg_")
        or schema == "information_schema"
    ):
        raise InvalidEvent(
            "schema",
            "must be a lowercase PostgreSQL schema name: a letter or _, then letters, digits or "
            "_, at most 40 (not pg_... or information_schema)",
        )
    return schema


def split_schema(url: URL, schema: str | None) -> tuple[URL, str | None]:
    """The URL without `?shard_sql_schema=`, and the schema it or `schema` names (they must
    agree when both do)."""
    named = url.query.get(SCHEMA_PARAMETER)
    if named is None:
        return url, check_schema_name(schema)
    if not isinstance(named, str):
        raise InvalidEvent("url", f"names {SCHEMA_PARAMETER} more than once")
    if schema is not None and named != schema:
        raise InvalidEvent("schema", f"{schema!r} differs from the URL's {named!r}")
    return url.difference_update_query([SCHEMA_PARAMETER]), check_schema_name(named)


_SECRET_WORDS = ("password", "passwd", "pwd", "secret", "token")
"""A query parameter whose name contains one of these is a secret (libpq takes `password` and
`sslpassword` there, for instance)."""


_USERINFO_PASSWORD = re.compile(r"(://[^/?#@:]*:)[^/?#]*@")  # up to the last @
_QUERY_SECRET = re.compile(
    rf"([?&][^=&#]*(?:{'|'.join(_SECRET_WORDS)})[^=&#]*=)[^&#]*", flags=re.IGNORECASE
)


def masked(url: str | URL) -> str:
    """The URL as text with every secret masked: the password, and secret query parameters
    (also in text that is not a valid URL)."""
    text = url if isinstance(url, str) else url.render_as_string(hide_password=False)
    text = _USERINFO_PASSWORD.sub(r"\1***@", text)
    return _QUERY_SECRET.sub(r"\1***", text)
