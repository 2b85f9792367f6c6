"""Performance suite (issue 7): shard_sql next to its baselines, in the same run, as ratios.

One row per work of the issue's table, on a SQLite file (WAL, `synchronous=FULL`, the default,
and `synchronous=NORMAL`), a scratch PostgreSQL database and a git repository. Each figure is
measured in the same run, with the same durability settings, as its baselines (interleaved;
medians of the rounds), on the same database but for the SQLite appends, whose bare inserts go to
a second file so that neither side pays the other's WAL checkpoints or page splits:

- fenced single-event append through `AppendAuthority` (lease held) next to the raw driver's
  INSERT in autocommit (target 0.85x), the eventsourcing recorder (`insert_events` of one stored
  event: 1.1x on SQLite, 2.5x on PostgreSQL) and `Application.save` of one new event;
- `append_many` of 100 next to BEGIN + `executemany` + COMMIT (0.8x on SQLite, 1.0x on
  PostgreSQL), and COPY on PostgreSQL;
- `tx.append` and `tx.append_many` of 100 joining the host's SQLAlchemy transaction next to a raw
  INSERT (executemany) on the host's connection in its transaction (0.85x; `append_many`'s
  targets): `tx_rows`;
- reading 100,000 events as `Event` objects (`events()` and `iter_events()`) next to the raw driver
  + a `json.loads` loop (1.0x), and the eventsourcing recorder's `select_events` + `json.loads`;
- git append (fenced, and through `AppendAuthority`) next to a bare pygit2 ref transaction writing
  the same commit (0.8x), git reads (>= 10,000 events/s);
- 4 processes appending to one space through their own authorities (one holds the lease, three
  forward to it through the store's durable intents): the total next to one process alone (0.9x);
- iterating 1,000,000 events with `iter_events` in a fresh process: RSS growth < 50 MB (the row's
  baseline is the 50 MB budget, its ratio budget / growth, target 1.0x);
- the feed (work `feed`, feed_bench.py): reading it and a Subscription next to the raw driver,
  wait_feed's wake-up, 4 processes on 4 spaces on PostgreSQL.

The eventsourcing rows run when that library is importable (`pip install 'shard_sql[compare]'`),
else they are skipped with a note. `run(quick=False, ...)` returns the rows for `shard-sql bench`
(suite `perf`); `python -m benchmarks [--quick] [--json] [--only WORK] [--pg-url URL]` prints them
as one table. Reuses `sql_bench` (raw drivers, interleaving, scratch PostgreSQL databases) and
`git_bench` (the bare pygit2 baseline, reads).
"""

from __future__ import annotations

import argparse
import contextvars
import functools
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from shard_sql import AppendAuthority, LeaseRegistry, SqlEventStore

from . import git_bench
from .sql_bench import (
    PAYLOAD,
    TYPE,
    RawPostgres,
    RawSqlite,
    Step,
    _compare,
    _pg_server,
    _Spaces,
    _steps,
    scratch_pg,
)

TARGET_APPEND = 0.85
NORMAL_APPENDS_FACTOR = 10
TARGET_VS_RECORDER = {"sqlite FULL": 1.1, "sqlite NORMAL": 1.1, "postgresql": 2.5}
TARGET_MANY = {"sqlite FULL": 0.8, "sqlite NORMAL": 0.8, "postgresql": 1.0}
TARGET_READ = 1.0
TARGET_GIT_APPEND = 0.8
TARGET_GIT_READS = 10_000.0
TARGET_PROCESSES = 0.9
MEMORY_BUDGET_MB = 50.0
WORKS = (
    "append",
    "many",
    "read",
    "transaction",
    "git",
    "processes",
    "memory",
    "eventsourcing",
    "feed",
)
BACKENDS = ("sqlite-full", "sqlite-normal", "postgresql", "git")
CTX = multiprocessing.get_context("spawn")


