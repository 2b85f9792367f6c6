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

Atomicity across processes comes from git's own ref locks (`<ref>.lock`, created only if absent,
honoured by stock git and libgit2 too). An append prepares its objects, then locks the space ref,
re-reads under the lock that the tip is still the expected commit and (when fenced) that the
lease ref still holds the fence's holder and generation, and moves the space ref. A lease update
that changes holder or generation (a new grant, a revocation) holds the lease ref's lock and also
the space ref's lock while it replaces the record, so no fenced write can sit between its check
and its ref update across a new grant; renewals and releases keep holder and generation and lock
the lease ref only. A lock held by someone else is retried with back-off for `lock_timeout`
seconds, then `StoreUnavailable` names the lock file (a writer killed mid-update can leave one
behind; it is never removed automatically, since nothing proves it abandoned).

Durability (`durable=True`, the default): objects and refs are fsynced before an append returns.
Objects are written by this module as git writes loose objects (zlib, a temporary file renamed
into `objects/xx/`), not by libgit2, whose fsync switch is process-wide and fsyncs each object
and its directory in a row: here a write's objects, their directories and the ref's new content
(staged in `<ref>.<random>.lock`) are fsynced in one round of concurrent fsyncs, then the lock is
taken (a hard link of the staged file to `<ref>.lock`), the checks made, the lock renamed over the
ref and the directory fsynced: two rounds per write, whatever its size, and the lock held for one
(libgit2: two fsyncs per object, then two more under the lock). libgit2's
`GIT_OPT_ENABLE_FSYNC_GITDIR` is still turned on for whatever else it writes. `git gc` may run
beside writers; `git gc --prune=now` / `git prune --expire=now` may not (as for any git writer:
they delete objects written but not yet referenced).

Opening: a missing path or an empty directory becomes a new bare repository; an existing
repository (bare, or a work tree with `.git`) is used as is; anything else (a file, a non-empty
directory that is not a repository) raises `StoreUnavailable`. Parent directories are never
searched for a repository.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import hashlib
import json
import os
import random
import re
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import pygit2
from pygit2.enums import ObjectType, RepositoryOpenFlag

from shard_sql._git_errors import GIT_ERRORS as _GIT_ERRORS
from shard_sql._git_errors import guarded as _guarded
from shard_sql._git_errors import guarded_iter as _guarded_iter
from shard_sql._git_errors import translate as _translate
from shard_sql._git_intents import GitIntents
from shard_sql.errors import LeaseHeld, SeqConflict, ShardSqlError, StaleLease, StoreUnavailable
from shard_sql.leases import check_fence, check_ttl
from shard_sql.ports import LeaseStore, system_clock
from shard_sql.store_base import StoreBase, already_written, stamp
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
_KIND: dict[int, bytes] = {
    ObjectType.COMMIT: b"commit",
    ObjectType.TREE: b"tree",
    ObjectType.BLOB: b"blob",
}
_TREE_MODE = b"40000"
_BLOB_MODE = b"100644"
_ENTRY = re.compile(rb"([0-7]{5,6}) ([^\0/]+)\0(.{20})", re.DOTALL)
_EMPTY_RAW = bytes.fromhex(EMPTY_BLOB)
_LEAF_END = b"\0" + _EMPTY_RAW
"""How every entry of an `intents-xx` tree ends (all name the empty blob): `split` finds them."""
FRESHEN_AFTER = 3600.0
"""Seconds: an object found written already gets a new mtime when its own is older than this, so
that `git gc` (which prunes unreferenced loose objects weeks old) sees it as new, as git does."""
SYNC_THREADS = 8
"""Threads that issue the fsyncs of one write together (ext4 commits them in one transaction)."""

_sync_pool: tuple[int, ThreadPoolExecutor] | None = None
_sync_pool_lock = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    """The process's fsync threads (anew in a forked child: the parent's threads are not there)."""
    global _sync_pool
    with _sync_pool_lock:
        if _sync_pool is None or _sync_pool[0] != os.getpid():
            pool = ThreadPoolExecutor(SYNC_THREADS, thread_name_prefix="shard-sql-git-fsync")
            _sync_pool = (os.getpid(), pool)
        return _sync_pool[1]


