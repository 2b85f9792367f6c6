"""What a git store's objects hold: the commit of an event, the raw trees of a tip's index, the
blob of a lease record; written and parsed as raw bytes (pure functions, no repository)."""

from __future__ import annotations

import bisect
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from shard_sql.errors import StoreUnavailable
from shard_sql.validation import load_json
from shard_sql.values import Event, Lease

TRAILER = b"Shard-Sql-Event: "
"""Starts the last line of an event's commit message: the event's metadata as JSON."""
FEED_TRAILER = b"Shard-Sql-Feed: "
"""Starts the last line of a feed commit's message: what the write placed, as JSON."""
IDENT = "shard-sql@invalid"
"""The e-mail of every commit's author and committer."""
EMPTY_BLOB = "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"
TREE_MODE = b"40000"
BLOB_MODE = b"100644"
COMMIT_MODE = b"160000"
"""A tree entry naming a commit (git's submodule link): a space's tip in the feed's tree."""

_ENTRY = re.compile(rb"([0-7]{5,6}) ([^\0/]+)\0(.{20})", re.DOTALL)
_EMPTY_RAW = bytes.fromhex(EMPTY_BLOB)
_LEAF_END = b"\0" + _EMPTY_RAW
"""How every entry of an `intents-xx` tree ends (all name the empty blob): `leaf_with` splits
at it."""

TreeEntries = dict[bytes, tuple[bytes, bytes]]
"""A raw tree's entries: name -> (mode, raw 20-byte id)."""

_OID = re.compile(rb"[0-9a-f]{40}")


def json_object(data: bytes, what: str) -> dict[str, Any]:
    """`data` parsed as a JSON object; `StoreUnavailable` naming `what` when it is not one."""
    try:
        value = load_json(data)  # from a deep call stack too
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise StoreUnavailable(f"{what} is not valid JSON: {type(e).__name__}: {e}") from e
    if not isinstance(value, dict):
        raise StoreUnavailable(f"{what} is not a JSON object")
    return value


def _oid(raw: bytes) -> str:
    if not _OID.fullmatch(raw):
        raise StoreUnavailable("not a shard-sql event commit (malformed object id)")
    return raw.decode("ascii")


# -- events --------------------------------------------------------------------------------------


def _oneline(text: str) -> str:
    return text if text.isprintable() else json.dumps(text)


def _ident(writer: str) -> str:
    """An author name git accepts (no `<`, `>` or control characters) for `writer`."""
    name = "".join(c for c in writer if c.isprintable() and c not in "<>").strip()
    return name or "shard-sql"


def commit_bytes(tree: str, parent: str | None, event: Event, payload_json: str) -> bytes:
    """The raw commit object of `event` (message: subject, payload, trailer with the metadata)."""
    if "\n" in payload_json:  # never from `pending()`; a hand-made `Pending` must not split lines
        payload_json = json.dumps(event.payload, ensure_ascii=False, separators=(",", ":"))
    meta = json.dumps(
        {
            "space": event.space,
            "seq": event.seq,
            "type": event.type,
            "writer": event.writer,
            "generation": event.generation,
            "intent_id": event.intent_id,
            "recorded_at": event.recorded_at.isoformat(),
        },
        ensure_ascii=False,
        separators=(",", ":"),
    )
    stamp_ = max(0, int(event.recorded_at.timestamp()))
    who = f"{_ident(event.writer)} <{IDENT}> {stamp_} +0000"
    head = f"tree {tree}\n" + (f"parent {parent}\n" if parent else "")
    subject = f"{_oneline(event.type)} #{event.seq} by {_oneline(event.writer or '-')}"
    return (
        f"{head}author {who}\ncommitter {who}\n\n"
        f"{subject} (generation {event.generation})\n\n{payload_json}\n\n"
        f"{TRAILER.decode()}{meta}\n"
    ).encode()


@dataclass(frozen=True, slots=True)
class Tip:
    """A space's last commit: its id, its seq and its tree (the space's index)."""

    oid: str
    seq: int
    tree: str


@dataclass(frozen=True, slots=True)
class EventCommit:
    """The parts of an event's commit that reading needs (payload and metadata unparsed)."""

    tree: str
    parent: str | None
    payload: bytes
    meta: bytes


def parse_commit(data: bytes) -> EventCommit:
    """Split a raw commit written by `commit_bytes`; `StoreUnavailable` for any other."""
    head, sep, message = data.partition(b"\n\n")
    lines = head.split(b"\n")
    body = message.split(b"\n")
    if (
        not sep
        or len(lines) < 2
        or not lines[0].startswith(b"tree ")
        or len(body) != 6
        or body[1]
        or body[3]
        or body[5]
        or not body[4].startswith(TRAILER)
    ):
        raise StoreUnavailable("not a shard-sql event commit (malformed message)")
    parent = _oid(lines[1][7:]) if lines[1].startswith(b"parent ") else None
    return EventCommit(_oid(lines[0][5:]), parent, body[2], body[4][len(TRAILER) :])


