"""The direct hand-off over TCP (shard_sql.handoff_tcp): only where a deployment asks, only with
the shared secret, both ends proven before anything is handed over.

Real sockets on 127.0.0.1, real SQLite files and PostgreSQL databases, holders and forwarders in
other processes where the point is two processes. The Unix hand-off is turned off in these tests
(a hand-off directory others may enter), so what is handed over goes over TCP or durably.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from shard_sql import AppendAuthority, InvalidEvent, LeaseRegistry
from shard_sql import handoff_tcp as tcp
from shard_sql.handoff import MAX_MESSAGE, frame, read_frame, read_message
from shard_sql.handoff_wire import WRITTEN, request
from shard_sql.testing.processes import CTX, check_log, stop_all
from shard_sql.urls import open_store
from shard_sql.validation import pending

SECRET = "correct horse battery staple"
OTHER = "incorrect horse battery staple"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def without_unix_handoff(tmp_path: Path) -> Path:
    """A directory others may enter: as a hand-off directory, it turns the Unix hand-off off."""
    open_dir = tmp_path / "open"
    open_dir.mkdir(exist_ok=True)
    os.chmod(open_dir, 0o755)
    return open_dir


@pytest.fixture(
    params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)],
)
def url(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A store whose Unix hand-off is off for every process."""
    open_dir = without_unix_handoff(tmp_path)
    if request.param == "sqlite":
        os.symlink(open_dir, tmp_path / "shard.db.handoff")
        return f"sqlite:///{tmp_path}/shard.db"
    monkeypatch.setenv("SHARD_SQL_HANDOFF_DIR", str(open_dir))
    pg: str = request.getfixturevalue("pg_migrated_url")
    return pg


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[Any]:
    """For what the backend does not change (the wire)."""
    os.symlink(without_unix_handoff(tmp_path), tmp_path / "shard.db.handoff")
    s: Any = open_store(f"sqlite:///{tmp_path}/shard.db")
    assert s.handoff_dir() is None
    yield s
    s.close()


@pytest.fixture(autouse=True)
def no_network_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (tcp.LISTEN_ENV, tcp.SECRET_ENV, tcp.SECRET_FILE_ENV):
        monkeypatch.delenv(name, raising=False)


def node(store: Any, name: str, **kw: Any) -> AppendAuthority:
    return AppendAuthority(name, store, LeaseRegistry(store), forward_timeout=30, **kw)


def listening_holder(store: Any, secret: str = SECRET) -> AppendAuthority:
    port = free_port()
    holder = node(
        store, f"holder@127.0.0.1:{port}", handoff_listen=f"127.0.0.1:{port}", handoff_secret=secret
    )
    holder.append("s", "t", {"n": 0})
    return holder


def address(holder: AppendAuthority) -> tuple[str, int]:
    where = tcp.advertised(holder.node_id)
    assert where is not None
    return where


def closed_by_peer(sock: socket.socket) -> bool:
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
    except ConnectionResetError:
        return True


def authenticated(where: tuple[str, int], secret: str = SECRET) -> tcp.SealedChannel:
    sock = socket.create_connection(where, timeout=30)
    channel = tcp.client_handshake(sock, tcp.Secret(secret))
    assert channel is not None
    return channel


# -- configuration -------------------------------------------------------------------------------


def test_configuration_refusals_and_the_secret_never_shown(
    sqlite_store: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(InvalidEvent, match="needs a shared secret") as e:
        node(sqlite_store, "a@127.0.0.1:7000", handoff_listen="127.0.0.1:7000")
    assert e.value.field == "handoff_listen"
    with pytest.raises(InvalidEvent, match="at least 16 bytes") as e:
        node(sqlite_store, "a", handoff_secret="short-secret")
    assert "short-secret" not in str(e.value)
    with pytest.raises(InvalidEvent, match="not host:port"):
        node(sqlite_store, "a", handoff_listen="127.0.0.1", handoff_secret=SECRET)
    monkeypatch.setenv(tcp.LISTEN_ENV, "127.0.0.1:7000")
    with pytest.raises(InvalidEvent, match="needs a shared secret"):
        node(sqlite_store, "a")
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET + "\n")
    monkeypatch.setenv(tcp.SECRET_FILE_ENV, str(secret_file))
    configured = tcp.NetworkHandoff.configure(None, None)
    assert configured is not None and configured.listen == ("127.0.0.1", 7000)
    assert SECRET not in repr(configured) and SECRET not in repr(configured.secret)
    assert configured.secret.proof(b"x", b"", b"") == tcp.Secret(SECRET).proof(b"x", b"", b"")
    # A node that should listen but whose id does not say where: refused when it starts.
    unnamed = node(sqlite_store, "a")
    with pytest.raises(InvalidEvent, match="name it") as e:
        unnamed.__enter__()
    assert e.value.field == "node_id"
    assert tcp.advertised("a@[::1]:7000") == ("::1", 7000)
    assert tcp.advertised("a@host") is None and tcp.advertised("@host:1") is None


