"""The command line's own failures; `shard_sql.cli.main` maps each to its exit code."""

from __future__ import annotations

from shard_sql.errors import ShardSqlError


class UsageError(ShardSqlError):
    """Bad arguments (exit 2)."""


class CommandFailed(ShardSqlError):
    """The command cannot do its work (exit 1): not a git repository, no benchmarks, ..."""


class ViolationsFound(ShardSqlError):
    """`verify` found violated invariants (exit 4)."""