@dataclass
class Row:
    work: str
    backend: str
    vs: str
    figure: float | None
    baseline: float | None
    ratio: float | None
    target: float | None
    unit: str = "events/s"
    ok: bool | None = None
    note: str = ""
    target_text: str = ""
    install: str = ""  # what installs the missing library a skipped row needs


_REPORT: contextvars.ContextVar[Callable[[dict[str, Any]], None] | None] = contextvars.ContextVar(
    "report", default=None
)
"""`run(progress=...)`: called with each row as soon as it is measured."""


def _reported(row: Row) -> Row:
    report = _REPORT.get()
    if report is not None:
        report(asdict(row))
    return row


@dataclass
class Counts:
    appends: int
    batches: int
    reads: int
    rounds: int
    git_appends: int
    git_reads: int
    proc_appends: int
    memory_events: int

    @classmethod
    def of(cls, quick: bool, rounds: int | None) -> Counts:
        if quick:
            return cls(50, 2, 2_000, rounds or 1, 30, 500, 20, 5_000)
        return cls(600, 20, 100_000, rounds or 5, 400, 10_000, 1_000, 1_000_000)


def _row(
    work: str,
    backend: str,
    vs: str,
    figure: float,
    baseline: float | None,
    target: float | None,
    unit: str = "events/s",
    note: str = "",
    ratio: float | None = None,
    target_text: str = "",
) -> Row:
    if ratio is None and baseline:
        ratio = figure / baseline
    ok = None
    if target is not None:
        ok = (ratio if baseline is not None and ratio is not None else figure) >= target
    if not target_text and target is not None:
        target_text = f">= {target:g}x" if baseline is not None else f">= {target:,.0f}"
    return _reported(
        Row(
            work,
            backend,
            vs,
            round(figure, 1),
            None if baseline is None else round(baseline, 1),
            None if ratio is None else round(ratio, 3),
            target,
            unit,
            ok,
            note,
            target_text,
        )
    )


def _skip(work: str, backend: str, vs: str, note: str) -> Row:
    install = INSTALL_COMPARE if note == ES_NOTE else ""
    return _reported(Row(work, backend, vs, None, None, None, None, "", None, note, "", install))


# -- eventsourcing, when installed -----------------------------------------------------------------


def _eventsourcing() -> Any | None:
    try:
        import eventsourcing  # noqa: F401
    except ImportError:
        return None
    return True


ES_NOTE = "eventsourcing not installed: skipped"
INSTALL_COMPARE = "pip install 'shard_sql[compare]'"
"""The one install hint for the eventsourcing rows (shown once under the table)."""


@functools.cache
def _page_class() -> Any:
    """An eventsourcing aggregate (defined once: the library registers its topic)."""
    from eventsourcing.domain import Aggregate, event

    class Page(Aggregate):
        def __init__(self, page: str) -> None:
            self.page = page

        @event("Edited")
        def edit(self, title: str, tags: list[str], rev: int) -> None:
            self.title, self.tags, self.rev = title, tags, rev

    return Page


def es_env(backend: str, where: str) -> dict[str, str]:
    """eventsourcing's own persistence module on a SQLite file or a PostgreSQL database URL."""
    if backend != "postgresql":
        return {"PERSISTENCE_MODULE": "eventsourcing.sqlite", "SQLITE_DBNAME": where}
    from sqlalchemy import make_url

    u = make_url(where)
    return {
        "PERSISTENCE_MODULE": "eventsourcing.postgres",
        "POSTGRES_DBNAME": str(u.database),
        "POSTGRES_HOST": u.host or "127.0.0.1",
        "POSTGRES_PORT": str(u.port or 5432),
        "POSTGRES_USER": u.username or "postgres",
        "POSTGRES_PASSWORD": u.password or "",
    }


