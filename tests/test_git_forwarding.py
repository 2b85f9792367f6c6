"""Forwarding through a git repository: `GitEventStore` as an `IntentQueue`.

What is git's own: the intent refs (one ref per put, its record, arrival order apart from the
refs' hashed names, applied refs deleted or swept, names git accepts, corrupt records, packed
refs), waiting on wake-up files, forwarding beside `git pack-refs`. The contracts every store passes
(intent queue, forwarding, processes) run in tests/test_git.py.
"""

from __future__ import annotations

import json
import logging
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from shard_sql import AppendAuthority, GitEventStore, LeaseRegistry, StoreUnavailable
from shard_sql.git.layout import INTENT_REFS, WAKEUPS_DIR, encode_name, intent_key
from shard_sql.testing import HOSTILE_SPACES
from shard_sql.testing.processes import check_log
from shard_sql.validation import pending
from shard_sql.wake import EVENTS_WRITTEN, WakeupFiles


def git(repo: Path, *args: str, stdin: str | None = None) -> str:
    r = subprocess.run(
        ["git", "-C", str(repo), *args], input=stdin, capture_output=True, text=True, check=False
    )
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


def intent_refs(repo: Path) -> dict[str, str]:
    out = git(repo, "for-each-ref", "--format=%(refname) %(objectname)", INTENT_REFS)
    return dict(line.split(" ", 1) for line in out.splitlines())


def ref_of(space: str, intent_id: str) -> str:
    return f"{INTENT_REFS}{encode_name(space)}/{intent_key(intent_id)}"


# -- the intent refs -------------------------------------------------------------------------


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return tmp_path / "log.git"


@pytest.fixture
def store(repo: Path) -> Any:
    s = GitEventStore(repo)
    yield s
    s.close()


def test_a_put_is_one_ref(store: GitEventStore, repo: Path) -> None:
    store.put_intent("wiki", pending("alias.set", {"page": "Home"}, "k1"), holder="node-a")
    store.put_intent("wiki", pending("alias.set", {"page": "Other"}, "k1"), holder="node-b")
    refs = intent_refs(repo)
    assert list(refs) == [ref_of("wiki", "k1")]
    record = json.loads(git(repo, "cat-file", "blob", refs[ref_of("wiki", "k1")]))
    assert record["payload"] == {"page": "Home"}  # the first record wins
    assert (record["space"], record["intent_id"], record["type"], record["to"]) == (
        "wiki",
        "k1",
        "alias.set",
        "node-a",
    )
    assert isinstance(record["arrived_ns"], int)
    fsck(repo)


def test_arrival_order_and_applied_refs(store: GitEventStore, repo: Path) -> None:
    ids = [f"id-{i}" for i in range(12)]
    assert sorted(ids, key=intent_key) != ids  # the hashes alone would order them otherwise
    for n, i in enumerate(ids):
        store.put_intent("s", pending("t", {"n": n}, i), holder="h")
    assert [p.intent_id for p in store.pending_intents("s", limit=100)] == ids
    store.append("s", "t", {"n": 0}, expected_seq=0, intent_id="id-0")
    store.append("s", "t", {"n": 3}, expected_seq=1, intent_id="id-3")
    # forget deletes the refs of applied intents only.
    store.forget_intents("s", ["id-0", "id-1", "never-put"])
    refs = intent_refs(repo)
    assert ref_of("s", "id-0") not in refs and ref_of("s", "id-1") in refs
    # id-3 was applied but not forgotten (a holder died in between): skipped and swept.
    assert ref_of("s", "id-3") in refs
    rest = [i for i in ids if i not in ("id-0", "id-3")]
    assert [p.intent_id for p in store.pending_intents("s", limit=100)] == rest
    assert ref_of("s", "id-3") not in intent_refs(repo)
    # A late retry of an applied intent records nothing.
    store.put_intent("s", pending("t", {"n": 0}, "id-0"), holder="h")
    assert ref_of("s", "id-0") not in intent_refs(repo)
    fsck(repo)


def test_intent_refs_are_names_git_accepts(store: GitEventStore, repo: Path) -> None:
    names = [*HOSTILE_SPACES, "a", "a+", "é" * 200, "a" * 101]
    for n, space in enumerate(names):
        store.put_intent(space, pending("t", {"n": n}, "same-id"), holder="h")
    assert len(intent_refs(repo)) == len(names)
    for ref in intent_refs(repo):
        git(repo, "check-ref-format", ref)
    fsck(repo)


