"""No reader skips, under concurrent SQL transactions: writer processes and threads hold
transactions open for random times (BEGIN, the store's own append statements, a random pause,
COMMIT or ROLLBACK), while a reader pages the feed. The reader must read exactly the committed
events, each once, positions increasing, each space in seq order.

On PostgreSQL some writes are `shard_sql_append_placed()` (placed before their own commit when
the placement's lock is free): the positions they return must be the ones the reader reads.

On PostgreSQL some writers pause long between their insert and their commit, so commits come in
another order than the inserts (what skips a reader when positions are taken at insert time)."""

from __future__ import annotations

import multiprocessing
import random
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest

from shard_sql import SqlEventStore
from shard_sql.sql.dialects import Conn, PostgresDialect
from shard_sql.validation import pending
from shard_sql.values import Event

CTX = multiprocessing.get_context("spawn")
PROCESSES = 3
THREADS = 2
TRANSACTIONS = 30


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, sqlite_url: str) -> Iterator[str]:
    if request.param == "sqlite":
        SqlEventStore(sqlite_url).close()  # created and migrated before the writers start
        yield sqlite_url
    else:
        yield str(request.getfixturevalue("pg_migrated_url"))


def _head(c: Conn, space: str, store: SqlEventStore) -> int:
    c.cur.execute(store.database.dialect.head_sql, (space,))
    row = c.cur.fetchone()
    return 0 if row is None else int(row[0]) + 1


def _placed(store: SqlEventStore, c: Conn, w: str, i: int, rnd: random.Random) -> list[Any]:
    """One `append_placed` (1-3 events of one space, in autocommit); what it committed, each
    with the position it returned (None: placed after its commit)."""
    d = store.database.dialect
    assert isinstance(d, PostgresDialect)
    space = rnd.choice(["shared-0", "shared-1", f"own-{w}"])
    seq = _head(c, space, store)
    idents = [f"{w}.{i}.{space}.{k}" for k in range(rnd.randint(1, 3))]
    items = [pending("t", {"id": x}) for x in idents]
    try:
        got = d.append_placed(c, space, items, seq, datetime.now(UTC))
    except Exception:
        d.rollback(c)  # another writer took that seq first
        return []
    if got is None:
        return []
    store.feed_committed()
    return [[space, seq + k, x, p] for k, (x, p) in enumerate(zip(idents, got, strict=True))]


def _transaction(store: SqlEventStore, c: Conn, w: str, i: int, rnd: random.Random) -> list[Any]:
    """One transaction: 1-2 spaces, 1-3 events each; what it committed (empty: rolled back)."""
    d = store.database.dialect
    if isinstance(d, PostgresDialect) and rnd.random() < 0.3:
        return _placed(store, c, w, i, rnd)
    while True:
        try:
            d.begin_write(c)
            break
        except Exception as e:
            if not d.is_busy(e):  # SQLite: another writer holds the write lock
                raise
            time.sleep(0.001)
    out: list[Any] = []
    try:
        for space in rnd.sample(["shared-0", "shared-1", f"own-{w}"], rnd.randint(1, 2)):
            for k in range(rnd.randint(1, 3)):
                seq = _head(c, space, store)
                ident = f"{w}.{i}.{space}.{k}"
                item = pending("t", {"id": ident})
                sql, params = d.append_one(space, item, seq, datetime.now(UTC), w, 0, None)
                c.cur.execute(sql, params)
                if d.inserted(c.cur) is None:
                    raise RuntimeError("not written")
                out.append([space, seq, ident])
                time.sleep(rnd.random() * 0.004)
        # Hold the transaction open: long pauses put commits out of insert order.
        time.sleep(rnd.random() * (0.12 if rnd.random() < 0.2 else 0.01))
        if rnd.random() < 0.25:
            d.rollback(c)
            return []
        d.commit(c)
    except Exception:
        d.rollback(c)  # a conflict on a shared space (or SQLite busy): rolled back
        return []
    store.feed_committed()  # the store's own commit: wake the feed's waiters
    return out


