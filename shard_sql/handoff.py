"""The direct hand-off: a forwarder on the holder's host gives it an append over a Unix socket.

Each node serving as a context manager listens on `<directory>/<sha256(node_id)[:32]>.sock`,
where the directory is the store's (`HandoffSite.handoff_dir`: beside a SQLite file, in a git
directory, a per-user runtime directory for PostgreSQL). A forwarder knows the holder's id from
the lease, so it finds the socket without any record. Only the holder's event write is durable:
the forwarder acknowledges nothing before the event is written, and when the outcome is unknown
it sends the same intent id along the durable path (docs/leases.md gives the whole argument).

Security: the directory is the user's own (mode 0700, checked, else no hand-off), the socket
0600, and both ends check the peer's uid (SO_PEERCRED, Linux). Nothing listens on a network
address unless a deployment configures one, with a shared secret (`shard_sql.handoff_tcp`). A
message is a 4-byte big-endian length and a body of at most `MAX_MESSAGE` bytes (a request and
its answer: `shard_sql.handoff_wire`); a malformed or oversized one closes the connection and
writes nothing.

This module holds the framing, the directories and the forwarder's side; the holder's side
(`Listener`) is `shard_sql.handoff_listener`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import itertools
import json
import logging
import os
import select
import socket
import stat
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

from shard_sql.handoff_wire import NOT_HOLDER as NOT_HOLDER
from shard_sql.handoff_wire import UNKNOWN as UNKNOWN
from shard_sql.handoff_wire import Malformed as Malformed
from shard_sql.handoff_wire import answer_event, request
from shard_sql.validation import MAX_PAYLOAD_BYTES, Pending
from shard_sql.values import Event

MAX_MESSAGE = MAX_PAYLOAD_BYTES + 16 * 1024
"""Bytes: the largest message either side accepts (a payload at its limit, and the rest)."""
HANDOFF_TIMEOUT = 1.0
"""Seconds a forwarder waits for the holder's answer before it takes the durable path (a holder
frozen, or too busy): the outcome is then unknown, and the same intent id goes the durable way."""
UNREACHABLE_FOR = 1.0
"""Seconds a forwarder takes the durable path to a holder it could not reach (no socket, a
refused connection, a timeout) before it tries the socket again."""
MAX_PATH = 100
"""Bytes: a longer socket path (AF_UNIX allows 107) is reached through /proc/self/fd/N/."""
HEADER = struct.Struct(">I")
READ_AHEAD = 64 * 1024
"""Bytes a channel asks for at once (a message of the hand-off is most often far smaller)."""
TIMEVAL = struct.Struct("@ll")
KERNEL_TIMEOUTS = sys.platform.startswith("linux")
DONTWAIT = int(getattr(socket, "MSG_DONTWAIT", 0))
"""Plain ints: an enum of flags costs 6k instructions per `|`."""
PEEK = int(socket.MSG_PEEK) | DONTWAIT
NOSIGNAL = int(getattr(socket, "MSG_NOSIGNAL", 0))
UNREACHABLE = "unreachable"
"""Nothing was sent: no listener, refused, no permission."""
ANSWER_SPIN = 300e-6
"""Seconds a forwarder on a Unix socket polls for its answer, giving up its CPU between polls,
before it sleeps in the receive: an answer comes in ~60 us of the holder's work, and waking a
process that slept costs more than that on a virtual machine (docs/leases.md)."""
log = logging.getLogger("shard_sql.handoff")


# -- directories -----------------------------------------------------------------------------


def private_dir(path: str) -> str | None:
    """`path`, created mode 0700 if missing, when it is a directory of this user that nobody
    else may enter; else None (the hand-off is then off: forwarders take the durable path)."""
    try:
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, 0o700)
        st = os.lstat(path)
    except OSError as e:
        log.info("no direct hand-off: cannot make %s: %s", path, e)
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        log.warning("no direct hand-off: %s is not a private directory of this user", path)
        return None
    return os.path.abspath(path)


def runtime_dir(key: str) -> str | None:
    """A private directory for the store named by `key` (a server and database, no secret):
    under $SHARD_SQL_HANDOFF_DIR if set, else $XDG_RUNTIME_DIR/shard-sql, else
    <tmp>/shard-sql-<uid>; named by a hash of `key`."""
    base = os.environ.get("SHARD_SQL_HANDOFF_DIR")
    if not base:
        xdg = os.environ.get("XDG_RUNTIME_DIR")
        if xdg:
            base = os.path.join(xdg, "shard-sql")
        else:
            base = os.path.join(tempfile.gettempdir(), f"shard-sql-{os.geteuid()}")
    if private_dir(base) is None:
        return None
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:24]
    return private_dir(os.path.join(base, digest))


def socket_name(node_id: str) -> str:
    """The socket file of node `node_id` in the store's hand-off directory."""
    return hashlib.sha256(node_id.encode("utf-8", "surrogatepass")).hexdigest()[:32] + ".sock"


