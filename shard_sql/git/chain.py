"""A space's chain of event commits: its tip (as the feed says), its events read through the tip's
index, the event of an intent id, and the commits and tip tree of a new batch."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from typing import Any

import pygit2
from pygit2.enums import ObjectType, RepositoryOpenFlag

from shard_sql.errors import StoreUnavailable
from shard_sql.git.feed import Feed
from shard_sql.git.layout import CHUNK, INDEX_TREE, INTENT_TREES, intent_entry
from shard_sql.git.loose import LooseObjects
from shard_sql.git.objects import (
    BLOB_MODE,
    TREE_MODE,
    FeedCommit,
    Tip,
    TreeEntries,
    commit_bytes,
    event_of,
    json_object,
    leaf_with,
    parent_of,
    parse_commit,
    tree_bytes,
    tree_entries,
)
from shard_sql.git.repo import GitRepo
from shard_sql.validation import Pending
from shard_sql.values import Event

_OID = re.compile(rb"[0-9a-f]{40}")


class RecycledHandles:
    """Repository handles for one long read, each used for `RECYCLE` objects, then freed:
    libgit2 caches what a handle reads (up to 256 MB), and a stream of a million events must
    not keep them."""

    RECYCLE = 16 * CHUNK

    def __init__(self, gitdir: str) -> None:
        self.gitdir = gitdir
        self.handle: Any = None
        self.reads = 0

    def get(self, reads: int) -> Any:
        """A handle for the next `reads` objects."""
        if self.handle is None or self.reads >= self.RECYCLE:
            self.close()
            self.handle = pygit2.Repository(self.gitdir, RepositoryOpenFlag.NO_SEARCH)
        self.reads += reads
        return self.handle

    def close(self) -> None:
        if self.handle is not None:
            self.handle.free()
            self.handle = None
            self.reads = 0


class SpaceChains:
    """Reads and extends the chains of one repository's spaces."""

    def __init__(self, git: GitRepo, feed: Feed) -> None:
        self.git = git
        self.feed = feed

    # -- reading -----------------------------------------------------------------------------

    def tip(self, handle: Any, space: str) -> Tip | None:
        """The space's tip as of now, None for a space without events."""
        return self.tip_in(handle, self.feed.current(handle), space)

    def tip_in(self, handle: Any, feed: FeedCommit | None, space: str) -> Tip | None:
        """The space's tip in `feed`, None for a space without events."""
        oid = self.feed.tip_oid(handle, feed, space)
        if oid is None:
            return None
        key = (space, oid)
        tip = self.git.cached(key, Tip)
        if tip is not None:
            return tip
        c = parse_commit(self.git.read(handle, oid, ObjectType.COMMIT))
        meta = json_object(c.meta, f"space {space!r}: the tip commit {oid}")
        seq = meta.get("seq")
        if meta.get("space") != space or not isinstance(seq, int) or seq < 0:
            raise StoreUnavailable(f"space {space!r}: the tip commit {oid} is corrupt")
        return self.git.remember(key, Tip(oid, seq, c.tree))

    def events(
        self, space: str, feed: FeedCommit, tip: Tip, start: int, stop: int
    ) -> Iterator[Event]:
        """Events `start .. stop - 1` of the chain ending at `tip` (the space's tip in `feed`,
        which gives their positions), in seq order; a long read uses `RecycledHandles`."""
        stop = min(stop, tip.seq + 1)
        recycled = RecycledHandles(self.git.gitdir) if stop - start > CHUNK else None
        try:
            yield from self._read_events(space, feed, tip, start, stop, recycled)
        finally:
            if recycled is not None:
                recycled.close()

    def _read_events(
        self,
        space: str,
        feed: FeedCommit,
        tip: Tip,
        start: int,
        stop: int,
        recycled: RecycledHandles | None,
    ) -> Iterator[Event]:
        tail = tip.seq - tip.seq % CHUNK  # seqs below `tail` are indexed by the tip's tree
        seq = start
        while seq < min(stop, tail):
            handle = recycled.get(CHUNK) if recycled else self.git.handle()
            base = seq - seq % CHUNK
            oids = self.index_chunk(handle, tip, base)
            end = min(stop, base + CHUNK)
            places = self.feed.positions(handle, feed, space, tip, seq, end)
            for s in range(seq, end):
                data = self.git.read(handle, oids[s - base], ObjectType.COMMIT)
                yield event_of(space, s, parse_commit(data), places[s - seq])
            seq = end
        if seq < stop:
            handle = recycled.get(CHUNK) if recycled else self.git.handle()
            walked: list[bytes] = []
            oid: str | None = tip.oid
            for _ in range(tip.seq - seq + 1):
                if oid is None:
                    raise StoreUnavailable(f"space {space!r}: the chain is shorter than its seq")
                data = self.git.read(handle, oid, ObjectType.COMMIT)
                walked.append(data)
                oid = parent_of(data)
            places = self.feed.positions(handle, feed, space, tip, seq, stop)
            for s in range(seq, stop):
                yield event_of(space, s, parse_commit(walked[tip.seq - s]), places[s - seq])

    def index_chunk(self, handle: Any, tip: Tip, start: int) -> list[str]:
        """The commit ids of seqs `start .. start + CHUNK - 1`, from the tip's tree."""
        entry = self.git.entry(handle, tip.tree, f"{INDEX_TREE}/{start:012d}")
        if not isinstance(entry, pygit2.Blob):
            raise StoreUnavailable(f"the index chunk at seq {start} is missing")
        oids = self.git.read(handle, str(entry.id), ObjectType.BLOB).split(b"\n")
        if len(oids) != CHUNK + 1 or oids[-1] or not all(_OID.fullmatch(o) for o in oids[:-1]):
            raise StoreUnavailable(f"the index chunk at seq {start} is malformed")
        return [o.decode("ascii") for o in oids[:-1]]

    def event_at(self, space: str, feed: FeedCommit, tip: Tip, seq: int) -> Event:
        for e in self.events(space, feed, tip, seq, seq + 1):
            return e
        raise StoreUnavailable(f"space {space!r} has no seq {seq}")

    def find_intent(
        self, space: str, feed: FeedCommit | None, tip: Tip | None, intent_id: str
    ) -> Event | None:
        """The event written for `intent_id` in the chain ending at `tip` (in `feed`), if any."""
        if tip is None or feed is None:
            return None
        handle = self.git.handle()
        first, rest = intent_entry(intent_id)
        entry = self.git.entry(handle, tip.tree, INTENT_TREES + first)
        if entry is None:
            return None
        if not isinstance(entry, pygit2.Tree):
            raise StoreUnavailable(f"space {space!r}: the intent index is malformed")
        leaf = self.git.tree(handle, str(entry.id))
        # Entries `<rest>.<seq>` are sorted by name: binary search for the `<rest>.` prefix.
        key = rest + "."
        lo, hi = 0, len(leaf)
        while lo < hi:
            mid = (lo + hi) // 2
            if (leaf[mid].name or "") < key:
                lo = mid + 1
            else:
                hi = mid
        found = (leaf[lo].name or "") if lo < len(leaf) else ""
        if not found.startswith(key):
            return None
        seq = found[len(key) :]
        if not (seq.isascii() and seq.isdigit()):
            raise StoreUnavailable(f"space {space!r}: the intent index is malformed")
        event = self.event_at(space, feed, tip, int(seq))
        if event.intent_id != intent_id:
            raise StoreUnavailable(
                f"space {space!r}: the intent index points {intent_id!r} at another event"
            )
        return event

    def find_intent_now(self, handle: Any, space: str, intent_id: str) -> Event | None:
        """The event written for `intent_id` in the space as of now, if any."""
        feed = self.feed.current(handle)
        return self.find_intent(space, feed, self.tip_in(handle, feed, space), intent_id)

    def chain_oids(self, handle: Any, tip: Tip | None, start: int) -> list[str]:
        """The commit ids of seqs `start .. tip.seq`, walking back from the tip."""
        if tip is None or start > tip.seq:
            return []
        oids: list[str] = []
        oid: str | None = tip.oid
        for _ in range(tip.seq - start + 1):
            if oid is None:
                raise StoreUnavailable("the chain is shorter than its seq")
            oids.append(oid)
            oid = parent_of(self.git.read(handle, oid, ObjectType.COMMIT))
        oids.reverse()
        return oids

    # -- extending ---------------------------------------------------------------------------

    def write_commits(
        self,
        handle: Any,
        objects: LooseObjects,
        tip: Tip | None,
        batch: Sequence[Pending],
        out: Sequence[Event],
    ) -> tuple[Tip, list[str]]:
        """Write the batch's commits; return the new tip and their ids. Only the last gets the
        new tree (commits in the middle of a batch keep the tree of the batch's parent)."""
        parent = tip.oid if tip else None
        # The empty tree is written (or freshened) each time: a cached id could outlive a pruned
        # object.
        base = tip.tree if tip else objects.put(ObjectType.TREE, b"")
        made: list[str] = []
        tree = base
        for n, (p, e) in enumerate(zip(batch, out, strict=True)):
            if n == len(out) - 1:
                tree = self._tip_tree(handle, objects, tip, base, out, made)
            parent = objects.put(ObjectType.COMMIT, commit_bytes(tree, parent, e, p.payload_json))
            made.append(parent)
        assert parent is not None
        return Tip(parent, out[-1].seq, tree), made

    def _tip_tree(
        self,
        handle: Any,
        objects: LooseObjects,
        tip: Tip | None,
        base: str,
        out: Sequence[Event],
        made: list[str],
    ) -> str:
        """The tip tree after `out`: `base` plus the batch's intents and newly complete chunks.

        `made` holds the commits of `out[:-1]`. Trees are edited as raw objects (libgit2 would
        write them with its own, process-wide fsync setting).
        """
        last = out[-1].seq
        old = tip.seq // CHUNK if tip else 0
        chunks = range(old, last // CHUNK)
        intents = [(e.intent_id, e.seq) for e in out if e.intent_id is not None]
        if not chunks and not intents:
            return base
        root = tree_entries(self.git.read(handle, base, ObjectType.TREE))
        if chunks:
            known = self.chain_oids(handle, tip, chunks.start * CHUNK) + made
            index = self._subtree(handle, root, INDEX_TREE.encode())
            for k in chunks:
                lines = known[k * CHUNK - chunks.start * CHUNK :][:CHUNK]
                text = ("\n".join(lines) + "\n").encode("ascii")
                blob = objects.put(ObjectType.BLOB, text)
                index[f"{k * CHUNK:012d}".encode()] = (BLOB_MODE, bytes.fromhex(blob))
            tree = objects.put(ObjectType.TREE, tree_bytes(index))
            root[INDEX_TREE.encode()] = (TREE_MODE, bytes.fromhex(tree))
        if intents:
            # The empty blob stays reachable (so safe from gc) once the tip indexes an intent;
            # before that it is written (or freshened) like any new object.
            prefix = INTENT_TREES.encode()
            if not any(name.startswith(prefix) for name in root):
                objects.put(ObjectType.BLOB, b"")
            groups: dict[str, list[bytes]] = {}
            for intent_id, seq in intents:
                first, rest = intent_entry(intent_id)
                groups.setdefault(first, []).append(f"{rest}.{seq}".encode())
            for first, names in groups.items():
                entry = root.get(prefix + first.encode())
                data = self.git.read(handle, entry[1].hex(), ObjectType.TREE) if entry else b""
                leaf = objects.put(ObjectType.TREE, leaf_with(data, names))
                root[prefix + first.encode()] = (TREE_MODE, bytes.fromhex(leaf))
        return objects.put(ObjectType.TREE, tree_bytes(root))

    def _subtree(self, handle: Any, root: TreeEntries, name: bytes) -> TreeEntries:
        entry = root.get(name)
        if entry is None:
            return {}
        return tree_entries(self.git.read(handle, entry[1].hex(), ObjectType.TREE))
