"""Several processes on one database: appends with compare-and-set retries, and acquire races.

Processes are started with the 'spawn' method (no fork of a threaded parent).
"""

from __future__ import annotations

import multiprocessing
import queue
import traceback
from pathlib import Path
from typing import Any

import pytest

from shard_sql import LeaseHeld, LeaseRegistry, SeqConflict, SqlEventStore

WORKERS = 4
SPAWN = multiprocessing.get_context("spawn")


def append_worker(url: str, worker: int, count: int, barrier: Any, out: Any) -> None:
    try:
        barrier.wait(timeout=60)
        # On a new SQLite file all four open it at once: they race to migrate it as well.
        with SqlEventStore(url) as store:
            acked = []
            conflicts = 0
            for i in range(count):
                while True:
                    head = store.head("s")
                    try:
                        e = store.append("s", "t", {"w": worker, "i": i}, expected_seq=head)
                    except SeqConflict:
                        conflicts += 1
                        continue
                    acked.append((e.seq, worker, i))
                    break
        out.put(("ok", worker, acked, conflicts))
    except BaseException:
        out.put(("error", worker, traceback.format_exc(), 0))


def acquire_worker(url: str, worker: int, rounds: int, barrier: Any, out: Any) -> None:
    try:
        won = []
        with SqlEventStore(url) as store:
            registry = LeaseRegistry(store)
            for r in range(rounds):
                barrier.wait(timeout=60)
                try:
                    lease = registry.acquire("s", f"node-{worker}", 30)
                except LeaseHeld:
                    lease = None
                barrier.wait(timeout=60)
                if lease is not None:
                    store.append("s", "won", {"round": r}, expected_seq=r, fence=lease)
                    registry.release(lease)
                    won.append((r, lease.generation))
                barrier.wait(timeout=60)
        out.put(("ok", worker, won, 0))
    except BaseException:
        out.put(("error", worker, traceback.format_exc(), 0))


def run_workers(target: Any, url: str, n: int) -> dict[int, Any]:
    barrier = SPAWN.Barrier(WORKERS)
    out = SPAWN.Queue()
    procs = [
        SPAWN.Process(target=target, args=(url, w, n, barrier, out), daemon=True)
        for w in range(WORKERS)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    try:
        for _ in procs:
            status, worker, data, _extra = out.get(timeout=120)
            assert status == "ok", f"worker {worker} failed:\n{data}"
            results[worker] = data
    except queue.Empty:
        pytest.fail("a worker process did not report within 120 s")
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return results


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/shared.db"  # created and migrated by the workers
    pg: str = request.getfixturevalue("pg_migrated_url")
    return pg


@pytest.mark.slow
def test_processes_appending_to_one_space(url: str) -> None:
    per_worker = 100
    results = run_workers(append_worker, url, per_worker)
    acked = sorted(a for worker_acks in results.values() for a in worker_acks)
    with SqlEventStore(url) as store:
        got = store.events("s")
    assert [e.seq for e in got] == list(range(WORKERS * per_worker))
    # Every acknowledged append is in the log exactly once, at the seq it was acknowledged with.
    assert acked == [(e.seq, e.payload["w"], e.payload["i"]) for e in got]
    for worker_acks in results.values():
        assert [i for _, _, i in worker_acks] == list(range(per_worker))


@pytest.mark.slow
def test_processes_racing_acquire(url: str) -> None:
    rounds = 12
    results = run_workers(acquire_worker, url, rounds)
    wins = sorted(win for worker_wins in results.values() for win in worker_wins)
    # Exactly one winner per round, and each round's grant is the next generation.
    assert [r for r, _ in wins] == list(range(rounds))
    assert [g for _, g in wins] == list(range(1, rounds + 1))
    winners = {r: w for w, worker_wins in results.items() for r, _ in worker_wins}
    with SqlEventStore(url) as store:
        got = store.events("s")
        record = store.lease_record("s")
    assert [(e.seq, e.writer, e.generation) for e in got] == [
        (r, f"node-{winners[r]}", r + 1) for r in range(rounds)
    ]
    assert record is not None and record.generation == rounds
