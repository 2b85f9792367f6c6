"""Wake-up files: per-space wake-ups across the processes of one host, for the stores without
notifications (a SQLite file, a git repository), on Linux.

A wake-up file is an empty file in a directory beside the data (`<database file>-wakeups`, or
`<git dir>/shard-sql-wakeups`), two per space that forwarding waited on: `i<md5(space)[:16]>`,
signalled (its mtime set) after a forwarded intent's record is committed, and `e<...>`,
signalled after a holder wrote events of forwarded intents. A holder's serving thread sleeps on
the intent files of its spaces, a forwarder on the event file of the space it awaits, with
inotify IN_ATTRIB (https://man7.org/linux/man-pages/man7/inotify.7.html).

Without them a waiter wakes at every commit of anyone (SQLite: every `-wal` write; git: a poll
every millisecond): with three processes forwarding to a holder, about 1 ms of CPU per forwarded
event on SQLite, most of it waiters woken for nothing. A file is signalled after the commit, so
the waiter sees the change at once. A signal is a hint, never the truth: it is followed by a
read, and waiters still look at the store's own change stamp every `WAKEUP_POLL_FALLBACK`
seconds (a change nobody signalled: a lease grant, a direct append, a writer that died between
commit and signal). Only waiters create wake-up files; signalling a missing one costs an `access`.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import select
import sys
import time
from collections.abc import Container, Sequence
from typing import Any

INTENT_RECORDED = "i"
"""Wake-up file kind (its name's first letter): a forwarded intent of the space was recorded."""
EVENTS_WRITTEN = "e"
"""Wake-up file kind: a holder wrote events of forwarded intents of the space."""
FEED_WRITTEN = "f"
"""Wake-up file kind (git, space ""): events were committed; the feed's waiters look."""

WAKEUP_POLL_FALLBACK = 0.02
"""Seconds: a waiter on wake-up files looks at the store's change stamp at least this often."""
MAX_PATHS = 10_000
"""Wake-up file paths remembered per store (spaces seldom number more)."""
MAX_WATCHED = 64
"""Wake-up files one thread's watch keeps; past it the watch starts anew (a thread that waited on
many spaces over time would hold inotify watches, and queue signals, for all of them)."""


def readable(fds: list[int], timeout: float) -> list[int]:
    """The descriptors of `fds` ready to read within `timeout` seconds (`poll`, not `select`:
    `select` refuses descriptor numbers of 1024 and above, which a busy process reaches)."""
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    return [fd for fd, _ in poller.poll(max(timeout, 0.0) * 1000)]


_exists = os.access
F_OK = os.F_OK

_LIBC: list[Any] = []


def inotify_libc() -> Any:
    """libc with inotify's functions typed, or None (not Linux)."""
    if not _LIBC:
        lib = None
        if sys.platform.startswith("linux"):
            try:
                lib = ctypes.CDLL(None, use_errno=True)
                lib.inotify_init1.argtypes = [ctypes.c_int]
                lib.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
            except (OSError, AttributeError):
                lib = None
        _LIBC.append(lib)
    return _LIBC[0]


class Inotify:
    """An inotify descriptor, for one thread of one process."""

    IN_Q_OVERFLOW = 0x00004000
    IN_IGNORED = 0x00008000
    FLAGS = os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.alive = True
        self.pid = os.getpid()

    def read_events(self) -> list[tuple[int, int]] | None:
        """The queued events as (watch descriptor, mask), without waiting; None when reading
        failed. Either, or a watched file gone (IN_IGNORED), ends this watch's life (`alive`)."""
        events: list[tuple[int, int]] = []
        while True:
            try:
                data = os.read(self.fd, 4096)
            except BlockingIOError:
                return events
            except OSError:
                self.alive = False
                return None
            if not data:
                return events
            # struct inotify_event: int wd; uint32 mask, cookie, len; char name[len]
            offset = 0
            while offset + 16 <= len(data):
                wd = int.from_bytes(data[offset : offset + 4], sys.byteorder, signed=True)
                mask = int.from_bytes(data[offset + 4 : offset + 8], sys.byteorder)
                if mask & self.IN_IGNORED:
                    self.alive = False
                events.append((wd, mask))
                offset += 16 + int.from_bytes(data[offset + 12 : offset + 16], sys.byteorder)

    def close(self) -> None:
        """Close the descriptor, once: a second close could hit a reused descriptor number."""
        fd, self.fd = self.fd, -1
        self.alive = False
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)

    def __del__(self) -> None:
        self.close()


