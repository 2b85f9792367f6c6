"""A git store's transaction: writes to several spaces and checkpoint saves, buffered, then
committed as one feed commit (one ref update) when the block ends, or not at all."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

from shard_sql.errors import InvalidEvent, SeqConflict
from shard_sql.git.chain import SpaceChains
from shard_sql.git.errors import translated
from shard_sql.git.feed import CheckpointSave, Feed, SpaceWrite
from shard_sql.git.loose import LooseObjects
from shard_sql.git.objects import FeedCommit, Tip
from shard_sql.git.repo import GitRepo
from shard_sql.leases import check_fence
from shard_sql.ports import Item, Transaction, system_clock
from shard_sql.store_base import (
    TransactionState,
    already_written,
    checkpoint_conflict,
    fence_space_matches,
    stamp,
    transaction_write,
)
from shard_sql.validation import (
    Pending,
    check_checkpoint_name,
    check_items,
    check_position,
    check_seq,
    check_space,
    pending,
)
from shard_sql.values import Event, Lease


class PlacingStore(Protocol):
    """What a transaction uses of its `GitEventStore`."""

    @property
    def path(self) -> object: ...

    lock_timeout: float
    _git: GitRepo
    _feed: Feed
    _chains: SpaceChains

    def _lease_record(self, handle: Any, space: str) -> Lease | None: ...

    def place(
        self,
        handle: Any,
        objects: LooseObjects,
        feed: FeedCommit | None,
        writes: Sequence[SpaceWrite],
        order: Sequence[tuple[int, int]],
        saves: Mapping[str, CheckpointSave],
        fences: Sequence[Lease],
        deadline: float,
        *,
        strict: bool,
    ) -> int | None: ...


@dataclass
class _Space:
    """A space written in the transaction: its tip as of the transaction and what it adds."""

    base: Tip | None
    items: list[Pending] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)

    @property
    def head(self) -> int:
        return (self.base.seq + 1 if self.base else 0) + len(self.events)


@contextmanager
def transaction_block(store: PlacingStore) -> Iterator[GitTransaction]:
    tx = GitTransaction(store)
    try:
        yield tx
        tx.state.raise_failure()
        tx.commit()
    finally:
        tx.state.ended = True


class GitTransaction(Transaction):
    """The writes of one `GitEventStore.transaction()` block, buffered until it ends.

    The transaction sees the feed as of its first call: `expected_seq=None` is a space's head
    then, plus its own writes. Nothing is locked meanwhile; at the end every space written must
    still be at that head (else `SeqConflict`), the fences still current and the checkpoints not
    moved past the saved positions, checked under the store's write mutex as the one feed commit
    is made. A write that raises adds nothing and dooms the block (`TransactionState`). Its
    events carry
    `position=None`: the feed places them when the block ends.
    """

    def __init__(self, store: PlacingStore) -> None:
        self.path = store.path
        self._store = store
        self.state = TransactionState()
        self._handle: Any = None
        self._feed: FeedCommit | None = None
        self._spaces: dict[str, _Space] = {}
        self._order: list[tuple[str, int]] = []
        self._fences: list[Lease] = []
        self._checkpoints: dict[str, CheckpointSave] = {}
        self._intents: dict[tuple[str, str], Event] = {}

    def _view(self) -> tuple[Any, FeedCommit | None]:
        """The feed this transaction reads (the first call's)."""
        if self._handle is None:
            self._handle = self._store._git.handle()
            self._feed = self._store._feed.current(self._handle)
        return self._handle, self._feed

    @transaction_write
    @translated
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
    @translated
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
    @translated
    def save_checkpoint(self, name: str, position: int, *, fence: Lease | None = None) -> None:
        check_checkpoint_name(name)
        check_position("position", position)
        if fence is not None and not isinstance(fence, Lease):
            raise InvalidEvent("fence", f"must be a Lease, not {type(fence).__name__}")
        handle, feed = self._view()
        saved = self._checkpoints.get(name)
        if saved is None:
            stored = self._store._feed.checkpoint(handle, feed, name)
        else:
            stored = saved.position
        if position < stored:
            raise checkpoint_conflict(name, position, stored)
        if fence is not None:
            check_fence(fence, self._store._lease_record(handle, fence.space))
        lowest = position if saved is None else saved.lowest
        self._checkpoints[name] = CheckpointSave(position, lowest, fence)

    def _write(
        self, space: str, batch: list[Pending], expected_seq: int | None, fence: Lease | None
    ) -> list[Event]:
        if expected_seq is not None:
            check_seq("expected_seq", expected_seq)
        fence_space_matches(fence, space)
        handle, feed = self._view()
        chains = self._store._chains
        buffered = self._spaces.get(space)
        base = buffered.base if buffered else chains.tip_in(handle, feed, space)
        found = [self._written(space, feed, base, p.intent_id) for p in batch]
        done = already_written(found, batch)
        if done is not None:
            return done
        if fence is not None:
            check_fence(fence, self._store._lease_record(handle, space))
        head = buffered.head if buffered else (base.seq + 1 if base else 0)
        if expected_seq is None:
            expected_seq = head
        elif expected_seq != head:
            raise SeqConflict(space, expected_seq, head)
        now = system_clock()
        out = [stamp(space, head + n, p, fence, now) for n, p in enumerate(batch)]
        if buffered is None:
            buffered = self._spaces[space] = _Space(base)
        start = len(buffered.events)
        buffered.items += batch
        buffered.events += out
        self._order += [(space, start + n) for n in range(len(out))]
        if fence is not None:
            self._fences.append(fence)
        for e in out:
            if e.intent_id is not None:
                self._intents[(space, e.intent_id)] = e
        return out

    def _written(
        self, space: str, feed: FeedCommit | None, base: Tip | None, intent_id: str | None
    ) -> Event | None:
        """The event written for `intent_id` in this transaction or before it, if any."""
        if intent_id is None:
            return None
        mine = self._intents.get((space, intent_id))
        return mine or self._store._chains.find_intent(space, feed, base, intent_id)

    @translated
    def commit(self) -> None:
        """Write the buffered events' commits and make the one feed commit of the block."""
        if not self._spaces and not self._checkpoints:
            return
        store = self._store
        handle, feed = self._view()
        deadline = time.monotonic() + store.lock_timeout
        fences = self._fences + [s.fence for s in self._checkpoints.values() if s.fence]
        objects = store._git.objects()
        try:
            writes: list[SpaceWrite] = []
            index: dict[str, int] = {}
            for space, buffered in self._spaces.items():
                tip, oids = store._chains.write_commits(
                    handle, objects, buffered.base, buffered.items, buffered.events
                )
                index[space] = len(writes)
                intents = any(e.intent_id for e in buffered.events)
                writes.append(SpaceWrite(space, buffered.base, tip, oids, intents))
            order = [(index[space], n) for space, n in self._order]
            store.place(
                handle,
                objects,
                feed,
                writes,
                order,
                self._checkpoints,
                fences,
                deadline,
                strict=True,
            )
        finally:
            objects.close()