class EsSide:
    """The eventsourcing library on the same database: its application recorder (one stored
    event per `insert_events`) and an `Application` saving one new aggregate event at a time."""

    def __init__(self, backend: str, where: str, db_functions: bool = False) -> None:
        from eventsourcing.application import Application

        self.backend = backend
        self.env = es_env(backend, where)
        if backend == "postgresql":
            from eventsourcing.postgres import PostgresApplicationRecorder, PostgresDatastore
            from sqlalchemy import make_url

            u = make_url(where)
            self.datastore: Any = PostgresDatastore(
                str(u.database),
                u.host or "127.0.0.1",
                u.port or 5432,
                u.username or "postgres",
                u.password or "",
                enable_db_functions=db_functions,
            )
            self.recorder: Any = PostgresApplicationRecorder(self.datastore)
        else:
            from eventsourcing.sqlite import SQLiteApplicationRecorder, SQLiteDatastore

            self.datastore = SQLiteDatastore(where)
            self.recorder = SQLiteApplicationRecorder(self.datastore)
        self.recorder.create_table()

        self.Page = _page_class()
        self.app: Any = None
        self._app_cls = Application

    def stored(self, originator: uuid.UUID, version: int) -> Any:
        from eventsourcing.persistence import StoredEvent

        return StoredEvent(originator, version, TYPE, json.dumps(PAYLOAD).encode())

    def recorder_step(self) -> Step:
        originator = uuid.uuid4()
        insert, stored = self.recorder.insert_events, self.stored
        return lambda n: insert([stored(originator, n)]) and None

    def save_step(self) -> Step:
        if self.app is None:
            self.app = self._app_cls(env=self.env)
        app = self.app
        page = self.Page("Home")
        app.save(page)

        def step(n: int) -> None:
            page.edit("A wiki page", ["a", "b"], n)
            app.save(page)

        return step

    def fill(self, count: int) -> uuid.UUID:
        originator = uuid.uuid4()
        for start in range(0, count, 1000):
            self.recorder.insert_events(
                [self.stored(originator, v) for v in range(start, min(count, start + 1000))]
            )
        return originator

    def read(self, originator: uuid.UUID) -> list[Any]:
        loads = json.loads
        return [(s, loads(s.state)) for s in self.recorder.select_events(originator)]

    def close(self) -> None:
        if self.app is not None:
            self.app.close()
        self.datastore.close()


# -- SQL rows --------------------------------------------------------------------------------------


def _copy_many(raw: RawPostgres, space: str, seq: int, n: int) -> None:
    """COPY of n rows in one transaction: PostgreSQL's fastest bulk insert."""
    from datetime import UTC, datetime

    at = datetime.now(UTC)
    text = json.dumps(PAYLOAD)
    cols = "space, seq, type, payload, recorded_at, writer, generation, intent_id"
    with raw.conn.transaction(), raw.cur.copy(f"COPY events ({cols}) FROM STDIN") as copy:
        for k in range(n):
            copy.write_row((space, seq + k, TYPE, text, at, "bench-node", 1, None))


