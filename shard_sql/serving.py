"""A holder's side of forwarding: applying the intents other processes forwarded to it, and the
background thread that keeps its leases renewed and serves them (docs/architecture.md)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Protocol

from shard_sql.errors import IntentConflict, InvalidEvent, ShardSqlError
from shard_sql.ports import IntentInbox, IntentQueue, SpaceWakeups
from shard_sql.validation import Pending
from shard_sql.values import Event, Lease

SERVE_BATCH = 500
SERVE_EVERY = 0.1
"""Seconds: how often a holder without a serving thread applies forwarded intents after its own
appends (`serve_now_and_then`)."""
FORGET_AFTER = 0.05
"""Seconds: the serving thread deletes the records of the intents it applied in batches, when the
oldest has waited this long (see `IntentServer.serve`)."""
QUIET_MIN = 0.001
QUIET_MAX = 0.02
"""Seconds: the longest the serving thread rests between rounds that found nothing to apply, on
stores whose wake-ups are not per space (see `IntentServer._wait_for_work`)."""
log = logging.getLogger("shard_sql.authority")


class Holder(Protocol):
    """What the server needs from the node it serves for (an `AppendAuthority`)."""

    node_id: str
    ttl_seconds: float

    def leases(self) -> list[Lease]: ...

    def holds_locally(self, space: str) -> bool:
        """Whether this node believes it holds `space` (no read)."""
        ...

    def write_if_held(self, space: str, batch: list[Pending]) -> list[Event] | None:
        """Write under this node's lease; None when it does not hold the space (any more)."""
        ...

    def keep_leases(self) -> list[str]:
        """Renew the leases due, drop the lapsed ones; return the spaces still held."""
        ...


