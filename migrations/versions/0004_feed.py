"""the feed: events.position, checkpoints, and PostgreSQL's placement function

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07 00:00:00

`events.position`: every event's place in the store-wide feed (unique; existing rows numbered
1..N in the order of the running maximum of `recorded_at` within their space by seq, then space,
then seq). SQLite sets it in the append's write transaction. PostgreSQL appends leave it NULL;
`shard_sql_place_feed()` numbers the committed unplaced rows under an advisory lock, and every
reader calls it before reading (docs/feed.md). The `checkpoints` table keeps how far each named
consumer has read.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

EVENTS_COMMENT = (
    "shard_sql event log: append-only, one gapless sequence per space. Rows are never deleted "
    "and never updated, but for position, set once; the primary key (space, seq) is the "
    "compare-and-set of an append."
)
OLD_EVENTS_COMMENT = (
    "shard_sql event log: append-only, one gapless sequence per space. "
    "Rows are never updated or deleted; the primary key (space, seq) is the "
    "compare-and-set of an append."
)
POSITION_COMMENT = (
    "Place in the store-wide feed: 1, 2, 3, ... across every space, gaps allowed, never "
    "changed once set. SQLite: set by the append. PostgreSQL: NULL until "
    "shard_sql_place_feed() places the committed row; read the feed only after calling it."
)

FEED_LOCK = 1514554416
"""The first key of the placement's advisory lock (two-key form); the second is the oid of the
schema's `events` table, so stores in different schemas of one database never wait for each
other."""

# The order of a placement: the running maximum of recorded_at within the space by seq (a
# writer whose clock is behind another's cannot put seq n+1 before seq n), then space, seq.
NUMBERED = """
    SELECT space, seq, {base} + row_number() OVER (ORDER BY t, space, seq) AS position
    FROM (
        SELECT space, seq, max(recorded_at) OVER (
            PARTITION BY space ORDER BY seq ROWS UNBOUNDED PRECEDING) AS t
        FROM events WHERE position IS NULL
    ) AS unplaced
"""

PLACE_FEED = f"""CREATE OR REPLACE FUNCTION shard_sql_place_feed() RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = %I, pg_temp
AS $fn$
DECLARE
    top bigint;
    placed bigint;
BEGIN
    -- Nothing committed is unplaced: the head, without the lock.
    IF NOT EXISTS (SELECT 1 FROM events WHERE position IS NULL) THEN
        RETURN (SELECT coalesce(max(position), 0) FROM events);
    END IF;
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'shard_sql_place_feed() must run in a READ COMMITTED transaction, not %%',
            current_setting('transaction_isolation');
    END IF;
    -- Placements take turns; each statement below reads a snapshot taken after the lock, so it
    -- sees every position an earlier placement committed.
    PERFORM pg_advisory_xact_lock({FEED_LOCK}, 'events'::regclass::oid::integer);
    SELECT coalesce(max(position), 0) INTO top FROM events;
    UPDATE events AS e SET position = n.position
    FROM ({NUMBERED.format(base="top")}) AS n
    WHERE e.space = n.space AND e.seq = n.seq AND e.position IS NULL;
    GET DIAGNOSTICS placed = ROW_COUNT;
    RETURN top + placed;
END
$fn$"""
"""The placement function (a `format` pattern: %I is the schema its search_path is pinned to,
the schema of the tables when the migration ran). SECURITY DEFINER: a role that may only read
`events` (and execute the function) places too."""

CREATE_PLACE_FEED = (
    f"DO $do$ BEGIN EXECUTE format($f${PLACE_FEED}\n$f$, current_schema()); END $do$"
)

PLACE_FEED_COMMENT = (
    "COMMENT ON FUNCTION shard_sql_place_feed() IS 'shard_sql: places the committed events "
    "that have no position yet at max(position) + 1, ... (in the order of the running max of "
    "recorded_at within the space, then space, seq), under an advisory lock; returns the "
    "feed head. Call it in its own READ COMMITTED transaction (autocommit), then read "
    "WHERE position > <last seen> ORDER BY position.'"
)

CHECKPOINTS_COMMENT = (
    "shard_sql feed consumers: how far each named consumer has processed the feed. A save "
    "never moves a position backwards; it is written in the consumer's transaction, with the "
    "consumer's own writes."
)


def name(comment: str, *, nullable: bool = False, column: str) -> sa.Column[str]:
    return sa.Column(
        column,
        sa.String(200).with_variant(sa.String(200, collation="C"), "postgresql"),
        nullable=nullable,
        comment=comment,
    )


def upgrade() -> None:
    postgres = op.get_context().dialect.name == "postgresql"
    with op.batch_alter_table("events") as batch:
        batch.add_column(
            sa.Column("position", sa.BigInteger(), nullable=True, comment=POSITION_COMMENT)
        )
    if postgres:
        op.create_table_comment("events", EVENTS_COMMENT, existing_comment=OLD_EVENTS_COMMENT)
    # The events already there, numbered 1..N (in one statement: SQLite >= 3.33, PostgreSQL).
    op.execute(
        f"UPDATE events SET position = n.position FROM ({NUMBERED.format(base=0)}) AS n "
        "WHERE events.space = n.space AND events.seq = n.seq"
    )
    op.create_index("events_position_key", "events", ["position"], unique=True)
    # PostgreSQL: the rows not placed yet. SQLite places every row as it is written: the index
    # is kept empty (WHERE 0), so that no insert pays for it.
    op.create_index(
        "events_unplaced_idx",
        "events",
        ["space", "seq"],
        postgresql_where=sa.text("position IS NULL"),
        sqlite_where=sa.text("0"),
    )
    op.create_table(
        "checkpoints",
        name("The consumer's name (a subscription's name), as a space is named.", column="name"),
        sa.Column(
            "position",
            sa.BigInteger(),
            nullable=False,
            comment="The feed position the consumer has processed up to (events.position); it "
            "never moves backwards.",
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            nullable=False,
            comment="When the checkpoint was last saved (UTC; text YYYY-MM-DD HH:MM:SS.ffffff "
            "on SQLite).",
        ),
        name(
            "Node id of the lease holder whose fenced save wrote it last (the lease "
            "subscription:<name>); NULL when saved without a fence.",
            nullable=True,
            column="holder",
        ),
        sa.Column(
            "generation",
            sa.BigInteger(),
            nullable=True,
            comment="Generation of that lease (fencing token); NULL when saved without a fence.",
        ),
        sa.CheckConstraint("position >= 0", name=op.f("checkpoints_position_check")),
        sa.PrimaryKeyConstraint("name", name=op.f("checkpoints_pkey")),
        comment=CHECKPOINTS_COMMENT,
    )
    if postgres:
        op.execute(CREATE_PLACE_FEED)
        op.execute(PLACE_FEED_COMMENT)


def downgrade() -> None:
    if op.get_context().dialect.name == "postgresql":
        op.execute("DROP FUNCTION shard_sql_place_feed()")
        op.create_table_comment("events", OLD_EVENTS_COMMENT, existing_comment=EVENTS_COMMENT)
    op.drop_table("checkpoints")
    op.drop_index("events_unplaced_idx", table_name="events")
    op.drop_index("events_position_key", table_name="events")
    with op.batch_alter_table("events") as batch:
        batch.drop_column("position")
