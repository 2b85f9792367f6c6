"""The PostgreSQL listener: one thread per store with its own connection, in LISTEN, that turns
notifications into wake-ups (`Signal`) and keeps the notified intents per space (`Inbox`).
How and why: docs/sql.md."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from shard_sql.errors import InvalidEvent, StoreUnavailable
from shard_sql.sql.signals import (
    APPLIED,
    EVENT_BODY,
    FEED,
    INTENT,
    INTENT_BODY,
    MAX_TRACKED,
    Signal,
)
from shard_sql.validation import Pending
from shard_sql.validation import pending as checked_pending
from shard_sql.values import Event, new_event
from shard_sql.wake import readable

__all__ = ["CHANNEL", "FEED_CHANNEL", "Channels", "Inbox", "Listener", "intents_channel"]

log = logging.getLogger("shard_sql.sql")

CHANNEL = "shard_sql"
"""The PostgreSQL notification channel every listener LISTENs to."""
FEED_CHANNEL = f"{CHANNEL}_feed"
"""The channel of commits (`f:`), listened to while this process waits for the feed."""
NOTIFY_LIMIT = 7900
"""Bytes: a notification body larger than this is replaced by `<kind>:<space>` (PostgreSQL
refuses payloads of 8000 bytes or more); the reader then reads the table."""
CHANNEL_IDLE = 60.0
"""Seconds: a space's intents channel nobody here asked for this long is UNLISTENed."""
INBOX_IDLE = 10.0
"""Seconds: a space's inbox nobody looked at for this long is dropped."""
INBOX_MAX = 10_000
EXPECT_REREAD = 0.5
"""Seconds: a forwarder waiting for its event reads the table at least this often even though
the event's notification would tell it (a safety net, e.g. an event written by a concurrent
direct append of the same intent id, whose trigger could not see the intent yet)."""
INBOX_RESYNC = 1.0
"""Seconds: a holder reads the table at least this often even while its inbox is in sync (a
safety net; the inbox is complete by construction)."""
RECONNECT_MIN = 0.05
RECONNECT_MAX = 2.0
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class Channels:
    """The notification channels of the stores whose tables are in `schema` (None: the search
    path's): stores in two schemas of one database never hear each other. Migration 0005 gives
    `shard_sql_notify_applied()` the same `main`."""

    schema: str | None = None

    @property
    def main(self) -> str:
        """The channel every listener LISTENs to."""
        return CHANNEL if self.schema in (None, "public") else f"{CHANNEL}_{self.schema}"

    @property
    def feed(self) -> str:
        """The channel of commits (`f:`), listened to while this process waits for the feed."""
        return f"{self.main}_feed"

    @property
    def feed_notify_sql(self) -> str:
        """The feed's wake-up: sent by the notifier, or inside a host's transaction."""
        return f"SELECT pg_notify('{self.feed}', '{FEED}:')"

    def intents(self, space: str) -> str:
        """The channel of a space's intents: only its holder listens (at most 63 bytes)."""
        key = space if self.main == CHANNEL else f"{self.schema}\0{space}"
        return f"{CHANNEL}_i_{hashlib.md5(key.encode(), usedforsecurity=False).hexdigest()[:16]}"


def intents_channel(space: str) -> str:
    """The channel of a space's intents for a store without a schema."""
    return Channels().intents(space)


