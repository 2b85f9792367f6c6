"""How a SQL store's waits for forwarded intents and their events end, per kind of database:
notifications (PostgreSQL), polling with wake-up files (a SQLite file), one process's own signal (an
in-memory SQLite database). The intent queue calls these hooks and never asks which it has."""

from __future__ import annotations

import contextlib
import os
import threading
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from shard_sql.errors import StoreUnavailable
from shard_sql.sql.errors import Site, raise_translated
from shard_sql.sql.listener import Channels, Listener
from shard_sql.sql.notifier import FeedNotifier
from shard_sql.sql.poller import Poller
from shard_sql.sql.signals import APPLIED, FEED, INTENT, Signal
from shard_sql.validation import Pending
from shard_sql.values import Event
from shard_sql.wake import EVENTS_WRITTEN, INTENT_RECORDED, WakeupFiles

__all__ = ["FEED_POLL", "LocalWaits", "NotifiedWaits", "PolledWaits", "Waits"]

SyncToken = tuple[int, int]

FEED_POLL = 1.0
"""Seconds: `wait_feed` looks at the feed's head at least this often, whatever woke it or not
(a commit no wake-up announced: a host's transaction, a row written by hand)."""

_ORPHANS: list[object] = []
"""Listeners and pollers inherited over a fork: referenced for good, never closed in the child (a
PostgreSQL connection closed there would end the parent's session; a SQLite one, its locks)."""


class Waits:
    """The hooks, with what a database without notifications does (nothing)."""

    def wait(self, spaces: Sequence[str], timeout: float, awaited: Mapping[str, str]) -> None:
        """Block until news of `spaces` may have arrived, or `timeout`. In the `awaited` spaces
        this thread waits for the event of the intent it recorded (by intent id)."""
        raise NotImplementedError

    def per_space(self) -> bool:
        """A wait ends for news of its spaces only (`SpaceWakeups`)."""
        return False

    @property
    def listener(self) -> Listener | None:
        """The PostgreSQL listener of this process, once a wait started it."""
        return None

    def before_put(self, space: str, intent_id: str) -> str | None:
        """An intent is about to be recorded; the channel its event should be announced on."""
        return None

    def after_put(self, space: str, intent_id: str, inserted: bool) -> None:
        """An intent's record committed (`inserted`), or was there already."""

    def events_written(self, space: str) -> None:
        """Events with intent ids were committed in `space` (their forwarders may wait)."""

    def applied(self, space: str) -> None:
        """Records of applied intents were deleted in `space`."""

    def lease_granted(self) -> None:
        """A lease was granted through this store: waits on the old set of spaces end once."""

    def close(self) -> None:
        """Stop what waits started (threads, dedicated connections)."""

    # The feed (`wait_feed`).

    feed_written: Callable[[], None] | None = None
    """Called after each commit of events by the store, where its waiters need telling (None:
    the database tells them itself)."""

    def wait_feed(self, timeout: float) -> None:
        """Block until a commit may have happened since this thread's previous wait, or
        `timeout`. The caller looks at the feed's head before each wait."""
        raise NotImplementedError

    # The inbox of notified intents and events (`IntentInbox`): PostgreSQL's only.

    def take_event(self, space: str, intent_id: str) -> tuple[Event | None, bool]:
        """(the notified event of an intent recorded here, or None; True if None is sure)."""
        return None, False

    def was_read(self, space: str, intent_id: str, found: bool) -> None:
        """The table was read for this intent."""

    def begin_read(self, space: str) -> SyncToken | None:
        """Before a read of the space's pending intents."""
        return None

    def end_read(self, space: str, token: SyncToken, found: list[Pending], complete: bool) -> None:
        """After it, with what it found (`complete`: all there was)."""

    def notified(self, space: str, limit: int) -> list[Pending] | None:
        """The space's pending intents as notified; None: read the table."""
        return None

    def drop(self, space: str, intent_ids: Sequence[str]) -> None:
        """These intents are applied: out of the inbox."""

    def watch(self, callback: Callable[[str], bool]) -> Callable[[], None]:
        """Call `callback(space)` on the notification thread as intents arrive."""
        return lambda: None