class Endpoints:
    """The sockets of one store's hand-off directory, by node id."""

    def __init__(self, directory: str) -> None:
        self.dir = directory
        self._fd: int | None = None
        self._guard = threading.Lock()

    def path(self, node_id: str) -> str:
        """The socket's file path (for stat, unlink)."""
        return os.path.join(self.dir, socket_name(node_id))

    def address(self, node_id: str) -> str:
        """The address to bind or connect: the path, or through an open descriptor of the
        directory when the path is too long for AF_UNIX."""
        path = self.path(node_id)
        if len(os.fsencode(path)) <= MAX_PATH or not sys.platform.startswith("linux"):
            return path
        with self._guard:
            if self._fd is None:
                self._fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        return f"/proc/self/fd/{self._fd}/{socket_name(node_id)}"


def peer_uid_ok(sock: socket.socket) -> bool:
    """Whether the peer runs as this process's user (Linux: SO_PEERCRED; elsewhere the modes of
    the directory and the socket are the check)."""
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None:
        return True
    creds = sock.getsockopt(socket.SOL_SOCKET, option, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return bool(uid == os.geteuid())


# -- messages --------------------------------------------------------------------------------


def frame(body: bytes) -> bytes:
    return HEADER.pack(len(body)) + body


def read_message(sock: socket.socket, limit: int = MAX_MESSAGE) -> Any:
    """One message's JSON value (the network hand-off's handshake); None at a clean end of the
    connection; `Malformed` for a message over `limit` bytes, cut short, or not JSON."""
    body = read_frame(sock, limit)
    return None if body is None else decode(body)


def read_frame(sock: socket.socket, limit: int = MAX_MESSAGE) -> bytes | None:
    """One message's bytes; None at a clean end of the connection; `Malformed` for a message
    over `limit` bytes or cut short."""
    head = _read_exactly(sock, HEADER.size, eof_ok=True)
    if head is None:
        return None
    (size,) = HEADER.unpack(head)
    if size > limit:
        raise Malformed(f"a message of {size} bytes")
    body = _read_exactly(sock, size, eof_ok=False)
    assert body is not None
    return body


def decode(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as e:
        raise Malformed(f"not JSON: {e}") from None


class Channel:
    """One connection's messages, as they are: on a Unix socket, where the kernel vouches for
    the peer (a network connection seals them: `shard_sql.handoff_tcp`)."""

    __slots__ = ("_more", "sock", "timeout")

    SENDS_FAIL_WHEN_CLOSED = True
    """Whether a send on the connection fails (EPIPE) once its peer closed it or shut it for
    reading, and then delivered no whole message: so on a Unix socket. A forwarder then reuses
    an idle connection without looking at it first (`HandoffClient._send`)."""
    ANSWER_SPIN = ANSWER_SPIN
    """Seconds a forwarder polls for an answer before it sleeps (`poll_briefly`): the holder is
    on this host."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._more = b""
        """Bytes received past the last message (a peer that sends before it is answered)."""
        self.timeout: float | None = None
        """The forwarder's: the timeout its socket's sends and receives have (`wait_at_most`)."""

    def wait_at_most(self, timeout: float) -> None:
        """Sends and receives fail after `timeout` seconds (the forwarder's side). On Linux by
        the kernel (SO_RCVTIMEO, SO_SNDTIMEO: a timed-out call raises `BlockingIOError`) on a
        socket left blocking, rather than by Python's socket timeout, which polls before every
        send and receive (two system calls instead of one each)."""
        if timeout == self.timeout:
            return
        if KERNEL_TIMEOUTS:
            self.sock.settimeout(None)
            micros = max(int(timeout * 1e6), 1)  # 0 would be no timeout at all
            value = TIMEVAL.pack(micros // 1_000_000, micros % 1_000_000)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)
        else:
            self.sock.settimeout(timeout)
        self.timeout = timeout

    def pack(self, body: bytes) -> bytes:
        """The bytes that carry `body` on this connection (each message is packed once)."""
        return HEADER.pack(len(body)) + body  # `frame`, one call less

    def send(self, body: bytes) -> None:
        self.sock.sendall(self.pack(body), NOSIGNAL)

    def receive(self) -> bytes | None:
        """The next message's body; None at a clean end of the connection; `Malformed` for
        one over `MAX_MESSAGE` bytes or cut short."""
        return self.read_frame(MAX_MESSAGE)

    def read_frame(self, limit: int) -> bytes | None:
        """The next message's bytes (as `read_frame`), most often in one system call: what the
        peer sent is read at once, header and body, and what came past the message is kept for
        the next."""
        data = self._more or self.sock.recv(READ_AHEAD)
        self._more = b""
        if len(data) >= HEADER.size:
            (size,) = HEADER.unpack_from(data)
            if size > limit:
                raise Malformed(f"a message of {size} bytes")
            end = HEADER.size + size
            if len(data) >= end:
                self._more = data[end:]
                return data[HEADER.size : end]
        elif not data:
            return None
        return self._read_rest(data, limit)

    def _read_rest(self, data: bytes, limit: int) -> bytes:
        """A message whose first `data` came: the rest, read as it comes."""
        buffer = bytearray(data)
        size = -1
        while True:
            if size < 0 and len(buffer) >= HEADER.size:
                (size,) = HEADER.unpack_from(buffer)
                if size > limit:
                    raise Malformed(f"a message of {size} bytes")
            end = HEADER.size + size
            if size >= 0 and len(buffer) >= end:
                self._more = bytes(buffer[end:])
                return bytes(buffer[HEADER.size : end])
            more = self.sock.recv(max(READ_AHEAD, end - len(buffer)))
            if not more:
                raise Malformed("the connection ended inside a message")
            buffer += more

    def poll_briefly(self, seconds: float) -> None:
        """Look for the next message's bytes without sleeping, giving up the CPU between looks
        (`sched_yield`: a process waiting for it runs), for up to `seconds`; what came (or the
        end) is read by `receive`. Nothing where there is no MSG_DONTWAIT."""
        if self._more or not DONTWAIT:
            return
        recv, yield_cpu, clock = self.sock.recv, os.sched_yield, time.perf_counter
        deadline = clock() + seconds
        while True:
            try:
                data = recv(READ_AHEAD, DONTWAIT)
            except BlockingIOError:
                if clock() >= deadline:
                    return
                yield_cpu()
                continue
            self._more = data  # b"": the end, which the receive meets again
            return

    def has_more(self) -> bool:
        """Whether bytes past the last message came (nothing our peers send unasked)."""
        return bool(self._more)


def _read_exactly(sock: socket.socket, n: int, *, eof_ok: bool) -> bytes | None:
    data = sock.recv(n)
    if len(data) == n:
        return data
    if not data and eof_ok:
        return None
    chunks = [data]
    got = len(data)
    while got < n:
        if not data:
            raise Malformed("the connection ended inside a message")
        data = sock.recv(n - got)
        chunks.append(data)
        got += len(data)
    return b"".join(chunks)


# -- the forwarder's side --------------------------------------------------------------------

_ids: tuple[str, itertools.count[int]] = ("", itertools.count())


def _new_id_prefix() -> None:
    global _ids
    _ids = (f"fwd-{os.urandom(16).hex()}-", itertools.count(1))


_new_id_prefix()
os.register_at_fork(after_in_child=_new_id_prefix)


def forwarded_intent_id() -> str:
    """An intent id for a handed-over append its caller gave none: `fwd-`, 128 random bits of
    this process (drawn again in a forked child) and a counter, in hex. Unique across processes
    and restarts as a random id per append is, for a fifth of its cost (no system call)."""
    prefix, counter = _ids
    return f"{prefix}{next(counter):x}"


Dial = Callable[[str, float], Channel | None]
"""Connect to a holder by its id over the network (`shard_sql.handoff_tcp`): an authenticated
connection, or None (not reachable that way: no address, no secret, refused, an impostor)."""


class HandoffClient:
    """A forwarder's connections to the holders of one store: through the store's directory
    (`endpoints`), else over the network (`dial`), kept open between appends (one per thread at
    a time)."""

    def __init__(self, endpoints: Endpoints | None, dial: Dial | None = None) -> None:
        self.endpoints = endpoints
        self._dial = dial
        self._idle: dict[str, list[Channel]] = {}
        self._unreachable: dict[str, float] = {}
        self._guard = threading.Lock()
        self.outcomes: dict[str, int] = {"written": 0, NOT_HOLDER: 0, UNREACHABLE: 0, UNKNOWN: 0}
        """How many hand-offs ended how (for tests and benchmarks; counted without a lock)."""
        self.answer_time = 0.0
        """Seconds an answer took lately (a moving average): a forwarder polls for its answer
        (`ANSWER_SPIN`) only while answers come within the poll, as after SQLite NORMAL's
        commits; one that waits on fsyncs (SQLite FULL) would burn the CPU its holder needs."""

    def send(self, holder: str, space: str, item: Pending, timeout: float) -> Event | str:
        """Hand `item` (its intent id set) to `holder`: the written event, or `NOT_HOLDER`,
        `UNREACHABLE` (nothing sent), `UNKNOWN` (sent, no answer within `timeout`)."""
        outcome = self._send(holder, space, item, timeout)
        self.outcomes["written" if isinstance(outcome, Event) else outcome] += 1
        return outcome

    def _send(self, holder: str, space: str, item: Pending, timeout: float) -> Event | str:
        """Hand `item` (its intent id set) to `holder`: the written event, or `NOT_HOLDER`,
        `UNREACHABLE` (nothing sent), `UNKNOWN` (sent, no answer within `timeout`)."""
        assert item.intent_id is not None
        until = self._unreachable.get(holder)
        if until is not None and time.monotonic() < until:
            return UNREACHABLE
        body = request(space, item)
        if len(body) > MAX_MESSAGE:
            return UNREACHABLE
        while True:
            channel, reused = self._connection(holder, timeout)
            if channel is None:
                return UNREACHABLE
            try:
                channel.wait_at_most(timeout)
                sent_at = time.perf_counter()
                channel.send(body)
                break
            except BrokenPipeError:
                channel.sock.close()
                if not reused:
                    return UNKNOWN
                # An idle connection its holder closed (it stopped, or shut it): the send
                # failed before a whole request went through (`SENDS_FAIL_WHEN_CLOSED`).
            except OSError as e:
                return self._lost(holder, channel, e)
        try:
            spin = channel.ANSWER_SPIN
            if spin and self.answer_time < spin:
                channel.poll_briefly(spin)
            answer = channel.receive()
        except (OSError, Malformed) as e:
            return self._lost(holder, channel, e)
        self.answer_time += (time.perf_counter() - sent_at - self.answer_time) * 0.25
        if answer is None:
            channel.sock.close()
            return UNKNOWN
        with self._guard:
            self._idle.setdefault(holder, []).append(channel)
        return answer_event(space, item, answer)

    def _lost(self, holder: str, channel: Channel, error: Exception) -> str:
        """A connection that failed after a request may have been sent: closed, `UNKNOWN`."""
        channel.sock.close()
        if isinstance(error, TimeoutError | BlockingIOError):  # Python's timeout, the kernel's
            self._avoid(holder)
        return UNKNOWN

    def _avoid(self, holder: str) -> None:
        self._unreachable[holder] = time.monotonic() + UNREACHABLE_FOR

    def _connection(self, holder: str, timeout: float) -> tuple[Channel | None, bool]:
        """An idle connection to `holder` (one with bytes nobody asked for is dropped, and, where
        a send to a closed one may succeed, one closed by its end), else a new one: its Unix
        socket, else over the network; None when it cannot be reached. And whether it was idle."""
        while True:
            with self._guard:
                idle = self._idle.get(holder)
                channel = idle.pop() if idle else None
            if channel is None:
                break
            if not channel.has_more() and (
                channel.SENDS_FAIL_WHEN_CLOSED or not _ended(channel.sock)
            ):
                return channel, True
            channel.sock.close()
        sock = None if self.endpoints is None else self._connect_socket(holder, timeout)
        channel = None if sock is None else Channel(sock)
        if channel is None and self._dial is not None:
            channel = self._dial(holder, timeout)
        if channel is None:
            self._avoid(holder)
        return channel, False

    def _connect_socket(self, holder: str, timeout: float) -> socket.socket | None:
        """A connection to `holder`'s Unix socket; None when there is none, or not its user's."""
        assert self.endpoints is not None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(self.endpoints.address(holder))
            if peer_uid_ok(sock):
                return sock
            log.warning("hand-off to %s refused: its socket is another user's", holder)
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ECONNREFUSED):
                log.info("hand-off to %s: cannot connect: %s", holder, e)
        sock.close()
        return None

    def close(self) -> None:
        with self._guard:
            idle, self._idle = self._idle, {}
        for channels in idle.values():
            for channel in channels:
                channel.sock.close()


def _ended(sock: socket.socket) -> bool:
    """Whether an idle network connection has news (its end closed it): it then cannot be used.
    One look that does not wait and takes nothing (MSG_PEEK, MSG_DONTWAIT)."""
    if sock.gettimeout() is not None:  # not yet made to wait by the kernel: Python would poll
        poller = select.poll()
        poller.register(sock, select.POLLIN | select.POLLHUP)
        return bool(poller.poll(0))
    try:
        sock.recv(1, PEEK)  # data nobody asked for, or the end (b""): either way unusable
    except BlockingIOError:
        return False
    except OSError:
        return True
    return True
