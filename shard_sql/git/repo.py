"""An opened git repository: a pygit2 handle per thread, its ref files and its loose objects,
shared by the store's events, leases and forwarded intents."""

from __future__ import annotations

import array
import contextlib
import fcntl
import functools
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pygit2
from pygit2.enums import RepositoryOpenFlag

from shard_sql.errors import ShardSqlError, StoreUnavailable
from shard_sql.git.errors import GIT_ERRORS, translate
from shard_sql.git.layout import WAKEUPS_DIR
from shard_sql.git.loose import LooseObjects
from shard_sql.git.refs import RefFiles, RefLock
from shard_sql.wake import WakeupFiles

T = TypeVar("T")

MISS_RETRIES = 5
"""Reads of an object not found: a handle's list of packs may name a pack merged and deleted
since (packing), which libgit2 does not drop when it looks again; `free` drops the handle's
object database, and the next read lists the packs anew (after a pause growing from 1 ms, in
case packing goes on)."""
CACHED_OBJECTS = 4096
"""What parsed objects say (tips, lease records), kept per store."""


def _look_again(handle: Any, attempt: int) -> None:
    """Before the next read of an object not found: see MISS_RETRIES."""
    handle.free()
    if attempt:
        time.sleep(0.001 * 2**attempt)


def open_or_create(path: Path) -> Any:
    """The repository at `path`: a missing path or an empty directory becomes a new bare
    repository; an existing one (bare, or a work tree with `.git`) is used as is; anything else
    raises `StoreUnavailable`. Parent directories are never searched."""
    if not path.exists():
        if path.is_symlink():
            raise StoreUnavailable(f"{path} is a dangling symbolic link")
        return _created(pygit2.init_repository(str(path), bare=True))
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
        return _created(pygit2.init_repository(str(path), bare=True))


FS_IOC_GETFLAGS = 0x80086601
FS_IOC_SETFLAGS = 0x40086602
FS_TOPDIR_FL = 0x00020000
"""Linux's `chattr +T` (ext2/3/4): the allocator spreads the directories made in it over the
block groups."""


def _created(handle: Any) -> Any:
    """A new repository: its `objects/` marked a top directory (ext2/3/4; elsewhere nothing).

    ext4 puts a file in its directory's block group, and, mounted without a journal, skips
    every inode of that group freed in the last ~30 seconds when it allocates one (scanning past
    each): a store frees as many loose objects as it writes (packing), so with the 256
    `objects/xx` directories in one group every object written cost a scan of thousands of
    inodes. Spread over the groups, each sees a 256th of them (docs/git.md, "Durability").
    """
    if sys.platform == "linux":
        with contextlib.suppress(OSError):
            fd = os.open(os.path.join(handle.path, "objects"), os.O_RDONLY | os.O_CLOEXEC)
            try:
                flags = array.array("i", [0])
                fcntl.ioctl(fd, FS_IOC_GETFLAGS, flags)
                if not flags[0] & FS_TOPDIR_FL:
                    flags[0] |= FS_TOPDIR_FL
                    fcntl.ioctl(fd, FS_IOC_SETFLAGS, flags)
            finally:
                os.close(fd)
    return handle


def common_dir(gitdir: str) -> str:
    """Where refs and objects live: the common directory a linked worktree's `commondir` names,
    else the git directory itself."""
    common = os.path.join(gitdir, "commondir")
    if os.path.isfile(common):
        with open(common, encoding="utf-8") as f:
            return os.path.normpath(os.path.join(gitdir, f.read().strip()))
    return gitdir


