"""`GitEventStore`: events, leases and forwarded intents in a git repository, shared by every
process that opens it. docs/git.md explains the layout, the locking and the durability."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from pygit2.enums import ObjectType

from shard_sql.errors import SeqConflict
from shard_sql.git.chain import SpaceChains, Tip
from shard_sql.git.errors import translated, translated_iter
from shard_sql.git.intents import GitIntentQueue
from shard_sql.git.layout import (
    HASHED,
    SPACES,
    decode_name,
    encode_name,
    lease_ref,
    space_ref,
)
from shard_sql.git.loose import LooseObjects
from shard_sql.git.objects import json_object, lease_bytes, parse_commit, parse_lease
from shard_sql.git.repo import GitRepo
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
from shard_sql.ports import IntentQueue, LeaseStore, SpaceWakeups, system_clock
from shard_sql.store_base import StoreBase, already_written, stamp
from shard_sql.validation import Pending, check_seq, check_space, check_stored_space
from shard_sql.values import Event, Lease


class GitEventStore(StoreBase, LeaseStore, IntentQueue, SpaceWakeups):
    """Events and leases in a git repository, shared by every process that opens it.

    `lock_timeout`: how long a write waits for a ref lock held by another writer before raising
    `StoreUnavailable`. `durable`: fsync objects and refs before a write returns (turns on
    libgit2's process-wide fsync setting, never turned off again).
    """

    def __init__(
        self, path: str | os.PathLike[str], *, lock_timeout: float = 10.0, durable: bool = True
    ) -> None:
        self.path = Path(path)
        self.lock_timeout = float(lock_timeout)
        self.durable = durable
        self._git = GitRepo(self.path, lock_timeout=self.lock_timeout, durable=durable)
        self._chains = SpaceChains(self._git)
        self._intents = GitIntentQueue(self._git, self._chains)

    def __repr__(self) -> str:
        return f"GitEventStore({str(self.path)!r})"

    def close(self) -> None:
        """Release the repository handles; later calls raise `StoreUnavailable`."""
        self._git.close()

    def __enter__(self) -> GitEventStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading -----------------------------------------------------------------------------

    @translated
    def events(self, space: str, *, from_seq: int = 0, limit: int | None = None) -> list[Event]:
        check_stored_space(space)
        check_seq("from_seq", from_seq)
        stop = None if limit is None else from_seq + check_seq("limit", limit)
        tip = self._chains.tip(self._git.handle(), space)
        if tip is None:
            return []
        end = tip.seq + 1 if stop is None else stop
        return list(self._chains.events(space, tip, from_seq, end))

    def iter_events(self, space: str, *, from_seq: int = 0) -> Iterator[Event]:
        check_stored_space(space)
        check_seq("from_seq", from_seq)
        return translated_iter(self, self._iter(space, from_seq))

    def _iter(self, space: str, from_seq: int) -> Iterator[Event]:
        tip = self._chains.tip(self._git.handle(), space)
        if tip is not None:
            yield from self._chains.events(space, tip, from_seq, tip.seq + 1)

    @translated
    def head(self, space: str) -> int:
        check_stored_space(space)
        tip = self._chains.tip(self._git.handle(), space)
        return 0 if tip is None else tip.seq + 1

    @translated
    def spaces(self) -> list[str]:
        """The spaces that have events, damaged ones included (their reads raise
        `StoreUnavailable`, so that `verify` and `export` fail on them instead of missing them).
        """
        handle = self._git.handle()
        refs = {ref for ref in handle.references if ref.startswith(SPACES)}
        refs.update(self._git.refs.loose_under(SPACES))  # those libgit2 cannot read too
        names = []
        for ref in refs:
            path = ref[len(SPACES) :]
            if path.startswith(HASHED):
                # A long name is spelled out in its events only: read it from the tip (a damaged
                # ref raises, naming the ref: the space's name is unknown).
                oid = self._git.target(handle, ref, "a space with a long name")
                if oid is None:
                    continue
                commit = parse_commit(self._git.read(handle, oid, ObjectType.COMMIT))
                meta = json_object(commit.meta, f"{ref} (the tip of a long space name)")
                name = meta.get("space")
                if not isinstance(name, str) or encode_name(name) != path:
                    continue
            else:
                name = decode_name(path)
            if name is not None:
                names.append(name)
        return sorted(names)

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
            # generations only grow); the checks are repeated under the locks below.
            tip = self._chains.tip(handle, space)
            found = [
                self._chains.find_intent(space, tip, p.intent_id) if p.intent_id else None
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
                new = self._chains.write_commits(handle, objects, tip, batch, out)
                moved = self._move_space_ref(
                    handle, space, tip, new.oid, objects, deadline, fence if fenced else None
                )
                if moved:
                    self._git.remember((space, new.oid), new)
                    bells = self._git.bells
                    if bells is not None and any(p.intent_id for p in batch):
                        bells.ring("e", space)  # a forwarder may wait for it
                    return out
            finally:
                objects.close()

    def _move_space_ref(
        self,
        handle: Any,
        space: str,
        tip: Tip | None,
        new: str,
        objects: LooseObjects,
        deadline: float,
        fence: Lease | None,
    ) -> bool:
        """Move the space ref from `tip` to `new` under its lock, `fence` checked under it;
        `objects` (those `new` reaches) are made durable with the ref.

        A lease changes hands (a new generation) only under the same space ref lock (see
        `_update_lease`), so the grant read here stays current until the ref has moved.
        False when another writer moved the tip since it was read: the caller re-checks.
        """
        ref = space_ref(space)
        staged = self._git.refs.stage(ref, new, objects)
        try:
            lock = self._git.lock(handle, ref, deadline, staged)
            try:
                if self._git.target(handle, ref) != (tip.oid if tip else None):
                    return False
                if fence is not None:
                    check_fence(fence, self._lease_record(handle, space))
                lock.commit(new)
            finally:
                lock.free()
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(staged)
        self._git.refs.sync_dirs(ref)
        return True

    # -- leases (LeaseStore): the rules of `shard_sql.leases`, applied under the ref locks ---

    def _lease_record(self, handle: Any, space: str) -> Lease | None:
        oid = self._git.target(handle, lease_ref(space), f"the lease of {space!r}")
        if oid is None:
            return None
        key = (space, oid)
        lease = self._git.cached(key, Lease)
        if lease is not None:
            return lease
        data = self._git.read(handle, oid, ObjectType.BLOB)
        return self._git.remember(key, parse_lease(space, data))

    def _update_lease(
        self, space: str, change: Callable[[Lease | None], Lease | None]
    ) -> Lease | None:
        """Run `change` on the current record under the lease ref's lock; store and return what
        it returns (None: nothing to store).

        A new grant or a revocation (the holder or generation changes) also holds the space ref's
        lock while the record is replaced, so no fenced write is between its check and its ref
        update meanwhile. Renewals and releases keep holder and generation: they do not.
        """
        handle = self._git.handle()
        deadline = time.monotonic() + self.lock_timeout
        lock = self._git.lock(handle, lease_ref(space), deadline)
        objects = self._git.objects()
        try:
            cur = self._lease_record(handle, space)
            new = change(cur)
            if new is None:
                return None
            blob = objects.put(ObjectType.BLOB, lease_bytes(new))
            if cur is not None and (cur.holder, cur.generation) == (new.holder, new.generation):
                lock.write(blob, objects)
            else:
                writes = self._git.lock(handle, space_ref(space), deadline)
                try:
                    lock.write(blob, objects)
                finally:
                    writes.free()
        finally:
            objects.close()
            lock.free()
        self._git.refs.sync_dirs(lease_ref(space))
        return new

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
