"""Forwarded intents in SQL: the `IntentQueue` and `IntentInbox` half of `SqlEventStore`, and
the database clock.

The `intents` table (see `shard_sql._orm.IntentRow`, migration 0002) holds appends forwarded to a
space's lease holder by nodes in other processes or hosts:

- `put_intent`: one statement, `INSERT ... SELECT ... WHERE NOT EXISTS (<its event>) ON CONFLICT
  (space, intent_id) DO NOTHING`, so a repeated put (a caller retrying, from any process) records
  it once, and a late retry of an applied intent records nothing. Its own transaction, committed
  without waiting for the disk (PostgreSQL `synchronous_commit` off, SQLite `synchronous=NORMAL`,
  for that commit only; see `_Statements` and `_relaxed`). On PostgreSQL the same statement sends
  `NOTIFY shard_sql, 'j:<the intent as JSON>'` (`'i:<space>'` if too large) when it inserted the
  row: the holder has it without a read. Notifications are addressed: an intent to the channel
  of its space (`intents_channel`, LISTENed to by the processes holding it, see
  `_Listener.want`), an event to its sender's channel (`intents.reply_to`, migration 0003).
- Applied = its event exists (the holder writes the event with the intent id; the unique
  `(space, intent_id)` index on `events` makes a second application impossible). `find_intent`
  reads that event. On PostgreSQL the trigger `events_notify_applied` (migrations 0002, 0003)
  sends `NOTIFY shard_sql, 'e:<the event as JSON>'` (`'a:<space>'` if too large) from the
  transaction that writes the event of a queued intent, so its forwarder has it when it commits
  (`awaited_event`), without a read. Appends without intent id do not run the trigger's function
  (its `WHEN`), and appends whose intent is not queued do not notify: plain appends never take
  NOTIFY's commit lock.
- `pending_intents`: the space's rows in `id` order (the arrival order: an identity on PostgreSQL,
  the rowid on SQLite), each flagged applied or not in the same statement. Unapplied rows come back
  as `Pending` values checked again by `validation.pending` (a row that does not pass, written by
  hand or corrupted, is skipped with one warning on the `shard_sql.sql` logger, never applied and
  never deleted). Applied rows (a holder died between its write and its `forget_intents`) are
  deleted on the way.
- `notified_intents` (PostgreSQL): the same, from the listener's per-space inbox of `j:`
  notifications, without a read, while the inbox is known complete: since a `pending_intents`
  read (less than `INBOX_RESYNC` seconds ago) with the listener up throughout and every intent
  notified with its body. `watch_intents` lets a holder apply them on the listener thread itself.
- `forget_intents` (a holder's serving thread calls it in batches after applying): `DELETE` of
  those rows whose event exists, committed without waiting for the disk: a delete lost in a crash
  leaves a record of an applied intent, which the next `pending_intents` sweeps.

Waiting (`wait_for_change`):

- PostgreSQL: one listener thread per store, started by the first wait, owns a dedicated
  connection (taken out of the engine's pool for good) that runs `LISTEN shard_sql` and reads
  notifications through libpq directly; waiters block on their own `threading.Event`, woken only
  by changes they wait for (`_Signal`), so the holder's serving thread and any number of
  forwarding threads wait at once on one connection. A thread waiting for an intent it recorded
  (since its `put_intent`, until its event is found) wakes for that event (`e:`) or for `a:` news
  of its space; any other wait (the holder's) wakes for intents of its spaces. Each thread's wait
  ends at once if such a notification arrived since that thread's previous wait returned (its
  first wait ends at once), so a notification that arrives between a caller's check and its wait
  is never missed. A lost listener connection (server restart, `pg_terminate_backend`, a dead
  peer noticed by TCP keepalive) is reopened with back-off (50 ms doubling to 2 s); meanwhile
  waits are bounded sleeps of `FALLBACK_SLEEP`, every waiter wakes when the listener is back (a
  notification may have been lost in between), and inboxes are out of sync until read again.
- SQLite file: no notifications. The waiter checks `PRAGMA data_version` on a dedicated
  connection (it changes when any other connection commits). On Linux it sleeps in between on
  per-space bell files (`shard_sql.wake`: a holder's serving thread on its spaces' intent
  bells, a forwarder on the event bell of the space it awaits), looking at `data_version` every
  `BELL_FALLBACK` seconds; where bells cannot be made, on inotify of the `-wal` file
  (`_WalWatch`); else it polls every `POLL_MIN` seconds for
  `POLL_FAST` seconds, then backing off to `POLL_MAX`; with the same per-thread baseline (a
  thread's own `put_intent` moves its baseline: no news for itself).
- In-memory SQLite (one connection, one process): the store's own `put_intent` and
  `forget_intents` wake the waiters.

`database_clock`: PostgreSQL's `clock_timestamp()`, read at most every `CLOCK_REFRESH` seconds and
extrapolated in between with this process's monotonic clock (so it costs no round trip per call
and ignores steps of the local wall clock); on SQLite, the system clock.
"""