class Listener:
    """The PostgreSQL listener: a thread with its own connection running `LISTEN shard_sql` (the
    main channel of its store's schema)."""

    def __init__(
        self,
        connect: Callable[[], Any],
        where: str,
        watchers: Sequence[Callable[[str], bool]],
        channels: Channels,
    ) -> None:
        self._connect = connect
        self.channels = channels
        self._watchers = watchers
        self._where = where
        self.signal = Signal()
        self.signal.up = False
        self.connections = 0
        """How many times LISTEN was established (1 + reconnections)."""
        self.backend_pid: int | None = None
        """The listener connection's server process id while it is up."""
        self.lock = threading.Lock()
        """Guards `inboxes`, `expected`, `results` and `arrivals`."""
        self.inboxes: dict[str, Inbox] = {}
        """The intents notified per space, for the spaces whose pending intents this process
        reads (a holder's), see `SqlIntentQueue.notified_intents`."""
        self.expected: dict[tuple[str, str], tuple[int, float]] = {}
        """(space, intent_id) of the intents this process recorded and waits for: the listener
        connection that will bring its event's notification (0: none, read the table) and
        when the table was last read for it."""
        self.results: dict[tuple[str, str], Event] = {}
        """Their events, as notified, until `find_intent` takes them."""
        self.arrivals = 0
        self.reply_channel = f"{CHANNEL}_r_{uuid.uuid4().hex[:16]}"
        """This listener's own channel: the events of the intents its store records come here."""
        self.wanted: dict[str, float] = {}
        """The intents channels of the spaces this process holds (see `want`), with when they
        were last asked for; UNLISTENed after `CHANNEL_IDLE` seconds without."""
        self._pruned_at = time.monotonic()
        self.active: set[str] = set()
        """Those LISTENed to on the current connection."""
        self.intents = 0
        """Intents notified (with or without their body)."""
        self.applied = 0
        """Spaces whose notified intents a watcher applied on this thread."""
        self._stopping = False
        self._pid = os.getpid()
        self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(
            target=self._run, name=f"shard-sql-listener {where}", daemon=True
        )
        self._thread.start()

    def stop(self, wait: bool = True) -> None:
        """Stop the thread (and close its connection); idempotent; nothing in a forked child."""
        if self._stopping or self._pid != os.getpid():
            return
        self._stopping = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        if not wait:
            return
        self._thread.join(5)
        if not self._thread.is_alive():
            os.close(self._wake_r)
            os.close(self._wake_w)

    def _run(self) -> None:
        delay = RECONNECT_MIN
        failures = 0
        while not self._stopping:
            conn: Any = None
            try:
                conn = self._connect()
                conn.execute(f"LISTEN {self.channels.main}")
                conn.execute(f"LISTEN {self.reply_channel}")
                self._listen_wanted(conn)
                keepalive(conn.fileno())
                self.backend_pid = conn.info.backend_pid
                self.connections += 1
                if failures:
                    log.info("%s: notification listener reconnected", self._where)
                failures, delay = 0, RECONNECT_MIN
                self.signal.set_up(True)
                self._listen(conn)
            except Exception as e:
                if not self._stopping:
                    failures += 1
                    level = logging.WARNING if failures == 1 else logging.DEBUG
                    log.log(
                        level,
                        "%s: notification listener down (%s); waits poll until it is back",
                        self._where,
                        " ".join(str(e).split()) or type(e).__name__,
                    )
            finally:
                self.backend_pid = None
                with self.lock:
                    self.active.clear()
                self.signal.set_up(False)
                if conn is not None:
                    with contextlib.suppress(Exception):
                        conn.close()
            if not self._stopping:
                pause = delay * (0.5 + random.random())
                if readable([self._wake_r], pause):
                    os.read(self._wake_r, 4096)
                delay = min(delay * 2, RECONNECT_MAX)

    def _listen(self, conn: Any) -> None:
        # What arrived with the LISTEN's answer is in psycopg's backlog: read it the public way.
        self._drain([n.payload for n in conn.notifies(timeout=0)])
        sock = conn.fileno()
        pgconn = conn.pgconn
        encoding = conn.info.encoding
        while not self._stopping:
            ready = readable([sock, self._wake_r], CHANNEL_IDLE / 6)
            if time.monotonic() - self._pruned_at > CHANNEL_IDLE / 6:
                self._prune(conn)
            if self._wake_r in ready:
                os.read(self._wake_r, 4096)
                if self._stopping:
                    return
                self._listen_wanted(conn)
            if sock in ready:
                # libpq directly (https://www.postgresql.org/docs/current/libpq-notify.html):
                # PQconsumeInput, then PQnotifies until empty. A tenth of the cost of
                # `Connection.notifies(timeout=0)`, and this thread is on the path of every
                # forwarded append. A broken connection raises here: the caller reconnects.
                pgconn.consume_input()
                payloads = []
                while (n := pgconn.notifies()) is not None:
                    payloads.append(n.extra.decode(encoding))
                if payloads:
                    self._drain(payloads)
            if conn.closed or conn.broken:
                raise StoreUnavailable(f"{self._where}: the listener connection broke")

    def _drain(self, payloads: list[str]) -> None:
        changes: list[tuple[str, str]] = []
        for payload in payloads:
            kind, _, rest = payload.partition(":")
            if kind == FEED:
                changes.append((FEED, ""))
                continue
            if kind in (INTENT, APPLIED):
                if kind == INTENT:
                    self.intents += 1
                    self._unsync(rest)
                else:
                    self._stop_expecting_space(rest)
                changes.append((kind, rest))
                continue
            space = None
            if kind == INTENT_BODY:
                self.intents += 1
                space = self._intent_notified(rest)
                kind = INTENT
            elif kind == EVENT_BODY:
                space, intent_id = self._event_notified(rest)
                if space is not None:
                    changes.append((EVENT_BODY, f"{space}\0{intent_id}"))
                    continue
            if space is not None:
                changes.append((kind, space))
            else:  # not ours, or not readable: news for everyone
                self._unsync(None)
                self._stop_expecting_space(None)
                changes += ((INTENT, payload), (APPLIED, payload))
        if changes and self._watchers:
            # A watcher (a holder's `AppendAuthority`) applies the new intents here and now.
            # Other news first: forwarders of this process waiting for their events must not
            # wait for that write. Intents a watcher applied wake nobody (the holder's serving
            # thread would only find them gone).
            self.signal.changed([c for c in changes if c[0] != INTENT])
            unhandled = []
            for space in dict.fromkeys(space for kind, space in changes if kind == INTENT):
                handled = False
                for watcher in list(self._watchers):
                    try:
                        handled = watcher(space) or handled
                    except Exception as e:  # the serving thread catches up
                        log.debug("%s: intent watcher failed: %s", self._where, e)
                if handled:
                    self.applied += 1
                else:
                    unhandled.append((INTENT, space))
            changes = unhandled
        if changes:
            self.signal.changed(changes)

    def _listen_wanted(self, conn: Any) -> None:
        """LISTEN to the channels wanted and not listened to yet (on this thread, which owns the
        connection); what psycopg received meanwhile is handled."""
        with self.lock:
            todo = sorted(set(self.wanted) - self.active)
        if not todo:
            return
        for channel in todo:
            conn.execute(f"LISTEN {channel}")
        with self.lock:
            self.active.update(todo)
        self._drain([n.payload for n in conn.notifies(timeout=0)])
        # Intents recorded before the LISTEN were not announced here: the holders look again.
        self.signal.reset()

    def _prune(self, conn: Any) -> None:
        """UNLISTEN the channels of spaces nobody here asked for in `CHANNEL_IDLE` seconds (a
        space given up): each channel listened to costs the server a little on every
        notification. Their inboxes are out of sync from then on."""
        now = self._pruned_at = time.monotonic()
        with self.lock:
            stale = [ch for ch, t in self.wanted.items() if now - t > CHANNEL_IDLE]
            for channel in stale:
                del self.wanted[channel]
            drop = [ch for ch in stale if ch in self.active]
            self.active.difference_update(drop)
            if drop:
                gone = set(drop)
                for space, inbox in self.inboxes.items():
                    if self.channels.intents(space) in gone:
                        inbox.synced = 0
        for channel in drop:
            conn.execute(f"UNLISTEN {channel}")
        if drop:
            self._drain([n.payload for n in conn.notifies(timeout=0)])

    def want(self, space: str) -> bool:
        """The space's intents should come here (this process holds it); True once they do."""
        return self.want_channel(self.channels.intents(space))

    def want_channel(self, channel: str) -> bool:
        """LISTEN to `channel` (until nobody asked for `CHANNEL_IDLE` seconds); True once this
        listener does."""
        with self.lock:
            known = channel in self.wanted
            self.wanted[channel] = time.monotonic()
            if channel in self.active:
                return True
            if known:
                return False
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"l")
        return False

    def begin_sync(self, space: str) -> tuple[int, int] | None:
        """Before a read of the space's pending intents: (connection, arrivals) now; None while
        the space's intents do not come here yet."""
        if not self.want(space):
            return None
        with self.lock:
            if not self.signal.up:
                return None
            inbox = self.inboxes.get(space)
            if inbox is None:
                if len(self.inboxes) >= MAX_TRACKED:
                    self.inboxes.clear()
                inbox = self.inboxes[space] = Inbox()
            inbox.used = time.monotonic()
            return self.connections, self.arrivals

    def end_sync(
        self, space: str, token: tuple[int, int], found: list[Pending], complete: bool
    ) -> None:
        """After the read: the inbox is what was pending then plus what arrived since, if the
        listener stayed up throughout (no notification was missed) and the read saw all."""
        connection, arrivals = token
        with self.lock:
            inbox = self.inboxes.get(space)
            if inbox is None:
                return
            if not complete or not self.signal.up or self.connections != connection:
                inbox.synced = 0
                return
            items = {p.intent_id: (0, p) for p in found if p.intent_id is not None}
            for intent_id, (n, item) in inbox.items.items():
                if n > arrivals and intent_id not in items:
                    items[intent_id] = (n, item)
            inbox.items = items
            inbox.synced = connection
            inbox.synced_at = time.monotonic()

    def notified(self, space: str, limit: int) -> list[Pending] | None:
        """The space's pending intents from the inbox; None unless it is in sync."""
        with self.lock:
            inbox = self.inboxes.get(space)
            if inbox is None or not self.signal.up or inbox.synced != self.connections:
                return None
            now = time.monotonic()
            if now - inbox.synced_at > INBOX_RESYNC:
                return None
            inbox.used = now
            return [item for _, item in itertools.islice(inbox.items.values(), limit)]

    def drop(self, space: str, intent_ids: Sequence[str]) -> None:
        with self.lock:
            inbox = self.inboxes.get(space)
            if inbox is not None:
                for intent_id in intent_ids:
                    inbox.items.pop(intent_id, None)

    def expect(self, space: str, intent_id: str) -> None:
        """Before recording an intent: its event's notification will come to this listener."""
        with self.lock:
            if len(self.expected) >= MAX_TRACKED:
                self.expected.clear()
                self.results.clear()
            connection = self.connections if self.signal.up else 0
            self.expected[(space, intent_id)] = (connection, time.monotonic())

    def stop_expecting(self, space: str, intent_id: str) -> None:
        """No notification will come for it (its record was not inserted): read the table."""
        with self.lock:
            if (space, intent_id) in self.expected:
                self.expected[(space, intent_id)] = (0, 0.0)

    def take(self, space: str, intent_id: str) -> tuple[Event | None, bool]:
        """(the notified event of an expected intent, or None; True if None means "not written
        yet" for sure: the listener has been up since the intent was recorded, its event would
        have been notified, and the table was read less than `EXPECT_REREAD` seconds ago)."""
        key = (space, intent_id)
        with self.lock:
            event = self.results.pop(key, None)
            if event is not None:
                self.expected.pop(key, None)
                return event, True
            connection, read_at = self.expected.get(key, (0, 0.0))
            sure = (
                connection != 0
                and connection == self.connections
                and self.signal.up
                and time.monotonic() - read_at < EXPECT_REREAD
            )
            return None, sure

    def was_read(self, space: str, intent_id: str, found: bool) -> None:
        """The table was read for this intent: found (done with it), or not yet written."""
        key = (space, intent_id)
        with self.lock:
            if found:
                self.expected.pop(key, None)
            elif key in self.expected:
                connection, _ = self.expected[key]
                self.expected[key] = (connection, time.monotonic())

    def _stop_expecting_space(self, space: str | None) -> None:
        """An event was notified without its body (in `space`, or anywhere): the waiters there
        read the table."""
        with self.lock:
            for key in self.expected:
                if space is None or key[0] == space:
                    self.expected[key] = (0, 0.0)

    def _unsync(self, space: str | None) -> None:
        """An intent arrived without its body (in `space`, or anywhere): the inbox no longer
        holds all that is pending there; the next `pending_intents` reads the table."""
        with self.lock:
            for name, inbox in self.inboxes.items():
                if space is None or name == space:
                    inbox.synced = 0

    def _intent_notified(self, body: str) -> str | None:
        d, space, intent_id = parse_body(body)
        if space is None:
            return None
        inbox = self.inboxes.get(space)
        if inbox is None:
            return space
        try:
            item: Pending | None = checked_pending(d["t"], d["p"], intent_id)
        except (InvalidEvent, ValueError, TypeError, KeyError, RecursionError):
            item = None  # `pending_intents` reads it, warns and skips it
        now = time.monotonic()
        with self.lock:
            if now - inbox.used > INBOX_IDLE:
                self.inboxes.pop(space, None)
            elif item is None or len(inbox.items) >= INBOX_MAX:
                inbox.synced = 0
                inbox.items.clear()
            else:
                self.arrivals += 1
                inbox.items.setdefault(intent_id, (self.arrivals, item))
        return space

    def _event_notified(self, body: str) -> tuple[str | None, str]:
        """(space, intent id) of a notified event (None: unreadable); kept if awaited here."""
        d, space, intent_id = parse_body(body)
        if space is None:
            return None, ""
        try:
            key = (space, intent_id)
            event = None
            if key in self.expected:
                at = EPOCH + timedelta(microseconds=d["r"])
                event = new_event(space, d["q"], d["t"], d["p"], at, d["w"], d["g"], intent_id)
        except (ValueError, TypeError, KeyError, OverflowError, RecursionError):
            return None, ""
        with self.lock:
            inbox = self.inboxes.get(space)
            if inbox is not None:
                inbox.items.pop(intent_id, None)
            if event is not None and key in self.expected:
                self.results[key] = event
        return space, intent_id


