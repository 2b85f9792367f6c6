"""The feed of a git store: one commit per write, the write's one commit point. A write's commit
records what it changed (a delta, in its message) on the tree of the last snapshot; every
SNAPSHOT_EVERY writes a snapshot's tree holds every space's tip, the positions of every event and
the checkpoints (docs/git.md, "The feed")."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pygit2
from pygit2.enums import FileMode, ObjectType

from shard_sql.errors import StoreUnavailable
from shard_sql.git.layout import (
    CHUNK,
    FEED,
    FEED_CHECKPOINTS,
    FEED_SPACES,
    HASHED,
    INDEX_TREE,
    decode_name,
    encode_name,
    entry_name,
    entry_path,
    fan,
)
from shard_sql.git.loose import LooseObjects
from shard_sql.git.objects import (
    BLOB_MODE,
    COMMIT_MODE,
    TREE_MODE,
    FeedCommit,
    Tip,
    TreeEntries,
    checkpoint_bytes,
    feed_commit_bytes,
    json_object,
    parse_checkpoint,
    parse_commit,
    parse_feed_commit,
    tree_bytes,
    tree_entries,
)
from shard_sql.git.repo import GitRepo
from shard_sql.values import Lease

_OID = re.compile(rb"[0-9a-f]{40}")
_FEED_KEY = "\0feed"
"""The first part of the cache key of a parsed feed commit (no space name has a NUL)..."""
_DELTA_KEY = "\0delta"
"""... and of the `Delta` of a feed commit."""

SNAPSHOT_EVERY = 32
"""Writes between two snapshots: a write in between adds one object (its feed commit) to the
repository, a snapshot five or more (the tree path of each space it brings up to date)."""
TAIL_LIMIT = 4 * CHUNK
"""A write that would leave more positions than this outside the index chunks is a snapshot."""


@dataclass(frozen=True, slots=True)
class Delta:
    """What the writes since the last snapshot changed: each space's new tip, the seq its
    writes began at (= its head in the snapshot) and their positions, the checkpoints saved."""

    tips: dict[str, str]
    seqs: dict[str, int]
    positions: dict[str, list[int]]
    checkpoints: dict[str, int]


NO_DELTA = Delta({}, {}, {}, {})


@dataclass(frozen=True, slots=True)
class SpaceWrite:
    """A space's part of a write: its new events' commits, built on `base` (None: the space's
    first events), ending at `tip`; `intents`: some have an intent id (a forwarder may wait)."""

    space: str
    base: Tip | None
    tip: Tip
    oids: list[str]
    intents: bool = False


@dataclass(frozen=True, slots=True)
class CheckpointSave:
    """A checkpoint saved in a write: at `position`, its `lowest` save in the write first (each
    save of a transaction is at or above the one before), fenced by `fence`."""

    position: int
    lowest: int
    fence: Lease | None = None


def _space_dir(space: str) -> str:
    return f"{FEED_SPACES}/{fan(space)}/{entry_name(space)}"


def _numbers(data: bytes, count: int, what: str) -> list[int]:
    """`count` positions, one per line."""
    lines = data.split(b"\n")
    if len(lines) != count + 1 or lines[-1] or not all(x.isdigit() for x in lines[:-1]):
        raise StoreUnavailable(f"the feed's {what} is malformed")
    return [int(x) for x in lines[:-1]]


def _lines(values: Sequence[object]) -> bytes:
    return "".join(f"{v}\n" for v in values).encode("ascii")


class Feed:
    """Reads the feed of one repository and builds its next commit."""

    def __init__(self, git: GitRepo) -> None:
        self.git = git

    # -- reading -----------------------------------------------------------------------------

    def current(self, handle: Any) -> FeedCommit | None:
        """The feed as of now: its last commit, None before the first write."""
        oid = self.git.target(handle, FEED, "the feed")
        return None if oid is None else self.commit(handle, oid)

    def commit(self, handle: Any, oid: str) -> FeedCommit:
        """The parsed feed commit `oid` (kept: objects never change)."""
        key = (_FEED_KEY, oid)
        found = self.git.cached(key, FeedCommit)
        if found is not None:
            return found
        return self.git.remember(
            key, parse_feed_commit(oid, self.git.read(handle, oid, ObjectType.COMMIT))
        )

    def _entry(self, handle: Any, feed: FeedCommit, path: str, kind: type = pygit2.Blob) -> Any:
        """The object at `path` in the feed's tree, None if there is none; `StoreUnavailable`
        if it is not a `kind`."""
        found = self.git.entry(handle, feed.tree, path)
        if found is None:
            return None
        if not isinstance(found, kind):
            raise StoreUnavailable(f"the feed's {path} is not a {kind.__name__.lower()}")
        return found

    def delta(self, handle: Any, feed: FeedCommit | None) -> Delta:
        """What the writes up to `feed` changed since its snapshot (kept per feed commit)."""
        if feed is None or feed.since == 0:
            return NO_DELTA
        key = (_DELTA_KEY, feed.oid)
        found = self.git.cached(key, Delta)
        if found is not None:
            return found
        chain = [feed]
        while chain[-1].since > 1:
            c = chain[-1]
            if c.previous is None:
                raise StoreUnavailable(f"the feed commit {c.oid} has no snapshot before it")
            prev = self.commit(handle, c.previous)
            if prev.since != c.since - 1 or prev.head != c.first - 1:
                raise StoreUnavailable(f"the feed commit {c.oid} does not follow {prev.oid}")
            cached = self.git.cached((_DELTA_KEY, prev.oid), Delta)
            if cached is not None:
                break
            chain.append(prev)
        else:
            cached = NO_DELTA
        delta = cached
        for c in reversed(chain):
            delta = self.git.remember((_DELTA_KEY, c.oid), _folded(delta, c))
        return delta

    def _data(self, handle: Any, blob: Any) -> bytes:
        """The content of a blob entry (read as `GitRepo.read` reads, not loaded by pygit2)."""
        return self.git.read(handle, str(blob.id), ObjectType.BLOB)

    def tip_oid(self, handle: Any, feed: FeedCommit | None, space: str) -> str | None:
        """The commit id of the space's last event in `feed`, None for a space without events."""
        if feed is None:
            return None
        found = self.delta(handle, feed).tips.get(space)
        if found is not None:
            return found
        entry = self._entry(handle, feed, _space_dir(space) + "/tip", pygit2.Object)
        if entry is None:
            return None
        if entry.filemode != FileMode.COMMIT:
            raise StoreUnavailable(f"space {space!r}: its tip in the feed is not a commit")
        return str(entry.id)

    def positions(
        self, handle: Any, feed: FeedCommit, space: str, tip: Tip, start: int, stop: int
    ) -> list[int]:
        """The positions of the space's seqs `start .. stop - 1` (all at most `tip.seq`)."""
        delta = self.delta(handle, feed)
        since = delta.seqs.get(space)
        if since is None:
            return self._tree_positions(handle, feed, space, tip.seq + 1, start, stop)
        recent = delta.positions[space]
        if since + len(recent) != tip.seq + 1:
            raise StoreUnavailable(f"space {space!r}: the feed's positions do not reach its tip")
        out = self._tree_positions(handle, feed, space, since, start, min(stop, since))
        return out + recent[max(start, since) - since : max(stop, since) - since]

    def _tree_positions(
        self, handle: Any, feed: FeedCommit, space: str, head: int, start: int, stop: int
    ) -> list[int]:
        """The positions of seqs `start .. stop - 1` from the snapshot's tree, which holds the
        space's first `head` events."""
        base = _space_dir(space)
        tail = head // CHUNK * CHUNK  # seqs below it are in complete chunks
        out: list[int] = []
        seq = start
        while seq < stop:
            if seq < tail:
                first = seq - seq % CHUNK
                blob = self._entry(handle, feed, f"{base}/chunks/{first:012d}")
                if blob is None:
                    raise StoreUnavailable(f"space {space!r}: positions missing at seq {first}")
                nums = _numbers(
                    self._data(handle, blob), CHUNK, f"positions of {space!r} at seq {first}"
                )
                end = min(stop, first + CHUNK)
                out += nums[seq - first : end - first]
                seq = end
            else:
                blob = self._entry(handle, feed, f"{base}/positions")
                if blob is None:
                    raise StoreUnavailable(f"space {space!r}: positions missing")
                nums = _numbers(self._data(handle, blob), head - tail, f"positions of {space!r}")
                out += nums[seq - tail : stop - tail]
                seq = stop
        return out

    def listed(self, handle: Any, feed: FeedCommit, first: int) -> list[str]:
        """The event commit ids of positions `first .. feed.head`, from the commits' lists
        (`first` past the last complete index chunk), walking back from `feed`."""
        if first > feed.head:
            return []
        parts: list[tuple[str, ...]] = []
        c = feed
        while c.first > first:
            parts.append(c.events)
            if c.previous is None:
                raise StoreUnavailable(f"the feed ends before position {first}")
            prev = self.commit(handle, c.previous)
            if prev.head != c.first - 1:
                raise StoreUnavailable(f"the feed commit {c.oid} does not follow {prev.oid}")
            c = prev
        parts.append(c.events[first - c.first :])
        return [oid for part in reversed(parts) for oid in part]

    def event_oids(
        self, handle: Any, feed: FeedCommit, after: int, stop: int
    ) -> Iterator[tuple[int, list[str]]]:
        """Blocks `(first position, event commit ids)` of positions `after + 1 .. stop`."""
        tail = feed.indexed  # positions up to it are in complete index chunks
        p = after + 1
        while p <= stop:
            if p <= tail:
                start = (p - 1) // CHUNK * CHUNK  # positions start + 1 .. start + CHUNK
                blob = self._entry(handle, feed, f"{INDEX_TREE}/{start:012d}")
                if blob is None:
                    raise StoreUnavailable(f"the feed's index misses position {p}")
                oids = self._data(handle, blob).split(b"\n")
                wrong = not all(_OID.fullmatch(o) for o in oids[:-1])
                if len(oids) != CHUNK + 1 or oids[-1] or wrong:
                    raise StoreUnavailable(f"the feed's index chunk at {start} is malformed")
                end = min(stop, start + CHUNK)
                yield p, [o.decode("ascii") for o in oids[p - 1 - start : end - start]]
                p = end + 1
            else:
                yield p, self.listed(handle, feed, p)[: stop - p + 1]
                return

    def checkpoint(self, handle: Any, feed: FeedCommit | None, name: str) -> int:
        if feed is None:
            return 0
        saved = self.delta(handle, feed).checkpoints.get(name)
        if saved is not None:
            return saved
        blob = self._entry(handle, feed, f"{FEED_CHECKPOINTS}/{fan(name)}/{entry_name(name)}")
        if blob is None:
            return 0
        found, position = parse_checkpoint(self._data(handle, blob))
        if found != name:
            raise StoreUnavailable(f"the checkpoint record of {name!r} names {found!r}")
        return position

    def checkpoints(self, handle: Any, feed: FeedCommit | None) -> dict[str, int]:
        out: dict[str, int] = {}
        if feed is None:
            return out
        top = self._entry(handle, feed, FEED_CHECKPOINTS, pygit2.Tree)
        for group in [] if top is None else top:
            for blob in self.git.tree(handle, str(group.id)):
                if not isinstance(blob, pygit2.Blob):
                    raise StoreUnavailable("the feed's checkpoints are malformed")
                name, position = parse_checkpoint(self._data(handle, blob))
                out[name] = position
        out.update(self.delta(handle, feed).checkpoints)
        return dict(sorted(out.items()))

    def spaces(self, handle: Any, feed: FeedCommit | None) -> list[str]:
        """The names of the spaces with events."""
        if feed is None:
            return []
        top = self._entry(handle, feed, FEED_SPACES, pygit2.Tree)
        names = []
        for group in [] if top is None else top:
            for entry in self.git.tree(handle, str(group.id)):
                path = entry_path(entry.name or "")
                name = decode_name(path)
                if name is None and path.startswith(HASHED):
                    # A long name is spelled out in its events only: read it from the tip.
                    try:
                        tip = str(self.git.tree(handle, str(entry.id))["tip"].id)
                    except KeyError:
                        raise StoreUnavailable(f"the feed's space {path} has no tip") from None
                    c = parse_commit(self.git.read(handle, tip, ObjectType.COMMIT))
                    found = json_object(c.meta, f"the tip of {path}").get("space")
                    name = found if isinstance(found, str) and encode_name(found) == path else None
                if name is None:
                    raise StoreUnavailable(f"the feed names a space it cannot spell: {entry.name}")
                names.append(name)
        return sorted(set(names) | set(self.delta(handle, feed).tips))

    # -- building ----------------------------------------------------------------------------

    def build(
        self,
        handle: Any,
        objects: LooseObjects,
        feed: FeedCommit | None,
        writes: Sequence[SpaceWrite],
        order: Sequence[tuple[int, int]],
        saves: Mapping[str, int],
    ) -> str:
        """Write the feed commit that follows `feed` with `writes` placed in `order` (pairs of a
        write's index and an event's index in it) and the checkpoints `saves`; return its id.
        Each write's `base` must be its space's tip in `feed` (the caller checked)."""
        old_head = feed.head if feed else 0
        listed = [writes[w].oids[i] for w, i in order]
        head = old_head + len(listed)
        since = (feed.since if feed else 0) + 1
        indexed = feed.indexed if feed else 0
        record: dict[str, Any] = {"head": head, "first": old_head + 1, "events": listed}
        record["spaces"] = [w.space for w in writes]
        record["seqs"] = [w.base.seq + 1 if w.base else 0 for w in writes]
        if len(writes) > 1:
            record["of"] = [w for w, _ in order]
        record["checkpoints"] = dict(saves)
        if since >= SNAPSHOT_EVERY or head - indexed > TAIL_LIMIT:
            c = self._snapshot(handle, objects, feed, writes, order, saves, head)
            tree, record["first"], record["indexed"] = c
            record["events"] = listed[record["first"] - old_head - 1 :]
            since = 0
        elif feed is not None:
            tree, record["indexed"] = feed.tree, indexed
        else:
            tree, record["indexed"] = objects.put(ObjectType.TREE, b""), 0
        record["since"] = since
        if not since:
            del record["seqs"], record["checkpoints"]
            record.pop("of", None)
        if listed:
            subject = f"feed {old_head + 1}..{head}: {len(listed)} events in "
            subject += f"{len(writes)} space" + ("s" if len(writes) != 1 else "")
        else:
            subject = f"feed {head}: checkpoints " + ", ".join(sorted(saves))[:200]
        if not since:
            subject += " (snapshot)"
        data = feed_commit_bytes(
            tree,
            feed.oid if feed else self._root(objects),
            [w.tip.oid for w in writes],
            record,
            subject,
            int(time.time()),
        )
        oid = objects.put(ObjectType.COMMIT, data)
        # Kept as read back: the next write of this process reads it, unless another's moved on.
        self.git.remember((_FEED_KEY, oid), parse_feed_commit(oid, data))
        return oid

    def _snapshot(
        self,
        handle: Any,
        objects: LooseObjects,
        feed: FeedCommit | None,
        writes: Sequence[SpaceWrite],
        order: Sequence[tuple[int, int]],
        saves: Mapping[str, int],
        head: int,
    ) -> tuple[str, int, int]:
        """The tree of a snapshot after `feed` and this write: the delta since the last one
        brought into it; with the first position its commit lists, and the positions indexed."""
        old_head = feed.head if feed else 0
        delta = self.delta(handle, feed)
        spaces = {
            s: (delta.seqs[s], list(delta.positions[s]), tip) for s, tip in delta.tips.items()
        }
        for w, write in enumerate(writes):
            seq = write.base.seq + 1 if write.base else 0
            start, positions, _ = spaces.get(write.space, (seq, [], ""))
            positions += [old_head + 1 + n for n, (v, _) in enumerate(order) if v == w]
            spaces[write.space] = (start, positions, write.tip.oid)
        checkpoints = {**delta.checkpoints, **saves}
        root = self._tree(handle, feed.tree if feed else None)
        indexed = feed.indexed if feed else 0
        done = range(indexed // CHUNK, head // CHUNK)  # index chunks this snapshot completes
        if done:
            known = self.listed(handle, feed, indexed + 1) if feed else []
            known += [writes[w].oids[i] for w, i in order]
            index = self._sub(handle, root, INDEX_TREE)
            for k in done:
                text = _lines(known[k * CHUNK - indexed : (k + 1) * CHUNK - indexed])
                index[f"{k * CHUNK:012d}".encode()] = (BLOB_MODE, self._put(objects, text))
            root[INDEX_TREE.encode()] = (TREE_MODE, self._tree_id(objects, index))
        by_fan: dict[str, list[str]] = {}
        for space in spaces:
            by_fan.setdefault(fan(space), []).append(space)
        if by_fan:
            top = self._sub(handle, root, FEED_SPACES)
            for key, names in by_fan.items():
                group = self._sub(handle, top, key)
                for space in names:
                    name = entry_name(space).encode()
                    start, positions, tip = spaces[space]
                    entry = self._space_tree(
                        handle, objects, space, group.get(name), start, positions, tip
                    )
                    group[name] = (TREE_MODE, entry)
                top[key.encode()] = (TREE_MODE, self._tree_id(objects, group))
            root[FEED_SPACES.encode()] = (TREE_MODE, self._tree_id(objects, top))
        if checkpoints:
            self._put_checkpoints(handle, objects, root, checkpoints)
        new_indexed = head // CHUNK * CHUNK
        first = max(old_head + 1, new_indexed + 1)
        return objects.put(ObjectType.TREE, tree_bytes(root)), first, new_indexed

    def _put_checkpoints(
        self, handle: Any, objects: LooseObjects, root: Any, checkpoints: Mapping[str, int]
    ) -> None:
        """A snapshot's checkpoints subtree (fanned out like the spaces) into `root`."""
        top = self._sub(handle, root, FEED_CHECKPOINTS)
        by_fan: dict[str, list[str]] = {}
        for checkpoint in checkpoints:
            by_fan.setdefault(fan(checkpoint), []).append(checkpoint)
        for key, names in by_fan.items():
            group = self._sub(handle, top, key)
            for checkpoint in names:
                data = checkpoint_bytes(checkpoint, checkpoints[checkpoint])
                group[entry_name(checkpoint).encode()] = (BLOB_MODE, self._put(objects, data))
            top[key.encode()] = (TREE_MODE, self._tree_id(objects, group))
        root[FEED_CHECKPOINTS.encode()] = (TREE_MODE, self._tree_id(objects, top))

    @staticmethod
    def _root(objects: LooseObjects) -> str:
        """The feed's first commit, before any write (so that every write's commit has the one
        before it as its first parent: `git log --first-parent` lists the writes)."""
        empty = objects.put(ObjectType.TREE, b"")
        record = {"head": 0, "first": 1, "events": [], "spaces": [], "since": 0, "indexed": 0}
        return objects.put(
            ObjectType.COMMIT, feed_commit_bytes(empty, None, [], record, "feed: begins", 0)
        )

    def _space_tree(
        self,
        handle: Any,
        objects: LooseObjects,
        space: str,
        old: tuple[bytes, bytes] | None,
        head: int,
        positions: list[int],
        tip: str,
    ) -> bytes:
        """The raw id of a space's new entry, whose old one held its first `head` events:
        `tip`, `positions` (the last incomplete chunk's) and `chunks/` (complete ones)."""
        entry = self._tree(handle, old[1].hex()) if old else {}
        start = head // CHUNK * CHUNK
        tail: list[int] = []
        if head:
            blob = entry.get(b"positions")
            if blob is None:
                raise StoreUnavailable(f"space {space!r}: positions missing")
            data = self.git.read(handle, blob[1].hex(), ObjectType.BLOB)
            tail = _numbers(data, head - start, f"positions of {space!r}")
        tail += positions
        if len(tail) >= CHUNK:
            chunks = self._sub(handle, entry, "chunks")
            while len(tail) >= CHUNK:
                blob_id = self._put(objects, _lines(tail[:CHUNK]))
                chunks[f"{start:012d}".encode()] = (BLOB_MODE, blob_id)
                tail = tail[CHUNK:]
                start += CHUNK
            entry[b"chunks"] = (TREE_MODE, self._tree_id(objects, chunks))
        entry[b"tip"] = (COMMIT_MODE, bytes.fromhex(tip))
        entry[b"positions"] = (BLOB_MODE, self._put(objects, _lines(tail)))
        return self._tree_id(objects, entry)

    def _tree(self, handle: Any, oid: str | None) -> TreeEntries:
        if oid is None:
            return {}
        return tree_entries(self.git.read(handle, oid, ObjectType.TREE))

    def _sub(self, handle: Any, entries: TreeEntries, name: str) -> TreeEntries:
        found = entries.get(name.encode())
        if found is None:
            return {}
        if found[0] != TREE_MODE:
            raise StoreUnavailable(f"the feed's tree has a {name!r} that is not a tree")
        return self._tree(handle, found[1].hex())

    @staticmethod
    def _put(objects: LooseObjects, data: bytes) -> bytes:
        return bytes.fromhex(objects.put(ObjectType.BLOB, data))

    @staticmethod
    def _tree_id(objects: LooseObjects, entries: TreeEntries) -> bytes:
        return bytes.fromhex(objects.put(ObjectType.TREE, tree_bytes(entries)))


def _folded(delta: Delta, c: FeedCommit) -> Delta:
    """`delta` with the write of `c` (a commit after a snapshot) added."""
    tips, seqs = dict(delta.tips), dict(delta.seqs)
    positions, checkpoints = dict(delta.positions), {**delta.checkpoints, **c.checkpoints}
    for i, space in enumerate(c.spaces):
        if c.of:
            placed = [c.first + n for n, w in enumerate(c.of) if w == i]
        else:
            placed = list(range(c.first, c.head + 1))
        before = positions.get(space, [])
        start = seqs.setdefault(space, c.seqs[i])
        if start + len(before) != c.seqs[i]:
            raise StoreUnavailable(f"the feed commit {c.oid}: {space!r} does not follow on")
        positions[space] = before + placed
        tips[space] = c.tips[i]
    return Delta(tips, seqs, positions, checkpoints)
