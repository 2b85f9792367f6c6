"""Open a store from a URL: `memory:`, a SQLAlchemy URL, `git+file:///path`, or the path of an
existing git repository. A mistyped URL is refused, never taken for a new repository's path."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlparse

from shard_sql.errors import InvalidEvent, ShardSqlError

if TYPE_CHECKING:
    from shard_sql.git import GitEventStore
    from shard_sql.memory import InMemoryEventStore
    from shard_sql.sql import SqlEventStore

DEFAULT_URL = "sqlite:///shard.db"
URL_ENV = "SHARD_SQL_URL"
MEMORY_URLS = ("memory:", "memory://")

_SCHEME_WORDS = r"(sqlite|postgres|postgresql|mysql|mariadb|mssql|oracle|git|file|memory)"
_MISTYPED = re.compile(rf"^[^/]*:|^{_SCHEME_WORDS}(\+\w+)?//", re.IGNORECASE)
"""A path that is surely a mistyped URL: a colon before the first slash (`postgresql:/h/db`,
`::::`), or a scheme without its colon (`postgres//h/db`, `sqlite//shard.db`)."""


class StoreNotFound(ShardSqlError):
    """No store at the URL, and the caller asked not to create one (a command that only reads)."""

    def __init__(self, url: str, what: str) -> None:
        super().__init__(f"no store at {url}: {what}")
        self.url = url


def default_url() -> str:
    """`SHARD_SQL_URL`, else `sqlite:///shard.db` in the current directory."""
    return os.environ.get(URL_ENV) or DEFAULT_URL


def is_git_url(url: str) -> bool:
    """`git+file:///path`, or a plain path (no `scheme://`)."""
    return url.startswith("git+file://") or (
        "://" not in url and not url.startswith("sqlite:") and url not in MEMORY_URLS
    )


def git_path(url: str) -> Path:
    if url.startswith("git+file://"):
        return Path(unquote(urlparse(url[len("git+") :]).path))
    return Path(url)


def is_git_repository(path: Path) -> bool:
    """A bare repository (HEAD, objects/, refs/) or a work tree's (`.git`)."""
    if (path / ".git").exists():
        return True
    return (path / "HEAD").is_file() and (path / "objects").is_dir() and (path / "refs").is_dir()


def check_url(url: object) -> str:
    """`url` if it can name a store; `InvalidEvent("url")` for a mistyped URL, or for a plain
    path that is not an existing git repository (a new git store needs `git+file://`)."""
    if not isinstance(url, str) or not url.strip():
        raise InvalidEvent("url", "must be a non-empty string")
    if url in MEMORY_URLS or "://" in url or url.startswith("sqlite:"):
        return url
    if _MISTYPED.match(url):
        raise InvalidEvent(
            "url",
            f"{url!r} is not a URL (scheme://...): for example sqlite:///shard.db, "
            "postgresql+psycopg://user@host/db, git+file:///srv/log.git",
        )
    path = Path(url)
    if not is_git_repository(path):
        memory = "; memory: names an in-memory store" if url.lower() == "memory" else ""
        raise InvalidEvent(
            "url",
            f"{url!r} is not an existing git repository (a path must name one); "
            f"git+file://{path.absolute()} creates a git store{memory}",
        )
    return url


def _missing(url: str) -> str | None:
    """Why there is no store at `url` yet (None: there is one, or it is not ours to tell)."""
    if is_git_url(url):
        path = git_path(url)
        if not path.exists():
            return f"{path} does not exist"
        if path.is_dir() and not any(path.iterdir()):
            return f"{path} is an empty directory"
        return None
    if url.startswith("sqlite:"):
        from sqlalchemy.engine import make_url

        from shard_sql.sql import sqlite_file

        try:
            database = sqlite_file(make_url(url))
        except Exception:
            return None  # the store's own open says what is wrong with the URL
        if database is not None and not os.path.exists(database):
            return f"{database} does not exist"
    return None


def open_store(
    url: str | None = None, *, migrate: bool = False, create: bool = True
) -> SqlEventStore | GitEventStore | InMemoryEventStore:
    """Open the store a URL names: `memory:`, a SQLAlchemy URL, `git+file:///path` (created if
    missing) or the path of an existing git repository. `create=False`: a missing SQLite file
    or git repository is a `StoreNotFound` error, and nothing is created."""
    url = check_url(url or default_url())
    if not create:
        missing = _missing(url)
        if missing is not None:
            raise StoreNotFound(url, missing)
    if url in MEMORY_URLS:
        from shard_sql.memory import InMemoryEventStore

        return InMemoryEventStore()
    if is_git_url(url):
        from shard_sql.git import GitEventStore

        return GitEventStore(git_path(url))
    from shard_sql.sql import SqlEventStore

    return SqlEventStore(url, migrate=migrate)
