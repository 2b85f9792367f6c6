"""The one place where git and file system errors become ours (`StoreUnavailable`)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Concatenate, ParamSpec, Protocol, TypeVar

import pygit2

from shard_sql.errors import ShardSqlError, StoreUnavailable

GIT_ERRORS = (pygit2.GitError, OSError)
"""What `translated` turns into `StoreUnavailable`: libgit2's errors (pygit2's `GitError` and its
subclasses: `NotFoundError`, `InvalidError`, `AlreadyExistsError`, ...) and the file system's.
Stored objects that do not parse raise `StoreUnavailable` where they are parsed. Anything else
(`TypeError`, `AttributeError`, ...) is a bug: it propagates, never to be retried."""


class _AtPath(Protocol):
    @property
    def path(self) -> object: ...


P = ParamSpec("P")
R = TypeVar("R")
S = TypeVar("S", bound=_AtPath)
T = TypeVar("T")


def translate(where: _AtPath, e: BaseException) -> StoreUnavailable:
    return StoreUnavailable(f"git store {where.path}: {type(e).__name__}: {e}")


def translated(fn: Callable[Concatenate[S, P], R]) -> Callable[Concatenate[S, P], R]:
    """A store method whose git and parsing errors become `StoreUnavailable`."""

    @functools.wraps(fn)
    def call(self: S, /, *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(self, *args, **kwargs)
        except ShardSqlError:
            raise
        except GIT_ERRORS as e:
            raise translate(self, e) from e

    return call


def translated_iter(where: _AtPath, it: Iterator[T]) -> Iterator[T]:
    """The same for a generator's items."""
    try:
        yield from it
    except ShardSqlError:
        raise
    except GIT_ERRORS as e:
        raise translate(where, e) from e
