"""The holder's side of the direct hand-off (`shard_sql.handoff`): one listening socket per node;
each request is written through the node's group commit.

A Unix socket (`Listener`) is served by one thread for all its forwarders: it waits on every
connection at once (epoll), reads each request that came, and submits them together, per space:
while nobody writes the space, that thread writes them itself, as one batch, and answers them
right after the commit. No request crosses to another thread on its way in, and the more that
come while a batch is written, the larger the next one. `BaseListener` is what a Unix socket and
a network one (`shard_sql.handoff_tcp`, a thread per connection: its handshake waits) share."""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from shard_sql.errors import IntentConflict, InvalidEvent
from shard_sql.group import NotHolder
from shard_sql.group import Reply as Told
from shard_sql.handoff import (
    DONTWAIT,
    HEADER,
    MAX_MESSAGE,
    NOSIGNAL,
    READ_AHEAD,
    Channel,
    Endpoints,
    peer_uid_ok,
)
from shard_sql.handoff_wire import NOT_HOLDER, Malformed, parse_request, refusal, written
from shard_sql.validation import Pending
from shard_sql.values import Event

MAX_CONNECTIONS = 128
"""Forwarders one node serves at once; more are closed at once (they take the durable path)."""
CHECK_EVERY = 0.5
"""Seconds: how often the listener looks that its socket file is still its own (deleted or
replaced: it binds a new one)."""
BACKLOG = 128
LISTEN_SPIN = 200e-6
"""Seconds the listener polls its connections without sleeping after it submitted requests,
while requests lately followed within that, giving up its CPU between polls: a forwarder just
answered sends its next request in ~30 us, and waking a thread that slept in epoll costs more
than that on a virtual machine (docs/leases.md)."""
log = logging.getLogger("shard_sql.handoff")

REPLY_FLAGS = DONTWAIT | NOSIGNAL
"""A plain int (the flags' enum costs 6k instructions per `|`). Where there is no MSG_DONTWAIT,
a reply's send may wait on a forwarder that does not read."""


class Reply:
    """The answer to one request, sent by the thread that wrote its item (the group commit's
    leader, which calls it with the event or the error) right after the commit, without
    blocking: a forwarder reads its answer before it sends again, so the socket takes it at
    once; one that does not (it sends without reading, or went away) has its connection shut,
    so that no forwarder can stall the writes of others."""

    __slots__ = ("_channel", "told")

    def __init__(self, channel: Channel) -> None:
        self._channel = channel
        self.told = False

    def __call__(self, event: Event | None, error: BaseException | None) -> None:
        if error is None and event is not None:
            try:
                body = written(event)
            except Exception as e:  # a value the answer cannot carry: the forwarder looks
                body = answer(None, e)  # for the event through the durable path
        else:
            body = answer(event, error)
        self.send(body)

    def send(self, body: bytes) -> None:
        self.told = True
        data = self._channel.pack(body)
        sock = self._channel.sock
        try:
            sent = sock.send(data, REPLY_FLAGS)
        except OSError:  # BlockingIOError too
            sent = -1
        if sent != len(data):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # its thread ends the connection


Submit = Callable[[str, list[tuple[Pending, Told]]], None]
"""Write handed-over items of one space, telling each item's reply its event or error once,
from whichever thread writes it; it may return before (`GroupCommit.submit`)."""


class BaseListener:
    """Node `node_id`'s listening socket (made by `_bind`); `submit` writes what forwarders
    hand over, once `_admitted` let them in."""

    def __init__(self, node_id: str, submit: Submit) -> None:
        self.node_id, self._submit = node_id, submit
        self._server: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._guard = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> bool:
        """Listen; False (forwarders then take the durable path) when the socket cannot be
        made, or a live process already listens under this node id."""
        try:
            if not self._bind():
                return False
        except OSError as e:
            log.warning("node %s: no direct hand-off: %s", self.node_id, e)
            return False
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._accept_loop, name=f"shard-sql-handoff-{self.node_id}", daemon=True
        )
        self._thread.start()
        return True

    def _bind(self) -> bool:
        """A new listening socket in `self._server` (closing the old one); False when another
        live process listens there."""
        raise NotImplementedError

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            server = self._server
            assert server is not None
            try:
                conn, _ = server.accept()
            except TimeoutError:
                self._check_socket_file()
                continue
            except OSError:
                if self._stop.is_set():
                    return
                self._check_socket_file()
                continue
            self._admit(conn)

    def _check_socket_file(self) -> None:
        """Every `CHECK_EVERY` seconds without a connection: look after the endpoint."""

    def _admit(self, conn: socket.socket) -> None:
        with self._guard:
            if len(self._conns) >= MAX_CONNECTIONS or self._stop.is_set():
                conn.close()
                return
            self._conns.add(conn)
        threading.Thread(
            target=self._serve, args=(conn,), name=f"shard-sql-handoff-{self.node_id}", daemon=True
        ).start()

    def _serve(self, conn: socket.socket) -> None:
        """Answer one forwarder's requests in turn until it hangs up. Anything malformed closes
        the connection before anything is written."""
        try:
            channel = self._admitted(conn)
            if channel is None:
                return
            conn.settimeout(None)
            reply: Reply | None = None
            while not self._stop.is_set():
                message = channel.receive()
                if message is None:
                    return
                if reply is not None and not reply.told:
                    raise Malformed("a request before the answer to the one before")
                space, item = parse_request(message)
                reply = Reply(channel)
                self._submit(space, [(item, reply)])  # answered by whoever writes it
        except Malformed as e:
            log.warning("node %s: malformed hand-off closed: %s", self.node_id, e)
        except OSError as e:  # the forwarder went away (killed, timed out): nothing to tell
            log.debug("node %s: hand-off connection ended: %s", self.node_id, e)
        finally:
            with self._guard:
                self._conns.discard(conn)
            conn.close()

    def _admitted(self, conn: socket.socket) -> Channel | None:
        """The connection's messages, when its peer may hand over appends; None: it is closed."""
        raise NotImplementedError

    def _remove_endpoint(self) -> None:
        """At the stop: what else than the socket to clean up."""

    def stop(self) -> None:
        """Stop listening, remove the endpoint (if still this node's), end connections."""
        self._stop.set()
        if self._server is not None:
            with contextlib.suppress(OSError):
                self._server.shutdown(socket.SHUT_RDWR)  # wakes the accept (Linux)
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._server is not None:
            self._remove_endpoint()
            self._server.close()
            self._server = None
        with self._guard:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