def test_corrupt_records_are_skipped_not_applied(
    store: GitEventStore, repo: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store.put_intent("s", pending("t", {"ok": 1}, "good"), holder="h")

    def plant(intent_id: str, text: str) -> str:
        blob = git(repo, "hash-object", "-w", "--stdin", stdin=text).strip()
        ref = ref_of("s", intent_id)
        git(repo, "update-ref", ref, blob)
        return ref

    good = json.loads(git(repo, "cat-file", "blob", ref_of("s", "good")))
    bad = {
        "garbage": "not json at all\n",
        "array": "[1, 2]\n",
        "other-space": json.dumps({**good, "space": "elsewhere", "intent_id": "other-space"}),
        "wrong-hash": json.dumps({**good, "intent_id": "good"}),  # planted under another name
        "nan": json.dumps({**good, "intent_id": "nan"})[:-1] + ',"payload":{"x":NaN}}',
        "bad-type": json.dumps({**good, "intent_id": "bad-type", "type": ""}),
        "bad-arrival": json.dumps({**good, "intent_id": "bad-arrival", "arrived_ns": "soon"}),
    }
    planted = [plant(i, text) for i, text in bad.items()]
    # A ref to a commit instead of a blob.
    commit = git(repo, "commit-tree", "4b825dc642cb6eb9a060e54bf8d69288fbee4904", stdin="x").strip()
    planted.append(ref_of("s", "commit"))
    git(repo, "update-ref", ref_of("s", "commit"), commit)
    # A symbolic ref (kept last in `planted`).
    planted.append(ref_of("s", "symbolic"))
    git(repo, "symbolic-ref", ref_of("s", "symbolic"), "refs/heads/main")
    # Stray names and a lock file in the directory are not intents.
    folder = repo / INTENT_REFS / encode_name("s")
    (folder / (intent_key("locked") + ".lock")).write_text("")
    with caplog.at_level(logging.WARNING, logger="shard_sql.git"):
        assert [p.intent_id for p in store.pending_intents("s", limit=10)] == ["good"]
        assert [p.intent_id for p in store.pending_intents("s", limit=10)] == ["good"]
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == len(planted)  # once per record, not per poll
    assert all("git update-ref -d" in w for w in warned)
    # A holder serves the good one and keeps the bad ones for an operator.
    holder = AppendAuthority("holder", store, LeaseRegistry(store))
    holder.acquire("s")
    assert holder.serve("s") == 1
    assert [e.intent_id for e in store.events("s")] == ["good"]
    symbolic = planted.pop()
    assert sorted(intent_refs(repo)) == sorted(planted)
    assert git(repo, "symbolic-ref", symbolic).strip() == "refs/heads/main"
    # A put of an intent whose ref has a lock file (a sender of an earlier version killed while
    # it recorded the intent) records it all the same: recording takes no lock.
    quick = GitEventStore(repo, lock_timeout=0.2)
    quick.put_intent("s", pending("t", {}, "locked"), holder="h")
    assert [p.intent_id for p in quick.pending_intents("s", limit=10)] == ["locked"]
    quick.close()


def test_packed_refs(store: GitEventStore, repo: Path) -> None:
    for i in range(5):
        store.put_intent("s", pending("t", {"i": i}, f"p{i}"), holder="h")
    store.append("other", "t", {}, expected_seq=0)
    store.maintain()  # the space refs: moved at snapshots, by close and by maintain
    tip = git(repo, "rev-parse", "refs/shard-sql/spaces/other").strip()
    git(repo, "-c", "user.name=x", "-c", "user.email=x@x", "tag", "-a", "-m", "m", "v1", tip)
    git(repo, "pack-refs", "--all")
    assert not (repo / INTENT_REFS / "s").exists() or not any((repo / INTENT_REFS / "s").iterdir())
    store.put_intent("s", pending("t", {"i": 5}, "p5"), holder="h")  # loose beside packed
    assert [p.intent_id for p in store.pending_intents("s", limit=10)] == [
        f"p{i}" for i in range(6)
    ]
    store.append_many("s", [("t", {"i": i}, f"p{i}") for i in range(4)], expected_seq=0)
    others = git(repo, "show-ref", "-d", "refs/tags/v1", "refs/shard-sql/spaces/other")
    store.forget_intents("s", ["p0", "p1", "p2", "p3"])  # rewrites packed-refs
    assert set(intent_refs(repo)) == {ref_of("s", "p4"), ref_of("s", "p5")}
    assert git(repo, "show-ref", "-d", "refs/tags/v1", "refs/shard-sql/spaces/other") == others
    assert "^" in others  # the tag's peeled line is kept
    assert [p.intent_id for p in store.pending_intents("s", limit=10)] == ["p4", "p5"]
    fsck(repo)


def test_forwarding_beside_pack_refs(tmp_path: Path) -> None:
    # `git gc` packs refs (and prunes the loose files and empty directories) beside writers.
    path = tmp_path / "log.git"
    store = GitEventStore(path)
    holder = AppendAuthority("holder", store, LeaseRegistry(store), ttl_seconds=3)
    holder.acquire("s")
    sender = AppendAuthority("sender", store, LeaseRegistry(store), forward_timeout=20)
    acks: list[tuple[str, int, str, int]] = []

    def send() -> None:
        for i in range(40):
            e = sender.append("s", "t", {"i": i}, intent_id=f"k{i}")
            acks.append((f"k{i}", e.seq, e.writer, e.generation))

    with holder:
        t = threading.Thread(target=send)
        t.start()
        packs = 0
        while t.is_alive():
            # It may fail on `packed-refs.lock` held by a holder's forget: fine, as for `git gc`.
            subprocess.run(["git", "-C", str(path), "pack-refs", "--all"], capture_output=True)
            packs += 1
        t.join()
    assert packs > 1 and len(acks) == 40
    check_log(store, "s", acks)
    assert {e.writer for e in store.events("s")} == {"holder"}
    # A forget that met a lock held by `git pack-refs` left garbage; the next round sweeps it,
    # from `packed-refs` too.
    assert store.pending_intents("s", limit=10) == []
    assert intent_refs(path) == {}
    store.close()
    fsck(path)


def test_wait_for_change(store: GitEventStore, repo: Path) -> None:
    start = time.monotonic()
    store.wait_for_change(["s"], 30)  # a first wait on these spaces ends at once
    store.wait_for_change(["s", "t"], 30)
    assert time.monotonic() - start < 10
    start = time.monotonic()
    store.wait_for_change(["s"], 0.15)
    assert 0.14 <= time.monotonic() - start < 1.0  # nothing changed: the whole timeout
    other = GitEventStore(repo)

    def later(action: Any) -> float:
        timer = threading.Timer(0.1, action)
        timer.start()
        t0 = time.monotonic()
        store.wait_for_change(["s", "t"], 5)
        timer.join()
        return time.monotonic() - t0

    assert later(lambda: other.put_intent("s", pending("t", {}, "w1"), holder="h")) < 2
    assert later(lambda: other.append("t", "x", {}, expected_seq=0)) < 2
    assert later(lambda: LeaseRegistry(other).acquire("s", "someone", 10)) < 2
    # A change between two waits of a thread ends the next one at once.
    other.append("t", "x", {}, expected_seq=1)
    t0 = time.monotonic()
    store.wait_for_change(["s", "t"], 5)
    assert time.monotonic() - t0 < 1
    other.close()
    store.close()
    with pytest.raises(StoreUnavailable):
        store.wait_for_change(["s"], 0.01)


@pytest.mark.slow
def test_forwarding_bench_quick_run() -> None:
    """A smoke run of `benchmarks.git_bench.forwarding` (tiny counts, figures meaningless)."""
    import sys

    root = str(Path(__file__).resolve().parent.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    from benchmarks import git_bench

    rows = git_bench.forwarding(quick=True)
    works = [r["work"] for r in rows]
    assert any("forwarded append across processes, p50" in w for w in works)
    assert any("failover" in w for w in works)
    assert all(r["figure"] > 0 for r in rows)


@pytest.mark.skipif(
    WakeupFiles.if_supported("x") is None, reason="wake-up files need inotify (Linux)"
)
def test_a_retried_put_waits_for_the_event(store: GitEventStore, repo: Path) -> None:
    """A put of an intent recorded before (a retry, maybe from another thread) still makes this
    thread's waits on its space waits for the event (the event wake-up file), as a first put
    does."""
    store.put_intent("s", pending("t", {}, "k"), holder="h")
    files = WakeupFiles.if_supported(str(repo / WAKEUPS_DIR))
    assert files is not None
    event_file = Path(files.path(EVENTS_WRITTEN, "s"))
    waited: list[float] = []

    def retry() -> None:
        store.put_intent("s", pending("t", {}, "k"), holder="h")  # recorded before: no new ref
        store.wait_for_change(["s"], 0)  # a first wait: it makes the file it sleeps on
        t0 = time.monotonic()
        store.wait_for_change(["s"], 20)
        waited.append(time.monotonic() - t0)

    thread = threading.Thread(target=retry)
    thread.start()
    deadline = time.monotonic() + 10
    while thread.is_alive() and time.monotonic() < deadline:
        files.signal(EVENTS_WRITTEN, "s")  # only a waiter on the event file made it and hears it
        time.sleep(0.02)
    thread.join(30)
    assert event_file.exists() and waited and waited[0] < 10
