"""The floor under the direct hand-off: a bare Unix-socket ping-pong between Python processes, no
database, no JSON, nothing of shard_sql. A server process answers each message on one thread
for all its connections (epoll, as a holder's listener does); each client sends a message of a
hand-off request's size and waits for an answer of a written event's size, one at a time.

Two figures, measured in the same run as the rows they bound (`process_rows`):

- the round trip p50 of one client: a forwarded append costs at least this plus the holder's
  write, so a forwarded p50 within 2x a direct one needs it under the direct append's p50;
- the messages/s of 4 clients to one server: 4 processes appending through one holder exchange
  as many messages as they append events, so their total is bounded by it.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import selectors
import socket
import statistics
import struct
import tempfile
import time
from typing import Any

CTX = multiprocessing.get_context("spawn")
HEADER = struct.Struct(">I")
REQUEST = b"x" * 160
"""About the bytes of the benchmarks' hand-off request (space, type, intent id, payload)."""
ANSWER = b"y" * 70
"""About the bytes of the answer for a written event."""


def _exactly(sock: socket.socket, n: int) -> bytes:
    data = sock.recv(n)
    while len(data) < n:
        more = sock.recv(n - len(data))
        if not more:
            return b""
        data += more
    return data


def _server(path: str, ready: Any, stop: Any) -> None:
    """One thread waits on the socket and every connection at once (epoll) and answers each
    message that came, as a holder's listener does."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(16)
    server.setblocking(False)
    selector = selectors.DefaultSelector()
    selector.register(server, selectors.EVENT_READ)
    answer = HEADER.pack(len(ANSWER)) + ANSWER
    rest: dict[socket.socket, bytes] = {}
    ready.set()
    while not stop.is_set():
        for key, _ in selector.select(0.1):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            if sock is server:
                with contextlib.suppress(BlockingIOError):
                    while True:
                        conn, _ = server.accept()
                        conn.setblocking(True)
                        selector.register(conn, selectors.EVENT_READ)
                        rest[conn] = b""
                continue
            data = sock.recv(65536)
            if not data:
                selector.unregister(sock)
                del rest[sock]
                sock.close()
                continue
            data = rest[sock] + data
            whole = 0
            while len(data) >= HEADER.size:
                end = HEADER.size + HEADER.unpack_from(data)[0]
                if len(data) < end:
                    break
                data = data[end:]
                whole += 1
            rest[sock] = data
            if whole:
                sock.sendall(answer * whole)
    server.close()


def _client(path: str, count: int, go: Any, out: Any) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    message = HEADER.pack(len(REQUEST)) + REQUEST
    clock = time.perf_counter
    for _ in range(50):  # warm: the server's thread, the caches
        sock.sendall(message)
        _exactly(sock, HEADER.unpack(_exactly(sock, HEADER.size))[0])
    go.wait(60)
    rtt = []
    t0 = time.monotonic()
    for _ in range(count):
        a = clock()
        sock.sendall(message)
        _exactly(sock, HEADER.unpack(_exactly(sock, HEADER.size))[0])
        rtt.append(clock() - a)
    out.put((t0, time.monotonic(), statistics.median(rtt)))
    sock.close()


def ping_pong(clients: int, count: int) -> tuple[float, float]:
    """`clients` processes exchanging `count` messages each with one server process: the total
    messages/s and the median round trip in microseconds."""
    path = os.path.join(tempfile.mkdtemp(prefix="shard-bare-"), "s.sock")
    ready, stop, go, out = CTX.Event(), CTX.Event(), CTX.Event(), CTX.Queue()
    server = CTX.Process(target=_server, args=(path, ready, stop))
    server.start()
    procs: list[Any] = []
    try:
        if not ready.wait(60):
            raise RuntimeError("the bare socket server did not start")
        procs = [CTX.Process(target=_client, args=(path, count, go, out)) for _ in range(clients)]
        for p in procs:
            p.start()
        time.sleep(0.3)  # every client connected and warm
        go.set()
        spans = [out.get(timeout=120) for _ in procs]
    finally:
        stop.set()
        for p in [*procs, server]:
            p.join(30)
            if p.is_alive():
                p.kill()
        os.unlink(path)
        os.rmdir(os.path.dirname(path))
    seconds = max(s[1] for s in spans) - min(s[0] for s in spans)
    return clients * count / seconds, statistics.median(s[2] for s in spans) * 1e6
