"""The direct hand-off over TCP, for forwarders on other hosts: only where a deployment asks.

Off by default: nothing listens on a network address. A deployment that wants it gives every
node the same shared secret (`handoff_secret=`, else `$SHARD_SQL_HANDOFF_SECRET_FILE`, a file
holding it, else `$SHARD_SQL_HANDOFF_SECRET`), and the nodes that should listen an address
(`handoff_listen="host:port"`, else `$SHARD_SQL_HANDOFF_LISTEN`). A listener without a secret,
or a secret under `MIN_SECRET` bytes, is refused (`InvalidEvent`).

Where forwarders find a holder: its node id, read from the lease, carries the address it is
reached at, `<name>@<host>:<port>` (a listening node must be named so, the port its listener's).
No record, no schema change, the same on every backend.

On connect, both ends prove they know the secret (HMAC-SHA256 over two fresh nonces, each
end's proof bound to its role), before the forwarder sends anything: a holder never writes for
a stranger, a forwarder never hands its intent to an impostor. A wrong proof or a malformed
handshake closes the connection; the forwarder then takes the durable path. Every message after
is sealed with a key of that session (`SealedChannel`): one altered, injected or replayed
closes the connection. The traffic is not encrypted (docs/leases.md).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import socket
from collections.abc import Mapping
from typing import Any

from shard_sql.errors import InvalidEvent
from shard_sql.handoff import (
    MAX_MESSAGE,
    Channel,
    Endpoints,
    Malformed,
    frame,
    read_message,
)
from shard_sql.handoff_listener import BACKLOG, CHECK_EVERY, BaseListener, Listener, Submit

LISTEN_ENV = "SHARD_SQL_HANDOFF_LISTEN"
SECRET_ENV = "SHARD_SQL_HANDOFF_SECRET"
SECRET_FILE_ENV = "SHARD_SQL_HANDOFF_SECRET_FILE"
MIN_SECRET = 16
"""Bytes: the shortest shared secret accepted."""
HANDSHAKE_TIMEOUT = 5.0
"""Seconds a holder waits for a connected client's proof (one that never speaks is closed)."""
HANDSHAKE_MAX = 512
"""Bytes: the largest handshake message (anything longer closes the connection)."""
PROTOCOL = "shard-sql-handoff-tcp/1"
NONCE = 32
SEAL = 32
"""Bytes: the HMAC-SHA256 that seals each message after the handshake."""
log = logging.getLogger("shard_sql.handoff")


class Secret:
    """The shared secret: never shown (repr, str, errors, logs)."""

    __slots__ = ("_key",)

    def __init__(self, value: str | bytes) -> None:
        key = value.encode("utf-8") if isinstance(value, str) else bytes(value)
        if len(key) < MIN_SECRET:
            raise InvalidEvent(
                "handoff_secret", f"a shared secret needs at least {MIN_SECRET} bytes"
            )
        self._key = key

    def proof(self, role: bytes, server_nonce: bytes, client_nonce: bytes) -> bytes:
        """HMAC-SHA256 over the protocol, the prover's role and both nonces (fixed sizes)."""
        message = b"%s\0%s\0%s%s" % (PROTOCOL.encode(), role, server_nonce, client_nonce)
        return hmac.new(self._key, message, hashlib.sha256).digest()

    def __repr__(self) -> str:
        return "Secret(<hidden>)"

    __str__ = __repr__


def parse_address(text: str, field: str = "handoff_listen") -> tuple[str, int]:
    """`host:port` (`[v6]:port`) as (host, port); `InvalidEvent` otherwise."""
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidEvent(field, f"{text!r} is not host:port")
    return host, int(port)


def advertised(node_id: str) -> tuple[str, int] | None:
    """The address in a node id `<name>@<host>:<port>`; None when it carries none."""
    name, at, address = node_id.rpartition("@")
    if not at or not name:
        return None
    try:
        return parse_address(address, "node_id")
    except InvalidEvent:
        return None


def _secret_from(environ: Mapping[str, str]) -> bytes | None:
    path = environ.get(SECRET_FILE_ENV)
    if path:
        try:
            with open(path, "rb") as f:
                return f.read().rstrip(b"\r\n")
        except OSError as e:
            raise InvalidEvent("handoff_secret", f"${SECRET_FILE_ENV}: {e.strerror}") from None
    text = environ.get(SECRET_ENV)
    return text.encode("utf-8") if text else None