class NotifiedWaits(Waits):
    """PostgreSQL: LISTEN/NOTIFY through one `Listener` thread per store, started by the first
    wait; a store dropped without `close()` stops it too."""

    def __init__(self, connect: Callable[[], Any], site: Site, channels: Channels) -> None:
        self._connect = connect
        self._where = site.where
        self._channels = channels
        self._watchers: list[Callable[[str], bool]] = []
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._listener: Listener | None = None
        self._closed = False
        self._notifier = FeedNotifier(connect, site.where, channels.feed_notify_sql)
        self.feed_written = self._notifier.poke

    @property
    def listener(self) -> Listener | None:
        listener = self._listener
        if listener is None or self._pid != os.getpid():
            return None
        return listener

    def _started(self) -> Listener:
        listener = self.listener
        if listener is not None:
            return listener
        self._forked()
        with self._lock:
            if self._closed:
                raise StoreUnavailable(f"{self._where}: the store is closed")
            if self._listener is None:
                # The thread holds neither this object nor the store: when they are dropped
                # without close(), the finalizer stops it and its connection goes.
                listener = Listener(self._connect, self._where, self._watchers, self._channels)
                weakref.finalize(self, listener.stop, False)
                self._listener = listener
            return self._listener

    def _forked(self) -> None:
        """After a fork: the parent's listener thread and connection are not ours."""
        if self._pid != os.getpid():
            _ORPHANS.append(self._listener)
            self._listener = None
            self._pid = os.getpid()
            self._lock = threading.Lock()

    def wait(self, spaces: Sequence[str], timeout: float, awaited: Mapping[str, str]) -> None:
        listener = self._started()
        for space in spaces:
            if space not in awaited:
                listener.want(space)  # a holder's wait: the space's intents must come here
        listener.signal.wait(spaces, timeout, awaited)

    def per_space(self) -> bool:
        return True

    def wait_feed(self, timeout: float) -> None:
        listener = self._started()
        listener.want_channel(self._channels.feed)  # new: LISTEN wakes every waiter
        listener.signal.wait_keys([(FEED, "")], timeout)

    def before_put(self, space: str, intent_id: str) -> str | None:
        listener = self.listener
        if listener is None:
            return None
        listener.expect(space, intent_id)  # before the put: its answer may come at once
        return listener.reply_channel if listener.signal.up else None

    def after_put(self, space: str, intent_id: str, inserted: bool) -> None:
        listener = self.listener
        if listener is not None and not inserted:
            listener.stop_expecting(space, intent_id)  # recorded or applied before: no news to come

    def lease_granted(self) -> None:
        listener = self.listener
        if listener is not None:
            listener.signal.reset()

    def close(self) -> None:
        self._notifier.close()
        if self._pid != os.getpid():
            self._forked()
            return
        with self._lock:
            self._closed = True
            listener, self._listener = self._listener, None
        if listener is not None:
            listener.stop()

    def take_event(self, space: str, intent_id: str) -> tuple[Event | None, bool]:
        listener = self.listener
        return (None, False) if listener is None else listener.take(space, intent_id)

    def was_read(self, space: str, intent_id: str, found: bool) -> None:
        listener = self.listener
        if listener is not None:
            listener.was_read(space, intent_id, found)

    def begin_read(self, space: str) -> SyncToken | None:
        listener = self.listener
        return None if listener is None else listener.begin_sync(space)

    def end_read(self, space: str, token: SyncToken, found: list[Pending], complete: bool) -> None:
        listener = self.listener
        if listener is not None:
            listener.end_sync(space, token, found, complete)

    def notified(self, space: str, limit: int) -> list[Pending] | None:
        listener = self.listener
        return None if listener is None else listener.notified(space, limit)

    def drop(self, space: str, intent_ids: Sequence[str]) -> None:
        listener = self.listener
        if listener is not None:
            listener.drop(space, intent_ids)

    def watch(self, callback: Callable[[str], bool]) -> Callable[[], None]:
        self._watchers.append(callback)

        def stop() -> None:
            with contextlib.suppress(ValueError):
                self._watchers.remove(callback)

        return stop


