"""shard_sql: an append-only event log split into spaces, kept in SQL or git.

Every space has one gapless sequence written by one lease holder at a time; see README.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from shard_sql.authority import AppendAuthority
from shard_sql.errors import (
    IntentConflict,
    IntentTimeout,
    InvalidEvent,
    LeaseHeld,
    SchemaError,
    SeqConflict,
    ShardSqlError,
    StaleLease,
    StoreUnavailable,
)
from shard_sql.leases import LeaseRegistry
from shard_sql.memory import InMemoryEventStore
from shard_sql.ports import EventStore, FeedStore, Transaction
from shard_sql.subscription import Subscription
from shard_sql.values import Event, EventType, Lease

if TYPE_CHECKING:
    from shard_sql.git import GitEventStore
    from shard_sql.sql import SqlEventStore, migrate

__all__ = [
    "AppendAuthority",
    "Event",
    "EventStore",
    "EventType",
    "FeedStore",
    "GitEventStore",
    "InMemoryEventStore",
    "IntentConflict",
    "IntentTimeout",
    "InvalidEvent",
    "Lease",
    "LeaseHeld",
    "LeaseRegistry",
    "SchemaError",
    "SeqConflict",
    "ShardSqlError",
    "SqlEventStore",
    "StaleLease",
    "StoreUnavailable",
    "Subscription",
    "Transaction",
    "migrate",
]

_LAZY = {
    "SqlEventStore": "shard_sql.sql",
    "migrate": "shard_sql.sql",
    "GitEventStore": "shard_sql.git",
}


def __getattr__(name: str) -> Any:
    # The SQL and git adapters import SQLAlchemy or pygit2; load them on first use only.
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'shard_sql' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
