"""SQL adapter benchmark: `SqlEventStore` next to the bare driver, in the same run.

Every figure is measured on the same database, with the same durability settings, as its
baseline, in interleaved rounds (baseline, figure, baseline, figure, ...); each is the median of
the rounds. Backends: a SQLite file in WAL mode with `synchronous=FULL` (the default) and with
`synchronous=NORMAL`, and a scratch database on a PostgreSQL server.

- fenced append via AppendAuthority: `node.append(space, type, payload)` with the lease held,
  next to a bare INSERT of the same row through the same driver, one per transaction;
- fenced append, `store.append(..., expected_seq, fence=lease)`: the same baseline;
- `append_many` of 100 with a fence: next to BEGIN, `executemany` of 100 rows, COMMIT;
- reading 100,000 events into `Event`s with `store.events(space)` and
  `list(store.iter_events(space))`: next to a bare SELECT and `json.loads` of each payload into a
  tuple.

Informative rows (no target) measure the alternatives the adapter's design was chosen over: the
fenced append as a multi-statement transaction (one statement per check), SQLAlchemy Core and
the ORM one insert per transaction, and `store.append` without fence or with an intent id.

`run(quick=False, ...)` returns rows (work, figure, baseline, ratio, target, unit, ok) for
`shard-sql bench`; `python -m benchmarks.sql_bench [--quick] [--json] [--pg-url URL]` prints
them. The PostgreSQL server comes from `pg_url`, else `url` when it is a PostgreSQL URL, else
SHARD_SQL_BENCH_PG_URL / SHARD_SQL_TEST_PG_URL, else postgres@127.0.0.1:5432; a scratch
database is created on it and dropped afterwards. Without a server the PostgreSQL rows are
skipped with a note.

The bare drivers (the baselines) are in `raw_drivers`; the interleaving (`_compare`, `_steps`) and
the scratch PostgreSQL databases here serve the perf suite's rows too.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, insert, make_url
from sqlalchemy.orm import Session

from shard_sql import AppendAuthority, LeaseRegistry, SqlEventStore
from shard_sql.orm import EventRecord, events_table
from shard_sql.validation import pending

from .raw_drivers import PAYLOAD, TYPE, WRITER, RawPostgres, RawSqlite, libpq_url

TARGET_APPEND = 0.70
TARGET_READ = 0.50
DEFAULT_PG = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


@dataclass
class Row:
    work: str
    figure: float | None
    baseline: float | None
    ratio: float | None
    target: float | None
    unit: str = "events/s"
    ok: bool | None = None
    note: str = ""


@dataclass
class Counts:
    appends: int
    batches: int
    reads: int
    rounds: int

    @classmethod
    def of(cls, quick: bool, rounds: int | None) -> Counts:
        if quick:
            return cls(appends=100, batches=3, reads=5_000, rounds=rounds or 3)
        return cls(appends=600, batches=20, reads=100_000, rounds=rounds or 5)


def _rate(count: int, work: Callable[[], object]) -> float:
    start = time.perf_counter()
    work()
    elapsed = time.perf_counter() - start
    return count / elapsed if elapsed > 0 else float("inf")


def _compare(
    rounds: int, count: int, figure: Callable[[], object], baseline: Callable[[], object]
) -> tuple[float, float]:
    """Medians over interleaved rounds, so drift on a shared machine hits both alike; one
    untimed round of each first (caches, prepared statements, the first page of a table)."""
    baseline()
    figure()
    figures, baselines = [], []
    for _ in range(rounds):
        baselines.append(_rate(count, baseline))
        figures.append(_rate(count, figure))
    return statistics.median(figures), statistics.median(baselines)


def _row(work: str, figure: float, baseline: float, target: float | None, note: str = "") -> Row:
    ratio = figure / baseline if baseline else None
    ok = None if target is None or ratio is None else ratio >= target
    return Row(work, round(figure, 1), round(baseline, 1), ratio, target, "events/s", ok, note)


# -- one backend ---------------------------------------------------------------------------------


class _Spaces:
    """Fresh space names, so every round writes at the head of an empty log."""

    def __init__(self) -> None:
        self.n = 0

    def __call__(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}-{self.n}"


Step = Callable[[int], None]
"""Does the operation for seq n (an append) or batch n."""


def _steps(
    rounds: int, count: int, figure: Callable[[], Step], baseline: Callable[[], Step], chunk: int
) -> tuple[float, float]:
    """Writes: figure and baseline alternate every `chunk` operations inside each round, so a
    slow spell of the disk (other processes' fsyncs) hits both alike. Each round starts fresh
    (`figure()` / `baseline()` set up a new space); one untimed round of a chunk first.
    Returns the median operations per second of each."""
    baseline()(0)
    figure()(0)
    figures, baselines = [], []
    for _ in range(rounds):
        f, b = figure(), baseline()
        tf = tb = 0.0
        for start in range(0, count, chunk):
            stop = min(start + chunk, count)
            t0 = time.perf_counter()
            for n in range(start, stop):
                b(n)
            t1 = time.perf_counter()
            for n in range(start, stop):
                f(n)
            t2 = time.perf_counter()
            tb += t1 - t0
            tf += t2 - t1
        figures.append(count / tf)
        baselines.append(count / tb)
    return statistics.median(figures), statistics.median(baselines)


def bench_backend(label: str, url: str, raw: Any, counts: Counts) -> list[Row]:
    rows: list[Row] = []
    rounds, appends, chunk = counts.rounds, counts.appends, 25
    new_space = _Spaces()
    with SqlEventStore(url, migrate=True) as store:
        registry = LeaseRegistry(store)
        node = AppendAuthority("bench-node", store, registry, ttl_seconds=3600)

        def leased(prefix: str) -> tuple[str, Any]:
            space = new_space(prefix)
            return space, registry.acquire(space, WRITER, 3600)

        def bare() -> Step:
            space = new_space("raw")
            return lambda seq: raw.insert_one(space, seq)

        def via_authority() -> Step:
            space = new_space("auth")
            node.acquire(space)
            return lambda _seq: node.append(space, TYPE, PAYLOAD) and None

        def direct(fence: bool = True, intent: bool = False) -> Callable[[], Step]:
            def setup() -> Step:
                space, lease = leased("direct")

                def step(seq: int) -> None:
                    store.append(
                        space,
                        TYPE,
                        PAYLOAD,
                        expected_seq=seq,
                        fence=lease if fence else None,
                        intent_id=f"i-{seq}" if intent else None,
                    )

                return step

            return setup

        def prevalidated() -> Step:
            space, lease = leased("write")
            item = [pending(TYPE, PAYLOAD)]
            return lambda seq: store.write(space, item, expected_seq=seq, fence=lease) and None

        def bare_driver(method: str) -> Callable[[], Step]:
            def setup() -> Step:
                space, lease = leased("alt")
                write = getattr(raw, method)
                return lambda seq: write(space, seq, WRITER, lease.generation)

            return setup

        def compare(
            work: str, figure: Callable[[], Step], target: float | None, note: str = ""
        ) -> None:
            fig, base = _steps(rounds, appends, figure, bare, chunk)
            rows.append(_row(f"{label}: {work}", fig, base, target, note))

        # The targets: a fenced single-event append per transaction.
        compare("fenced append via AppendAuthority", via_authority, TARGET_APPEND)
        compare("fenced append, store.append", direct(), TARGET_APPEND)

        # append_many of 100.
        items = [(TYPE, PAYLOAD)] * 100
        checked = [pending(TYPE, PAYLOAD) for _ in range(100)]

        def batches() -> Step:
            space, lease = leased("many")
            return lambda b: (
                store.append_many(space, items, expected_seq=b * 100, fence=lease) and None
            )

        def batches_prevalidated() -> Step:
            space, lease = leased("writemany")
            return lambda b: store.write(space, checked, expected_seq=b * 100, fence=lease) and None

        def bare_batches() -> Step:
            space = new_space("rawmany")
            return lambda b: raw.insert_many(space, b * 100, 100)

        for work, figure, note in (
            ("append_many of 100", batches, "later target 0.8-1.0x"),
            ("(info) store.write of 100, input validated beforehand", batches_prevalidated, ""),
        ):
            fig, base = _steps(rounds, counts.batches, figure, bare_batches, 1)
            rows.append(_row(f"{label}: {work}", fig * 100, base * 100, None, note))

        # Reads of one long space (CPU-bound: whole rounds interleave).
        space, lease = leased("read-back")
        batch = [(TYPE, PAYLOAD)] * min(10_000, counts.reads)
        while (head := store.head(space)) < counts.reads:
            store.append_many(space, batch[: counts.reads - head], expected_seq=head, fence=lease)

        def read_list() -> None:
            assert len(store.events(space)) == counts.reads

        def read_iter() -> None:
            assert sum(1 for _ in store.iter_events(space)) == counts.reads

        def bare_read() -> None:
            assert len(raw.read(space)) == counts.reads

        for work, reader in (("events()", read_list), ("iter_events()", read_iter)):
            fig, base = _compare(rounds, counts.reads, reader, bare_read)
            rows.append(
                _row(f"{label}: read {counts.reads:,} events, {work}", fig, base, TARGET_READ)
            )

        # Informative: where the time goes, and the alternatives to the one-statement append.
        compare(
            "(info) store.write, input validated beforehand",
            prevalidated,
            None,
            "the adapter alone, without the shared input checks of store.append",
        )
        compare(
            "(alt) bare driver, one guarded statement", bare_driver("fenced_one_statement"), None
        )
        compare(
            "(alt) bare driver, a statement per check", bare_driver("fenced_multi_statement"), None
        )
        compare("(info) store.append, no fence", direct(fence=False), None)
        compare("(info) fenced store.append with intent_id", direct(intent=True), None)

        engine = _sa_engine(url)
        stmt = insert(events_table)

        def core() -> Step:
            space = new_space("core")

            def step(seq: int) -> None:
                with engine.begin() as conn:
                    conn.execute(
                        stmt,
                        {
                            "space": space,
                            "seq": seq,
                            "type": TYPE,
                            "payload": PAYLOAD,
                            "recorded_at": datetime.now(UTC),
                            "writer": WRITER,
                            "generation": 1,
                            "intent_id": None,
                        },
                    )

            return step

        def orm() -> Step:
            space = new_space("orm")

            def step(seq: int) -> None:
                with Session(engine) as session, session.begin():
                    session.add(
                        EventRecord(
                            space=space,
                            seq=seq,
                            type=TYPE,
                            payload=PAYLOAD,
                            recorded_at=datetime.now(UTC),
                            writer=WRITER,
                            generation=1,
                            intent_id=None,
                        )
                    )

            return step

        compare("(alt) SQLAlchemy Core insert per transaction", core, None)
        compare("(alt) SQLAlchemy ORM add per transaction", orm, None)
        engine.dispose()
    return rows


def _sa_engine(url: str) -> Engine:
    """A plain SQLAlchemy engine (default pool) with the store's durability settings."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(parsed.set(drivername="postgresql+psycopg"))
    sync = str(parsed.query.get("synchronous", "FULL"))
    engine = create_engine(parsed.difference_update_query(["synchronous"]))

    @event.listens_for(engine, "connect")
    def pragmas(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.execute("PRAGMA journal_mode = WAL").fetchall()
        dbapi_connection.execute(f"PRAGMA synchronous = {sync}")

    return engine


# -- the databases --------------------------------------------------------------------------------


def _pg_server(url: str | None, pg_url: str | None) -> str:
    if pg_url:
        return pg_url
    if url and url.startswith(("postgresql", "postgres")):
        return url
    return (
        os.environ.get("SHARD_SQL_BENCH_PG_URL")
        or os.environ.get("SHARD_SQL_TEST_PG_URL")
        or DEFAULT_PG
    )


@contextmanager
def scratch_pg(server: str) -> Iterator[str]:
    """A new database on the server `server` names, dropped afterwards."""
    import psycopg

    if server.startswith("postgresql://"):
        server = server.replace("postgresql://", "postgresql+psycopg://", 1)
    name = f"shard_bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(libpq_url(server), autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = server.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(libpq_url(server), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def run(
    *,
    quick: bool = False,
    url: str | None = None,
    pg_url: str | None = None,
    rounds: int | None = None,
    backends: tuple[str, ...] = ("sqlite-full", "sqlite-normal", "postgresql"),
) -> list[dict[str, Any]]:
    """Run the benchmark; return one mapping per row (see the module docstring)."""
    counts = Counts.of(quick, rounds)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="shard-sql-bench-") as tmp:
        for sync in ("FULL", "NORMAL"):
            if f"sqlite-{sync.lower()}" not in backends:
                continue
            path = Path(tmp) / f"bench-{sync.lower()}.db"
            SqlEventStore(f"sqlite:///{path}").close()  # create and migrate
            raw = RawSqlite(path, sync)
            try:
                rows += bench_backend(
                    f"sqlite {sync}", f"sqlite:///{path}?synchronous={sync}", raw, counts
                )
            finally:
                raw.close()
    if "postgresql" in backends:
        server = _pg_server(url, pg_url)
        try:
            scratch = scratch_pg(server)
            db = scratch.__enter__()
        except Exception as e:
            rows.append(
                Row("postgresql: skipped", None, None, None, None, "", None, f"no server: {e}")
            )
        else:
            try:
                raw = RawPostgres(db)
                try:
                    rows += bench_backend("postgresql", db, raw, counts)
                finally:
                    raw.close()
            finally:
                scratch.__exit__(None, None, None)
    return [asdict(r) for r in rows]


