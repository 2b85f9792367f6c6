"""Ref files written by git's own lock protocol (`<ref>.lock`, created only if absent, renamed
over the ref), not through libgit2, whose fsync switch is process-wide; `packed-refs`; and the
store's write mutex, which tells a dead writer's lock file from a live one."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

from shard_sql.errors import StoreUnavailable
from shard_sql.git.loose import OBJECT_RETRIES, LooseObjects, fsync_dir

_Stamp = tuple[int, int, int]
T = TypeVar("T")

STAGED_PREFIX = "tmp_obj_ref_"
"""A staged ref file (`RefFiles.stage`) in `objects/xx/`: a name git takes for a temporary object
of its own (`git prune` removes one older than its prune age, `git fsck` says nothing of it)."""
MUTEX_FILE = "shard-sql-writes.flock"
"""In the common git directory: the file whose `flock` is the store's write mutex."""

log = logging.getLogger("shard_sql.git")

_mutex_fds: set[int] = set()
"""The descriptors of MUTEX_FILE this process opened (one per thread and repository)."""
_mutex_guard = threading.Lock()


def _drop_inherited_mutexes() -> None:
    """In a forked child: close the mutex descriptors inherited from the parent (a `flock` is
    shared by every copy of its descriptor: the child's copy would keep the parent's lock after
    the parent died). The child opens its own (`RefFiles.mutex` looks at the pid)."""
    for fd in list(_mutex_fds):
        with contextlib.suppress(OSError):
            os.close(fd)
    _mutex_fds.clear()


os.register_at_fork(after_in_child=_drop_inherited_mutexes)


class Mutex:
    """The store's write mutex, held until `release`: an exclusive `flock` on MUTEX_FILE.

    Every write of the feed ref, every space ref (a cache of the feed) and every lease grant or
    revocation happens under it. The kernel releases it when its holder dies, so a ref lock file
    of ours found while holding it was left by a dead writer (`RefFiles.lock`, `breakable`).
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def release(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            fcntl.flock(fd, fcntl.LOCK_UN)

    def __enter__(self) -> Mutex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class RefLock:
    """A ref's lock, `<ref>.lock`, held until `free`.

    Taken empty (`write` then writes the target and fsyncs it in one round with the objects it
    names), or taken as a hard link to a staged file whose content is durable already
    (`RefFiles.stage`; `commit` then only renames): either way the lock file is renamed over the
    ref, and (`durable`) its directory fsynced.
    """

    def __init__(self, path: str, fd: int, read: Callable[[], str | None], durable: bool) -> None:
        self.path = path
        self.fd = fd
        self.read = read
        self.durable = durable
        self.renamed = False

    def rewrite(self, target: str, objects: LooseObjects) -> None:
        """A lock taken from a staged file: replace its content by `target`, fsynced in one
        round with `objects` (the new ones it reaches), before `commit`."""
        fd = os.open(self.path + ".lock", os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
        try:
            os.write(fd, (target + "\n").encode("ascii"))
            objects.sync(fd)
        finally:
            os.close(fd)

    def write(self, target: str, objects: LooseObjects | None = None) -> None:
        """Point the ref at `target`, once `objects` (the new ones it reaches) are durable."""
        os.write(self.fd, (target + "\n").encode("ascii"))
        if objects is not None:
            objects.sync(self.fd)
        os.close(self.fd)
        self.fd = -1
        self.commit(target)

    def commit(self, target: str, *, sync: bool = True) -> None:
        """Rename the lock file (holding `target`, durably) over the ref; then, with `sync`
        (else the caller calls `sync` later), make the rename durable."""
        os.rename(self.path + ".lock", self.path)
        self.renamed = True
        if sync:
            self.sync(target)

    def sync(self, target: str | None = None) -> None:
        """fsync the ref's directory (durable stores). `target`: what the ref must read if
        `git pack-refs` removed the directory meanwhile (packed, the ref is durable by git's own
        fsync); None: anything (a later write moved it on, durably)."""
        if not self.durable:
            return
        try:
            fsync_dir(os.path.dirname(self.path))
        except FileNotFoundError:
            if target is not None and self.read() != target:
                raise

    def free(self) -> None:
        """Unlock; a ref not written is left unchanged."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if not self.renamed:
            self.renamed = True
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path + ".lock")


