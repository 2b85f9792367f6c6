"""The git adapter across processes: racing appends and leases, `git gc` beside writers.

Workers run in `spawn`ed processes, each opening the repository on its own, as separate programs
would; they share nothing but the files.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import random
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from shard_sql import GitEventStore, LeaseHeld, LeaseRegistry, SeqConflict, StoreUnavailable
from shard_sql.git.layout import FEED, lease_ref, space_ref

pytestmark = pytest.mark.slow

CTX = multiprocessing.get_context("spawn")
SHARED_INTENTS = 8


def append_worker(path: str, worker: int, count: int, barrier: Any, out: Any) -> None:
    store = GitEventStore(path)
    acks: list[tuple[int, int, int]] = []
    shared: dict[str, int] = {}
    conflicts = 0
    barrier.wait()
    for i in range(count):
        while True:
            head = store.head("s")
            try:
                e = store.append("s", "t", {"w": worker, "i": i}, expected_seq=head)
            except SeqConflict:
                conflicts += 1
                continue
            acks.append((e.seq, worker, i))
            break
        if i % 3 == 0 and len(shared) < SHARED_INTENTS:  # every worker races for the same ids
            key = f"shared-{len(shared)}"
            while True:
                try:
                    e = store.append(
                        "s", "t", {"shared": key}, expected_seq=store.head("s"), intent_id=key
                    )
                except SeqConflict:
                    continue
                shared[key] = e.seq
                break
    store.close()
    out.put((worker, acks, shared, conflicts))


def lease_worker(path: str, worker: int, rounds: int, barrier: Any, out: Any) -> None:
    store = GitEventStore(path)
    reg = LeaseRegistry(store)
    won: list[int] = []
    held = 0
    barrier.wait()
    while len(won) < rounds:
        try:
            lease = reg.acquire("s", f"p{worker}", 30)
        except LeaseHeld:
            held += 1
            time.sleep(random.uniform(0, 0.002))
            continue
        won.append(lease.generation)
        store.append("s", "t", {"w": worker}, expected_seq=store.head("s"), fence=lease)
        reg.release(lease)
    store.close()
    out.put((worker, won, held))


def writer_beside_gc(path: str, count: int, out: Any) -> None:
    store = GitEventStore(path)
    reg = LeaseRegistry(store)
    lease = reg.acquire("s", "writer", 60)
    acked = []
    for i in range(count):
        e = store.append("s", "t", {"i": i}, expected_seq=i, fence=lease, intent_id=f"k{i}")
        acked.append(e.seq)
        if i % 10 == 0:
            lease = reg.renew(lease)
        store.append("other", "t", {"i": i}, expected_seq=i)
    store.close()
    out.put(acked)


def lock_and_hang(path: str, ref: str, ready: Any) -> None:
    import pygit2

    repo = pygit2.Repository(path)
    tx = repo.transaction()
    tx.lock_ref(ref)  # as a writer does between its check and its ref update
    ready.set()
    time.sleep(60)


def change_lease_and_hang(path: str, change: str, ready: Any) -> None:
    """Take a lease, then make `change` to it and hang with the lease ref's lock taken, as a
    holder does between its lock and its rename (a renewal every TTL/2)."""
    from shard_sql.git.refs import RefLock

    reg = LeaseRegistry(GitEventStore(path))
    lease = reg.acquire("s", "victim", ttl_seconds=0.5)

    def hang(*args: Any, **kwargs: Any) -> None:
        ready.set()
        time.sleep(60)

    RefLock.commit = hang  # type: ignore[method-assign]
    if change == "renew":
        reg.renew(lease, ttl_seconds=0.5)
    elif change == "release":
        reg.release(lease)
    else:
        time.sleep(0.6)  # expired: a grant to another holder
        reg.acquire("s", "other", ttl_seconds=0.5)


def record_intent_and_hang(path: str, ready: Any) -> None:
    """Record an intent and hang just before its ref is made (killed there by the test)."""
    import shard_sql.git.refs as refs
    from shard_sql.validation import pending

    def hang(*args: Any, **kwargs: Any) -> None:
        ready.set()
        time.sleep(60)

    refs.os.link = hang  # type: ignore[assignment]
    GitEventStore(path).put_intent("s", pending("t", {"n": 1}, "k1"), holder="h")


def run_workers(target: Any, args: list[tuple[Any, ...]], timeout: float = 60) -> list[Any]:
    out = CTX.Queue()
    barrier = CTX.Barrier(len(args))
    procs = [CTX.Process(target=target, args=(*a, barrier, out)) for a in args]
    for p in procs:
        p.start()
    results = [out.get(timeout=timeout) for _ in procs]
    for p in procs:
        p.join(timeout)
        assert p.exitcode == 0
    return results


def collect(out: Any, proc: Any, timeout: float = 60) -> Any:
    """The result `proc` puts on `out`; fails fast if the process died without one."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return out.get(timeout=0.2)
        except queue.Empty:
            assert proc.is_alive() or proc.exitcode == 0, f"worker died: {proc.exitcode}"
            assert time.monotonic() < deadline, "worker timed out"