class PolledWaits(Waits):
    """A SQLite file: a `Poller` shared by the waiting threads, asleep on wake-up files where it
    can."""

    def __init__(
        self, connect: Callable[[], Any], site: Site, wal: str, wakeup_files: WakeupFiles | None
    ) -> None:
        self._connect = connect
        self._site = site
        self._wal = wal
        self.wakeup_files = wakeup_files
        """The wake-up files beside the database file (None where inotify is missing)."""
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._poller: Poller | None = None

    def _here(self) -> Poller:
        poller = self._poller
        if poller is not None and self._pid == os.getpid():
            return poller
        if self._pid != os.getpid():  # after a fork: the parent's connection is not ours
            _ORPHANS.append(self._poller)
            self._poller = None
            self._pid = os.getpid()
            self._lock = threading.Lock()
        with self._lock:
            if self._poller is None:
                self._poller = Poller(self._connect, self._wal, self.wakeup_files)
            return self._poller

    def wait(self, spaces: Sequence[str], timeout: float, awaited: Mapping[str, str]) -> None:
        poller = self._here()
        try:
            if self.wakeup_files is None:
                poller.wait(timeout)
            else:
                poller.wait_wakeups(self.wakeup_files.paths_to_wait_on(spaces, awaited), timeout)
        except Exception as e:
            raise_translated(e, self._site)

    def per_space(self) -> bool:
        return self.wakeup_files is not None and self.wakeup_files.working

    def wait_feed(self, timeout: float) -> None:
        # Every commit, by any process, changes `data_version` and writes the -wal file.
        try:
            self._here().wait(timeout)
        except Exception as e:
            raise_translated(e, self._site)

    def after_put(self, space: str, intent_id: str, inserted: bool) -> None:
        if self.wakeup_files is not None and inserted:
            self.wakeup_files.signal(INTENT_RECORDED, space)
        poller = self._poller
        if poller is not None and self._pid == os.getpid():
            # Our own commit is no news for this thread: its next wait is for the holder's.
            poller.seen_now()

    def events_written(self, space: str) -> None:
        if self.wakeup_files is not None:
            self.wakeup_files.signal(EVENTS_WRITTEN, space)

    def close(self) -> None:
        if self._pid != os.getpid():
            _ORPHANS.append(self._poller)
            self._poller = None
            return
        with self._lock:
            poller, self._poller = self._poller, None
        if poller is not None:
            poller.close()


class LocalWaits(Waits):
    """An in-memory SQLite database (one connection, one process): the store's own puts and
    deletes wake its waiters."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._signal: Signal | None = None
        self.feed_written = self._feed_written

    def _here(self) -> Signal:
        with self._lock:
            if self._signal is None:
                self._signal = Signal()
            return self._signal

    def wait(self, spaces: Sequence[str], timeout: float, awaited: Mapping[str, str]) -> None:
        self._here().wait(spaces, timeout, awaited)

    def wait_feed(self, timeout: float) -> None:
        self._here().wait_keys([(FEED, "")], timeout)

    def _feed_written(self) -> None:
        if self._signal is not None:
            self._signal.changed([(FEED, "")])

    def after_put(self, space: str, intent_id: str, inserted: bool) -> None:
        if self._signal is not None:
            self._signal.changed([(INTENT, space)])

    def applied(self, space: str) -> None:
        if self._signal is not None:
            self._signal.changed([(APPLIED, space)])

    def lease_granted(self) -> None:
        if self._signal is not None:
            self._signal.reset()
