"""The lease records of a git store: one blob per lease, named by `refs/shard-sql/leases/<name>`,
replaced under the store's write mutex so that a writer killed mid-change never leaves the lease
locked for good (docs/git.md, "Atomicity and locking")."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import Any

from pygit2.enums import ObjectType

from shard_sql.git.layout import lease_ref
from shard_sql.git.objects import lease_bytes, parse_lease
from shard_sql.git.repo import GitRepo
from shard_sql.values import Lease

Change = Callable[[Lease | None], Lease | None]
"""A lease rule of `shard_sql.leases` applied to the current record: the new record, None when
there is nothing to store, or a refusal (`LeaseHeld`, `StaleLease`)."""


class LeaseRefs:
    """Reads and replaces the lease records of one repository."""

    def __init__(self, git: GitRepo) -> None:
        self.git = git

    def record(self, handle: Any, space: str) -> Lease | None:
        """The lease record of `space` as of now, None when it has none."""
        return self._parsed(handle, space, self._target(handle, space))

    def update(self, space: str, change: Change, deadline: float) -> Lease | None:
        """Apply `change` to the current record of `space` and store what it returns (None:
        nothing stored); its refusals raise as they are.

        The rule runs on the record read without a lock (one ref, read whole: a refusal is the
        answer as of that read, and holders and generations only grow). The new record is
        written and fsynced with the ref's new content staged beside it; then, under the store's
        write mutex, the staged file becomes the ref's lock (a hard link) and is renamed over the
        ref if the record is still the one the rule saw, else the rule runs again. Every change
        holds the mutex, grants and revocations so that no fenced write sits between its fence
        check and its commit across them, and renewals and releases too, so that a lock file of
        ours on a lease ref found by the mutex's holder was left by a writer that died: it is
        removed (`RefFiles.lock`, `breakable`), where a lock taken without the mutex could not
        be told from a live one and would block the lease for good.
        """
        handle = self.git.handle()
        ref = lease_ref(space)
        while True:
            seen = self._target(handle, space)
            new = change(self._parsed(handle, space, seen))
            if new is None:
                return None
            objects = self.git.objects()
            try:
                blob = objects.put(ObjectType.BLOB, lease_bytes(new))
                staged = self.git.refs.stage(ref, blob, objects)
            finally:
                objects.close()
            try:
                with self.git.refs.mutex(deadline):
                    lock = self.git.lock(handle, ref, deadline, staged, breakable=True)
                    try:
                        if self._target(handle, space) != seen:
                            continue  # changed since the rule ran: run it on the new record
                        lock.commit(blob, sync=False)
                    finally:
                        lock.free()
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(staged)
            lock.sync()  # after the mutex, as a feed write does
            self.git.refs.sync_dirs(ref)
            return new

    def _target(self, handle: Any, space: str) -> str | None:
        return self.git.target(handle, lease_ref(space), f"the lease of {space!r}")

    def _parsed(self, handle: Any, space: str, oid: str | None) -> Lease | None:
        if oid is None:
            return None
        key = (space, oid)
        lease = self.git.cached(key, Lease)
        if lease is not None:
            return lease
        data = self.git.read(handle, oid, ObjectType.BLOB)
        return self.git.remember(key, parse_lease(space, data))
