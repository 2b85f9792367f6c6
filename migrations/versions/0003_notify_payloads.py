"""notifications carry the applied event, to its sender only

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25 00:00:00

`intents.reply_to`: the sender's notification channel. PostgreSQL: `shard_sql_notify_applied()`,
run by the trigger `events_notify_applied` when the event of a queued intent is written, sends
the event itself (`e:<json>`) when it fits in a notification, so the waiting sender has its
answer without a read (`a:<space>` as before otherwise), on the sender's channel (`shard_sql`
when it has none). See shard_sql/sql/intents.py.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NOTIFY_LIMIT = 7900
"""Bytes: PostgreSQL refuses a notification payload of 8000 bytes or more."""

NOTIFY_EVENT = f"""CREATE OR REPLACE FUNCTION shard_sql_notify_applied() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    target text;
    body text;
BEGIN
    SELECT reply_to INTO target FROM intents
    WHERE space = NEW.space AND intent_id = NEW.intent_id;
    IF FOUND THEN
        body := json_build_object(
            's', NEW.space, 'q', NEW.seq, 't', NEW.type, 'p', NEW.payload,
            'r', (extract(epoch FROM NEW.recorded_at) * 1000000)::bigint,
            'w', NEW.writer, 'g', NEW.generation, 'i', NEW.intent_id)::text;
        IF octet_length(body) <= {NOTIFY_LIMIT} THEN
            PERFORM pg_notify(COALESCE(target, 'shard_sql'), 'e:' || body);
        ELSE
            PERFORM pg_notify(COALESCE(target, 'shard_sql'), 'a:' || NEW.space);
        END IF;
    END IF;
    RETURN NULL;
END $$"""

NOTIFY_SPACE = """CREATE OR REPLACE FUNCTION shard_sql_notify_applied() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM intents WHERE space = NEW.space AND intent_id = NEW.intent_id) THEN
        PERFORM pg_notify('shard_sql', 'a:' || NEW.space);
    END IF;
    RETURN NULL;
END $$"""

COMMENT = (
    "COMMENT ON FUNCTION shard_sql_notify_applied() IS 'shard_sql: wakes the nodes waiting "
    "for a forwarded append when its event is written: NOTIFY on the channel of intents.reply_to "
    "(or shard_sql) with ''e:<the event as JSON>'', or ''a:<space>'' when that would not fit.'"
)


def upgrade() -> None:
    op.add_column(
        "intents",
        sa.Column(
            "reply_to",
            sa.String(63),
            nullable=True,
            comment="PostgreSQL: the notification channel (LISTEN) of the sender, where the "
            "trigger events_notify_applied announces the intent's event; NULL: channel shard_sql.",
        ),
    )
    if op.get_bind().dialect.name == "postgresql":
        op.execute(NOTIFY_EVENT)
        op.execute(COMMENT)


def downgrade() -> None:
    with op.batch_alter_table("intents") as batch:
        batch.drop_column("reply_to")
    if op.get_bind().dialect.name == "postgresql":
        op.execute(NOTIFY_SPACE)
        op.execute(
            "COMMENT ON FUNCTION shard_sql_notify_applied() IS 'shard_sql: wakes the nodes "
            "waiting for a forwarded append (LISTEN shard_sql) when its event is written.'"
        )