class Listener(BaseListener):
    """Node `node_id`'s Unix socket in `endpoints`: only processes of this user get in."""

    def __init__(self, endpoints: Endpoints, node_id: str, submit: Submit) -> None:
        super().__init__(node_id, submit)
        self.endpoints = endpoints
        self.path = endpoints.path(node_id)
        self._inode = 0

    def _bind(self) -> bool:
        """A new listening socket at the node's path; a stale file (a dead process's: its
        connection refused) is replaced."""
        address = self.endpoints.address(self.node_id)
        if os.path.lexists(self.path):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            probe.settimeout(0.2)
            try:
                probe.connect(address)
            except OSError:
                os.unlink(self.path)  # nobody answers: a dead holder's file
            else:
                log.warning("node %s: another live process listens as this node", self.node_id)
                return False
            finally:
                probe.close()
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            server.bind(address)
            os.chmod(self.path, 0o600)
            server.listen(BACKLOG)
            server.setblocking(False)  # its one thread waits on it and every connection
            inode = os.stat(self.path).st_ino
        except OSError:
            server.close()
            raise
        old, self._server, self._inode = self._server, server, inode
        if old is not None:
            old.close()
        return True

    def _still_mine(self) -> bool:
        try:
            return os.stat(self.path).st_ino == self._inode
        except OSError:
            return False

    def _check_socket_file(self) -> None:
        """Deleted or replaced under us (an operator, a cleanup): bind anew, so forwarders find
        this node again (until then they took the durable path)."""
        if self._stop.is_set() or self._still_mine():
            return
        try:
            self._bind()
        except OSError as e:
            log.warning("node %s: cannot bind its hand-off socket again: %s", self.node_id, e)
            self._stop.wait(CHECK_EVERY)

    def _admitted(self, conn: socket.socket) -> Channel | None:
        if peer_uid_ok(conn):
            return Channel(conn)
        log.warning("node %s: hand-off from another user refused", self.node_id)
        return None

    def _remove_endpoint(self) -> None:
        if self._still_mine():
            with contextlib.suppress(OSError):
                os.unlink(self.path)

    # -- one thread for every connection ---------------------------------------------------

    def _accept_loop(self) -> None:
        """Until stopped: wait on the socket and every connection at once; accept, read what
        came on each, submit the requests read (`_submit_all`), look after the socket file."""
        selector = selectors.DefaultSelector()
        server = self._server
        assert server is not None
        selector.register(server, selectors.EVENT_READ)
        check_at = time.monotonic() + CHECK_EVERY
        try:
            poll_until = submitted = gap = 0.0
            while not self._stop.is_set():
                work: dict[str, list[tuple[Pending, Told]]] = {}
                ready = _ready(selector, poll_until)
                if submitted:  # how soon requests follow the last ones (a moving average)
                    waited = min(time.perf_counter() - submitted, 10 * LISTEN_SPIN)
                    gap += (waited - gap) * 0.25
                    submitted = 0.0
                for key, _ in ready:
                    if key.data is None:
                        self._accept(selector, server)
                    elif not self._read(key.data, work):
                        self._close(selector, key.data)
                if work:
                    self._submit_all(work)
                    submitted = time.perf_counter()
                    # Poll only while requests follow within the poll (SQLite NORMAL's quick
                    # writes); behind writes that wait for the disk (SQLite FULL) or a server
                    # it would burn the CPU others need for nothing.
                    poll_until = submitted + LISTEN_SPIN if gap < LISTEN_SPIN else 0.0
                if time.monotonic() >= check_at and not self._stop.is_set():
                    check_at = time.monotonic() + CHECK_EVERY
                    if not self._still_mine():
                        selector.unregister(server)
                        self._check_socket_file()  # a new socket, when it can
                        server = self._server
                        assert server is not None
                        selector.register(server, selectors.EVENT_READ)
        finally:
            for key in list(selector.get_map().values()):
                if key.data is not None:
                    self._close(selector, key.data)
            selector.close()

    def _accept(self, selector: selectors.BaseSelector, server: socket.socket) -> None:
        """Every connection waiting (the socket does not block)."""
        while True:
            try:
                conn, _ = server.accept()
            except OSError:  # none left (or the stop's shutdown)
                return
            try:
                self._register(selector, conn)
            except OSError as e:  # gone before it was let in
                log.debug("node %s: hand-off connection ended: %s", self.node_id, e)
                with self._guard:
                    self._conns.discard(conn)
                conn.close()

    def _register(self, selector: selectors.BaseSelector, conn: socket.socket) -> None:
        with self._guard:
            full = len(self._conns) >= MAX_CONNECTIONS or self._stop.is_set()
            if not full:
                self._conns.add(conn)
        channel = None if full else self._admitted(conn)
        if channel is None:
            with self._guard:
                self._conns.discard(conn)
            conn.close()
            return
        conn.settimeout(None)  # blocking: read only when something came, so never waits
        selector.register(conn, selectors.EVENT_READ, _Connection(channel))

    def _read(self, conn: _Connection, work: dict[str, list[tuple[Pending, Told]]]) -> bool:
        """What came on `conn`: each whole request, checked, goes to `work` (a message cut
        short waits for its rest); False when the connection ends: its forwarder hung up, or
        sent something malformed (then nothing it sent in this read is written)."""
        try:
            data = conn.channel.sock.recv(READ_AHEAD)
        except OSError as e:  # the forwarder went away: nothing to tell
            log.debug("node %s: hand-off connection ended: %s", self.node_id, e)
            return False
        if not data:
            if conn.rest:
                log.warning("node %s: malformed hand-off closed: cut short", self.node_id)
            return False
        if conn.rest:
            data = conn.rest + data
        read: list[tuple[str, Pending, Reply]] = []
        start = 0
        try:
            while len(data) - start >= HEADER.size:
                (size,) = HEADER.unpack_from(data, start)
                if size > MAX_MESSAGE:
                    raise Malformed(f"a message of {size} bytes")
                end = start + HEADER.size + size
                if len(data) < end:
                    break
                if conn.reply is not None and not conn.reply.told:
                    raise Malformed("a request before the answer to the one before")
                space, item = parse_request(data[start + HEADER.size : end])
                conn.reply = reply = Reply(conn.channel)
                read.append((space, item, reply))
                start = end
        except Malformed as e:
            log.warning("node %s: malformed hand-off closed: %s", self.node_id, e)
            return False
        conn.rest = data[start:]
        for space, item, reply in read:
            entries = work.get(space)
            if entries is None:
                work[space] = [(item, reply)]
            else:
                entries.append((item, reply))
        return True

    def _submit_all(self, work: dict[str, list[tuple[Pending, Told]]]) -> None:
        """The requests read, per space, to the group commit (written by this thread when
        nobody writes the space, else queued for who does; answered by whoever writes them)."""
        for space, entries in work.items():
            try:
                self._submit(space, entries)
            except Exception as e:  # a bug: the forwarders time out and take the durable path
                log.warning("node %s: hand-off of %r failed: %s", self.node_id, space, e)

    def _close(self, selector: selectors.BaseSelector, conn: _Connection) -> None:
        sock = conn.channel.sock
        with contextlib.suppress(KeyError, ValueError):
            selector.unregister(sock)
        with self._guard:
            self._conns.discard(sock)
        sock.close()