def sql_rows(
    label: str, url: str, raw: Any, counts: Counts, works: tuple[str, ...], es_where: str | None
) -> list[Row]:
    rows: list[Row] = []
    rounds, appends = counts.rounds, counts.appends
    if label == "sqlite NORMAL":
        # Without a sync per commit, the WAL checkpoints (3-4 ms, one per ~475 appends) weigh as
        # much as the appends: 600 a round gave 1-2 a side, and the ratio swung with them.
        appends *= NORMAL_APPENDS_FACTOR
    new_space = _Spaces()
    es: EsSide | None = None
    es_note = ES_NOTE
    if es_where is not None and _eventsourcing():
        try:
            es = EsSide("postgresql" if label == "postgresql" else "sqlite", es_where)
        except ImportError as e:  # its PostgreSQL module needs psycopg-pool
            es_note = f"eventsourcing cannot run here ({e}): skipped"
    elif es_where is None:
        es_note = "eventsourcing sets no synchronous=NORMAL: no like-for-like baseline"
    with SqlEventStore(url, migrate=True) as store:
        registry = LeaseRegistry(store)
        node = AppendAuthority("bench-node", store, registry, ttl_seconds=3600)

        def via_authority() -> Step:
            space = new_space("auth")
            node.acquire(space)
            return lambda _seq: node.append(space, TYPE, PAYLOAD) and None

        if "append" in works:
            # SQLite: the bare inserts go to a file of their own, with the same settings, as the
            # eventsourcing rows do. On the store's file they shared its WAL checkpoints, given to
            # whichever connection's commit crossed the 1,000-frame mark (2 frames a commit, chunks
            # of 25: every checkpoint of a round fell to the same side, measured 27 to 0), and its
            # (space, seq) index, where the space that sorts later ("raw-" after "auth-") splits
            # fewer pages (measured 103 against 283 five-frame commits in 4,600).
            bare_raw = raw
            if isinstance(raw, RawSqlite):
                file = Path(raw.conn.execute("PRAGMA database_list").fetchone()[2])
                bare_file = file.with_name(f"{file.stem}-raw.db")
                SqlEventStore(f"sqlite:///{bare_file}").close()  # the same schema
                bare_raw = RawSqlite(bare_file, label.split()[1])

            def bare() -> Step:
                space = new_space("raw")
                return lambda seq: bare_raw.insert_one(space, seq)

            work = "fenced append via AppendAuthority"
            fig, base = _steps(rounds, appends, via_authority, bare, 25)
            rows.append(_row(work, label, "raw driver insert", fig, base, TARGET_APPEND))
            if es is None:
                rows.append(_skip(work, label, "eventsourcing recorder", es_note))
            else:
                fig, base = _steps(rounds, appends, via_authority, es.recorder_step, 25)
                target = TARGET_VS_RECORDER[label]
                rows.append(_row(work, label, "eventsourcing recorder", fig, base, target))
                fig, base = _steps(rounds, appends, via_authority, es.save_step, 25)
                rows.append(_row(work, label, "eventsourcing Application.save", fig, base, None))
                if label == "postgresql":
                    assert es_where is not None
                    esf = EsSide("postgresql", es_where, db_functions=True)
                    try:
                        fig, base = _steps(rounds, appends, via_authority, esf.recorder_step, 25)
                    finally:
                        esf.close()
                    rows.append(
                        _row(work, label, "eventsourcing recorder, DB functions", fig, base, None)
                    )
            if bare_raw is not raw:
                bare_raw.close()

        if "many" in works:
            items = [(TYPE, PAYLOAD)] * 100

            def batches() -> Step:
                space = new_space("many")
                lease = registry.acquire(space, "bench-node", 3600)
                return lambda b: (
                    store.append_many(space, items, expected_seq=b * 100, fence=lease) and None
                )

            def bare_batches() -> Step:
                space = new_space("rawmany")
                return lambda b: raw.insert_many(space, b * 100, 100)

            work = "append_many of 100"
            fig, base = _steps(rounds, counts.batches, batches, bare_batches, 1)
            rows.append(
                _row(work, label, "raw executemany", fig * 100, base * 100, TARGET_MANY[label])
            )
            if label == "postgresql":

                def copy_batches() -> Step:
                    space = new_space("copymany")
                    return lambda b: _copy_many(raw, space, b * 100, 100)

                fig, base = _steps(rounds, counts.batches, batches, copy_batches, 1)
                rows.append(_row(work, label, "raw COPY", fig * 100, base * 100, None))

        if "transaction" in works:
            from .tx_rows import tx_rows

            rows += tx_rows(label, url, rounds, appends, counts.batches)

        if "read" in works:
            space = new_space("read-back")
            lease = registry.acquire(space, "bench-node", 3600)
            batch = [(TYPE, PAYLOAD)] * min(10_000, counts.reads)
            while (head := store.head(space)) < counts.reads:
                store.append_many(
                    space, batch[: counts.reads - head], expected_seq=head, fence=lease
                )

            def read_list() -> None:
                assert len(store.events(space)) == counts.reads

            def read_iter() -> None:
                assert sum(1 for _ in store.iter_events(space)) == counts.reads

            def bare_read() -> None:
                assert len(raw.read(space)) == counts.reads

            work = f"read {counts.reads:,} events as Event objects"
            for how, reader in (("events()", read_list), ("iter_events()", read_iter)):
                fig, base = _compare(rounds, counts.reads, reader, bare_read)
                rows.append(
                    _row(f"{work}, {how}", label, "raw driver + json.loads", fig, base, TARGET_READ)
                )
            if es is None:
                rows.append(_skip(f"{work}, events()", label, "eventsourcing recorder", es_note))
            else:
                originator = es.fill(counts.reads)

                def es_read() -> None:
                    assert len(es.read(originator)) == counts.reads

                fig, base = _compare(rounds, counts.reads, read_list, es_read)
                rows.append(
                    _row(
                        f"{work}, events()",
                        label,
                        "eventsourcing select_events + json.loads",
                        fig,
                        base,
                        None,
                    )
                )
    if es is not None:
        es.close()
    return rows


