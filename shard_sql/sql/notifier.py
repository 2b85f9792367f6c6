"""PostgreSQL: the store-side notifier that wakes the feed's waiters after the store's commits.

One thread per store with its own autocommit connection sends `NOTIFY shard_sql_feed, 'f:'`
after commits, coalesced (commits during a send and the `NOTIFY_GAP` after it cost one more
send, not one each). Appends
themselves never NOTIFY: a NOTIFY takes a database-wide lock at commit, held through the
commit's WAL flush, which would queue up concurrent appends (docs/feed.md has the figures).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from shard_sql.sql.listener import Channels

__all__ = ["FEED_NOTIFY_SQL", "FeedNotifier"]

log = logging.getLogger("shard_sql.sql")

FEED_NOTIFY_SQL = Channels().feed_notify_sql
"""The wake-up of a store without a schema: sent by the notifier, or inside a host's
transaction (at its commit)."""
NOTIFY_GAP = 0.002
"""Seconds the sender waits after a notification before it sends the next one (the commits
meanwhile share it): at most 500 a second per store, each one a transaction on the server.
Measured: wake-up p50 unchanged (1.1-1.3 ms), 4 appending processes as fast or faster."""
_TUPLES_OK = 2  # psycopg.pq.ExecStatus.TUPLES_OK
RECONNECT_MIN = 0.05
RECONNECT_MAX = 2.0

_ORPHANS: list[object] = []
"""Notifiers inherited over a fork: never used or closed in the child."""


class FeedNotifier:
    """Sends the feed's wake-ups for one store, on a thread started by the first `poke`."""

    def __init__(
        self, connect: Callable[[], Any], where: str, notify_sql: str = FEED_NOTIFY_SQL
    ) -> None:
        self._connect = connect
        self._where = where
        self._notify_sql = notify_sql
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._thread: _Sender | None = None
        self._closed = False

    def poke(self) -> None:
        """Events were committed: a wake-up goes out soon (cheap: sets an event)."""
        sender = self._thread
        if sender is None or self._pid != os.getpid():
            sender = self._start()
            if sender is None:
                return
        if not sender.poked:  # else a wake-up is due already, and goes out after this commit
            sender.poked = True
            sender.due.set()

    def _start(self) -> _Sender | None:
        if self._pid != os.getpid():  # after a fork: the parent's thread is not ours
            _ORPHANS.append(self._thread)
            self._thread = None
            self._pid = os.getpid()
            self._lock = threading.Lock()
        with self._lock:
            if self._closed:
                return None
            if self._thread is None:
                sender = _Sender(self._connect, self._where, self._notify_sql)
                weakref.finalize(self, sender.stop)
                self._thread = sender
            return self._thread

    def close(self) -> None:
        if self._pid != os.getpid():
            return
        with self._lock:
            self._closed = True
            sender, self._thread = self._thread, None
        if sender is not None:
            sender.stop()


class _Sender:
    """The thread: waits for `due`, sends one NOTIFY, again while commits keep coming. It holds
    neither the store nor the notifier, so a store dropped without `close()` stops it."""

    def __init__(self, connect: Callable[[], Any], where: str, notify_sql: str) -> None:
        self.notify_sql = notify_sql
        self.due = threading.Event()
        self.poked = False
        self.sent = 0
        self._connect = connect
        self._where = where
        self._stopping = False
        self._thread = threading.Thread(
            target=self._run, name=f"shard-sql-feed-notifier {where}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """End the thread once the commits announced so far are announced (one try)."""
        self._stopping = True
        self.due.set()

    def _run(self) -> None:
        conn: Any = None
        delay = RECONNECT_MIN
        while True:
            self.due.wait()
            self.due.clear()
            if not self.poked:
                if self._stopping:
                    break
                continue
            self.poked = False
            try:
                if conn is None:
                    conn = self._connect()
                    # Nobody waits for this commit's flush: a wake-up lost in a crash costs the
                    # waiters a poll (`wait_feed` looks at the head at least every second).
                    conn.execute("SET synchronous_commit = off")
                _send(conn, self.notify_sql)
                self.sent += 1
                delay = RECONNECT_MIN
                time.sleep(NOTIFY_GAP)
            except Exception as e:
                log.debug("%s: feed notifier: %s", self._where, e)
                if conn is not None:
                    with contextlib.suppress(Exception):
                        conn.close()
                    conn = None
                if self._stopping:
                    break
                self.poked = True  # the commits are still to be announced
                self.due.set()
                time.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, RECONNECT_MAX)
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()


def _send(conn: Any, sql: str) -> None:
    """Run `sql` (in autocommit) through libpq directly: `conn.execute` makes a cursor and runs
    psycopg's execution machinery, ~80k instructions of Python each time (up to 500 a second,
    on the cores the appends use)."""
    res = conn.pgconn.exec_(sql.encode())
    if res.status != _TUPLES_OK:
        message = res.get_error_message("utf-8") or f"status {res.status}"
        raise RuntimeError(f"the notification failed: {message}")