def fsck(path: Path) -> None:
    r = subprocess.run(
        ["git", "-C", str(path), "fsck", "--strict", "--no-dangling", "--full"],
        capture_output=True,
        text=True,
        check=False,
    )
    lines = [x for x in (r.stdout + r.stderr).splitlines() if x and not x.startswith("notice:")]
    assert r.returncode == 0 and not lines, r.stdout + r.stderr


def test_four_processes_append_with_retry(tmp_path: Path) -> None:
    path = tmp_path / "log.git"
    GitEventStore(path).close()
    count = 30
    results = run_workers(append_worker, [(str(path), w, count) for w in range(4)])
    store = GitEventStore(path)
    events = store.events("s")
    assert [e.seq for e in events] == list(range(len(events)))
    acks = [a for _, worker_acks, _, _ in results for a in worker_acks]
    assert len(acks) == 4 * count
    by_seq = {e.seq: e for e in events}
    for seq, w, i in acks:  # each acknowledged append is at its seq, exactly once
        assert by_seq[seq].payload == {"w": w, "i": i}
    plain = [e for e in events if "w" in e.payload]
    assert sorted((e.payload["w"], e.payload["i"]) for e in plain) == sorted(
        (w, i) for _, w, i in acks
    )
    shared = [e for e in events if "shared" in e.payload]
    assert sorted(e.intent_id or "" for e in shared) == sorted(
        f"shared-{k}" for k in range(SHARED_INTENTS)
    )
    for _, _, seen, _ in results:  # every worker got the one event of each shared intent
        for key, seq in seen.items():
            assert by_seq[seq].intent_id == key
    assert len(events) == 4 * count + SHARED_INTENTS
    store.close()
    fsck(path)


def test_four_processes_race_for_the_lease(tmp_path: Path) -> None:
    path = tmp_path / "log.git"
    GitEventStore(path).close()
    rounds = 6
    results = run_workers(lease_worker, [(str(path), w, rounds) for w in range(4)])
    owner = {}
    for worker, won, _ in results:
        for g in won:
            assert g not in owner, f"generation {g} granted twice"
            owner[g] = f"p{worker}"
    assert sorted(owner) == list(range(1, 4 * rounds + 1))
    store = GitEventStore(path)
    events = store.events("s")
    assert [e.seq for e in events] == list(range(4 * rounds))
    assert [e.generation for e in events] == list(range(1, 4 * rounds + 1))
    assert all(e.writer == owner[e.generation] for e in events)
    assert sum(held for _, _, held in results) > 0  # they did race
    store.close()
    fsck(path)


def test_gc_beside_a_writer_loses_nothing(tmp_path: Path) -> None:
    path = tmp_path / "log.git"
    GitEventStore(path).close()
    out = CTX.Queue()
    count = 120
    writer = CTX.Process(target=writer_beside_gc, args=(str(path), count, out))
    writer.start()
    reader = GitEventStore(path)
    rounds = 0
    deadline = time.monotonic() + 60
    while writer.is_alive() and time.monotonic() < deadline:
        for cmd in (["gc", "--quiet"], ["pack-refs", "--all", "--prune"], ["repack", "-adq"]):
            subprocess.run(["git", "-C", str(path), *cmd], capture_output=True, check=False)
        got = reader.events("s")  # reads beside gc see a prefix, never a hole
        assert [e.payload["i"] for e in got] == list(range(len(got)))
        rounds += 1
    acked = collect(out, writer)
    writer.join(60)
    assert writer.exitcode == 0 and rounds > 0
    assert acked == list(range(count))
    subprocess.run(["git", "-C", str(path), "gc", "--quiet"], check=True)
    packed = (path / "packed-refs").read_text()
    assert space_ref("s") in packed
    events = GitEventStore(path).events("s")
    assert [e.payload["i"] for e in events] == list(range(count))
    assert [e.intent_id for e in events] == [f"k{i}" for i in range(count)]
    assert GitEventStore(path).head("other") == count
    fsck(path)