class WakeupFiles:
    """The wake-up files of one database file or repository (see the module docstring)."""

    IN_ATTRIB = 0x00000004

    def __init__(self, directory: str) -> None:
        self.dir = directory
        self._paths: dict[tuple[str, str], str] = {}
        self.working = True
        """False after a watch could not be made (no permission, inotify limits): waits then
        wake at every change, as without wake-up files (`wakes_per_space`)."""

    @classmethod
    def if_supported(cls, directory: str | None) -> WakeupFiles | None:
        """Wake-up files in `directory`, or None where inotify is missing."""
        if not directory or inotify_libc() is None:
            return None
        return cls(os.path.abspath(directory))

    def path(self, kind: str, space: str) -> str:
        key = (kind, space)
        path = self._paths.get(key)
        if path is None:
            if len(self._paths) >= MAX_PATHS:
                self._paths.clear()
            key_bytes = space.encode("utf-8", "surrogatepass")
            digest = hashlib.md5(key_bytes, usedforsecurity=False).hexdigest()[:16]
            path = self._paths[key] = os.path.join(self.dir, kind + digest)
        return path

    def paths_to_wait_on(self, spaces: Sequence[str], awaited: Container[str]) -> list[str]:
        """The files a wait on `spaces` sleeps on: a forwarder's (its space in `awaited`, where
        it recorded an intent) on the event file, any other waiter's on the intent file."""
        return [self.path(EVENTS_WRITTEN if s in awaited else INTENT_RECORDED, s) for s in spaces]

    def signal(self, kind: str, space: str) -> None:
        """Wake the waiters on the `kind` file of `space` (sets its mtime). No such file: nobody
        waits on it, told by `access` without an exception (a failed `utime` raises one: 1.15
        us against 0.35 us, 8k instructions of a holder's write of forwarded events)."""
        path = self.path(kind, space)
        if _exists(path, F_OK):
            with contextlib.suppress(OSError):  # deleted since
                os.utime(path)

    def watch(self, state: Any, paths: list[str]) -> tuple[WakeupWatch, bool] | None:
        """This thread's watch (kept as `state.wakeup_watch`) on `paths`, and whether it is new
        for one of them (a signal before it began was missed: the caller should look at once);
        None when no watch can be made (the caller waits as it would without wake-up files)."""
        watch: WakeupWatch | None = getattr(state, "wakeup_watch", None)
        if watch is not None and watch.pid != os.getpid():
            # Inherited over a fork: the parent's queue. Dropping this copy leaves the parent's.
            watch.close()
            watch = state.wakeup_watch = None
        if watch is not None and (not watch.alive or len(watch.wds) > MAX_WATCHED):
            watch.close()
            watch = state.wakeup_watch = None
        fresh = watch is None or any(p not in watch.wds for p in paths)
        if watch is None:
            fd = inotify_libc().inotify_init1(Inotify.FLAGS)
            if fd < 0:
                self.working = False
                return None
            watch = state.wakeup_watch = WakeupWatch(fd)
        if fresh and not watch.add(paths):
            watch.close()
            state.wakeup_watch = None
            self.working = False
            return None
        self.working = True
        watch.current = {watch.wds[p] for p in paths}
        return watch, fresh


class WakeupWatch(Inotify):
    """One thread's inotify descriptor on the wake-up files it waits on, kept between its waits:
    a signal between a caller's read and its next wait ends that wait at once."""

    def __init__(self, fd: int) -> None:
        super().__init__(fd)
        self.wds: dict[str, int] = {}
        self.current: set[int] = set()

    def add(self, paths: list[str]) -> bool:
        """Watch `paths` too (their files made); False when one cannot be watched."""
        libc = inotify_libc()
        for path in paths:
            if path in self.wds:
                continue
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "a"):
                    pass
            except OSError:
                return False
            wd = libc.inotify_add_watch(self.fd, os.fsencode(path), WakeupFiles.IN_ATTRIB)
            if wd < 0:
                return False
            self.wds[path] = wd
        return True

    def signalled(self, timeout: float) -> bool:
        """Block until a file of `current` is signalled, at most `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            if not readable([self.fd], deadline - time.monotonic()):
                return False
            if self._any_signalled():
                return True

    def _any_signalled(self) -> bool:
        events = self.read_events()
        if events is None:
            return True
        # A wake-up file gone (watched anew next time) or signals dropped: as if ours came.
        lost = self.IN_IGNORED | self.IN_Q_OVERFLOW
        return any(wd in self.current or mask & lost for wd, mask in events)
