"""Packing a git store's loose objects as it grows, beside live writers and readers: every run
moves the loose objects (and the smallest packs, keeping pack sizes geometric) into one new
pack, then removes what it holds. Nothing is ever pruned (docs/git.md, "Packing")."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import pygit2
from pygit2.enums import RepositoryOpenFlag

from shard_sql.git.loose import fsync_dir
from shard_sql.git.repo import GitRepo

try:
    import fcntl
except ImportError:  # not POSIX: one packer per process only
    fcntl = None  # type: ignore[assignment]

PACK_EVERY = 2000
"""Loose objects a store writes before it packs them in the background (a single append writes
about two: its commit and the feed's commit; git's own `gc.auto` is 6700)."""
GEOMETRIC_FACTOR = 2
"""Each pack keeps at least twice the objects of the next smaller one; smaller ones are merged."""
STAGING_PREFIX = "tmp_shard_sql_pack_"
"""A run writes its pack in a directory of this prefix in `objects/` (`git prune` removes one
left by a crash once it is older than its prune age, as it does its own `tmp_` files)."""
GC_PID_STALE = 12 * 3600
"""Seconds after which git takes a `gc.pid` for one left by a `git gc` that died."""
LOCK_FILE = "shard-sql-packing.lock"
"""In the git directory: held (`flock`) by the process that packs, so that one packs at a time."""

log = logging.getLogger("shard_sql.git")

_HEX = frozenset("0123456789abcdef")
_PACK_EXTRAS = (".rev", ".bitmap", ".mtimes", ".promisor")


@dataclass(frozen=True, slots=True)
class Maintenance:
    """What one packing run did."""

    packed: int
    """Objects written to the new pack (0: nothing to do, or another process was packing)."""
    merged_packs: int
    """Older packs merged into it (and deleted)."""
    loose_removed: int
    """Loose objects deleted because the new pack holds them."""
    packs: int
    """Packs in the repository afterwards."""


def packs_to_merge(sizes: Sequence[int], factor: int = GEOMETRIC_FACTOR) -> int:
    """How many of the smallest packs (object counts `sizes`, ascending) to merge into the new
    one so that every pack then holds at least `factor` times the next smaller one (git's
    `repack --geometric`): amortized, an object is rewritten O(log n) times."""
    i = len(sizes) - 1
    while i > 0 and sizes[i] >= factor * sizes[i - 1]:
        i -= 1
    split = i + 1 if i > 0 else 0
    total = sum(sizes[:split])
    while split < len(sizes) and sizes[split] < factor * total:
        total += sizes[split]
        split += 1
    return split


def loose_objects(objects_dir: str) -> list[str]:
    """The ids of the loose objects in `objects_dir`."""
    found = []
    for fan in range(256):
        prefix = f"{fan:02x}"
        with (
            contextlib.suppress(FileNotFoundError, NotADirectoryError),
            os.scandir(os.path.join(objects_dir, prefix)) as it,
        ):
            found += [prefix + e.name for e in it if len(e.name) == 38 and _hex(e.name)]
    return found


def _hex(name: str) -> bool:
    return set(name) <= _HEX


def _index(idx_path: str, whole: bool) -> bytes:
    """A version 2 pack index (what git and libgit2 write): its header, or all of it."""
    with open(idx_path, "rb") as f:
        data = f.read() if whole else f.read(8 + 256 * 4)
    if data[:8] != b"\377tOc\0\0\0\2" or len(data) < 8 + 256 * 4:
        raise ValueError(f"{idx_path}: not a version 2 pack index")
    return data


def pack_size(idx_path: str) -> int:
    """The number of objects of a pack, from its index."""
    return int.from_bytes(_index(idx_path, False)[8 + 255 * 4 :], "big")


def pack_ids(idx_path: str) -> list[str]:
    """The ids of the objects of a pack, from its index."""
    data = _index(idx_path, True)
    count = int.from_bytes(data[8 + 255 * 4 : 8 + 256 * 4], "big")
    start = 8 + 256 * 4
    return [data[start + 20 * i : start + 20 * (i + 1)].hex() for i in range(count)]


def _packs(pack_dir: str) -> list[tuple[int, str]]:
    """(objects, path without extension) of each complete pack that may be merged, fewest
    objects first: one with its index and without a `.keep` file (git's mark of a pack never to
    repack)."""
    out = []
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(pack_dir):
            if not (name.startswith("pack-") and name.endswith(".pack")):
                continue
            base = os.path.join(pack_dir, name[:-5])
            if os.path.exists(base + ".keep"):
                continue
            with contextlib.suppress(FileNotFoundError, ValueError):  # partial, or not git's
                out.append((pack_size(base + ".idx"), base))
    return sorted(out)


@contextlib.contextmanager
def _exclusive(path: str, wait: bool) -> Iterator[bool]:
    """Hold the packing lock of the repository; yields False when another process holds it and
    `wait` is off."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
        yield True
    finally:
        os.close(fd)  # releases the flock


