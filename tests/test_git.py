"""The git adapter: the shared contracts on a real repository, and git-specific cases."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest

from shard_sql import GitEventStore, LeaseRegistry, ShardSqlError, StoreUnavailable
from shard_sql.git.layout import (
    CHUNK,
    FEED,
    INTENT_REFS,
    LEASES,
    SPACES,
    decode_name,
    encode_name,
    entry_name,
    fan,
    lease_ref,
    space_ref,
)
from shard_sql.ports import EventStore
from shard_sql.testing import (
    HOSTILE_SPACES,
    AdapterCase,
    AuthorityContract,
    ForwardingContract,
    IntentQueueContract,
    LeaseRulesContract,
    ManualClock,
    ProcessForwardingContract,
    StoreContract,
)


def git(repo: Path, *args: str, check: bool = True, stdin: str | None = None) -> str:
    r = subprocess.run(
        ["git", "-C", str(repo), *args], input=stdin, capture_output=True, text=True, check=False
    )
    if check and r.returncode != 0:
        raise AssertionError(f"git {' '.join(args)}: {r.returncode}\n{r.stdout}\n{r.stderr}")
    return r.stdout


def assert_fsck_clean(repo: Path) -> None:
    r = subprocess.run(
        ["git", "-C", str(repo), "fsck", "--strict", "--no-dangling", "--full"],
        capture_output=True,
        text=True,
        check=False,
    )
    problems = [
        line
        for line in (r.stdout + r.stderr).splitlines()
        if line and not line.startswith(("notice:", "Checking"))
    ]
    assert r.returncode == 0 and not problems, r.stdout + r.stderr


def set_feed_tip(repo: Path, space: str, oid: str) -> None:
    """Point the space's tip in the feed at commit `oid`, as a hand edit would: the parent that
    names it in the last feed commit, if that wrote the space, else its entry in the tree."""
    import pygit2

    raw = git(repo, "cat-file", "commit", FEED)
    head, _, message = raw.partition("\n\n")
    record = json.loads(message.rsplit("Shard-Sql-Feed: ", 1)[1])
    lines = head.split("\n")
    if record.get("since") and space in record["spaces"]:
        parents = [n for n, line in enumerate(lines) if line.startswith("parent ")]
        at = len(parents) - len(record["spaces"]) + record["spaces"].index(space)
        lines[parents[at]] = f"parent {oid}"
    else:
        r = pygit2.Repository(str(repo))
        index = pygit2.Index()
        index.read_tree(r.references[FEED].peel(pygit2.Commit).tree)
        path = f"spaces/{fan(space)}/{entry_name(space)}/tip"
        index.add(pygit2.IndexEntry(path, pygit2.Oid(hex=oid), pygit2.enums.FileMode.COMMIT))
        lines[0] = f"tree {index.write_tree(r)}"
        r.free()
    edited = "\n".join(lines) + "\n\n" + message
    new = git(repo, "hash-object", "-t", "commit", "-w", "--stdin", "--literally", stdin=edited)
    git(repo, "update-ref", FEED, new.strip())


def all_refs(repo: Path) -> dict[str, str]:
    out = git(repo, "for-each-ref", "--format=%(refname) %(objectname)")
    return dict(line.split(" ", 1) for line in out.splitlines())


def intent_refs(repo: Path) -> dict[str, str]:
    out = git(repo, "for-each-ref", "--format=%(refname) %(objectname)", INTENT_REFS)
    return dict(line.split(" ", 1) for line in out.splitlines())


class Git(AdapterCase):
    def make_store(self) -> EventStore:
        return GitEventStore(self.tmp_path / "log.git")

    def store_url(self) -> str | None:
        return f"git+file://{self.tmp_path / 'log.git'}"

    def check_after(self, *, holder_killed: bool) -> None:
        assert intent_refs(self.tmp_path / "log.git") == {}
        assert_fsck_clean(self.tmp_path / "log.git")


class TestGitStore(Git, StoreContract):
    def test_zz_fsck_clean_after_contract_work(self) -> None:
        self.test_hostile_space_names_are_distinct()
        self.test_fence_stale_lease_writes_nothing()
        items = [("t", {"i": i}, f"k{i}") for i in range(300)]
        self.store.append_many("batch", items, expected_seq=0)
        assert_fsck_clean(self.tmp_path / "log.git")


class TestGitAuthority(Git, AuthorityContract):
    pass


class TestGitLeaseRules(Git, LeaseRulesContract):
    pass


class TestGitIntentQueue(Git, IntentQueueContract):
    pass


class TestGitForwarding(Git, ForwardingContract):
    def test_zz_fsck_clean_and_no_intent_left(self) -> None:
        self.test_dead_holder_pending_intents_applied_by_next()
        assert intent_refs(self.tmp_path / "log.git") == {}
        assert_fsck_clean(self.tmp_path / "log.git")


class TestGitForwardingDurable(Git, ForwardingContract):
    handoff = False


class TestGitProcesses(Git, ProcessForwardingContract):
    pass


class TestGitProcessesDurable(Git, ProcessForwardingContract):
    handoff = False


# -- names -----------------------------------------------------------------------------------

TRICKY = [
    *HOSTILE_SPACES,
    "a",
    "A",
    "%61",
    "a+",
    "a" * 100,
    "a" * 101,
    "a" * 199 + "é",
    "a" * 100 + "b",
    "é" * 200,
    "é" * 149 + "a",
    "😀" * 200,
    "空" * 101,
    ".hidden",
    "x/.lock",
    "a/b.lock/c",
    "refs/shard-sql/spaces/a",
    "..",
    "@",
    "a~b^c:d?e*f[g\\h",
    "CON",
    "trailing/",
]


def test_names_round_trip_and_are_valid_ref_names(tmp_path: Path) -> None:
    refs = set()
    for name in TRICKY:
        enc = encode_name(name)
        if enc.startswith("="):  # too long to spell out: hashed, spelled out in the events
            assert len(name.encode()) > 250 and decode_name(enc) is None
            assert set(enc[1:]) <= set("0123456789abcdef") and len(enc) == 65
        else:
            assert decode_name(enc) == name
            assert set(enc) <= set("abcdefghijklmnopqrstuvwxyz0123456789-_%+/"), enc
        assert all(0 < len(part) <= 101 for part in enc.split("/"))
        ref = space_ref(name)
        r = subprocess.run(["git", "check-ref-format", ref], capture_output=True, check=False)
        assert r.returncode == 0, ref
        refs.add(ref)
    assert len(refs) == len(set(TRICKY))
    # No ref is a directory prefix of another (git would refuse the second one).
    for a in refs:
        for b in refs:
            assert a == b or not b.startswith(a + "/")
    assert decode_name("a+") is None and decode_name("A") is None and decode_name("%zz") is None


def test_hostile_names_stay_in_the_namespace(tmp_path: Path) -> None:
    repo = tmp_path / "work"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    (repo / "f.txt").write_text("hello\n")
    git(repo, "add", "f.txt")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "init")
    before = all_refs(repo)
    store = GitEventStore(repo)
    reg = LeaseRegistry(store, clock=ManualClock())
    for name in TRICKY:
        lease = reg.acquire(name, "node", 10)
        store.append(name, "t", {"name": name}, expected_seq=0, fence=lease, intent_id=name)
    move_space_refs(store)
    after = all_refs(repo)
    new = {r for r in after if r not in before}
    assert all(r.startswith((SPACES, LEASES)) or r == FEED for r in new)
    assert {r: after[r] for r in before} == before
    assert len(new) == 2 * len(TRICKY) + 1
    assert store.spaces() == sorted(TRICKY)
    for name in TRICKY:
        [e] = store.events(name)
        assert e.payload == {"name": name} and e.space == name
    assert not (repo / "HEAD").exists() and git(repo, "rev-parse", "--abbrev-ref", "HEAD") == (
        "main\n"
    )
    assert_fsck_clean(repo)
    store.close()


def test_a_new_repositorys_objects_is_a_top_directory(tmp_path: Path) -> None:
    """ext2/3/4 (`chattr +T`): the fan-out directories made in `objects/` are spread over the
    block groups (docs/git.md, "Creating files on ext4"); elsewhere nothing is set."""
    if subprocess.run(["lsattr", "-d", str(tmp_path)], capture_output=True).returncode:
        pytest.skip("no lsattr here, or no ext2/3/4 attributes on this file system")
    store = GitEventStore(tmp_path / "r.git")
    store.append("s", "t", {}, expected_seq=0)
    store.close()
    flags = git_lsattr(tmp_path / "r.git" / "objects")
    assert "T" in flags
    plain = tmp_path / "plain.git"
    git(tmp_path, "init", "-q", "--bare", str(plain))
    GitEventStore(plain).close()  # an existing repository is used as is
    assert "T" not in git_lsattr(plain / "objects")


def git_lsattr(path: Path) -> str:
    out = subprocess.run(["lsattr", "-d", str(path)], capture_output=True, text=True, check=True)
    return out.stdout.split()[0]


def test_foreign_refs_in_the_namespace_are_ignored(tmp_path: Path) -> None:
    store = GitEventStore(tmp_path / "r.git")
    e = store.append("s", "t", {}, expected_seq=0)
    git(tmp_path / "r.git", "update-ref", SPACES + "NOT-OURS", store_commit(store, "s"))
    git(tmp_path / "r.git", "update-ref", SPACES + "x+", store_commit(store, "s"))
    assert store.spaces() == ["s"]
    assert store.events("s") == [e]
    store.close()


def move_space_refs(store: GitEventStore) -> None:
    """Bring every space ref up to the feed now, as `maintain` does (without packing): a write
    moves them only when it makes a snapshot."""
    store._copies.every_space(time.monotonic() + 10)


def store_commit(store: GitEventStore, space: str) -> str:
    move_space_refs(store)
    return git(store.path, "rev-parse", space_ref(space)).strip()


# -- opening -------------------------------------------------------------------------------------


def test_existing_repository_is_left_untouched(tmp_path: Path) -> None:
    repo = tmp_path / "project"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    (repo / "a.txt").write_text("committed\n")
    git(repo, "add", "a.txt")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "one")
    git(repo, "branch", "feature")
    (repo / "a.txt").write_text("changed, not staged\n")
    (repo / "b.txt").write_text("staged\n")
    git(repo, "add", "b.txt")
    (repo / "c.txt").write_text("untracked\n")
    index = (repo / ".git" / "index").read_bytes()
    status = git(repo, "status", "--porcelain")
    head = (repo / ".git" / "HEAD").read_text()
    refs = all_refs(repo)
    config = (repo / ".git" / "config").read_text()
    files = sorted(p.name for p in repo.iterdir())

    store = GitEventStore(repo)
    reg = LeaseRegistry(store)
    lease = reg.acquire("refs/heads/main", "node", 10)
    store.append_many("refs/heads/main", [("t", {"i": i}) for i in range(300)], expected_seq=0)
    store.append("HEAD", "t", {}, expected_seq=0, fence=None)
    store.append("refs/heads/main", "t", {}, expected_seq=300, fence=lease, intent_id="x")
    reg.release(lease)
    store.close()

    assert (repo / ".git" / "index").read_bytes() == index
    assert git(repo, "status", "--porcelain") == status
    assert (repo / ".git" / "HEAD").read_text() == head
    assert (repo / ".git" / "config").read_text() == config
    assert sorted(p.name for p in repo.iterdir()) == files
    assert (repo / "a.txt").read_text() == "changed, not staged\n"
    after = all_refs(repo)
    assert {r: after[r] for r in refs} == refs
    assert all(r.startswith("refs/shard-sql/") for r in after if r not in refs)
    assert git(repo, "branch", "--format=%(refname:short)").split() == ["feature", "main"]
    assert_fsck_clean(repo)


def test_missing_path_becomes_a_bare_repository(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "log.git"
    store = GitEventStore(path)
    store.append("s", "t", {"x": 1}, expected_seq=0)
    store.close()
    assert git(path, "rev-parse", "--is-bare-repository") == "true\n"
    again = GitEventStore(path)
    assert again.head("s") == 1
    again.close()


def test_empty_directory_becomes_a_repository(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    store = GitEventStore(tmp_path / "empty")
    assert store.append("s", "t", {}, expected_seq=0).seq == 0
    store.close()


def test_not_a_repository(tmp_path: Path) -> None:
    f = tmp_path / "file.db"
    f.write_text("not git")
    with pytest.raises(StoreUnavailable, match="is a file"):
        GitEventStore(f)
    d = tmp_path / "plain"
    d.mkdir()
    (d / "notes.txt").write_text("hello")
    with pytest.raises(StoreUnavailable, match="not a git repository"):
        GitEventStore(d)
    assert sorted(p.name for p in d.iterdir()) == ["notes.txt"]
    assert f.read_text() == "not git"


def test_parent_repository_is_never_used(tmp_path: Path) -> None:
    outer = tmp_path / "outer"
    outer.mkdir()
    git(outer, "init", "-q")
    (outer / "sub").mkdir()
    (outer / "sub" / "keep").write_text("x")
    with pytest.raises(StoreUnavailable):
        GitEventStore(outer / "sub")
    store = GitEventStore(outer / "new")
    store.append("s", "t", {}, expected_seq=0)
    store.close()
    assert all_refs(outer) == {}


def test_linked_worktree_writes_to_the_common_refs(tmp_path: Path) -> None:
    """A linked worktree (`git worktree add`) keeps its refs in the main repository's common
    directory: a write there is durable and acknowledged, and the main checkout reads it."""
    main = tmp_path / "main"
    main.mkdir()
    git(main, "init", "-q", "-b", "main")
    git(
        main,
        "-c",
        "user.name=t",
        "-c",
        "user.email=t@t",
        "commit",
        "-q",
        "--allow-empty",
        "-m",
        "i",
    )
    git(main, "worktree", "add", "-q", str(tmp_path / "linked"))
    store = GitEventStore(tmp_path / "linked")
    e = store.append("s", "t", {"n": 1}, expected_seq=0)
    store.close()
    other = GitEventStore(main)
    assert other.events("s") == [e]
    other.close()
    assert_fsck_clean(main)


def test_closed_store_raises(tmp_path: Path) -> None:
    store = GitEventStore(tmp_path / "r.git")
    store.append("s", "t", {}, expected_seq=0)
    store.close()
    with pytest.raises(StoreUnavailable):
        store.head("s")
    with pytest.raises(StoreUnavailable):
        store.append("s", "t", {}, expected_seq=1)


# -- stock git can read it -----------------------------------------------------------------------


def test_readable_with_stock_git(tmp_path: Path) -> None:
    path = tmp_path / "r.git"
    store = GitEventStore(path)
    reg = LeaseRegistry(store)
    lease = reg.acquire("wiki pages", "node-a", 30)
    store.append("wiki pages", "alias.set", {"page": "Home ✓"}, expected_seq=0, fence=lease)
    store.append("wiki pages", "page.edited", {"n": 2}, expected_seq=1, fence=lease, intent_id="i")
    store.close()  # moves the space refs of the writes since the last snapshot
    log = git(path, "log", "--format=%s%n%b--", space_ref("wiki pages"))
    assert "page.edited #1 by node-a (generation 1)" in log
    assert '{"page":"Home ✓"}' in log and "Shard-Sql-Event: " in log
    trailer = next(line for line in log.splitlines() if line.startswith("Shard-Sql-Event: "))
    meta = json.loads(trailer.split(": ", 1)[1])
    assert meta["seq"] == 1 and meta["intent_id"] == "i" and meta["writer"] == "node-a"
    assert git(path, "rev-list", "--count", space_ref("wiki pages")) == "2\n"
    record = json.loads(git(path, "cat-file", "-p", lease_ref("wiki pages")))
    assert record["holder"] == "node-a" and record["generation"] == 1
    h = hashlib.sha256(b"i").hexdigest()
    listing = git(path, "ls-tree", "--name-only", f"{space_ref('wiki pages')}:intents-{h[:2]}")
    assert listing == f"{h[2:]}.1\n"
    store.close()


# -- reads across the index ----------------------------------------------------------------------


def test_reads_across_index_chunks(tmp_path: Path) -> None:
    store = GitEventStore(tmp_path / "r.git")
    n = 2 * CHUNK + 40
    store.append_many("s", [("t", {"i": i}, f"k{i}") for i in range(CHUNK + 5)], expected_seq=0)
    for i in range(CHUNK + 5, n):  # single appends that cross a chunk boundary
        store.append("s", "t", {"i": i}, expected_seq=i, intent_id=f"k{i}")
    assert store.head("s") == n
    every = store.events("s")
    assert [e.payload["i"] for e in every] == list(range(n))
    for start in (0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK - 1, 2 * CHUNK, n - 1, n, n + 5):
        for limit in (None, 0, 1, 2, CHUNK + 3):
            got = store.events("s", from_seq=start, limit=limit)
            assert got == every[start : None if limit is None else start + limit]
        assert list(store.iter_events("s", from_seq=start)) == every[start:]
    for i in (0, CHUNK - 1, CHUNK, 2 * CHUNK, n - 1):  # every intent is found, wherever it is
        assert store.append("s", "t", {"i": i}, expected_seq=n, intent_id=f"k{i}") == every[i]
    fresh = GitEventStore(tmp_path / "r.git")
    assert fresh.events("s", from_seq=CHUNK - 2, limit=4) == every[CHUNK - 2 : CHUNK + 2]
    fresh.close()
    store.close()


# -- locks and faults ----------------------------------------------------------------------------


def test_stale_lock_file_gives_a_typed_error(tmp_path: Path) -> None:
    """A lock file nobody removes: on the feed it stops writes (not reads) with a typed error
    naming it; on a lease ref it stops that lease's updates; on a space ref it only holds back
    that space's ref (a copy of the feed) until it goes."""
    path = tmp_path / "r.git"
    store = GitEventStore(path, lock_timeout=0.3)
    reg = LeaseRegistry(store)
    lease = reg.acquire("s", "node", 30)
    e = store.append("s", "t", {"n": 0}, expected_seq=0, fence=lease)
    feed = (path / FEED).read_bytes()
    lock = path / (FEED + ".lock")
    lock.write_text("garbage left by a killed writer\n")
    with pytest.raises(StoreUnavailable, match=r"feed\.lock"):
        store.append("s", "t", {"n": 1}, expected_seq=1, fence=lease)
    with pytest.raises(StoreUnavailable):
        store.append("s", "t", {"n": 1}, expected_seq=1)
    assert lock.exists()  # never removed behind the user's back
    assert (path / FEED).read_bytes() == feed
    assert store.events("s") == [e] and store.head("s") == 1  # reads still work
    assert reg.renew(lease).generation == lease.generation  # leases wait for their own locks
    lease_lock = path / (lease_ref("s") + ".lock")
    lease_lock.write_text("")
    with pytest.raises(StoreUnavailable):
        reg.renew(lease)
    lock.unlink()
    move_space_refs(store)
    space_lock = path / (space_ref("s") + ".lock")
    space_lock.write_text("")
    assert store.append("s", "t", {"n": 1}, expected_seq=1, fence=lease).seq == 1
    move_space_refs(store)
    assert git(path, "rev-list", "--count", space_ref("s")) == "1\n"  # held back
    lease_lock.unlink()
    space_lock.unlink()
    assert reg.renew(lease).generation == lease.generation
    assert store.append("s", "t", {"n": 2}, expected_seq=2, fence=lease).seq == 2
    move_space_refs(store)
    assert git(path, "rev-list", "--count", space_ref("s")) == "3\n"
    assert_fsck_clean(path)
    store.close()


