"""Group commit: the appends waiting for one space are written in one store transaction.

A holder's callers (its own threads, and the listener of the appends other processes hand
over, `shard_sql.handoff_listener`) queue their items per space. The first to find nobody
writing leads: it writes what is queued, up to `GROUP_BOUND` items, as one fenced batch (one
commit, one fsync), gives each caller its event, and hands the lead to the first caller still
queued, if any. A lone caller writes its item at once, as without grouping.

The holder's listener does not wait: it `submit`s the items its forwarders sent (each with its
reply) and goes back to its sockets. Where the store's writes serialize anyway (SQLite's one
writer, git's feed mutex, memory's lock) it writes them itself when nobody leads: a thread
hand-off would buy nothing. Where writes to different spaces commit in parallel (PostgreSQL: a
connection each, `parallel_writers`) and items of several spaces are being submitted (within
`MIXED_FOR`), a space's submitted items go to the group commit's writers (up to `WRITERS`
threads, at most one per space at a time), so that the listener reads the other spaces'
requests while a commit is on the wire; with one space alone it writes itself, as elsewhere.
When a leader goes with only submitted items queued, a writer (the drainer, started when first
needed) leads in their place.

A caller may give a `reply`, called with its item's event (or error) by whichever thread wrote
it, right after the commit and before any thread is woken: a handed-over item's answer goes out
to its forwarder at once, without waiting for the listener's thread to be scheduled. A leader
whose item is written goes on writing what queued meanwhile (up to `KEEP_LEADING` batches)
rather than waking the next caller to write it: one thread switch fewer per batch.

A batch write that fails for one item (`IntentConflict`: its id was written with other content;
`InvalidEvent`: part of the batch was written already) is written again item by item, so only
that item fails. Any other failure (`NotHolder`, a lost connection) is every item's.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from shard_sql.errors import IntentConflict, InvalidEvent
from shard_sql.validation import Pending
from shard_sql.values import Event

log = logging.getLogger("shard_sql.group")

GROUP_BOUND = 256
"""The most items one grouped write carries."""

KEEP_LEADING = 8
"""Batches a leader writes for others once its own item is written, before it wakes the first
caller queued to lead (its own caller waits meanwhile)."""

WRITERS = 4
"""Threads that write submitted items, each for one space at a time, on stores whose writes to
different spaces commit in parallel (one fewer than a PostgreSQL store's pool of 5 connections,
which the holder's own appends and lease renewals use too)."""

MIXED_FOR = 1.0
"""Seconds after items of two spaces were submitted one after the other during which `submit`
hands items to the writers (where the store has some); with one space alone, the submitting
thread writes at once, as on other stores (a thread hand-off per batch costs more than it buys:
there is nothing to read meanwhile but that space's next requests)."""

Write = Callable[[str, list[Pending]], list[Event]]
Reply = Callable[[Event | None, BaseException | None], None]
"""Told an item's event (error None) or error (event None), by the thread that wrote it."""


def parallel_writers(store: object) -> int:
    """`WRITERS` when `store`'s writes to different spaces commit concurrently (its SQL
    dialect says so: PostgreSQL), else 0: its writes serialize, and the thread that submits
    writes (see the module)."""
    dialect = getattr(getattr(store, "database", None), "dialect", None)
    return WRITERS if getattr(dialect, "parallel_space_writes", False) else 0


class NotHolder(Exception):
    """Internal: this node does not (or no longer) hold the space."""


@dataclass
class GroupStats:
    """How the grouped writes went: `writes` batches carried `items` items, `largest` at most."""

    writes: int = 0
    items: int = 0
    largest: int = 0

    def add(self, items: int) -> None:
        """One more write, of `items` items."""
        self.writes += 1
        self.items += items
        if items > self.largest:
            self.largest = items

    @property
    def mean(self) -> float:
        return self.items / self.writes if self.writes else 0.0


class _Slot:
    """One caller's item, then its event or error; `waiter` is released to wake it."""

    __slots__ = ("error", "event", "item", "lead", "reply", "waiter")

    def __init__(self, item: Pending, reply: Reply | None) -> None:
        self.item = item
        self.reply = reply
        self.event: Event | None = None
        self.error: BaseException | None = None
        self.lead = False
        self.waiter: threading.Lock | None = None

    @property
    def done(self) -> bool:
        return self.event is not None or self.error is not None

    def result(self) -> Event:
        if self.error is not None:
            raise self.error
        assert self.event is not None
        return self.event


class _Queue:
    __slots__ = ("busy", "mutex", "slots")

    def __init__(self) -> None:
        self.mutex = threading.Lock()
        self.slots: list[_Slot] = []
        self.busy = False
        """A leader is writing (callers queue and wait)."""


class GroupCommit:
    """Writes the items of concurrent callers of one space together, through `write` (the
    node's fenced batch write)."""

    def __init__(self, write: Write, *, bound: int = GROUP_BOUND, writers: int = 0) -> None:
        """`writers` > 0 (stores whose writes to different spaces commit in parallel): while
        items of several spaces are being submitted (`MIXED_FOR`), `submit` hands each space's
        items to up to that many writer threads instead of writing them itself."""
        self._write = write
        self._bound = bound
        self.writers = writers
        self._most = max(writers, 1)
        self._last_space: str | None = None
        self._mixed_until = 0.0
        self._queues: dict[str, _Queue] = {}
        self._guard = threading.Lock()
        self.stats = GroupStats()
        self._drain: deque[tuple[str, _Queue]] = deque()
        self._drain_ready = threading.Condition(threading.Lock())
        self._drainers = 0
        """Writer threads running, `_idle` of them waiting for a space to write."""
        self._idle = 0
        self._closed = False

    def submit(self, space: str, entries: list[tuple[Pending, Reply]]) -> None:
        """Write the items of `entries` to `space` with whatever else is queued there and tell
        each its `reply`, without waiting for them: while a leader is at work they are queued
        for it and this returns at once (the listener goes back to its sockets); else this
        thread writes them at once, as one batch (up to the bound), then what queued meanwhile,
        as a leader does; or, with `writers`, a writer thread does."""
        q = self._queues.get(space) or self._queue(space)
        hand_off = self.writers > 0 and self._several_spaces(space)
        with q.mutex:
            if q.busy or len(entries) > 1 or hand_off:
                q.slots += [_Slot(item, reply) for item, reply in entries]
            if q.busy:
                return
            q.busy = True
        if hand_off:
            self._hand_to_drainer(space, q)
            return
        if len(entries) == 1:  # alone: no slot, no queue (as a lone caller)
            item, reply = entries[0]
            with contextlib.suppress(Exception):  # told to `reply`
                self._write_alone(space, q, item, reply)
            return
        try:
            self._lead_others(space, q)  # a failed write is told to its items' replies
        finally:
            self._pass_lead(space, q)

    def _several_spaces(self, space: str) -> bool:
        """Whether items of other spaces than `space` were submitted in the last `MIXED_FOR`
        seconds (then their writes may be on the wire while this one's are)."""
        now = time.monotonic()
        if space != self._last_space:
            if self._last_space is not None:
                self._mixed_until = now + MIXED_FOR
            self._last_space = space
        return now < self._mixed_until

    def write(self, space: str, item: Pending, reply: Reply | None = None) -> Event:
        """Write `item` to `space` with whatever else is queued there; its event, or the error
        its write raised. `reply`, if given, is told the same first (see the module)."""
        q = self._queues.get(space) or self._queue(space)
        with q.mutex:
            alone = not q.busy
            if alone:
                q.busy = True
            else:
                slot = _Slot(item, reply)
                q.slots.append(slot)
                slot.waiter = waiter = threading.Lock()
                waiter.acquire()
        if alone:
            return self._write_alone(space, q, item, reply)
        waiter.acquire()  # released with this item's result, or to take the lead
        if not slot.lead:
            return slot.result()
        self._lead(space, q, slot)
        return slot.result()

    def _write_alone(self, space: str, q: _Queue, item: Pending, reply: Reply | None) -> Event:
        """Nobody was writing: write `item` at once, as a batch of one (no slot, no queue: a
        lone caller pays nothing for grouping), then write what queued meanwhile, or pass the
        lead on."""
        try:
            try:
                [event] = self._write(space, [item])
            except BaseException as e:
                if reply is not None:
                    _tell(reply, None, e)
                raise
            self.stats.add(1)
            if reply is not None:
                _tell(reply, event, None)
            if q.slots:
                self._lead_others(space, q)
            return event
        finally:
            self._pass_lead(space, q)

    def _queue(self, space: str) -> _Queue:
        with self._guard:
            return self._queues.setdefault(space, _Queue())

    def _lead(self, space: str, q: _Queue, mine: _Slot) -> None:
        """Write batches until `mine` is written, then what queued meanwhile (up to
        `KEEP_LEADING` batches), then pass the lead on (or end it)."""
        try:
            while not mine.done:
                self._write_next(space, q, mine)
            self._lead_others(space, q)
        except BaseException as e:  # KeyboardInterrupt, a bug
            if not mine.done:  # still queued: the lead must not pass to this caller again
                with q.mutex:
                    if mine in q.slots:
                        q.slots.remove(mine)
                mine.error = e
            raise
        finally:
            self._pass_lead(space, q)

    def _lead_others(self, space: str, q: _Queue) -> None:
        """Once the leader's own item is written: the next batches queued, up to
        `KEEP_LEADING`, without the thread switch of passing the lead (the first caller queued
        would wake to write the same)."""
        for _ in range(KEEP_LEADING):
            if not q.slots:  # read without the mutex: a miss only passes the lead
                return
            self._write_next(space, q, None)

    def _write_next(self, space: str, q: _Queue, mine: _Slot | None) -> None:
        """Write the next batch; tell and wake its callers (but `mine`, the leader's own)."""
        batch = self._take(q)
        try:
            self._run(space, batch)
        except BaseException as e:  # KeyboardInterrupt, a bug: no caller waits forever
            for slot in batch:
                if not slot.done:
                    slot.error = e
            self._finish(batch, mine)
            raise
        self._finish(batch, mine)

    def _pass_lead(self, space: str, q: _Queue) -> None:
        """The lead goes to the first caller queued that waits (`write`), else, when only
        submitted items are queued (their callers wait for nobody), to the drainer; or ends."""
        with q.mutex:
            if not q.slots:
                q.busy = False
                return
            nxt = next((slot for slot in q.slots if slot.waiter is not None), None)
            if nxt is not None:
                nxt.lead = True
        if nxt is None:
            self._hand_to_drainer(space, q)
            return
        assert nxt.waiter is not None
        nxt.waiter.release()

    def _hand_to_drainer(self, space: str, q: _Queue) -> None:
        """The lead of `space` to a writer: a thread of this group commit (started when a
        space waits for one and none is idle, up to `writers`, at least one) that writes what
        was submitted when no caller waits to."""
        with self._drain_ready:
            self._drain.append((space, q))
            if len(self._drain) > self._idle and self._drainers < self._most:
                self._closed = False
                drainer = threading.Thread(
                    target=self._drain_loop, name="shard-sql-group", daemon=True
                )
                drainer.start()  # if it cannot start, the next hand-off tries again
                self._drainers += 1
            self._drain_ready.notify()

    def _drain_loop(self) -> None:
        while True:
            with self._drain_ready:
                while not self._drain and not self._closed:
                    self._idle += 1
                    try:
                        self._drain_ready.wait()
                    finally:
                        self._idle -= 1
                if not self._drain:
                    self._drainers -= 1
                    return
                space, q = self._drain.popleft()
            try:
                self._write_next(space, q, None)  # handed the lead with items queued
                self._lead_others(space, q)
            except BaseException as e:  # told to the batch's callers: the drainer goes on
                log.warning("a group commit's drainer: %s", e)
            finally:
                self._pass_lead(space, q)

    def close(self) -> None:
        """The writers end once nothing is left to them (a later `submit` starts one again)."""
        with self._drain_ready:
            self._closed = True
            self._drain_ready.notify_all()

    def _take(self, q: _Queue) -> list[_Slot]:
        """The next batch: queued items in order, up to the bound; an intent id already in the
        batch waits for the next one (a batch writes each id once)."""
        with q.mutex:
            batch: list[_Slot] = []
            later: list[_Slot] = []
            ids: set[str] = set()
            for slot in q.slots:
                intent_id = slot.item.intent_id
                if len(batch) >= self._bound or (intent_id is not None and intent_id in ids):
                    later.append(slot)
                    continue
                if intent_id is not None:
                    ids.add(intent_id)
                batch.append(slot)
            q.slots = later
            self.stats.add(len(batch))
            return batch

    def _run(self, space: str, batch: list[_Slot]) -> None:
        """Write `batch`, setting each slot's event or error."""
        try:
            events = self._write(space, [s.item for s in batch])
        except (IntentConflict, InvalidEvent) as e:
            if len(batch) == 1:
                batch[0].error = e
                return
            for slot in batch:  # item by item: only the item at fault fails
                try:
                    slot.event = self._write(space, [slot.item])[0]
                except Exception as item_error:
                    slot.error = item_error
            return
        except Exception as e:
            for slot in batch:
                slot.error = e
            return
        for slot, event in zip(batch, events, strict=True):
            slot.event = event

    @staticmethod
    def _finish(batch: list[_Slot], mine: _Slot | None) -> None:
        """Tell every item's reply first (answers go out at once), then wake the callers."""
        for slot in batch:
            if slot.reply is not None:
                _tell(slot.reply, slot.event, slot.error)
        for slot in batch:
            if slot is not mine and slot.waiter is not None:
                slot.waiter.release()


def _tell(reply: Reply, event: Event | None, error: BaseException | None) -> None:
    """A reply's failure (a forwarder gone) is its caller's, never the batch's."""
    try:
        reply(event, error)
    except Exception as e:
        log.debug("a group commit's reply failed: %s", e)
