"""The feed, transactions, checkpoints and subscriptions on the git store: the contract suites,
the layout, the placing of events written before the feed, and writers killed at every step of
a commit."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import signal
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from shard_sql import GitEventStore, LeaseRegistry, SeqConflict, StoreUnavailable
from shard_sql.git.feed import SNAPSHOT_EVERY
from shard_sql.git.layout import CHUNK, FEED, space_ref
from shard_sql.ports import EventStore
from shard_sql.testing import (
    AdapterCase,
    AuthorityTransactionContract,
    FeedContract,
    SubscriptionContract,
    TransactionContract,
)
from shard_sql.validation import pending

CTX = multiprocessing.get_context("spawn")


class Git(AdapterCase):
    def make_store(self) -> EventStore:
        return GitEventStore(self.tmp_path / "log.git")

    def store_url(self) -> str | None:
        return f"git+file://{self.tmp_path / 'log.git'}"


class TestGitFeed(Git, FeedContract):
    pass


class TestGitTransactions(Git, TransactionContract):
    pass


class TestGitNodeTransactions(Git, AuthorityTransactionContract):
    pass


class TestGitSubscription(Git, SubscriptionContract):
    pass


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), *args], capture_output=True, text=True, check=True
    ).stdout


def fsck(repo: Path) -> None:
    r = subprocess.run(
        ["git", "-C", str(repo), "fsck", "--strict", "--no-dangling", "--full"],
        capture_output=True,
        text=True,
        check=False,
    )
    lines = [x for x in (r.stdout + r.stderr).splitlines() if x and not x.startswith("notice:")]
    assert r.returncode == 0 and not lines, r.stdout + r.stderr


def consistent(store: GitEventStore) -> list[Any]:
    """The feed and the spaces tell one story: every event of every space once in the feed, at
    the position its space read gives, positions increasing, each space in seq order."""
    feed = store.feed()
    positions = [e.position for e in feed]
    assert positions == list(range(1, len(feed) + 1))  # git's positions have no gaps
    by_space: dict[str, list[Any]] = {}
    for e in feed:
        by_space.setdefault(e.space, []).append(e)
    assert sorted(by_space) == store.spaces()
    for space, events in by_space.items():
        read = store.events(space)
        assert read == events
        assert [e.position for e in read] == [e.position for e in events]
        assert [e.seq for e in read] == list(range(len(read)))
    assert store.feed_head() == len(feed)
    return feed


# -- the layout ----------------------------------------------------------------------------------


def test_one_feed_commit_per_write_readable_with_git(tmp_path: Path) -> None:
    """A write's feed commit names what it wrote (its message; its parents: the previous feed
    commit and the spaces' new tips); every SNAPSHOT_EVERY writes, a snapshot's tree holds it
    all. The spaces' refs follow, for git's own tools; the feed ref alone reaches everything."""
    path = tmp_path / "r.git"
    store = GitEventStore(path)
    store.append("a", "t", {}, expected_seq=0)
    with store.transaction() as tx:
        tx.append_many("a", [("t", {}), ("t", {})])
        tx.append("wiki pages", "t", {})
        tx.save_checkpoint("reader", 1)
    assert git(path, "rev-list", "--count", "--first-parent", FEED) == "3\n"  # with the root
    subject = git(path, "log", "-1", "--format=%s", FEED)
    assert subject == "feed 2..4: 3 events in 2 spaces\n"
    record = json.loads(
        git(path, "log", "-1", "--format=%(trailers:key=Shard-Sql-Feed,valueonly)", FEED)
    )
    assert (record["spaces"], record["seqs"], record["of"]) == (
        ["a", "wiki pages"],
        [1, 0],
        [0, 0, 1],
    )
    assert record["checkpoints"] == {"reader": 1} and record["since"] == 2
    assert git(path, "ls-tree", FEED) == ""  # no snapshot yet: the first one's (empty) tree
    for i in range(SNAPSHOT_EVERY - 2):
        store.append("a", "t", {}, expected_seq=3 + i)
    assert git(path, "log", "-1", "--format=%s", FEED).endswith(" (snapshot)\n")
    tree = git(path, "ls-tree", "-r", "--name-only", FEED).split()
    assert any(p.endswith("/wiki%20pages/tip") for p in tree)
    assert any(p.startswith("checkpoints/") and p.endswith("/reader") for p in tree)
    fresh = GitEventStore(path)
    assert fresh.feed() == store.feed() and fresh.checkpoint("reader") == 1
    assert [e.position for e in fresh.events("a")] == [e.position for e in store.events("a")]
    fresh.close()
    for space in ("a", "wiki pages"):
        assert git(path, "rev-list", "--count", space_ref(space)) == f"{store.head(space)}\n"
    copy = tmp_path / "copy.git"
    git(tmp_path, "init", "-q", "--bare", str(copy))
    git(copy, "fetch", "-q", str(path), f"{FEED}:{FEED}")
    replica = GitEventStore(copy)
    assert replica.feed() == store.feed() and replica.spaces() == ["a", "wiki pages"]
    assert replica.checkpoint("reader") == 1
    replica.close()
    store.close()
    fsck(path)


def test_positions_across_chunks(tmp_path: Path) -> None:
    """Feed positions and space seqs cross their index chunks at different places."""
    store = GitEventStore(tmp_path / "r.git", durable=False)
    store.append_many("big", [("t", {"i": i}) for i in range(CHUNK + 7)], expected_seq=0)
    for i in range(2 * CHUNK):
        space = f"s{i % 3}"
        store.append(space, "t", {"i": i}, expected_seq=store.head(space))
    with store.transaction() as tx:
        tx.append_many("big", [("t", {}) for _ in range(CHUNK * 3)])
        tx.append("s0", "t", {})
    feed = consistent(store)
    assert len(feed) == 6 * CHUNK + 8
    for after in (0, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 5, len(feed) - 1):
        assert store.feed(after, limit=300) == feed[after : after + 300]
    assert list(store.iter_feed(CHUNK - 3)) == feed[CHUNK - 3 :]
    fresh = GitEventStore(tmp_path / "r.git")
    assert fresh.events("big", from_seq=CHUNK - 2, limit=5) == store.events("big")[CHUNK - 2 :][:5]
    assert [e.position for e in fresh.events("s1")] == [e.position for e in store.events("s1")]
    fresh.close()
    store.close()
    fsck(tmp_path / "r.git")


def test_transaction_on_a_space_moved_by_another_writer(tmp_path: Path) -> None:
    """A transaction reads the feed of its first call; a space another writer moved before its
    end is a SeqConflict and nothing of the block is written; spaces others wrote meanwhile are
    no conflict (the feed commit is made again on theirs)."""
    store = GitEventStore(tmp_path / "r.git")
    other = GitEventStore(tmp_path / "r.git")
    with pytest.raises(SeqConflict), store.transaction() as tx:
        tx.append("a", "t", {})
        tx.append("b", "t", {})
        other.append("a", "t", {"other": True}, expected_seq=0)
    assert store.head("b") == 0 and store.head("a") == 1
    with store.transaction() as tx:
        tx.append("a", "t", {})
        other.append("c", "t", {}, expected_seq=0)
        tx.save_checkpoint("x", 2)
    assert [e.space for e in consistent(store)] == ["a", "c", "a"]
    assert store.checkpoint("x") == 2
    other.close()
    store.close()


def test_a_checkpoint_check_is_as_if_the_block_ran_at_its_commit(tmp_path: Path) -> None:
    """Two blocks that both save n - 1, then n (eventsourcing's tracking records): the second
    to commit fails, as it would had it run after the first."""
    store = GitEventStore(tmp_path / "r.git")
    other = GitEventStore(tmp_path / "r.git")
    with pytest.raises(SeqConflict), store.transaction() as tx:
        tx.save_checkpoint("up", 0)
        tx.save_checkpoint("up", 1)
        tx.append("a", "t", {})
        with other.transaction() as first:
            first.save_checkpoint("up", 0)
            first.save_checkpoint("up", 1)
    assert store.checkpoint("up") == 1 and store.head("a") == 0
    other.close()
    store.close()


# -- repositories written before the feed ---------------------------------------------------------


def test_events_written_before_the_feed_get_positions_on_open(tmp_path: Path) -> None:
    """Order: the latest recorded_at so far in the space, then space, then seq (a clock that
    went back within a space keeps the space's seq order)."""
    path = tmp_path / "r.git"
    store = GitEventStore(path)
    t0 = datetime(2026, 1, 1, tzinfo=UTC)

    def at(seconds: float, **payload: Any) -> Any:
        return dataclasses.replace(
            pending("t", payload), recorded_at=t0 + timedelta(seconds=seconds)
        )

    store.write("b", [at(1, n="b0"), at(3, n="b1")], expected_seq=0, fence=None)
    store.write("a", [at(2, n="a0"), at(0, n="a1"), at(3, n="a2")], expected_seq=0, fence=None)
    store.write("long", [at(10 + i, n=i) for i in range(CHUNK + 3)], expected_seq=0, fence=None)
    store.close()
    git(path, "update-ref", "-d", FEED)  # as written by a version without the feed
    git(path, "pack-refs", "--all")  # some refs packed, as `git gc` leaves them
    reopened = GitEventStore(path)
    feed = consistent(reopened)
    names = [e.payload["n"] for e in feed]
    assert names[:5] == ["b0", "a0", "a1", "a2", "b1"]
    assert names[5:] == list(range(CHUNK + 3))
    head = git(path, "rev-parse", FEED)
    assert GitEventStore(path).feed() == feed  # placed once
    assert git(path, "rev-parse", FEED) == head
    reopened.append("a", "t", {"n": "after"}, expected_seq=3)
    assert reopened.feed(len(feed))[0].position == len(feed) + 1
    reopened.close()
    fsck(path)


def test_a_damaged_legacy_space_stops_the_placing(tmp_path: Path) -> None:
    path = tmp_path / "r.git"
    store = GitEventStore(path)
    store.append("a", "t", {}, expected_seq=0)
    store.close()
    git(path, "update-ref", "-d", FEED)
    (path / space_ref("a")).write_text("garbage\n")
    with pytest.raises(StoreUnavailable, match="unreadable"):
        GitEventStore(path)
    assert not (path / FEED).exists()


# -- locks and writers killed mid-commit -----------------------------------------------------------


def hang_at(path: str, where: str, ready: Any) -> None:
    """Write an event, and stop for good at `where`: holding the write mutex and the feed's lock
    before the feed moves ("commit"), or after it moved, before the space refs follow
    ("update_cache"); or, finding a dead writer's lock on the feed, once the first of the two
    files that lock is made of is removed ("break")."""
    from shard_sql.git import refs

    if where == "break":
        unlink = os.unlink

        def unlink_then_stop(name: Any, *args: Any, **kwargs: Any) -> None:
            unlink(name, *args, **kwargs)
            if "/refs/shard-sql/feed" in str(name) and str(name).endswith(".lock"):
                ready.set()
                time.sleep(600)

        os.unlink = unlink_then_stop  # type: ignore[assignment]
        GitEventStore(path).append("victim", "t", {}, expected_seq=0)
        return
    original = getattr(refs.RefLock if where == "commit" else refs.RefFiles, where)

    def stop(*args: Any, **kwargs: Any) -> Any:
        if where == "update_cache":
            ready.set()
            time.sleep(600)
        if where == "commit" and str(args[0].path).endswith("/feed"):
            ready.set()
            time.sleep(600)
        return original(*args, **kwargs)

    setattr(refs.RefLock if where == "commit" else refs.RefFiles, where, stop)
    store = GitEventStore(path)
    store.append("victim", "t", {}, expected_seq=store.head("victim"))


def kill_at(path: Path, where: str) -> None:
    ready = CTX.Event()
    victim = CTX.Process(target=hang_at, args=(str(path), where, ready))
    victim.start()
    assert ready.wait(60)
    assert victim.pid is not None
    os.kill(victim.pid, signal.SIGKILL)
    victim.join(30)


@pytest.mark.parametrize("overlap_after", [-1.0, 3600.0], ids=["overlapped", "after"])
def test_copies_and_durability_on_either_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, overlap_after: float
) -> None:
    """The feed ref's directory is fsynced on another thread (a busy disk) or after the mutex
    (a fast one). The space refs are copies of the feed moved at each snapshot (those of every
    space written since the snapshot before, by any store), by `close` and by `maintain` (every
    space, including a ref moved by hand), never by the writes in between."""
    import shard_sql.git.store as git_store

    monkeypatch.setattr(git_store, "OVERLAP_AFTER", overlap_after)
    path = tmp_path / "r.git"
    store = GitEventStore(path)
    other = GitEventStore(path)
    for i in range(3):
        store.append("a", "t", {}, expected_seq=i)
        other.append("b", "t", {}, expected_seq=i)
    assert not (path / space_ref("a")).exists() and not (path / space_ref("b")).exists()
    other.close()  # moves the refs of every space written since the last snapshot
    for space in ("a", "b"):
        assert git(path, "rev-list", "--count", space_ref(space)) == "3\n"
    first = git(path, "rev-list", "--reverse", space_ref("a")).split()[0]
    git(path, "update-ref", space_ref("a"), first)  # moved by hand
    store.append("b", "t", {}, expected_seq=3)
    assert git(path, "rev-list", "--count", space_ref("a")) == "1\n"
    assert git(path, "rev-list", "--count", space_ref("b")) == "3\n"
    store.maintain()  # every space
    assert git(path, "rev-list", "--count", space_ref("a")) == "3\n"
    assert git(path, "rev-list", "--count", space_ref("b")) == "4\n"
    store.append("a", "t", {}, expected_seq=3)
    n = 8
    while git(path, "log", "-1", "--format=%s", FEED).find("(snapshot)") < 0:
        store.append("c", "t", {}, expected_seq=store.head("c"))
        n += 1
    assert git(path, "rev-list", "--count", space_ref("a")) == "4\n"
    assert git(path, "rev-list", "--count", space_ref("c")) == f"{store.head('c')}\n"
    store.append("a", "t", {}, expected_seq=4)
    assert git(path, "rev-list", "--count", space_ref("a")) == "4\n"  # after the snapshot
    assert [e.position for e in store.feed()] == list(range(1, n + 2))
    consistent(store)
    store.close()
    assert git(path, "rev-list", "--count", space_ref("a")) == "5\n"
    other.close()
    fsck(path)


@pytest.mark.slow
def test_writer_killed_holding_the_feed_lock(tmp_path: Path) -> None:
    """Killed before the feed moved: nothing of its write shows; its lock is left behind, and the
    next writer (who holds the write mutex, which the kernel released with the dead writer)
    knows it for a dead writer's and removes it."""
    path = tmp_path / "r.git"
    store = GitEventStore(path, lock_timeout=2)
    store.append("a", "t", {}, expected_seq=0)
    before = store.feed()
    kill_at(path, "commit")
    lock = path / (FEED + ".lock")
    assert lock.exists()
    [staged] = path.glob("objects/*/tmp_obj_ref_*")  # the lock's other name
    assert staged.stat().st_ino == lock.stat().st_ino
    assert store.feed() == before and store.head("victim") == 0  # reads go on
    e = store.append("a", "t", {}, expected_seq=1)
    assert e.position == 2 and not lock.exists()
    assert not staged.exists()  # its staged file too
    assert not list(path.glob("objects/*/tmp_obj_ref_*"))
    assert not list((path / "refs" / "shard-sql").glob("feed.*.lock"))
    consistent(store)
    store.close()
    fsck(path)


@pytest.mark.slow
def test_writer_killed_while_removing_a_dead_writers_lock(tmp_path: Path) -> None:
    """A writer killed halfway through removing a dead writer's feed lock leaves no lock that
    the next writer cannot tell for a dead writer's (it removed the lock before its twin)."""
    path = tmp_path / "r.git"
    store = GitEventStore(path, lock_timeout=2)
    store.append("a", "t", {}, expected_seq=0)
    kill_at(path, "commit")
    kill_at(path, "break")
    e = store.append("a", "t", {}, expected_seq=1)
    assert e.position == 2 and not (path / (FEED + ".lock")).exists()
    assert store.head("victim") == 0
    # Left: staged files, nobody's lock, named as git's temporary objects (`git prune` removes
    # them after its prune age; `git fsck` says nothing of them).
    assert list(path.glob("objects/*/tmp_obj_ref_*"))
    consistent(store)
    store.close()
    fsck(path)


@pytest.mark.slow
def test_writer_killed_after_the_feed_moved(tmp_path: Path) -> None:
    """Killed after the commit point of a snapshot, before the space refs followed: the event
    is committed (every read shows it); the space refs lag until `maintain` puts them right."""
    path = tmp_path / "r.git"
    store = GitEventStore(path)
    for i in range(SNAPSHOT_EVERY - 1):  # the victim's write is the snapshot
        store.append("a", "t", {}, expected_seq=i)
    kill_at(path, "update_cache")
    assert store.head("victim") == 1 and [e.space for e in store.feed()][-2:] == ["a", "victim"]
    assert git(path, "log", "-1", "--format=%s", FEED).endswith(" (snapshot)\n")
    assert not (path / space_ref("victim")).exists()
    store.append("a", "t", {}, expected_seq=SNAPSHOT_EVERY - 1)
    store.maintain()
    assert git(path, "rev-list", "--count", space_ref("victim")) == "1\n"
    assert git(path, "rev-list", "--count", space_ref("a")) == f"{SNAPSHOT_EVERY}\n"
    consistent(store)
    store.close()
    fsck(path)


def test_a_foreign_lock_on_the_feed_blocks_writes_only(tmp_path: Path) -> None:
    """A lock file that is not a dead writer's (git's own, or made by hand) is never removed:
    writes wait for it, then fail naming it; reads go on."""
    path = tmp_path / "r.git"
    store = GitEventStore(path, lock_timeout=0.3)
    reg = LeaseRegistry(store)
    lease = reg.acquire("s", "node", 30)
    e = store.append("s", "t", {}, expected_seq=0, fence=lease)
    lock = path / (FEED + ".lock")
    lock.write_text("left by a killed git\n")
    with pytest.raises(StoreUnavailable, match=r"feed\.lock"):
        store.append("s", "t", {}, expected_seq=1, fence=lease)
    with pytest.raises(StoreUnavailable), store.transaction() as tx:
        tx.save_checkpoint("c", 1)
    assert lock.exists() and store.events("s") == [e] and store.feed() == [e]
    store.maintain()  # the space refs: up to date
    space_lock = path / (space_ref("s") + ".lock")
    space_lock.write_text("")  # a space ref's lock only holds back that copy of the feed
    lock.unlink()
    assert store.append("s", "t", {}, expected_seq=1, fence=lease).seq == 1
    store.maintain()
    assert store.head("s") == 2 and git(path, "rev-list", "--count", space_ref("s")) == "1\n"
    space_lock.unlink()
    store.append("s", "t", {}, expected_seq=2, fence=lease)
    store.maintain()
    assert git(path, "rev-list", "--count", space_ref("s")) == "3\n"
    store.close()
    fsck(path)


def writer_loop(path: str, seed: int) -> None:
    """Transactions over two spaces and a checkpoint, plain appends, for ever (until killed)."""
    import random

    rnd = random.Random(seed)
    store = GitEventStore(path)
    n = 0
    while True:
        n += 1
        try:
            if rnd.random() < 0.5:
                with store.transaction() as tx:
                    for space in rnd.sample(["a", "b", "c"], 2):
                        tx.append_many(space, [("t", {"n": n, "k": k}) for k in range(3)])
                    tx.save_checkpoint("w", store.feed_head())
            else:
                space = rnd.choice(["a", "b", "c"])
                store.append(space, "t", {"n": n}, expected_seq=store.head(space))
        except SeqConflict:
            pass


@pytest.mark.slow
def test_kill_9_at_any_point_leaves_all_or_nothing(tmp_path: Path) -> None:
    """Writers SIGKILLed at random moments, over and over: the store is always consistent (each
    transaction's events all there or none, the feed and the spaces agreeing) and writable."""
    import random

    path = tmp_path / "r.git"
    GitEventStore(path).close()
    rnd = random.Random(5)
    for round_ in range(16):
        procs = [CTX.Process(target=writer_loop, args=(str(path), round_ * 2 + k)) for k in (0, 1)]
        for p in procs:
            p.start()
        time.sleep(0.8 + rnd.random() * 0.4)  # past start-up, then a random moment
        for p in procs:
            assert p.pid is not None
            os.kill(p.pid, signal.SIGKILL)
            p.join(30)
        store = GitEventStore(path, lock_timeout=5)
        consistent(store)
        store.append("after", "t", {}, expected_seq=store.head("after"))  # still writable
        store.close()
    store = GitEventStore(path)
    feed = consistent(store)
    by_tx: dict[tuple[int, str, int], int] = {}
    for e in feed:  # every transaction wrote 3 events in each of its 2 spaces: all or none
        if "k" in e.payload:
            key = (e.payload["n"], e.space, e.seq - e.payload["k"])
            by_tx[key] = by_tx.get(key, 0) + 1
    assert by_tx and set(by_tx.values()) == {3}
    assert store.checkpoint("w") <= store.feed_head()
    store.close()
    fsck(path)


# -- several processes -----------------------------------------------------------------------------


class _RolledBack(Exception):
    pass


def mixed_writer(path: str, worker: int, rounds: int, barrier: Any, out: Any) -> None:
    """Plain appends and transactions over several spaces (some rolled back by an exception,
    some refused by a SeqConflict); puts `(space, seq, id)` of every committed event on `out`."""
    import random

    rnd = random.Random(worker)
    store = GitEventStore(path)
    spaces = ["s0", "s1", "s2", f"own-{worker}"]
    committed: list[tuple[str, int, str]] = []
    barrier.wait()
    for i in range(rounds):
        try:
            if rnd.random() < 0.4:
                space = rnd.choice(spaces)
                e = store.append(
                    space, "t", {"id": f"{worker}.{i}"}, expected_seq=store.head(space)
                )
                committed.append((e.space, e.seq, e.payload["id"]))
                continue
            with store.transaction() as tx:
                written = []
                for space in rnd.sample(spaces, rnd.randint(1, 3)):
                    items = [
                        ("t", {"id": f"{worker}.{i}.{space}.{k}"}) for k in range(rnd.randint(1, 3))
                    ]
                    written += tx.append_many(space, items)
                    time.sleep(rnd.random() * 0.003)
                tx.save_checkpoint(f"w{worker}", i)
                if rnd.random() < 0.2:
                    raise _RolledBack
            committed += [(e.space, e.seq, e.payload["id"]) for e in written]
        except (SeqConflict, _RolledBack):
            pass
    store.close()
    out.put(committed)


@pytest.mark.slow
def test_processes_write_while_a_reader_pages_the_feed(tmp_path: Path) -> None:
    """The reader sees every committed event exactly once, in position order, each space in seq
    order, whatever the processes' interleaving, rollbacks and conflicts."""
    path = tmp_path / "r.git"
    GitEventStore(path).close()
    workers, rounds = 4, 40
    out = CTX.Queue()
    barrier = CTX.Barrier(workers)
    procs = [
        CTX.Process(target=mixed_writer, args=(str(path), w, rounds, barrier, out))
        for w in range(workers)
    ]
    for p in procs:
        p.start()
    reader = GitEventStore(path)
    seen: list[Any] = []
    after = 0
    results: list[list[tuple[str, int, str]]] = []
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        done = len(results) == workers
        page = reader.feed(after, limit=1 + len(seen) % 17)
        seen += page
        if page:
            after = page[-1].position or after
        elif done:
            break
        else:
            reader.wait_feed(after, timeout=0.05)
            while not out.empty():
                results.append(out.get())
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    positions = [e.position for e in seen]
    assert positions == sorted(set(positions))
    last: dict[str, int] = {}
    for e in seen:
        assert e.seq == last.get(e.space, -1) + 1  # each space in order, nothing skipped
        last[e.space] = e.seq
    got = [(e.space, e.seq, e.payload["id"]) for e in seen]
    committed = [c for r in results for c in r]
    assert len(got) == len(set(got)) and sorted(got) == sorted(committed)
    assert [(e.space, e.seq) for e in reader.feed()] == [(e.space, e.seq) for e in seen]
    assert committed and len(seen) > workers * rounds / 2
    consistent(reader)
    reader.close()
    fsck(path)
