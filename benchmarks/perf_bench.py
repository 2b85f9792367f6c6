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
  forward to it: over its socket, else through the store's durable intents): the total next to
  one process alone (0.9x), the CPU per event, the forwarded append's p50 next to a direct one's
  (<= 2x) and the holder's group commits; then without load, one forwarder process appending one
  event at a time through an idle holder process, p50 (<= 2x a lone direct append's, the same
  process alternating with it) and p90;
- iterating 1,000,000 events with `iter_events` in a fresh process: RSS growth judged directly
  against a 50 MB budget (`<= 50 MB`, lower is better; no baseline, no ratio);
- the feed (work `feed`, feed_bench.py): reading it and a Subscription next to the raw driver,
  wait_feed's wake-up, 4 processes on 4 spaces on PostgreSQL.

The eventsourcing rows run when that library is importable (`pip install 'shard_sql[compare]'`),
else they are skipped with a note. `run(quick=False, ...)` returns the rows for `shard-sql bench`
(suite `perf`); `python -m benchmarks [--quick] [--json] [--only WORK] [--pg-url URL]` prints them
as one table. Reuses `raw_drivers` (the bare sqlite3 and psycopg baselines), `sql_bench`
(interleaving, scratch PostgreSQL databases) and `git_bench` (the bare pygit2 baseline, reads).

The rows come from: `rows` (Row, Counts, targets), `sql_rows` (appends, batches, reads),
`tx_rows` (transactions), `process_rows` (4 processes; forwarding without load; memory),
`es_side` (eventsourcing as a baseline), `es_rows` (eventsourcing on shard_sql), `feed_bench`
(the feed).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from shard_sql import SqlEventStore

from . import git_bench
from .es_side import es_env
from .process_rows import memory_rows, process_rows
from .raw_drivers import RawPostgres, RawSqlite
from .rows import (
    REPORT,
    TARGET_GIT_APPEND,
    TARGET_GIT_READS,
    Counts,
    Row,
    measured,
    skipped,
)
from .sql_bench import _pg_server, scratch_pg
from .sql_rows import sql_rows

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
                measured(
                    "git append, fenced (store.append)",
                    label,
                    vs,
                    w["fenced"],
                    w["baseline"],
                    TARGET_GIT_APPEND,
                )
            )
            rows.append(
                measured(
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
                    measured(
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
    token = REPORT.set(progress)
    try:
        return _run(quick, url, pg_url, rounds, works, backends)
    finally:
        REPORT.reset(token)


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
                from . import es_rows

                # Both sides WAL with synchronous FULL (eventsourcing's default), own files.
                own = es_env("sqlite", str(Path(tmp) / "es-own.db"))
                rows += es_rows.es_rows(
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
        return [skipped("all PostgreSQL rows", label, "", f"skipped, no server: {e}")]
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
            from . import es_rows

            # A database of their own: the module's notification log would read past the
            # events the rows above wrote.
            with scratch_pg(server) as es_db:
                rows += es_rows.es_rows(label, es_db, es_env("postgresql", es_db), counts)
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
