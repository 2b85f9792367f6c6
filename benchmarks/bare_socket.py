"""The floor under the direct hand-off: a bare Unix-socket ping-pong between Python processes, no
database, no JSON, nothing of shard_sql. A server process answers each message on a thread of
its own per connection (as a holder's listener does); each client sends a message of a hand-off
request's size and waits for an answer of a written event's size, one at a time.

Two figures, measured in the same run as the rows they bound (`process_rows`):

- the round trip p50 of one client: a forwarded append costs at least this plus the holder's
  write, so a forwarded p50 within 2x a direct one needs it under the direct append's p50;
- the messages/s of 4 clients to one server: 4 processes appending through one holder exchange
  as many messages as they append events, so their total is bounded by it.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import statistics
import struct
import tempfile
import threading
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


def _serve(conn: socket.socket) -> None:
    answer = HEADER.pack(len(ANSWER)) + ANSWER
    with conn:
        while True:
            head = _exactly(conn, HEADER.size)
            if not head:
                return
            _exactly(conn, HEADER.unpack(head)[0])
            conn.sendall(answer)


def _server(path: str, ready: Any, stop: Any) -> None:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(16)
    server.settimeout(0.1)
    ready.set()
    while not stop.is_set():
        try:
            conn, _ = server.accept()
        except TimeoutError:
            continue
        conn.settimeout(None)
        threading.Thread(target=_serve, args=(conn,), daemon=True).start()
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
