"""Ref files written by git's own lock protocol (`<ref>.lock`, created only if absent, renamed
over the ref), not through libgit2, whose fsync switch is process-wide; and `packed-refs`."""

from __future__ import annotations

import contextlib
import os
import random
import time
from collections.abc import Callable, Sequence

from shard_sql.errors import StoreUnavailable
from shard_sql.git.loose import OBJECT_RETRIES, LooseObjects, fsync_dir

_Stamp = tuple[int, int, int]


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

    def write(self, target: str, objects: LooseObjects | None = None) -> None:
        """Point the ref at `target`, once `objects` (the new ones it reaches) are durable."""
        os.write(self.fd, (target + "\n").encode("ascii"))
        if objects is not None:
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
                fsync_dir(os.path.dirname(self.path))
            except FileNotFoundError:
                # `git pack-refs` packed the new ref (durable by git's own fsync) and pruned its
                # directory meanwhile: only that is success.
                if self.read() != target:
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

    def file(self, ref: str) -> str:
        return os.path.join(self.root, *ref.split("/"))

    def lock(
        self,
        ref: str,
        deadline: float,
        read: Callable[[], str | None],
        *,
        staged: str | None = None,
        durable: bool | None = None,
    ) -> RefLock:
        """Take `ref`'s lock, retrying with back-off while another writer holds it, until
        `deadline` (then `StoreUnavailable` names the lock file: a writer killed under it leaves
        it behind, and nothing proves it abandoned, so it is never removed automatically).

        `read` reads the ref's target; `staged`: a file beside the ref holding its new content
        (see `stage`), which becomes the lock file (a hard link: created only if absent).
        """
        path = self.file(ref)
        lock = path + ".lock"
        durable = self.durable if durable is None else durable
        backoff = 0.0005
        while True:
            try:
                if staged is not None:
                    os.link(staged, lock)
                    return RefLock(path, -1, read, durable)
                fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
                return RefLock(path, fd, read, durable)
            except FileNotFoundError:
                # The ref's first write, or `git pack-refs` removed its emptied directory (maybe
                # a parent too, even while it is made again: then the next round makes it).
                _make_dirs(os.path.dirname(path))
                if time.monotonic() < deadline:
                    continue
            except FileExistsError:
                pass
            if time.monotonic() >= deadline:
                raise StoreUnavailable(
                    f"git store {self.store}: {ref} stayed locked for {self.lock_timeout}s; "
                    f"if no writer is running, a crashed one left {lock} behind: remove it"
                )
            time.sleep(backoff * random.uniform(0.5, 1.5))
            backoff = min(backoff * 2, 0.02)

    def stage(self, ref: str, target: str, objects: LooseObjects) -> str:
        """A new file beside `ref` holding `target`, fsynced in one round with `objects`, before
        the ref's lock is taken: the lock is then held for a check, a rename and a directory
        fsync only (a writer killed under it leaves a lock behind that blocks its space until an
        operator removes it, so the shorter the better).

        Named `<ref>.<random>.lock`: git and libgit2 skip `*.lock` files when they list refs, and
        no ref name has a `.` (`encode_name`), so it is nobody's lock.
        """
        path = self.file(ref)
        for attempt in range(OBJECT_RETRIES):
            _make_dirs(os.path.dirname(path))
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

    def create(
        self, ref: str, target: str, deadline: float, read: Callable[[], str | None]
    ) -> None:
        """Create `ref` at `target` unless it exists (checked under its lock), without fsync."""
        lock = self.lock(ref, deadline, read, durable=False)
        try:
            if read() is None:  # else another creator was first
                lock.write(target)
        finally:
            lock.free()

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