class RefFiles:
    """The ref files of one repository (its common directory `root`, shared by worktrees)."""

    def __init__(self, root: str, store: object, lock_timeout: float, durable: bool) -> None:
        self.root = root
        self.store = store
        """Names the store in error messages."""
        self.lock_timeout = lock_timeout
        self.durable = durable
        self.synced: set[str] = set()
        """Directories (relative, `/`-separated) whose entries this process has fsynced."""
        self._packed: tuple[_Stamp | None, str, list[str]] = (None, "", [])
        self._same_device: bool | None = None
        self._mutex_fd = threading.local()
        self._mutex_fds: list[int] = []

    def close(self) -> None:
        """Close the write mutex's descriptors of every thread (the store is closed)."""
        with _mutex_guard:
            fds, self._mutex_fds = self._mutex_fds, []
            for fd in fds:
                if fd in _mutex_fds:  # else a fork's child: not ours any more
                    _mutex_fds.discard(fd)
                    os.close(fd)
        self._mutex_fd = threading.local()

    def file(self, ref: str) -> str:
        return os.path.join(self.root, *ref.split("/"))

    def retry(self, deadline: float, attempt: Callable[[], T | None], busy: Callable[[], str]) -> T:
        """The one lock loop: `attempt` until it returns something, with back-off, until
        `deadline`; then `StoreUnavailable(busy())`."""
        backoff = 0.0005
        while True:
            got = attempt()
            if got is not None:
                return got
            if time.monotonic() >= deadline:
                raise StoreUnavailable(busy())
            time.sleep(backoff * random.uniform(0.5, 1.5))
            backoff = min(backoff * 2, 0.02)

    def mutex(self, deadline: float) -> Mutex:
        """Take the store's write mutex (see `Mutex`), waiting until `deadline`."""
        path = os.path.join(self.root, MUTEX_FILE)

        local = self._mutex_fd

        def attempt() -> Mutex | None:
            # This thread's own descriptor (kept: a flock conflicts between descriptors, so two
            # threads exclude each other; a forked child opens its own).
            fd = getattr(local, "fd", -1)
            if fd < 0 or local.pid != os.getpid():
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
                with _mutex_guard:
                    _mutex_fds.add(fd)
                    self._mutex_fds.append(fd)
                local.fd, local.pid = fd, os.getpid()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return None
            return Mutex(fd)

        def busy() -> str:
            return (
                f"git store {self.store}: another writer held the store's write mutex "
                f"({path}) for {self.lock_timeout}s (a process stopped or stuck while writing)"
            )

        return self.retry(deadline, attempt, busy)

    def lock(
        self,
        ref: str,
        deadline: float,
        read: Callable[[], str | None],
        *,
        staged: str | None = None,
        durable: bool | None = None,
        breakable: bool = False,
    ) -> RefLock:
        """Take `ref`'s lock, retrying with back-off while another writer holds it, until
        `deadline` (then `StoreUnavailable` names the lock file).

        `read` reads the ref's target; `staged`: a file beside the ref holding its new content
        (see `stage`), which becomes the lock file (a hard link: created only if absent).
        `breakable` (the caller holds the write mutex): a lock file that is a hard link of a
        staged file was left by a writer that died under the mutex, and is removed. Any other
        (git's own, a hand-made one) is never removed automatically: nothing proves it abandoned.
        """
        path = self.file(ref)
        lock = path + ".lock"
        durable = self.durable if durable is None else durable

        def attempt() -> RefLock | None:
            for _ in range(OBJECT_RETRIES):
                try:
                    if staged is not None:
                        os.link(staged, lock)
                        return RefLock(path, -1, read, durable)
                    fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
                    return RefLock(path, fd, read, durable)
                except FileNotFoundError:
                    # The ref's first write, or `git pack-refs` removed its emptied directory
                    # (maybe a parent too, even while it is made again: then the next round).
                    _make_dirs(os.path.dirname(path))
                except FileExistsError:
                    if not (breakable and _break_dead(lock, self.staging_dirs())):
                        return None
            return None

        def busy() -> str:
            return (
                f"git store {self.store}: {ref} stayed locked for {self.lock_timeout}s; "
                f"if no writer is running, a crashed one left {lock} behind: remove it"
            )

        return self.retry(deadline, attempt, busy)

    def update_cache(self, ref: str, target: str, read: Callable[[], str | None]) -> bool:
        """Under the write mutex: point `ref` at `target` without fsync (git's protocol: its
        lock file created, written, renamed), unless someone else holds its lock (then False:
        the ref is left as it was). Only writers under the mutex lock these refs, and git holds
        a ref's lock for moments: a lock older than `lock_timeout` was left by a dead writer,
        and is removed."""
        path = self.file(ref)
        lock = path + ".lock"
        for _ in range(OBJECT_RETRIES):
            try:
                fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
            except FileNotFoundError:
                _make_dirs(os.path.dirname(path))
                continue
            except FileExistsError:
                try:
                    age = time.time() - os.stat(lock).st_mtime
                except FileNotFoundError:
                    continue
                if age < self.lock_timeout:
                    return False
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(lock)
                log.warning("removed %s, left by a writer that died while writing", lock)
                continue
            ref_lock = RefLock(path, fd, read, durable=False)
            try:
                ref_lock.write(target)
            finally:
                ref_lock.free()
            return True
        return False

    def stage(self, ref: str, target: str, objects: LooseObjects | None) -> str:
        """A new file holding `ref`'s new content `target`, fsynced in one round with `objects`
        (None: not fsynced), before the ref's lock is taken (a hard link of it): the lock is then
        held for a check, a rename and a directory fsync only (the shorter, the less other
        writers wait).

        Made in the objects' fan-out directory of `target` (written by this write: it exists),
        named `tmp_obj_ref_<random>` (git's temporary objects: listed by no one, removed by `git
        prune` when a writer killed before its link left one), not beside the ref: ext4 puts a
        file in its directory's block group and, without a journal, makes every file created
        there scan past each one freed in the last ~30 s, and the ref's directory frees one per
        write (the ref's old file). The fan-out directories are spread over the groups.
        """
        path = self.file(ref)
        fan = os.path.join(self.root, "objects", target[:2])
        beside = not self._objects_beside_refs()  # no hard link across file systems
        if beside:  # `<ref>.<random>.lock`: git skips `*.lock`, no ref name has a `.`
            fan = os.path.dirname(path)
        for attempt in range(OBJECT_RETRIES):
            name = f"{STAGED_PREFIX}{random.getrandbits(64):016x}"
            staged = f"{path}.{name[-16:]}.lock" if beside else os.path.join(fan, name)
            try:
                fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
            except FileNotFoundError:  # `git gc` removed the emptied directory: made, then again
                if attempt == OBJECT_RETRIES - 1:
                    raise
                _make_dirs(fan)
                continue
            try:
                os.write(fd, (target + "\n").encode("ascii"))
                if objects is not None:
                    objects.sync(fd)
            except BaseException:
                os.close(fd)
                os.unlink(staged)
                raise
            os.close(fd)
            return staged
        raise AssertionError("unreachable")

    def _objects_beside_refs(self) -> bool:
        """Whether `objects/` is on the file system of `refs/` (else one may be a link)."""
        if self._same_device is None:
            objects = os.stat(os.path.join(self.root, "objects")).st_dev
            self._same_device = objects == os.stat(os.path.join(self.root, "refs")).st_dev
        return self._same_device

    def staging_dirs(self) -> list[str]:
        """Where `stage` makes its files: the fan-out directories of `objects/`."""
        top = os.path.join(self.root, "objects")
        return [os.path.join(top, f"{n:02x}") for n in range(256)]

    def create(self, ref: str, target: str) -> None:
        """Create `ref` at `target` unless it exists, without fsync and without a lock file: a
        complete file holding the target is staged, then hard-linked to the ref's name (a link
        never replaces a file: the first creator wins). No reader sees half a ref, and a creator
        killed at any point leaves at most its staged file (nobody's lock), where a lock file
        taken for the create would be left for good, blocking the next create of that ref."""
        path = self.file(ref)
        staged = self.stage(ref, target, None)
        try:
            for _ in range(OBJECT_RETRIES):
                try:
                    os.link(staged, path)
                    return
                except FileExistsError:
                    return  # another creator was first
                except FileNotFoundError:
                    # The ref's directory is new, or `git pack-refs` removed it meanwhile.
                    _make_dirs(os.path.dirname(path))
            raise StoreUnavailable(f"git store {self.store}: could not create {ref}")
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(staged)

    def sync_dirs(self, ref: str) -> None:
        """Make the directories leading to `ref` durable (once per process and directory)."""
        if not self.durable:
            return
        parts = ref.split("/")[:-1]
        for n in range(2, len(parts) + 1):
            directory = "/".join(parts[:n])
            if directory not in self.synced:
                fsync_dir(os.path.join(self.root, *parts[: n - 1]))
                self.synced.add(directory)

    def unlink_loose(self, ref: str) -> None:
        """Remove a loose ref file without its lock (for garbage only: applied intents)."""
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            os.unlink(self.file(ref))

    def loose_under(self, prefix: str) -> list[str]:
        """The loose refs below `prefix` (ending in `/`), read or not: libgit2 skips the files
        it cannot parse when it lists refs."""
        top = self.file(prefix)
        found = []
        for directory, _, files in os.walk(top):
            below = os.path.relpath(directory, top).replace(os.sep, "/")
            at = prefix if below == "." else f"{prefix}{below}/"
            found += [at + name for name in files if not name.endswith(".lock")]
        return found

    def packed_under(self, prefix: str) -> list[str]:
        """The refs below `prefix` listed in `packed-refs` (re-read only when it changed)."""
        path = os.path.join(self.root, "packed-refs")
        try:
            f = open(path, "rb")  # noqa: SIM115 (fstat of the very file read)
        except FileNotFoundError:
            self._packed = (None, prefix, [])
            return []
        with f:
            st = os.fstat(f.fileno())
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
            known, known_prefix, names = self._packed
            if known == stamp and known_prefix == prefix:
                return names
            found = []
            needle = (" " + prefix).encode()
            for line in f:
                at = line.find(needle)
                if at > 0 and not line.startswith((b"#", b"^")):
                    found.append(line[at + 1 :].rstrip(b"\r\n").decode("utf-8", "replace"))
        self._packed = (stamp, prefix, found)
        return found

    def drop_packed(self, refs: Sequence[str]) -> None:
        """Drop `refs` from `packed-refs`, rewritten under `packed-refs.lock` from the file read
        under that lock, as git does; a lock held by someone else (`git gc`) leaves them."""
        packed = os.path.join(self.root, "packed-refs")
        lock = packed + ".lock"
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            return
        done = False
        try:
            try:
                with open(packed, "rb") as f:
                    lines = f.read().splitlines(keepends=True)
            except FileNotFoundError:
                return
            kept = _without(lines, {r.encode() for r in refs})
            if len(kept) == len(lines):
                return
            os.write(fd, b"".join(kept))
            os.fsync(fd)  # packed-refs holds every packed ref: never expose a partial file
            os.close(fd)
            fd = -1
            os.rename(lock, packed)
            done = True
        finally:
            if fd >= 0:
                os.close(fd)
            if not done:
                os.unlink(lock)


