"""shard_sql's tables as SQLAlchemy 2 ORM models: read models for a host application's own
`Session` queries (writes go through the store), and the source the migrations are checked
against. `include_object` keeps a host's alembic autogenerate off these tables.

Recipes: docs/embedding.md; types per database: docs/dba.md.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    DateTime,
    Identity,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    TypeDecorator,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.sql.schema import SchemaItem

from shard_sql.values import Event, new_event

__all__ = [
    "CHECKPOINTS",
    "EVENTS",
    "INTENTS",
    "LEASES",
    "NAME_LENGTH",
    "SCHEMA_REVISION",
    "TABLES",
    "VERSION_TABLE",
    "Base",
    "CheckpointRecord",
    "EventRecord",
    "IntentRecord",
    "LeaseRecord",
    "UtcDateTime",
    "checkpoints_table",
    "events_table",
    "include_object",
    "intents_table",
    "leases_table",
    "metadata",
]

SCHEMA_REVISION = "0006"
"""The alembic head revision these models describe.

A store compares it with the database's version row when it opens, without loading alembic.
`tests/test_sql_migrations.py` checks that it names the one head of `migrations/versions/`:
bump it with every new revision.
"""

VERSION_TABLE = "shard_sql_version"
"""alembic's version table: shard_sql's own name, so the log can live in a host application's
database beside that application's alembic history."""

NAME_LENGTH = 200
"""Spaces, types, holders and intent ids are at most 200 characters (see `validation`)."""

EVENTS = "events"
LEASES = "leases"
INTENTS = "intents"
CHECKPOINTS = "checkpoints"
PLACE_FEED = "shard_sql_place_feed"
"""PostgreSQL: the function that places committed events in the feed (migration 0004)."""
APPEND_PLACED = "shard_sql_append_placed"
"""PostgreSQL: the function that appends events and places them before its commit (0006)."""
TABLES = frozenset({EVENTS, LEASES, INTENTS, CHECKPOINTS, VERSION_TABLE})
"""The name of every table shard_sql's migrations create, its version table included."""
ROUTINES = frozenset(
    {PLACE_FEED, APPEND_PLACED, "shard_sql_notify_applied", "events_notify_applied"}
)
"""PostgreSQL: shard_sql's functions and its trigger."""