def parent_of(data: bytes) -> str | None:
    """The first parent of a raw commit, without parsing the rest."""
    lines = data.split(b"\n", 2)
    if len(lines) < 3:
        raise StoreUnavailable("not a shard-sql event commit (malformed header)")
    return _oid(lines[1][7:]) if lines[1].startswith(b"parent ") else None


def event_of(
    space: str,
    seq: int,
    c: EventCommit,
    position: int | None = None,
    meta: dict[str, Any] | None = None,
) -> Event:
    """The event a commit holds (`meta`: its metadata, parsed already), checked to be `space`'s
    seq `seq`; `position` its place in the feed."""
    if meta is None:
        meta = json_object(c.meta, f"space {space!r}: the metadata at seq {seq}")
    if meta.get("space") != space or meta.get("seq") != seq:
        raise StoreUnavailable(
            f"space {space!r}: the commit at seq {seq} belongs to "
            f"{meta.get('space')!r} seq {meta.get('seq')!r}; the chain is corrupt"
        )
    payload = json_object(c.payload, f"space {space!r}: the payload at seq {seq}")
    type_, writer, generation = meta.get("type"), meta.get("writer"), meta.get("generation")
    intent_id, recorded = meta.get("intent_id"), meta.get("recorded_at")
    if (
        not isinstance(type_, str)
        or not isinstance(writer, str)
        or isinstance(generation, bool)
        or not isinstance(generation, int)
        or not (intent_id is None or isinstance(intent_id, str))
    ):
        raise StoreUnavailable(f"space {space!r}: the metadata at seq {seq} is corrupt")
    return Event(
        space, seq, type_, payload, _aware(recorded, space), writer, generation, intent_id, position
    )


def _aware(text: object, space: str) -> datetime:
    """A timestamp written by `datetime.isoformat` of an aware datetime."""
    try:
        when = datetime.fromisoformat(text) if isinstance(text, str) else None
    except ValueError:
        when = None
    if when is None or when.tzinfo is None:
        raise StoreUnavailable(f"a timestamp of {space!r} is corrupt: {text!r}")
    return when


# -- the feed ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FeedCommit:
    """A feed commit: the write it records and the feed after it.

    `events`: the commit ids of positions `first .. head` (a snapshot that completes index
    chunks lists only what follows the last of them: the chunks hold the rest); `spaces`: the
    spaces it wrote, from seq `seqs[i]` on, whose new tips are its parents after `previous`;
    `of[n]`: the index in `spaces` of `events[n]` (empty when it wrote one space);
    `checkpoints`: the positions it saved. `since`: the writes since the last snapshot (0: this
    is one, its tree holds everything up to `head`; else its tree is that snapshot's);
    `indexed`: the positions its tree's index chunks hold.
    """

    oid: str
    tree: str
    previous: str | None
    head: int
    first: int
    events: tuple[str, ...]
    spaces: tuple[str, ...]
    tips: tuple[str, ...]
    seqs: tuple[int, ...]
    of: tuple[int, ...]
    checkpoints: dict[str, int]
    since: int
    indexed: int


def feed_commit_bytes(
    tree: str,
    previous: str | None,
    tips: Sequence[str],
    record: dict[str, Any],
    subject: str,
    when: int,
) -> bytes:
    """The raw commit of a write: parents the previous feed commit and the new tips."""
    parents = ([previous] if previous else []) + list(tips)
    head = f"tree {tree}\n" + "".join(f"parent {p}\n" for p in parents)
    who = f"shard-sql <{IDENT}> {max(0, when)} +0000"
    trailer = json.dumps(record, ensure_ascii=False, separators=(",", ":"))
    return (
        f"{head}author {who}\ncommitter {who}\n\n{subject}\n\n{FEED_TRAILER.decode()}{trailer}\n"
    ).encode()


def _ints(value: object, least: int = 0) -> bool:
    return isinstance(value, list) and all(
        isinstance(x, int) and not isinstance(x, bool) and x >= least for x in value
    )


