"""The direct hand-off between processes (shard_sql.handoff) and the holder's group commit.

Real SQLite files, PostgreSQL databases and git repositories; holders in other processes where
a signal is the point (SIGSTOP, SIGKILL), in this one where only the socket matters (hostile
messages). Whatever fails, the log must hold every acknowledged append exactly once.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import stat
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import raw_connection

from shard_sql import AppendAuthority, IntentConflict, LeaseRegistry
from shard_sql.group import GroupCommit
from shard_sql.handoff import MAX_MESSAGE, Endpoints, frame, read_frame
from shard_sql.handoff_wire import WRITTEN, request
from shard_sql.testing.processes import (
    CTX,
    check_log,
    collect,
    no_write_lock_held,
    start_forwarders,
    start_holder,
    stop_all,
)
from shard_sql.urls import open_store
from shard_sql.validation import pending
from shard_sql.values import Event


@pytest.fixture(
    params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres), "git"],
)
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/shard.db"
    if request.param == "git":
        return f"git+file://{tmp_path / 'log.git'}"
    pg: str = request.getfixturevalue("pg_migrated_url")
    return pg


@pytest.fixture
def store(url: str) -> Iterator[Any]:
    s = open_store(url)
    yield s
    s.close()


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[Any]:
    """For what the backend does not change (the wire format)."""
    s = open_store(f"sqlite:///{tmp_path}/shard.db")
    yield s
    s.close()


def node(store: Any, name: str, **kw: Any) -> AppendAuthority:
    return AppendAuthority(name, store, LeaseRegistry(store), forward_timeout=30, **kw)


def socket_path(store: Any, node_id: str) -> str:
    directory = store.handoff_dir()
    assert directory is not None
    return Endpoints(directory).path(node_id)


def closed_by_peer(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


# -- the endpoint --------------------------------------------------------------------------------


def test_socket_and_directory_are_private(store: Any) -> None:
    holder = node(store, "holder")
    with holder:
        path = socket_path(store, "holder")
        assert stat.S_ISSOCK(os.stat(path).st_mode)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
        assert os.stat(path).st_uid == os.geteuid()
    assert not os.path.exists(path)  # removed when the node stops


def test_a_directory_others_may_enter_turns_the_handoff_off(tmp_path: Path) -> None:
    db = tmp_path / "shard.db"
    (tmp_path / "shard.db.handoff").mkdir(mode=0o755)
    os.chmod(tmp_path / "shard.db.handoff", 0o755)
    s: Any = open_store(f"sqlite:///{db}")
    try:
        assert s.handoff_dir() is None
        holder, other = node(s, "holder"), node(s, "other")
        holder.append("s", "t", {"n": 0})
        with holder:
            assert other.append("s", "t", {"n": 1}).writer == "holder"  # durable path
        assert other.handoff_outcomes() == {}
        assert os.listdir(tmp_path / "shard.db.handoff") == []
    finally:
        s.close()


@pytest.mark.slow
def test_forwarded_over_the_socket_from_other_processes(url: str, store: Any) -> None:
    forwarders, go, out = start_forwarders(url, "s", 20, ttl=30)
    holder, stop, holder_out = start_holder(url, "s", ttl=30)
    try:
        acks = collect(holder_out, [holder], 1)
        go.set()
        acks.update(collect(out, [holder, *forwarders], 3))
    finally:
        stop.set()
        go.set()
        stop_all([holder, *forwarders])
    check_log(store, "s", [a for v in acks.values() for a in v])
    assert {e.writer for e in store.events("s")} == {"holder"}
    # Hand-offs leave no intent record behind, and none was read.
    assert store.pending_intents("s", limit=10) == []


def test_socket_hand_off_counts_and_stale_socket_file(store: Any) -> None:
    """A socket file of a dead holder (nobody listens) is refused: the durable path; the next
    listener under that node id replaces the file."""
    holder, other = node(store, "holder"), node(store, "other")
    holder.append("s", "t", {"n": 0})
    path = socket_path(store, "holder")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(Endpoints(os.path.dirname(path)).address("holder"))
    dead.close()  # the file stays, as a SIGKILLed holder leaves it
    assert os.path.exists(path)
    done: list[Any] = []
    t = threading.Thread(target=lambda: done.append(other.append("s", "t", {"n": 1})))
    t.start()
    deadline = time.monotonic() + 10
    while not store.pending_intents("s", limit=10):
        assert time.monotonic() < deadline, "no durable intent after a refused connection"
        time.sleep(0.01)
    assert holder.serve("s") == 1
    t.join(30)
    assert done[0].seq == 1
    assert other.handoff_outcomes()["unreachable"] == 1
    with holder:  # its listener replaces the stale file
        third = node(store, "third")
        assert third.append("s", "t", {"n": 2}).writer == "holder"
        assert third.handoff_outcomes()["written"] == 1
    assert [e.payload["n"] for e in store.events("s")] == [0, 1, 2]


def test_socket_file_deleted_under_a_holder(store: Any) -> None:
    holder = node(store, "holder")
    holder.append("s", "t", {"n": 0})
    with holder:
        path = socket_path(store, "holder")
        os.unlink(path)
        first = node(store, "first")
        assert first.append("s", "t", {"n": 1}).writer == "holder"  # durable path
        assert first.handoff_outcomes()["unreachable"] == 1
        deadline = time.monotonic() + 10
        while not os.path.exists(path):  # the listener binds its socket again
            assert time.monotonic() < deadline, "the socket was not made again"
            time.sleep(0.02)
        second = node(store, "second")
        assert second.append("s", "t", {"n": 2}).writer == "holder"
        assert second.handoff_outcomes()["written"] == 1
    assert [e.payload["n"] for e in store.events("s")] == [0, 1, 2]


# -- hostile messages ------------------------------------------------------------------------------


def _raw_request(
    space: bytes = b"s",
    type_: bytes = b"t",
    intent_id: bytes = b"x",
    payload: bytes = b'{"n":1}',
    version: int = 2,
    lengths: tuple[int, int, int] | None = None,
) -> bytes:
    """A request's body as `handoff_wire.request` lays it out, any field as given."""
    ns, nt, ni = lengths or (len(space), len(type_), len(intent_id))
    return struct.pack(">BHHH", version, ns, nt, ni) + space + type_ + intent_id + payload