def _print(rows: list[dict[str, Any]]) -> None:
    print(f"{'work':62} {'shard_sql':>11} {'baseline':>11} {'ratio':>7} {'target':>7}  mark")
    for r in rows:
        if r["figure"] is None:
            print(f"{r['work']:62} {r['note']}")
            continue
        mark = {True: "pass", False: "short", None: ""}[r["ok"]]
        target = "" if r["target"] is None else f"{r['target']:.2f}x"
        print(
            f"{r['work']:62} {r['figure']:>11,.0f} {r['baseline']:>11,.0f} "
            f"{r['ratio']:>6.2f}x {target:>7}  {mark}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny counts, one round")
    parser.add_argument("--json", action="store_true", help="one JSON object per row")
    parser.add_argument("--pg-url", help="PostgreSQL server to create a scratch database on")
    parser.add_argument("--rounds", type=int, help="rounds per figure (default 5)")
    parser.add_argument(
        "--backend",
        action="append",
        choices=("sqlite-full", "sqlite-normal", "postgresql"),
        help="run only these backends (repeatable)",
    )
    args = parser.parse_args(argv)
    rows = run(
        quick=args.quick,
        pg_url=args.pg_url,
        rounds=args.rounds,
        backends=tuple(args.backend or ("sqlite-full", "sqlite-normal", "postgresql")),
    )
    if args.json:
        for r in rows:
            print(json.dumps(r))
    else:
        _print(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