# -- 4 processes, one space ------------------------------------------------------------------------


def _proc_worker(url: str, name: str, space: str, count: int, go: Any, out: Any, flag: str) -> None:
    """One process: its own store and authority (serving what is forwarded to it), `count`
    appends to `space`; reports (start, end) on the monotonic clock shared by the machine, then
    the CPU seconds it used (all its threads) from the start until every worker was done."""
    store = SqlEventStore(url) if not url.startswith("git:") else _git_store(url)
    node = AppendAuthority(name, store, LeaseRegistry(store), ttl_seconds=60, forward_timeout=120)
    with node:
        node.append(f"warm-{name}", TYPE, PAYLOAD)
        out.put(("ready", name, 0.0, 0.0))
        go.wait(120)
        c0 = os.times()
        t0 = time.monotonic()
        for _ in range(count):
            node.append(space, TYPE, PAYLOAD)
        t1 = time.monotonic()
        out.put(("done", name, t0, t1))
        # Keep serving until every worker is done: the holder must outlive the forwarders.
        while not os.path.exists(flag):
            time.sleep(0.01)
        c1 = os.times()
        out.put(("cpu", name, c1.user - c0.user + c1.system - c0.system, 0.0))
    store.close()


def _git_store(url: str) -> Any:
    from shard_sql import GitEventStore

    return GitEventStore(url.removeprefix("git:"))