def _writer(url: str, w: str, seed: int, results: Any) -> None:
    rnd = random.Random(seed)
    with SqlEventStore(url) as store, store.database.connection() as c:
        for i in range(TRANSACTIONS):
            results.put(_transaction(store, c, w, i, rnd))
    results.put(None)


def test_the_reader_reads_exactly_what_committed(url: str) -> None:
    seen, committed, promised = _run(url)
    positions = [e.position for e in seen]
    assert None not in positions
    assert positions == sorted(set(positions)), "positions repeat or go back"  # type: ignore[type-var]
    last: dict[str, int] = {}
    for e in seen:
        assert e.seq == last.get(e.space, -1) + 1, (e.space, e.seq)  # seq order, no gap
        last[e.space] = e.seq
    got = [(e.space, e.seq, e.payload["id"]) for e in seen]
    assert len(got) == len(set(got))
    assert sorted(got) == sorted(committed)
    assert len(committed) > 50, len(committed)
    read = {(e.space, e.seq): e.position for e in seen}
    assert {k: read[k] for k in promised} == promised, "a returned position is not the feed's"
    if url.startswith("postgresql"):
        assert promised, "no append placed its events before its commit"


def test_positions_taken_at_insert_are_caught(
    pg_migrated_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The self-test: positions from a sequence at insert time (what most stores do), read
    without placement, make the same run skip events, and the test sees it."""
    with psycopg.connect(pg_migrated_url.replace("+psycopg", ""), autocommit=True) as conn:
        conn.execute("CREATE SEQUENCE naive_position")
        conn.execute("ALTER TABLE events ALTER position SET DEFAULT nextval('naive_position')")

    def head(self: Any, c: Conn) -> int:
        c.cur.execute("SELECT COALESCE(MAX(position), 0) FROM events")
        return int(c.cur.fetchone()[0])

    monkeypatch.setattr(PostgresDialect, "place_feed", head)
    monkeypatch.setattr(
        PostgresDialect, "feed_beyond", lambda self, c, after: head(self, c) > after
    )
    seen, committed, _ = _run(pg_migrated_url)
    got = {(e.space, e.seq, e.payload["id"]) for e in seen}
    assert got < set(committed), "no event was skipped: the test would not catch a skip"


def _run(
    url: str,
) -> tuple[list[Event], list[tuple[str, int, str]], dict[tuple[str, int], int]]:
    """Writers and a paging reader; (what the reader read, what the writers committed, the
    positions `append_placed` returned)."""
    results: Any = CTX.Queue()
    procs = [CTX.Process(target=_writer, args=(url, f"p{n}", n, results)) for n in range(PROCESSES)]
    threads = [
        threading.Thread(target=_writer, args=(url, f"t{n}", 100 + n, results))
        for n in range(THREADS)
    ]
    store = SqlEventStore(url)
    seen: list[Event] = []
    for p in procs:
        p.start()
    for t in threads:
        t.start()
    committed: list[tuple[str, int, str]] = []
    promised: dict[tuple[str, int], int] = {}
    done = 0
    after = 0
    try:
        while done < PROCESSES + THREADS:
            while not results.empty():
                got = results.get()
                if got is None:
                    done += 1
                else:
                    committed.extend((e[0], e[1], e[2]) for e in got)
                    promised.update({(e[0], e[1]): e[3] for e in got if len(e) > 3 and e[3]})
            page = store.feed(after, limit=7)
            seen.extend(page)
            if page:
                after = page[-1].position or after
            else:
                store.wait_feed(after, timeout=0.05)
        while page := store.feed(after, limit=7):  # what committed last
            seen.extend(page)
            after = page[-1].position or after
    finally:
        for p in procs:
            p.join(60)
        for t in threads:
            t.join(60)
        store.close()
    return seen, committed, promised
