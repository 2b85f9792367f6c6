"""Database URLs: parsing (which databases shard_sql runs on), and showing them without secrets."""

from __future__ import annotations

import re

from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, make_url

from shard_sql.errors import InvalidEvent

__all__ = ["masked", "normalize_url"]


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
