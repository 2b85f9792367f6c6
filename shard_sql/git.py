"""The git adapter: each space is a chain of commits under the store's own refs.

Layout (every name below `refs/shard-sql/`, never a branch, never HEAD, the index or a work tree):

- `refs/shard-sql/spaces/<name>`: the tip of the space's chain, one commit per event. Seq `n`
  is the `n`-th commit from the root; its first parent is seq `n - 1`. The message carries the
  event, readable with stock `git log`:

      alias.set #12 by node-a (generation 3)

      {"page":"Home"}

      Shard-Sql-Event: {"space":"wiki","seq":12,"type":"alias.set","writer":"node-a",...}

  The tip commit's tree is the space's index, so a lookup never walks the chain:
  `index/<start>` (a blob listing the commit ids of seqs `start .. start + 255`, one per line,
  for every complete chunk below the tip's chunk) and `intents-<h[:2]>/<h[2:]>.<seq>` (an empty
  blob whose name says the seq written for the intent id whose SHA-256 is `h`). Commits in the
  middle of a batch keep the tree of the batch's parent; only the tip's tree is ever read.
- `refs/shard-sql/leases/<name>`: a blob `{"space", "holder", "expires_at", "generation"}`.
- `refs/shard-sql/intents/<name>/<sha256 of intent id>`: a forwarded intent not yet forgotten
  (a blob of JSON); see `shard_sql._git_intents`, which implements the `IntentQueue` half.

`<name>` is the space's UTF-8 bytes with every byte outside `[a-z0-9_-]` written `%xx` (lower-case
hex), cut into path components of at most 100 characters, each but the last ending in `+`. The
encoding is injective, case-insensitive file systems cannot merge two names, no component starts
with `.`, ends with `.lock` or holds `..`/`@{`, and no name is a prefix directory of another.
A name whose spelling would pass 900 characters (mostly non-ASCII names; libgit2 takes ref names
up to 1023 bytes) is `=<SHA-256 of its UTF-8>` instead, and its events spell it out.

Atomicity across processes comes from git's own ref locks (`<ref>.lock`, created with `O_EXCL`
through libgit2's ref transactions, honoured by stock git too). An append prepares its objects,
then locks the space ref, re-reads under the lock that the tip is still the expected commit and
(when fenced) that the lease ref still holds the fence's holder and generation, and moves the
space ref. A lease update that changes holder or generation (a new grant, a revocation) holds the
lease ref's lock and also the space ref's lock while it replaces the record, so no fenced write
can sit between its check and its ref update across a new grant; renewals and releases keep
holder and generation and lock the lease ref only. A lock held by someone else is retried with
back-off for `lock_timeout` seconds, then `StoreUnavailable` names the lock file (a writer killed
mid-update can leave one behind; it is never removed automatically, since nothing proves it
abandoned). Objects and refs are fsynced before an append returns (`durable=True`, the default,
turns on libgit2's process-wide `GIT_OPT_ENABLE_FSYNC_GITDIR`). `git gc` may run beside writers;
`git gc --prune=now` / `git prune --expire=now` may not (as for any git writer: they delete
objects written but not yet referenced).

Opening: a missing path or an empty directory becomes a new bare repository; an existing
repository (bare, or a work tree with `.git`) is used as is; anything else (a file, a non-empty
directory that is not a repository) raises `StoreUnavailable`. Parent directories are never
searched for a repository.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import pygit2
from pygit2.enums import FileMode, ObjectType, RepositoryOpenFlag

from shard_sql._git_errors import GIT_ERRORS as _GIT_ERRORS
from shard_sql._git_errors import guarded as _guarded
from shard_sql._git_errors import guarded_iter as _guarded_iter
from shard_sql._git_errors import translate as _translate
from shard_sql._git_intents import GitIntents
from shard_sql.errors import LeaseHeld, SeqConflict, ShardSqlError, StaleLease, StoreUnavailable
from shard_sql.memory import check_ttl
from shard_sql.store import LeaseStore, StoreBase, already_written, check_fence, stamp, system_clock
from shard_sql.validation import Pending, check_seq, check_space
from shard_sql.values import Event, Lease

NAMESPACE = "refs/shard-sql/"
SPACES = NAMESPACE + "spaces/"
LEASES = NAMESPACE + "leases/"
CHUNK = 256
"""Seqs per `index/` blob: the tip's tree indexes whole chunks; at most CHUNK commits are walked."""
PIECE = 100
"""Longest path component of an encoded name (before its `+`)."""
MAX_READABLE = 900
"""Longest readable encoding; libgit2 takes ref names of at most 1023 bytes."""
HASHED = "="
"""Marks the encoding of a name too long to spell out: `=` and the SHA-256 of its UTF-8."""
INTENTS = "intents-"
"""Tip tree entries `intents-<h[:2]>/<h[2:]>.<seq>` (empty blobs) index the intent ids."""
EMPTY_BLOB = "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"
TRAILER = b"Shard-Sql-Event: "
IDENT = "shard-sql@invalid"

