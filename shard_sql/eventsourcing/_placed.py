"""PostgreSQL: one aggregate's events written and placed in the feed in one transaction.

An application recorder returns the notification ids (feed positions) of what it writes. A
PostgreSQL append leaves its rows unplaced, so `append_many` and then `feed_head()` are two
commits, each waiting for the disk flush, and a read to learn the positions.
`PostgresDialect.append_placed` does the three in one statement (`shard_sql_append_placed()`,
migration 0006): one round trip, one commit (docs/eventsourcing.md).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING

from eventsourcing.persistence import OperationalError

from shard_sql.errors import SeqConflict, ShardSqlError
from shard_sql.ports import FeedStore
from shard_sql.validation import Pending

if TYPE_CHECKING:
    from shard_sql.sql.store import SqlEventStore

_now = datetime.now


class PlacedAppends:
    """`append_many` for a store whose dialect places in the write's transaction; None for a
    store that does not (`placed_appends`)."""

    def __init__(self, store: SqlEventStore) -> None:
        from shard_sql.sql.errors import translate

        self.store = store
        self.db = store.database
        self._append = store.database.dialect.append_placed  # type: ignore[attr-defined]
        self._translate = translate

    def __call__(self, space: str, batch: list[Pending], seq: int) -> list[int] | None:
        """Write `batch` (checked, as `space` and `seq`, by the caller: `store.write`'s
        arguments) at `seq`; their positions, or None when they were left for the next placement
        (`placed_later` reads them)."""
        db = self.db
        try:
            got = db.call(self._append, space, batch, seq, _now(UTC), retry=False)
        except ShardSqlError:
            raise
        except Exception as e:
            err = self._translate(e, db.site, space=space, expected_seq=seq)
            if err is None:
                raise
            raise err from e
        if got is None:
            raise SeqConflict(space, seq)
        self.store.feed_committed()  # wake the feed's waiters, as the store's writes do
        if None in got:
            return None  # another session held the placement's lock: placed after the commit
        return got  # type: ignore[no-any-return]


def placed_later(store: FeedStore, runs: list[tuple[str, int, int]]) -> list[int]:
    """The positions of events committed unplaced, `(space, first seq, count)` per run:
    `feed_head` places them (PostgreSQL places events after their commit), then they are read."""
    store.feed_head()
    ids: list[int | None] = []
    for space, seq, n in runs:
        ids.extend(e.position for e in store.events(space, from_seq=seq, limit=n))
    placed = [i for i in ids if i is not None]
    if len(placed) != sum(n for _, _, n in runs):
        raise OperationalError("events were written but the feed has not placed them")
    return placed


def placed_appends(store: FeedStore) -> PlacedAppends | None:
    """`PlacedAppends` for a PostgreSQL store, else None."""
    database = getattr(store, "database", None)
    dialect = getattr(database, "dialect", None)
    if dialect is None or not callable(getattr(dialect, "append_placed", None)):
        return None
    return PlacedAppends(store)  # type: ignore[arg-type]
