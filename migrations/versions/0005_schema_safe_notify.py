"""the notify trigger's function finds its tables whatever the writer's search path

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-08 00:00:00

PostgreSQL: `shard_sql_notify_applied()` (0003) read `intents` through the search path of the
session that inserted the event. A store in a schema of its own (`schema=`) writes on a host's
connection too (`store.transaction(session)`), whose search path is the host's: the function's
search path is now pinned to the schema of the tables, as `shard_sql_place_feed()`'s is, and
its default notification channel is that schema's (`shard_sql`, or `shard_sql_<schema>` outside
`public`), so stores in two schemas never wake each other.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NOTIFY_LIMIT = 7900
"""Bytes: PostgreSQL refuses a notification payload of 8000 bytes or more."""

NOTIFY_EVENT = """CREATE OR REPLACE FUNCTION shard_sql_notify_applied() RETURNS trigger
LANGUAGE plpgsql{settings} AS $fn$
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
        IF octet_length(body) <= {limit} THEN
            PERFORM pg_notify(COALESCE(target, '{channel}'), 'e:' || body);
        ELSE
            PERFORM pg_notify(COALESCE(target, '{channel}'), 'a:' || NEW.space);
        END IF;
    END IF;
    RETURN NULL;
END $fn$"""
"""The function of 0003; `settings` pins the search path, `channel` is the default channel."""


def channel(schema: str | None) -> str:
    """The notification channel of the stores whose tables are in `schema` (see
    shard_sql/sql/listener.py)."""
    return "shard_sql" if schema in (None, "public") else f"shard_sql_{schema}"


def upgrade() -> None:
    if op.get_context().dialect.name != "postgresql":
        return
    schema = op.get_context().version_table_schema
    pinned = NOTIFY_EVENT.format(
        settings="\nSET search_path = %I, pg_temp", limit=NOTIFY_LIMIT, channel=channel(schema)
    ).replace("$fn$", "$body$")
    # The schema the tables are in: the first of the search path when the migration runs.
    op.execute(f"DO $do$ BEGIN EXECUTE format($f${pinned}\n$f$, current_schema()); END $do$")


def downgrade() -> None:
    if op.get_context().dialect.name != "postgresql":
        return
    op.execute(NOTIFY_EVENT.format(settings="", limit=NOTIFY_LIMIT, channel="shard_sql"))
