"""`PayloadReads` for SQL stores: a space's events and the feed as `(seq, type, payload)` and
`(position, space, type, payload)` rows, the columns a reader of payloads needs and nothing else
to fetch or convert (no `Event`, no time to parse). A part of `SqlEventStore`, kept in its own
module for size; the statements are the dialect's."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from shard_sql.ports import PayloadReads
from shard_sql.sql.connections import Database
from shard_sql.sql.dialects import Conn
from shard_sql.sql.dialects.base import Dialect
from shard_sql.sql.errors import Site, guarded
from shard_sql.validation import check_position, check_seq, check_stored_space, check_types

__all__ = ["SqlPayloadReads"]


class SqlPayloadReads(PayloadReads):
    """The store sets the attributes below."""

    database: Database
    _site: Site
    _dialect: Dialect

    @guarded
    def event_payloads(
        self, space: str, *, from_seq: int = 0, limit: int | None = None
    ) -> list[tuple[int, str, dict[str, Any]]]:
        check_stored_space(space)
        check_seq("from_seq", from_seq)
        if limit is not None and check_seq("limit", limit) == 0:
            return []
        return self.database.call(self._read_payloads, space, from_seq, limit)

    def _read_payloads(
        self, c: Conn, space: str, from_seq: int, limit: int | None
    ) -> list[tuple[int, str, dict[str, Any]]]:
        cur, d = c.cur, self._dialect
        if limit is None:
            cur.execute(d.payloads_sql, (space, from_seq))
        else:
            cur.execute(d.payloads_limit_sql, (space, from_seq, limit))
        return d.to_payloads(cur.fetchall())

    @guarded
    def feed_payloads(
        self, after: int = 0, *, limit: int | None = None, types: Collection[str] | None = None
    ) -> list[tuple[int, str, str, dict[str, Any]]]:
        check_position("after", after)
        if limit is not None and check_position("limit", limit) == 0:
            return []
        wanted = check_types(types)
        if wanted is not None and not wanted:
            return []
        return self.database.call(self._feed_payloads, after, limit, wanted)

    def _feed_payloads(
        self, c: Conn, after: int, limit: int | None, types: frozenset[str] | None
    ) -> list[tuple[int, str, str, dict[str, Any]]]:
        d = self._dialect
        d.place_feed(c)  # committed before the read below starts, as `feed` does
        c.cur.execute(*d.feed_statement(after, limit, types, d.feed_payloads_sql))
        return d.to_payloads(c.cur.fetchall())