def test_a_killed_git_holding_the_feed_lock(tmp_path: Path) -> None:
    """A lock that is not a shard_sql writer's (libgit2's here) is never taken for abandoned:
    writes fail with a typed error telling the operator to remove it; nothing changed."""
    path = tmp_path / "log.git"
    store = GitEventStore(path, lock_timeout=0.3)
    first = store.append("s", "t", {"n": 0}, expected_seq=0)
    ready = CTX.Event()
    victim = CTX.Process(target=lock_and_hang, args=(str(path), FEED, ready))
    victim.start()
    assert ready.wait(30)
    os.kill(victim.pid, signal.SIGKILL)  # type: ignore[arg-type]
    victim.join(30)
    lock = path / (FEED + ".lock")
    assert lock.exists()
    with pytest.raises(StoreUnavailable, match="remove it"):
        store.append("s", "t", {"n": 1}, expected_seq=1)
    assert store.events("s") == [first]
    fsck(path)
    lock.unlink()  # what the error message tells the operator to do
    assert store.append("s", "t", {"n": 1}, expected_seq=1).seq == 1
    store.close()
    fsck(path)


@pytest.mark.parametrize("change", ["renew", "release", "grant"])
def test_a_holder_killed_while_changing_its_lease(tmp_path: Path, change: str) -> None:
    """A lease change killed with the lease ref's lock taken leaves a lock file that the next
    change of that lease removes (it was taken under the write mutex, now free): the lease is
    granted again, where a lock left for good would stop the space (or a consumer) forever."""
    path = tmp_path / "log.git"
    GitEventStore(path).close()
    ready = CTX.Event()
    victim = CTX.Process(target=change_lease_and_hang, args=(str(path), change, ready))
    victim.start()
    assert ready.wait(30)
    lock = path / (lease_ref("s") + ".lock")
    assert lock.exists()
    os.kill(victim.pid, signal.SIGKILL)  # type: ignore[arg-type]
    victim.join(30)
    assert lock.exists()
    time.sleep(0.6)  # the victim's lease expired
    store = GitEventStore(path, lock_timeout=5)
    reg = LeaseRegistry(store)
    lease = reg.acquire("s", "next", ttl_seconds=5)
    assert lease.holder == "next" and not lock.exists()
    assert store.append("s", "t", {}, expected_seq=0, fence=lease).seq == 0
    assert reg.renew(lease).generation == lease.generation
    store.close()
    assert not [p.name for p in path.rglob("*") if "tmp_obj_ref_" in p.name]  # staged files
    fsck(path)


def test_a_sender_killed_while_recording_an_intent(tmp_path: Path) -> None:
    """A sender killed while it records an intent leaves no lock file (only its staged file):
    the retry of that intent id from another process records it at once."""
    from shard_sql.validation import pending

    path = tmp_path / "log.git"
    GitEventStore(path).close()
    ready = CTX.Event()
    victim = CTX.Process(target=record_intent_and_hang, args=(str(path), ready))
    victim.start()
    assert ready.wait(30)
    os.kill(victim.pid, signal.SIGKILL)  # type: ignore[arg-type]
    victim.join(30)
    assert not list((path / "refs").rglob("*.lock"))
    store = GitEventStore(path, lock_timeout=0.3)
    store.put_intent("s", pending("t", {"n": 2}, "k1"), holder="h2")
    assert [(p.intent_id, p.payload) for p in store.pending_intents("s", limit=10)] == [
        ("k1", {"n": 2})
    ]
    store.close()
    fsck(path)
