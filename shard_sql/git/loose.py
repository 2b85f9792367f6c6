"""Loose objects written as git writes them, made durable together in one round of fsyncs.

libgit2's fsync switch is process-wide and fsyncs each object and its directory in a row; here
a write's objects, their directories and the ref's new content are fsynced concurrently
(docs/git.md, "Durability").
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import random
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from pygit2.enums import ObjectType

OBJECT_RETRIES = 5
"""Attempts of a file creation that `git gc` (or `git pack-refs`) may race by removing an
emptied directory."""
FRESHEN_AFTER = 3600.0
"""Seconds: an object found written already gets a new mtime when its own is older than this, so
that `git gc` (which prunes unreferenced loose objects weeks old) sees it as new, as git does."""
SYNC_THREADS = 8
"""Threads that issue the fsyncs of one write together (ext4 commits them in one transaction)."""

KIND_NAMES: dict[int, bytes] = {
    ObjectType.COMMIT: b"commit",
    ObjectType.TREE: b"tree",
    ObjectType.BLOB: b"blob",
}

_sync_pool: tuple[int, ThreadPoolExecutor] | None = None
_sync_pool_lock = threading.Lock()


def _fsync_pool() -> ThreadPoolExecutor:
    """The process's fsync threads (anew in a forked child: the parent's threads are not there)."""
    global _sync_pool
    with _sync_pool_lock:
        if _sync_pool is None or _sync_pool[0] != os.getpid():
            pool = ThreadPoolExecutor(SYNC_THREADS, thread_name_prefix="shard-sql-git-fsync")
            _sync_pool = (os.getpid(), pool)
        return _sync_pool[1]


def run_concurrently(calls: Sequence[Callable[[], object]]) -> None:
    """Run `calls` (fsyncs) concurrently: the first in this thread, the rest in the pool; raise
    the first failure once all have ended."""
    if not calls:
        return
    futures = [_fsync_pool().submit(c) for c in calls[1:]]
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


def deflate(raw: bytes) -> bytes:
    """zlib at level 1, as git writes loose objects, with a window and a hash table no larger
    than the object (at least 512 bytes): `zlib.compress` clears 256 KB of tables for each
    object of a few hundred bytes. Any zlib reader (git's, libgit2's) inflates it."""
    bits = min(15, max(9, (len(raw) - 1).bit_length()))
    c = zlib.compressobj(1, zlib.DEFLATED, bits, bits - 7)
    return c.compress(raw) + c.flush()


def in_background(call: Callable[[], None]) -> Future[None]:
    """Start `call` (an fsync) in the pool, to overlap it with this thread's work."""
    return _fsync_pool().submit(call)


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_fanout(path: str) -> None:
    """fsync `objects/xx/`, unless it is gone: emptied and removed by packing (`git gc`, or
    `maintain`), which deletes only loose objects already in a durable pack."""
    with contextlib.suppress(FileNotFoundError):
        fsync_dir(path)


def _fsync_close(fd: int) -> None:
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LooseObjects:
    """The loose objects of one write, written without fsync; `sync` then makes them durable
    with their fan-out directories in one round of concurrent fsyncs. Objects are written in
    git's own format: zlib of `<kind> <size>\\0<data>` at `objects/xx/<rest of id>`.

    `synced`: the fan-out directories (`xx`) whose entry in `objects/` this process has synced
    (shared by the writes of a store). `durable=False`: nothing is synced (intent records).
    """

    def __init__(
        self,
        objects: str,
        synced: set[str],
        durable: bool,
        on_create: Callable[[], None] | None = None,
    ) -> None:
        self.objects = objects
        self.synced = synced
        self.durable = durable
        self.on_create = on_create
        """Called after each object created (not after one found present)."""
        self.fds: list[int] = []
        self.dirs: set[str] = set()
        self.fanouts: set[str] = set()

    def put(self, kind: int, data: bytes) -> str:
        """Write one object (or freshen it if present) and return its id.

        `objects/xx/` is made when the file's creation finds it missing (as git does: no mkdir
        per object). `git gc` may remove an empty one between the mkdir and the creation:
        retried (objects are content-addressed, so a retry is idempotent).
        """
        head = b"%s %d\0" % (KIND_NAMES[kind], len(data))
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
                    body = deflate(head + data)
                self._create(fan, path, body, oid)
                return oid
            except (FileNotFoundError, NotADirectoryError):
                if attempt == OBJECT_RETRIES - 1:
                    raise
                if attempt:  # a second miss: `git gc` is emptying directories, give it time
                    time.sleep(0.001 * attempt)
                with contextlib.suppress(FileExistsError, FileNotFoundError):
                    os.mkdir(fan)
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
        if self.on_create is not None:
            self.on_create()

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
        calls += [functools.partial(_fsync_fanout, d) for d in sorted(self.dirs)]
        if self.fanouts:
            calls.append(functools.partial(fsync_dir, self.objects))
        run_concurrently(calls)
        self.synced.update(self.fanouts)
        self.dirs.clear()
        self.fanouts.clear()

    def close(self) -> None:
        """Drop what was not synced (a write given up)."""
        fds, self.fds = self.fds, []
        for fd in fds:
            os.close(fd)
