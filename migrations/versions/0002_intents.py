"""forwarded intents

Revision ID: 0002
Revises: 0001
Create Date: 2026-01-02 00:00:00

The `intents` table: appends forwarded to a space's lease holder by nodes in other processes or
hosts, waiting to be applied (see shard_sql/orm.py and shard_sql/sql/intents.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def name(comment: str, *, column: str) -> sa.Column[str]:
    return sa.Column(
        column,
        sa.String(200).with_variant(sa.String(200, collation="C"), "postgresql"),
        nullable=False,
        comment=comment,
    )


def upgrade() -> None:
    op.create_table(
        "intents",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            sa.Identity(),
            nullable=False,
            comment="Arrival order: the holder applies a space's pending intents by increasing id.",
        ),
        name("The space the forwarded append is for.", column="space"),
        name(
            "The append's idempotency key; its event in `events` has the same intent_id "
            "(the caller's, or generated for it: fwd-<uuid>).",
            column="intent_id",
        ),
        name("Event type of the forwarded append.", column="type"),
        sa.Column(
            "payload",
            sa.JSON().with_variant(postgresql.JSONB(), "postgresql"),
            nullable=False,
            comment="The forwarded event's data: a JSON object (JSONB on PostgreSQL, JSON text "
            "on SQLite), checked before it was recorded.",
        ),
        sa.Column(
            "submitted_at",
            sa.DateTime(timezone=True),
            nullable=False,
            comment="When the intent was recorded (UTC; the server's clock on PostgreSQL, the "
            "sender's on SQLite, text YYYY-MM-DD HH:MM:SS.ffffff).",
        ),
        name(
            "Node id of the lease holder the sender forwarded to. Informative: whichever node "
            "holds the space applies it.",
            column="holder",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("intents_pkey")),
        sa.UniqueConstraint("space", "intent_id", name=op.f("intents_space_intent_id_key")),
        comment="shard_sql forwarded appends waiting for the space's lease holder. An intent is "
        "applied when an event with its intent_id exists in its space (written by the holder, "
        "in order of id); the holder then deletes the row. A row whose event exists is garbage, "
        "swept by the next holder.",
    )
    op.create_index(op.f("intents_space_id_idx"), "intents", ["space", "id"])
    if op.get_bind().dialect.name == "postgresql":
        for statement in NOTIFY_APPLIED:
            op.execute(statement)


NOTIFY_APPLIED = (
    """CREATE FUNCTION shard_sql_notify_applied() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM intents WHERE space = NEW.space AND intent_id = NEW.intent_id) THEN
        PERFORM pg_notify('shard_sql', 'a:' || NEW.space);
    END IF;
    RETURN NULL;
END $$""",
    "COMMENT ON FUNCTION shard_sql_notify_applied() IS 'shard_sql: wakes the nodes waiting "
    "for a forwarded append (LISTEN shard_sql) when its event is written.'",
    "CREATE TRIGGER events_notify_applied AFTER INSERT ON events FOR EACH ROW "
    "WHEN (NEW.intent_id IS NOT NULL) EXECUTE FUNCTION shard_sql_notify_applied()",
    "COMMENT ON TRIGGER events_notify_applied ON events IS 'shard_sql: an event whose intent was "
    "forwarded (a row in intents) sends NOTIFY shard_sql, ''a:<space>'', at commit. Appends "
    "without intent id do not run it.'",
)
"""PostgreSQL: the event of a forwarded intent notifies its waiting forwarders when it commits.

Only appends with an intent id run the function (the trigger's WHEN), and only those whose intent
is queued notify, so plain appends never take NOTIFY's commit lock."""


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER events_notify_applied ON events")
        op.execute("DROP FUNCTION shard_sql_notify_applied()")
    op.drop_index("intents_space_id_idx", table_name="intents")
    op.drop_table("intents")
