"""Positions for a repository written before the feed existed: its space refs were the truth
then; the first store that opens it places their events in the feed, once (docs/git.md)."""

from __future__ import annotations

import contextlib
import os
import time
from datetime import datetime
from typing import Any

from pygit2.enums import ObjectType

from shard_sql.errors import StoreUnavailable
from shard_sql.git.errors import translated
from shard_sql.git.feed import Feed, SpaceWrite
from shard_sql.git.layout import FEED, HASHED, SPACES, decode_name, encode_name
from shard_sql.git.objects import Tip, json_object, parse_commit
from shard_sql.git.repo import GitRepo


class _Where:
    def __init__(self, git: GitRepo) -> None:
        self.path = git.path


def place_existing_events(git: GitRepo, feed: Feed) -> None:
    """If the repository has space refs but no feed: give every event a position, in the order
    of (the latest `recorded_at` up to it in its space, space, seq), which keeps each space's seq
    order even where writers' clocks disagreed; one feed commit, under the write mutex."""
    translated(_place)(_Where(git), git, feed)


def _place(_: _Where, git: GitRepo, feed: Feed) -> None:
    handle = git.handle()
    if git.target(handle, FEED, "the feed") is not None:
        return
    refs = {r for r in handle.references if r.startswith(SPACES)}
    refs.update(git.refs.loose_under(SPACES))
    if not refs:
        return
    deadline = time.monotonic() + git.lock_timeout
    with git.refs.mutex(deadline):
        if git.target(handle, FEED, "the feed") is not None:
            return  # another process placed them meanwhile
        writes: list[SpaceWrite] = []
        keys: list[tuple[datetime, str, int, int]] = []
        for ref in sorted(refs):
            found = _legacy_space(git, handle, ref)
            if found is None:
                continue
            space, tip, oids, times = found
            w = len(writes)
            writes.append(SpaceWrite(space, None, tip, oids))
            latest: datetime | None = None
            for seq, when in enumerate(times):
                latest = when if latest is None or when > latest else latest
                keys.append((latest, space, seq, w))
        if not writes:
            return
        keys.sort()
        objects = git.objects()
        try:
            new = feed.build(handle, objects, None, writes, [(w, s) for _, _, s, w in keys], {})
            staged = git.refs.stage(FEED, new, objects)
        finally:
            objects.close()
        try:
            lock = git.lock(handle, FEED, deadline, staged, breakable=True)
            try:
                if git.target(handle, FEED, "the feed") is None:
                    lock.commit(new)
            finally:
                lock.free()
            git.refs.sync_dirs(FEED)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(staged)


def _legacy_space(
    git: GitRepo, handle: Any, ref: str
) -> tuple[str, Tip, list[str], list[datetime]] | None:
    """A space ref of the old layout: its name, tip, every commit id and `recorded_at`, in seq
    order; None for a ref that is not an encoding (written by hand)."""
    path = ref[len(SPACES) :]
    oid = git.target(handle, ref, "a space written before the feed")
    if oid is None:
        return None
    oids: list[str] = []
    times: list[datetime] = []
    name = None if path.startswith(HASHED) else decode_name(path)
    at: str | None = oid
    tip: Tip | None = None
    while at is not None:
        c = parse_commit(git.read(handle, at, ObjectType.COMMIT))
        meta = json_object(c.meta, f"{ref}: the commit {at}")
        space, seq, when = meta.get("space"), meta.get("seq"), meta.get("recorded_at")
        if tip is None:
            if not isinstance(space, str) or encode_name(space) != path:
                if name is None:
                    return None
                raise StoreUnavailable(f"{ref}: its tip {at} belongs to space {space!r}")
            if not isinstance(seq, int) or seq < 0:
                raise StoreUnavailable(f"{ref}: the tip commit {at} is corrupt")
            name = space
            tip = Tip(at, seq, c.tree)
        expected = tip.seq - len(oids)
        if space != name or seq != expected or not isinstance(when, str):
            raise StoreUnavailable(f"{ref}: the commit {at} is not seq {expected} of {name!r}")
        try:
            stamp = datetime.fromisoformat(when)
        except ValueError:
            stamp = None
        if stamp is None or stamp.tzinfo is None:
            raise StoreUnavailable(f"{ref}: the commit {at} has a corrupt time")
        oids.append(at)
        times.append(stamp)
        at = c.parent
    if tip is None or name is None or len(oids) != tip.seq + 1:
        raise StoreUnavailable(f"{ref}: the chain is shorter than its seq")
    oids.reverse()
    times.reverse()
    return name, tip, oids, times
