"""The SQL rows of the performance suite: fenced appends, `append_many`, transactions and reads,
each next to the raw driver (and eventsourcing's recorder, when installed) on the same database."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shard_sql import AppendAuthority, LeaseRegistry, SqlEventStore

from .es_side import EsSide, eventsourcing_installed
from .raw_drivers import PAYLOAD, TYPE, RawPostgres, RawSqlite
from .rows import (
    ES_NOTE,
    NORMAL_APPENDS_FACTOR,
    TARGET_APPEND,
    TARGET_MANY,
    TARGET_READ,
    TARGET_VS_RECORDER,
    Counts,
    Row,
    measured,
    skipped,
)
from .sql_bench import Step, _compare, _Spaces, _steps


def _copy_many(raw: RawPostgres, space: str, seq: int, n: int) -> None:
    """COPY of n rows in one transaction: PostgreSQL's fastest bulk insert."""
    from datetime import UTC, datetime

    at = datetime.now(UTC)
    text = json.dumps(PAYLOAD)
    cols = "space, seq, type, payload, recorded_at, writer, generation, intent_id"
    with raw.conn.transaction(), raw.cur.copy(f"COPY events ({cols}) FROM STDIN") as copy:
        for k in range(n):
            copy.write_row((space, seq + k, TYPE, text, at, "bench-node", 1, None))


@dataclass
class _Run:
    """One backend's SQL rows: the store, its authority, the raw driver and the baselines."""

    label: str
    url: str
    raw: Any
    counts: Counts
    appends: int
    store: SqlEventStore
    es: EsSide | None
    es_note: str
    es_where: str | None
    new_space: _Spaces = field(default_factory=_Spaces)

    def __post_init__(self) -> None:
        self.registry = LeaseRegistry(self.store)
        self.node = AppendAuthority("bench-node", self.store, self.registry, ttl_seconds=3600)

    def via_authority(self) -> Step:
        space = self.new_space("auth")
        self.node.acquire(space)
        node = self.node
        return lambda _seq: node.append(space, TYPE, PAYLOAD) and None

    def steps(self, count: int, side: Any, other: Any, chunk: int) -> tuple[float, float]:
        return _steps(self.counts.rounds, count, side, other, chunk)


def sql_rows(
    label: str, url: str, raw: Any, counts: Counts, works: tuple[str, ...], es_where: str | None
) -> list[Row]:
    appends = counts.appends
    if label == "sqlite NORMAL":
        # Without a sync per commit, the WAL checkpoints (3-4 ms, one per ~475 appends) weigh as
        # much as the appends: 600 a round gave 1-2 a side, and the ratio swung with them.
        appends *= NORMAL_APPENDS_FACTOR
    es: EsSide | None = None
    es_note = ES_NOTE
    if es_where is not None and eventsourcing_installed():
        try:
            es = EsSide("postgresql" if label == "postgresql" else "sqlite", es_where)
        except ImportError as e:  # its PostgreSQL module needs psycopg-pool
            es_note = f"eventsourcing cannot run here ({e}): skipped"
    elif es_where is None:
        es_note = "eventsourcing sets no synchronous=NORMAL: no like-for-like baseline"
    rows: list[Row] = []
    try:
        with SqlEventStore(url, migrate=True) as store:
            run = _Run(label, url, raw, counts, appends, store, es, es_note, es_where)
            if "append" in works:
                rows += _append_rows(run)
            if "many" in works:
                rows += _many_rows(run)
            if "transaction" in works:
                from .tx_rows import tx_rows

                rows += tx_rows(label, url, counts.rounds, appends, counts.batches)
            if "read" in works:
                rows += _read_rows(run)
    finally:
        if es is not None:
            es.close()
    return rows


def _append_rows(run: _Run) -> list[Row]:
    label, raw, es = run.label, run.raw, run.es
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
        space = run.new_space("raw")
        return lambda seq: bare_raw.insert_one(space, seq)

    rows: list[Row] = []
    work = "fenced append via AppendAuthority"
    try:
        fig, base = run.steps(run.appends, run.via_authority, bare, 25)
        rows.append(measured(work, label, "raw driver insert", fig, base, TARGET_APPEND))
        if es is None:
            return [*rows, skipped(work, label, "eventsourcing recorder", run.es_note)]
        fig, base = run.steps(run.appends, run.via_authority, es.recorder_step, 25)
        target = TARGET_VS_RECORDER[label]
        rows.append(measured(work, label, "eventsourcing recorder", fig, base, target))
        fig, base = run.steps(run.appends, run.via_authority, es.save_step, 25)
        rows.append(measured(work, label, "eventsourcing Application.save", fig, base, None))
        if label == "postgresql" and run.es_where is not None:
            esf = EsSide("postgresql", run.es_where, db_functions=True)
            try:
                fig, base = run.steps(run.appends, run.via_authority, esf.recorder_step, 25)
            finally:
                esf.close()
            vs = "eventsourcing recorder, DB functions"
            rows.append(measured(work, label, vs, fig, base, None))
        return rows
    finally:
        if bare_raw is not raw:
            bare_raw.close()


def _many_rows(run: _Run) -> list[Row]:
    label, raw, store = run.label, run.raw, run.store
    items = [(TYPE, PAYLOAD)] * 100

    def batches() -> Step:
        space = run.new_space("many")
        lease = run.registry.acquire(space, "bench-node", 3600)
        return lambda b: store.append_many(space, items, expected_seq=b * 100, fence=lease) and None

    def bare_batches() -> Step:
        space = run.new_space("rawmany")
        return lambda b: raw.insert_many(space, b * 100, 100)

    work = "append_many of 100"
    fig, base = run.steps(run.counts.batches, batches, bare_batches, 1)
    target = TARGET_MANY[label]
    rows = [measured(work, label, "raw executemany", fig * 100, base * 100, target)]
    if label == "postgresql":

        def copy_batches() -> Step:
            space = run.new_space("copymany")
            return lambda b: _copy_many(raw, space, b * 100, 100)

        fig, base = run.steps(run.counts.batches, batches, copy_batches, 1)
        rows.append(measured(work, label, "raw COPY", fig * 100, base * 100, None))
    return rows


def _read_rows(run: _Run) -> list[Row]:
    label, store, es, count = run.label, run.store, run.es, run.counts.reads
    rounds = run.counts.rounds
    space = run.new_space("read-back")
    lease = run.registry.acquire(space, "bench-node", 3600)
    batch = [(TYPE, PAYLOAD)] * min(10_000, count)
    while (head := store.head(space)) < count:
        store.append_many(space, batch[: count - head], expected_seq=head, fence=lease)

    def read_list() -> None:
        assert len(store.events(space)) == count

    def read_iter() -> None:
        assert sum(1 for _ in store.iter_events(space)) == count

    def bare_read() -> None:
        assert len(run.raw.read(space)) == count

    work = f"read {count:,} events as Event objects"
    rows: list[Row] = []
    for how, reader in (("events()", read_list), ("iter_events()", read_iter)):
        fig, base = _compare(rounds, count, reader, bare_read)
        vs = "raw driver + json.loads"
        rows.append(measured(f"{work}, {how}", label, vs, fig, base, TARGET_READ))
    if es is None:
        return [*rows, skipped(f"{work}, events()", label, "eventsourcing recorder", run.es_note)]
    originator = es.fill(count)

    def es_read() -> None:
        assert len(es.read(originator)) == count

    fig, base = _compare(rounds, count, read_list, es_read)
    vs = "eventsourcing select_events + json.loads"
    rows.append(measured(f"{work}, events()", label, vs, fig, base, None))
    return rows