def pack(git: GitRepo, *, wait: bool = True) -> Maintenance:
    """Move the loose objects, and the packs `packs_to_merge` picks, into one new pack; then
    delete the loose objects and the packs it holds.

    Safe beside writers: a loose object is deleted only once the new pack holding it is in
    place and durable, and every object of a merged pack is in the new pack; an object written
    meanwhile is not touched. Safe beside readers: git looks for an object again in the packs as
    they are now when it is not where it last saw it, and so does `GitRepo` (see MISS_RETRIES).
    Safe beside `git gc`: the pack appears before its index (`_put_in_place`).
    """
    pack_dir = os.path.join(git.objects_dir, "pack")
    with _exclusive(os.path.join(git.root, LOCK_FILE), wait) as mine:
        if not mine:
            return Maintenance(0, 0, 0, len(_packs(pack_dir)))
        loose = loose_objects(git.objects_dir)
        packs = _packs(pack_dir)
        merged = [base for _, base in packs[: packs_to_merge([n for n, _ in packs])]]
        if not loose and len(merged) < 2:
            return Maintenance(0, 0, 0, len(packs))
        os.makedirs(pack_dir, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=git.objects_dir)
        try:
            written, packed_loose, held = _write_pack(git.gitdir, loose, merged, staging)
            if not written:
                return Maintenance(0, 0, 0, len(packs))
            new = _put_in_place(staging, pack_dir, git.durable)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        if not new:  # the same pack was there already: see _put_in_place
            return Maintenance(written, 0, 0, len(_packs(pack_dir)))
        removed = _remove_loose(git.objects_dir, packed_loose)
        if _gc_running(git.root):  # kept (their objects are in the new pack too): see there
            held = []
        for base in held:
            _remove_pack(base)
        return Maintenance(written, len(held), removed, len(_packs(pack_dir)))


def _write_pack(
    gitdir: str, loose: list[str], merged: list[str], staging: str
) -> tuple[int, list[str], list[str]]:
    """Write one pack of the objects `loose` and those of the packs `merged` (paths without
    extension) into the directory `staging`. Return the number written, the loose ids and the
    merged packs it holds whole (`git gc` beside it may have packed or deleted some meanwhile:
    those are left alone)."""
    handle = pygit2.Repository(gitdir, RepositoryOpenFlag.NO_SEARCH)
    try:
        builder = pygit2.PackBuilder(handle)
        builder.set_threads(1)  # a background run keeps to one core
        packed_loose = [oid for oid in loose if _added(builder, oid)]
        held = []
        for base in merged:
            try:
                ids = pack_ids(base + ".idx")
            except FileNotFoundError:
                continue
            if all([_added(builder, oid) for oid in ids]):
                held.append(base)
        if not packed_loose and not held:
            return 0, [], []
        builder.write(staging)
        return builder.written_objects_count, packed_loose, held
    finally:
        handle.free()