def _hostile_bodies() -> list[bytes]:
    good = {"space": "s", "type": "t", "intent_id": "x", "payload": {"n": 1}}
    return [
        json.dumps(good).encode(),  # version 1's request: a JSON object
        b"",
        b"\x02\x00",
        b"\xff\xfe",
        _raw_request(version=1),
        _raw_request(version=3),
        _raw_request(lengths=(1, 1, 200)),  # past the end
        _raw_request(intent_id=b""),
        _raw_request(type_=b""),
        _raw_request(space=b"a\x00b"),
        _raw_request(space=b"\xff"),  # not UTF-8
        _raw_request(intent_id=b"x" * 201),
        _raw_request(payload=b'"text"'),
        _raw_request(payload=b"[1, 2]"),
        _raw_request(payload=b"{not json"),
        _raw_request(payload=b'{"n":NaN}'),
        _raw_request(payload=b'{"n":Infinity}'),
        _raw_request(payload=b'{"n": 1}'),  # not the text an append's check writes
        _raw_request(payload=b'{"n":1,"n":2}'),
        _raw_request(payload=b'{"n":"\\u0041"}'),
        _raw_request(payload=b'{"n":"\\ud800"}'),  # a lone surrogate
        _raw_request(payload=b'{"n":"a\\u0000b"}'),  # NUL
        _raw_request(payload=b'{"n":1e+16}'),  # a float PostgreSQL gives back changed
        _raw_request(payload=b'{"n":1}x'),
        _raw_request(payload=b'{"n":' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
        _raw_request(payload=b'{"n":"' + b"x" * (1024 * 1024) + b'"}'),  # over 1 MiB
    ]


@pytest.mark.parametrize("body", _hostile_bodies(), ids=range(len(_hostile_bodies())))
def test_a_malformed_message_closes_the_connection_and_writes_nothing(
    sqlite_store: Any, body: bytes
) -> None:
    store = sqlite_store
    holder = node(store, "holder")
    holder.append("s", "t", {"n": 0})
    with holder:
        sock = raw_connection(store, "holder")
        sock.sendall(frame(body))
        assert closed_by_peer(sock)
        sock.close()
        assert store.head("s") == 1
        assert node(store, "after").append("s", "t", {"n": 1}).writer == "holder"
    assert store.head("s") == 2


def test_oversized_and_cut_messages_close_the_connection(sqlite_store: Any) -> None:
    store = sqlite_store
    holder = node(store, "holder")
    holder.append("s", "t", {"n": 0})
    with holder:
        sock = raw_connection(store, "holder")
        sock.sendall(struct.pack(">I", MAX_MESSAGE + 1) + b"{}")  # no more is read
        assert closed_by_peer(sock)
        sock.close()
        item = pending("t", {"n": 1}, "cut")
        sock = raw_connection(store, "holder")
        sock.sendall(frame(request("s", item))[:-3])
        sock.shutdown(socket.SHUT_WR)  # ends inside the message
        assert closed_by_peer(sock)
        sock.close()
        assert store.head("s") == 1
        sock = raw_connection(store, "holder")  # the listener still serves well-formed ones
        sock.sendall(frame(request("s", item)))
        answer = read_frame(sock)
        sock.close()
        assert answer is not None and WRITTEN.unpack_from(answer)[1] == 1
    assert [e.intent_id for e in store.events("s")] == [None, "cut"]


@pytest.mark.slow
def test_a_forwarder_killed_after_sending(url: str, store: Any) -> None:
    """The holder writes what was sent (or not); a retry with the same id finds it: once."""
    holder = node(store, "holder")
    holder.append("s", "t", {"n": 0})
    with holder:
        proc = CTX.Process(target=send_and_die, args=(url, "holder", "s", "k1"))
        proc.start()
        proc.join(30)
        assert proc.exitcode == -signal.SIGKILL
        again = node(store, "retry").append("s", "t", {"n": "k1"}, intent_id="k1")
    events = store.events("s")
    assert [e.intent_id for e in events] == [None, "k1"]
    assert again == events[1]


def send_and_die(url: str, holder: str, space: str, intent_id: str) -> None:
    s = open_store(url)
    sock = raw_connection(s, holder)
    sock.sendall(frame(request(space, pending("t", {"n": intent_id}, intent_id))))
    os.kill(os.getpid(), signal.SIGKILL)


# -- frozen and killed holders ---------------------------------------------------------------------


def freeze(url: str, pid: int) -> None:
    for _ in range(200):
        os.kill(pid, signal.SIGSTOP)
        time.sleep(0.005)
        if no_write_lock_held(url):
            return
        os.kill(pid, signal.SIGCONT)
        time.sleep(0.002)
    raise AssertionError("the holder always held a lock")


@pytest.mark.slow
def test_a_frozen_holder_then_thawed(url: str, store: Any) -> None:
    """The forwarder's request waits in the frozen holder's socket; the forwarder times out,
    records the same intent durably and waits. Thawed, the holder meets the intent twice (the
    socket, the record): one event."""
    holder, stop, holder_out = start_holder(url, "s", ttl=30)
    other = node(store, "other")
    try:
        collect(holder_out, [holder], 1)
        assert other.append("s", "t", {"n": 1}, intent_id="a").writer == "holder"
        freeze(url, holder.pid)
        done: list[Any] = []
        t = threading.Thread(
            target=lambda: done.append(other.append("s", "t", {"n": 2}, intent_id="b"))
        )
        t.start()
        deadline = time.monotonic() + 20
        while not store.pending_intents("s", limit=10):
            assert time.monotonic() < deadline, "no durable intent after the timeout"
            time.sleep(0.01)
        os.kill(holder.pid, signal.SIGCONT)
        t.join(30)
        assert done and done[0].intent_id == "b"
    finally:
        os.kill(holder.pid, signal.SIGCONT)
        stop.set()
        stop_all([holder])
    assert other.handoff_outcomes()["unknown"] == 1
    events = store.events("s")
    assert [e.intent_id for e in events] == ["holder-0", "a", "b"]
    assert {e.writer for e in events} == {"holder"}


@pytest.mark.slow
def test_holder_killed_while_forwarders_append(url: str, store: Any) -> None:
    forwarders, go, out = start_forwarders(url, "s", 25, ttl=1.0)
    holder, _stop, holder_out = start_holder(url, "s", ttl=1.0)
    try:
        acks = collect(holder_out, [holder], 1)
        go.set()
        deadline = time.monotonic() + 30
        while store.head("s") < 10:  # forwarders are handing over: kill it among them
            assert time.monotonic() < deadline, "nothing was forwarded"
            time.sleep(0.002)
        os.kill(holder.pid, signal.SIGKILL)
        acks.update(collect(out, [holder, *forwarders], 3))
    finally:
        go.set()
        stop_all([holder, *forwarders])
    check_log(store, "s", [a for v in acks.values() for a in v])
    writers = {e.writer for e in store.events("s")}
    assert "holder" in writers and len(writers) >= 2  # a forwarder took over


# -- group commit ----------------------------------------------------------------------------------


class GatedWrites:
    """A group commit's `write` through `holder`'s fenced batch write that waits for `gate`
    (setting `entered` first), noting each batch's size and writing thread; a batch whose first
    item's payload is `interrupted` raises KeyboardInterrupt instead."""

    def __init__(self, holder: Any, *, interrupted: dict[str, Any] | None = None) -> None:
        self.holder = holder
        self.interrupted = interrupted
        self.gate, self.entered = threading.Event(), threading.Event()
        self.sizes: list[int] = []
        self.writers: list[str] = []

    def __call__(self, space: str, batch: list[Any]) -> list[Any]:
        self.sizes.append(len(batch))
        self.writers.append(threading.current_thread().name)
        self.entered.set()
        self.gate.wait(30)
        if self.interrupted is not None and batch[0].payload == self.interrupted:
            raise KeyboardInterrupt
        return self.holder.write_if_held(space, batch) or []


def test_group_commit_writes_what_queued_in_one_batch(store: Any) -> None:
    """While one write is in flight, four callers queue: the next write carries all four, and
    an item whose id was written with other content fails alone."""
    holder = node(store, "holder")
    holder.append("s", "t", {"n": "x"}, intent_id="taken")
    write = GatedWrites(holder)
    gate, entered, batches = write.gate, write.entered, write.sizes
    group = GroupCommit(write)
    results: dict[str, Any] = {}

    def call(key: str, payload: dict[str, Any], intent_id: str | None) -> None:
        try:
            results[key] = group.write("s", pending("t", payload, intent_id))
        except Exception as e:
            results[key] = e

    first = threading.Thread(target=call, args=("first", {"n": 0}, None))
    first.start()
    assert entered.wait(30)
    queued = [("a", {"n": 1}, "a"), ("b", {"n": 2}, None), ("bad", {"n": 3}, "taken")]
    queued.append(("a2", {"n": 1}, "a"))  # the same intent twice: written once
    threads = [threading.Thread(target=call, args=q) for q in queued]
    for n, t in enumerate(threads, 1):
        t.start()
        deadline = time.monotonic() + 10
        while len(group._queues["s"].slots) < n:  # queued in this order
            assert time.monotonic() < deadline
            time.sleep(0.001)
    gate.set()
    for t in [first, *threads]:
        t.join(30)
    assert isinstance(results["bad"], IntentConflict)
    assert results["a"] == results["a2"]
    events = store.events("s")
    assert [e.payload["n"] for e in events] == ["x", 0, 1, 2]
    assert [e.seq for e in events] == [0, 1, 2, 3]
    assert batches[:2] == [1, 3]  # the first alone, then a, b, bad (a2 waits: same id)
    assert group.stats.largest == 3


def test_group_commit_tells_each_reply_once_before_its_caller_wakes(store: Any) -> None:
    """A caller's reply is told its event by the thread that wrote it, before that caller is
    woken; the leader writes what queued after its own item itself; a reply that fails costs
    nobody else their event."""
    holder = node(store, "holder")
    holder.append("s", "t", {"n": "x"})
    write = GatedWrites(holder)
    gate, entered, writers = write.gate, write.entered, write.writers
    order: list[str] = []
    group = GroupCommit(write)
    told: dict[str, list[Any]] = {}
    results: dict[str, Any] = {}

    def call(key: str) -> None:
        def reply(event: Any, error: BaseException | None) -> None:
            told.setdefault(key, []).append((event, error))
            order.append(f"told {key}")
            if key == "c":
                raise OSError("its forwarder went away")

        results[key] = group.write("s", pending("t", {"k": key}), reply)
        order.append(f"woke {key}")

    first = threading.Thread(target=call, args=("first",), name="first")
    first.start()
    assert entered.wait(30)
    threads = [threading.Thread(target=call, args=(k,), name=k) for k in "abc"]
    for n, t in enumerate(threads, 1):
        t.start()
        deadline = time.monotonic() + 10
        while len(group._queues["s"].slots) < n:
            assert time.monotonic() < deadline
            time.sleep(0.001)
    gate.set()
    for t in [first, *threads]:
        t.join(30)
    assert writers == ["first", "first"]  # the leader wrote the queued batch itself
    for key in ("first", "a", "b", "c"):
        assert told[key] == [(results[key], None)]
        assert order.index(f"told {key}") < order.index(f"woke {key}")
    assert [e.payload["k"] for e in store.events("s")[1:]] == ["first", "a", "b", "c"]


def test_submitted_items_are_written_by_the_leader_or_the_drainer(
    store: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`submit` returns at once while a leader writes; what only submitted items are left queued
    when the leader goes is written by the group commit's drainer, and each reply is told."""
    import shard_sql.group

    monkeypatch.setattr(shard_sql.group, "KEEP_LEADING", 0)  # the leader leaves at once
    holder = node(store, "holder")
    holder.append("s", "t", {"k": "x"})
    write = GatedWrites(holder)
    gate, entered, writers = write.gate, write.entered, write.writers
    group = GroupCommit(write)
    first = threading.Thread(target=lambda: group.write("s", pending("t", {"k": 0})))
    first.start()
    assert entered.wait(30)
    told: dict[int, Any] = {}
    all_told = threading.Event()

    def reply_for(n: int) -> Any:
        def reply(event: Any, error: BaseException | None) -> None:
            told[n] = event if error is None else error
            if len(told) == 3:
                all_told.set()

        return reply

    for n in (1, 2, 3):
        group.submit("s", [(pending("t", {"k": n}), reply_for(n))])  # returns: the write is gated
    assert not told
    gate.set()
    first.join(30)
    assert all_told.wait(30)
    group.close()
    assert [told[n].payload["k"] for n in (1, 2, 3)] == [1, 2, 3]
    assert writers[-1] == "shard-sql-group"  # the drainer wrote them
    assert [e.payload["k"] for e in store.events("s")] == ["x", 0, 1, 2, 3]


def test_a_leader_interrupted_before_its_own_item_leaves_the_space_writable(
    store: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A caller handed the lead whose first batch (a submitted item ahead of its own) is
    interrupted (KeyboardInterrupt) gives the lead up for good: the space is not left busy with
    the lead passed to that caller again, and the next write goes through."""
    import shard_sql.group

    monkeypatch.setattr(shard_sql.group, "KEEP_LEADING", 0)  # the first leader leaves at once
    holder = node(store, "holder")
    holder.append("s", "t", {"k": "x"})
    write = GatedWrites(holder, interrupted={"k": "interrupted"})
    gate, entered = write.gate, write.entered
    group = GroupCommit(write, bound=1)
    results: dict[str, Any] = {}

    def call(key: str) -> None:
        try:
            results[key] = group.write("s", pending("t", {"k": key}))
        except BaseException as e:
            results[key] = e

    first = threading.Thread(target=call, args=("first",))
    first.start()
    assert entered.wait(30)
    told: list[Any] = []
    group.submit("s", [(pending("t", {"k": "interrupted"}), lambda ev, err: told.append(err))])
    second = threading.Thread(target=call, args=("second",))
    second.start()
    deadline = time.monotonic() + 10
    while len(group._queues["s"].slots) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    gate.set()
    first.join(30)
    second.join(30)
    assert isinstance(results["second"], KeyboardInterrupt)  # led, its batch was interrupted
    assert len(told) == 1 and isinstance(told[0], KeyboardInterrupt)
    last = threading.Thread(target=call, args=("last",), daemon=True)
    last.start()
    last.join(10)
    assert not last.is_alive(), "the space stayed busy: the lead went to a caller gone"
    assert [e.payload["k"] for e in store.events("s")] == ["x", "first", "last"]


def test_the_listener_writes_what_came_together_as_one_batch_on_its_thread(
    sqlite_store: Any,
) -> None:
    """One thread serves every forwarder of a node's Unix socket: requests that came while it
    wrote are read together and written as one batch, by that thread, and each is answered."""
    store = sqlite_store
    holder = node(store, "holder")
    holder.append("s", "t", {"n": 0})
    write = GatedWrites(holder)
    holder._group = GroupCommit(write)
    with holder:
        socks = [raw_connection(store, "holder") for _ in range(4)]
        socks[0].sendall(frame(request("s", pending("t", {"n": 1}, "k1"))))
        assert write.entered.wait(30)  # the listener's thread writes it, held at the gate
        for n, sock in enumerate(socks[1:], start=2):
            sock.sendall(frame(request("s", pending("t", {"n": n}, f"k{n}"))))
        write.gate.set()
        seqs = []
        for sock in socks:
            answer = read_frame(sock)
            assert answer is not None
            seqs.append(WRITTEN.unpack_from(answer)[1])
            sock.close()
    assert write.sizes == [1, 3], (write.sizes, write.writers)
    assert set(write.writers) == {"shard-sql-handoff-holder"}
    assert seqs[0] == 1 and sorted(seqs[1:]) == [2, 3, 4]
    assert [e.payload["n"] for e in store.events("s")] == [0, 1, 2, 3, 4]


def test_a_reply_the_socket_cannot_take_at_once_shuts_the_connection() -> None:
    """The group commit's leader never waits on a forwarder that does not read its answers: a
    reply the socket does not take at once shuts that connection (the forwarder then takes the
    durable path with the same intent id), and the leader goes on."""
    from shard_sql.handoff import Channel
    from shard_sql.handoff_listener import Reply

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    ours.setblocking(False)
    filled = 0
    for size in (1024, 1):  # a forwarder that sent, and never read what it was answered
        with contextlib.suppress(BlockingIOError):
            while True:
                filled += ours.send(b"f" * size)
    ours.setblocking(True)
    reply = Reply(Channel(ours))
    done = threading.Event()
    body = b'{"ok": []}'
    t = threading.Thread(target=lambda: (reply.send(body), done.set()))
    t.start()
    assert done.wait(10), "the reply blocked on a peer that does not read"
    assert reply.told
    got = b""
    theirs.settimeout(10)
    while chunk := theirs.recv(65536):  # the end comes after what was in the buffer
        got += chunk
    assert got.startswith(b"f" * filled) and len(got) < filled + len(body)  # no whole answer
    ours.close()
    theirs.close()


@pytest.mark.parametrize("intent_id", ["fwd-1", 'a "quoted\\" id é'])
@pytest.mark.parametrize("position", [None, 7])
def test_a_request_and_its_answer_carry_every_field(intent_id: str, position: int | None) -> None:
    """A request gives the holder the forwarder's item as it was checked (its payload's text as
    is); an answer gives the forwarder the holder's event: names with quotes, backslashes and
    non-ASCII characters, a time to the microsecond (UTC, as a direct append returns it)."""
    from datetime import UTC, datetime

    from shard_sql.handoff_wire import answer_event, parse_request, written
    from shard_sql.values import Event

    item = pending('type "é\\', {"k": 'v "é', "n": [1.5, None, -2, 1e15]}, intent_id)
    space = 'space "é\\'
    assert parse_request(request(space, item)) == (space, item)
    assert parse_request(request(space, item))[1].payload_json == item.payload_json
    for at in (
        datetime(2026, 12, 7, 15, 0, 0, 123456, tzinfo=UTC),
        datetime(1970, 1, 1, tzinfo=UTC),
        datetime(8999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
    ):
        event = Event(space, 5, item.type, item.payload, at, 'node "é', 3, intent_id, position)
        got = answer_event(space, item, written(event))
        assert isinstance(got, Event)
        assert got == event and got.position == position
        assert got.recorded_at.tzinfo is UTC and got.recorded_at.utcoffset() == at.utcoffset()


def test_a_forwarded_event_is_the_event_a_read_gives_back(sqlite_store: Any) -> None:
    """What a forwarder returns from the holder's answer equals the event read back, field by
    field (position too), as a direct append's does."""
    store = sqlite_store
    holder = node(store, "holder")
    holder.append("s", "t", {"n": 0})
    with holder:
        fwd = node(store, "fwd")
        got = [fwd.append("s", "t", {"n": n, "é": [1.5, None]}) for n in (1, 2)]
        got.append(fwd.append("s", "u", {"n": 3}, intent_id="mine"))
        assert fwd.handoff_outcomes()["written"] == 3
    read = store.events("s")[1:]
    assert got == read
    for mine, back in zip(got, read, strict=True):
        for field in Event.__dataclass_fields__:
            assert getattr(mine, field) == getattr(back, field), field
        assert mine.recorded_at.tzinfo == back.recorded_at.tzinfo
    assert [e.intent_id for e in got][2] == "mine"
    assert got[0].intent_id != got[1].intent_id
    assert all(e.intent_id and e.intent_id.startswith("fwd-") for e in got[:2])


def test_an_idle_connection_its_holder_shut_is_replaced_before_anything_is_sent(
    sqlite_store: Any,
) -> None:
    """A forwarder reuses its idle connection without looking at it first: where its holder shut
    it meanwhile, the send fails before any request went through, and it sends on a new one."""
    store = sqlite_store
    holder = node(store, "holder")
    holder.append("s", "t", {"n": 0})
    with holder:
        fwd = node(store, "fwd")
        fwd.append("s", "t", {"n": 1})
        [listener] = holder._listeners
        with listener._guard:
            conns = list(listener._conns)
        assert len(conns) == 1
        conns[0].shutdown(socket.SHUT_RDWR)
        fwd.append("s", "t", {"n": 2})
        assert fwd.handoff_outcomes() == {
            "written": 2,
            "not_holder": 0,
            "unreachable": 0,
            "unknown": 0,
        }
    assert [e.payload["n"] for e in store.events("s")] == [0, 1, 2]


def test_a_channel_reads_messages_as_they_come() -> None:
    """A channel reads what came at once and keeps what is past the message: two messages in one
    send come out in turn, one sent in pieces whole, one cut short is `Malformed`."""
    from shard_sql.handoff import Channel, Malformed

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    channel = Channel(ours)
    theirs.sendall(frame(b'{"a": 1}') + frame(b'{"b": 2}'))
    assert channel.receive() == b'{"a": 1}'
    assert channel.has_more()
    assert channel.receive() == b'{"b": 2}'
    assert not channel.has_more()
    big = frame(json.dumps({"c": "x" * 200_000}).encode())
    sender = threading.Thread(target=lambda: [theirs.sendall(big[i : i + 3]) for i in (0, 3)])
    sender.start()
    sender.join(10)
    threading.Thread(target=lambda: theirs.sendall(big[6:])).start()
    assert channel.receive() == big[4:]
    theirs.sendall(frame(b'{"d": 4}')[:7])
    theirs.close()
    with pytest.raises(Malformed):
        channel.receive()
    assert channel.receive() is None  # a clean end after it
    ours.close()
