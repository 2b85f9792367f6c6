"""`GitEventStore`: events, the feed, checkpoints, leases and forwarded intents in a git
repository, shared by every process that opens it. docs/git.md explains the layout, the locking
and the durability."""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from concurrent.futures import Future, wait
from contextlib import AbstractContextManager
from datetime import datetime
from pathlib import Path
from typing import Any

from pygit2.enums import ObjectType

from shard_sql.errors import InvalidEvent, SeqConflict, ShardSqlError, StoreUnavailable
from shard_sql.git.chain import RecycledHandles, SpaceChains
from shard_sql.git.copies import SpaceRefCopies
from shard_sql.git.errors import GIT_ERRORS, translated, translated_iter
from shard_sql.git.feed import CheckpointSave, Feed, SpaceWrite
from shard_sql.git.intents import GitIntentQueue
from shard_sql.git.layout import CHUNK, FEED, HANDOFF_DIR
from shard_sql.git.lease_refs import LeaseRefs
from shard_sql.git.loose import LooseObjects, in_background
from shard_sql.git.migrate import place_existing_events
from shard_sql.git.objects import (
    FeedCommit,
    event_of,
    json_object,
    parse_commit,
)
from shard_sql.git.packing import PACK_EVERY, AutoPacker, Maintenance, pack
from shard_sql.git.refs import RefLock
from shard_sql.git.repo import GitRepo
from shard_sql.git.transaction import GitTransaction, transaction_block
from shard_sql.handoff import private_dir
from shard_sql.leases import (
    advanced,
    check_fence,
    check_ttl,
    granted,
    released,
    renewed,
    revoked,
    valid,
)
from shard_sql.ports import FeedStore, IntentQueue, LeaseStore, SpaceWakeups, system_clock
from shard_sql.store_base import StoreBase, already_written, checkpoint_conflict, placed, stamp
from shard_sql.validation import (
    Pending,
    check_checkpoint_name,
    check_position,
    check_seq,
    check_space,
    check_stored_space,
    check_timeout,
    check_types,
)
from shard_sql.values import Event, Lease
from shard_sql.wake import EVENTS_WRITTEN, FEED_WRITTEN

log = logging.getLogger("shard_sql.git")

OVERLAP_AFTER = 0.0005
"""Seconds: a write whose first round of fsyncs took longer (a busy disk) fsyncs the feed ref's
directory on another thread while the space refs' copies move; on a fast disk the hand-off to a
thread costs more than it saves."""


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