def _machine_busy() -> float:
    """CPU seconds the whole machine has been busy (every core, every process: the database
    server and the kernel too), from /proc/stat; 0.0 where there is none."""
    try:
        first = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return 0.0
    # user nice system idle iowait irq softirq steal: all but idle and iowait are busy
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in first[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


@dataclass
class _Spent:
    rate: float
    """Total events/s."""
    machine_us: float
    """Machine-wide CPU microseconds per event."""
    workers_us: float
    """CPU microseconds per event of the worker processes."""


def _processes(url: str, space: str, workers: int, count: int) -> _Spent:
    """Total events/s of `workers` processes appending `count` each to `space`, and the CPU it
    took per event."""
    flag = os.path.join(tempfile.gettempdir(), f"shard-perf-{uuid.uuid4().hex}.done")
    go, out = CTX.Event(), CTX.Queue()
    procs = [
        CTX.Process(target=_proc_worker, args=(url, f"p{i}", space, count, go, out, flag))
        for i in range(workers)
    ]
    for p in procs:
        p.start()
    try:
        for _ in range(workers):
            kind = out.get(timeout=120)[0]
            assert kind == "ready"
        busy = _machine_busy()
        go.set()
        spans = [out.get(timeout=600) for _ in range(workers)]
        busy = _machine_busy() - busy
        Path(flag).touch()
        cpu = sum(out.get(timeout=60)[2] for _ in range(workers))
        for p in procs:
            p.join(60)
    finally:
        Path(flag).touch()
        for p in procs:
            if p.is_alive():
                p.kill()
        Path(flag).unlink(missing_ok=True)
    start = min(s[2] for s in spans)
    end = max(s[3] for s in spans)
    events = workers * count
    return _Spent(events / (end - start), busy / events * 1e6, cpu / events * 1e6)


def process_rows(label: str, url: str, counts: Counts, rounds: int) -> list[Row]:
    n = counts.proc_appends
    alone, four = [], []
    for r in range(rounds):
        alone.append(_processes(url, f"alone-{r}", 1, 4 * n))
        four.append(_processes(url, f"four-{r}", 4, n))

    def median(spent: list[_Spent], field: str) -> float:
        return float(statistics.median(getattr(s, field) for s in spent))

    fig, base = median(four, "rate"), median(alone, "rate")
    rows = [
        _row(
            "4 processes appending to one space (total)",
            label,
            "1 process alone",
            fig,
            base,
            TARGET_PROCESSES,
            note=f"{n} appends each, 3 forwarding to the holder; medians of {rounds}",
        )
    ]
    machine, workers = median(four, "machine_us"), median(four, "workers_us")
    if machine:
        # Where the time goes: a forwarded event costs more CPU than a direct one, and the
        # machine's cores bound the rate at cores / (CPU per event).
        cores = os.cpu_count() or 1
        rows.append(
            _row(
                "  CPU per event, machine-wide (4 processes)",
                label,
                "1 process alone",
                machine,
                median(alone, "machine_us"),
                None,
                unit="us",
                note=(
                    f"of it the worker processes {workers:,.0f} us (alone "
                    f"{median(alone, 'workers_us'):,.0f} us), the rest the database server and "
                    f"the kernel; {cores} cores bound 4 processes to "
                    f"{cores / machine * 1e6:,.0f} events/s at full use"
                ),
            )
        )
    return rows


# -- memory of a long iteration --------------------------------------------------------------------

_MEMORY_SCRIPT = r"""
import gc, json, sys
from shard_sql import SqlEventStore

def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)

store = SqlEventStore(sys.argv[1])
space = sys.argv[2]
head = store.head(space)
for _ in store.iter_events(space, from_seq=max(head - 10, 0)):  # connections, statements
    pass
gc.collect()
before = status("VmRSS")
try:  # reset the peak (VmHWM) to the current RSS
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    peak_key = "VmHWM"
except OSError:
    peak_key = "VmRSS"
peak = before
n = 0
for e in store.iter_events(space):
    n += 1
    if n % 20000 == 0:
        peak = max(peak, status("VmRSS"))
peak = max(peak, status(peak_key), status("VmRSS"))
print(json.dumps({"n": n, "before": before, "peak": peak, "peak_key": peak_key}))
"""


def memory_rows(label: str, url: str, count: int) -> list[Row]:
    space = "memory"
    with SqlEventStore(url, migrate=True) as store:
        batch = [(TYPE, PAYLOAD)] * min(10_000, count)
        while (head := store.head(space)) < count:
            store.append_many(space, batch[: count - head], expected_seq=head)
    out = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT, url, space],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["n"] == count
    growth = max(result["peak"] - result["before"], 0) / 1e6
    return [
        _row(
            f"iterate {count:,} events with iter_events: RSS growth",
            label,
            "50 MB budget",
            growth,
            MEMORY_BUDGET_MB,
            1.0,
            unit="MB",
            note="ratio = budget / growth; fresh process, peak RSS (VmHWM reset) - RSS before",
            ratio=MEMORY_BUDGET_MB / max(growth, 0.01),
            target_text="< 50 MB",
        )
    ]


# -- git -------------------------------------------------------------------------------------------


