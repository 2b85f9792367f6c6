"""The holder's listener and writes to different spaces (shard_sql.group's writers): where the
store commits them in parallel (PostgreSQL), one space's commit does not hold up the requests
of another; where its writes serialize (SQLite, git, memory), the listener's thread writes.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import raw_connection

from shard_sql import AppendAuthority, LeaseRegistry
from shard_sql.group import WRITERS, parallel_writers
from shard_sql.handoff import frame, read_frame
from shard_sql.handoff_wire import WRITTEN, request
from shard_sql.urls import open_store
from shard_sql.validation import pending


class SpaceGate:
    """A group commit's write through `holder`'s fenced batch write that waits for `gate`,
    noting which spaces are being written at once, and by which threads."""

    def __init__(self, holder: Any) -> None:
        self.holder = holder
        self.gate = threading.Event()
        self.lock = threading.Lock()
        self.writing: set[str] = set()
        self.most_at_once = 0
        self.seen: set[str] = set()
        self.writers: list[str] = []

    def __call__(self, space: str, batch: list[Any]) -> list[Any]:
        with self.lock:
            self.writing.add(space)
            self.seen.add(space)
            self.most_at_once = max(self.most_at_once, len(self.writing))
            self.writers.append(threading.current_thread().name)
        try:
            self.gate.wait(30)
            return self.holder.write_if_held(space, batch) or []
        finally:
            with self.lock:
                self.writing.discard(space)

    def wait_seen(self, spaces: set[str], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if spaces <= self.seen:
                    return True
            time.sleep(0.002)
        return False


def _answer(sock: socket.socket) -> Any:
    """The seq of a written event's answer."""
    body = read_frame(sock)
    assert body is not None
    return WRITTEN.unpack_from(body)[1]


def _two_spaces_handed_over(store: Any) -> tuple[SpaceGate, bool]:
    """A holder of spaces a and b, each forwarded one append (the node serves two spaces);
    then their writes wait at a gate: a forwarder's request for a, then (once a's write has
    begun) another's for b. Whether b's write began while a's waited; then both are let
    through and answered."""
    holder = AppendAuthority("holder", store, LeaseRegistry(store), forward_timeout=30)
    holder.append("a", "t", {"n": 0})
    holder.append("b", "t", {"n": 0})
    gate = SpaceGate(holder)
    holder._group._write = gate
    with holder:
        first, second = raw_connection(store, "holder"), raw_connection(store, "holder")
        gate.gate.set()
        for sock, space in ((first, "a"), (second, "b")):
            sock.sendall(frame(request(space, pending("t", {"n": 1}, f"{space}1"))))
            assert _answer(sock) == 1
        gate.gate.clear()
        gate.seen.clear()
        gate.most_at_once = 0
        first.sendall(frame(request("a", pending("t", {"n": 2}, "a2"))))
        assert gate.wait_seen({"a"}, 30)
        second.sendall(frame(request("b", pending("t", {"n": 2}, "b2"))))
        both = gate.wait_seen({"a", "b"}, 3)
        gate.gate.set()
        assert _answer(first) == 2
        assert _answer(second) == 2
        first.close()
        second.close()
    assert [e.payload["n"] for e in store.events("a")] == [0, 1, 2]
    assert [e.payload["n"] for e in store.events("b")] == [0, 1, 2]
    return gate, both


@pytest.mark.postgres
def test_postgresql_writes_of_two_spaces_are_in_progress_at_once(pg_migrated_url: str) -> None:
    """A node serving forwarders of two spaces: while one space's forwarded write is held (a
    commit on the wire), the listener reads the request of the other and that space's write
    begins too: on PostgreSQL they commit in parallel, each on a writer thread."""
    store: Any = open_store(pg_migrated_url)
    try:
        assert parallel_writers(store) == WRITERS
        gate, both = _two_spaces_handed_over(store)
    finally:
        store.close()
    assert both, "b's write waited for a's commit: the listener was inside a's write"
    assert gate.most_at_once == 2
    assert set(gate.writers[-2:]) == {"shard-sql-group"}


def test_sqlite_writes_stay_on_the_listeners_thread(tmp_path: Path) -> None:
    """SQLite has one writer: the listener's thread writes each space's batch itself (no
    hand-off to another thread), one space after the other."""
    store: Any = open_store(f"sqlite:///{tmp_path}/shard.db")
    try:
        assert parallel_writers(store) == 0
        gate, both = _two_spaces_handed_over(store)
    finally:
        store.close()
    assert not both and gate.most_at_once == 1
    assert set(gate.writers) == {"shard-sql-handoff-holder"}


@pytest.fixture
def serial_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    url = "memory:" if request.param == "memory" else f"git+file://{tmp_path / 'log.git'}"
    s = open_store(url)
    yield s
    if hasattr(s, "close"):
        s.close()


@pytest.mark.parametrize("serial_store", ["memory", "git"], indirect=True)
def test_stores_whose_writes_serialize_get_no_writers(serial_store: Any) -> None:
    assert parallel_writers(serial_store) == 0


def test_one_space_alone_is_written_by_the_listener_on_postgresql(pg_migrated_url: str) -> None:
    """Forwarders of one space only: nothing to read meanwhile but that space's next requests,
    so the listener's thread writes them itself, without a thread hand-off per batch."""
    store: Any = open_store(pg_migrated_url)
    try:
        holder = AppendAuthority("holder", store, LeaseRegistry(store), forward_timeout=30)
        holder.append("a", "t", {"n": 0})
        gate = SpaceGate(holder)
        gate.gate.set()
        holder._group._write = gate
        with holder:
            sock = raw_connection(store, "holder")
            for n in (1, 2, 3):
                sock.sendall(frame(request("a", pending("t", {"n": n}, f"a{n}"))))
                assert _answer(sock) == n
            sock.close()
    finally:
        store.close()
    assert gate.writers == ["shard-sql-handoff-holder"] * 3
