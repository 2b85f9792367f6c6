"""Packing a git store as it grows (issue 13 item 17): loose objects go into packs, beside live
writers and readers, and nothing written is ever lost."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import pygit2
import pytest

from shard_sql import GitEventStore, InvalidEvent, LeaseRegistry, StoreUnavailable
from shard_sql.git import Maintenance
from shard_sql.git.packing import LOCK_FILE, loose_objects, pack_size, packs_to_merge
from shard_sql.wake import inotify_libc


def git(repo: Path, *args: str) -> str:
    r = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=False)
    assert r.returncode == 0, f"git {' '.join(args)}: {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r.stdout


def fsck(repo: Path) -> None:
    r = subprocess.run(
        ["git", "-C", str(repo), "fsck", "--strict", "--no-dangling", "--full"],
        capture_output=True,
        text=True,
        check=False,
    )
    lines = [x for x in (r.stdout + r.stderr).splitlines() if x and not x.startswith("notice:")]
    assert r.returncode == 0 and not lines, r.stdout + r.stderr


def packs(repo: Path) -> list[Path]:
    return sorted((repo / "objects" / "pack").glob("pack-*.pack"))


def test_packs_to_merge_keeps_sizes_geometric() -> None:
    assert packs_to_merge([]) == 0
    assert packs_to_merge([5]) == 0
    assert packs_to_merge([100, 300, 1000]) == 0  # a progression already
    assert packs_to_merge([100, 100]) == 2
    assert packs_to_merge([300, 500]) == 2
    assert packs_to_merge([100, 150, 1000]) == 2  # the big one stays
    assert packs_to_merge([2000, 2000, 4000, 8000]) == 4  # merged, each next one is too small
    sizes = [2000]
    rewritten = 0
    for _ in range(200):  # 200 runs of 2000 new objects: few packs, each object rewritten rarely
        sizes.sort()
        k = packs_to_merge(sizes)
        merged = sum(sizes[:k])
        rewritten += merged
        sizes = [*sizes[k:], merged + 2000]
    assert len(sizes) <= 10
    assert rewritten <= 200 * 2000 * 10


def test_appends_pack_as_the_store_grows(tmp_path: Path) -> None:
    path = tmp_path / "r.git"
    store = GitEventStore(path, durable=False, pack_every=100)
    reg = LeaseRegistry(store)
    lease = reg.acquire("s", "node", 60)
    written = [
        store.append("s", "t", {"i": i}, expected_seq=i, fence=lease, intent_id=f"k{i}")
        for i in range(1000)
    ]
    store.close()  # waits for a run in progress
    loose = len(loose_objects(str(path / "objects")))
    packed = sum(pack_size(str(p.with_suffix(".idx"))) for p in packs(path))
    assert loose < (loose + packed) / 4  # all ~9,000 objects were loose
    assert 1 <= len(packs(path)) <= 12  # about log2(runs)
    again = GitEventStore(path, pack_every=0)
    assert again.events("s") == written
    assert again.append("s", "t", {"i": 5}, expected_seq=1000, intent_id="k5") == written[5]
    again.close()
    fsck(path)


def test_maintain(tmp_path: Path) -> None:
    path = tmp_path / "r.git"
    store = GitEventStore(path, pack_every=0)
    assert store.maintain() == Maintenance(0, 0, 0, 0)  # nothing to pack
    store.append_many("s", [("t", {"i": i}) for i in range(300)], expected_seq=0)
    done = store.maintain()
    assert done.packed >= 300 and done.loose_removed == done.packed and done.packs == 1
    assert loose_objects(str(path / "objects")) == []
    (kept,) = packs(path)
    kept.with_suffix(".keep").write_text("")  # git's mark: never repacked
    store.append_many("s", [("t", {"i": i}) for i in range(300, 600)], expected_seq=300)
    store.maintain()
    store.append("s", "t", {}, expected_seq=600)
    assert store.maintain().merged_packs == 0  # the other pack, of about the same size: kept
    assert kept.exists() and len(packs(path)) == 3
    kept.with_suffix(".keep").unlink()
    store.append("s", "t", {}, expected_seq=601)
    assert store.maintain().merged_packs == 3
    assert not kept.exists() and len(packs(path)) == 1
    assert [e.seq for e in store.events("s")] == list(range(602))
    store.close()
    with pytest.raises(StoreUnavailable):
        store.maintain()
    with pytest.raises(InvalidEvent):
        GitEventStore(path, pack_every=-1)
    fsck(path)


def test_one_packer_at_a_time(tmp_path: Path) -> None:
    """A background run does nothing while another process packs (it holds the lock file)."""
    import fcntl

    from shard_sql.git.packing import pack

    path = tmp_path / "r.git"
    store = GitEventStore(path, pack_every=0)
    store.append_many("s", [("t", {}) for _ in range(10)], expected_seq=0)
    fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert pack(store._git, wait=False).packed == 0  # type: ignore[attr-defined]
    finally:
        os.close(fd)
    assert store.maintain().packed > 0
    store.close()


def _names_appearing(directory: Path, run: Callable[[], object]) -> list[str]:
    """The names that appear in `directory` (created, or renamed into it) while `run` runs, in
    order (inotify)."""
    libc = inotify_libc()
    fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
    assert fd >= 0
    try:
        in_create, in_moved_to = 0x100, 0x80
        assert libc.inotify_add_watch(fd, str(directory).encode(), in_create | in_moved_to) >= 0
        run()
        names = []
        while True:
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                return names
            offset = 0
            while offset < len(data):  # struct inotify_event: int wd; u32 mask, cookie, len; name
                size = int.from_bytes(data[offset + 12 : offset + 16], sys.byteorder)
                name = data[offset + 16 : offset + 16 + size].rstrip(b"\0").decode()
                names.append(name)
                offset += 16 + size
    finally:
        os.close(fd)


@pytest.mark.skipif(inotify_libc() is None, reason="watches the pack directory with inotify")
def test_a_new_pack_appears_before_its_index(tmp_path: Path) -> None:
    """The race of issue 13 item 17: libgit2 puts a new pack's index in place first, then the
    pack. `git gc` deletes an index without its pack as garbage (`warning: no corresponding
    .pack`); between the two renames it saw one, deleted it after the pack arrived, and the
    loose objects the pack held were deleted too: gone (`NotFoundError`). A pack must appear
    before its index, as git writes them."""
    path = tmp_path / "r.git"
    store = GitEventStore(path, pack_every=0)
    store.append_many("s", [("t", {"i": i}) for i in range(50)], expected_seq=0)
    names = _names_appearing(path / "objects" / "pack", store.maintain)
    (pack_file,) = packs(path)
    final = [n for n in names if n.startswith(pack_file.stem)]
    assert final[0] == pack_file.name and final[-1] == pack_file.stem + ".idx", names
    assert not [n for n in os.listdir(path / "objects") if n.startswith("tmp")]
    store.close()
    fsck(path)


def test_a_pack_written_again_keeps_its_loose_objects(tmp_path: Path) -> None:
    """Writers write an object loose again after it was packed; the same objects pack into the
    same bytes, under the same name. That pack may be one a `git repack -d` beside listed at its
    start and deletes at its end: its loose copies are kept, for a later run."""
    path = tmp_path / "r.git"
    store = GitEventStore(path, pack_every=0)
    store.append_many("s", [("t", {"i": i}) for i in range(50)], expected_seq=0)
    loose = loose_objects(str(path / "objects"))
    handle = pygit2.Repository(str(path))
    raw = [handle.odb.read(oid)[:2] for oid in loose]
    handle.free()
    first = store.maintain()
    assert first.loose_removed == len(loose) and loose_objects(str(path / "objects")) == []
    again = store._git.objects()  # type: ignore[attr-defined]
    assert sorted(again.put(kind, bytes(data)) for kind, data in raw) == sorted(loose)
    assert store.maintain() == Maintenance(first.packed, 0, 0, 1)  # the same pack, in place
    assert sorted(loose_objects(str(path / "objects"))) == sorted(loose)
    store.append("s", "t", {}, expected_seq=50)
    assert store.maintain().loose_removed > len(loose)  # another pack: removed
    assert [e.seq for e in store.events("s")] == list(range(51))
    store.close()
    fsck(path)


def test_no_pack_deleted_while_git_gc_runs(tmp_path: Path) -> None:
    """`git gc`'s repack lists the packs when it starts and fails ("unable to add recent
    objects") when one of them has gone when it reads it: while a `gc.pid` says a gc runs,
    merged packs are left for a later run (their objects are in the new pack too)."""
    path = tmp_path / "r.git"
    store = GitEventStore(path, pack_every=0)
    for n in range(2):
        store.append_many("s", [("t", {"i": i}) for i in range(100)], expected_seq=100 * n)
        store.maintain()
    assert len(packs(path)) == 2
    host = socket.gethostname()
    (path / "gc.pid").write_text(f"{os.getpid()} {host}")  # as git writes it; this one lives
    store.append("s", "t", {}, expected_seq=200)
    assert store.maintain().merged_packs == 0
    assert len(packs(path)) == 3 and loose_objects(str(path / "objects")) == []
    gone = subprocess.Popen([sys.executable, "-c", ""])
    gone.wait()  # a process that ended
    (path / "gc.pid").write_text(f"{gone.pid} {host}")  # a gc killed on this host
    store.append("s", "t", {}, expected_seq=201)
    assert store.maintain().merged_packs == 3
    assert len(packs(path)) == 1
    assert [e.seq for e in store.events("s")] == list(range(202))
    store.close()
    fsck(path)


def test_what_gc_pid_says(tmp_path: Path) -> None:
    from shard_sql.git.packing import _gc_running

    pid = tmp_path / "gc.pid"
    assert not _gc_running(str(tmp_path))
    pid.write_text(f"{os.getpid()} {socket.gethostname()}")
    assert _gc_running(str(tmp_path))
    pid.write_text("1 another-host")  # a gc on another host: git leaves it alone, and so do we
    assert _gc_running(str(tmp_path))
    stale = time.time() - 13 * 3600  # ... unless it is older than 12 hours, as git takes it
    os.utime(pid, (stale, stale))
    assert not _gc_running(str(tmp_path))
    pid.write_text("garbage")
    assert not _gc_running(str(tmp_path))


MAINTAIN = """
import sys
from shard_sql import GitEventStore
store = GitEventStore(sys.argv[1], pack_every=0)
for _ in range(int(sys.argv[2])):
    store.maintain()