_SAFE = frozenset(b"abcdefghijklmnopqrstuvwxyz0123456789-_")
_HEX = frozenset("0123456789abcdef")

P = ParamSpec("P")
R = TypeVar("R")
_T = TypeVar("_T", "_Tip", Lease)


# -- names ---------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)
def encode_name(name: str) -> str:
    """The ref path of a space name (below `spaces/` or `leases/`); see the module docstring."""
    text = "".join(chr(b) if b in _SAFE else f"%{b:02x}" for b in name.encode("utf-8"))
    pieces: list[str] = []
    start = 0
    while len(text) - start > PIECE:
        end = start + PIECE
        if text[end - 1] == "%":
            end -= 1
        elif text[end - 2] == "%":
            end -= 2
        pieces.append(text[start:end] + "+")
        start = end
    pieces.append(text[start:])
    path = "/".join(pieces)
    if len(path) > MAX_READABLE:
        return HASHED + hashlib.sha256(name.encode("utf-8")).hexdigest()
    return path


def decode_name(path: str) -> str | None:
    """The space name of an encoded ref path, or None if it is not one `encode_name` makes.

    A hashed encoding (a long name) cannot be decoded from the ref alone: None as well.
    """
    parts = path.split("/")
    if any(not p.endswith("+") for p in parts[:-1]) or not parts[-1] or parts[-1].endswith("+"):
        return None
    text = "".join(p[:-1] for p in parts[:-1]) + parts[-1]
    out = bytearray()
    i = 0
    while i < len(text):
        c = text[i]
        if c == "%":
            code = text[i + 1 : i + 3]
            if len(code) != 2 or not set(code) <= _HEX:
                return None
            out.append(int(code, 16))
            i += 3
        else:
            out += c.encode("ascii", "replace")
            i += 1
    try:
        name = out.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return name if encode_name(name) == path else None


def space_ref(space: str) -> str:
    return SPACES + encode_name(space)


def lease_ref(space: str) -> str:
    return LEASES + encode_name(space)


def intent_path(intent_id: str) -> tuple[str, str]:
    """Where the tip's tree records `intent_id`: `intents-<first>/<rest>.<seq>`."""
    h = hashlib.sha256(intent_id.encode("utf-8")).hexdigest()
    return h[:2], h[2:]


# -- commits -------------------------------------------------------------------------------------


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
class _Commit:
    tree: str
    parent: str | None
    payload: bytes
    meta: bytes


def _split(data: bytes) -> _Commit:
    head, sep, message = data.partition(b"\n\n")
    lines = head.split(b"\n")
    body = message.split(b"\n")
    if (
        not sep
        or not lines[0].startswith(b"tree ")
        or len(body) != 6
        or body[1]
        or body[3]
        or body[5]
        or not body[4].startswith(TRAILER)
    ):
        raise StoreUnavailable("not a shard-sql event commit (malformed message)")
    parent = lines[1][7:].decode("ascii") if lines[1].startswith(b"parent ") else None
    return _Commit(lines[0][5:].decode("ascii"), parent, body[2], body[4][len(TRAILER) :])


def _parent_of(data: bytes) -> str | None:
    second = data.split(b"\n", 2)[1]
    return second[7:].decode("ascii") if second.startswith(b"parent ") else None


