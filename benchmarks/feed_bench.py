"""The feed on SQL stores (issue 14) next to the raw driver, in the same run:

- reading 100,000 events through `feed()` (and `iter_feed()`) next to the raw driver reading the
  same rows in position order + `json.loads` of each payload, target 1.0x;
- a `Subscription` handling them in batches of 100 with a no-op handler (a transaction and a
  checkpoint save per batch) next to that raw read rate, target 0.5x;
- `wait_feed` wake-up: from an append's return in this process to `wait_feed`'s return in
  another, p50, judged directly against a 5 ms budget (`<= 5 ms`, lower is better; no
  baseline, no ratio);
- PostgreSQL: 4 processes appending to 4 different spaces next to 4 processes doing raw inserts
  into the same table (the feed serializes nothing), target 0.9x.

Rows of `perf_bench` (work `feed`): `python -m benchmarks --only feed`.
"""

from __future__ import annotations

import json
import multiprocessing
import statistics
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from shard_sql import SqlEventStore, Subscription

from .raw_drivers import PAYLOAD, TYPE, libpq_url
from .rows import Counts, Row, measured, skipped
from .sql_bench import _compare

TARGET_READ = 1.0
TARGET_SUBSCRIPTION = 0.5
TARGET_WAKE_MS = 5.0
TARGET_SPACES = 0.9
CTX = multiprocessing.get_context("spawn")
FEED_SQL = (
    "SELECT space, seq, type, {payload}, recorded_at, writer, generation, intent_id, position "
    "FROM events WHERE position > 0 ORDER BY position"
)


def _raw_feed(raw: Any, postgres: bool) -> list[tuple[Any, ...]]:
    """The raw driver: the feed's rows in position order, each payload through json.loads."""
    loads = json.loads
    raw.cur.execute(FEED_SQL.format(payload="payload::text" if postgres else "payload"))
    return [(sp, s, t, loads(p), at, w, g, i, n) for sp, s, t, p, at, w, g, i, n in raw.cur]


def _fill(store: SqlEventStore, count: int) -> None:
    """`count` events in 10 spaces, batches of 1,000 taking turns."""
    heads: dict[str, int] = {}
    batch = [(TYPE, PAYLOAD)] * 1000
    n = 0
    while n < count:
        space = f"feed-{(n // 1000) % 10}"
        size = min(1000, count - n)
        store.append_many(space, batch[:size], expected_seq=heads.get(space, 0))
        heads[space] = heads.get(space, 0) + size
        n += size
    store.feed_head()  # placed (PostgreSQL) before anything is timed


def feed_rows(label: str, url: str, raw: Any, counts: Counts) -> list[Row]:
    postgres = label == "postgresql"
    rows: list[Row] = []
    n = counts.reads
    vs = "raw driver + json.loads, same rows"
    with SqlEventStore(url) as store:
        _fill(store, n)
        if len(_raw_feed(raw, postgres)) != n:
            return [skipped("feed rows", label, vs, "the scratch database was not empty")]

        def bare() -> None:
            assert len(_raw_feed(raw, postgres)) == n

        def read_list() -> None:
            assert len(store.feed()) == n

        def read_iter() -> None:
            assert sum(1 for _ in store.iter_feed()) == n

        work = f"read {n:,} events through the feed"
        for how, read in (("feed()", read_list), ("iter_feed()", read_iter)):
            fig, base = _compare(counts.rounds, n, read, bare)
            rows.append(measured(f"{work}, {how}", label, vs, fig, base, TARGET_READ))

        work = f"Subscription of {n:,} events, batches of 100, no-op handler"
        if not hasattr(store, "transaction"):
            rows.append(skipped(work, label, "raw read rate", "SqlEventStore has no transaction()"))
        else:

            def subscribe() -> None:
                sub = Subscription(store, f"bench-{uuid.uuid4().hex[:8]}", _no_op, batch_size=100)
                assert sub.run_once() >= n

            fig, base = _compare(counts.rounds, n, subscribe, bare)
            rows.append(measured(work, label, "raw read rate", fig, base, TARGET_SUBSCRIPTION))
    rows.append(_wake_row(label, url, 10 if counts.rounds <= 1 else 200))
    if postgres:
        rows.append(_spaces_row(label, url, counts))
    return rows


def _no_op(tx: Any, events: list[Any]) -> None:
    pass


def run(
    *, quick: bool = False, url: str | None = None, progress: Any = None
) -> list[dict[str, Any]]:
    """These rows alone (`shard-sql bench --only feed`): perf_bench's work `feed`."""
    from .perf_bench import run as perf_run

    return perf_run(quick=quick, url=url, works=("feed",), progress=progress)