def tcp_listeners_of(pid: int) -> set[str]:
    """The inodes of the TCP sockets process `pid` listens on (/proc/net/tcp, tcp6)."""
    mine = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            mine.add(target[len("socket:[") : -1])
    listening = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] == "0A":  # LISTEN
                    listening.add(fields[9])
    return mine & listening


def serve_in_process(url: str, node_id: str, ready: Any, stop: Any) -> None:
    """A holder configured from the environment only, serving until `stop`."""
    store: Any = open_store(url)
    holder = AppendAuthority(node_id, store, LeaseRegistry(store), ttl_seconds=30)
    holder.append("s", "t", {"by": "holder"}, intent_id="holder-0")
    with holder:
        ready.set()
        stop.wait(120)
    store.close()


def test_no_network_listener_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    default = f"sqlite:///{tmp_path}/default.db"  # the Unix hand-off on: a listener, not TCP
    port = free_port()
    for env, node_id, expected in [
        ({}, "holder", 0),
        ({tcp.LISTEN_ENV: f"127.0.0.1:{port}", tcp.SECRET_ENV: SECRET}, f"h@127.0.0.1:{port}", 1),
    ]:
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        ready, stop = CTX.Event(), CTX.Event()
        proc = CTX.Process(target=serve_in_process, args=(default, node_id, ready, stop))
        proc.start()
        try:
            assert ready.wait(60)
            assert proc.pid is not None
            assert len(tcp_listeners_of(proc.pid)) == expected, env
        finally:
            stop.set()
            stop_all([proc])


# -- forwarded over TCP between processes --------------------------------------------------------


def forward_in_process(url: str, space: str, count: int, secret: str, out: Any) -> None:
    """A forwarder with the secret (an argument), appending `count` events one at a time."""
    store: Any = open_store(url)
    fwd = AppendAuthority(
        "fwd", store, LeaseRegistry(store), forward_timeout=30, handoff_secret=secret
    )
    acks = []
    for i in range(count):
        e = fwd.append(space, "t", {"i": i}, intent_id=f"fwd-{i}")
        acks.append((e.intent_id, e.seq, e.writer, e.generation))
    out.put((acks, fwd.handoff_outcomes()))
    store.close()


@pytest.mark.slow
def test_forwarded_over_tcp_between_processes(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = free_port()
    holder_id = f"holder@127.0.0.1:{port}"
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET)
    monkeypatch.setenv(tcp.LISTEN_ENV, f"127.0.0.1:{port}")  # the holder: from the environment
    monkeypatch.setenv(tcp.SECRET_FILE_ENV, str(secret_file))
    ready, stop, out = CTX.Event(), CTX.Event(), CTX.Queue()
    holder = CTX.Process(target=serve_in_process, args=(url, holder_id, ready, stop))
    holder.start()
    procs = [holder]
    try:
        assert ready.wait(60)
        monkeypatch.delenv(tcp.LISTEN_ENV)
        monkeypatch.delenv(tcp.SECRET_FILE_ENV)
        fwd = CTX.Process(target=forward_in_process, args=(url, "s", 30, SECRET, out))
        fwd.start()
        procs.append(fwd)
        acks, outcomes = out.get(timeout=60)
    finally:
        stop.set()
        stop_all(procs)
    assert outcomes["written"] == 30 and outcomes["unreachable"] == 0
    store: Any = open_store(url)
    try:
        check_log(store, "s", [("holder-0", 0, holder_id, 1), *acks])
        assert {e.writer for e in store.events("s")} == {holder_id}
        assert store.pending_intents("s", limit=10) == []
    finally:
        store.close()


# -- the secret ----------------------------------------------------------------------------------


def test_a_wrong_secret_takes_the_durable_path(
    sqlite_store: Any, caplog: pytest.LogCaptureFixture
) -> None:
    store = sqlite_store
    caplog.set_level(logging.DEBUG)
    holder = listening_holder(store)
    with holder:
        # A raw client with the wrong secret: the holder closes without its proof.
        sock = socket.create_connection(address(holder), timeout=30)
        assert tcp.client_handshake(sock, tcp.Secret(OTHER)) is None
        sock.close()
        assert store.head("s") == 1
        stranger = node(store, "stranger", handoff_secret=OTHER)
        e = stranger.append("s", "t", {"n": 1})
        assert e.writer == holder.node_id  # applied from the durable intent
        assert stranger.handoff_outcomes()["unreachable"] == 1
        assert stranger.handoff_outcomes()["written"] == 0
    assert [e.payload["n"] for e in store.events("s")] == [0, 1]
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "without the shared secret" in logged
    assert SECRET not in logged and OTHER not in logged


