"""The space refs, `refs/shard-sql/spaces/<name>`: copies of the feed's tips for git's own tools
(reads never use them), brought up to date at every snapshot, by `close` and by `maintain`, not
by every write: on ext4 each move creates one file and frees another (docs/git.md, "The ref
layout")."""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from shard_sql.errors import ShardSqlError, StoreUnavailable
from shard_sql.git.feed import Feed, SpaceWrite
from shard_sql.git.layout import space_ref
from shard_sql.git.objects import FeedCommit
from shard_sql.git.repo import GitRepo

log = logging.getLogger("shard_sql.git")


class SpaceRefCopies:
    """Moves the space refs of one store (always under the store's write mutex: only writers
    holding it lock these refs, so a lock of one older than `lock_timeout` is a dead writer's)."""

    def __init__(self, git: GitRepo, feed: Feed) -> None:
        self.git = git
        self.feed = feed
        self.behind = False
        """This store committed a write whose copies no snapshot has moved since (`close`)."""

    def after_commit(
        self,
        handle: Any,
        previous: FeedCommit | None,
        committed: str,
        writes: Sequence[SpaceWrite],
    ) -> None:
        """Under the mutex, once the feed moved from `previous` to `committed`: if that is a
        snapshot, the refs of every space written since the snapshot before follow it. The
        write is committed: nothing here may fail it."""
        if self.feed.commit(handle, committed).since != 0:
            self.behind = True
            return
        tips = dict(self.feed.delta(handle, previous).tips)
        tips.update((w.space, w.tip.oid) for w in writes)
        self.move(handle, tips)
        self.behind = False

    def since_snapshot(self, deadline: float) -> None:
        """Take the mutex and move the refs of the spaces written since the last snapshot (by
        any process) to the feed's tips; `StoreUnavailable` if the mutex stays held."""
        handle = self.git.handle()
        with self.git.refs.mutex(deadline):
            feed = self.feed.current(handle)
            self.move(handle, self.feed.delta(handle, feed).tips)
        self.behind = False

    def every_space(self, deadline: float) -> int:
        """Move every space ref that is not at the feed's tip (a snapshot's writer that died
        before it moved them, a ref moved by hand); return how many moved."""
        handle = self.git.handle()
        feed = self.feed.current(handle)
        tips = {s: self.feed.tip_oid(handle, feed, s) for s in self.feed.spaces(handle, feed)}
        stale = [s for s, oid in tips.items() if oid is not None and self._target(handle, s) != oid]
        if not stale:
            return 0
        with self.git.refs.mutex(deadline):
            feed = self.feed.current(handle)
            now = {s: self.feed.tip_oid(handle, feed, s) for s in stale}
            return self.move(handle, {s: oid for s, oid in now.items() if oid is not None})

    def _target(self, handle: Any, space: str) -> str | None:
        """The space ref's target; None when libgit2 cannot read it (a damaged copy)."""
        try:
            return self.git.target(handle, space_ref(space))
        except StoreUnavailable:
            return None

    def move(self, handle: Any, tips: Mapping[str, str]) -> int:
        """Under the mutex: point the ref of each space of `tips` at its tip, unless it is
        there already or someone else holds its lock (left as it is); return how many moved."""
        moved = 0
        for space, oid in tips.items():
            ref = space_ref(space)
            try:
                if self._target(handle, space) == oid:
                    continue
                read = functools.partial(self.git.target, handle, ref)
                moved += self.git.refs.update_cache(ref, oid, read)
            except (ShardSqlError, OSError) as e:
                log.warning("git store %s: %s left behind the feed: %s", self.git.path, ref, e)
        return moved
