"""SQLite: the checks an append statement holds its row to (the head, the fence, the intent id),
written once for the single append, the append at the head, the small batch and the checkpoint
upsert. Each takes its placeholders (`?n`); `HIGHEST_POSITION` is what positions follow."""

from __future__ import annotations

from shard_sql.orm import EVENTS, LEASES

__all__ = ["HIGHEST_POSITION", "fence_holds", "head_is", "intent_unwritten", "next_seq"]

HIGHEST_POSITION = f"(SELECT COALESCE(MAX(position), 0) FROM {EVENTS})"
"""The feed's highest position, read under the statement's write lock: a write's rows take the
positions after it, so positions grow in commit order."""


def next_seq(space: str) -> str:
    """The seq after the space's head (0 for an empty space)."""
    return (
        f"COALESCE((SELECT seq + 1 FROM {EVENTS} WHERE space = {space} "
        "ORDER BY seq DESC LIMIT 1), 0)"
    )


def head_is(space: str, seq: str) -> str:
    """The space's head is `seq` - 1: the write goes at `seq`."""
    return f"{next_seq(space)} = {seq}"


def fence_holds(space: str, holder: str, generation: str) -> str:
    """The fence is the space's current grant (read under the write lock the statement holds)."""
    return (
        f"EXISTS (SELECT 1 FROM {LEASES} WHERE space = {space} AND holder = {holder} "
        f"AND generation = {generation})"
    )


def intent_unwritten(space: str, intent_id: str) -> str:
    """No event of the space has this intent id (a NULL one matches nothing)."""
    return f"NOT EXISTS (SELECT 1 FROM {EVENTS} WHERE space = {space} AND intent_id = {intent_id})"
