"""The in-memory adapter: a product store for one process (embedding, caches, tests)."""

from __future__ import annotations

import threading
from collections.abc import Collection, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any

from shard_sql.errors import InvalidEvent, SeqConflict
from shard_sql.leases import MemoryLeases, check_fence
from shard_sql.ports import FeedStore, IntentQueue, Item, Transaction, system_clock
from shard_sql.store_base import (
    StoreBase,
    TransactionState,
    already_written,
    checked_intent_ids,
    checked_put,
    checked_wait,
    checkpoint_conflict,
    fence_space_matches,
    placed,
    stamp,
    transaction_write,
)
from shard_sql.validation import (
    Pending,
    check_checkpoint_name,
    check_intent_id,
    check_items,
    check_position,
    check_seq,
    check_space,
    check_stored_space,
    check_timeout,
    check_types,
    pending,
)
from shard_sql.values import Event, Lease


class InMemoryEventStore(StoreBase, FeedStore, MemoryLeases, IntentQueue):
    """Events and leases in this process's memory, safe for threads; gone with the process.

    Positions come from a counter under the store's lock, without gaps. A transaction holds
    that lock for its whole block (writes, and reads from other threads, wait for it).
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        MemoryLeases.__init__(self, self._lock)
        self._logs: dict[str, list[Event]] = {}
        self._feed: list[Event] = []  # the event at position p is _feed[p - 1]
        self._checkpoints: dict[str, int] = {}
        self._by_intent: dict[tuple[str, str], Event] = {}
        self._intents: dict[str, dict[str, Pending]] = {}
        self._changed = threading.Condition(self._lock)

    def events(self, space: str, *, from_seq: int = 0, limit: int | None = None) -> list[Event]:
        check_stored_space(space)
        check_seq("from_seq", from_seq)
        with self._lock:
            log = self._logs.get(space, [])
            end = len(log) if limit is None else from_seq + check_seq("limit", limit)
            return log[from_seq:end]

    def head(self, space: str) -> int:
        check_stored_space(space)
        with self._lock:
            return len(self._logs.get(space, ()))

    def spaces(self) -> list[str]:
        with self._lock:
            return sorted(s for s, log in self._logs.items() if log)

    def write(
        self,
        space: str,
        batch: Sequence[Pending],
        *,
        expected_seq: int,
        fence: Lease | None,
        verify_fence: bool = True,
    ) -> list[Event]:
        now = system_clock()
        with self._lock:
            found = [
                self._by_intent.get((space, p.intent_id)) if p.intent_id else None for p in batch
            ]
            done = already_written(found, batch)
            if done is not None:
                return done
            if verify_fence:
                check_fence(fence, self._leases.get(space))
            log = self._logs.setdefault(space, [])
            if len(log) != expected_seq:
                raise SeqConflict(space, expected_seq, len(log))
            out = [stamp(space, expected_seq + n, p, fence, now) for n, p in enumerate(batch)]
            return self._apply(out)

    def _apply(self, written: list[Event]) -> list[Event]:
        """Place `written` (checked, in seq order per space) in the logs and the feed. Under
        the lock."""
        out = []
        for e in written:
            e = placed(e, len(self._feed) + 1)
            self._feed.append(e)
            self._logs.setdefault(e.space, []).append(e)
            if e.intent_id is not None:
                self._by_intent[(e.space, e.intent_id)] = e
            out.append(e)
        self._changed.notify_all()
        return out

    # -- the feed and checkpoints (FeedStore) --------------------------------------------------

    def feed(
        self,
        after: int = 0,
        *,
        limit: int | None = None,
        types: Collection[str] | None = None,
    ) -> list[Event]:
        check_position("after", after)
        if limit is not None:
            check_position("limit", limit)
        wanted = check_types(types)
        with self._lock:
            if wanted is None:
                return self._feed[after : None if limit is None else after + limit]
            out: list[Event] = []
            if limit == 0:
                return out
            for n in range(after, len(self._feed)):
                e = self._feed[n]
                if e.type in wanted:
                    out.append(e)
                    if len(out) == limit:
                        break
            return out

    def feed_head(self) -> int:
        with self._lock:
            return len(self._feed)

    def wait_feed(self, after: int, *, timeout: float) -> bool:
        check_position("after", after)
        seconds = check_timeout(timeout)
        with self._changed:
            return self._changed.wait_for(lambda: len(self._feed) > after, seconds)

    def checkpoint(self, name: str) -> int:
        check_checkpoint_name(name)
        with self._lock:
            return self._checkpoints.get(name, 0)

    def checkpoints(self) -> dict[str, int]:
        with self._lock:
            return dict(sorted(self._checkpoints.items()))

    def transaction(self, connection: object | None = None) -> AbstractContextManager[Transaction]:
        """A block whose writes are applied together at its end; see `MemoryTransaction`."""
        if connection is not None:
            raise InvalidEvent("connection", "only SQL stores join a host's connection")
        return self._transaction()

    @contextmanager
    def _transaction(self) -> Iterator[Transaction]:
        with self._lock:
            tx = MemoryTransaction(self)
            try:
                yield tx
                tx.state.raise_failure()
                self._commit(tx)
            finally:
                tx.state.ended = True

    def _commit(self, tx: MemoryTransaction) -> None:
        """Check the transaction's writes again (a write of this thread outside it may have come
        between), then apply them all. Under the lock."""
        heads: dict[str, int] = {}
        for w in tx.writes:
            head = heads.get(w.space, len(self._logs.get(w.space, ())))
            if head != w.expected_seq:
                raise SeqConflict(w.space, w.expected_seq, head)
            check_fence(w.fence, self._leases.get(w.space))
            heads[w.space] = head + len(w.events)
        for name, (position, fence) in tx.checkpoints.items():
            _check_checkpoint(name, self._checkpoints.get(name, 0), position)
            if fence is not None:
                check_fence(fence, self._leases.get(fence.space))
        self._apply([e for w in tx.writes for e in w.events])
        for name, (position, _) in tx.checkpoints.items():
            self._checkpoints[name] = position

    # -- forwarded intents (IntentQueue) -------------------------------------------------------

    def put_intent(self, space: str, item: Pending, *, holder: str) -> None:
        intent_id = checked_put(space, item, holder)
        with self._lock:
            self._intents.setdefault(space, {}).setdefault(intent_id, item)
            self._changed.notify_all()

    def find_intent(self, space: str, intent_id: str) -> Event | None:
        check_space(space)
        if check_intent_id(intent_id) is None:
            raise InvalidEvent("intent_id", "must be a string")
        with self._lock:
            return self._by_intent.get((space, intent_id))

    def pending_intents(self, space: str, *, limit: int) -> list[Pending]:
        check_space(space)
        check_seq("limit", limit)
        with self._lock:
            queue = self._intents.get(space, {})
            out = [p for i, p in queue.items() if (space, i) not in self._by_intent]
            return out[:limit]

    def forget_intents(self, space: str, intent_ids: Sequence[str]) -> None:
        check_space(space)
        ids = checked_intent_ids(intent_ids)
        with self._lock:
            queue = self._intents.get(space, {})
            for i in ids:
                if (space, i) in self._by_intent:  # applied: its record is garbage
                    queue.pop(i, None)

    def wait_for_change(self, spaces: Sequence[str], timeout: float) -> None:
        checked_wait(spaces, timeout)
        with self._changed:
            self._changed.wait(timeout)


def _check_checkpoint(name: str, stored: int, position: int) -> None:
    if position < stored:
        raise checkpoint_conflict(name, position, stored)


@dataclass(slots=True)
class _Write:
    space: str
    expected_seq: int
    fence: Lease | None
    events: list[Event]


class MemoryTransaction(Transaction):
    """The writes of one `InMemoryEventStore.transaction()` block, buffered until it ends.

    The block holds the store's lock, so what a write checks (heads, leases, intents) holds at
    the end; the store checks it once more and applies everything, or raises and applies
    nothing. Its events carry `position=None`: the feed places them when the block ends.
    A write that raises adds nothing and dooms the block (`TransactionState`).
    """

    def __init__(self, store: InMemoryEventStore) -> None:
        self._store = store
        self.state = TransactionState()
        self.writes: list[_Write] = []
        self.checkpoints: dict[str, tuple[int, Lease | None]] = {}
        self._heads: dict[str, int] = {}
        self._intents: dict[tuple[str, str], Event] = {}

    @transaction_write
    def append(
        self,
        space: str,
        type: str,
        payload: dict[str, Any],
        *,
        expected_seq: int | None = None,
        fence: Lease | None = None,
        intent_id: str | None = None,
    ) -> Event:
        check_space(space)
        return self._write(space, [pending(type, payload, intent_id)], expected_seq, fence)[0]

    @transaction_write
    def append_many(
        self,
        space: str,
        items: Iterable[Item],
        *,
        expected_seq: int | None = None,
        fence: Lease | None = None,
    ) -> list[Event]:
        check_space(space)
        return self._write(space, check_items(items), expected_seq, fence)

    @transaction_write
    def save_checkpoint(self, name: str, position: int, *, fence: Lease | None = None) -> None:
        check_checkpoint_name(name)
        check_position("position", position)
        if fence is not None and not isinstance(fence, Lease):
            raise InvalidEvent("fence", f"must be a Lease, not {type(fence).__name__}")
        store = self._store
        saved = self.checkpoints.get(name)
        _check_checkpoint(
            name, store._checkpoints.get(name, 0) if saved is None else saved[0], position
        )
        if fence is not None:
            check_fence(fence, store._leases.get(fence.space))
        self.checkpoints[name] = (position, fence)

    def _write(
        self, space: str, batch: list[Pending], expected_seq: int | None, fence: Lease | None
    ) -> list[Event]:
        if expected_seq is not None:
            check_seq("expected_seq", expected_seq)
        fence_space_matches(fence, space)
        store = self._store
        found = [self._written(space, p.intent_id) if p.intent_id else None for p in batch]
        done = already_written(found, batch)
        if done is not None:
            return done
        check_fence(fence, store._leases.get(space))
        head = self._heads.get(space)
        if head is None:
            head = len(store._logs.get(space, ()))
        if expected_seq is None:
            expected_seq = head
        elif expected_seq != head:
            raise SeqConflict(space, expected_seq, head)
        now = system_clock()
        out = [stamp(space, head + n, p, fence, now) for n, p in enumerate(batch)]
        self.writes.append(_Write(space, head, fence, out))
        self._heads[space] = head + len(out)
        for e in out:
            if e.intent_id is not None:
                self._intents[(space, e.intent_id)] = e
        return out

    def _written(self, space: str, intent_id: str) -> Event | None:
        return self._intents.get((space, intent_id)) or self._store._by_intent.get(
            (space, intent_id)
        )