class GitEventStore(StoreBase, FeedStore, LeaseStore, IntentQueue, SpaceWakeups):
    """Events and leases in a git repository, shared by every process that opens it.

    `lock_timeout`: how long a write waits for the store's write mutex or a ref lock held by
    another writer before raising `StoreUnavailable`. `durable`: fsync objects and refs before a
    write returns (turns on libgit2's process-wide fsync setting, never turned off again).
    `pack_every`: after this many loose objects written by this store, pack them in a
    background thread (0: never; see `maintain`).

    A repository written before the feed existed gets positions for its events when it is first
    opened (docs/git.md, "The feed").
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        lock_timeout: float = 10.0,
        durable: bool = True,
        pack_every: int = PACK_EVERY,
    ) -> None:
        if isinstance(pack_every, bool) or not isinstance(pack_every, int) or pack_every < 0:
            raise InvalidEvent("pack_every", "must be an integer >= 0")
        self.path = Path(path)
        self.lock_timeout = float(lock_timeout)
        self.durable = durable
        self._git = GitRepo(self.path, lock_timeout=self.lock_timeout, durable=durable)
        self._feed = Feed(self._git)
        self._chains = SpaceChains(self._git, self._feed)
        self._intents = GitIntentQueue(self._git, self._chains)
        self._packer = AutoPacker(self._git, pack_every)
        self._git.on_object_written = self._packer.wrote
        self._copies = SpaceRefCopies(self._git, self._feed)
        self._leases = LeaseRefs(self._git)
        try:
            place_existing_events(self._git, self._feed)
        except BaseException:
            self._git.close()
            raise

    def __repr__(self) -> str:
        return f"GitEventStore({str(self.path)!r})"

    def close(self) -> None:
        """Move the space refs of the writes since the last snapshot (when this store made one
        of them), wait for a packing run in progress, release the repository handles; later
        calls raise `StoreUnavailable`."""
        if self._copies.behind:
            try:
                self._copies.since_snapshot(time.monotonic() + self.lock_timeout)
            except (ShardSqlError, *GIT_ERRORS) as e:
                log.warning("git store %s: space refs left behind the feed: %s", self.path, e)
        self._packer.join()
        self._git.close()

    @translated
    def maintain(self) -> Maintenance:
        """Pack the loose objects now (waiting for another process's run to end), as the
        background packing does, and move every space ref not at its tip; safe while other
        processes write and read. docs/git.md."""
        self._git.handle()  # a closed store raises StoreUnavailable
        done = pack(self._git)
        self._copies.every_space(time.monotonic() + self.lock_timeout)
        return done

    def __enter__(self) -> GitEventStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading a space ---------------------------------------------------------------------

    @translated
    def events(self, space: str, *, from_seq: int = 0, limit: int | None = None) -> list[Event]:
        check_stored_space(space)
        check_seq("from_seq", from_seq)
        stop = None if limit is None else from_seq + check_seq("limit", limit)
        handle = self._git.handle()
        feed = self._feed.current(handle)
        tip = self._chains.tip_in(handle, feed, space)
        if tip is None or feed is None:
            return []
        end = tip.seq + 1 if stop is None else stop
        return list(self._chains.events(space, feed, tip, from_seq, end))

    def iter_events(self, space: str, *, from_seq: int = 0) -> Iterator[Event]:
        check_stored_space(space)
        check_seq("from_seq", from_seq)
        return translated_iter(self, self._iter(space, from_seq))

    def _iter(self, space: str, from_seq: int) -> Iterator[Event]:
        handle = self._git.handle()
        feed = self._feed.current(handle)
        tip = self._chains.tip_in(handle, feed, space)
        if tip is not None and feed is not None:
            yield from self._chains.events(space, feed, tip, from_seq, tip.seq + 1)

    @translated
    def head(self, space: str) -> int:
        check_stored_space(space)
        tip = self._chains.tip(self._git.handle(), space)
        return 0 if tip is None else tip.seq + 1

    @translated
    def spaces(self) -> list[str]:
        handle = self._git.handle()
        return self._feed.spaces(handle, self._feed.current(handle))

    # -- the feed and checkpoints (FeedStore) --------------------------------------------------

    @translated
    def feed(
        self, after: int = 0, *, limit: int | None = None, types: Collection[str] | None = None
    ) -> list[Event]:
        check_position("after", after)
        if limit is not None:
            check_position("limit", limit)
        wanted = check_types(types)
        if limit == 0:
            return []
        return list(itertools.islice(self._feed_events(after, wanted), limit))

    def iter_feed(self, after: int = 0, *, types: Collection[str] | None = None) -> Iterator[Event]:
        """The feed as of the first item read, streamed (a block of CHUNK events at a time)."""
        check_position("after", after)
        wanted = check_types(types)
        return translated_iter(self, self._feed_events(after, wanted))

    def _feed_events(self, after: int, types: frozenset[str] | None) -> Iterator[Event]:
        feed = self._feed.current(self._git.handle())
        if feed is None or feed.head <= after:
            return
        recycled = RecycledHandles(self._git.gitdir) if feed.head - after > CHUNK else None
        try:
            handle = self._git.handle()
            for first, oids in self._feed.event_oids(handle, feed, after, feed.head):
                if recycled is not None:
                    handle = recycled.get(len(oids))
                for n, oid in enumerate(oids):
                    c = parse_commit(self._git.read(handle, oid, ObjectType.COMMIT))
                    meta = json_object(c.meta, f"the event at position {first + n}")
                    if types is not None and meta.get("type") not in types:
                        continue
                    space, seq = meta.get("space"), meta.get("seq")
                    if not isinstance(space, str) or not isinstance(seq, int):
                        raise StoreUnavailable(f"the event at position {first + n} is corrupt")
                    yield event_of(space, seq, c, first + n, meta)
        finally:
            if recycled is not None:
                recycled.close()

    @translated
    def feed_head(self) -> int:
        feed = self._feed.current(self._git.handle())
        return 0 if feed is None else feed.head

    def wait_feed(self, after: int, *, timeout: float) -> bool:
        check_position("after", after)
        seconds = check_timeout(timeout)
        return self._intents.wait_feed(after, seconds, self.feed_head)

    @translated
    def checkpoint(self, name: str) -> int:
        check_checkpoint_name(name)
        handle = self._git.handle()
        return self._feed.checkpoint(handle, self._feed.current(handle), name)

    @translated
    def checkpoints(self) -> dict[str, int]:
        handle = self._git.handle()
        return self._feed.checkpoints(handle, self._feed.current(handle))

    def transaction(
        self, connection: object | None = None
    ) -> AbstractContextManager[GitTransaction]:
        """A block whose writes commit together, as one move of the feed ref, when it exits
        normally; see `GitTransaction`."""
        if connection is not None:
            raise InvalidEvent("connection", "only SQL stores join a host's connection")
        return transaction_block(self)

    # -- writing -----------------------------------------------------------------------------

    @translated
    def write(
        self,
        space: str,
        batch: Sequence[Pending],
        *,
        expected_seq: int,
        fence: Lease | None,
        verify_fence: bool = True,
    ) -> list[Event]:
        check_space(space)
        check_seq("expected_seq", expected_seq)
        now = system_clock()
        handle = self._git.handle()
        fenced = fence is not None and verify_fence
        deadline = time.monotonic() + self.lock_timeout
        while True:
            # Read and check without locks first: every refusal found here is final (heads and
            # generations only grow); the checks are repeated under the mutex below.
            feed = self._feed.current(handle)
            tip = self._chains.tip_in(handle, feed, space)
            found = [
                self._chains.find_intent(space, feed, tip, p.intent_id) if p.intent_id else None
                for p in batch
            ]
            done = already_written(found, batch)
            if done is not None:
                return done
            if fenced:
                check_fence(fence, self._lease_record(handle, space))
            head = 0 if tip is None else tip.seq + 1
            if head != expected_seq:
                raise SeqConflict(space, expected_seq, head)
            if not batch:
                return []
            out = [stamp(space, expected_seq + n, p, fence, now) for n, p in enumerate(batch)]
            objects = self._git.objects()
            try:
                new, oids = self._chains.write_commits(handle, objects, tip, batch, out)
                first = self.place(
                    handle,
                    objects,
                    feed,
                    [SpaceWrite(space, tip, new, oids, any(e.intent_id for e in out))],
                    [(0, n) for n in range(len(out))],
                    {},
                    [fence] if fenced and fence is not None else [],
                    deadline,
                    strict=False,
                )
            finally:
                objects.close()
            if first is None:
                continue  # another writer moved the space: look again
            self._git.remember((space, new.oid), new)
            return [placed(e, first + n) for n, e in enumerate(out)]

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
    ) -> int | None:
        """Commit `writes` (their commits in `objects`) and the checkpoint `saves` as the feed
        commit after `feed`, placed in `order` (see `Feed.build`); return the first position.

        The feed commit is built and fsynced before the write mutex is taken. Under it, if the
        feed moved meanwhile (another writer's commit), each written space must still be at the
        tip the write was built on (else None, or `SeqConflict` when `strict`): the feed commit
        is built again on the new feed and fsynced under the mutex. The `fences` and the
        checkpoints are checked there too, then the feed ref is moved: the commit point. The
        spaces' refs (copies for git's tools) follow.
        """
        records = {name: save.position for name, save in saves.items()}
        self._check_saves(handle, feed, saves)
        new = self._feed.build(handle, objects, feed, writes, order, records)
        began = time.monotonic()
        staged = self._git.refs.stage(FEED, new, objects)
        overlap = self.durable and time.monotonic() - began > OVERLAP_AFTER
        removed = False  # the staged file
        synced: Future[None] | None = None
        try:
            with self._git.refs.mutex(deadline):
                lock = self._git.lock(handle, FEED, deadline, staged, breakable=True)
                try:
                    current = self._git.target(handle, FEED, "the feed")
                    if current != (feed.oid if feed else None):
                        args = (handle, lock, current, writes, order, saves, records)
                        rebuilt = self._rebuilt(*args, strict=strict)
                        if rebuilt is None:
                            return None
                        feed, new = rebuilt
                    for fence in fences:
                        check_fence(fence, self._lease_record(handle, fence.space))
                    lock.commit(new, sync=False)
                finally:
                    lock.free()
                synced = in_background(lock.sync) if overlap else None  # see `_durable`
                self._copies.after_commit(handle, feed, new, writes)
            self._signal_wakeups(writes)
            removed = True
            _unlink(staged)
            self._durable(lock, synced)
        finally:
            if not removed:
                _unlink(staged)
            if synced is not None:
                wait([synced])  # on an error: no sync of this write left running after it
        return (feed.head if feed else 0) + 1

    def _durable(self, lock: RefLock, synced: Future[None] | None) -> None:
        """After the mutex: the write is durable once the feed ref's directory is, fsynced now,
        or (a slow disk) by `synced`, started on another thread right after the rename while
        the copies moved. Each feed commit holds all before it: a later writer's sync makes this
        one's durable too (and this one's, the earlier ones')."""
        if synced is not None:
            synced.result()
        else:
            lock.sync()
        self._git.refs.sync_dirs(FEED)

    def _rebuilt(
        self,
        handle: Any,
        lock: RefLock,
        current: str | None,
        writes: Sequence[SpaceWrite],
        order: Sequence[tuple[int, int]],
        saves: Mapping[str, CheckpointSave],
        records: Mapping[str, int],
        *,
        strict: bool,
    ) -> tuple[FeedCommit | None, str] | None:
        """Under the mutex, the feed moved to `current` since the write's feed commit was built:
        unless a written space moved (None, or `SeqConflict` when `strict`), that feed and the
        write's commit built again on it, its id fsynced into `lock`."""
        feed = None if current is None else self._feed.commit(handle, current)
        if not self._at_their_bases(handle, feed, writes, strict=strict):
            return None
        self._check_saves(handle, feed, saves)
        again = self._git.objects()
        try:
            new = self._feed.build(handle, again, feed, writes, order, records)
            lock.rewrite(new, again)
        finally:
            again.close()
        return feed, new

    def _at_their_bases(
        self, handle: Any, feed: FeedCommit | None, writes: Sequence[SpaceWrite], *, strict: bool
    ) -> bool:
        """Whether every written space is still, in `feed`, at the tip its write was built on;
        when one moved: False, or `SeqConflict` when `strict`."""
        for w in writes:
            if self._feed.tip_oid(handle, feed, w.space) != (w.base.oid if w.base else None):
                if not strict:
                    return False
                moved = self._chains.tip_in(handle, feed, w.space)
                expected = w.base.seq + 1 if w.base else 0
                raise SeqConflict(w.space, expected, moved.seq + 1 if moved else 0)
        return True

    def _check_saves(
        self, handle: Any, feed: FeedCommit | None, saves: Mapping[str, CheckpointSave]
    ) -> None:
        """Each save is at or above the stored position, as if the block ran at its commit: its
        lowest save of a checkpoint (the first) is the one to check."""
        for name, save in saves.items():
            stored = self._feed.checkpoint(handle, feed, name)
            if save.lowest < stored:
                raise checkpoint_conflict(name, save.lowest, stored)

    def _signal_wakeups(self, writes: Sequence[SpaceWrite]) -> None:
        """After a commit: wake the feed's waiters, and the forwarders of the spaces written."""
        files = self._git.wakeup_files
        if files is not None:
            files.signal(FEED_WRITTEN, "")
            for w in writes:
                if w.intents:
                    files.signal(EVENTS_WRITTEN, w.space)  # a forwarder may wait for it

    # -- leases (LeaseStore): the rules of `shard_sql.leases`, applied under the ref locks ---

    def _lease_record(self, handle: Any, space: str) -> Lease | None:
        return self._leases.record(handle, space)

    def _update_lease(
        self, space: str, change: Callable[[Lease | None], Lease | None]
    ) -> Lease | None:
        """Run `change` on the current record; store and return what it returns (None: nothing
        to store). See `LeaseRefs.update`."""
        return self._leases.update(space, change, time.monotonic() + self.lock_timeout)

    @translated
    def lease_acquire(self, space: str, holder: str, ttl_seconds: float, now: datetime) -> Lease:
        check_space(space)
        ttl = check_ttl(ttl_seconds)
        new = self._update_lease(space, lambda cur: granted(cur, space, holder, ttl, now))
        assert new is not None
        return new

    @translated
    def lease_renew(self, lease: Lease, ttl_seconds: float, now: datetime) -> Lease:
        check_stored_space(lease.space)
        ttl = check_ttl(ttl_seconds)
        new = self._update_lease(lease.space, lambda cur: renewed(cur, lease, ttl, now))
        assert new is not None
        return new

    @translated
    def lease_release(self, lease: Lease, now: datetime) -> None:
        check_stored_space(lease.space)
        self._update_lease(lease.space, lambda cur: released(cur, lease, now))

    @translated
    def lease_current(self, space: str, now: datetime) -> Lease | None:
        check_stored_space(space)
        return valid(self._lease_record(self._git.handle(), space), now)

    @translated
    def lease_revoke(self, space: str, now: datetime) -> Lease | None:
        check_stored_space(space)
        return self._update_lease(space, lambda cur: revoked(cur, space, now))

    @translated
    def lease_advance(self, space: str, generation: int, now: datetime) -> Lease | None:
        check_stored_space(space)
        return self._update_lease(space, lambda cur: advanced(cur, space, generation, now))

    # -- forwarded intents (IntentQueue, SpaceWakeups): `GitIntentQueue` ---------------------

    def put_intent(self, space: str, item: Pending, *, holder: str) -> None:
        self._intents.put_intent(space, item, holder=holder)

    def find_intent(self, space: str, intent_id: str) -> Event | None:
        return self._intents.find_intent(space, intent_id)

    def pending_intents(self, space: str, *, limit: int) -> list[Pending]:
        return self._intents.pending_intents(space, limit=limit)

    def forget_intents(self, space: str, intent_ids: Sequence[str]) -> None:
        self._intents.forget_intents(space, intent_ids)

    def wait_for_change(self, spaces: Sequence[str], timeout: float) -> None:
        self._intents.wait_for_change(spaces, timeout)

    def wakes_per_space(self) -> bool:
        return self._intents.wakes_per_space()

    def handoff_dir(self) -> str | None:
        return private_dir(os.path.join(self._git.root, HANDOFF_DIR))
