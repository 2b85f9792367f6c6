"""Forwarded intents in SQL: the `intents` table as an `IntentQueue` (with PostgreSQL's inbox of
notified intents, `IntentInbox`), for `SqlEventStore`. How and why: docs/sql.md."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

from shard_sql.errors import InvalidEvent, StoreUnavailable
from shard_sql.ports import IntentInbox, IntentQueue, SpaceWakeups, system_clock
from shard_sql.sql.connections import Database
from shard_sql.sql.dialects import Conn
from shard_sql.sql.errors import guarded
from shard_sql.sql.listener import Listener
from shard_sql.store_base import checked_intent_ids, checked_wait
from shard_sql.validation import Pending, check_intent_id, check_seq, check_space, check_text
from shard_sql.validation import pending as checked_pending
from shard_sql.values import Event

__all__ = ["FORGET_CHUNK", "SqlIntentQueue"]

log = logging.getLogger("shard_sql.sql")

FORGET_CHUNK = 500
MAX_WARNED = 10_000


class SqlIntentQueue(IntentQueue, IntentInbox, SpaceWakeups):
    """The `intents` table of one database, and the waits for what arrives in it.

    An intent is applied when its event exists (the unique `(space, intent_id)` index on
    `events` makes a second application impossible); its record is then garbage, deleted by the
    holder (`forget_intents`) or swept by the next read (`pending_intents`).
    """

    def __init__(self, db: Database) -> None:
        self._db = db
        self._site = db.site
        self.waits = db.dialect.waits(db.engine.url, db.dedicated_connection, db.site)
        self._warned: set[tuple[str, int]] = set()
        self._waiting = threading.local()

    @property
    def listener(self) -> Listener | None:
        """PostgreSQL: this process's notification listener, once a wait started it."""
        return self.waits.listener

    def close(self) -> None:
        self.waits.close()

    # -- recording and reading intents -------------------------------------------------------

    @guarded
    def put_intent(self, space: str, item: Pending, *, holder: str) -> None:
        """Record `item` durably unless it is recorded or applied already; wake the holder."""
        check_space(space)
        check_text("holder", holder)
        intent_id = check_intent_id(item.intent_id) if isinstance(item, Pending) else None
        if intent_id is None:
            raise InvalidEvent("intent_id", "a forwarded intent needs one")
        reply_to = self.waits.before_put(space, intent_id)
        sql, params = self._db.dialect.put_intent(space, item, holder, reply_to, system_clock())
        inserted = self._db.call(self._put, sql, params)
        self._awaited()[space] = intent_id
        self.waits.after_put(space, intent_id, inserted)

    def _put(self, c: Conn, sql: str, params: tuple[Any, ...]) -> bool:
        with self._db.dialect.relaxed(c):
            c.cur.execute(sql, params)
            return bool(c.cur.rowcount)

    @guarded
    def find_intent(self, space: str, intent_id: str) -> Event | None:
        """The event written for `intent_id` in `space`, if any."""
        check_space(space)
        if check_intent_id(intent_id) is None:
            raise InvalidEvent("intent_id", "must be a string")
        found, _ = self.waits.take_event(space, intent_id)
        if found is None:
            found = self._db.call(self._db.dialect.events_by_intent, space, [intent_id]).get(
                intent_id
            )
            self.waits.was_read(space, intent_id, found is not None)
        if found is not None:
            self._found(space, intent_id)
        return found

    def _awaited(self) -> dict[str, str]:
        """This thread's spaces where it waits for an intent it recorded (by its intent id)."""
        try:
            out: dict[str, str] = self._waiting.spaces
        except AttributeError:
            out = self._waiting.spaces = {}
        return out

    def _found(self, space: str, intent_id: str) -> None:
        awaited = self._awaited()
        if awaited.get(space) == intent_id:
            del awaited[space]

    @guarded
    def pending_intents(self, space: str, *, limit: int) -> list[Pending]:
        """Unapplied intents of `space` in arrival order, at most `limit`; applied records met on
        the way are deleted."""
        check_space(space)
        if check_seq("limit", limit) == 0:
            return []
        token = self.waits.begin_read(space)
        found, swept = self._db.call(self._pending, space, limit)
        if token is not None:
            self.waits.end_read(space, token, found, complete=len(found) < limit)
        if swept:
            self.waits.applied(space)
        return found

    def _pending(self, c: Conn, space: str, limit: int) -> tuple[list[Pending], bool]:
        out: list[Pending] = []
        applied: list[str] = []
        after = 0
        while len(out) < limit:
            want = limit - len(out)
            c.cur.execute(self._db.dialect.pending_intents_sql, (space, after, want))
            rows = c.cur.fetchall()
            for row_id, intent_id, type_, payload, done in rows:
                after = row_id
                if done:
                    applied.append(intent_id)
                    continue
                item = self._checked(space, row_id, intent_id, type_, payload)
                if item is not None:
                    out.append(item)
            if len(rows) < want:
                break
        if applied:
            self._forget(c, space, applied)
        return out, bool(applied)

    def _checked(
        self, space: str, row_id: int, intent_id: Any, type_: Any, payload: Any
    ) -> Pending | None:
        """A row as a `Pending` checked again (it may have been written by hand, or corrupted);
        None, with one warning per row, for a row that cannot be applied."""
        try:
            return checked_pending(type_, self._db.dialect.payload(payload), intent_id)
        except (InvalidEvent, ValueError, TypeError, RecursionError) as e:
            key = (space, row_id)
            if key not in self._warned:
                if len(self._warned) > MAX_WARNED:
                    self._warned.clear()
                self._warned.add(key)
                log.warning(
                    "%s: forwarded intent id=%s of space %r cannot be applied (%s); skipped. "
                    "An operator removes it with: DELETE FROM %s WHERE id = %s",
                    self._site,
                    row_id,
                    space,
                    e,
                    self._db.dialect.t.intents,
                    row_id,
                )
            return None

    @guarded
    def forget_intents(self, space: str, intent_ids: Sequence[str]) -> None:
        """Delete the records of these intents that are applied; wake the waiting forwarders."""
        check_space(space)
        ids = checked_intent_ids(intent_ids)
        if not ids:
            return
        self.waits.drop(space, ids)
        self._db.call(self._forget, space, ids)
        self.waits.applied(space)

    def _forget(self, c: Conn, space: str, ids: list[str]) -> None:
        # A delete lost in a crash leaves a record of an applied intent, which the next
        # `pending_intents` sweeps: it need not wait for the disk.
        with self._db.dialect.relaxed(c):
            for start in range(0, len(ids), FORGET_CHUNK):
                self._db.dialect.forget_intents(c, space, ids[start : start + FORGET_CHUNK])

    # -- the inbox (`IntentInbox`) and wake-ups (`SpaceWakeups`) -------------------------------

    def wakes_per_space(self) -> bool:
        """PostgreSQL (notifications per space), a SQLite file with wake-up files."""
        return self.waits.per_space()

    def notified_intents(self, space: str, *, limit: int) -> list[Pending] | None:
        """PostgreSQL: the space's pending intents as their notifications brought them, without
        a read, when this store's listener has every one since its last `pending_intents` (less
        than `INBOX_RESYNC` seconds ago); else None: call `pending_intents`. May include intents
        applied meanwhile by another node (writing one again returns its event). SQLite: None."""
        return self.waits.notified(check_space(space), check_seq("limit", limit))

    def awaited_event(self, space: str, intent_id: str) -> tuple[Event | None, bool]:
        """PostgreSQL, for an intent this store recorded: (its event as its notification
        brought it, True), or (None, True) when it is surely not written yet (the listener has
        been up since the intent was recorded and would have brought it), or (None, False):
        unknown, call `find_intent`. SQLite: (None, False)."""
        event, sure = self.waits.take_event(space, intent_id)
        if event is not None:
            self._found(space, intent_id)
        return event, sure

    def drop_notified(self, space: str, intent_ids: Sequence[str]) -> None:
        """These intents are applied: out of the inbox (their records stay until forgotten)."""
        self.waits.drop(space, intent_ids)

    def watch_intents(self, callback: Callable[[str], bool]) -> Callable[[], None]:
        """PostgreSQL: `callback(space)` runs on the listener thread for every intent notified
        in `space`; when it returns True (it applied them), the intent wakes no waiter. SQLite:
        never (there are no notifications); the holder's thread polls."""
        return self.waits.watch(callback)

    # -- waiting -------------------------------------------------------------------------------

    def wait_for_change(self, spaces: Sequence[str], timeout: float) -> None:
        """Block until an intent or event may have arrived in `spaces`, or `timeout` passes."""
        names = checked_wait(spaces, timeout)
        if self._db.closed:
            raise StoreUnavailable(f"{self._site}: the store is closed")
        self.waits.wait(names, float(timeout), self._awaited())
