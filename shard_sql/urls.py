"""Open a store from a URL: SQL URLs select `SqlEventStore`, git URLs or paths `GitEventStore`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlparse

from shard_sql.errors import InvalidEvent

if TYPE_CHECKING:
    from shard_sql.git import GitEventStore
    from shard_sql.memory import InMemoryEventStore
    from shard_sql.sql import SqlEventStore

DEFAULT_URL = "sqlite:///shard.db"
URL_ENV = "SHARD_SQL_URL"


def default_url() -> str:
    """`SHARD_SQL_URL`, else `sqlite:///shard.db` in the current directory."""
    return os.environ.get(URL_ENV) or DEFAULT_URL


def is_git_url(url: str) -> bool:
    """`git+file:///path`, or a plain path (no `scheme://`)."""
    return url.startswith("git+file://") or ("://" not in url and not url.startswith("sqlite:"))


def git_path(url: str) -> Path:
    if url.startswith("git+file://"):
        return Path(unquote(urlparse(url[len("git+") :]).path))
    return Path(url)


def open_store(
    url: str | None = None, *, migrate: bool = False
) -> SqlEventStore | GitEventStore | InMemoryEventStore:
    """Open the store a URL names: `memory:`, a SQLAlchemy URL, `git+file:///path` or a path."""
    url = url or default_url()
    if not isinstance(url, str) or not url.strip():
        raise InvalidEvent("url", "must be a non-empty string")
    if url in ("memory:", "memory://"):
        from shard_sql.memory import InMemoryEventStore

        return InMemoryEventStore()
    if is_git_url(url):
        from shard_sql.git import GitEventStore

        return GitEventStore(git_path(url))
    from shard_sql.sql import SqlEventStore

    return SqlEventStore(url, migrate=migrate)