class GitRepo:
    """One store's access to its repository (libgit2 handles are not shared by threads)."""

    def __init__(self, path: Path, *, lock_timeout: float, durable: bool) -> None:
        self.path = path
        self.lock_timeout = lock_timeout
        self.durable = durable
        self._local = threading.local()
        self._handles: list[Any] = []
        self._guard = threading.Lock()
        self._closed = False
        self._cache: dict[tuple[str, str], object] = {}
        self._synced_fanouts: set[str] = set()
        self.on_object_written: Callable[[], None] | None = None
        """Called after each loose object this store writes (the packer counts them)."""
        if durable:
            pygit2.settings.enable_fsync_gitdir(True)
        try:
            handle = open_or_create(path)
        except ShardSqlError:
            raise
        except GIT_ERRORS as e:
            raise translate(self, e) from e
        self.gitdir: str = handle.path
        self._local.handle = handle
        self._handles.append(handle)
        self.root = common_dir(self.gitdir)
        self.refs = RefFiles(self.root, path, lock_timeout, durable)
        self.objects_dir = os.path.join(self.root, "objects")
        self.wakeup_files = WakeupFiles.if_supported(os.path.join(self.root, WAKEUPS_DIR))

    def handle(self) -> Any:
        """This thread's pygit2 handle on the repository."""
        if self._closed:
            raise StoreUnavailable(f"git store {self.path} is closed")
        handle = getattr(self._local, "handle", None)
        if handle is None:
            handle = pygit2.Repository(self.gitdir, RepositoryOpenFlag.NO_SEARCH)
            with self._guard:
                self._handles.append(handle)
            self._local.handle = handle
        return handle

    def close(self) -> None:
        """Free the handles; later calls raise `StoreUnavailable`."""
        with self._guard:
            self._closed = True
            handles, self._handles = self._handles, []
        for handle in handles:
            handle.free()
        self._local = threading.local()
        self.refs.close()

    def target(self, handle: Any, ref: str, of: str = "") -> str | None:
        """The object id `ref` (the ref `of` something) points at, None when it does not exist;
        `StoreUnavailable` naming it when libgit2 cannot read it (a damaged ref file)."""
        try:
            found = handle.references.get(ref)
        except pygit2.GitError as e:
            whose = f"{of}: its ref " if of else ""
            raise StoreUnavailable(
                f"git store {self.path}: {whose}{ref} is unreadable ({e}); "
                "docs/git.md says how to repair a damaged ref"
            ) from e
        if found is None:
            return None
        target = found.target
        if not isinstance(target, pygit2.Oid):
            raise StoreUnavailable(f"{ref} is a symbolic ref, not a shard-sql ref")
        return str(target)

    def read(self, handle: Any, oid: str, kind: int) -> bytes:
        """The raw content of object `oid`, which must be of `kind`."""
        for attempt in range(MISS_RETRIES):
            try:
                obj_type, data = handle.odb.read(oid)[:2]
                break
            except pygit2.GitError as e:
                if not isinstance(e, KeyError) or attempt == MISS_RETRIES - 1:
                    raise  # not a miss (NotFoundError), or really missing
                _look_again(handle, attempt)
        if obj_type != kind:
            raise StoreUnavailable(f"object {oid} is a {obj_type!r}, expected {kind!r}")
        return bytes(data)

    def tree(self, handle: Any, oid: str) -> Any:
        """The `pygit2.Tree` of id `oid`; `StoreUnavailable` when it is missing or no tree."""
        for attempt in range(MISS_RETRIES):
            try:
                tree = handle[oid]
                break
            except (KeyError, ValueError) as e:  # what pygit2 raises for a missing or bad id
                if not isinstance(e, KeyError) or attempt == MISS_RETRIES - 1:
                    raise StoreUnavailable(f"tree {oid} is missing or unreadable: {e}") from e
                _look_again(handle, attempt)
        if not isinstance(tree, pygit2.Tree):
            raise StoreUnavailable(f"object {oid} is not a tree")
        return tree

    def entry(self, handle: Any, tree: str, path: str) -> Any:
        """The entry at `path` (`/`-separated) below tree `tree`, not loaded; None when there is
        none. Each tree on the way is read as `tree` reads (pygit2's own path lookup would take
        a tree it misses, see MISS_RETRIES, for a path that does not exist)."""
        *dirs, last = path.split("/")
        node = self.tree(handle, tree)
        try:
            for name in dirs:
                sub = node[name]
                if not isinstance(sub, pygit2.Tree):
                    return None
                node = self.tree(handle, str(sub.id))
            return node[last]
        except KeyError:  # no entry of that name: entries are listed in the loaded tree
            return None

    def lock(
        self,
        handle: Any,
        ref: str,
        deadline: float,
        staged: str | None = None,
        *,
        breakable: bool = False,
    ) -> RefLock:
        """`ref`'s lock (see `RefFiles.lock`)."""
        read = functools.partial(self.target, handle, ref)
        return self.refs.lock(ref, deadline, read, staged=staged, breakable=breakable)

    def objects(self, durable: bool | None = None) -> LooseObjects:
        """A writer of loose objects, synced together by its `sync`; a fan-out directory new to
        this process has its entry in `objects/` synced too."""
        durable = self.durable if durable is None else durable
        return LooseObjects(self.objects_dir, self._synced_fanouts, durable, self.on_object_written)

    def cached(self, key: tuple[str, str], kind: type[T]) -> T | None:
        """What `remember` kept for `key` (a space and an object id), if it is a `kind`."""
        value = self._cache.get(key)
        return value if isinstance(value, kind) else None

    def remember(self, key: tuple[str, str], value: T) -> T:
        """Keep what an object says (objects never change: the id names the content)."""
        if len(self._cache) >= CACHED_OBJECTS:
            self._cache.clear()
        self._cache[key] = value
        return value
