"""The append authority: one writer per space, everyone else forwards to it."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import uuid
from collections.abc import Callable
from datetime import datetime
from types import TracebackType
from typing import Any

from shard_sql.errors import (
    IntentTimeout,
    InvalidEvent,
    LeaseHeld,
    SeqConflict,
    ShardSqlError,
    StaleLease,
)
from shard_sql.leases import LeaseRegistry, check_ttl
from shard_sql.ports import BatchWriter, EventStore, IntentInbox, IntentQueue, SpaceWakeups
from shard_sql.validation import Pending, check_space, check_text, pending
from shard_sql.values import Event, Lease

MAX_CONFLICT_RETRIES = 5
SERVE_BATCH = 500
SERVE_EVERY = 0.1
LEASE_RECHECK = 0.05
"""Seconds: how often a forwarder waiting for its event looks at the space's lease again (a
holder that released or died is replaced by this node taking the lease)."""
FORGET_AFTER = 0.05
"""Seconds: the serving thread deletes the records of the intents it applied in batches, when the
oldest has waited this long; see `_serve`."""
QUIET_MIN = 0.001
QUIET_MAX = 0.02
"""Seconds: the longest the serving thread rests between rounds that found nothing to apply, on
stores whose wake-ups are not per space (see `_run`)."""
log = logging.getLogger("shard_sql.authority")


class NotHolder(Exception):
    """Internal: this node does not (or no longer) hold the space."""


class AppendAuthority:
    """A node that appends to spaces: it writes where it holds the lease, forwards elsewhere.

    `node_id` must be unique among the nodes sharing the registry's lease store.
    Used as a context manager, it renews its leases and serves intents forwarded from other
    processes in a background thread until the block exits, then releases its leases.
    """

    def __init__(
        self,
        node_id: str,
        store: EventStore,
        registry: LeaseRegistry,
        *,
        ttl_seconds: float = 30.0,
        forward_timeout: float = 30.0,
    ) -> None:
        self.node_id = check_text("node_id", node_id)
        self.ttl_seconds = check_ttl(ttl_seconds)
        if not isinstance(store, BatchWriter):
            raise InvalidEvent("store", f"{type(store).__name__} is not a shard_sql store")
        if not registry.fences(store):
            raise InvalidEvent("registry", "keeps its leases in another store than this one")
        self.store = store
        self._writer: BatchWriter = store
        # Forwarding across processes needs the leases and the intents in one shared store.
        self._queue = store if isinstance(store, IntentQueue) and registry.store is store else None
        self._inbox = store if self._queue is not None and isinstance(store, IntentInbox) else None
        self._wakeups = store if isinstance(store, SpaceWakeups) else None
        self._routes: dict[str, Lease] = {}
        """The latest lease of another node seen per space: where to forward, without a read."""
        self._unforgotten: dict[str, list[str]] = {}
        self._unforgotten_since = 0.0
        self._forget_lock = threading.Lock()
        self._serving: dict[str, threading.Lock] = {}
        self._unwatch: Callable[[], None] | None = None
        self.registry = registry
        self.forward_timeout = forward_timeout
        self._leases: dict[str, Lease] = {}
        self._heads: dict[str, int] = {}
        self._locks: dict[str, threading.RLock] = {}
        self._guard = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._served: dict[str, float] = {}
        registry.register(self)

    # -- leases ------------------------------------------------------------------------------

    def acquire(self, space: str) -> Lease:
        """Take the space's lease; `LeaseHeld` while another node's lease is valid."""
        lease = self.registry.acquire(space, self.node_id, self.ttl_seconds)
        with self._lock(space):
            if self._leases.get(space, lease).generation != lease.generation:
                self._heads.pop(space, None)
            self._leases[space] = lease
        return lease

    def holds(self, space: str) -> bool:
        """True only while this node holds the space's valid lease."""
        cur = self.registry.current(space)
        return cur is not None and cur.holder == self.node_id

    def release(self, space: str) -> None:
        """Give up the space's lease so another node can acquire it at once."""
        check_space(space)
        with self._lock(space):
            lease = self._leases.pop(space, None)
            self._heads.pop(space, None)
            if lease is not None:
                self.registry.release(lease)

    def leases(self) -> list[Lease]:
        """The leases this node believes it holds."""
        with self._guard:
            return list(self._leases.values())

    # -- appending ---------------------------------------------------------------------------

    def append(
        self, space: str, type: str, payload: dict[str, Any], *, intent_id: str | None = None
    ) -> Event:
        """Append to `space` wherever its lease lives; return the written event.

        Raises `IntentTimeout` when no holder wrote it within `forward_timeout` seconds: the
        outcome is then unknown and a retry with the same `intent_id` is safe.
        """
        check_space(space)
        item = pending(type, payload, intent_id)
        held = self._leases.get(space)
        if held is not None:
            # Held here: write at once, before the forwarding loop's set-up (its first round
            # would do the same). If another thread is applying forwarded intents here, let it
            # finish first: Python's locks are not fair, and a caller appending in a loop would
            # otherwise keep the space's lock, and the forwarders waiting, for as long as it runs.
            serving = self._serving.get(space)
            if serving is not None and serving.locked():
                with serving:
                    pass
            t = self.registry.now()
            if t < held.expires_at:
                event = self._write_held(space, item, t)
                if event is not None:
                    return event
        deadline = time.monotonic() + self.forward_timeout
        queued = False
        backoff = 0.001
        attempt = -1
        recheck_at = 0.0
        while True:
            attempt += 1
            if queued:
                # Waiting for a holder in another process: the event is what we wait for.
                assert self._queue is not None and item.intent_id is not None
                done, sure = None, False
                if self._inbox is not None:
                    done, sure = self._inbox.awaited_event(space, item.intent_id)
                if done is None and not sure:
                    done = self._queue.find_intent(space, item.intent_id)
                if done is not None:
                    return done
                now_m = time.monotonic()
                if now_m < recheck_at:
                    # Woken by news of other intents: the lease is looked at again only every
                    # LEASE_RECHECK seconds, not at every wake-up (many forwarders, one space).
                    if now_m >= deadline:
                        raise self._timeout(space, item)
                    self._queue.wait_for_change([space], min(recheck_at, deadline) - now_m)
                    continue
                recheck_at = now_m + LEASE_RECHECK
            lease = self._leases.get(space)
            now = self.registry.now() if lease is not None else None
            if lease is not None and now is not None and now < lease.expires_at:
                event = self._write_held(space, item, now)
                if event is not None:
                    return event
            else:
                route = self._routes.get(space) if attempt == 0 else None
                if route is not None and now is None:
                    now = self.registry.now()
                if route is not None and now is not None and now < route.expires_at:
                    # Forward to where the lease was last seen: a wrong route costs a wait (the
                    # next attempt reads the lease), never safety (the holder's fence decides).
                    cur: Lease | None = route
                else:
                    cur = self.registry.current(space)
                    if cur is not None and cur.holder != self.node_id:
                        self._routes[space] = cur
                    else:
                        self._routes.pop(space, None)
                if cur is None or cur.holder == self.node_id:
                    try:
                        self.acquire(space)
                        # A new holder first applies what was forwarded to its predecessor.
                        self.serve(space)
                        continue
                    except LeaseHeld as e:
                        cur = e.lease
                        self._routes[space] = cur
                target = self.registry.local_node(cur.holder)
                if target is not None and target is not self:
                    # Same process: hand the intent to the holder directly.
                    try:
                        return target._write_own(space, item)
                    except NotHolder:
                        pass
                elif self._queue is None:
                    raise LeaseHeld(cur)
                else:
                    if item.intent_id is None:
                        item = dataclasses.replace(item, intent_id=f"fwd-{uuid.uuid4().hex}")
                    if not queued:
                        self._queue.put_intent(space, item, holder=cur.holder)
                        queued = True
                        recheck_at = time.monotonic() + LEASE_RECHECK
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._timeout(space, item)
            if queued and self._queue is not None:
                self._queue.wait_for_change([space], min(max(backoff, 0.05), remaining))
            else:
                time.sleep(min(backoff, remaining))
            backoff = min(backoff * 2, 0.05)

    def _write_held(self, space: str, item: Pending, now: datetime) -> Event | None:
        """Write `item` under this node's lease; None when this node does not hold it (any more)."""
        try:
            event = self._write_batch(space, [item], now)[0]
        except NotHolder:
            return None
        if self._thread is None:
            self._serve_now_and_then(space)
        return event

    def _timeout(self, space: str, item: Pending) -> IntentTimeout:
        return IntentTimeout(
            f"space {space!r}: no holder wrote the append within "
            f"{self.forward_timeout}s; retry with the same intent_id"
            + (f" ({item.intent_id})" if item.intent_id else "")
        )

    def _write_own(self, space: str, item: Pending) -> Event:
        return self._write_batch(space, [item])[0]

    def _write_batch(
        self, space: str, batch: list[Pending], now: datetime | None = None
    ) -> list[Event]:
        """Write under this node's lease. `now`: the registry's time, read just before by the
        caller (one clock read per append); else read here."""
        lock = self._locks.get(space) or self._lock(space)
        lock.acquire()  # not `with`: 0.1 us less
        try:
            lease = self._leases.get(space)
            registry = self.registry
            if now is None:
                now = registry.now()
            if lease is None or not now < lease.expires_at:
                raise NotHolder(space)
            if (lease.expires_at - now).total_seconds() < self.ttl_seconds / 2:
                lease = self._renew(space, lease)
            writer, heads = self._writer, self._heads
            expected = -1
            for _ in range(MAX_CONFLICT_RETRIES):
                known = heads.get(space)
                expected = self.store.head(space) if known is None else known
                try:
                    events = registry.fenced_write(
                        writer, space, batch, expected_seq=expected, lease=lease
                    )
                except SeqConflict:
                    # Someone wrote without the lease (a direct store.append): re-read the head.
                    heads.pop(space, None)
                    continue
                except StaleLease:
                    self._leases.pop(space, None)
                    heads.pop(space, None)
                    raise NotHolder(space) from None
                if events[0].seq == expected:
                    heads[space] = expected + len(events)
                return events
            raise SeqConflict(space, expected)
        finally:
            lock.release()

    def _renew(self, space: str, lease: Lease) -> Lease:
        try:
            lease = self.registry.renew(lease, ttl_seconds=self.ttl_seconds)
        except StaleLease:
            self._leases.pop(space, None)
            self._heads.pop(space, None)
            raise NotHolder(space) from None
        self._leases[space] = lease
        return lease

    def _lock(self, space: str) -> threading.RLock:
        lock = self._locks.get(space)  # a dict read is atomic: no guard on the common path
        if lock is not None:
            return lock
        with self._guard:
            lock = self._locks.get(space)
            if lock is None:
                lock = self._locks[space] = threading.RLock()
            return lock

    # -- serving -----------------------------------------------------------------------------

    def serve(self, space: str) -> int:
        """Apply the intents forwarded to this node for `space`, in arrival order.

        Returns how many were applied; 0 when this node does not hold the space.
        """
        return self._serve(space, defer_forget=False)

    def _serve(self, space: str, *, defer_forget: bool) -> int:
        if self._queue is None:
            return 0
        applied = 0
        while True:
            batch = None
            if self._inbox is not None:
                batch = self._inbox.notified_intents(space, limit=SERVE_BATCH)
            read = batch is None
            if read:
                batch = self._queue.pending_intents(space, limit=SERVE_BATCH)
            if not batch:
                return applied
            try:
                self._write_batch(space, batch)
            except NotHolder:
                return applied
            except InvalidEvent:
                # Part of the batch was applied meanwhile: apply the rest one by one.
                for item in batch:
                    try:
                        self._write_batch(space, [item])
                    except NotHolder:
                        return applied
            applied += len(batch)
            ids = [i.intent_id for i in batch if i.intent_id]
            if self._inbox is not None:
                self._inbox.drop_notified(space, ids)
            if not defer_forget:
                self._queue.forget_intents(space, ids)
                continue
            # The serving thread deletes applied records later, in batches (`_forget_due`): a
            # record whose event exists is garbage that every reader skips; this keeps a round
            # trip out of the way of the next forwarded append.
            with self._forget_lock:
                if not self._unforgotten:
                    self._unforgotten_since = time.monotonic()
                self._unforgotten.setdefault(space, []).extend(ids)
            if read and len(batch) < SERVE_BATCH and self._precise():
                # The table had no more: what arrived since has woken the next wait already
                # (precise wake-ups end a wait for news since the previous one returned), so
                # the serving thread's next round reads it, one read fewer per round.
                return applied

    def _precise(self) -> bool:
        """The store's waits end for news of the spaces waited on only (asked each time: bells
        that cannot be made any more fall back to waking at every change)."""
        return self._wakeups is not None and self._wakeups.wakes_per_space()

    def _forget_due(self, force: bool = False) -> float:
        """Delete the applied records kept back when the oldest has waited `FORGET_AFTER` (or
        `force`); return the seconds until the next are due (inf: none kept)."""
        with self._forget_lock:
            if not self._unforgotten or self._queue is None:
                return float("inf")
            wait = self._unforgotten_since + FORGET_AFTER - time.monotonic()
            if wait > 0 and not force:
                return wait
            kept, self._unforgotten = self._unforgotten, {}
        for space, ids in kept.items():
            self._queue.forget_intents(space, ids)
        return float("inf")

    def tick(self) -> None:
        """One round of upkeep: renew the leases due, drop lost ones, serve forwarded intents."""
        self._tick(defer_forget=False)

    def _tick(self, *, defer_forget: bool) -> int:
        applied = 0
        for lease in self.leases():
            space = lease.space
            with self._lock(space):
                cur = self._leases.get(space)
                if cur is None:
                    continue
                now = self.registry.now()
                if not cur.valid_at(now):
                    self._leases.pop(space, None)
                    self._heads.pop(space, None)
                    continue
                if (cur.expires_at - now).total_seconds() < self.ttl_seconds * 2 / 3:
                    try:
                        self._renew(space, cur)
                    except NotHolder:
                        continue
            with self._serve_lock(space):
                # A store without an inbox (git) reads its intents every round, and that read
                # deletes the applied records it meets (`pending_intents`): nothing to gain from
                # deferring their deletion.
                deferred = defer_forget and self._inbox is not None
                applied += self._serve(space, defer_forget=deferred)
        return applied

    def _serve_lock(self, space: str) -> threading.Lock:
        lock = self._serving.get(space)
        if lock is None:
            with self._guard:
                lock = self._serving.setdefault(space, threading.Lock())
        return lock

    def _intent_arrived(self, space: str) -> bool:
        # On the store's notification thread (`IntentInbox.watch_intents`): apply the intent
        # now rather than wake the serving thread for it, one thread switch less per forwarded
        # append. True when done; else (the serving thread is at it, a failure) the serving
        # thread is woken and does it.
        if self._stop.is_set() or space not in self._leases:
            return False
        lock = self._serve_lock(space)
        if not lock.acquire(blocking=False):
            return False
        try:
            self._serve(space, defer_forget=True)
        except Exception as e:
            log.debug("node %s: serving %r on notification failed: %s", self.node_id, space, e)
            return False
        finally:
            lock.release()
        return space in self._leases

    def _serve_now_and_then(self, space: str) -> None:
        # A holder outside a `with` block has no serving thread: apply what other processes
        # forwarded to it, at most every SERVE_EVERY seconds, so that they do not wait for its
        # lease to lapse. The append that got here has succeeded whatever happens now.
        if self._queue is None:
            return
        now = time.monotonic()
        if now - self._served.get(space, 0.0) < SERVE_EVERY:
            return
        self._served[space] = now
        try:
            self.serve(space)
        except ShardSqlError as e:
            log.warning(
                "node %s: serving forwarded intents of %r failed: %s", self.node_id, space, e
            )

    def _run(self) -> None:
        # Short rounds: a stop request waits at most one round, and a change the store did not
        # signal (polling stores) is seen within it.
        interval = max(min(self.ttl_seconds / 6, 0.25), 0.01)
        pause = 0.05
        quiet = 0.0
        while not self._stop.is_set():
            spaces = [lease.space for lease in self.leases()]
            try:
                if self._queue is not None and spaces:
                    due = self._forget_due()
                    if quiet:
                        # A store without per-space news (SQLite, git without bells) wakes it at
                        # every commit, to anything: after rounds that found nothing, it rests
                        # a little (up to QUIET_MAX) before it listens again, so that nodes
                        # serving idle spaces do not all read the table at every commit.
                        self._stop.wait(min(quiet, due))
                    self._queue.wait_for_change(spaces, max(min(interval, due), 0.0))
                else:
                    self._stop.wait(interval)
                if not self._stop.is_set():
                    applied = self._tick(defer_forget=True)
                    if applied or self._precise():
                        quiet = 0.0
                    else:
                        quiet = min(max(quiet * 2, QUIET_MIN), QUIET_MAX)
                pause = 0.05
            except Exception as e:
                # A failed round (database restarting, lock busy) is retried soon, with back-off.
                log.warning("node %s: background round failed: %s", self.node_id, e)
                self._stop.wait(pause)
                pause = min(pause * 2, interval)

    def __enter__(self) -> AppendAuthority:
        self._stop.clear()
        if self._inbox is not None:
            self._unwatch = self._inbox.watch_intents(self._intent_arrived)
        self._thread = threading.Thread(
            target=self._run, name=f"shard-sql-authority-{self.node_id}", daemon=True
        )
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._unwatch is not None:
            self._unwatch()
            self._unwatch = None
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        try:
            self._forget_due(force=True)
        except ShardSqlError as e:  # garbage the next holder sweeps
            log.warning("node %s: forgetting applied intents failed: %s", self.node_id, e)
        for lease in self.leases():
            self.release(lease.space)