def _all_at_once(calls: Sequence[Callable[[], object]]) -> None:
    """Run `calls` (fsyncs) concurrently: the first in this thread, the rest in the pool; raise
    the first failure once all have ended."""
    if not calls:
        return
    futures = [_pool().submit(c) for c in calls[1:]]
    error: BaseException | None = None
    try:
        calls[0]()
    except BaseException as e:
        error = e
    for f in futures:
        try:
            f.result()
        except BaseException as e:
            error = error or e
    if error is not None:
        raise error


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_close(fd: int) -> None:
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Objects:
    """The loose objects of one write, written without fsync; `sync` then makes them durable
    with their fan-out directories in one round of concurrent fsyncs, instead of libgit2's two
    fsyncs in a row per object (libgit2's fsync setting is process-wide, so objects are written
    here, in git's own format: zlib of `<kind> <size>\\0<data>` at `objects/xx/<rest of id>`).

    `durable=False`: nothing is synced (intent records, see `shard_sql._git_intents`).
    """

    def __init__(self, objects: str, synced: set[str], durable: bool) -> None:
        self.objects = objects
        self.synced = synced
        self.durable = durable
        self.fds: list[int] = []
        self.dirs: set[str] = set()
        self.fanouts: set[str] = set()

    def put(self, kind: int, data: bytes) -> str:
        """Write one object (or freshen it if present) and return its id.

        `git gc` may remove an empty `objects/xx/` between the mkdir and the file's creation:
        retried (objects are content-addressed, so a retry is idempotent).
        """
        head = b"%s %d\0" % (_KIND[kind], len(data))
        oid = hashlib.sha1(head + data).hexdigest()  # git's object ids
        fan = os.path.join(self.objects, oid[:2])
        path = os.path.join(fan, oid[2:])
        body: bytes | None = None
        for attempt in range(OBJECT_RETRIES):
            try:
                if self._present(path):
                    self._track(oid, fan, path)
                    return oid
                if body is None:
                    body = zlib.compress(head + data, 1)
                with contextlib.suppress(FileExistsError):
                    os.mkdir(fan)
                self._create(fan, path, body, oid)
                return oid
            except (FileNotFoundError, NotADirectoryError):
                if attempt == OBJECT_RETRIES - 1:
                    raise
                time.sleep(0.001 * (attempt + 1))
        raise AssertionError("unreachable")

    @staticmethod
    def _present(path: str) -> bool:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return False
        if time.time() - st.st_mtime > FRESHEN_AFTER:
            with contextlib.suppress(OSError):
                os.utime(path)
        return True

    def _create(self, fan: str, path: str, body: bytes, oid: str) -> None:
        tmp = os.path.join(fan, f"tmp_obj_{os.getpid()}_{random.getrandbits(64):016x}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444)
        try:
            view = memoryview(body)
            while view:
                view = view[os.write(fd, view) :]
            os.rename(tmp, path)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        if self.durable:
            self.fds.append(fd)
            self._dir(oid, fan)
        else:
            os.close(fd)

    def _track(self, oid: str, fan: str, path: str) -> None:
        """An object present already may not be durable yet (its writer may not have synced
        it): synced with the others."""
        if self.durable:
            self.fds.append(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
            self._dir(oid, fan)

    def _dir(self, oid: str, fan: str) -> None:
        self.dirs.add(fan)
        if oid[:2] not in self.synced:
            self.fanouts.add(oid[:2])  # `objects/` holds an entry for it this process never synced

    def sync(self, *also: int) -> None:
        """Make every object written so far durable, and the files `also` (fsyncs issued
        together; nothing without `durable`)."""
        if not self.durable:
            return
        fds, self.fds = self.fds, []
        calls: list[Callable[[], object]] = [functools.partial(_fsync_close, fd) for fd in fds]
        calls += [functools.partial(os.fsync, fd) for fd in also]
        calls += [functools.partial(_fsync_dir, d) for d in sorted(self.dirs)]
        if self.fanouts:
            calls.append(functools.partial(_fsync_dir, self.objects))
        _all_at_once(calls)
        self.synced.update(self.fanouts)
        self.dirs.clear()
        self.fanouts.clear()

    def close(self) -> None:
        """Drop what was not synced (a write given up)."""
        fds, self.fds = self.fds, []
        for fd in fds:
            os.close(fd)


def _tree_entries(data: bytes) -> dict[bytes, tuple[bytes, bytes]]:
    """The entries of a raw tree object: name -> (mode, raw id)."""
    entries: dict[bytes, tuple[bytes, bytes]] = {}
    at = 0
    for m in _ENTRY.finditer(data):
        if m.start() != at:
            break
        entries[m[2]] = (m[1], m[3])
        at = m.end()
    if at != len(data):
        raise StoreUnavailable("a tree object is malformed")
    return entries


def _tree_bytes(entries: dict[bytes, tuple[bytes, bytes]]) -> bytes:
    """The raw tree object of `entries`, in git's order (a tree sorts as its name plus `/`)."""
    names = sorted(entries, key=lambda n: n + b"/" if entries[n][0] == _TREE_MODE else n)
    return b"".join(b"%s %s\0%s" % (entries[n][0], n, entries[n][1]) for n in names)


def _leaf_with(data: bytes, names: Sequence[bytes]) -> bytes:
    """An `intents-xx` tree (every entry an empty blob) with the entries `names` added.

    Its entries are found by splitting at their common end, not parsed one by one: a write costs
    O(entries) in C, as in libgit2, however large the leaf has grown."""
    head = _BLOB_MODE + b" "
    if not data:
        items: list[bytes] = []
    elif (
        data.startswith(head)
        and data.endswith(_LEAF_END)
        and data.count(b"\0") == data.count(_LEAF_END) == data.count(_LEAF_END + head) + 1
    ):
        items = data[: -len(_LEAF_END)].split(_LEAF_END)
    else:  # not all `100644` empty blobs (written by hand?): the general way
        entries = _tree_entries(data)
        for name in names:
            entries[name] = (_BLOB_MODE, _EMPTY_RAW)
        return _tree_bytes(entries)
    for name in names:
        item = head + name
        at = bisect.bisect_left(items, item)
        if at == len(items) or items[at] != item:
            items.insert(at, item)
    return _LEAF_END.join(items) + _LEAF_END


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
    """A ref's lock, `<ref>.lock` (as git and libgit2 take it: created only if absent), held
    until `free`. Not a libgit2 transaction (whose fsyncs cannot be grouped with ours).

    Taken empty (`set` then writes the target and fsyncs it in one round with the objects it
    names), or taken as a hard link to a staged file whose content is durable already (see
    `GitEventStore._swap`; `commit` then only renames): either way the lock file is renamed over
    the ref, and the directory fsynced.
    """

    def __init__(self, path: str, fd: int, read: Callable[[], str | None], durable: bool) -> None:
        self.path = path
        self.fd = fd
        self.read = read
        self.durable = durable
        self.renamed = False

    def set(self, target: str, objects: _Objects) -> None:
        """Point the ref at `target`, once `objects` (the new ones it reaches) are durable."""
        os.write(self.fd, (target + "\n").encode("ascii"))
        objects.sync(self.fd)
        os.close(self.fd)
        self.fd = -1
        self.commit(target)

    def commit(self, target: str) -> None:
        """Rename the lock file (holding `target`, durably) over the ref."""
        os.rename(self.path + ".lock", self.path)
        self.renamed = True
        if self.durable:
            try:
                _fsync_dir(os.path.dirname(self.path))
            except FileNotFoundError:
                # `git pack-refs` packed the new ref (durable by git's own fsync) and pruned its
                # directory meanwhile: only that is success.
                if self.read() != target:
                    raise

    def free(self) -> None:
        """Unlock; a ref not `set` is left unchanged."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if not self.renamed:
            self.renamed = True
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path + ".lock")


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
        # Objects shared by the worktrees of a repository live in its common directory.
        self._objects_dir = os.path.join(self._refs_root, "objects")

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

    def _lock(self, repo: Any, ref: str, deadline: float, staged: str | None = None) -> _Locked:
        """Take `ref`'s lock, retrying while another writer holds it, until `deadline`.

        `staged`: a file beside the ref holding its new content (see `_swap`), which becomes the
        lock file (a hard link: created only if absent, like `O_EXCL`).
        """
        path = self._file(ref)
        lock = path + ".lock"
        backoff = 0.0005
        read = functools.partial(self._target, repo, ref)
        while True:
            try:
                if staged is not None:
                    os.link(staged, lock)
                    return _Locked(path, -1, read, self.durable)
                fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
                return _Locked(path, fd, read, self.durable)
            except FileNotFoundError:
                # The ref's first write, or `git pack-refs` removed its emptied directory.
                os.makedirs(os.path.dirname(path), exist_ok=True)
                if time.monotonic() < deadline:
                    continue
            except FileExistsError:
                pass
            if time.monotonic() >= deadline:
                raise StoreUnavailable(
                    f"git store {self.path}: {ref} stayed locked for {self.lock_timeout}s; "
                    f"if no writer is running, a crashed one left {lock} behind: remove it"
                )
            time.sleep(backoff * random.uniform(0.5, 1.5))
            backoff = min(backoff * 2, 0.02)

    # -- durability --------------------------------------------------------------------------

    def _objects(self, durable: bool | None = None) -> _Objects:
        """A writer of loose objects, synced together by its `sync` (with `durable`; see
        `_Objects`); a fan-out directory new to this process has its entry in `objects/` synced
        too."""
        return _Objects(
            self._objects_dir, self._synced, self.durable if durable is None else durable
        )

    def _settle_ref(self, ref: str) -> None:
        """Make the directories leading to `ref` durable (once per process and directory)."""
        if not self.durable:
            return
        parts = ref.split("/")[:-1]
        for n in range(2, len(parts) + 1):
            directory = "/".join(parts[:n])
            if directory not in self._synced:
                _fsync_dir(os.path.join(self._refs_root, *parts[: n - 1]))
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
            objects = self._objects()
            try:
                new = self._commits(repo, objects, tip, batch, out)
                if self._swap(repo, space, fenced, fence, tip, new.oid, objects, deadline):
                    self._remember((space, new.oid), new)
                    if self._bells is not None and any(p.intent_id for p in batch):
                        self._bells.ring("e", space)  # a forwarder may wait for it
                    return out
            finally:
                objects.close()

    def _swap(
        self,
        repo: Any,
        space: str,
        fenced: bool,
        fence: Lease | None,
        tip: _Tip | None,
        new: str,
        objects: _Objects,
        deadline: float,
    ) -> bool:
        """Move the space ref from `tip` to `new` under its lock, the fence checked under it;
        `objects` (those `new` reaches) are made durable with the ref.

        A lease changes hands (a new generation) only under the same space ref lock (see
        `_lease_update`), so the grant read here stays current until the ref has moved.
        False when another writer moved the tip since it was read: the caller re-checks.
        """
        sref = space_ref(space)
        staged = self._stage(sref, new, objects)
        try:
            locked = self._lock(repo, sref, deadline, staged)
            try:
                if self._target(repo, sref) != (tip.oid if tip else None):
                    return False
                if fenced:
                    check_fence(fence, self._lease_record(repo, space))
                locked.commit(new)
            finally:
                locked.free()
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(staged)
        self._settle_ref(sref)
        return True

    def _stage(self, ref: str, target: str, objects: _Objects) -> str:
        """A new file beside `ref` holding `target`, fsynced in one round with `objects`, before
        the ref's lock is taken: the lock is then held for a check, a rename and a directory
        fsync only (a writer killed under it leaves a lock behind that blocks its space until an
        operator removes it, so the shorter the better).

        Named `<ref>.<random>.lock`: git and libgit2 skip `*.lock` files when they list refs, and
        no ref name has a `.` (`encode_name`), so it is nobody's lock.
        """
        path = self._file(ref)
        for attempt in range(OBJECT_RETRIES):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            staged = f"{path}.{random.getrandbits(64):016x}.lock"
            try:
                fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
            except FileNotFoundError:  # `git pack-refs` removed the emptied directory: again
                if attempt == OBJECT_RETRIES - 1:
                    raise
                continue
            try:
                os.write(fd, (target + "\n").encode("ascii"))
                objects.sync(fd)
            except BaseException:
                os.close(fd)
                os.unlink(staged)
                raise
            os.close(fd)
            return staged
        raise AssertionError("unreachable")

    def _commits(
        self,
        repo: Any,
        objects: _Objects,
        tip: _Tip | None,
        batch: Sequence[Pending],
        out: Sequence[Event],
    ) -> _Tip:
        """Write the batch's commits; return the new tip. Only the last gets the new tree."""
        parent = tip.oid if tip else None
        # The empty tree is written (or freshened) each time: a cached id could outlive a pruned
        # object.
        base = tip.tree if tip else objects.put(ObjectType.TREE, b"")
        made: list[str] = []
        tree = base
        for n, (p, e) in enumerate(zip(batch, out, strict=True)):
            if n == len(out) - 1:
                tree = self._next_tree(repo, objects, tip, base, out, made)
            parent = objects.put(ObjectType.COMMIT, commit_bytes(tree, parent, e, p.payload_json))
            made.append(parent)
        assert parent is not None
        return _Tip(parent, out[-1].seq, tree)

    def _next_tree(
        self,
        repo: Any,
        objects: _Objects,
        tip: _Tip | None,
        base: str,
        out: Sequence[Event],
        made: list[str],
    ) -> str:
        """The tip tree after `out`: `base` plus the batch's intents and newly complete chunks.

        `made` holds the commits of `out[:-1]`. Trees are edited as raw objects (see `_Objects`
        for why libgit2 does not write them).
        """
        last = out[-1].seq
        old = tip.seq // CHUNK if tip else 0
        chunks = range(old, last // CHUNK)
        intents = [(e.intent_id, e.seq) for e in out if e.intent_id is not None]
        if not chunks and not intents:
            return base
        root = _tree_entries(self._read(repo, base, ObjectType.TREE))
        if chunks:
            known = self._chain_oids(repo, tip, chunks.start * CHUNK) + made
            index = self._subtree(repo, root, b"index")
            for k in chunks:
                lines = known[k * CHUNK - chunks.start * CHUNK :][:CHUNK]
                text = ("\n".join(lines) + "\n").encode("ascii")
                blob = objects.put(ObjectType.BLOB, text)
                index[f"{k * CHUNK:012d}".encode()] = (_BLOB_MODE, bytes.fromhex(blob))
            tree = objects.put(ObjectType.TREE, _tree_bytes(index))
            root[b"index"] = (_TREE_MODE, bytes.fromhex(tree))
        if intents:
            # The empty blob stays reachable (so safe from gc) once the tip indexes an intent;
            # before that it is written (or freshened) like any new object.
            prefix = INTENTS.encode()
            if not any(name.startswith(prefix) for name in root):
                objects.put(ObjectType.BLOB, b"")
            groups: dict[str, list[bytes]] = {}
            for intent_id, seq in intents:
                first, rest = intent_path(intent_id)
                groups.setdefault(first, []).append(f"{rest}.{seq}".encode())
            for first, names in groups.items():
                entry = root.get(prefix + first.encode())
                data = self._read(repo, entry[1].hex(), ObjectType.TREE) if entry else b""
                leaf = objects.put(ObjectType.TREE, _leaf_with(data, names))
                root[prefix + first.encode()] = (_TREE_MODE, bytes.fromhex(leaf))
        return objects.put(ObjectType.TREE, _tree_bytes(root))

    def _subtree(
        self, repo: Any, root: dict[bytes, tuple[bytes, bytes]], name: bytes
    ) -> dict[bytes, tuple[bytes, bytes]]:
        entry = root.get(name)
        if entry is None:
            return {}
        return _tree_entries(self._read(repo, entry[1].hex(), ObjectType.TREE))

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
        objects = self._objects()
        try:
            cur = self._lease_record(repo, space)
            new = change(cur)
            if new is None:
                return
            blob = objects.put(ObjectType.BLOB, _lease_bytes(new))
            if cur is not None and (cur.holder, cur.generation) == (new.holder, new.generation):
                locked.set(blob, objects)
            else:
                writes = self._lock(repo, space_ref(space), deadline)
                try:
                    locked.set(blob, objects)
                finally:
                    writes.free()
        finally:
            objects.close()
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
