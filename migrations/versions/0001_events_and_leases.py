"""events and leases

Revision ID: 0001
Revises:
Create Date: 2026-01-01 00:00:00

The first schema of shard_sql: the `events` log and the `leases` records (see shard_sql/orm.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def name(comment: str, *, nullable: bool = False, column: str) -> sa.Column[str]:
    return sa.Column(
        column,
        sa.String(200).with_variant(sa.String(200, collation="C"), "postgresql"),
        nullable=nullable,
        comment=comment,
    )


def upgrade() -> None:
    op.create_table(
        "events",
        name("The log this event belongs to (1-200 characters).", column="space"),
        sa.Column(
            "seq",
            sa.BigInteger(),
            nullable=False,
            comment="Position in the space: 0, 1, 2, ... with no gaps. head = max(seq) + 1.",
        ),
        name("Event type, e.g. alias.set, binding.made, page.forked.", column="type"),
        sa.Column(
            "payload",
            sa.JSON().with_variant(postgresql.JSONB(), "postgresql"),
            nullable=False,
            comment="The event's data: a JSON object (JSONB on PostgreSQL, JSON text on SQLite).",
        ),
        sa.Column(
            "recorded_at",
            sa.DateTime(timezone=True),
            nullable=False,
            comment="When the event was written (UTC; text YYYY-MM-DD HH:MM:SS.ffffff on SQLite).",
        ),
        name(
            "Node id of the lease holder that wrote the event; empty if written without a lease.",
            column="writer",
        ),
        sa.Column(
            "generation",
            sa.BigInteger(),
            nullable=False,
            comment="Lease generation (fencing token) the event was written under; "
            "0 without a lease.",
        ),
        name(
            "The caller's idempotency key, unique per space when set: a retried append "
            "with the same key returns this event instead of writing again.",
            nullable=True,
            column="intent_id",
        ),
        sa.CheckConstraint("seq >= 0", name=op.f("events_seq_check")),
        sa.CheckConstraint("generation >= 0", name=op.f("events_generation_check")),
        sa.PrimaryKeyConstraint("space", "seq", name=op.f("events_pkey")),
        comment="shard_sql event log: append-only, one gapless sequence per space. "
        "Rows are never updated or deleted; the primary key (space, seq) is the "
        "compare-and-set of an append.",
    )
    op.create_index(
        op.f("events_space_intent_id_key"),
        "events",
        ["space", "intent_id"],
        unique=True,
        postgresql_where=sa.text("intent_id IS NOT NULL"),
        sqlite_where=sa.text("intent_id IS NOT NULL"),
    )
    op.create_table(
        "leases",
        name("The space this lease grants appends to.", column="space"),
        name("Node id of the current or last holder.", column="holder"),
        sa.Column(
            "expires_at",
            sa.DateTime(timezone=True),
            nullable=False,
            comment="The lease is valid while now < expires_at (UTC); release sets it to now.",
        ),
        sa.Column(
            "generation",
            sa.BigInteger(),
            nullable=False,
            comment="Fencing token: +1 at every new grant (new holder, or after lapse, release "
            "or revoke); a renewal keeps it. Appends check holder and generation, not expiry.",
        ),
        sa.CheckConstraint("generation >= 1", name=op.f("leases_generation_check")),
        sa.PrimaryKeyConstraint("space", name=op.f("leases_pkey")),
        comment="shard_sql append leases: at most one holder per space at a time. Rows are "
        "updated by compare-and-set and never deleted, so the generation never resets.",
    )
    if op.get_bind().dialect.name == "postgresql":
        # alembic creates its version table itself; give it the comments a DBA reads with \d+.
        version_table = op.get_context().version_table
        op.create_table_comment(
            version_table,
            "shard_sql schema revision (alembic). Change it only with `shard-sql migrate` "
            "or `alembic upgrade head`.",
        )
        op.execute(
            f"COMMENT ON COLUMN {version_table}.version_num IS "
            "'The alembic revision the shard_sql tables are at.'"
        )


def downgrade() -> None:
    op.drop_table("leases")
    op.drop_index("events_space_intent_id_key", table_name="events")
    op.drop_table("events")