def parse_body(body: str) -> tuple[dict[str, Any], str | None, str]:
    """A notification's JSON body, its space and intent id (space None: not readable)."""
    try:
        d = json.loads(body)
        space, intent_id = d["s"], d["i"]
    except (ValueError, TypeError, KeyError, RecursionError):
        return {}, None, ""
    if not isinstance(space, str) or not isinstance(intent_id, str):
        return {}, None, ""
    return d, space, intent_id


class Inbox:
    """One space's notified intents, by intent id in arrival order (with their arrival number).

    `synced`: the listener connection number (`Listener.connections`) since which the inbox
    holds every intent pending in the space; 0 while it does not (the listener was down, a body
    did not fit a notification): then the holder reads the table (`pending_intents`).
    """

    __slots__ = ("items", "synced", "synced_at", "used")

    def __init__(self) -> None:
        self.items: dict[str, tuple[int, Pending]] = {}
        self.synced = 0
        self.synced_at = 0.0
        self.used = time.monotonic()


def keepalive(fd: int) -> None:
    """TCP keepalive on the listener's socket: a dead peer (no RST) is noticed in ~25 s."""
    try:
        s = socket.socket(fileno=os.dup(fd))
    except OSError:
        return
    try:
        if s.family in (socket.AF_INET, socket.AF_INET6):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            for name, value in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3)):
                opt = getattr(socket, name, None)
                if opt is not None:
                    s.setsockopt(socket.IPPROTO_TCP, opt, value)
    except OSError:
        pass
    finally:
        s.close()