from __future__ import annotations

import contextlib
import functools
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
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar

from shard_sql import wake
from shard_sql._orm import EVENTS, INTENTS
from shard_sql.errors import InvalidEvent, ShardSqlError, StoreUnavailable
from shard_sql.ports import IntentInbox, IntentQueue, SpaceWakeups, system_clock
from shard_sql.validation import Pending, check_intent_id, check_seq, check_space, check_text
from shard_sql.validation import pending as checked_pending
from shard_sql.values import Event, new_event
from shard_sql.wake import Bells, Inotify, inotify_libc, readable

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from shard_sql.sql import _Conn, _Dialect, _Site

__all__ = ["CHANNEL", "SqlIntents"]

log = logging.getLogger("shard_sql.sql")

CHANNEL = "shard_sql"
"""The PostgreSQL notification channel; the payload is `<kind>:<space>`."""
INTENT = "i"
"""Notification kind: an intent was recorded in the space."""
APPLIED = "a"
"""Notification kind: the event of an intent recorded in the space was written (PostgreSQL: by the
trigger `events_notify_applied`; in-memory SQLite: when the holder forgets the intent)."""
INTENT_BODY = "j"
"""Notification kind (PostgreSQL): an intent was recorded; the payload is the intent as JSON
(`{"s": space, "i": intent_id, "t": type, "p": payload}`), so that the holder need not read it."""
EVENT_BODY = "e"
"""Notification kind (PostgreSQL, trigger of migration 0003): the event of a recorded intent was
written; the payload is the event as JSON, so that its forwarder need not read it."""
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
WATCH_MAX = 0.02
"""SQLite with inotify: the longest a waiter sleeps on the `-wal` file before it looks anyway."""
WATCH_SETTLE = 0.005
WATCH_POLL = 0.0001
"""SQLite with inotify: after the `-wal` file was written, poll every WATCH_POLL seconds for at
most WATCH_SETTLE seconds until the commit shows."""
POLL_MIN = 0.001
"""SQLite: the pause between two `PRAGMA data_version` polls, in seconds, for the first
`POLL_FAST` seconds of a wait (an answer is usually that close) ..."""
POLL_FAST = 0.02
POLL_MAX = 0.02
"""... then growing by half at every unchanged poll up to this."""
FALLBACK_SLEEP = 0.05
"""PostgreSQL: the longest a wait sleeps while the listener is down (then the caller looks)."""
RECONNECT_MIN = 0.05
RECONNECT_MAX = 2.0
CLOCK_REFRESH = 1.0
"""Seconds between two reads of the server's clock by `database_clock`."""
FORGET_CHUNK = 500
MAX_TRACKED_SPACES = 10_000
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def intents_channel(space: str) -> str:
    """The notification channel of a space's intents (PostgreSQL): only its holder listens."""
    return f"{CHANNEL}_i_{hashlib.md5(space.encode(), usedforsecurity=False).hexdigest()[:16]}"


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _translated(e: Exception, site: _Site) -> Exception:
    from shard_sql.sql import _translate  # sql.py imports this module: resolved at call time

    err = _translate(e, site)
    return e if err is None else err