def git_rows(counts: Counts, works: tuple[str, ...], proc_rounds: int) -> list[Row]:
    rows: list[Row] = []
    label = "git"
    with tempfile.TemporaryDirectory(prefix="shard-perf-git-") as tmp:
        root = Path(tmp)
        if "append" in works or "git" in works:
            w = git_bench._appends(root / "append.git", counts.git_appends, counts.rounds)
            vs = "bare pygit2 ref transaction, same commit"
            rows.append(
                _row(
                    "git append, fenced (store.append)",
                    label,
                    vs,
                    w["fenced"],
                    w["baseline"],
                    TARGET_GIT_APPEND,
                )
            )
            rows.append(
                _row(
                    "git append via AppendAuthority",
                    label,
                    vs,
                    w["authority"],
                    w["baseline"],
                    TARGET_GIT_APPEND,
                )
            )
        if "read" in works or "git" in works:
            r = git_bench._reads(root / "read.git", counts.git_reads, counts.rounds)
            for how in ("events", "iter"):
                name = "events()" if how == "events" else "iter_events()"
                rows.append(
                    _row(
                        f"git read {counts.git_reads:,} events, {name}",
                        label,
                        "(absolute)",
                        r[how],
                        None,
                        TARGET_GIT_READS,
                        note=f"bare pygit2 walk + json.loads: {r['raw']:,.0f}/s",
                    )
                )
        if "processes" in works:
            rows += process_rows(label, f"git:{root / 'procs.git'}", counts, proc_rounds)
    return rows


# -- the whole suite -------------------------------------------------------------------------------


