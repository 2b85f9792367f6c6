"""PostgreSQL: an append placed in the feed in its own transaction (`shard_sql_append_placed`)

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07 13:00:00

A write whose caller needs its feed positions (eventsourcing's application recorder returns
them as notification ids) was an append (commit 1, a disk flush), `shard_sql_place_feed()`
(commit 2, another flush) and a read of the positions. `shard_sql_append_placed(space, seq,
types, payloads, recorded_at)` is the three in one statement: it appends the events at `seq`
(unfenced, no intent ids: writer '' and generation 0) under the append's head check, and, when
the placement's advisory lock is free, places them with `shard_sql_place_feed()` before its
commit; it returns their positions (NULL each when the lock was busy: they are placed after
the commit by the next placement), or NULL when it wrote nothing (the head is not `seq`).

Why placing rows before their commit keeps the no-skip rule (docs/feed.md): the lock is held
until the commit, which makes the rows and their positions visible at once, and the next
placement, waiting for the lock, reads after it. The lock is only tried: the statement never
waits for another placement while its rows are uncommitted, and concurrent callers commit side
by side (each waiting for its own flush) instead of queueing behind each other's.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

FEED_LOCK = 1514554416
"""The placement's advisory lock (0004's `FEED_LOCK`, with the oid of the `events` table)."""

APPEND_PLACED = f"""CREATE OR REPLACE FUNCTION shard_sql_append_placed(
    p_space text, p_seq bigint, p_types text[], p_payloads text[], p_at timestamptz)
RETURNS bigint[]
LANGUAGE plpgsql VOLATILE
SET search_path = %I, pg_temp
AS $fn$
DECLARE
    written bigint;
BEGIN
    INSERT INTO events (space, seq, type, payload, recorded_at, writer, generation, intent_id)
    SELECT p_space, p_seq + b.n - 1, b.t, CAST(b.p AS jsonb), p_at, '', 0, NULL
    FROM unnest(p_types, p_payloads) WITH ORDINALITY AS b(t, p, n)
    WHERE COALESCE((SELECT seq + 1 FROM events WHERE space = p_space
                    ORDER BY seq DESC LIMIT 1), 0) = p_seq;
    GET DIAGNOSTICS written = ROW_COUNT;
    IF written = 0 THEN
        RETURN NULL;
    END IF;
    -- shard_sql_place_feed() runs in READ COMMITTED only; elsewhere placed after the commit.
    IF current_setting('transaction_isolation') = 'read committed' THEN
        IF pg_try_advisory_xact_lock({FEED_LOCK}, 'events'::regclass::oid::integer) THEN
            PERFORM shard_sql_place_feed();
        END IF;
    END IF;
    RETURN ARRAY(SELECT position FROM events WHERE space = p_space AND seq >= p_seq
                 ORDER BY seq LIMIT written);
END
$fn$"""
"""A `format` pattern: %I is the schema its search_path is pinned to (the tables' schema when
the migration runs), as `shard_sql_place_feed()`'s."""

COMMENT = (
    "COMMENT ON FUNCTION shard_sql_append_placed(text, bigint, text[], text[], timestamptz) IS "
    "'shard_sql: appends events at seq (unfenced) and, when the placement lock is free, places "
    "them before the commit; returns their positions (NULL each: placed after the commit), or "
    "NULL when the head is not seq. One statement in autocommit.'"
)


def upgrade() -> None:
    if op.get_context().dialect.name != "postgresql":
        return
    op.execute(f"DO $do$ BEGIN EXECUTE format($f${APPEND_PLACED}\n$f$, current_schema()); END $do$")
    op.execute(COMMENT)


def downgrade() -> None:
    if op.get_context().dialect.name != "postgresql":
        return
    op.execute("DROP FUNCTION shard_sql_append_placed(text, bigint, text[], text[], timestamptz)")