class NetworkHandoff:
    """A node's network hand-off: the shared secret, and the address it listens on, if any."""

    def __init__(self, secret: Secret, listen: tuple[str, int] | None = None) -> None:
        self.secret, self.listen = secret, listen

    @classmethod
    def configure(
        cls,
        listen: str | None,
        secret: str | bytes | None,
        environ: Mapping[str, str] = os.environ,
    ) -> NetworkHandoff | None:
        """From the arguments, else the environment; None when no secret is given (then
        nothing goes over the network). `InvalidEvent` for a listener without a secret."""
        listen = listen if listen is not None else environ.get(LISTEN_ENV) or None
        key = secret if secret is not None else _secret_from(environ)
        if key is None:
            if listen is not None:
                raise InvalidEvent(
                    "handoff_listen",
                    f"a network listener needs a shared secret (handoff_secret=, "
                    f"${SECRET_FILE_ENV} or ${SECRET_ENV})",
                )
            return None
        return cls(Secret(key), None if listen is None else parse_address(listen))

    def __repr__(self) -> str:
        return f"NetworkHandoff(listen={self.listen!r}, secret=<hidden>)"

    def listener(self, node_id: str, submit: Submit) -> TcpListener | None:
        """Node `node_id`'s listener (not started); None when this node does not listen.
        `InvalidEvent` when its id does not say where it listens."""
        if self.listen is None:
            return None
        where = advertised(node_id)
        if where is None or where[1] != self.listen[1]:
            raise InvalidEvent(
                "node_id",
                f"{node_id!r} listens for hand-offs on port {self.listen[1]}, and forwarders "
                f"find it by its id: name it '<name>@<host>:{self.listen[1]}' (the host "
                "forwarders reach it at)",
            )
        return TcpListener(self.listen, self.secret, node_id, submit)

    def dial(self, holder: str, timeout: float) -> Channel | None:
        """An authenticated connection to the holder named `holder`; None when its id carries
        no address, nobody answers there, or the answer is not the secret's."""
        where = advertised(holder)
        if where is None:
            return None
        try:
            sock = socket.create_connection(where, timeout=timeout)
        except OSError as e:
            log.info("hand-off to %s: cannot connect over the network: %s", holder, e)
            return None
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            channel = client_handshake(sock, self.secret)
            if channel is not None:
                return channel
            log.warning("hand-off to %s refused: it does not know the shared secret", holder)
        except (OSError, Malformed) as e:
            log.info("hand-off to %s: handshake failed: %s", holder, e)
        sock.close()
        return None


# -- the handshake -----------------------------------------------------------------------------


def _send(sock: socket.socket, message: dict[str, str]) -> None:
    Channel(sock).send(json.dumps(message).encode())


def _field(message: Any, keys: set[str], key: str) -> str:
    """`message[key]` when `message` has exactly `keys`, each a string; else `Malformed`."""
    if not isinstance(message, dict) or set(message) != keys:
        raise Malformed("not a handshake message")
    if not all(isinstance(value, str) for value in message.values()):
        raise Malformed("not a handshake message")
    value: str = message[key]
    return value


def _nonce(text: str) -> bytes:
    try:
        nonce = bytes.fromhex(text)
    except ValueError:
        raise Malformed("a nonce that is not hex") from None
    if len(nonce) != NONCE:
        raise Malformed("a nonce of the wrong size")
    return nonce


def _same(text: str, proof: bytes) -> bool:
    return hmac.compare_digest(text.encode("utf-8", "surrogatepass"), proof.hex().encode())


def client_handshake(sock: socket.socket, secret: Secret) -> SealedChannel | None:
    """The forwarder's side: the sealed connection once the holder proved it knows the secret;
    None when it did not (or closed: it did not take our proof)."""
    hello = read_message(sock, HANDSHAKE_MAX)
    if _field(hello, {"hello", "nonce"}, "hello") != PROTOCOL:
        raise Malformed("another protocol")
    server_nonce, client_nonce = _nonce(hello["nonce"]), os.urandom(NONCE)
    proof = secret.proof(b"client", server_nonce, client_nonce)
    _send(sock, {"nonce": client_nonce.hex(), "proof": proof.hex()})
    answer = read_message(sock, HANDSHAKE_MAX)
    if answer is None:
        return None
    mine = _field(answer, {"proof"}, "proof")
    if not _same(mine, secret.proof(b"server", server_nonce, client_nonce)):
        return None
    return SealedChannel(sock, secret.proof(b"session", server_nonce, client_nonce), b"client")


