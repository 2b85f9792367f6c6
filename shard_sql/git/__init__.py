"""The git adapter: each space is a chain of commits under `refs/shard-sql/`, readable with
stock git (docs/git.md)."""

from shard_sql.git.packing import Maintenance
from shard_sql.git.store import GitEventStore

__all__ = ["GitEventStore", "Maintenance"]
