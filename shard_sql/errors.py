"""The errors of shard_sql. Every error the public API raises subclasses `ShardSqlError`."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from shard_sql.values import Lease


class ShardSqlError(Exception):
    """Base class of every error shard_sql raises on purpose."""


class InvalidEvent(ShardSqlError, ValueError):
    """An argument (space, type, payload, seq, ...) is not acceptable; nothing was written.

    `field` names the offending argument.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"invalid {field}: {message}")
        self.field = field


class SeqConflict(ShardSqlError):
    """The compare-and-set failed: the space's head is not the expected seq; nothing was written."""

    def __init__(self, space: str, expected_seq: int, actual_seq: int | None = None) -> None:
        actual = "" if actual_seq is None else f", head is {actual_seq}"
        super().__init__(f"space {space!r}: expected seq {expected_seq}{actual}")
        self.space = space
        self.expected_seq = expected_seq
        self.actual_seq = actual_seq


class IntentConflict(ShardSqlError):
    """The intent id was already written in the space with other content (type or payload);
    nothing was written. Like an idempotency key reused for another request: use a new id."""

    def __init__(self, space: str, intent_id: str, seq: int) -> None:
        super().__init__(
            f"space {space!r}: intent id {intent_id!r} was already written at seq {seq} "
            "with another type or payload; nothing was written"
        )
        self.space = space
        self.intent_id = intent_id
        self.seq = seq


class LeaseHeld(ShardSqlError):
    """Another holder's lease on the space is still valid. `lease` is that lease."""

    def __init__(self, lease: Lease) -> None:
        super().__init__(
            f"space {lease.space!r} is held by {lease.holder!r} "
            f"(generation {lease.generation}) until {lease.expires_at.isoformat()}"
        )
        self.lease = lease


class StaleLease(ShardSqlError):
    """The lease is no longer the space's current grant (lapsed, released or granted anew)."""

    def __init__(self, lease: Lease, reason: str = "no longer the current grant") -> None:
        super().__init__(
            f"lease on space {lease.space!r} held by {lease.holder!r} "
            f"(generation {lease.generation}) is stale: {reason}"
        )
        self.lease = lease


class SchemaError(ShardSqlError):
    """The database is not at the head schema (or not a shard_sql database at all)."""


class StoreUnavailable(ShardSqlError):
    """The store cannot be reached or used (server down, file unreadable, not a repository...).

    When raised from a write, the write's outcome may be unknown: retry with the same
    `intent_id` to apply it at most once.
    """


class IntentTimeout(StoreUnavailable):
    """A forwarded append was not confirmed in time; retry with the same `intent_id`."""