def parse_feed_commit(oid: str, data: bytes) -> FeedCommit:
    """A feed commit written by `feed_commit_bytes`; `StoreUnavailable` for anything else."""
    head, sep, message = data.partition(b"\n\n")
    lines = head.split(b"\n")
    body = message.split(b"\n")
    if (
        not sep
        or not lines[0].startswith(b"tree ")
        or len(body) != 4
        or body[1]
        or body[3]
        or not body[2].startswith(FEED_TRAILER)
    ):
        raise StoreUnavailable(f"{oid} is not a shard-sql feed commit (malformed message)")
    parents = [_oid(x[7:]) for x in lines[1:] if x.startswith(b"parent ")]
    r = json_object(body[2][len(FEED_TRAILER) :], f"the feed commit {oid}")
    head_, first, events, spaces = r.get("head"), r.get("first"), r.get("events"), r.get("spaces")
    seqs, of, saves = r.get("seqs", []), r.get("of", []), r.get("checkpoints", {})
    since, indexed = r.get("since", 0), r.get("indexed", 0)
    if (
        not isinstance(head_, int)
        or not isinstance(first, int)
        or not _ints([head_, first, since, indexed])
        or not isinstance(events, list)
        or not all(isinstance(e, str) and _OID.fullmatch(e.encode()) for e in events)
        or not isinstance(spaces, list)
        or not all(isinstance(x, str) for x in spaces)
        or not _ints(seqs)
        or not _ints(of)
        or not isinstance(saves, dict)
        or not _ints(list(saves.values()))
        or len(parents) not in (len(spaces), len(spaces) + 1)
        or first + len(events) != head_ + 1
        or first < 1
        or indexed > head_
        or (since and len(seqs) != len(spaces))
        or (since and len(spaces) > 1 and len(of) != len(events))
        or any(n >= len(spaces) for n in of)
    ):
        raise StoreUnavailable(f"the feed commit {oid} is corrupt")
    previous = parents[0] if len(parents) == len(spaces) + 1 else None
    return FeedCommit(
        oid,
        _oid(lines[0][5:]),
        previous,
        head_,
        first,
        tuple(events),
        tuple(spaces),
        tuple(parents[len(parents) - len(spaces) :]),
        tuple(seqs),
        tuple(of),
        saves,
        since,
        indexed,
    )


def checkpoint_bytes(name: str, position: int) -> bytes:
    """The blob of a checkpoint record: one line of JSON."""
    record = {"name": name, "position": position}
    return (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode()


def parse_checkpoint(data: bytes) -> tuple[str, int]:
    """`(name, position)` of a checkpoint record."""
    record = json_object(data, "a checkpoint record")
    name, position = record.get("name"), record.get("position")
    if (
        not isinstance(name, str)
        or isinstance(position, bool)
        or not isinstance(position, int)
        or position < 0
    ):
        raise StoreUnavailable("a checkpoint record is corrupt")
    return name, position


# -- trees ---------------------------------------------------------------------------------------


def tree_entries(data: bytes) -> TreeEntries:
    """The entries of a raw tree object."""
    entries: TreeEntries = {}
    at = 0
    for m in _ENTRY.finditer(data):
        if m.start() != at:
            break
        entries[m[2]] = (m[1], m[3])
        at = m.end()
    if at != len(data):
        raise StoreUnavailable("a tree object is malformed")
    return entries


def tree_bytes(entries: TreeEntries) -> bytes:
    """The raw tree object of `entries`, in git's order (a tree sorts as its name plus `/`)."""
    names = sorted(entries, key=lambda n: n + b"/" if entries[n][0] == TREE_MODE else n)
    return b"".join(b"%s %s\0%s" % (entries[n][0], n, entries[n][1]) for n in names)


def leaf_with(data: bytes, names: Sequence[bytes]) -> bytes:
    """An `intents-xx` tree (every entry an empty blob) with the entries `names` added.

    Its entries are found by splitting at their common end, not parsed one by one: a write costs
    O(entries) in C, as in libgit2, however large the leaf has grown."""
    head = BLOB_MODE + b" "
    if not data:
        items: list[bytes] = []
    elif (
        data.startswith(head)
        and data.endswith(_LEAF_END)
        and data.count(b"\0") == data.count(_LEAF_END) == data.count(_LEAF_END + head) + 1
    ):
        items = data[: -len(_LEAF_END)].split(_LEAF_END)
    else:  # not all `100644` empty blobs (written by hand?): the general way
        entries = tree_entries(data)
        for name in names:
            entries[name] = (BLOB_MODE, _EMPTY_RAW)
        return tree_bytes(entries)
    for name in names:
        item = head + name
        at = bisect.bisect_left(items, item)
        if at == len(items) or items[at] != item:
            items.insert(at, item)
    return _LEAF_END.join(items) + _LEAF_END


# -- leases --------------------------------------------------------------------------------------


def lease_bytes(lease: Lease) -> bytes:
    """The blob of a lease record: one line of JSON."""
    record = {
        "space": lease.space,
        "holder": lease.holder,
        "expires_at": lease.expires_at.isoformat(),
        "generation": lease.generation,
    }
    return (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode()


def parse_lease(space: str, data: bytes) -> Lease:
    """The lease record of `space` in a blob written by `lease_bytes`."""
    record = json_object(data, f"the lease record of {space!r}")
    holder, generation = record.get("holder"), record.get("generation")
    if (
        record.get("space") != space
        or not isinstance(holder, str)
        or isinstance(generation, bool)
        or not isinstance(generation, int)
    ):
        raise StoreUnavailable(f"the lease record of {space!r} is corrupt")
    return Lease(space, holder, _aware(record.get("expires_at"), space), generation)