store.close()
"""


WRITES = 2000
"""Appends per writer beside the packers, at most (they stop when the packers are done)."""


@pytest.mark.slow
def test_packing_beside_writers_and_readers(tmp_path: Path) -> None:
    """Writers (fenced appends, forwarded-intent records), readers, this process's `maintain`,
    another process's and `git gc` all at once: every acknowledged event is read back as
    written, no read fails, and git finds nothing wrong."""
    path = tmp_path / "r.git"
    GitEventStore(path).close()
    stop = threading.Event()
    acked: dict[str, list[object]] = {}
    errors: list[BaseException] = []

    def writer(space: str) -> None:
        store = GitEventStore(path, pack_every=50)
        lease = LeaseRegistry(store).acquire(space, space, 600)
        acked[space] = []
        try:
            for i in range(WRITES):
                if stop.is_set():
                    break
                e = store.append(
                    space, "t", {"i": i}, expected_seq=i, fence=lease, intent_id=f"{i}"
                )
                acked[space].append(e)
        except BaseException as e:
            errors.append(e)
        store.close()

    def reader() -> None:
        store = GitEventStore(path, pack_every=0)
        try:
            while not stop.is_set():
                for space in store.spaces():
                    head = store.head(space)
                    if head:
                        start = random.randrange(head)
                        got = [e.seq for e in store.events(space, from_seq=start, limit=300)]
                        assert got == list(range(start, start + len(got)))
                        assert len(got) >= min(head - start, 300)  # appends only add
                    # A reader that never waits holds the GIL: the writers' and packers' every
                    # system call then waits for it (5 ms each), and the test took 75 s, not 2.
                    time.sleep(0.002)
        except BaseException as e:
            errors.append(e)
        store.close()

    threads = [threading.Thread(target=writer, args=(f"w{n}",)) for n in range(2)]
    threads += [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    store = GitEventStore(path, pack_every=0)
    try:  # a failure here must still stop the threads
        other = subprocess.Popen(
            [sys.executable, "-c", MAINTAIN, str(path), "40"], stderr=subprocess.PIPE, text=True
        )
        runs = [store.maintain() for _ in range(20)]
        gc = subprocess.run(
            ["git", "-C", str(path), "gc", "--quiet"], timeout=120, capture_output=True, text=True
        )
        runs += [store.maintain() for _ in range(20)]
        assert other.wait(timeout=120) == 0, other.communicate()[1]
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert not errors, [traceback.format_exception(e) for e in errors]
    assert gc.returncode == 0, gc.stderr
    assert any(r.packed for r in runs) and any(r.merged_packs for r in runs)
    for space, events in acked.items():
        assert len(events) >= 5  # appends went on beside the packing
        assert store.events(space) == events
    store.maintain()
    store.close()
    fsck(path)