def _ready(selector: selectors.BaseSelector, poll_until: float) -> list[Any]:
    """What is ready: looked for without sleeping, giving up the CPU between looks
    (`sched_yield`: a forwarder on this CPU runs), until `poll_until` (`LISTEN_SPIN` after
    requests came), then waited for up to `CHECK_EVERY`."""
    clock = time.perf_counter
    while clock() < poll_until:
        ready = selector.select(0)
        if ready:
            return ready
        os.sched_yield()
    return selector.select(CHECK_EVERY)


class _Connection:
    """A forwarder's connection to the Unix listener: the bytes of a message not yet whole, and
    the reply to its last request (answered before it may send the next)."""

    __slots__ = ("channel", "reply", "rest")

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.rest = b""
        self.reply: Reply | None = None


def answer(event: Event | None, error: BaseException | None) -> bytes:
    """The answer to a handed-over item: its event, or what its write raised (`NotHolder`: this
    node does not hold its space). The forwarder validated the item already: an error here is
    the holder's write's (an intent id written with other content, a store failure)."""
    if error is None:
        assert event is not None
        return written(event)
    if isinstance(error, NotHolder):
        return refusal(NOT_HOLDER)
    if isinstance(error, IntentConflict):
        return refusal("conflict", seq=error.seq)
    if isinstance(error, InvalidEvent):
        return refusal("invalid", field=error.field, message=str(error))
    # the outcome is unknown to the forwarder: it takes the durable path
    log.warning("hand-off write failed: %s", error)
    return refusal("unavailable", message=str(error))
