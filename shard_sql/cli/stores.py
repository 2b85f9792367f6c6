"""Which store a command opens (`--url`, else `SHARD_SQL_URL`, else ./shard.db), and opening it."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

from shard_sql.cli.errors import CommandFailed, UsageError
from shard_sql.leases import LeaseRegistry
from shard_sql.ports import LeaseStore
from shard_sql.urls import default_url, git_path, is_git_url, open_store


def store_url(args: argparse.Namespace) -> str:
    """The URL the command names: `--url`, else `SHARD_SQL_URL`, else the default; with
    `--schema NAME`, `?shard_sql_schema=NAME` added."""
    url: str | None = getattr(args, "url", None)
    if url is None:
        url = default_url()
    elif not url.strip():
        raise UsageError("--url must not be empty")
    schema: str | None = getattr(args, "schema", None)
    if schema is None:
        return url
    if is_git_url(url) or url.startswith("memory:"):
        raise UsageError("--schema names a PostgreSQL schema: it takes a postgresql:// URL")
    return f"{url}{'&' if '?' in url else '?'}shard_sql_schema={quote(schema, safe='')}"


def display_url(url: str) -> str:
    """The URL with every secret it carries masked (the library's one rule for it)."""
    if is_git_url(url) or url.startswith("memory:"):
        return url
    from shard_sql.sql import masked

    return masked(url)


def _check_git_path(url: str) -> None:
    if not is_git_url(url):
        return
    path = git_path(url)
    if path.is_file():
        hint = ""
        if not url.startswith("git+file:"):
            hint = f"; for a SQLite file use sqlite:///{path}"
        raise CommandFailed(f"{path} is a file, not a git repository{hint}")


@contextlib.contextmanager
def opened(url: str, *, create: bool, migrate: bool = False) -> Iterator[Any]:
    """The store `url` names, closed at the end. A command that only reads opens it with
    `create=False`: a missing store is then an error naming the URL, and nothing is created."""
    _check_git_path(url)
    try:
        store = open_store(url, migrate=migrate, create=create)
    except ImportError as e:
        raise CommandFailed(f"cannot open {display_url(url)}: {e}") from e
    try:
        yield store
    except BaseException:
        with contextlib.suppress(Exception):
            _close(store)
        raise
    _close(store)


def _close(store: object) -> None:
    close = getattr(store, "close", None)
    if callable(close):
        close()


def lease_registry(store: object) -> LeaseRegistry:
    """A registry on the store's own lease records (in memory for a store that keeps none)."""
    return LeaseRegistry(store if isinstance(store, LeaseStore) else None)