class IntentServer:
    """Applies the intents forwarded to `node` through `queue` (None: a store that forwards
    nothing across processes; the background thread then only keeps the leases renewed)."""

    def __init__(
        self,
        node: Holder,
        queue: IntentQueue | None,
        inbox: IntentInbox | None,
        wakeups: SpaceWakeups | None,
    ) -> None:
        self.node, self.queue, self.inbox, self.wakeups = node, queue, inbox, wakeups
        self._applied_not_forgotten: dict[str, list[str]] = {}
        self._not_forgotten_since = 0.0
        self._forget_lock = threading.Lock()
        self._serving: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        self._served_at: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- applying ----------------------------------------------------------------------------

    def serve(self, space: str, *, defer_forget: bool = False) -> int:
        """Apply the intents forwarded for `space`, in arrival order; return how many.

        `defer_forget`: keep the records of applied intents for `forget_due` to delete in a
        batch (a record whose event exists is garbage every reader skips), keeping a round
        trip out of the way of the next forwarded append.
        """
        queue = self.queue
        if queue is None:
            return 0
        applied = 0
        while True:
            batch = self.inbox.notified_intents(space, limit=SERVE_BATCH) if self.inbox else None
            read = batch is None
            if batch is None:
                batch = queue.pending_intents(space, limit=SERVE_BATCH)
            if not batch:
                return applied
            if not self._apply(space, batch):
                return applied
            applied += len(batch)
            ids = [i.intent_id for i in batch if i.intent_id]
            if self.inbox is not None:
                self.inbox.drop_notified(space, ids)
            if not defer_forget:
                queue.forget_intents(space, ids)
                continue
            self._keep_to_forget(space, ids)
            if read and len(batch) < SERVE_BATCH and self.wakes_per_space():
                # The table had no more: what arrived since has woken the next wait already
                # (such wake-ups end a wait for news since the previous one returned), so the
                # serving thread's next round reads it, one read fewer per round.
                return applied

    def _apply(self, space: str, batch: list[Pending]) -> bool:
        """Write `batch`; False when this node does not hold the space (any more)."""
        node = self.node
        try:
            return node.write_if_held(space, batch) is not None
        except (InvalidEvent, IntentConflict):
            # Part of the batch was applied meanwhile: apply the rest one by one.
            return all(self._apply_one(space, item) for item in batch)

    def _apply_one(self, space: str, item: Pending) -> bool:
        try:
            return self.node.write_if_held(space, [item]) is not None
        except IntentConflict:
            return True  # its id was written with other content: its forwarder is told so

    def wakes_per_space(self) -> bool:
        """The store's waits end for news of the spaces waited on only (asked each time: wake-up
        files that cannot be made any more fall back to waking at every change)."""
        return self.wakeups is not None and self.wakeups.wakes_per_space()

    def serve_lock(self, space: str) -> threading.Lock:
        """Held while intents of `space` are applied."""
        lock = self._serving.get(space)
        if lock is None:
            with self._guard:
                lock = self._serving.setdefault(space, threading.Lock())
        return lock

    def let_serving_finish(self, space: str) -> None:
        """Wait for a thread applying forwarded intents of `space`, if any. Python's locks are
        not fair: a caller appending in a loop would otherwise keep the space, and the
        forwarders waiting, for as long as it runs."""
        serving = self._serving.get(space)
        if serving is not None and serving.locked():
            with serving:
                pass

    def serve_now_and_then(self, space: str) -> None:
        """For a holder with no serving thread: apply what other processes forwarded, at most
        every SERVE_EVERY seconds, so they do not wait for its lease to lapse. Called after an
        append that has succeeded whatever happens here."""
        if self.queue is None or self._thread is not None:
            return
        now = time.monotonic()
        if now - self._served_at.get(space, 0.0) < SERVE_EVERY:
            return
        self._served_at[space] = now
        try:
            self.serve(space)
        except ShardSqlError as e:
            log.warning(
                "node %s: serving forwarded intents of %r failed: %s", self.node.node_id, space, e
            )

    def intent_arrived(self, space: str) -> bool:
        """On the store's notification thread (`IntentInbox.watch_intents`): apply the intent
        now rather than wake the serving thread, one thread switch less per forwarded append.
        True when done; else (the serving thread is at it, a failure) the serving thread is
        woken and does it."""
        if self._stop.is_set() or not self.node.holds_locally(space):
            return False
        lock = self.serve_lock(space)
        if not lock.acquire(blocking=False):
            return False
        try:
            self.serve(space, defer_forget=True)
        except Exception as e:
            log.debug("node %s: serving %r on notification failed: %s", self.node.node_id, space, e)
            return False
        finally:
            lock.release()
        return self.node.holds_locally(space)

    # -- forgetting applied records ----------------------------------------------------------

    def _keep_to_forget(self, space: str, ids: Sequence[str]) -> None:
        with self._forget_lock:
            if not self._applied_not_forgotten:
                self._not_forgotten_since = time.monotonic()
            self._applied_not_forgotten.setdefault(space, []).extend(ids)

    def forget_due(self, force: bool = False) -> float:
        """Delete the applied records kept back once the oldest has waited `FORGET_AFTER` (or
        `force`); return the seconds until the next are due (inf: none kept)."""
        with self._forget_lock:
            if not self._applied_not_forgotten or self.queue is None:
                return float("inf")
            wait = self._not_forgotten_since + FORGET_AFTER - time.monotonic()
            if wait > 0 and not force:
                return wait
            kept, self._applied_not_forgotten = self._applied_not_forgotten, {}
        for space, ids in kept.items():
            self.queue.forget_intents(space, ids)
        return float("inf")

    # -- the serving thread ------------------------------------------------------------------

    def round(self, *, defer_forget: bool) -> int:
        """One round of upkeep: renew the leases due, drop lost ones, serve forwarded intents;
        return how many intents were applied."""
        applied = 0
        for space in self.node.keep_leases():
            with self.serve_lock(space):
                # A store without an inbox (git) reads its intents every round, and that read
                # deletes the applied records it meets (`pending_intents`): nothing to gain from
                # deferring their deletion.
                deferred = defer_forget and self.inbox is not None
                applied += self.serve(space, defer_forget=deferred)
        return applied

    @property
    def running(self) -> bool:
        """Whether the serving thread runs."""
        return self._thread is not None

    def start(self) -> None:
        """Start the serving thread."""
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._run, name=f"shard-sql-authority-{self.node.node_id}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop the serving thread; it ends its round first."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        # Short rounds: a stop request waits at most one round, and a change the store did not
        # signal (polling stores) is seen within it.
        stop = self._stop
        interval = max(min(self.node.ttl_seconds / 6, 0.25), 0.01)
        pause = 0.05
        quiet = 0.0
        while not stop.is_set():
            try:
                self._wait_for_work(interval, quiet)
                if not stop.is_set():
                    applied = self.round(defer_forget=True)
                    quiet = self._next_quiet(applied, quiet)
                pause = 0.05
            except Exception as e:
                # A failed round (database restarting, lock busy) is retried soon, with back-off.
                log.warning("node %s: background round failed: %s", self.node.node_id, e)
                stop.wait(pause)
                pause = min(pause * 2, interval)

    def _wait_for_work(self, interval: float, quiet: float) -> None:
        spaces = [lease.space for lease in self.node.leases()]
        if self.queue is None or not spaces:
            self._stop.wait(interval)
            return
        due = self.forget_due()
        if quiet:
            # A store without per-space news (SQLite, git without wake-up files) wakes it at every
            # commit, to anything: after rounds that found nothing, it rests a little (up to
            # QUIET_MAX) before it listens again, so that nodes serving idle spaces do not all
            # read the table at every commit.
            self._stop.wait(min(quiet, due))
        self.queue.wait_for_change(spaces, max(min(interval, due), 0.0))

    def _next_quiet(self, applied: int, quiet: float) -> float:
        if applied or self.wakes_per_space():
            return 0.0
        return min(max(quiet * 2, QUIET_MIN), QUIET_MAX)
