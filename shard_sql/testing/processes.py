"""The multi-process forwarding contract: real processes that open the store by its URL and share
nothing else. Three forwarders append to a space a fourth process holds; then the holder is frozen
with intents piling up, killed, and the next holder applies them.

Workers are `spawn`ed (no fork of a threaded parent) and open the store with
`shard_sql.urls.open_store`; an adapter needs only `store_url` (and, optionally, the hooks below).
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from shard_sql.authority import AppendAuthority
from shard_sql.handoff import HANDOFF_TIMEOUT
from shard_sql.leases import LeaseRegistry
from shard_sql.ports import EventStore
from shard_sql.testing.contracts import AdapterCase
from shard_sql.urls import open_store
from shard_sql.verify import verify

CTX = multiprocessing.get_context("spawn")


def no_write_lock_held(url: str) -> bool:
    """Whether nobody holds the store's write lock right now: SQLite's (a `BEGIN IMMEDIATE`
    gets it at once), or a git ref lock (no `*.lock` file). Other stores: True."""
    if url.startswith("sqlite:///"):
        conn = sqlite3.connect(url.removeprefix("sqlite:///"), timeout=0.05, isolation_level=None)
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("ROLLBACK")
            return True
        except sqlite3.OperationalError:
            return False
        finally:
            conn.close()
    if url.startswith("git+file://"):
        root = Path(url.removeprefix("git+file://"))
        return not any(p.name.endswith(".lock") for p in root.rglob("*"))
    return True


TTL = 1.0
"""Seconds: the lease of the holder killed with intents pending."""

Ack = tuple[str, int, str, int]
"""(intent id, seq, writer, generation) of an acknowledged append."""


# -- the processes ---------------------------------------------------------------------------


def forwarder_proc(
    url: str,
    space: str,
    worker: int,
    count: int,
    ttl: float,
    ready: Any,
    go: Any,
    out: Any,
    handoff: bool = True,
) -> None:
    """Appends `count` events to `space` through its own node, once `go` is set."""
    store = open_store(url)
    node = AppendAuthority(
        f"w{worker}",
        store,
        LeaseRegistry(store),
        ttl_seconds=ttl,
        forward_timeout=30,
        handoff=handoff,
    )
    with node:  # serves what is forwarded to it if it takes the space over
        ready.put(worker)
        go.wait(60)
        acks = []
        for i in range(count):
            e = node.append(space, "t", {"w": worker, "i": i}, intent_id=f"w{worker}-{i}")
            acks.append((e.intent_id, e.seq, e.writer, e.generation))
        out.put((worker, acks))
    _close(store)


def holder_proc(
    url: str, space: str, ttl: float, ready: Any, stop: Any, out: Any, handoff: bool = True
) -> None:
    """Takes `space` with one append, reports it on `out` (a queue of its own: a process killed
    while its queue's feeder thread holds the queue's lock leaves that queue locked for good),
    sets `ready`, and serves until `stop` is set."""
    store = open_store(url)
    node = AppendAuthority("holder", store, LeaseRegistry(store), ttl_seconds=ttl, handoff=handoff)
    # Takes the space before serving: the serving thread then waits for intents at once, not
    # after a first idle round.
    e = node.append(space, "t", {"by": "holder"}, intent_id="holder-0")
    with node:
        out.put(("holder", [(e.intent_id, e.seq, e.writer, e.generation)]))
        out.close()
        out.join_thread()  # flushed before `ready`: the test may SIGSTOP this process then
        ready.set()
        stop.wait(120)
    _close(store)


def _close(store: object) -> None:
    close = getattr(store, "close", None)
    if close is not None:
        close()


def start_forwarders(
    url: str, space: str, count: int, ttl: float, handoff: bool = True
) -> tuple[Any, ...]:
    """Three forwarder processes, started and ready; they append once `go` is set."""
    ready, go, out = CTX.Queue(), CTX.Event(), CTX.Queue()
    procs = [
        CTX.Process(
            target=forwarder_proc, args=(url, space, w, count, ttl, ready, go, out, handoff)
        )
        for w in range(3)
    ]
    for p in procs:
        p.start()
    for _ in procs:
        ready.get(timeout=60)
    return procs, go, out


def start_holder(url: str, space: str, ttl: float, handoff: bool = True) -> tuple[Any, ...]:
    """The holder process, holding `space` and serving; returns it, its stop event and queue."""
    ready, stop, out = CTX.Event(), CTX.Event(), CTX.Queue()
    holder = CTX.Process(target=holder_proc, args=(url, space, ttl, ready, stop, out, handoff))
    holder.start()
    if not ready.wait(60):
        holder.kill()
        raise AssertionError(f"the holder did not take {space!r}: exit code {holder.exitcode}")
    return holder, stop, out


def collect(out: Any, procs: list[Any], n: int, timeout: float = 60) -> dict[Any, Any]:
    """`n` results from `out`, keyed by worker; fails fast when a process died."""
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


def check_log(store: EventStore, space: str, acks: list[Ack]) -> None:
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


# -- the contract ----------------------------------------------------------------------------


@pytest.mark.slow
class ProcessForwardingContract(AdapterCase):
    """Forwarding between processes that share only the store (opened from `store_url`):
    through the holder's socket (`handoff`, the default), or durable intents only."""

    handoff = True

    def may_freeze_holder(self) -> bool:
        """Whether a holder frozen now would hold no lock the others need (SQLite's write lock,
        a git ref lock): a frozen lock holder is another test's business."""
        url = self.store_url()
        return url is None or no_write_lock_held(url)

    def check_after(self, *, holder_killed: bool) -> None:
        """What else a run leaves sound (no intent record left, the files intact)."""

    def url(self) -> str:
        url = self.store_url()
        assert url is not None, "the multi-process contract opens the store by URL"
        return url

    def test_three_processes_forward_to_a_holder_in_a_fourth(self) -> None:
        url, count = self.url(), 15
        forwarders, go, out = start_forwarders(url, "s", count, ttl=30, handoff=self.handoff)
        holder, stop, holder_out = start_holder(url, "s", ttl=5.0, handoff=self.handoff)
        try:
            acks = collect(holder_out, [holder], 1)
            go.set()
            acks.update(collect(out, [holder, *forwarders], 3))
        finally:
            stop.set()
            go.set()
            stop_all([holder, *forwarders])
        assert [p.exitcode for p in [holder, *forwarders]] == [0, 0, 0, 0]
        all_acks = [a for v in acks.values() for a in v]
        assert len(all_acks) == 1 + 3 * count
        check_log(self.store, "s", all_acks)
        events = self.store.events("s")
        assert {e.writer for e in events} == {"holder"}  # every append written by the holder
        assert len({e.generation for e in events}) == 1
        for w in range(3):  # each process's appends in its own order
            seqs = [seq for _, seq, _, _ in acks[w]]
            assert seqs == sorted(seqs)
        assert self.store.pending_intents("s", limit=10) == []
        self.check_after(holder_killed=False)

    def test_holder_killed_with_intents_pending(self) -> None:
        url, count = self.url(), 6
        forwarders, go, out = start_forwarders(url, "s", count, ttl=TTL, handoff=self.handoff)
        # With the hand-off, the forwarders first wait HANDOFF_TIMEOUT for the frozen holder's
        # answer, then record their intents: its lease must outlast that.
        ttl = TTL + HANDOFF_TIMEOUT * 2 if self.handoff else TTL
        holder, _stop, holder_out = start_holder(url, "s", ttl=ttl, handoff=self.handoff)
        registry = LeaseRegistry(self.store)
        try:
            acks = collect(holder_out, [holder], 1)  # the holder holds the space
            self._freeze(holder.pid)
            lease = registry.current("s")
            assert lease is not None and lease.holder == "holder"
            go.set()  # the forwarders' first intents pile up: the holder is frozen
            piled = self._wait_for_pending(3)
            assert registry.current("s") == lease, "the lease lapsed before the intents piled up"
            os.kill(holder.pid, signal.SIGKILL)
            killed_at = time.monotonic()
            acks.update(collect(out, [holder, *forwarders], 3))
            failover = time.monotonic() - killed_at
        finally:
            # Not `stop.set()`: an event set with a killed process among its waiters blocks.
            if holder.is_alive():
                holder.kill()
            go.set()
            stop_all([holder, *forwarders])
        assert holder.exitcode == -signal.SIGKILL
        assert [p.exitcode for p in forwarders] == [0, 0, 0]
        all_acks = [a for v in acks.values() for a in v]
        assert len(all_acks) == 1 + 3 * count
        check_log(self.store, "s", all_acks)
        by_id = {e.intent_id: e for e in self.store.events("s")}
        assert sorted(piled) == ["w0-0", "w1-0", "w2-0"]
        taken = [by_id[i] for i in piled]
        # The next holder applied every piled-up intent, once, in one generation after the dead
        # one, in arrival order.
        assert len({(e.writer, e.generation) for e in taken}) == 1
        assert taken[0].writer != "holder" and taken[0].generation == lease.generation + 1
        assert [e.seq for e in taken] == [1, 2, 3]
        assert failover < ttl + 5
        assert self.store.pending_intents("s", limit=10) == []
        self.check_after(holder_killed=True)

    def _freeze(self, pid: int) -> None:
        """SIGSTOP `pid` at a moment it holds no lock the others need."""
        for _ in range(100):
            os.kill(pid, signal.SIGSTOP)
            time.sleep(0.005)
            if self.may_freeze_holder():
                return
            os.kill(pid, signal.SIGCONT)
            time.sleep(0.002)
        raise AssertionError("the holder always held a lock")

    def _wait_for_pending(self, n: int) -> list[str]:
        deadline = time.monotonic() + 10
        while len(self.store.pending_intents("s", limit=10)) < n:
            assert time.monotonic() < deadline, "the intents were not recorded"
            time.sleep(0.005)
        return [p.intent_id or "" for p in self.store.pending_intents("s", limit=10)]