def _event(space: str, seq: int, c: _Commit) -> Event:
    meta = json.loads(c.meta)
    if meta.get("space") != space or meta.get("seq") != seq:
        raise StoreUnavailable(
            f"space {space!r}: the commit at seq {seq} belongs to "
            f"{meta.get('space')!r} seq {meta.get('seq')!r}; the chain is corrupt"
        )
    payload = json.loads(c.payload)
    if not isinstance(payload, dict):
        raise StoreUnavailable(f"space {space!r}: the payload at seq {seq} is not an object")
    return Event(
        space,
        seq,
        meta["type"],
        payload,
        datetime.fromisoformat(meta["recorded_at"]),
        meta["writer"],
        meta["generation"],
        meta["intent_id"],
    )


@dataclass(frozen=True, slots=True)
class _Tip:
    oid: str
    seq: int
    tree: str


# -- leases --------------------------------------------------------------------------------------


def _lease_bytes(lease: Lease) -> bytes:
    record = {
        "space": lease.space,
        "holder": lease.holder,
        "expires_at": lease.expires_at.isoformat(),
        "generation": lease.generation,
    }
    return (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode()


def _lease_of(space: str, data: bytes) -> Lease:
    record = json.loads(data)
    holder, expires, generation = record["holder"], record["expires_at"], record["generation"]
    if (
        record.get("space") != space
        or not isinstance(holder, str)
        or not isinstance(expires, str)
        or not isinstance(generation, int)
    ):
        raise StoreUnavailable(f"the lease record of {space!r} is corrupt")
    expires_at = datetime.fromisoformat(expires)
    if expires_at.tzinfo is None:
        raise StoreUnavailable(f"the lease record of {space!r} is corrupt")
    return Lease(space, holder, expires_at, generation)


# -- object writes -------------------------------------------------------------------------------

OBJECT_RETRIES = 5
_BUSY = ("failed to lock", "File exists", "No such file or directory")


def _write_object(write: Callable[[], Any]) -> str:
    """Write one object, retrying a failure: `git gc` may remove an empty `objects/xx/` between
    libgit2's mkdir and its rename into it. Objects are content-addressed, so a retry is
    idempotent; a lasting failure is raised after the last attempt."""
    for attempt in range(OBJECT_RETRIES):
        try:
            return str(write())
        except (OSError, pygit2.GitError):
            if attempt == OBJECT_RETRIES - 1:
                raise
            time.sleep(0.001 * (attempt + 1))
    raise AssertionError("unreachable")


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- the store -----------------------------------------------------------------------------------


class _Reader:
    """Repository handles for one long read, each used for `RECYCLE` objects, then freed."""

    RECYCLE = 16 * CHUNK

    def __init__(self, gitdir: str) -> None:
        self.gitdir = gitdir
        self.handle: Any = None
        self.reads = 0

    def repo(self, reads: int) -> Any:
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


class _Locked:
    """A libgit2 ref transaction holding one ref's lock (`<ref>.lock`) until `free`."""

    def __init__(self, tx: Any, ref: str, read: Callable[[], str | None]) -> None:
        self.tx = tx
        self.ref = ref
        self.read = read

    def set(self, target: str, message: str) -> None:
        self.tx.set_target(self.ref, pygit2.Oid(hex=target), None, message)
        try:
            self.tx.commit()
        except pygit2.GitError:
            # libgit2 fsyncs the ref's directory after its rename; if `git pack-refs` has packed
            # the new ref and pruned that directory meanwhile, it reports a failure although the
            # ref was written (and is now packed, made durable by git). Only that is success.
            if self.read() != target:
                raise

    def free(self) -> None:
        # Exiting with an exception type frees the transaction without committing it; a ref
        # still locked is unlocked unchanged.
        self.tx.__exit__(RuntimeError, None, None)


class GitEventStore(StoreBase, LeaseStore, GitIntents):
    """Events and leases in a git repository, shared by every process that opens it.

    `lock_timeout`: how long a write waits for a ref lock held by another writer before raising
    `StoreUnavailable`. `durable`: fsync objects and refs before a write returns (process-wide
    libgit2 setting; never turned off again once on).
    """

    def __init__(
        self, path: str | os.PathLike[str], *, lock_timeout: float = 10.0, durable: bool = True
    ) -> None:
        self.path = Path(path)
        self.lock_timeout = float(lock_timeout)
        self.durable = durable
        self._local = threading.local()
        self._repos: list[Any] = []
        self._guard = threading.Lock()
        self._closed = False
        self._parsed: dict[tuple[str, str], _Tip | Lease] = {}
        self._synced: set[str] = set()
        if durable:
            pygit2.settings.enable_fsync_gitdir(True)
        repo = self._open_or_create()
        self._gitdir: str = repo.path
        self._local.repo = repo
        self._repos.append(repo)
        self._init_intents()

    def __repr__(self) -> str:
        return f"GitEventStore({str(self.path)!r})"

    # -- opening -----------------------------------------------------------------------------

    def _open_or_create(self) -> Any:
        path = self.path
        try:
            if not path.exists():
                if path.is_symlink():
                    raise StoreUnavailable(f"{path} is a dangling symbolic link")
                return pygit2.init_repository(str(path), bare=True)
            if not path.is_dir():
                raise StoreUnavailable(f"{path} is a file, not a git repository")
            try:
                return pygit2.Repository(str(path), RepositoryOpenFlag.NO_SEARCH)
            except pygit2.GitError:
                if any(path.iterdir()):
                    raise StoreUnavailable(
                        f"{path} is a non-empty directory but not a git repository; "
                        "give an existing repository, an empty directory or a new path"
                    ) from None
                return pygit2.init_repository(str(path), bare=True)
        except ShardSqlError:
            raise
        except _GIT_ERRORS as e:
            raise _translate(self, e) from e

    def _repo(self) -> Any:
        """This thread's handle on the repository (libgit2 handles are not shared by threads)."""
        if self._closed:
            raise StoreUnavailable(f"git store {self.path} is closed")
        repo = getattr(self._local, "repo", None)
        if repo is None:
            repo = pygit2.Repository(self._gitdir, RepositoryOpenFlag.NO_SEARCH)
            with self._guard:
                self._repos.append(repo)
            self._local.repo = repo
        return repo

    def close(self) -> None:
        """Release the repository handles; later calls raise `StoreUnavailable`."""
        with self._guard:
            self._closed = True
            repos, self._repos = self._repos, []
        for repo in repos:
            repo.free()
        self._local = threading.local()

    def __enter__(self) -> GitEventStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- ref locks ---------------------------------------------------------------------------

    def _lock(self, repo: Any, ref: str, deadline: float) -> _Locked:
        """Take `ref`'s lock, retrying while another writer holds it, until `deadline`."""
        backoff = 0.0005
        while True:
            tx = repo.transaction()
            try:
                tx.lock_ref(ref)
                return _Locked(tx, ref, functools.partial(self._target, repo, ref))
            except pygit2.GitError as e:
                tx.__exit__(RuntimeError, None, None)
                # libgit2 reports an existing `<ref>.lock` (O_EXCL) in one of the first two
                # ways; the third is `git pack-refs` removing an empty directory meanwhile.
                if not any(m in str(e) for m in _BUSY):
                    raise
            if time.monotonic() >= deadline:
                lock = os.path.join(self._gitdir, ref + ".lock")
                raise StoreUnavailable(
                    f"git store {self.path}: {ref} stayed locked for {self.lock_timeout}s; "
                    f"if no writer is running, a crashed one left {lock} behind: remove it"
                )
            time.sleep(backoff * random.uniform(0.5, 1.5))
            backoff = min(backoff * 2, 0.02)

    # -- durability --------------------------------------------------------------------------

    def _put(self, repo: Any, write: Callable[[], Any]) -> str:
        """Write an object; with `durable`, make a fan-out directory new to this process durable
        too (libgit2 fsyncs the object file and `objects/xx/`, not the entry of `xx` itself)."""
        oid = _write_object(write)
        if self.durable and oid[:2] not in self._synced:
            _fsync_dir(os.path.join(self._gitdir, "objects"))
            self._synced.add(oid[:2])
        return oid

    def _settle_ref(self, ref: str) -> None:
        """Make the directories leading to `ref` durable (once per process and directory)."""
        if not self.durable:
            return
        parts = ref.split("/")[:-1]
        for n in range(2, len(parts) + 1):
            directory = "/".join(parts[:n])
            if directory not in self._synced:
                _fsync_dir(os.path.join(self._gitdir, *parts[: n - 1]))
                self._synced.add(directory)

    # -- reading -----------------------------------------------------------------------------

    def _target(self, repo: Any, ref: str) -> str | None:
        found = repo.references.get(ref)
        if found is None:
            return None
        target = found.target
        if not isinstance(target, pygit2.Oid):
            raise StoreUnavailable(f"{ref} is a symbolic ref, not a shard-sql ref")
        return str(target)

    def _read(self, repo: Any, oid: str, kind: int) -> bytes:
        obj_type, data = repo.odb.read(oid)[:2]
        if obj_type != kind:
            raise StoreUnavailable(f"object {oid} is a {obj_type!r}, expected {kind!r}")
        return bytes(data)

    def _tip(self, repo: Any, space: str) -> _Tip | None:
        oid = self._target(repo, space_ref(space))
        if oid is None:
            return None
        key = (space, oid)
        tip = self._parsed.get(key)
        if isinstance(tip, _Tip):
            return tip
        c = _split(self._read(repo, oid, ObjectType.COMMIT))
        meta = json.loads(c.meta)
        seq = meta.get("seq")
        if meta.get("space") != space or not isinstance(seq, int) or seq < 0:
            raise StoreUnavailable(f"space {space!r}: the tip commit {oid} is corrupt")
        return self._remember(key, _Tip(oid, seq, c.tree))

    def _remember(self, key: tuple[str, str], value: _T) -> _T:
        """Cache what an object says (objects never change: the id names the content)."""
        if len(self._parsed) >= 4096:
            self._parsed.clear()
        self._parsed[key] = value
        return value

    def _chunk(self, repo: Any, tip: _Tip, start: int) -> list[str]:
        tree = repo[tip.tree]
        data = tree[f"index/{start:012d}"].data
        oids: list[str] = data.decode("ascii").split("\n")
        if len(oids) != CHUNK + 1 or oids[-1]:
            raise StoreUnavailable(f"the index chunk at seq {start} is malformed")
        return oids[:-1]

    def _range(self, space: str, tip: _Tip, start: int, stop: int) -> Iterator[Event]:
        """Events `start .. stop - 1` of the chain ending at `tip`, in seq order.

        A long read uses handles of its own, renewed every `RECYCLE` objects: libgit2 caches
        what a handle reads (up to 256 MB), and a stream of a million events must not keep them.
        """
        stop = min(stop, tip.seq + 1)
        reader = _Reader(self._gitdir) if stop - start > CHUNK else None
        try:
            yield from self._read_range(space, tip, start, stop, reader)
        finally:
            if reader is not None:
                reader.close()

    def _read_range(
        self, space: str, tip: _Tip, start: int, stop: int, reader: _Reader | None
    ) -> Iterator[Event]:
        tail = tip.seq - tip.seq % CHUNK  # seqs below `tail` are indexed by the tip's tree
        seq = start
        while seq < min(stop, tail):
            repo = reader.repo(CHUNK) if reader else self._repo()
            base = seq - seq % CHUNK
            oids = self._chunk(repo, tip, base)
            end = min(stop, base + CHUNK)
            for s in range(seq, end):
                data = self._read(repo, oids[s - base], ObjectType.COMMIT)
                yield _event(space, s, _split(data))
            seq = end
        if seq < stop:
            repo = reader.repo(CHUNK) if reader else self._repo()
            walked: list[bytes] = []
            oid: str | None = tip.oid
            for _ in range(tip.seq - seq + 1):
                if oid is None:
                    raise StoreUnavailable(f"space {space!r}: the chain is shorter than its seq")
                data = self._read(repo, oid, ObjectType.COMMIT)
                walked.append(data)
                oid = _parent_of(data)
            for s in range(seq, stop):
                yield _event(space, s, _split(walked[tip.seq - s]))

    def _event_at(self, space: str, tip: _Tip, seq: int) -> Event:
        for e in self._range(space, tip, seq, seq + 1):
            return e
        raise StoreUnavailable(f"space {space!r} has no seq {seq}")

    def _find_intent(self, space: str, tip: _Tip | None, intent_id: str) -> Event | None:
        if tip is None:
            return None
        repo = self._repo()
        first, rest = intent_path(intent_id)
        try:
            leaf = repo[tip.tree][INTENTS + first]
        except KeyError:
            return None
        # Entries `<rest>.<seq>` are sorted by name: binary search for the `<rest>.` prefix.
        key = rest + "."
        lo, hi = 0, len(leaf)
        while lo < hi:
            mid = (lo + hi) // 2
            if leaf[mid].name < key:
                lo = mid + 1
            else:
                hi = mid
        if lo == len(leaf) or not leaf[lo].name.startswith(key):
            return None
        event = self._event_at(space, tip, int(leaf[lo].name[len(key) :]))
        if event.intent_id != intent_id:
            raise StoreUnavailable(
                f"space {space!r}: the intent index points {intent_id!r} at another event"
            )
        return event

    @_guarded
    def events(self, space: str, *, from_seq: int = 0, limit: int | None = None) -> list[Event]:
        check_space(space)
        check_seq("from_seq", from_seq)
        stop = None if limit is None else from_seq + check_seq("limit", limit)
        tip = self._tip(self._repo(), space)
        if tip is None:
            return []
        return list(self._range(space, tip, from_seq, tip.seq + 1 if stop is None else stop))

    def iter_events(self, space: str, *, from_seq: int = 0) -> Iterator[Event]:
        check_space(space)
        check_seq("from_seq", from_seq)
        return _guarded_iter(self, self._iter(space, from_seq))

    def _iter(self, space: str, from_seq: int) -> Iterator[Event]:
        tip = self._tip(self._repo(), space)
        if tip is not None:
            yield from self._range(space, tip, from_seq, tip.seq + 1)

    @_guarded
    def head(self, space: str) -> int:
        check_space(space)
        tip = self._tip(self._repo(), space)
        return 0 if tip is None else tip.seq + 1

    @_guarded
    def spaces(self) -> list[str]:
        repo = self._repo()
        names = []
        for ref in repo.references:
            if not ref.startswith(SPACES):
                continue
            path = ref[len(SPACES) :]
            if path.startswith(HASHED):
                # A long name is spelled out in its events only: read it from the tip.
                oid = self._target(repo, ref)
                if oid is None:
                    continue
                meta = json.loads(_split(self._read(repo, oid, ObjectType.COMMIT)).meta)
                name = meta.get("space")
                if not isinstance(name, str) or encode_name(name) != path:
                    continue
            else:
                name = decode_name(path)
            if name is not None:
                names.append(name)
        return sorted(names)

    # -- writing -----------------------------------------------------------------------------

    @_guarded
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
        repo = self._repo()
        fenced = fence is not None and verify_fence
        deadline = time.monotonic() + self.lock_timeout
        while True:
            # Read and check without locks first: every refusal found here is final (heads and
            # generations only grow); the checks are repeated under the locks below.
            tip = self._tip(repo, space)
            found = [
                self._find_intent(space, tip, p.intent_id) if p.intent_id else None for p in batch
            ]
            done = already_written(found)
            if done is not None:
                return done
            if fenced:
                check_fence(fence, self._lease_record(repo, space))
            head = 0 if tip is None else tip.seq + 1
            if head != expected_seq:
                raise SeqConflict(space, expected_seq, head)
            if not batch:
                return []
            out = [stamp(space, expected_seq + n, p, fence, now) for n, p in enumerate(batch)]
            new = self._commits(repo, tip, batch, out)
            if self._swap(repo, space, fenced, fence, tip, new.oid, deadline):
                self._remember((space, new.oid), new)
                return out

    def _swap(
        self,
        repo: Any,
        space: str,
        fenced: bool,
        fence: Lease | None,
        tip: _Tip | None,
        new: str,
        deadline: float,
    ) -> bool:
        """Move the space ref from `tip` to `new` under its lock, the fence checked under it.

        A lease changes hands (a new generation) only under the same space ref lock (see
        `_lease_update`), so the grant read here stays current until the ref has moved.
        False when another writer moved the tip since it was read: the caller re-checks.
        """
        sref = space_ref(space)
        locked = self._lock(repo, sref, deadline)
        try:
            if self._target(repo, sref) != (tip.oid if tip else None):
                return False
            if fenced:
                check_fence(fence, self._lease_record(repo, space))
            locked.set(new, f"shard-sql: append to {_oneline(space)}")
        finally:
            locked.free()
        self._settle_ref(sref)
        return True

    def _commits(
        self, repo: Any, tip: _Tip | None, batch: Sequence[Pending], out: Sequence[Event]
    ) -> _Tip:
        """Write the batch's commits; return the new tip. Only the last gets the new tree."""
        parent = tip.oid if tip else None
        base = tip.tree if tip else self._empty(repo)
        made: list[str] = []
        tree = base
        for n, (p, e) in enumerate(zip(batch, out, strict=True)):
            tree = self._next_tree(repo, tip, base, out, made) if n == len(out) - 1 else base
            data = commit_bytes(tree, parent, e, p.payload_json)
            parent = self._put(repo, functools.partial(repo.odb.write, ObjectType.COMMIT, data))
            made.append(parent)
        assert parent is not None
        return _Tip(parent, out[-1].seq, tree)

    def _empty(self, repo: Any) -> str:
        # Written (or freshened) each time: a cached id could outlive a pruned object.
        return self._put(repo, repo.TreeBuilder().write)

    def _next_tree(
        self, repo: Any, tip: _Tip | None, base: str, out: Sequence[Event], made: list[str]
    ) -> str:
        """The tip tree after `out`: `base` plus the batch's intents and newly complete chunks.

        `made` holds the commits of `out[:-1]`.
        """
        last = out[-1].seq
        old = tip.seq // CHUNK if tip else 0
        chunks = range(old, last // CHUNK)
        intents = [(e.intent_id, e.seq) for e in out if e.intent_id is not None]
        if not chunks and not intents:
            return base
        root = repo.TreeBuilder(repo[base])
        if chunks:
            known = self._chain_oids(repo, tip, chunks.start * CHUNK) + made
            index = self._subtree(repo, root, "index")
            for k in chunks:
                lines = known[k * CHUNK - chunks.start * CHUNK :][:CHUNK]
                text = ("\n".join(lines) + "\n").encode("ascii")
                blob = self._put(repo, functools.partial(repo.create_blob, text))
                index.insert(f"{k * CHUNK:012d}", blob, FileMode.BLOB)
            root.insert("index", self._put(repo, index.write), FileMode.TREE)
        if intents:
            # The empty blob stays reachable (so safe from gc) once the tip indexes an intent;
            # before that it is written (or freshened) like any new object.
            if any(e.name.startswith(INTENTS) for e in repo[base]):
                empty = EMPTY_BLOB
            else:
                empty = self._put(repo, functools.partial(repo.create_blob, b""))
            groups: dict[str, list[tuple[str, int]]] = {}
            for intent_id, seq in intents:
                first, rest = intent_path(intent_id)
                groups.setdefault(first, []).append((rest, seq))
            for first, items in groups.items():
                leaf = self._subtree(repo, root, INTENTS + first)
                for rest, seq in items:
                    leaf.insert(f"{rest}.{seq}", empty, FileMode.BLOB)
                root.insert(INTENTS + first, self._put(repo, leaf.write), FileMode.TREE)
        return self._put(repo, root.write)

    @staticmethod
    def _subtree(repo: Any, parent: Any, name: str) -> Any:
        entry = parent.get(name)
        return repo.TreeBuilder(repo[entry.id]) if entry is not None else repo.TreeBuilder()

    def _chain_oids(self, repo: Any, tip: _Tip | None, start: int) -> list[str]:
        """The commit ids of seqs `start .. tip.seq`, walking back from the tip."""
        if tip is None or start > tip.seq:
            return []
        oids: list[str] = []
        oid: str | None = tip.oid
        for _ in range(tip.seq - start + 1):
            if oid is None:
                raise StoreUnavailable("the chain is shorter than its seq")
            oids.append(oid)
            oid = _parent_of(self._read(repo, oid, ObjectType.COMMIT))
        oids.reverse()
        return oids

    # -- leases (LeaseStore) -----------------------------------------------------------------

    def _lease_record(self, repo: Any, space: str) -> Lease | None:
        oid = self._target(repo, lease_ref(space))
        if oid is None:
            return None
        key = (space, oid)
        lease = self._parsed.get(key)
        if isinstance(lease, Lease):
            return lease
        return self._remember(key, _lease_of(space, self._read(repo, oid, ObjectType.BLOB)))

    def _lease_update(self, space: str, change: Callable[[Lease | None], Lease | None]) -> None:
        """Run `change` on the current record under the lease ref's lock; store what it returns.

        A new grant or a revocation (the holder or generation changes) also holds the space ref's
        lock while the record is replaced, so no fenced write is between its check and its ref
        update meanwhile. Renewals and releases keep holder and generation: they do not.
        """
        repo = self._repo()
        deadline = time.monotonic() + self.lock_timeout
        locked = self._lock(repo, lease_ref(space), deadline)
        try:
            cur = self._lease_record(repo, space)
            new = change(cur)
            if new is None:
                return
            blob = self._put(repo, functools.partial(repo.create_blob, _lease_bytes(new)))
            message = f"shard-sql: lease {_oneline(new.holder)} #{new.generation}"
            if cur is not None and (cur.holder, cur.generation) == (new.holder, new.generation):
                locked.set(blob, message)
            else:
                writes = self._lock(repo, space_ref(space), deadline)
                try:
                    locked.set(blob, message)
                finally:
                    writes.free()
        finally:
            locked.free()
        self._settle_ref(lease_ref(space))

    @_guarded
    def lease_acquire(self, space: str, holder: str, ttl_seconds: float, now: datetime) -> Lease:
        check_space(space)
        expires = now + timedelta(seconds=check_ttl(ttl_seconds))
        granted: list[Lease] = []

        def change(cur: Lease | None) -> Lease:
            if cur is not None and cur.valid_at(now):
                if cur.holder != holder:
                    raise LeaseHeld(cur)
                new = Lease(space, holder, max(expires, cur.expires_at), cur.generation)
            else:
                new = Lease(space, holder, expires, (cur.generation if cur else 0) + 1)
            granted.append(new)
            return new

        self._lease_update(space, change)
        return granted[0]

    @_guarded
    def lease_renew(self, lease: Lease, ttl_seconds: float, now: datetime) -> Lease:
        check_space(lease.space)
        expires = now + timedelta(seconds=check_ttl(ttl_seconds))
        renewed: list[Lease] = []

        def change(cur: Lease | None) -> Lease:
            if (
                cur is None
                or (cur.holder, cur.generation) != (lease.holder, lease.generation)
                or not cur.valid_at(now)
            ):
                raise StaleLease(lease, "lost before renewal")
            new = Lease(lease.space, lease.holder, max(expires, cur.expires_at), cur.generation)
            renewed.append(new)
            return new

        self._lease_update(lease.space, change)
        return renewed[0]

    @_guarded
    def lease_release(self, lease: Lease, now: datetime) -> None:
        check_space(lease.space)

        def change(cur: Lease | None) -> Lease | None:
            if cur is None or (cur.holder, cur.generation) != (lease.holder, lease.generation):
                return None
            return Lease(lease.space, lease.holder, min(now, cur.expires_at), cur.generation)

        self._lease_update(lease.space, change)

    @_guarded
    def lease_current(self, space: str, now: datetime) -> Lease | None:
        check_space(space)
        cur = self._lease_record(self._repo(), space)
        return cur if cur is not None and cur.valid_at(now) else None

    @_guarded
    def lease_revoke(self, space: str, now: datetime) -> Lease | None:
        check_space(space)
        revoked: list[Lease] = []

        def change(cur: Lease | None) -> Lease | None:
            if cur is None:
                return None
            new = Lease(space, cur.holder, min(now, cur.expires_at), cur.generation + 1)
            revoked.append(new)
            return new

        self._lease_update(space, change)
        return revoked[0] if revoked else None


__all__ = ["GitEventStore", "decode_name", "encode_name"]