def _put_in_place(staging: str, pack_dir: str, durable: bool) -> bool:
    """Move the pack written in `staging` into `pack_dir` as git does, the index last. libgit2
    renames the index into place first, and `git gc` deletes an index without its pack (as
    garbage: "no corresponding .pack"): one that saw ours between the two renames deleted it
    after the pack arrived, the run then deleted the loose objects, and those that only the new
    pack held were gone (issue 13 item 17).

    False when a pack of the same name (the same objects, written the same way) was in place
    already: it may be one that a `git repack -d` running beside listed at its start and deletes
    at its end, so the loose objects and merged packs are kept this time."""
    names = os.listdir(staging)
    (pack_name,) = [n for n in names if n.endswith(".pack")]
    stem = pack_name[: -len(".pack")]
    if durable:  # libgit2 fsyncs its pack too (its fsync setting is on): to be sure
        for name in names:
            _fsync_file(os.path.join(staging, name))
    existed = any(os.path.exists(os.path.join(pack_dir, stem + e)) for e in (".pack", ".idx"))
    idx = stem + ".idx"
    for name in sorted(names, key=lambda n: (n == idx, n != pack_name)):  # .pack first, .idx last
        if name.startswith(stem):
            os.replace(os.path.join(staging, name), os.path.join(pack_dir, name))
    if durable:
        fsync_dir(pack_dir)
    return not existed


def _gc_running(root: str) -> bool:
    """Whether a `git gc` runs on the repository (its `gc.pid`, as git reads it): its `git
    repack` lists the packs when it starts and fails ("unable to add recent objects") when one
    of them has gone when it reads it, so merged packs are deleted by a later run instead."""
    try:
        with open(os.path.join(root, "gc.pid"), "rb") as f:
            fields = f.read(1024).split()
            age = time.time() - os.fstat(f.fileno()).st_mtime
    except OSError:
        return False
    if age > GC_PID_STALE or len(fields) < 2 or not fields[0].isdigit():
        return False
    if fields[1].decode(errors="replace") != socket.gethostname():
        return True  # git's own rule: a gc on another host is left alone
    try:
        os.kill(int(fields[0]), 0)
    except ProcessLookupError:
        return False  # a gc killed on this host
    except OSError:
        pass  # EPERM: someone else's, alive
    return True


def _added(builder: pygit2.PackBuilder, oid: str) -> bool:
    try:
        builder.add(pygit2.Oid(hex=oid))
    except (KeyError, pygit2.GitError):  # gone meanwhile (`git gc` packed or pruned it)
        return False
    return True


def _fsync_file(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:  # not ours: a temporary file of a `git gc` beside
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_loose(objects_dir: str, ids: list[str]) -> int:
    removed = 0
    for oid in ids:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(objects_dir, oid[:2], oid[2:]))
            removed += 1
    return removed


def _remove_pack(base: str) -> None:
    """Delete a merged pack, its index last (as git does: no reader takes a half-deleted pack
    for whole)."""
    for ext in (".pack", *_PACK_EXTRAS, ".idx"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(base + ext)


class AutoPacker:
    """Counts the loose objects a store writes and packs them in a background thread every
    `every` objects (0: never), one run at a time per store, none while another process packs."""

    def __init__(self, git: GitRepo, every: int) -> None:
        self.git = git
        self.every = every
        self._written = 0
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()

    def wrote(self) -> None:
        """One loose object was written."""
        if not self.every:
            return
        self._written += 1  # a lost increment (threads) only delays a run
        if self._written >= self.every:
            self._start()

    def _start(self) -> None:
        with self._lock:
            if self._pid != os.getpid():  # a forked child: the parent's thread is not here
                self._pid, self._thread = os.getpid(), None
            if self._thread is not None and self._thread.is_alive():
                return
            self._written = 0
            self._thread = threading.Thread(
                target=self._run, name="shard-sql-git-pack", daemon=True
            )
            self._thread.start()

    def _run(self) -> None:
        try:
            pack(self.git, wait=False)
        except (pygit2.GitError, OSError, ValueError) as e:
            log.warning("git store %s: packing failed, left for later: %s", self.git.path, e)

    def join(self) -> None:
        """Wait for a run in progress (the store is closing)."""
        with self._lock:
            thread = self._thread if self._pid == os.getpid() else None
        if thread is not None:
            thread.join()