def _guarded(
    fn: Callable[Concatenate[SqlIntents, _P], _R],
) -> Callable[Concatenate[SqlIntents, _P], _R]:
    """Let no driver error out of a public method (as `shard_sql.sql._guarded`)."""

    @functools.wraps(fn)
    def guarded(self: SqlIntents, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return fn(self, *args, **kwargs)
        except ShardSqlError:
            raise
        except Exception as e:
            err = _translated(e, self._site)
            if err is e:
                raise
            raise err from e

    return guarded


# -- statements --------------------------------------------------------------------------------


class _Statements:
    """The intent statements of one dialect."""

    def __init__(self, pg: bool) -> None:
        p = "%s" if pg else "?"
        self.pg = pg
        applied = (
            f"EXISTS (SELECT 1 FROM {EVENTS} e WHERE e.space = {INTENTS}.space "
            f"AND e.intent_id = {INTENTS}.intent_id)"
        )
        insert = (
            f"INSERT INTO {INTENTS} "
            "(space, intent_id, type, payload, submitted_at, holder, reply_to) "
            f"SELECT {p}, {p}, {p}, {f'CAST({p} AS jsonb)' if pg else p}, "
            f"{'now()' if pg else p}, {p}, {p} "
            f"WHERE NOT EXISTS (SELECT 1 FROM {EVENTS} WHERE space = {p} AND intent_id = {p}) "
            "ON CONFLICT (space, intent_id) DO NOTHING"
        )
        if pg:
            # The intent's commit does not wait for the WAL flush: nobody has been told anything
            # yet. Lost in a server crash, the intent is simply not applied; its caller, still
            # waiting for the event (whose write does wait for the flush), gets IntentTimeout and
            # retries with the same intent id. A holder dying loses nothing: the row is committed
            # and visible to the next holder. This takes one disk flush off a forwarded append.
            # The notification carries the intent when it fits: the holder applies it without
            # reading the table (see `_Listener`).
            body = "json_build_object('s', space, 'i', intent_id, 't', type, 'p', payload)::text"
            self.put = (
                "WITH relaxed AS (SELECT set_config('synchronous_commit', 'off', true) AS v), "
                f"added AS ({insert} RETURNING space, intent_id, type, payload) "
                f"SELECT pg_notify(%s, CASE WHEN octet_length(b) <= {NOTIFY_LIMIT} "
                f"THEN '{INTENT_BODY}:' || b ELSE '{INTENT}:' || space END) "
                f"FROM (SELECT space, {body} AS b FROM added) AS x, relaxed"
            )
        else:
            self.put = insert
        self.pending = (
            f"SELECT id, intent_id, type, payload, {applied} FROM {INTENTS} "
            f"WHERE space = {p} AND id > {p} ORDER BY id LIMIT {p}"
        )
        # A forgotten record is garbage; if the delete is lost in a crash, `pending_intents`
        # sweeps it: no need to wait for the WAL flush (on PostgreSQL).
        if pg:
            self.forget = (
                "WITH relaxed AS (SELECT set_config('synchronous_commit', 'off', true)) "
                f"DELETE FROM {INTENTS} WHERE space = %s AND intent_id = ANY(%s) "
                f"AND {applied} AND EXISTS (SELECT 1 FROM relaxed)"
            )
        else:
            self.forget = (
                f"DELETE FROM {INTENTS} WHERE space = ? AND intent_id IN ({{ids}}) AND {applied}"
            )
        self.server_time = "SELECT clock_timestamp()"


_PG = _Statements(pg=True)
_SQLITE = _Statements(pg=False)


# -- waking waiters ----------------------------------------------------------------------------


class _Signal:
    """Change counters per key behind one lock, and waits on them.

    Keys: `(INTENT, space)` (an intent was recorded: news for the holder), `(APPLIED, space)`
    (the event of a recorded intent was written, announced by space only) and `(EVENT_BODY,
    "<space>\\0<intent id>")` (that intent's event was written: news for its forwarder alone).
    `seq` counts changes; `last[key]` is the seq of the latest; a reset (the listener
    reconnected: changes may have been missed) concerns everything. Each thread keeps the seq
    it saw when its previous wait returned: a change after that ends its next wait at once. A
    change wakes only the threads waiting on its key (each waits on its own `threading.Event`):
    with many forwarders on one space, each wakes for its own event, not for everyone's.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.seq = 0
        self.reset_seq = 0
        self.last: dict[tuple[str, str], int] = {}
        self.up = True
        self.received = 0
        """Changes recorded (notifications received, on PostgreSQL)."""
        self.woken = 0
        """Waits a change ended (the others ran to their timeout)."""
        self._waiting: dict[tuple[str, str], set[threading.Event]] = {}
        self._everyone: set[threading.Event] = set()
        self._seen = threading.local()

    def changed(self, changes: Sequence[tuple[str, str]]) -> None:
        """Record changes, each `(kind, key)`; wake the threads waiting on them."""
        with self._lock:
            if len(self.last) > MAX_TRACKED_SPACES:
                self.last.clear()
                self._reset()
            for key in changes:
                self.seq += 1
                self.last[key] = self.seq
                self.received += 1
                for event in self._waiting.get(key, ()):
                    event.set()

    def reset(self) -> None:
        with self._lock:
            self._reset()

    def _reset(self) -> None:
        self.seq += 1
        self.reset_seq = self.seq
        for event in self._everyone:
            event.set()

    def set_up(self, up: bool) -> None:
        with self._lock:
            self.up = up
            if up:
                self._reset()
            for event in self._everyone:
                event.set()

    def wait(
        self, spaces: Sequence[str], timeout: float, awaited: Mapping[str, str] | None = None
    ) -> bool:
        """Block until one of `spaces` changed since this thread's previous wait, or `timeout`;
        while not `up`, at most `FALLBACK_SLEEP`. In the `awaited` spaces (this thread waits for
        the intent it recorded there, by intent id) only its event counts, elsewhere only
        `INTENT`. True when a change ended the wait."""
        deadline = time.monotonic() + timeout
        keys: list[tuple[str, str]] = []
        for space in spaces:
            intent_id = awaited.get(space) if awaited else None
            if intent_id is None:
                keys.append((INTENT, space))
            else:
                keys += ((APPLIED, space), (EVENT_BODY, f"{space}\0{intent_id}"))
        event: threading.Event | None = getattr(self._seen, "event", None)
        if event is None:
            event = self._seen.event = threading.Event()
        base: int = getattr(self._seen, "seq", 0)
        fallback = False
        with self._lock:
            for key in keys:
                self._waiting.setdefault(key, set()).add(event)
            self._everyone.add(event)
        try:
            while True:
                with self._lock:
                    if self.reset_seq > base or any(self.last.get(k, 0) > base for k in keys):
                        self.woken += 1
                        return True
                    event.clear()
                    up = self.up
                remaining = deadline - time.monotonic()
                if remaining <= 0 or fallback:
                    return False
                if up:
                    event.wait(remaining)
                else:
                    event.wait(min(remaining, FALLBACK_SLEEP))
                    fallback = not self.up
        finally:
            with self._lock:
                self._seen.seq = self.seq
                self._everyone.discard(event)
                for key in keys:
                    waiting = self._waiting.get(key)
                    if waiting is not None:
                        waiting.discard(event)
                        if not waiting:
                            del self._waiting[key]


class _Listener:
    """The PostgreSQL listener: a thread with its own connection running `LISTEN shard_sql`."""

    def __init__(
        self,
        connect: Callable[[], Any],
        where: str,
        watchers: Sequence[Callable[[str], bool]] = (),
    ) -> None:
        self._connect = connect
        self._watchers = watchers
        self._where = where
        self.signal = _Signal()
        self.signal.up = False
        self.connections = 0
        """How many times LISTEN was established (1 + reconnections)."""
        self.backend_pid: int | None = None
        """The listener connection's server process id while it is up."""
        self.lock = threading.Lock()
        """Guards `inboxes`, `expected`, `results` and `arrivals`."""
        self.inboxes: dict[str, _Inbox] = {}
        """The intents notified per space, for the spaces whose pending intents this process
        reads (a holder's), see `SqlIntents.notified_intents`."""
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
                conn.execute(f"LISTEN {CHANNEL}")
                conn.execute(f"LISTEN {self.reply_channel}")
                self._listen_wanted(conn)
                _keepalive(conn.fileno())
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
            if kind in (INTENT, APPLIED):
                if kind == INTENT:
                    self.intents += 1
                    self._unsync(rest)
                else:
                    self._unexpect_space(rest)
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
                self._unexpect_space(None)
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
                    if intents_channel(space) in gone:
                        inbox.synced = 0
        for channel in drop:
            conn.execute(f"UNLISTEN {channel}")
        if drop:
            self._drain([n.payload for n in conn.notifies(timeout=0)])

    def want(self, space: str) -> bool:
        """The space's intents should come here (this process holds it); True once they do."""
        channel = intents_channel(space)
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
                if len(self.inboxes) >= MAX_TRACKED_SPACES:
                    self.inboxes.clear()
                inbox = self.inboxes[space] = _Inbox()
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
            if len(self.expected) >= MAX_TRACKED_SPACES:
                self.expected.clear()
                self.results.clear()
            connection = self.connections if self.signal.up else 0
            self.expected[(space, intent_id)] = (connection, time.monotonic())

    def unexpect(self, space: str, intent_id: str) -> None:
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

    def _unexpect_space(self, space: str | None) -> None:
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
        d, space, intent_id = _body(body)
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
        d, space, intent_id = _body(body)
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


def _body(body: str) -> tuple[dict[str, Any], str | None, str]:
    """A notification's JSON body, its space and intent id (space None: not readable)."""
    try:
        d = json.loads(body)
        space, intent_id = d["s"], d["i"]
    except (ValueError, TypeError, KeyError, RecursionError):
        return {}, None, ""
    if not isinstance(space, str) or not isinstance(intent_id, str):
        return {}, None, ""
    return d, space, intent_id


class _Inbox:
    """One space's notified intents, by intent id in arrival order (with their arrival number).

    `synced`: the listener connection number (`_Listener.connections`) since which the inbox
    holds every intent pending in the space; 0 while it does not (the listener was down, a body
    did not fit a notification): then the holder reads the table (`pending_intents`).
    """

    __slots__ = ("items", "synced", "synced_at", "used")

    def __init__(self) -> None:
        self.items: dict[str, tuple[int, Pending]] = {}
        self.synced = 0
        self.synced_at = 0.0
        self.used = time.monotonic()


def _keepalive(fd: int) -> None:
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


class _WalWatch(Inotify):
    """Linux inotify on the database's `-wal` file, for one thread.

    In WAL mode every commit, by any process on this host, writes that file: a waiter blocks in
    `select` until one does instead of polling (https://www.sqlite.org/wal.html; SQLite's WAL
    needs all its users on one host, so nothing is missed across hosts). The commit becomes
    visible a moment after its last write (the WAL's fsync, then the wal-index update), so the
    waiter then polls `data_version` closely for `WATCH_SETTLE` seconds.
    """

    IN_MODIFY = 0x00000002

    @classmethod
    def open(cls, path: str) -> _WalWatch | None:
        """A watch on `path`, or None (not Linux, no inotify, no such file yet)."""
        libc = inotify_libc()
        if libc is None or not os.path.exists(path):
            return None
        fd = libc.inotify_init1(cls.FLAGS)
        if fd < 0:
            return None
        if libc.inotify_add_watch(fd, os.fsencode(path), cls.IN_MODIFY) < 0:
            os.close(fd)
            return None
        return cls(fd)

    def drain(self) -> bool:
        """Read the pending events; True if there were any (or reading failed). A file gone
        leaves the watch not `alive`: it is watched again next time."""
        events = self.read_events()
        return events is None or bool(events)

    def wait(self, timeout: float) -> bool:
        """Block until the file is written, at most `timeout` seconds; True if it was."""
        return bool(readable([self.fd], timeout)) and self.drain()


class _Poller:
    """SQLite: `PRAGMA data_version` on a dedicated connection, shared by the waiting threads;
    each thread sleeps on its `BellWatch` or `_WalWatch` between polls where it can."""

    def __init__(
        self, connect: Callable[[], Any], wal: str | None = None, bells: Bells | None = None
    ) -> None:
        self._connect = connect
        self._wal = wal
        self.bells = bells
        self._lock = threading.Lock()
        self._conn: Any = None
        self._seen = threading.local()
        self.polls = 0

    def version(self) -> int:
        with self._lock:
            if self._conn is None:
                self._conn = self._connect()
            self.polls += 1
            row = self._conn.execute("PRAGMA data_version").fetchone()
            return int(row[0])

    def seen_now(self) -> None:
        """Take the current version as this thread's baseline (if it has one)."""
        if getattr(self._seen, "version", None) is not None:
            self._seen.version = self.version()

    def _watch(self) -> _WalWatch | None:
        if self._wal is None:
            return None
        watch: _WalWatch | None = getattr(self._seen, "watch", None)
        if watch is not None and not watch.alive:
            watch.close()
            watch = None
        if watch is None:
            watch = self._seen.watch = _WalWatch.open(self._wal)
        return watch

    def wait_bells(self, paths: list[str], timeout: float) -> bool:
        """Wait until one of the bells `paths` rings (see `Bells`), or `data_version` moved at a
        look every `BELL_FALLBACK` seconds; True if either. Without bells, as `wait`."""
        seen = self._seen
        found = None if self.bells is None else self.bells.watch(seen, paths)
        if found is None:
            return self.wait(timeout)
        watch, fresh = found
        base: int | None = getattr(seen, "version", None)
        if fresh or base is None:
            # A ring before the watch was missed: the caller looks (and its next wait is sure).
            seen.version = self.version()
            return True
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            rung = remaining > 0 and watch.rung(min(remaining, wake.BELL_FALLBACK))
            version = self.version()
            if rung or version != base:
                seen.version = version
                return True
            if remaining <= wake.BELL_FALLBACK:
                return False

    def wait(self, timeout: float) -> bool:
        start = time.monotonic()
        deadline = start + timeout
        base: int | None = getattr(self._seen, "version", None)
        watch = self._watch()
        if watch is not None:
            watch.drain()  # old news: the version read next covers it
        delay = POLL_MIN
        close_until = 0.0
        while True:
            version = self.version()
            if version != base:
                self._seen.version = version
                return True
            now = time.monotonic()
            remaining = deadline - now
            if remaining <= 0:
                return False
            if watch is not None and watch.alive and now >= close_until:
                # Capped: a commit whose last write came just before the drain above is seen
                # within WATCH_MAX.
                if watch.wait(min(remaining, WATCH_MAX)):
                    close_until = time.monotonic() + WATCH_SETTLE
                continue
            if watch is not None and now < close_until:
                time.sleep(min(WATCH_POLL, remaining))
                continue
            time.sleep(min(delay, remaining))
            if time.monotonic() - start >= POLL_FAST:
                delay = min(delay * 1.5, POLL_MAX)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                with contextlib.suppress(Exception):
                    self._conn.close()
                self._conn = None


@contextlib.contextmanager
def _relaxed(c: _Conn, sqlite: bool) -> Iterator[None]:
    """SQLite: run the statement (one autocommit statement) with `synchronous=NORMAL` unless
    the connection is below it already; as `synchronous_commit` off on PostgreSQL (see
    `_Statements`), for commits that need not reach the disk before anyone is told anything:
    an intent's record (its event's commit does), the deletion of garbage. In WAL mode NORMAL
    skips the fsync of that commit only (https://www.sqlite.org/pragma.html#pragma_synchronous)
    and the next FULL commit syncs the WAL, this one included."""
    level = int(c.cur.execute("PRAGMA synchronous").fetchone()[0]) if sqlite else 0
    if level < 2:
        yield
        return
    c.cur.execute("PRAGMA synchronous = NORMAL")
    try:
        yield
    finally:
        c.cur.execute(f"PRAGMA synchronous = {level}")


_ORPHANS: list[object] = []
"""Listeners and pollers inherited over a fork: referenced for good, never closed in the child (a
PostgreSQL connection closed there would end the parent's session; a SQLite one, its locks)."""


def _weak_opener(store: SqlIntents) -> Callable[[], Any]:
    """`store._dedicated_connection`, without keeping the store alive."""
    method = weakref.WeakMethod(store._dedicated_connection)

    def open_connection() -> Any:
        bound = method()
        if bound is None:
            raise StoreUnavailable("the store was garbage-collected")
        return bound()

    return open_connection


# -- the mixin ---------------------------------------------------------------------------------


class SqlIntents(IntentQueue, IntentInbox, SpaceWakeups):
    """`IntentQueue` and `database_clock` for `SqlEventStore` (see the module docstring)."""

    if TYPE_CHECKING:
        _site: _Site
        _sqlite: bool
        _engine: Engine
        _closed: bool
        _d: _Dialect
        where: str

        def _call(self, fn: Callable[..., _R], *args: Any, retry: bool = True) -> _R: ...

        def _by_intent(self, c: _Conn, space: str, ids: list[str]) -> dict[str, Event]: ...

    def _init_intents(self) -> None:
        self._intent_watchers: list[Callable[[str], bool]] = []
        self._wait_lock = threading.Lock()
        self._wait_pid = os.getpid()
        self._listener: _Listener | None = None
        self._poller: _Poller | None = None
        self._bells: Bells | None = None
        """SQLite file on Linux: the bells (set by the store once its engine is open)."""
        self._local_signal: _Signal | None = None
        self._warned: set[tuple[str, int]] = set()
        self._waiting = threading.local()
        self._clock_lock = threading.Lock()
        self._clock_base: datetime | None = None
        self._clock_at = 0.0
        self._clock_tried = -CLOCK_REFRESH

    def _close_intents(self) -> None:
        if self._wait_pid != os.getpid():
            self._forked()
            return
        with self._wait_lock:
            listener, poller = self._listener, self._poller
            self._listener = self._poller = None
        if listener is not None:
            listener.stop()
        if poller is not None:
            poller.close()

    def _lease_granted(self) -> None:
        """A lease was granted through this store: end this process's waits once, so that a
        serving thread waiting on the spaces it held before waits on its new set (on SQLite the
        grant's commit does that already)."""
        listener, signal = self._listener, self._local_signal
        if listener is not None and self._wait_pid == os.getpid():
            listener.signal.reset()
        if signal is not None:
            signal.reset()

    @property
    def _statements(self) -> _Statements:
        return _SQLITE if self._sqlite else _PG

    # -- recording and reading intents -------------------------------------------------------

    @_guarded
    def put_intent(self, space: str, item: Pending, *, holder: str) -> None:
        """Record `item` durably unless it is recorded or applied already; wake the holder."""
        check_space(space)
        check_text("holder", holder)
        intent_id = check_intent_id(item.intent_id) if isinstance(item, Pending) else None
        if intent_id is None:
            raise InvalidEvent("intent_id", "a forwarded intent needs one")
        st = self._statements
        listener = self._live_listener()
        reply = None
        if listener is not None:
            listener.expect(space, intent_id)  # before the put: its answer may come at once
            reply = listener.reply_channel if listener.signal.up else None
        if st.pg:
            params: tuple[Any, ...] = (space, item.intent_id, item.type, item.payload_json)
            params += (holder, reply, space, item.intent_id, intents_channel(space))
        else:
            now = self._d.time(system_clock())
            params = (space, item.intent_id, item.type, item.payload_json, now, holder, None)
            params += (space, item.intent_id)
        inserted = self._call(self._put, st.put, params)
        if listener is not None and not inserted:
            listener.unexpect(space, intent_id)  # recorded or applied already: no news to come
        self._awaited()[space] = intent_id
        if self._bells is not None and inserted:
            self._bells.ring("i", space)
        if self._local_signal is not None:
            self._local_signal.changed([(INTENT, space)])
        elif self._poller is not None and self._sqlite:
            # Our own commit is no news for this thread: its next wait is for the holder's.
            self._poller.seen_now()

    def _put(self, c: _Conn, sql: str, params: tuple[Any, ...]) -> bool:
        if self._sqlite:
            return self._put_sqlite(c, sql, params)
        c.cur.execute(sql, params)
        return bool(c.cur.rowcount)

    def _put_sqlite(self, c: _Conn, sql: str, params: tuple[Any, ...]) -> bool:
        with _relaxed(c, True):
            c.cur.execute(sql, params)
            return bool(c.cur.rowcount)

    @_guarded
    def find_intent(self, space: str, intent_id: str) -> Event | None:
        """The event written for `intent_id` in `space`, if any."""
        check_space(space)
        if check_intent_id(intent_id) is None:
            raise InvalidEvent("intent_id", "must be a string")
        listener = self._live_listener()
        found = None
        if listener is not None:
            found, _ = listener.take(space, intent_id)
        if found is None:
            found = self._call(self._by_intent, space, [intent_id]).get(intent_id)
            if listener is not None:
                listener.was_read(space, intent_id, found is not None)
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

    @_guarded
    def pending_intents(self, space: str, *, limit: int) -> list[Pending]:
        """Unapplied intents of `space` in arrival order, at most `limit`; applied records met on
        the way are deleted."""
        check_space(space)
        if check_seq("limit", limit) == 0:
            return []
        listener = self._live_listener()
        token = None if listener is None else listener.begin_sync(space)
        found, swept = self._call(self._pending, space, limit)
        if listener is not None and token is not None:
            listener.end_sync(space, token, found, complete=len(found) < limit)
        if swept and self._local_signal is not None:
            self._local_signal.changed([(APPLIED, space)])
        return found

    def _pending(self, c: _Conn, space: str, limit: int) -> tuple[list[Pending], bool]:
        st = self._statements
        out: list[Pending] = []
        applied: list[str] = []
        after = 0
        while len(out) < limit:
            want = limit - len(out)
            c.cur.execute(st.pending, (space, after, want))
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
        try:
            if isinstance(payload, str) and self._sqlite:
                payload = json.loads(payload)
            return checked_pending(type_, payload, intent_id)
        except (InvalidEvent, ValueError, TypeError, RecursionError) as e:
            key = (space, row_id)
            if key not in self._warned:
                if len(self._warned) > MAX_TRACKED_SPACES:
                    self._warned.clear()
                self._warned.add(key)
                log.warning(
                    "%s: forwarded intent id=%s of space %r cannot be applied (%s); skipped. "
                    "An operator removes it with: DELETE FROM %s WHERE id = %s",
                    self.where,
                    row_id,
                    space,
                    e,
                    INTENTS,
                    row_id,
                )
            return None

    @_guarded
    def forget_intents(self, space: str, intent_ids: Sequence[str]) -> None:
        """Delete the records of these intents that are applied; wake the waiting forwarders."""
        check_space(space)
        if isinstance(intent_ids, str):
            raise InvalidEvent("intent_ids", "must be a sequence of intent ids, not a string")
        ids = [i for i in intent_ids if check_intent_id(i) is not None]
        if not ids:
            return
        self.drop_notified(space, ids)
        self._call(self._forget, space, ids)
        if self._local_signal is not None:
            self._local_signal.changed([(APPLIED, space)])

    def wakes_per_space(self) -> bool:
        """`SpaceWakeups`: PostgreSQL (notifications per space), a SQLite file with bells."""
        return not self._sqlite or (self._bells is not None and self._bells.working)

    # -- the inbox (`IntentInbox`) -----------------------------------------------------------

    def notified_intents(self, space: str, *, limit: int) -> list[Pending] | None:
        """PostgreSQL: the space's pending intents as their notifications brought them, without
        a read, when this store's listener has every one since its last `pending_intents` (less
        than `INBOX_RESYNC` seconds ago); else None: call `pending_intents`. May include intents
        applied meanwhile by another node (writing one again returns its event). SQLite: None."""
        listener = self._live_listener()
        if listener is None:
            return None
        return listener.notified(check_space(space), check_seq("limit", limit))

    def awaited_event(self, space: str, intent_id: str) -> tuple[Event | None, bool]:
        """PostgreSQL, for an intent this store recorded: (its event as its notification
        brought it, True), or (None, True) when it is surely not written yet (the listener has
        been up since the intent was recorded and would have brought it), or (None, False):
        unknown, call `find_intent`. SQLite: (None, False)."""
        listener = self._live_listener()
        if listener is None:
            return None, False
        event, sure = listener.take(space, intent_id)
        if event is not None:
            self._found(space, intent_id)
        return event, sure

    def _found(self, space: str, intent_id: str) -> None:
        awaited = self._awaited()
        if awaited.get(space) == intent_id:
            del awaited[space]

    def drop_notified(self, space: str, intent_ids: Sequence[str]) -> None:
        """These intents are applied: out of the inbox (their records stay until forgotten)."""
        listener = self._live_listener()
        if listener is not None:
            listener.drop(space, intent_ids)

    def watch_intents(self, callback: Callable[[str], bool]) -> Callable[[], None]:
        """PostgreSQL: `callback(space)` runs on the listener thread for every intent notified
        in `space`; when it returns True (it applied them), the intent wakes no waiter. SQLite:
        never (there are no notifications); the holder's thread polls."""
        self._intent_watchers.append(callback)

        def stop() -> None:
            with contextlib.suppress(ValueError):
                self._intent_watchers.remove(callback)

        return stop

    def _live_listener(self) -> _Listener | None:
        listener = self._listener
        if listener is None or self._wait_pid != os.getpid():
            return None
        return listener

    def _forget(self, c: _Conn, space: str, ids: list[str]) -> None:
        with _relaxed(c, self._sqlite):
            self._forget_now(c, space, ids)

    def _forget_now(self, c: _Conn, space: str, ids: list[str]) -> None:
        st = self._statements
        for start in range(0, len(ids), FORGET_CHUNK):
            chunk = ids[start : start + FORGET_CHUNK]
            if st.pg:
                c.cur.execute(st.forget, (space, chunk))
            else:
                sql = st.forget.format(ids=", ".join("?" * len(chunk)))
                c.cur.execute(sql, (space, *chunk))

    # -- waiting -------------------------------------------------------------------------------

    def wait_for_change(self, spaces: Sequence[str], timeout: float) -> None:
        """Block until an intent or event may have arrived in `spaces`, or `timeout` passes."""
        if isinstance(spaces, str):
            raise InvalidEvent("spaces", "must be a sequence of spaces, not a string")
        names = [check_space(s) for s in spaces]
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout < 0:
            raise InvalidEvent("timeout", "must be a number of seconds >= 0")
        if self._closed:
            raise StoreUnavailable(f"{self.where}: the store is closed")
        if self._sqlite:
            poller_or_signal = self._sqlite_waiter()
            if isinstance(poller_or_signal, _Poller):
                bells = poller_or_signal.bells
                try:
                    if bells is None:
                        poller_or_signal.wait(float(timeout))
                    else:
                        paths = bells.waited_on(names, self._awaited())
                        poller_or_signal.wait_bells(paths, float(timeout))
                except Exception as e:
                    err = _translated(e, self._site)
                    if err is e:
                        raise
                    raise err from e
                return
            poller_or_signal.wait(names, float(timeout), self._awaited())
            return
        listener = self._pg_listener()
        awaited = self._awaited()
        for name in names:
            if name not in awaited:
                listener.want(name)  # a holder's wait: the space's intents must come here
        listener.signal.wait(names, float(timeout), awaited)

    def _forked(self) -> None:
        """After a fork: the parent's listener thread and connections are not ours."""
        if self._wait_pid != os.getpid():
            _ORPHANS.extend((self._listener, self._poller))
            self._listener = self._poller = None
            self._wait_pid = os.getpid()
            self._wait_lock = threading.Lock()

    def _pg_listener(self) -> _Listener:
        listener = self._listener
        if listener is not None and self._wait_pid == os.getpid():
            return listener
        self._forked()
        with self._wait_lock:
            if self._closed:
                raise StoreUnavailable(f"{self.where}: the store is closed")
            if self._listener is None:
                listener = _Listener(_weak_opener(self), self.where, self._intent_watchers)
                # A store dropped without close(): its listener stops (and lets go of its
                # connection) instead of running until the process exits.
                weakref.finalize(self, listener.stop, False)
                self._listener = listener
            return self._listener

    def _sqlite_waiter(self) -> _Poller | _Signal:
        from shard_sql.sql import sqlite_file  # sql.py imports this module

        database = sqlite_file(self._engine.url)
        if database is None:
            with self._wait_lock:
                if self._local_signal is None:
                    self._local_signal = _Signal()
                return self._local_signal
        poller = self._poller
        if poller is not None and self._wait_pid == os.getpid():
            return poller
        self._forked()
        with self._wait_lock:
            if self._poller is None:
                wal = f"{os.path.abspath(database)}-wal"
                self._poller = _Poller(self._dedicated_connection, wal, self._bells)
            return self._poller

    def _dedicated_connection(self) -> Any:
        """A driver connection of the store's engine (its connect hooks and arguments), taken
        out of the pool for good: the listener's or the poller's own."""
        fairy = self._engine.raw_connection()
        try:
            fairy.detach()
            raw: Any = fairy.dbapi_connection
            if not self._sqlite and not raw.autocommit:
                raw.autocommit = True
        except BaseException:
            fairy.invalidate()
            raise
        return raw

    # -- the database's clock -----------------------------------------------------------------

    def database_clock(self) -> datetime:
        """The database server's current time (timezone-aware, UTC), for
        `LeaseRegistry(store, clock=store.database_clock)`: every host then judges lease expiry by
        one clock. PostgreSQL: `clock_timestamp()`, read at most once a second and extrapolated
        with the local monotonic clock in between. SQLite: the system clock."""
        if self._sqlite:
            return system_clock()
        with self._clock_lock:
            now = time.monotonic()
            if now - self._clock_tried >= CLOCK_REFRESH:
                self._clock_tried = now
                try:
                    before = time.monotonic()
                    server = self._call(self._server_time)
                    after = time.monotonic()
                except Exception as e:
                    if self._clock_base is None:
                        err = _translated(e, self._site)
                        if err is e:
                            raise
                        raise err from e
                    log.debug("%s: database clock not refreshed: %s", self.where, e)
                else:
                    self._clock_base, self._clock_at = server, (before + after) / 2
            assert self._clock_base is not None
            return self._clock_base + timedelta(seconds=time.monotonic() - self._clock_at)

    def _server_time(self, c: _Conn) -> datetime:
        c.cur.execute(self._statements.server_time)
        value = c.cur.fetchone()[0]
        if not isinstance(value, datetime) or value.tzinfo is None:
            raise StoreUnavailable(f"{self.where}: clock_timestamp() returned {value!r}")
        return value.astimezone(UTC)
