"""Forwarding benchmark: appends forwarded across processes, and failover after a SIGKILL.

Two figures per backend (a SQLite file, `synchronous=FULL`, and a scratch PostgreSQL database):

- forwarded-append latency: a holder process serves a space (`with AppendAuthority(...) as
  node:`); this process, which does not hold it, appends to it one at a time through
  `AppendAuthority.append` (the intent goes through the `intents` table; the holder is woken by
  LISTEN/NOTIFY on PostgreSQL, by inotify on the `-wal` file on SQLite, Linux). Next to it, in the
  same run and interleaved every `CHUNK` appends, the direct append: the same node appending to a
  space it holds itself.
  p50 and p99 of each; target: forwarded p50 under 3 times the direct p50 on PostgreSQL.
- failover: a holder process with a short TTL holds a space; at a random moment of its renewal
  cycle it is SIGKILLed while this process appends to the space (forwarded, so the intent is
  pending when the holder dies); the time from the SIGKILL to the acknowledgement, as a multiple
  of the TTL. Target: under TTL + 1 s.

`run(quick=False, pg_url=None, ...)` returns the rows; `python -m benchmarks.forwarding_bench
[--quick] [--json] [--pg-url URL] [--backend sqlite|postgresql]` prints them. The PostgreSQL
server comes from `pg_url`, else SHARD_SQL_BENCH_PG_URL / SHARD_SQL_TEST_PG_URL, else
postgres@127.0.0.1:5432.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from shard_sql import AppendAuthority, LeaseRegistry, SqlEventStore

from .sql_bench import _pg_server, scratch_pg

PAYLOAD: dict[str, Any] = {"page": "Home", "title": "A wiki page", "tags": ["a", "b"], "rev": 7}
TYPE = "page.edited"
CHUNK = 25
TARGET_FORWARDED = 3.0
"""Forwarded p50 at most this many times the direct p50 (PostgreSQL)."""
FAILOVER_SLACK = 1.0
"""Failover under TTL + this many seconds."""
CTX = multiprocessing.get_context("spawn")


@dataclass
class Row:
    work: str
    figure: float | None
    baseline: float | None
    ratio: float | None
    target: float | None
    unit: str
    ok: bool | None = None
    note: str = ""


def _holder(url: str, space: str, ttl: float, ready: Any, stop: Any) -> None:
    """A holder process: takes `space` and serves what is forwarded to it until `stop`."""
    store = SqlEventStore(url)
    node = AppendAuthority("holder", store, LeaseRegistry(store), ttl_seconds=ttl)
    with node:
        node.acquire(space)
        ready.set()
        stop.wait(3600)
    store.close()


def _holder_of(url: str, spaces: list[str], ready: Any, stop: Any) -> None:
    """A holder process of `spaces` (serving what is forwarded to it) until `stop`."""
    store = SqlEventStore(url)
    node = AppendAuthority("holder", store, LeaseRegistry(store), ttl_seconds=3600)
    with node:
        for space in spaces:
            node.append(space, TYPE, PAYLOAD)
        ready.set()
        stop.wait(3600)
    store.close()


def _forwarder(url: str, space: str, count: int, go: Any, out: Any) -> None:
    store = SqlEventStore(url)
    node = AppendAuthority(f"f-{space}", store, LeaseRegistry(store), forward_timeout=120)
    with node:
        node.append(space, TYPE, PAYLOAD)  # the connection to the holder, warm
        out.put(("ready", 0.0, 0.0))
        go.wait(120)
        t0 = time.monotonic()
        for _ in range(count):
            assert node.append(space, TYPE, PAYLOAD).writer == "holder"
        out.put(("done", t0, time.monotonic()))
    store.close()


def spaces_rate(url: str, spaces: int, count: int) -> float:
    """Total events/s of `spaces` forwarder processes, each appending `count` to its own space,
    all held by one holder process (its listener serves them all)."""
    names = [f"sp-{os.getpid()}-{time.monotonic_ns()}-{i}" for i in range(spaces)]
    ready, stop, go, out = CTX.Event(), CTX.Event(), CTX.Event(), CTX.Queue()
    holder = CTX.Process(target=_holder_of, args=(url, names, ready, stop), daemon=True)
    holder.start()
    procs = []
    try:
        assert ready.wait(60), "the holder did not start"
        procs = [CTX.Process(target=_forwarder, args=(url, n, count, go, out)) for n in names]
        for p in procs:
            p.start()
        for _ in procs:
            assert out.get(timeout=120)[0] == "ready"
        go.set()
        spans = [out.get(timeout=600) for _ in procs]
    finally:
        stop.set()
        for p in [*procs, holder]:
            p.join(30)
            if p.is_alive():
                p.kill()
    return spaces * count / (max(s[2] for s in spans) - min(s[1] for s in spans))


def _start_holder(url: str, space: str, ttl: float) -> tuple[Any, Any]:
    ready, stop = CTX.Event(), CTX.Event()
    proc = CTX.Process(target=_holder, args=(url, space, ttl, ready, stop), daemon=True)
    proc.start()
    if not ready.wait(60):
        proc.kill()
        raise RuntimeError("the holder process did not start")
    return proc, stop


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def latency(label: str, url: str, appends: int) -> list[Row]:
    """Forwarded next to direct appends, interleaved every `CHUNK`; milliseconds."""
    holder, stop = _start_holder(url, "forwarded", 3600)
    store = SqlEventStore(url)
    node = AppendAuthority("bench", store, LeaseRegistry(store), ttl_seconds=3600)
    try:
        node.acquire("direct")
        for _ in range(CHUNK):  # warm up both paths (connections, the listener, caches)
            node.append("forwarded", TYPE, PAYLOAD)
            node.append("direct", TYPE, PAYLOAD)
        forwarded: list[float] = []
        direct: list[float] = []
        while len(forwarded) < appends:
            for space, out in (("direct", direct), ("forwarded", forwarded)):
                for _ in range(CHUNK):
                    t0 = time.perf_counter()
                    e = node.append(space, TYPE, PAYLOAD)
                    out.append((time.perf_counter() - t0) * 1000)
                    assert e.writer == ("holder" if space == "forwarded" else "bench")
        assert store.head("forwarded") == len(forwarded) + CHUNK
    finally:
        stop.set()
        holder.join(30)
        if holder.is_alive():
            holder.kill()
        store.close()
    f50, d50 = statistics.median(forwarded), statistics.median(direct)
    ratio = f50 / d50
    pg = label == "postgresql"
    target = TARGET_FORWARDED if pg else None
    return [
        Row(
            f"{label}: forwarded append p50 (direct p50 as baseline)",
            round(f50, 3),
            round(d50, 3),
            round(ratio, 2),
            target,
            "ms",
            (ratio < TARGET_FORWARDED) if pg else None,
            f"{len(forwarded)} forwarded, {len(direct)} direct, interleaved",
        ),
        Row(
            f"{label}: forwarded append p99 (direct p99 as baseline)",
            round(_pct(forwarded, 0.99), 3),
            round(_pct(direct, 0.99), 3),
            round(_pct(forwarded, 0.99) / _pct(direct, 0.99), 2),
            None,
            "ms",
        ),
    ]


def failover(label: str, url: str, ttl: float, rounds: int) -> list[Row]:
    """SIGKILL of the holder with an intent pending -> the acknowledged append; in TTLs."""
    store = SqlEventStore(url)
    node = AppendAuthority("next", store, LeaseRegistry(store), ttl_seconds=ttl)
    took: list[float] = []
    try:
        for r in range(rounds):
            space = f"failover-{r}"
            holder, _stop = _start_holder(url, space, ttl)
            node.append(space, TYPE, {"before": r})  # forwarded to the live holder
            time.sleep(random.uniform(0, ttl))  # a random moment of its renewal cycle
            assert holder.pid is not None
            os.kill(holder.pid, signal.SIGKILL)
            killed = time.monotonic()
            e = node.append(space, TYPE, {"after": r})
            took.append(time.monotonic() - killed)
            holder.join(10)
            assert e.writer == "next" and e.seq == 1
    finally:
        store.close()
    worst, median = max(took), statistics.median(took)
    return [
        Row(
            f"{label}: failover, SIGKILL to next ack (TTL {ttl:g} s), median",
            round(median, 3),
            ttl,
            round(median / ttl, 2),
            None,
            "s",
            None,
            f"{rounds} rounds; each {', '.join(f'{t:.2f}' for t in took)} s",
        ),
        Row(
            f"{label}: failover, SIGKILL to next ack (TTL {ttl:g} s), worst",
            round(worst, 3),
            ttl,
            round(worst / ttl, 2),
            round((ttl + FAILOVER_SLACK) / ttl, 2),
            "s",
            worst < ttl + FAILOVER_SLACK,
            "target: under TTL + 1 s",
        ),
    ]


def run(
    *,
    quick: bool = False,
    pg_url: str | None = None,
    appends: int | None = None,
    ttl: float = 1.0,
    rounds: int | None = None,
    backends: tuple[str, ...] = ("sqlite", "postgresql"),
) -> list[dict[str, Any]]:
    """Run the benchmark; return one mapping per row (see the module docstring)."""
    n = appends or (100 if quick else 500)
    k = rounds or (2 if quick else 5)
    rows: list[Row] = []
    if "sqlite" in backends:
        with tempfile.TemporaryDirectory(prefix="shard-sql-fwd-bench-") as tmp:
            url = f"sqlite:///{Path(tmp) / 'bench.db'}"
            SqlEventStore(url).close()  # create and migrate
            rows += latency("sqlite", url, n)
            rows += failover("sqlite", url, ttl, k)
    if "postgresql" in backends:
        try:
            scratch = scratch_pg(_pg_server(None, pg_url))
            db = scratch.__enter__()
        except Exception as e:
            rows.append(Row("postgresql: skipped", None, None, None, None, "", None, str(e)))
        else:
            try:
                SqlEventStore(db, migrate=True).close()
                rows += latency("postgresql", db, n)
                rows += failover("postgresql", db, ttl, k)
            finally:
                scratch.__exit__(None, None, None)
    return [asdict(r) for r in rows]


def _print(rows: list[dict[str, Any]]) -> None:
    print(f"{'work':66} {'figure':>9} {'baseline':>9} {'ratio':>7} {'target':>7}  mark")
    for r in rows:
        if r["figure"] is None:
            print(f"{r['work']:66} {r['note']}")
            continue
        mark = {True: "pass", False: "short", None: ""}[r["ok"]]
        target = "" if r["target"] is None else f"{r['target']:.2f}x"
        print(
            f"{r['work']:66} {r['figure']:>7.3f}{r['unit']:<2} {r['baseline']:>7.3f}{r['unit']:<2}"
            f" {r['ratio']:>6.2f}x {target:>7}  {mark}"
        )
        if r["note"]:
            print(f"{'':66} {r['note']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer appends and rounds")
    parser.add_argument("--json", action="store_true", help="one JSON object per row")
    parser.add_argument("--pg-url", help="PostgreSQL server to create a scratch database on")
    parser.add_argument("--appends", type=int, help="forwarded appends to time (default 500)")
    parser.add_argument("--ttl", type=float, default=1.0, help="lease TTL of the failover runs")
    parser.add_argument("--rounds", type=int, help="failover rounds (default 5)")
    parser.add_argument(
        "--backend", action="append", choices=("sqlite", "postgresql"), help="repeatable"
    )
    args = parser.parse_args(argv)
    rows = run(
        quick=args.quick,
        pg_url=args.pg_url,
        appends=args.appends,
        ttl=args.ttl,
        rounds=args.rounds,
        backends=tuple(args.backend or ("sqlite", "postgresql")),
    )
    if args.json:
        for r in rows:
            print(json.dumps(r))
    else:
        _print(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