def server_handshake(sock: socket.socket, secret: Secret) -> SealedChannel | None:
    """The holder's side: the sealed connection once the client proved it knows the secret
    (then this end proves it back); None when it did not."""
    server_nonce = os.urandom(NONCE)
    _send(sock, {"hello": PROTOCOL, "nonce": server_nonce.hex()})
    answer = read_message(sock, HANDSHAKE_MAX)
    if answer is None:
        return None
    client_nonce = _nonce(_field(answer, {"nonce", "proof"}, "nonce"))
    if not _same(answer["proof"], secret.proof(b"client", server_nonce, client_nonce)):
        return None
    _send(sock, {"proof": secret.proof(b"server", server_nonce, client_nonce).hex()})
    return SealedChannel(sock, secret.proof(b"session", server_nonce, client_nonce), b"server")


class SealedChannel(Channel):
    """A network connection's messages after the handshake, each sealed with an HMAC-SHA256 of
    the session's key (from the secret and both nonces) over its sender's role, its number in
    that direction and its bytes: a message altered, injected, replayed, reordered or sent back
    to its sender is refused (`Malformed`: the connection is closed). Not encrypted."""

    __slots__ = ("_in", "_key", "_out", "_received", "_sent")

    SENDS_FAIL_WHEN_CLOSED = False
    """A send to a peer that closed may succeed (TCP): an idle connection is looked at first."""
    ANSWER_SPIN = 0.0
    """The holder may be on another host: an answer takes a network round trip, so the
    forwarder sleeps in the receive at once."""

    def __init__(self, sock: socket.socket, key: bytes, role: bytes) -> None:
        super().__init__(sock)
        self._key, self._out = key, role
        self._in = b"server" if role == b"client" else b"client"
        self._sent = self._received = 0

    def _seal(self, role: bytes, number: int, body: bytes) -> bytes:
        message = b"%s\0%s%s" % (role, number.to_bytes(8, "big"), body)
        return hmac.new(self._key, message, hashlib.sha256).digest()

    def pack(self, body: bytes) -> bytes:
        seal = self._seal(self._out, self._sent, body)
        self._sent += 1
        return frame(seal + body)

    def receive(self) -> bytes | None:
        sealed = self.read_frame(MAX_MESSAGE + SEAL)
        if sealed is None:
            return None
        seal, body = sealed[:SEAL], sealed[SEAL:]
        if not hmac.compare_digest(seal, self._seal(self._in, self._received, body)):
            raise Malformed("a message without the session's seal")
        self._received += 1
        return body


# -- the holder's side -------------------------------------------------------------------------


class TcpListener(BaseListener):
    """Node `node_id` listening at `address` for forwarders that know `secret`."""

    def __init__(
        self, address: tuple[str, int], secret: Secret, node_id: str, submit: Submit
    ) -> None:
        super().__init__(node_id, submit)
        self.address, self._secret = address, secret

    def _bind(self) -> bool:
        host, port = self.address
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        server = socket.socket(family, socket.SOCK_STREAM)
        try:
            server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            server.bind((host, port))
            server.listen(BACKLOG)
            server.settimeout(CHECK_EVERY)
        except OSError:
            server.close()
            raise
        self._server = server
        return True

    def _admitted(self, conn: socket.socket) -> Channel | None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.settimeout(HANDSHAKE_TIMEOUT)
        channel = server_handshake(conn, self._secret)
        if channel is None:
            log.warning(
                "node %s: a network hand-off without the shared secret refused", self.node_id
            )
        return channel


def start_listeners(
    endpoints: Endpoints | None, network: NetworkHandoff | None, node_id: str, submit: Submit
) -> list[BaseListener]:
    """Node `node_id`'s listeners, started: its Unix socket in `endpoints`, and on the network
    when configured so; one that cannot listen is left out (its forwarders take the durable
    path). `InvalidEvent` when the node should listen on the network but its id says nowhere."""
    tcp = None if network is None else network.listener(node_id, submit)
    made: list[BaseListener] = [] if endpoints is None else [Listener(endpoints, node_id, submit)]
    if tcp is not None:
        made.append(tcp)
    return [listener for listener in made if listener.start()]
