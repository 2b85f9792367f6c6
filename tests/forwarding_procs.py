"""Worker processes and checks shared by the multi-process forwarding tests of every backend
(tests/test_sql_forwarding.py, tests/test_git_forwarding.py).

Workers are `spawn`ed and open the store from its URL (`shard_sql.urls.open_store`) on their
own; they share nothing with the test but the store.
"""

from __future__ import annotations

import multiprocessing
import queue
import signal
import time
from typing import Any

from shard_sql import AppendAuthority, LeaseRegistry
from shard_sql.ports import EventStore
from shard_sql.urls import open_store
from shard_sql.verify import verify

CTX = multiprocessing.get_context("spawn")


def forwarder_proc(
    url: str, space: str, worker: int, count: int, ttl: float, ready: Any, go: Any, out: Any
) -> None:
    store = open_store(url)
    node = AppendAuthority(
        f"w{worker}", store, LeaseRegistry(store), ttl_seconds=ttl, forward_timeout=30
    )
    with node:  # serves what is forwarded to it if it takes the space over
        ready.put(worker)
        go.wait(60)
        acks = []
        for i in range(count):
            e = node.append(space, "t", {"w": worker, "i": i}, intent_id=f"w{worker}-{i}")
            acks.append((e.intent_id, e.seq, e.writer, e.generation))
        out.put((worker, acks))
    store.close()


def start_forwarders(url: str, space: str, count: int, ttl: float) -> tuple[Any, ...]:
    """Three forwarder processes, started and ready; they append once `go` is set."""
    ready, go, out = CTX.Queue(), CTX.Event(), CTX.Queue()
    procs = [
        CTX.Process(target=forwarder_proc, args=(url, space, w, count, ttl, ready, go, out))
        for w in range(3)
    ]
    for p in procs:
        p.start()
    for _ in procs:
        ready.get(timeout=60)
    return procs, go, out


def collect(out: Any, procs: list[Any], n: int, timeout: float = 60) -> dict[Any, Any]:
    got: dict[Any, Any] = {}
    deadline = time.monotonic() + timeout
    while len(got) < n:
        try:
            key, value = out.get(timeout=0.2)
            got[key] = value
        except queue.Empty:
            for p in procs:
                assert p.is_alive() or p.exitcode in (0, -signal.SIGKILL), f"died: {p.exitcode}"
            assert time.monotonic() < deadline, f"timed out with {sorted(got)}"
    return got


def stop_all(procs: list[Any]) -> None:
    """Join the workers; kill what is left (pytest would wait for it at exit forever)."""
    for p in procs:
        p.join(30)
        if p.is_alive():
            p.kill()
            p.join(5)


def check_log(store: EventStore, space: str, acks: list[tuple[str, int, str, int]]) -> None:
    """Every acknowledged append at its seq exactly once, seqs contiguous, verify clean."""
    events = store.events(space)
    assert [e.seq for e in events] == list(range(len(events)))
    ids = [e.intent_id for e in events]
    assert len(ids) == len(set(ids)) == len(acks)
    for intent_id, seq, writer, generation in acks:
        e = events[seq]
        assert (e.intent_id, e.writer, e.generation) == (intent_id, writer, generation)
    report = verify(store, spaces=[space])
    assert report.ok, [str(v) for v in report.violations]