def loose_object(repo: Path, oid: str) -> Path:
    return repo / "objects" / oid[:2] / oid[2:]


def test_corrupted_object_is_never_read_as_an_event(tmp_path: Path) -> None:
    path = tmp_path / "r.git"
    store = GitEventStore(path)
    store.append("s", "t", {"n": 0, "text": "original payload"}, expected_seq=0)
    store.append("s", "t", {"n": 1}, expected_seq=1)
    good = store.events("s")
    store.close()
    first = git(path, "rev-parse", space_ref("s") + "~1").strip()
    obj = loose_object(path, first)
    original = obj.read_bytes()
    assert zlib.decompress(original).startswith(b"commit ")
    os.chmod(obj, 0o644)
    outcomes = {"error": 0}
    for pos in range(0, len(original), max(1, len(original) // 40)):
        for flip in (0x01, 0x80):
            data = bytearray(original)
            data[pos] ^= flip
            obj.write_bytes(bytes(data))
            fresh = GitEventStore(path)
            try:
                got = fresh.events("s")
            except ShardSqlError as e:
                assert isinstance(e, StoreUnavailable)
                outcomes["error"] += 1
            else:
                assert got == good, f"byte {pos} ^ {flip:#x} read as {got}"
            finally:
                fresh.close()
    assert outcomes["error"] > 0
    obj.write_bytes(original)
    fresh = GitEventStore(path)
    assert fresh.events("s") == good
    fresh.close()


def test_corrupted_tip_and_lease(tmp_path: Path) -> None:
    path = tmp_path / "r.git"
    store = GitEventStore(path)
    reg = LeaseRegistry(store)
    reg.acquire("s", "node", 30)
    store.append("s", "t", {}, expected_seq=0)
    store.close()
    for ref in (space_ref("s"), lease_ref("s")):
        obj = loose_object(path, git(path, "rev-parse", ref).strip())
        os.chmod(obj, 0o644)
        data = bytearray(obj.read_bytes())
        data[len(data) // 2] ^= 0x55
        obj.write_bytes(bytes(data))
    fresh = GitEventStore(path)
    for call in (
        lambda: fresh.head("s"),
        lambda: fresh.events("s"),
        lambda: list(fresh.iter_events("s")),
        lambda: fresh.append("s", "t", {}, expected_seq=1),
        lambda: LeaseRegistry(fresh).current("s"),
        lambda: LeaseRegistry(fresh).acquire("s", "other", 5),
    ):
        with pytest.raises(StoreUnavailable):
            call()
    fresh.close()


def test_ref_to_a_foreign_commit_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "r.git"
    store = GitEventStore(path)
    store.append("b", "t", {}, expected_seq=0)
    store.append("a", "t", {}, expected_seq=0)  # the last write: its feed commit names a's tip
    set_feed_tip(path, "a", store_commit(store, "b"))
    with pytest.raises(StoreUnavailable, match="corrupt"):
        store.events("a")
    store.close()


def test_bugs_are_not_translated_into_store_unavailable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only git and OS errors become `StoreUnavailable` (which callers retry): a programming
    error (`TypeError`, `AttributeError`, `LookupError`, `RuntimeError`) propagates as itself."""
    import shard_sql.git.chain
    import shard_sql.git.intents
    import shard_sql.git.store
    from shard_sql.validation import pending

    store = GitEventStore(tmp_path / "r.git")
    store.append("s", "t", {}, expected_seq=0)

    def bug(kind: type[Exception]) -> Callable[..., object]:
        def fail(*args: object, **kwargs: object) -> object:
            raise kind("a bug")

        return fail

    monkeypatch.setattr(shard_sql.git.chain, "commit_bytes", bug(TypeError))
    with pytest.raises(TypeError):
        store.append("s", "t", {}, expected_seq=1)
    monkeypatch.setattr(shard_sql.git.store, "granted", bug(AttributeError))
    with pytest.raises(AttributeError):
        LeaseRegistry(store).acquire("s", "node", 10)
    monkeypatch.setattr(shard_sql.git.chain, "event_of", bug(LookupError))
    with pytest.raises(LookupError):
        store.events("s")
    with pytest.raises(LookupError):
        list(store.iter_events("s"))
    monkeypatch.setattr(shard_sql.git.intents, "record_bytes", bug(RuntimeError))
    with pytest.raises(RuntimeError):
        store.put_intent("s", pending("t", {}, "k"), holder="h")
    store.close()


def test_malformed_objects_are_store_unavailable(tmp_path: Path) -> None:
    """Stored objects that do not parse (written by hand, by another tool, or damaged) are
    `StoreUnavailable`, whatever is wrong with them, on every read path."""
    path = tmp_path / "r.git"
    store = GitEventStore(path)
    store.append("s", "t", {}, expected_seq=0)
    good = git(path, "cat-file", "commit", store_commit(store, "s"))
    tree = good.split("\n", 1)[0]
    trailer = "Shard-Sql-Event: "
    meta = json.loads(good.rsplit(trailer, 1)[1])
    who = "author a <a@a> 0 +0000\ncommitter a <a@a> 0 +0000\n"

    def commit(message: str, header: str = who) -> str:
        raw = f"{tree}\n{header}\n{message}"
        return git(path, "hash-object", "-t", "commit", "-w", "--stdin", "--literally", stdin=raw)

    def event(payload: str, fields: object) -> str:
        return commit(f"subject\n\n{payload}\n\n{trailer}{json.dumps(fields)}\n")

    broken = [
        commit("subject only\n"),
        commit("x\n\n{}\n\nShard-Sql-Event: {}\n", header=""),
        event("{}", [1, 2]),
        event("{}", {k: v for k, v in meta.items() if k != "type"}),
        event("{}", {**meta, "recorded_at": 123}),
        event("{}", {**meta, "recorded_at": "2026-01-01T00:00:00"}),
        event("{}", {**meta, "generation": "3"}),
        event("not json", meta),
        event("[1]", meta),
        event("{}", "not an object"),
    ]
    for oid in broken:
        set_feed_tip(path, "s", oid.strip())
        fresh = GitEventStore(path)
        # Each call succeeds (`head` reads the seq only) or raises StoreUnavailable, nothing else.
        with contextlib.suppress(StoreUnavailable):
            fresh.head("s")
        with contextlib.suppress(StoreUnavailable):
            list(fresh.iter_events("s"))
        with contextlib.suppress(StoreUnavailable):
            fresh.append("s", "t", {}, expected_seq=1, intent_id="i")
        with pytest.raises(StoreUnavailable):
            fresh.events("s")
        fresh.close()
    for record in ["[]", "{}", '{"space":"s","holder":1,"expires_at":"x","generation":1}', "{"]:
        blob = git(path, "hash-object", "-w", "--stdin", stdin=record).strip()
        git(path, "update-ref", lease_ref("s"), blob)
        fresh = GitEventStore(path)
        with pytest.raises(StoreUnavailable):
            LeaseRegistry(fresh).current("s")
        with pytest.raises(StoreUnavailable):
            LeaseRegistry(fresh).acquire("s", "node", 5)
        fresh.close()
    store.close()


@pytest.mark.parametrize("damage", [b"garbage\n", b""], ids=["garbage", "empty"])
def test_a_damaged_feed_ref_is_reported(
    tmp_path: Path, damage: bytes, capsys: pytest.CaptureFixture[str]
) -> None:
    """The feed ref holds every space: damaged (garbage, or emptied), every read and write raises
    StoreUnavailable naming it, `verify` and `export` fail. A damaged space ref is a damaged
    copy: reads never use it, the next move of the copies puts it right."""
    from shard_sql.cli import main

    path = tmp_path / "r.git"
    store = GitEventStore(path)
    store.append("a", "t", {}, expected_seq=0)
    store.append_many("wiki pages", [("t", {"i": i}) for i in range(300)], expected_seq=0)
    move_space_refs(store)
    (path / space_ref("wiki pages")).write_bytes(damage)
    assert store.spaces() == ["a", "wiki pages"] and store.head("wiki pages") == 300
    assert len(store.events("wiki pages")) == 300
    store.append("wiki pages", "t", {}, expected_seq=300)
    move_space_refs(store)  # puts the damaged copy right
    assert git(path, "rev-list", "--count", space_ref("wiki pages")) == "301\n"
    good = (path / FEED).read_bytes()
    (path / FEED).write_bytes(damage)
    for call in (
        store.spaces,
        store.feed,
        store.feed_head,
        lambda: store.head("a"),
        lambda: store.events("wiki pages"),
        lambda: list(store.iter_events("wiki pages")),
        lambda: store.append("wiki pages", "t", {}, expected_seq=301),
    ):
        with pytest.raises(StoreUnavailable, match=r"the feed.*refs/shard-sql/feed.*unreadable"):
            call()
    store.close()
    url = f"git+file://{path}"
    assert main(["verify", "--url", url]) != 0
    assert "refs/shard-sql/feed" in capsys.readouterr().err
    assert main(["export", "--url", url, "--file", str(tmp_path / "out.jsonl")]) != 0
    assert "refs/shard-sql/feed" in capsys.readouterr().err
    (path / FEED).write_bytes(good)
    assert GitEventStore(path).head("wiki pages") == 301


def test_long_reads_do_not_fill_the_object_cache(tmp_path: Path) -> None:
    import pygit2

    pygit2.settings.enable_fsync_gitdir(False)  # speed only; other tests' stores turn it back on
    try:
        # No packing: a run beside the reads would fill libgit2's (process-wide) cache too.
        store = GitEventStore(tmp_path / "r.git", durable=False, pack_every=0)
        n = 12_000
        for start in range(0, n, 6_000):
            items = [("t", {"i": i, "pad": "x" * 200}) for i in range(start, start + 6_000)]
            store.append_many("s", items, expected_seq=start)
    finally:
        pygit2.settings.enable_fsync_gitdir(True)
    before = pygit2.settings.cached_memory[0]
    peak = 0
    for e in store.iter_events("s"):
        if e.seq % 1000 == 0:
            peak = max(peak, pygit2.settings.cached_memory[0] - before)
    assert peak < 3 * 1024 * 1024, peak  # the commits read are not all kept in libgit2's cache
    assert [e.payload["i"] for e in store.events("s", from_seq=n - 300)] == list(range(n - 300, n))
    store.close()


# -- the package ---------------------------------------------------------------------------------


def test_the_git_package_imports_point_one_way() -> None:
    """The modules of `shard_sql.git` import each other without a cycle, at module level only,
    and stay small."""
    import ast
    import graphlib

    import shard_sql.git

    graph: dict[str, set[str]] = {}
    for f in Path(shard_sql.git.__file__).parent.glob("*.py"):
        text = f.read_text()
        assert text.count("\n") <= 600, f.name
        tree = ast.parse(text)
        graph[f.stem] = {
            node.module.rsplit(".", 1)[1]
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom)
            and node.module
            and node.module.startswith("shard_sql.git.")
        }
        for fn in ast.walk(tree):
            if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                inner = [n for n in ast.walk(fn) if isinstance(n, ast.Import | ast.ImportFrom)]
                assert not inner, f"{f.name}: {fn.name} imports inside a function"
    order = list(graphlib.TopologicalSorter(graph).static_order())  # CycleError on a cycle
    assert set(order) >= {"layout", "errors", "objects", "store", "intents"}
