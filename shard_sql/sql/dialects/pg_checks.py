"""PostgreSQL: the checks an append statement's `WHERE` holds it to (the head, the fence, the
intent ids), written once for the single append, the append at the head and both batch forms.
Each takes its placeholders (`%s` for psycopg's statements, `$n` for prepared ones)."""

from __future__ import annotations

from shard_sql.sql.dialects.base import Tables

__all__ = ["fence_holds", "head_is", "intent_unwritten", "next_seq"]


def next_seq(t: Tables, space: str) -> str:
    """The seq after the space's head (0 for an empty space)."""
    return (
        f"COALESCE((SELECT seq + 1 FROM {t.events} WHERE space = {space} "
        "ORDER BY seq DESC LIMIT 1), 0)"
    )


def head_is(t: Tables, space: str, seq: str) -> str:
    """The space's head is `seq` - 1: the write goes at `seq`."""
    return f"{next_seq(t, space)} = {seq}"


def fence_holds(t: Tables, space: str, holder: str, generation: str) -> str:
    """The fence is the space's current grant. `FOR SHARE` on the lease row: a new grant (an
    UPDATE of that row) waits for the append's commit, or the append sees the new generation
    and writes nothing (docs/leases.md)."""
    return (
        f"EXISTS (SELECT 1 FROM {t.leases} WHERE space = {space} AND holder = {holder} "
        f"AND generation = {generation} FOR SHARE)"
    )


def intent_unwritten(t: Tables, space: str, test: str) -> str:
    """No event of the space has an intent id matching `test` (`= %s`, `= ANY(%s)`,
    `IN (...)`)."""
    return f"NOT EXISTS (SELECT 1 FROM {t.events} WHERE space = {space} AND intent_id {test})"