def _break_dead(lock: str, staging: Sequence[str]) -> bool:
    """Remove `lock` if it is a hard link of a staged file (`RefFiles.stage`): only writers
    holding the write mutex take such locks, so, found by the mutex's holder, it was left by one
    that died. True when the lock is gone (try again), False when it is someone else's.
    `staging`: the directories its staged twin may be in (besides the lock's own, where
    earlier versions staged)."""
    try:
        st = os.lstat(lock)
    except FileNotFoundError:
        return True
    if st.st_nlink < 2:
        return False
    # The lock first, its staged twin after: a breaker killed in between leaves a staged file
    # (nobody's lock), never a lock without its twin, which nothing could tell from git's own.
    with contextlib.suppress(FileNotFoundError):
        os.unlink(lock)
    folder, name = os.path.split(lock)
    base = name[: -len(".lock")]
    for directory in [folder, *staging]:
        with contextlib.suppress(OSError), os.scandir(directory) as it:
            for entry in it:
                twin = entry.name.startswith(base + ".") and entry.name.endswith(".lock")
                if (twin or entry.name.startswith(STAGED_PREFIX)) and entry.inode() == st.st_ino:
                    os.unlink(entry.path)  # the dead writer's staged file
    log.warning("removed %s, left by a writer that died while writing", lock)
    return True


def _make_dirs(path: str) -> None:
    """`os.makedirs`, except that a parent removed meanwhile (by `git pack-refs`) is left to
    the caller's next attempt."""
    with contextlib.suppress(FileNotFoundError):
        os.makedirs(path, exist_ok=True)


def _without(lines: list[bytes], drop: set[bytes]) -> list[bytes]:
    """The lines of `packed-refs` without the refs `drop` (and their peeled `^` lines)."""
    kept: list[bytes] = []
    dropping = False
    for line in lines:
        if line.startswith(b"^"):  # the peeled value of the line before
            if not dropping:
                kept.append(line)
            continue
        name = line.partition(b" ")[2].rstrip(b"\r\n")
        dropping = not line.startswith(b"#") and name in drop
        if not dropping:
            kept.append(line)
    return kept
