"""The in-memory adapter: a product store for one process (embedding, caches, tests)."""

from __future__ import annotations

import threading
from collections.abc import Sequence

from shard_sql.errors import SeqConflict
from shard_sql.leases import MemoryLeases, check_fence
from shard_sql.ports import IntentQueue, system_clock
from shard_sql.store_base import StoreBase, already_written, stamp
from shard_sql.validation import Pending, check_seq, check_space
from shard_sql.values import Event, Lease


class InMemoryEventStore(StoreBase, MemoryLeases, IntentQueue):
    """Events and leases in this process's memory, safe for threads; gone with the process."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        MemoryLeases.__init__(self, self._lock)
        self._logs: dict[str, list[Event]] = {}
        self._by_intent: dict[tuple[str, str], Event] = {}
        self._intents: dict[str, dict[str, Pending]] = {}
        self._changed = threading.Condition(self._lock)

    def events(self, space: str, *, from_seq: int = 0, limit: int | None = None) -> list[Event]:
        check_space(space)
        check_seq("from_seq", from_seq)
        with self._lock:
            log = self._logs.get(space, [])
            end = len(log) if limit is None else from_seq + check_seq("limit", limit)
            return log[from_seq:end]

    def head(self, space: str) -> int:
        check_space(space)
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
            log.extend(out)
            for e in out:
                if e.intent_id is not None:
                    self._by_intent[(space, e.intent_id)] = e
            self._changed.notify_all()
            return out

    # -- forwarded intents (IntentQueue) -------------------------------------------------------

    def put_intent(self, space: str, item: Pending, *, holder: str) -> None:
        assert item.intent_id is not None
        with self._lock:
            self._intents.setdefault(space, {}).setdefault(item.intent_id, item)
            self._changed.notify_all()

    def find_intent(self, space: str, intent_id: str) -> Event | None:
        with self._lock:
            return self._by_intent.get((space, intent_id))

    def pending_intents(self, space: str, *, limit: int) -> list[Pending]:
        with self._lock:
            queue = self._intents.get(space, {})
            out = [p for i, p in queue.items() if (space, i) not in self._by_intent]
            return out[:limit]

    def forget_intents(self, space: str, intent_ids: Sequence[str]) -> None:
        with self._lock:
            queue = self._intents.get(space, {})
            for i in intent_ids:
                queue.pop(i, None)

    def wait_for_change(self, spaces: Sequence[str], timeout: float) -> None:
        with self._changed:
            self._changed.wait(timeout)
