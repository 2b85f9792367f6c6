"""`PayloadReads` for SQL stores: a space's events and the feed as rows of the columns a reader
of payloads needs, with the payload keys it asks for extracted by the database (`->>`): no
`Event` built, no payload decoded in Python, no time parsed. A part of `SqlEventStore`, kept in
its own module for size; the statements are the dialect's."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

from shard_sql.ports import PayloadReads
from shard_sql.sql.connections import Database
from shard_sql.sql.dialects import Conn
from shard_sql.sql.dialects.base import Dialect
from shard_sql.sql.errors import Site, guarded
from shard_sql.validation import check_events_read, check_feed_read, check_field_keys

__all__ = ["SqlPayloadReads"]


class SqlPayloadReads(PayloadReads):
    """The store sets the attributes below."""

    database: Database
    _site: Site
    _dialect: Dialect

    @guarded
    def event_fields(
        self, space: str, keys: Sequence[str], *, from_seq: int = 0, limit: int | None = None
    ) -> list[tuple[Any, ...]]:
        keys = check_field_keys(keys)
        if check_events_read(space, from_seq, limit):
            return []
        return self.database.call(self._read_fields, space, keys, from_seq, limit)

    def _read_fields(
        self, c: Conn, space: str, keys: tuple[str, ...], from_seq: int, limit: int | None
    ) -> list[tuple[Any, ...]]:
        d = self._dialect
        sql = d.fields_sql(len(keys), False)
        if limit is None:
            c.cur.execute(sql, (*keys, space, from_seq))
        else:
            c.cur.execute(f"{sql} LIMIT {d.p}", (*keys, space, from_seq, limit))
        return c.cur.fetchall()  # type: ignore[no-any-return]

    @guarded
    def feed_fields(
        self,
        keys: Sequence[str],
        after: int = 0,
        *,
        limit: int | None = None,
        types: Collection[str] | None = None,
    ) -> list[tuple[Any, ...]]:
        keys = check_field_keys(keys)
        nothing, wanted = check_feed_read(after, limit, types)
        if nothing:
            return []
        return self.database.call(self._feed_fields, keys, after, limit, wanted)

    def _feed_fields(
        self,
        c: Conn,
        keys: tuple[str, ...],
        after: int,
        limit: int | None,
        types: frozenset[str] | None,
    ) -> list[tuple[Any, ...]]:
        d = self._dialect
        d.place_feed(c)  # committed before the read below starts, as `feed` does
        c.cur.execute(*d.feed_statement(after, limit, types, keys))
        return c.cur.fetchall()  # type: ignore[no-any-return]
