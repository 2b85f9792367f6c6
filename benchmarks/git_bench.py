"""Git adapter benchmark: appends and reads through `GitEventStore` next to bare baselines.

Every figure is measured in the same run on the same repository as its baseline:

- append (fenced, lease held): `store.append(..., fence=lease)`, one event per call, next to the
  bare pygit2 baseline that writes the same kind of commit (same format, same tree, same size)
  and moves a ref in a libgit2 ref transaction with no checks at all;
- the same through `AppendAuthority.append` and with an `intent_id` (informative);
- the git CLI's plumbing (`commit-tree` + `update-ref`, a process each), for the choice of layer;
- reads: `events()` and `iter_events()` of a 10,000-event space, next to a bare pygit2 walk of
  the same commits (`odb.read` + `json.loads` of the payload), and `git cat-file --batch`;
- the cost of durability: the append with libgit2's fsync switched off (process-wide);
- the cost of the feed: the fenced append next to the same append as it was before the feed
  (the same objects, the space ref moved under its own lock: `_SpaceRefOnly`), and a
  transaction of one event in each of two spaces next to two fenced appends;
- the cost of packing: the fenced append next to the same in a store that never packs.

`run(quick=False)` returns rows (work, figure, baseline, ratio, target, unit) for `shard-sql
bench`; `python -m benchmarks.git_bench [--quick] [--json]` prints them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pygit2
from pygit2.enums import ObjectType

from shard_sql import AppendAuthority, GitEventStore, LeaseRegistry
from shard_sql.git.layout import space_ref
from shard_sql.git.objects import Tip, commit_bytes
from shard_sql.leases import check_fence
from shard_sql.store_base import stamp
from shard_sql.validation import pending
from shard_sql.values import Event, Lease

PAYLOAD = {"page": "Home", "title": "A wiki page", "tags": ["a", "b"], "rev": 0}
PAYLOAD_JSON = json.dumps(PAYLOAD, ensure_ascii=False, separators=(",", ":"))


def _rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("inf")


def _median_rate(rounds: int, count: int, work: Callable[[int], None]) -> float:
    rates = []
    for r in range(rounds):
        start = time.perf_counter()
        work(r)
        rates.append(_rate(count, time.perf_counter() - start))
    return statistics.median(rates)


class _Baseline:
    """Bare pygit2: the same commit bytes, a ref transaction without any check."""

    def __init__(self, repo: Any, space: str) -> None:
        self.repo = repo
        self.space = space
        self.ref = space_ref(space)
        self.tip: str | None = None
        self.seq = 0
        self.tree = str(repo.TreeBuilder().write())

    def append(self) -> None:
        now = datetime.now(UTC)
        e = Event(self.space, self.seq, "page.edited", PAYLOAD, now, "bench-node", 1, None)
        oid = self.repo.odb.write(
            ObjectType.COMMIT, commit_bytes(self.tree, self.tip, e, PAYLOAD_JSON)
        )
        with self.repo.transaction() as tx:
            tx.lock_ref(self.ref)
            tx.set_target(self.ref, oid)
        self.tip = str(oid)
        self.seq += 1


class _SpaceRefOnly:
    """A fenced append as the store made it before the feed: the same objects (`SpaceChains`),
    the ref's new content staged and fsynced with them, the space ref's own lock, the fence
    checked under it, the rename and the directory fsync (`RefFiles`); no feed, no mutex."""

    def __init__(self, store: GitEventStore, lease: Lease) -> None:
        self.store = store
        self.lease = lease
        self.ref = "refs/shard-sql-bench/before-the-feed"
        self.tip: Tip | None = None

    def append(self) -> None:
        git, chains, store = self.store._git, self.store._chains, self.store
        handle = git.handle()
        check_fence(self.lease, store._lease_record(handle, self.lease.space))
        batch = [pending("page.edited", PAYLOAD)]
        seq = self.tip.seq + 1 if self.tip else 0
        out = [stamp(self.lease.space, seq, batch[0], self.lease, datetime.now(UTC))]
        objects = git.objects()
        try:
            new, _ = chains.write_commits(handle, objects, self.tip, batch, out)
            staged = git.refs.stage(self.ref, new.oid, objects)
            lock = git.lock(handle, self.ref, time.monotonic() + 10, staged)
            try:
                if git.target(handle, self.ref) != (self.tip.oid if self.tip else None):
                    raise AssertionError("moved")
                check_fence(self.lease, store._lease_record(handle, self.lease.space))
                lock.commit(new.oid)
            finally:
                lock.free()
                Path(staged).unlink(missing_ok=True)
        finally:
            objects.close()
        self.tip = new


def _appends(path: Path, count: int, rounds: int, durable: bool = True) -> dict[str, float]:
    store = GitEventStore(path, durable=durable)
    registry = LeaseRegistry(store)
    repo = pygit2.Repository(str(path))
    lease = registry.acquire("fenced", "bench-node", 3600)
    # The same fenced appends in a repository of their own that never packs: the price of
    # packing in the background (every PACK_EVERY loose objects) on appends.
    unpacked_path = path.with_name(path.name + "-unpacked")
    unpacked = GitEventStore(unpacked_path, durable=durable, pack_every=0)
    unpacked_lease = LeaseRegistry(unpacked).acquire("fenced", "bench-node", 3600)
    node = AppendAuthority("bench-node", store, registry, ttl_seconds=3600)
    node.acquire("authority")
    node.acquire("intents")
    base = _Baseline(repo, "baseline")
    heads = {"fenced": 0, "intents": 0, "unpacked": 0}

    def fenced(_: int) -> None:
        for _ in range(count):
            store.append(
                "fenced", "page.edited", PAYLOAD, expected_seq=heads["fenced"], fence=lease
            )
            heads["fenced"] += 1

    def fenced_unpacked(_: int) -> None:
        for _ in range(count):
            unpacked.append(
                "fenced",
                "page.edited",
                PAYLOAD,
                expected_seq=heads["unpacked"],
                fence=unpacked_lease,
            )
            heads["unpacked"] += 1

    def authority(_: int) -> None:
        for _ in range(count):
            node.append("authority", "page.edited", PAYLOAD)

    def intents(r: int) -> None:
        for i in range(count):
            node.append("intents", "page.edited", PAYLOAD, intent_id=f"r{r}-{i}")

    def baseline(_: int) -> None:
        for _ in range(count):
            base.append()

    before = _SpaceRefOnly(store, registry.acquire("before", "bench-node", 3600))

    def before_the_feed(_: int) -> None:
        for _ in range(count):
            before.append()

    pair = [registry.acquire(s, "bench-node", 3600) for s in ("tx-a", "tx-b")]

    def transaction(_: int) -> None:
        for _ in range(count // 2):
            with store.transaction() as tx:
                for lease in pair:
                    tx.append(lease.space, "page.edited", PAYLOAD, fence=lease)

    # Warm up: a long-running writer has made its object directories durable already (once per
    # process and directory); then interleave the variants round by round, against drift.
    store.append_many("warm-up", [("t", {"i": i}) for i in range(512)], expected_seq=0)
    unpacked.append_many("warm-up", [("t", {"i": i}) for i in range(512)], expected_seq=0)
    variants = {
        "baseline": baseline,
        "fenced": fenced,
        "fenced_unpacked": fenced_unpacked,
        "before": before_the_feed,
        "transaction": transaction,
        "authority": authority,
        "intents": intents,
    }
    rates: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(rounds):
        for name, work in variants.items():
            start = time.perf_counter()
            work(r)
            rates[name].append(_rate(count, time.perf_counter() - start))
    store.close()
    unpacked.close()
    repo.free()
    return {name: statistics.median(values) for name, values in rates.items()}


def _cli_appends(path: Path, count: int) -> float:
    def git(*args: str, stdin: str | None = None) -> str:
        return subprocess.run(
            ["git", "-C", str(path), *args], input=stdin, capture_output=True, text=True, check=True
        ).stdout.strip()

    tree = git("hash-object", "-t", "tree", "-w", "--stdin", stdin="")
    parent: str | None = None
    start = time.perf_counter()
    for i in range(count):
        e = Event("cli", i, "page.edited", PAYLOAD, datetime.now(UTC), "bench-node", 1, None)
        raw = commit_bytes(tree, parent, e, PAYLOAD_JSON).decode()
        oid = git("hash-object", "-t", "commit", "-w", "--stdin", stdin=raw)
        git("update-ref", space_ref("cli"), oid, parent or "")
        parent = oid
    return _rate(count, time.perf_counter() - start)


def _reads(path: Path, count: int, rounds: int) -> dict[str, float]:
    store = GitEventStore(path)
    batch = 5_000
    for start in range(0, count, batch):
        n = min(batch, count - start)
        store.append_many("read", [("page.edited", PAYLOAD)] * n, expected_seq=start)
    store.close()  # moves the space ref (moved at snapshots, on close and by maintain)
    store = GitEventStore(path)
    repo = pygit2.Repository(str(path))
    tip = str(repo.references[space_ref("read")].target)

    def raw_walk(_round: int) -> None:
        fresh = pygit2.Repository(str(path))
        oid: str | None = tip
        n = 0
        while oid is not None:
            data = fresh.odb.read(oid)[1]
            head, _sep, message = data.partition(b"\n\n")
            second = head.split(b"\n", 2)[1]
            oid = second[7:].decode() if second.startswith(b"parent ") else None
            json.loads(message.split(b"\n", 3)[2])
            n += 1
        assert n == count
        fresh.free()

    def events(_: int) -> None:
        fresh = GitEventStore(path)
        assert len(fresh.events("read")) == count
        fresh.close()

    def iterate(_: int) -> None:
        fresh = GitEventStore(path)
        assert sum(1 for _ in fresh.iter_events("read")) == count
        fresh.close()

    def cat_file(_: int) -> None:
        listing = subprocess.run(
            ["git", "-C", str(path), "rev-list", space_ref("read")],
            capture_output=True,
            check=True,
        ).stdout
        out = subprocess.run(
            ["git", "-C", str(path), "cat-file", "--batch"],
            input=listing,
            capture_output=True,
            check=True,
        ).stdout
        assert out.count(b" commit ") >= count

    result = {
        "raw": _median_rate(rounds, count, raw_walk),
        "events": _median_rate(rounds, count, events),
        "iter": _median_rate(rounds, count, iterate),
        "cat_file": _median_rate(rounds, count, cat_file),
    }
    store.close()
    repo.free()
    return result


def _row(
    work: str,
    figure: float,
    baseline: float | None,
    target: float | None,
    unit: str,
    note: str = "",
) -> dict[str, Any]:
    ratio = figure / baseline if baseline else None
    ok = None
    if target is not None:
        ok = (ratio if ratio is not None else figure) >= target
    return {
        "work": work,
        "figure": round(figure, 1),
        "baseline": None if baseline is None else round(baseline, 1),
        "ratio": None if ratio is None else round(ratio, 3),
        "target": target,
        "unit": unit,
        "ok": ok,
        "note": note,
    }


def run(*, quick: bool = False) -> list[dict[str, Any]]:
    """Measure; return the rows. `quick`: tiny counts (a smoke run, figures meaningless)."""
    appends, reads, cli, rounds = (60, 600, 10, 1) if quick else (400, 10_000, 100, 5)
    rows = []
    with tempfile.TemporaryDirectory(prefix="shard-sql-git-bench-") as tmp:
        root = Path(tmp)
        w = _appends(root / "durable.git", appends, rounds)
        base = w["baseline"]
        cli_rate = _cli_appends(root / "durable.git", cli)
        r = _reads(root / "read.git", reads, rounds)
        # Durability off (a process-wide libgit2 option), to price the fsyncs.
        pygit2.settings.enable_fsync_gitdir(False)
        try:
            nf = _appends(root / "nofsync.git", appends, rounds, durable=False)
        finally:
            pygit2.settings.enable_fsync_gitdir(True)
        fsync_ms = (1 / w["fenced"] - 1 / nf["fenced"]) * 1000
        table: list[tuple[str, float, float | None, float | None, str]] = [
            ("git append, fenced, lease held (fsync)", w["fenced"], base, 0.5, "ev/s"),
            ("git append, fenced, vs before the feed", w["fenced"], w["before"], None, "ev/s"),
            ("git transaction of 2 spaces, per event", w["transaction"], w["fenced"], None, "ev/s"),
            ("git append, fenced: absolute", w["fenced"], None, 300.0, "ev/s"),
            (
                "git append, fenced, packing vs never",
                w["fenced"],
                w["fenced_unpacked"],
                None,
                "ev/s",
            ),
            ("git append via AppendAuthority (fsync)", w["authority"], base, 0.5, "ev/s"),
            ("git append with intent_id (fsync)", w["intents"], base, None, "ev/s"),
            ("git CLI plumbing append (layer choice)", cli_rate, base, None, "ev/s"),
            (f"git events() of {reads:,} events", r["events"], r["raw"], None, "ev/s"),
            (f"git iter_events() of {reads:,} events", r["iter"], r["raw"], None, "ev/s"),
            ("git events(): absolute", r["events"], None, 10_000.0, "ev/s"),
            ("git CLI cat-file --batch read (layer choice)", r["cat_file"], r["raw"], None, "ev/s"),
            ("git append, fenced, no fsync", nf["fenced"], nf["baseline"], None, "ev/s"),
            ("git append, no fsync, vs before the feed", nf["fenced"], nf["before"], None, "ev/s"),
            ("fsync cost per fenced append", fsync_ms, None, None, "ms"),
        ]
        rows = [_row(*t) for t in table]
    return rows


# -- forwarding across processes (added with the git IntentQueue) ------------------------------


def _forward_holder(path: str, space: str, ttl: float, warm: int, ready: Any, stop: Any) -> None:
    """A holder in its own process: holds `space` and serves what is forwarded to it."""
    store = GitEventStore(path)
    # Warm up as a long-running writer would be: its object directories made durable already.
    if warm:
        items = [("t", {"i": i}) for i in range(warm)]
        store.append_many(f"warm-up-{space}", items, expected_seq=0)
    with AppendAuthority("holder", store, LeaseRegistry(store), ttl_seconds=ttl) as node:
        node.acquire(space)
        ready.set()
        stop.wait(600)
    store.close()


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def forwarding(*, quick: bool = False) -> list[dict[str, Any]]:
    """Forwarded-append latency across processes on git, next to a direct append, same run.

    A holder process holds space `fwd` (`with AppendAuthority(...)`, serving in its background
    thread). This process appends to `fwd` through a non-holder `AppendAuthority` (the intent
    goes through a ref, the holder polls for it, writes, the sender polls for the event), and,
    interleaved call by call, appends to `direct`, a space it holds itself (a fenced write),
    without and with an `intent_id` (what the forwarded write carries).
    Then the failover: the holder is SIGKILLed and the next forwarded append is timed until
    acknowledged (the sender takes the space over once the lease, TTL 1 s, lapses).
    Rows: p50/p99 in microseconds (forwarded, with the direct append as the baseline), failover
    in seconds and as a multiple of the TTL.
    """
    import multiprocessing
    import os
    import signal

    count, warm, objects, hold = (30, 5, 0, 3.0) if quick else (400, 40, 512, 30.0)
    ctx = multiprocessing.get_context("spawn")
    rows = []
    with tempfile.TemporaryDirectory(prefix="shard-sql-git-fwd-") as tmp:
        path = str(Path(tmp) / "fwd.git")
        store = GitEventStore(path)
        ready, stop = ctx.Event(), ctx.Event()
        holder = ctx.Process(target=_forward_holder, args=(path, "fwd", hold, objects, ready, stop))
        holder.start()
        try:
            if not ready.wait(60):
                raise RuntimeError("the holder process did not start")
            if objects:
                items = [("t", {"i": i}) for i in range(objects)]
                store.append_many("warm-up-sender", items, expected_seq=0)
            sender = AppendAuthority("sender", store, LeaseRegistry(store), forward_timeout=30)
            sender.append("direct", "page.edited", PAYLOAD)  # holds `direct` from now on
            forwarded: list[float] = []
            direct: list[float] = []
            keyed: list[float] = []
            for i in range(warm + count):
                t0 = time.perf_counter()
                e = sender.append("fwd", "page.edited", PAYLOAD)
                t1 = time.perf_counter()
                sender.append("direct", "page.edited", PAYLOAD)
                t2 = time.perf_counter()
                sender.append("direct", "page.edited", PAYLOAD, intent_id=f"direct-{i}")
                t3 = time.perf_counter()
                assert e.writer == "holder"
                if i >= warm:
                    forwarded.append((t1 - t0) * 1e6)
                    direct.append((t2 - t1) * 1e6)
                    keyed.append((t3 - t2) * 1e6)
        finally:
            stop.set()
            holder.join(30)
        # Failover: a holder with a 1 s lease, SIGKILLed; time to the next acknowledged append.
        ttl = 1.0
        ready, stop = ctx.Event(), ctx.Event()
        holder = ctx.Process(target=_forward_holder, args=(path, "failover", ttl, 0, ready, stop))
        holder.start()
        try:
            if not ready.wait(60):
                raise RuntimeError("the holder process did not start")
            other = AppendAuthority("other", store, LeaseRegistry(store), ttl_seconds=ttl)
            other.append("failover", "page.edited", PAYLOAD)  # forwarded while it lives
            assert holder.pid is not None
            os.kill(holder.pid, signal.SIGKILL)
            t0 = time.perf_counter()
            e = other.append("failover", "page.edited", PAYLOAD)
            failover = time.perf_counter() - t0
            assert e.writer == "other"
        finally:
            holder.join(30)
        store.close()
    p50, p99 = _percentile(forwarded, 0.5), _percentile(forwarded, 0.99)
    d50, d99 = _percentile(direct, 0.5), _percentile(direct, 0.99)
    rows.append(_row("git forwarded append across processes, p50", p50, d50, None, "us"))
    rows.append(_row("git forwarded append across processes, p99", p99, d99, None, "us"))
    rows.append(_row("git direct append (lease held), p50", d50, None, None, "us"))
    rows.append(_row("git direct append (lease held), p99", d99, None, None, "us"))
    k50, k99 = _percentile(keyed, 0.5), _percentile(keyed, 0.99)
    note = "the forwarded write carries an intent_id too: its index costs two more tree objects"
    rows.append(_row("git direct append with intent_id, p50", k50, d50, None, "us", note))
    rows.append(_row("git direct append with intent_id, p99", k99, d99, None, "us", note))
    rows.append(
        _row(
            "git failover: holder SIGKILLed to next ack (TTL 1 s)",
            failover,
            ttl,
            None,
            "s",
            "ratio = multiple of the TTL; at most 1 TTL of lease left, plus polling",
        )
    )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny counts: a smoke run")
    parser.add_argument("--json", action="store_true", help="print JSON lines")
    parser.add_argument(
        "--forwarding", action="store_true", help="forwarded-append latency across processes"
    )
    args = parser.parse_args(argv)
    rows = forwarding(quick=args.quick) if args.forwarding else run(quick=args.quick)
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    print(f"{'work':<52} {'figure':>10} {'baseline':>10} {'ratio':>7} {'target':>7}  unit")
    for r in rows:
        base = "-" if r["baseline"] is None else f"{r['baseline']:,.0f}"
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}"
        target = "-" if r["target"] is None else f"{r['target']:g}"
        mark = {True: "ok", False: "SHORT", None: ""}[r["ok"]]
        figure = f"{r['figure']:,.1f}"
        print(f"{r['work']:<52} {figure:>10} {base:>10} {ratio:>7} {target:>7}  {r['unit']} {mark}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
