"""The holder's side of the direct hand-off (`shard_sql.handoff`): one listening socket per node,
a thread per connected forwarder; each request is written through the node's group commit.
`BaseListener` is what a Unix socket (`Listener`) and a network one (`shard_sql.handoff_tcp`)
share: the accept loop, the connections, the requests."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from collections.abc import Callable

from shard_sql.errors import IntentConflict, InvalidEvent
from shard_sql.group import NotHolder
from shard_sql.handoff import (
    NOSIGNAL,
    NOT_HOLDER,
    Channel,
    Endpoints,
    Malformed,
    parse_request,
    peer_uid_ok,
    refusal,
    written,
)
from shard_sql.validation import Pending
from shard_sql.values import Event

MAX_CONNECTIONS = 128
"""Forwarders one node serves at once; more are closed at once (they take the durable path)."""
CHECK_EVERY = 0.5
"""Seconds: how often the listener looks that its socket file is still its own (deleted or
replaced: it binds a new one)."""
BACKLOG = 128
log = logging.getLogger("shard_sql.handoff")

REPLY_FLAGS = int(getattr(socket, "MSG_DONTWAIT", 0) | NOSIGNAL)
"""A plain int (the flags' enum costs 6k instructions per `|`). Where there is no MSG_DONTWAIT,
a reply's send may wait on a forwarder that does not read."""


class Reply:
    """The answer to one request, sent by the thread that wrote its item (the group commit's
    leader) right after the commit, without blocking: a forwarder reads its answer before it
    sends again, so the socket takes it at once; one that does not (it sends without reading,
    or went away) has its connection shut, so that no forwarder can stall the writes of
    others."""

    __slots__ = ("_channel", "told")

    def __init__(self, channel: Channel) -> None:
        self._channel = channel
        self.told = False

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


Submit = Callable[[str, Pending, Callable[[bytes], None]], None]
"""Write one handed-over item, telling its reply the answer's JSON body once, from whichever
thread writes it; it may return before (`GroupCommit.submit`)."""


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
                self._submit(space, item, reply.send)  # answered by whoever writes it
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
            server.settimeout(CHECK_EVERY)
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