def run(
    *,
    quick: bool = False,
    url: str | None = None,
    pg_url: str | None = None,
    rounds: int | None = None,
    works: tuple[str, ...] = WORKS,
    backends: tuple[str, ...] = BACKENDS,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Run the suite; return one mapping per row (see the module docstring). `progress` is
    called with each row as soon as it is measured."""
    token = _REPORT.set(progress)
    try:
        return _run(quick, url, pg_url, rounds, works, backends)
    finally:
        _REPORT.reset(token)


def _run(
    quick: bool,
    url: str | None,
    pg_url: str | None,
    rounds: int | None,
    works: tuple[str, ...],
    backends: tuple[str, ...],
) -> list[dict[str, Any]]:
    counts = Counts.of(quick, rounds)
    proc_rounds = 1 if quick else min(counts.rounds, 3)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="shard-perf-") as tmp:
        for sync in ("FULL", "NORMAL"):
            if f"sqlite-{sync.lower()}" not in backends:
                continue
            label = f"sqlite {sync}"
            path = Path(tmp) / f"perf-{sync.lower()}.db"
            SqlEventStore(f"sqlite:///{path}").close()  # create and migrate
            store_url = f"sqlite:///{path}?synchronous={sync}"
            raw = RawSqlite(path, sync)
            try:
                # eventsourcing's SQLite runs WAL with the default synchronous (FULL).
                es_where = str(Path(tmp) / "es-full.db") if sync == "FULL" else None
                rows += sql_rows(label, store_url, raw, counts, works, es_where)
            finally:
                raw.close()
            if "processes" in works:
                purl = f"sqlite:///{Path(tmp) / f'procs-{sync.lower()}.db'}?synchronous={sync}"
                SqlEventStore(purl).close()
                rows += process_rows(label, purl, counts, proc_rounds)
            if "eventsourcing" in works and sync == "FULL":
                from . import es_bench

                # Both sides WAL with synchronous FULL (eventsourcing's default), own files.
                own = es_env("sqlite", str(Path(tmp) / "es-own.db"))
                rows += es_bench.es_rows(
                    label, f"sqlite:///{Path(tmp) / 'es-module.db'}", own, counts
                )
            if "memory" in works and sync == "FULL":
                murl = f"sqlite:///{Path(tmp) / 'memory.db'}"
                rows += memory_rows(label, murl, counts.memory_events)
            if "feed" in works:
                from . import feed_bench

                fpath = Path(tmp) / f"feed-{sync.lower()}.db"
                SqlEventStore(f"sqlite:///{fpath}").close()
                fraw = RawSqlite(fpath, sync)
                try:
                    furl = f"sqlite:///{fpath}?synchronous={sync}"
                    rows += feed_bench.feed_rows(label, furl, fraw, counts)
                finally:
                    fraw.close()
    if "postgresql" in backends:
        rows += _pg_rows(_pg_server(url, pg_url), counts, works, proc_rounds)
    if "git" in backends and ({"append", "read", "git", "processes"} & set(works)):
        rows += git_rows(counts, works, proc_rounds)
    return [asdict(r) for r in rows]


def _pg_rows(server: str, counts: Counts, works: tuple[str, ...], proc_rounds: int) -> list[Row]:
    label = "postgresql"
    try:
        scratch = scratch_pg(server)
        db = scratch.__enter__()
    except Exception as e:
        return [_skip("all PostgreSQL rows", label, "", f"skipped, no server: {e}")]
    rows: list[Row] = []
    try:
        SqlEventStore(db, migrate=True).close()
        raw = RawPostgres(db)
        try:
            rows += sql_rows(label, db, raw, counts, works, db)
        finally:
            raw.close()
        if "processes" in works:
            rows += process_rows(label, db, counts, proc_rounds)
        if "memory" in works:
            rows += memory_rows(label, db, counts.memory_events)
        if "eventsourcing" in works:
            from . import es_bench

            # A database of their own: the module's notification log would read past the
            # events the rows above wrote.
            with scratch_pg(server) as es_db:
                rows += es_bench.es_rows(label, es_db, es_env("postgresql", es_db), counts)
        if "feed" in works:
            from . import feed_bench

            with scratch_pg(server) as feed_db:  # a feed of its own events only
                SqlEventStore(feed_db, migrate=True).close()
                feed_raw = RawPostgres(feed_db)
                try:
                    rows += feed_bench.feed_rows(label, feed_db, feed_raw, counts)
                finally:
                    feed_raw.close()
    finally:
        scratch.__exit__(None, None, None)
    return rows


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "MB":
        return f"{value:,.1f} MB"
    if unit == "us":
        return f"{value:,.0f} us"
    if unit == "ms":
        return f"{value:,.2f} ms"
    return f"{value:,.0f}"


def format_table(rows: list[dict[str, Any]]) -> str:
    head = ("work", "backend", "shard_sql", "baseline", "vs", "ratio", "target", "mark")
    lines = []
    for r in rows:
        mark = {True: "pass", False: "SHORT", None: "-"}[r["ok"]]
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        lines.append(
            (
                r["work"],
                r["backend"],
                _fmt(r["figure"], r["unit"]),
                _fmt(r["baseline"], r["unit"]),
                r["vs"],
                ratio,
                r["target_text"] or "-",
                mark if r["figure"] is not None else r["note"],
            )
        )
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines, strict=True)]
    right = {2, 3, 5, 6}

    def fmt(cells: tuple[str, ...]) -> str:
        return "  ".join(
            (str(c).rjust(w) if i in right else str(c).ljust(w))
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    out = [fmt(head), fmt(tuple("-" * w for w in widths))]
    out += [fmt(line) for line in lines]
    notes = [f"  {r['work']} ({r['backend']}): {r['note']}" for r in rows if r["note"]]
    if notes:
        out += ["", "notes:", *notes]
    for hint in dict.fromkeys(r.get("install") for r in rows if r.get("install")):
        out += ["", f"the skipped rows run after: {hint}"]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=(__doc__ or "").splitlines()[0]
    )
    parser.add_argument("--quick", action="store_true", help="tiny counts (figures meaningless)")
    parser.add_argument("--json", metavar="FILE", nargs="?", const="-", help="JSON lines (to FILE)")
    parser.add_argument("--pg-url", help="PostgreSQL server to create a scratch database on")
    parser.add_argument("--rounds", type=int, help="rounds per figure (default 5)")
    parser.add_argument("--only", action="append", choices=WORKS, help="repeatable")
    parser.add_argument("--backend", action="append", choices=BACKENDS, help="repeatable")
    args = parser.parse_args(argv)
    rows = run(
        quick=args.quick,
        pg_url=args.pg_url,
        rounds=args.rounds,
        works=tuple(args.only or WORKS),
        backends=tuple(args.backend or BACKENDS),
    )
    if args.json:
        text = "".join(json.dumps(r) + "\n" for r in rows)
        if args.json == "-":
            sys.stdout.write(text)
            return 0
        Path(args.json).write_text(text)
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