# -- wait_feed's wake-up ---------------------------------------------------------------------------


def _waiter(url: str, ready: Any, out: Any, count: int) -> None:
    store = SqlEventStore(url)
    store.wait_feed(store.feed_head(), timeout=0.5)  # the waiting machinery is up
    ready.set()
    woke = []
    for _ in range(count):
        store.wait_feed(store.feed_head(), timeout=10)
        woke.append(time.monotonic())
    out.put(woke)
    store.close()


def _wake_row(label: str, url: str, count: int) -> Row:
    """p50 of (wait_feed's return in the waiting process) - (the append's return here), each
    wake-up matched with the last append before it (CLOCK_MONOTONIC is the machine's)."""
    ready, out = CTX.Event(), CTX.Queue()
    waiter = CTX.Process(target=_waiter, args=(url, ready, out, count))
    waiter.start()
    try:
        ready.wait(60)
        done = []
        with SqlEventStore(url) as store:
            space = f"wake-{uuid.uuid4().hex[:8]}"
            store.append(space, TYPE, PAYLOAD, expected_seq=0)
            time.sleep(0.3)
            for seq in range(1, count + 1):
                time.sleep(0.03)
                store.append(space, TYPE, PAYLOAD, expected_seq=seq)
                done.append(time.monotonic())
            woke = out.get(timeout=120)
    finally:
        waiter.join(30)
    latencies = []
    for t in woke:
        before = [d for d in done if d <= t]
        if before:
            latencies.append((t - before[-1]) * 1000)
    return wake_row(label, statistics.median(latencies))


def wake_row(label: str, p50: float) -> Row:
    """The wake-up's p50 (ms) judged directly against the budget: lower is better, no baseline."""
    return measured(
        "wait_feed wake-up after another process's append, p50",
        label,
        f"{TARGET_WAKE_MS:g} ms budget",
        p50,
        None,
        TARGET_WAKE_MS,
        unit="ms",
        note=f"lower is better: the p50 judged <= the {TARGET_WAKE_MS:g} ms budget",
        target_text=f"<= {TARGET_WAKE_MS:g} ms",
        at_most=True,
    )


# -- 4 processes on 4 spaces (PostgreSQL) ---------------------------------------------------------

RAW_INSERT = (
    "INSERT INTO events (space, seq, type, payload, recorded_at, writer, generation, intent_id) "
    "VALUES (%s, %s, %s, CAST(%s AS jsonb), %s, %s, %s, %s)"
)


def _space_worker(url: str, raw: bool, count: int, go: Any, out: Any) -> None:
    space = f"{'raw' if raw else 'store'}-{uuid.uuid4().hex[:8]}"
    if raw:
        import psycopg

        conn = psycopg.connect(libpq_url(url), autocommit=True)
        cur = conn.cursor()

        def step(seq: int) -> None:
            at = datetime.now(UTC)
            cur.execute(RAW_INSERT, (space, seq, TYPE, json.dumps(PAYLOAD), at, "w", 1, None))

    else:
        store = SqlEventStore(url)

        def step(seq: int) -> None:
            store.append(space, TYPE, PAYLOAD, expected_seq=seq)

    step(0)
    out.put("ready")
    go.wait(120)
    t0 = time.monotonic()
    for seq in range(1, count + 1):
        step(seq)
    out.put((t0, time.monotonic()))
    if raw:
        conn.close()
    else:
        store.close()


def _four(url: str, raw: bool, count: int) -> float:
    go, out = CTX.Event(), CTX.Queue()
    procs = [CTX.Process(target=_space_worker, args=(url, raw, count, go, out)) for _ in range(4)]
    for p in procs:
        p.start()
    try:
        for _ in procs:
            assert out.get(timeout=120) == "ready"
        go.set()
        spans = [out.get(timeout=600) for _ in procs]
    finally:
        for p in procs:
            p.join(60)
    return 4 * count / (max(e for _, e in spans) - min(s for s, _ in spans))


def _spaces_row(label: str, url: str, counts: Counts) -> Row:
    count = counts.proc_appends
    rounds = max(1, min(counts.rounds, 3))
    store_rates, raw_rates = [], []
    for r in range(rounds):
        for raw in (r % 2 == 0, r % 2 == 1):  # interleaved, the first side alternating
            (raw_rates if raw else store_rates).append(_four(url, raw, count))
    return measured(
        "4 processes appending to 4 different spaces (total)",
        label,
        "4 processes, raw inserts, same table",
        statistics.median(store_rates),
        statistics.median(raw_rates),
        TARGET_SPACES,
    )
