"""An eventsourcing (9.x) persistence module backed by shard_sql.

    PERSISTENCE_MODULE=shard_sql.eventsourcing SHARD_SQL_URL=postgresql+psycopg://... python app.py

Aggregates are spaces, notification ids are feed positions, tracking records are checkpoints;
the mapping is in docs/eventsourcing.md. Needs the `eventsourcing` extra.
"""

from __future__ import annotations

from shard_sql.eventsourcing._factory import ShardSqlFactory
from shard_sql.eventsourcing._recorders import (
    ShardSqlAggregateRecorder,
    ShardSqlApplicationRecorder,
    ShardSqlProcessRecorder,
    ShardSqlSubscription,
    ShardSqlTrackingRecorder,
)

Factory = ShardSqlFactory

__all__ = [
    "Factory",
    "ShardSqlAggregateRecorder",
    "ShardSqlApplicationRecorder",
    "ShardSqlFactory",
    "ShardSqlProcessRecorder",
    "ShardSqlSubscription",
    "ShardSqlTrackingRecorder",
]
