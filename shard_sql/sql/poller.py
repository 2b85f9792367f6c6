"""SQLite's waits: `PRAGMA data_version` on a dedicated connection, with the thread asleep on
wake-up files (`shard_sql.wake`) or on inotify of the `-wal` file in between. How and why:
docs/sql.md."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import shard_sql.wake
from shard_sql.wake import Inotify, WakeupFiles, inotify_libc, readable

__all__ = ["Poller", "WalWatch"]

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


class WalWatch(Inotify):
    """Linux inotify on the database's `-wal` file, for one thread.

    In WAL mode every commit, by any process on this host, writes that file: a waiter blocks in
    `select` until one does instead of polling (https://www.sqlite.org/wal.html; SQLite's WAL
    needs all its users on one host, so nothing is missed across hosts). The commit becomes
    visible a moment after its last write (the WAL's fsync, then the wal-index update), so the
    waiter then polls `data_version` closely for `WATCH_SETTLE` seconds.
    """

    IN_MODIFY = 0x00000002

    @classmethod
    def open(cls, path: str) -> WalWatch | None:
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


class Poller:
    """SQLite: `PRAGMA data_version` on a dedicated connection, shared by the waiting threads;
    each thread sleeps on its `WakeupWatch` or `WalWatch` between polls where it can."""

    def __init__(
        self,
        connect: Callable[[], Any],
        wal: str | None = None,
        wakeup_files: WakeupFiles | None = None,
    ) -> None:
        self._connect = connect
        self._wal = wal
        self.wakeup_files = wakeup_files
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

    def _watch(self) -> WalWatch | None:
        if self._wal is None:
            return None
        watch: WalWatch | None = getattr(self._seen, "watch", None)
        if watch is not None and not watch.alive:
            watch.close()
            watch = None
        if watch is None:
            watch = self._seen.watch = WalWatch.open(self._wal)
        return watch

    def wait_wakeups(self, paths: list[str], timeout: float) -> bool:
        """Wait until one of the wake-up files `paths` is signalled (see `WakeupFiles`), or
        `data_version` moved at a look every `WAKEUP_POLL_FALLBACK` seconds; True if either.
        Without wake-up files, as `wait`."""
        seen = self._seen
        found = None if self.wakeup_files is None else self.wakeup_files.watch(seen, paths)
        if found is None:
            return self.wait(timeout)
        watch, fresh = found
        base: int | None = getattr(seen, "version", None)
        if fresh or base is None:
            # A signal before the watch was missed: the caller looks (and its next wait is sure).
            seen.version = self.version()
            return True
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            signalled = remaining > 0 and watch.signalled(
                min(remaining, shard_sql.wake.WAKEUP_POLL_FALLBACK)
            )
            version = self.version()
            if signalled or version != base:
                seen.version = version
                return True
            if remaining <= shard_sql.wake.WAKEUP_POLL_FALLBACK:
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