class UtcDateTime(TypeDecorator[datetime]):
    """`DateTime(timezone=True)` read as an aware UTC `datetime` on every database (SQLite keeps
    UTC text without a zone); an aware value bound in a query is converted to UTC first."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is not None:
            return value.astimezone(UTC)
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value if value.tzinfo is UTC else value.astimezone(UTC)


def _name(comment: str, *, nullable: bool = False) -> Mapped[Any]:
    return mapped_column(
        String(NAME_LENGTH).with_variant(String(NAME_LENGTH, collation="C"), "postgresql"),
        nullable=nullable,
        comment=comment,
    )


class Base(DeclarativeBase):
    metadata = MetaData(
        naming_convention={
            "pk": "%(table_name)s_pkey",
            "ck": "%(table_name)s_%(constraint_name)s_check",
            "uq": "%(table_name)s_%(column_0_N_name)s_key",
            "ix": "%(table_name)s_%(column_0_N_name)s_idx",
        }
    )


EVENTS_COMMENT = (
    "shard_sql event log: append-only, one gapless sequence per space. Rows are never deleted "
    "and never updated, but for position, set once; the primary key (space, seq) is the "
    "compare-and-set of an append."
)
POSITION_COMMENT = (
    "Place in the store-wide feed: 1, 2, 3, ... across every space, gaps allowed, never "
    "changed once set. SQLite: set by the append. PostgreSQL: NULL until "
    "shard_sql_place_feed() places the committed row; read the feed only after calling it."
)


class EventRecord(Base):
    """One event of a space's log (read model: a host's `Session` may query it; writes go through
    the store). On PostgreSQL `position` is None until the feed placed the row."""

    __tablename__ = EVENTS
    __table_args__ = (
        PrimaryKeyConstraint("space", "seq"),
        Index(
            "events_space_intent_id_key",
            "space",
            "intent_id",
            unique=True,
            postgresql_where=text("intent_id IS NOT NULL"),
            sqlite_where=text("intent_id IS NOT NULL"),
        ),
        Index("events_position_key", "position", unique=True),
        # PostgreSQL: the rows the feed has not placed yet. SQLite sets every position in the
        # append: an index kept empty (WHERE 0), so that no insert pays for it.
        Index(
            "events_unplaced_idx",
            "space",
            "seq",
            postgresql_where=text("position IS NULL"),
            sqlite_where=text("0"),
        ),
        CheckConstraint("seq >= 0", name="seq"),
        CheckConstraint("generation >= 0", name="generation"),
        {"comment": EVENTS_COMMENT},
    )

    space: Mapped[str] = _name("The log this event belongs to (1-200 characters).")
    seq: Mapped[int] = mapped_column(
        BigInteger,
        comment="Position in the space: 0, 1, 2, ... with no gaps. head = max(seq) + 1.",
    )
    type: Mapped[str] = _name("Event type, e.g. alias.set, binding.made, page.forked.")
    payload: Mapped[dict[str, Any]] = mapped_column(
        JSON().with_variant(JSONB(), "postgresql"),
        nullable=False,
        comment="The event's data: a JSON object (JSONB on PostgreSQL, JSON text on SQLite).",
    )
    recorded_at: Mapped[datetime] = mapped_column(
        UtcDateTime(),
        nullable=False,
        comment="When the event was written (UTC; text YYYY-MM-DD HH:MM:SS.ffffff on SQLite).",
    )
    writer: Mapped[str] = _name(
        "Node id of the lease holder that wrote the event; empty if written without a lease."
    )
    generation: Mapped[int] = mapped_column(
        BigInteger,
        nullable=False,
        comment="Lease generation (fencing token) the event was written under; 0 without a lease.",
    )
    intent_id: Mapped[str | None] = _name(
        "The caller's idempotency key, unique per space when set: a retried append "
        "with the same key returns this event instead of writing again.",
        nullable=True,
    )
    position: Mapped[int | None] = mapped_column(
        BigInteger, nullable=True, comment=POSITION_COMMENT
    )

    def to_event(self) -> Event:
        """This row as the `Event` the store returns."""
        event: Event = new_event(
            self.space, self.seq, self.type, self.payload, self.recorded_at, self.writer,
            self.generation, self.intent_id, self.position,
        )  # fmt: skip
        return event


class LeaseRecord(Base):
    """The lease record of a space: who may append to it, until when, under which generation
    (read model; leases are granted through `LeaseRegistry`)."""

    __tablename__ = LEASES
    __table_args__ = (
        PrimaryKeyConstraint("space"),
        CheckConstraint("generation >= 1", name="generation"),
        {
            "comment": (
                "shard_sql append leases: at most one holder per space at a time. Rows are "
                "updated by compare-and-set and never deleted, so the generation never resets."
            )
        },
    )

    space: Mapped[str] = _name("The space this lease grants appends to.")
    holder: Mapped[str] = _name("Node id of the current or last holder.")
    expires_at: Mapped[datetime] = mapped_column(
        UtcDateTime(),
        nullable=False,
        comment="The lease is valid while now < expires_at (UTC); release sets it to now.",
    )
    generation: Mapped[int] = mapped_column(
        BigInteger,
        nullable=False,
        comment="Fencing token: +1 at every new grant (new holder, or after lapse, release or "
        "revoke); a renewal keeps it. Appends check holder and generation, not expiry.",
    )


CHECKPOINTS_COMMENT = (
    "shard_sql feed consumers: how far each named consumer has processed the feed. A save "
    "never moves a position backwards; it is written in the consumer's transaction, with the "
    "consumer's own writes."
)


class IntentRecord(Base):
    """An append forwarded to a space's holder by a node in another process or host, waiting to
    be applied (read model; see `shard_sql.sql.intents`)."""

    __tablename__ = INTENTS
    __table_args__ = (
        PrimaryKeyConstraint("id"),
        UniqueConstraint("space", "intent_id"),
        Index("intents_space_id_idx", "space", "id"),
        {
            "comment": (
                "shard_sql forwarded appends waiting for the space's lease holder. An intent is "
                "applied when an event with its intent_id exists in its space (written by the "
                "holder, in order of id); the holder then deletes the row. A row whose event "
                "exists is garbage, swept by the next holder."
            )
        },
    )

    id: Mapped[int] = mapped_column(
        # INTEGER on SQLite: the rowid, max + 1 at every insert; an identity on PostgreSQL.
        BigInteger().with_variant(Integer(), "sqlite"),
        Identity(),
        comment="Arrival order: the holder applies a space's pending intents by increasing id.",
    )
    space: Mapped[str] = _name("The space the forwarded append is for.")
    intent_id: Mapped[str] = _name(
        "The append's idempotency key; its event in `events` has the same intent_id "
        "(the caller's, or generated for it: fwd-<uuid>)."
    )
    type: Mapped[str] = _name("Event type of the forwarded append.")
    payload: Mapped[dict[str, Any]] = mapped_column(
        JSON().with_variant(JSONB(), "postgresql"),
        nullable=False,
        comment="The forwarded event's data: a JSON object (JSONB on PostgreSQL, JSON text on "
        "SQLite), checked before it was recorded.",
    )
    submitted_at: Mapped[datetime] = mapped_column(
        UtcDateTime(),
        nullable=False,
        comment="When the intent was recorded (UTC; the server's clock on PostgreSQL, the "
        "sender's on SQLite, text YYYY-MM-DD HH:MM:SS.ffffff).",
    )
    holder: Mapped[str] = _name(
        "Node id of the lease holder the sender forwarded to. Informative: whichever node holds "
        "the space applies it."
    )
    reply_to: Mapped[str | None] = mapped_column(
        String(63),
        nullable=True,
        comment="PostgreSQL: the notification channel (LISTEN) of the sender, where the trigger "
        "events_notify_applied announces the intent's event; NULL: channel shard_sql.",
    )


class CheckpointRecord(Base):
    """How far a named consumer of the feed has processed it (read model; saved by
    `tx.save_checkpoint`)."""

    __tablename__ = CHECKPOINTS
    __table_args__ = (
        PrimaryKeyConstraint("name"),
        CheckConstraint("position >= 0", name="position"),
        {"comment": CHECKPOINTS_COMMENT},
    )

    name: Mapped[str] = _name("The consumer's name (a subscription's name), as a space is named.")
    position: Mapped[int] = mapped_column(
        BigInteger,
        nullable=False,
        comment="The feed position the consumer has processed up to (events.position); it "
        "never moves backwards.",
    )
    updated_at: Mapped[datetime] = mapped_column(
        UtcDateTime(),
        nullable=False,
        comment="When the checkpoint was last saved (UTC; text YYYY-MM-DD HH:MM:SS.ffffff on "
        "SQLite).",
    )
    holder: Mapped[str | None] = _name(
        "Node id of the lease holder whose fenced save wrote it last (the lease "
        "subscription:<name>); NULL when saved without a fence.",
        nullable=True,
    )
    generation: Mapped[int | None] = mapped_column(
        BigInteger,
        nullable=True,
        comment="Generation of that lease (fencing token); NULL when saved without a fence.",
    )


metadata = Base.metadata
"""The `MetaData` of every shard_sql table."""
events_table = EventRecord.__table__
leases_table = LeaseRecord.__table__
intents_table = IntentRecord.__table__
checkpoints_table = CheckpointRecord.__table__


def include_object(
    obj: SchemaItem,
    name: str | None,
    type_: str,
    reflected: bool,
    compare_to: SchemaItem | None,
) -> bool:
    """For a host application's alembic `env.py`, `context.configure(...,
    include_object=include_object)`: its `--autogenerate` and `alembic check` then leave
    shard_sql's tables (and their columns, indexes, constraints), its version table, functions
    and trigger alone. The host's own tables are compared as usual, even one named `events` when
    shard_sql lives in another PostgreSQL schema (docs/embedding.md).

    Excluded: a table found in the database by one of shard_sql's names that the host's models
    do not declare; anything of shard_sql's own `metadata` (a host that lists it in
    `target_metadata`); objects named like shard_sql's functions and trigger (extensions such
    as alembic_utils pass those)."""
    table = obj if isinstance(obj, Table) else getattr(obj, "table", None)
    if isinstance(table, Table):
        if table.metadata is metadata:
            return False
        return not (type_ == "table" and reflected and compare_to is None and name in TABLES)
    return name is None or name.partition("(")[0] not in ROUTINES