def test_a_forwarder_never_hands_its_intent_to_an_impostor(sqlite_store: Any) -> None:
    """A listener at the holder's address that cannot prove the secret gets the forwarder's
    proof, and nothing more: the forwarder takes the durable path."""
    store = sqlite_store
    server = socket.create_server(("127.0.0.1", 0))
    imp_id = f"imp@127.0.0.1:{server.getsockname()[1]}"
    received: list[bytes] = []

    def impostor() -> None:
        conn, _ = server.accept()
        conn.settimeout(30)
        conn.sendall(frame(json.dumps({"hello": tcp.PROTOCOL, "nonce": "ab" * 32}).encode()))
        read_message(conn)  # the forwarder's proof
        conn.sendall(frame(json.dumps({"proof": "00" * 32}).encode()))
        received.append(conn.recv(65536))  # b"": the forwarder hung up, having sent nothing
        conn.close()

    t = threading.Thread(target=impostor)
    t.start()
    LeaseRegistry(store).acquire("s", imp_id, 0.5)
    fwd = node(store, "fwd", handoff_secret=SECRET)
    e = fwd.append("s", "t", {"n": 0})
    t.join(30)
    server.close()
    assert received == [b""]
    assert fwd.handoff_outcomes()["unreachable"] == 1
    assert e.writer == "fwd"  # the impostor's lease lapsed: the forwarder took the space


# -- hostile clients -----------------------------------------------------------------------------


def _before_auth() -> list[bytes]:
    """What a client may send instead of its proof."""
    req = frame(request("s", pending("t", {"n": 9}, "early")))
    return [
        req,  # a request without a handshake
        frame(b"{not json"),
        frame(json.dumps({"nonce": "zz" * 32, "proof": "00" * 32}).encode()),
        frame(json.dumps({"nonce": "ab" * 8, "proof": "00" * 32}).encode()),
        frame(json.dumps({"nonce": "ab" * 32, "proof": 7}).encode()),
        frame(json.dumps({"nonce": "ab" * 32, "proof": "00" * 32, "x": "y"}).encode()),
        struct.pack(">I", tcp.HANDSHAKE_MAX + 1) + b"{}",
        struct.pack(">I", 64) + b'{"nonce": "ab',  # cut short
    ]


def _reflected(channel: tcp.SealedChannel) -> None:
    """A request answered, then the holder's own sealed answer sent back to it."""
    channel.send(request("s", pending("t", {"n": 1}, "once")))
    answer = read_frame(channel.sock)
    assert answer is not None
    channel.sock.sendall(frame(answer))


def _after_auth() -> list[Callable[[tcp.SealedChannel], None]]:
    """What an authenticated client, or someone in the middle without the key, may send."""
    good = {"space": "s", "type": "t", "intent_id": "x", "payload": {"n": 1}}
    req = request("s", pending("t", {"n": 9}, "injected"))
    return [
        lambda ch: ch.send(b"{not json"),
        lambda ch: ch.send(json.dumps(good).encode()),  # version 1's request
        lambda ch: ch.send(req.replace(b'{"n":9}', b'"text"')),
        lambda ch: ch.sock.sendall(frame(req)),  # unsealed: injected without the key
        lambda ch: ch.sock.sendall(frame(os.urandom(tcp.SEAL) + req)),  # a wrong seal
        _reflected,
        lambda ch: ch.sock.sendall(struct.pack(">I", MAX_MESSAGE + tcp.SEAL + 1) + b"{}"),
        lambda ch: ch.sock.sendall(frame(os.urandom(tcp.SEAL) + req)[:-3]),  # cut short
    ]


def test_hostile_messages_before_and_after_the_handshake_write_nothing(sqlite_store: Any) -> None:
    store = sqlite_store
    holder = listening_holder(store)
    with holder:
        where = address(holder)
        for n, raw in enumerate(_before_auth()):
            sock = socket.create_connection(where, timeout=30)
            assert isinstance(read_message(sock), dict)  # the hello
            with contextlib.suppress(OSError):  # the holder may have closed already
                sock.sendall(raw)
                sock.shutdown(socket.SHUT_WR)
            assert closed_by_peer(sock), n
            sock.close()
        for n, send in enumerate(_after_auth()):
            channel = authenticated(where)
            with contextlib.suppress(OSError):
                send(channel)
                channel.sock.shutdown(socket.SHUT_WR)
            assert closed_by_peer(channel.sock), n
            channel.sock.close()
        assert [e.intent_id for e in store.events("s")] == [None, "once"]
        channel = authenticated(where)  # still serving well-formed requests
        channel.send(request("s", pending("t", {"n": 2}, "good")))
        answer = channel.receive()
        assert answer is not None and WRITTEN.unpack_from(answer)[1] == 2
        channel.sock.close()
    assert [e.intent_id for e in store.events("s")] == [None, "once", "good"]


def test_a_client_that_never_speaks_blocks_nobody(
    sqlite_store: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tcp, "HANDSHAKE_TIMEOUT", 0.3)
    store = sqlite_store
    holder = listening_holder(store)
    with holder:
        silent = [socket.create_connection(address(holder), timeout=30) for _ in range(3)]
        fwd = node(store, "fwd", handoff_secret=SECRET)
        assert fwd.append("s", "t", {"n": 1}).writer == holder.node_id
        assert fwd.handoff_outcomes()["written"] == 1
        for sock in silent:  # the hello, then closed for want of a proof
            assert isinstance(read_message(sock), dict)
            assert closed_by_peer(sock)
            sock.close()
        assert fwd.append("s", "t", {"n": 2}).seq == 2
        assert fwd.handoff_outcomes()["written"] == 2
