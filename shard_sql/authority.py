"""The append authority: one writer per space, everyone else forwards to it.

A node writes where it holds the lease and forwards elsewhere: to a node of the same registry
directly, to a holder on the same host over its socket (`shard_sql.handoff`), else as a durable
intent in the store (`IntentQueue`) that the holder applies (`shard_sql.serving`). A holder
writes concurrent appends of a space together (`shard_sql.group`). docs/architecture.md and
docs/leases.md tell the whole story.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from datetime import datetime
from types import TracebackType
from typing import Any

from shard_sql.errors import IntentTimeout, InvalidEvent, LeaseHeld, SeqConflict, StaleLease
from shard_sql.group import GroupCommit, GroupStats, NotHolder, Reply, parallel_writers
from shard_sql.handoff import (
    HANDOFF_TIMEOUT,
    NOT_HOLDER,
    Endpoints,
    HandoffClient,
    forwarded_intent_id,
)
from shard_sql.handoff_listener import BaseListener
from shard_sql.handoff_tcp import NetworkHandoff, start_listeners
from shard_sql.leases import (
    LeaseRegistry,
    check_ttl,
    renewal_due,
    renewal_not_due_before,
)
from shard_sql.node_transaction import NodeTransaction
from shard_sql.ports import (
    BatchWriter,
    EventStore,
    FeedStore,
    HandoffSite,
    IntentInbox,
    IntentQueue,
    SpaceWakeups,
)
from shard_sql.serving import IntentServer
from shard_sql.store_base import check_same_intent
from shard_sql.validation import (
    Pending,
    check_space,
    check_stored_space,
    check_text,
    check_timeout,
    pending,
    with_intent_id,
)
from shard_sql.values import Event, Lease

MAX_CONFLICT_RETRIES = 5
LEASE_RECHECK = 0.05
"""Seconds: how often a forwarder waiting for its event looks at the space's lease again (a
holder that released or died is replaced by this node taking the lease)."""
BACKOFF_MAX = 0.05
"""Seconds: the longest pause between a forwarder's attempts."""
log = logging.getLogger("shard_sql.authority")


def _held_elsewhere(lease: Lease) -> LeaseHeld:
    e = LeaseHeld(lease)
    e.args = (
        f"{e}: a transaction writes only to spaces this node holds (a forwarded append is "
        "the holder's own transaction); append it after the block with node.append",
    )
    return e


# -- the nodes of each registry: the same process, reached by a direct hand-off --------------

_nodes_by_registry: weakref.WeakKeyDictionary[
    LeaseRegistry, weakref.WeakValueDictionary[str, AppendAuthority]
] = weakref.WeakKeyDictionary()
_nodes_lock = threading.Lock()


def _register(node: AppendAuthority) -> weakref.WeakValueDictionary[str, AppendAuthority]:
    """Add `node` to the nodes of its registry; return those (kept by the node: `_hand_over`
    looks there without the registry's look-up in a `WeakKeyDictionary`)."""
    with _nodes_lock:
        nodes = _nodes_by_registry.get(node.registry)
        if nodes is None:
            nodes = _nodes_by_registry[node.registry] = weakref.WeakValueDictionary()
        nodes[node.node_id] = node
        return nodes


class _ForwardedAppend:
    """One forwarded append: its item, deadline and back-off, and whether it is queued in the
    store (then when it looks at the space's lease again)."""

    def __init__(self, space: str, item: Pending, timeout: float) -> None:
        self.space, self.item, self.timeout = space, item, timeout
        self.deadline = time.monotonic() + timeout
        self.backoff = 0.001
        self.queued = False
        self.recheck_at = 0.0

    def expired(self) -> IntentTimeout:
        return IntentTimeout(
            f"space {self.space!r}: no holder wrote the append within "
            f"{self.timeout}s; retry with the same intent_id"
            + (f" ({self.item.intent_id})" if self.item.intent_id else "")
        )

    def remaining(self) -> float:
        """Seconds left; `IntentTimeout` when none."""
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise self.expired()
        return left


class AppendAuthority:
    """A node that appends to spaces: it writes where it holds the lease, forwards elsewhere.

    `node_id` must be unique among the nodes sharing the registry's lease store.
    Used as a context manager, it renews its leases and serves intents forwarded from other
    processes in a background thread until the block exits, then releases its leases; on a
    store with a hand-off directory it also listens there for forwarders on this host
    (`handoff=False`: it neither listens nor hands over; forwarding is then durable only).
    Across hosts only where a deployment asks (`shard_sql.handoff_tcp`): `handoff_secret`
    (else from the environment) lets it hand over on the network, `handoff_listen="host:port"`
    also listens there (its id then `<name>@<host>:<port>`).
    `transaction(connection)` writes to the spaces it holds inside a (host's) transaction.
    """

    def __init__(
        self,
        node_id: str,
        store: EventStore,
        registry: LeaseRegistry,
        *,
        ttl_seconds: float = 30.0,
        forward_timeout: float = 30.0,
        handoff: bool = True,
        handoff_listen: str | None = None,
        handoff_secret: str | bytes | None = None,
    ) -> None:
        self.node_id = check_text("node_id", node_id)
        self.ttl_seconds = check_ttl(ttl_seconds)
        if not isinstance(store, BatchWriter):
            raise InvalidEvent("store", f"{type(store).__name__} is not a shard_sql store")
        if not registry.fences(store):
            raise InvalidEvent("registry", "keeps its leases in another store than this one")
        self.store = store
        self.registry = registry
        self.forward_timeout = check_timeout(forward_timeout, "forward_timeout")
        self._writer: BatchWriter = store
        # Forwarding across processes needs the leases and the intents in one shared store.
        self._queue = store if isinstance(store, IntentQueue) and registry.store is store else None
        inbox = store if self._queue is not None and isinstance(store, IntentInbox) else None
        self._inbox = inbox
        wakeups = store if isinstance(store, SpaceWakeups) else None
        self._server = IntentServer(self, self._queue, inbox, wakeups)
        self._routes: dict[str, Lease] = {}
        """The latest lease of another node seen per space: where to forward, without a read."""
        self._leases: dict[str, Lease] = {}
        self._heads: dict[str, int] = {}
        self._renewals: dict[str, tuple[Lease, datetime]] = {}
        """Per space: its lease here, and a time before which its renewal is not due."""
        self._locks: dict[str, threading.RLock] = {}
        self._guard = threading.Lock()
        self._unwatch: Callable[[], None] | None = None
        self._group = GroupCommit(self._write_batch, writers=parallel_writers(store))
        network = NetworkHandoff.configure(handoff_listen, handoff_secret) if handoff else None
        self._network = network if self._queue is not None else None
        self._endpoints = self._handoff_endpoints() if handoff else None
        dial = None if self._network is None else self._network.dial
        routes = self._endpoints is not None or dial is not None
        self._client = HandoffClient(self._endpoints, dial) if routes else None
        self._listeners: list[BaseListener] = []
        self._peers = _register(self)

    def _handoff_endpoints(self) -> Endpoints | None:
        """The store's hand-off directory, when processes forward to each other through it."""
        if self._queue is None or not isinstance(self.store, HandoffSite):
            return None
        directory = self.store.handoff_dir()
        return None if directory is None else Endpoints(directory)

    # -- leases ------------------------------------------------------------------------------

    def acquire(self, space: str) -> Lease:
        """Take the space's lease; `LeaseHeld` while another node's lease is valid."""
        lease = self.registry.acquire(space, self.node_id, self.ttl_seconds)
        with self._lock(space):
            if self._leases.get(space, lease).generation != lease.generation:
                self._heads.pop(space, None)
            self._leases[space] = lease
        return lease

    def holds(self, space: str) -> bool:
        """True only while this node holds the space's valid lease."""
        cur = self.registry.current(space)
        return cur is not None and cur.holder == self.node_id

    def holds_locally(self, space: str) -> bool:
        """Whether this node believes it holds `space` (no read of the lease store)."""
        return space in self._leases

    def release(self, space: str) -> None:
        """Give up the space's lease so another node can acquire it at once."""
        check_stored_space(space)
        with self._lock(space):
            lease = self._leases.pop(space, None)
            self._heads.pop(space, None)
            self._renewals.pop(space, None)
            if lease is not None:
                self.registry.release(lease)

    def leases(self) -> list[Lease]:
        """The leases this node believes it holds."""
        with self._guard:
            return list(self._leases.values())

    def keep_leases(self) -> list[str]:
        """Renew the leases due, forget the lapsed and lost ones; return the spaces still held."""
        held = []
        for lease in self.leases():
            space = lease.space
            with self._lock(space):
                cur = self._leases.get(space)
                if cur is None:
                    continue
                now = self.registry.now()
                if not cur.valid_at(now):
                    self._forget_lease(space)
                    continue
                if renewal_due(cur, now, self.ttl_seconds):
                    try:
                        self._renew(space, cur)
                    except NotHolder:
                        continue
            held.append(space)
        return held

    def _renew(self, space: str, lease: Lease) -> Lease:
        try:
            lease = self.registry.renew(lease, ttl_seconds=self.ttl_seconds)
        except StaleLease:
            self._forget_lease(space)
            raise NotHolder(space) from None
        self._leases[space] = lease
        return lease

    def _forget_lease(self, space: str) -> None:
        self._leases.pop(space, None)
        self._heads.pop(space, None)
        self._renewals.pop(space, None)

    def _lock(self, space: str) -> threading.RLock:
        lock = self._locks.get(space)  # a dict read is atomic: no guard on the common path
        if lock is not None:
            return lock
        with self._guard:
            lock = self._locks.get(space)
            if lock is None:
                lock = self._locks[space] = threading.RLock()
            return lock

    # -- appending ---------------------------------------------------------------------------

    def append(
        self, space: str, type: str, payload: dict[str, Any], *, intent_id: str | None = None
    ) -> Event:
        """Append to `space` wherever its lease lives; return the written event.

        Raises `IntentTimeout` when no holder wrote it within `forward_timeout` seconds: the
        outcome is then unknown and a retry with the same `intent_id` is safe.
        """
        check_space(space)
        item = pending(type, payload, intent_id)
        if space in self._leases:
            # Held here: write at once, before the forwarding loop's set-up (its first round
            # would do the same), after a thread applying forwarded intents here, if any. The
            # lease's expiry is looked at under the space's lock (`_write_batch`).
            self._server.let_serving_finish(space)
            event = self._write_held(space, item)
            if event is not None:
                return event
        return self._forward(space, item)

    def _forward(self, space: str, item: Pending) -> Event:
        """Write where this node holds the lease (taking an unleased space), else hand `item`
        to the holder: directly in this process, else through the store's intents."""
        forwarded = _ForwardedAppend(space, item, self.forward_timeout)
        first = True
        while True:
            if forwarded.queued:
                event = self._forwarded_event(space, forwarded.item)
                if event is not None:
                    return event
                if self._waited_for_news(space, forwarded):
                    continue
            lease = self._leases.get(space)
            now = self.registry.now() if lease is not None else None
            if lease is not None and now is not None and now < lease.expires_at:
                # Once queued, with its intent id: the last holder may have written it already.
                event = self._write_held(space, forwarded.item)
            else:
                holder = self._holder(space, route_first=first, now=now)
                first = False
                if holder is None:  # taken by this node: write on the next attempt
                    continue
                event = self._hand_over(space, forwarded, holder)
            if event is not None:
                return event
            first = False
            self._pause(space, forwarded)

    def _write_held(self, space: str, item: Pending) -> Event | None:
        """Write `item` under this node's lease, with what else is queued for the space; None
        when it does not hold it (any more)."""
        try:
            event = self._group.write(space, item)
        except NotHolder:
            return None
        self._server.serve_now_and_then(space)
        return event

    def _holder(self, space: str, *, route_first: bool, now: datetime | None) -> Lease | None:
        """The lease of the node to forward to; None when this node just took the space (and
        applied what was forwarded to its predecessor). `route_first`: forward to where the
        lease was last seen, without a read: a wrong route costs a wait (the next attempt reads
        the lease), never safety (the holder's fence decides)."""
        route = self._routes.get(space) if route_first else None
        if route is not None and (now or self.registry.now()) < route.expires_at:
            return route
        cur = self.registry.current(space)
        if cur is not None and cur.holder != self.node_id:
            self._routes[space] = cur
            return cur
        self._routes.pop(space, None)
        try:
            self.acquire(space)
        except LeaseHeld as e:
            self._routes[space] = e.lease
            return e.lease
        self.serve(space)  # a new holder first applies what was forwarded to its predecessor
        return None

    def _hand_over(self, space: str, forwarded: _ForwardedAppend, holder: Lease) -> Event | None:
        """Give the item to `holder`: directly when it is a node of this registry (the event,
        or None when it no longer holds the space), else as a durable intent (None: wait)."""
        target = self._peers.get(holder.holder)  # the holder, if a node of this process
        if target is not None and target is not self:
            try:
                return target._group.write(space, forwarded.item)
            except NotHolder:
                return None
        if self._queue is None:
            raise LeaseHeld(holder)
        if forwarded.item.intent_id is None:
            forwarded.item = with_intent_id(forwarded.item, forwarded_intent_id())
        if not forwarded.queued and self._client is not None:
            # The holder's socket first. Unreachable, or no answer in time: the durable path,
            # with the same intent id (the holder may have written it: then that is found).
            timeout = min(HANDOFF_TIMEOUT, forwarded.remaining())
            sent = self._client.send(holder.holder, space, forwarded.item, timeout)
            if sent == NOT_HOLDER:
                return None
            if not isinstance(sent, str):
                return sent
        if not forwarded.queued:
            self._queue.put_intent(space, forwarded.item, holder=holder.holder)
            forwarded.queued = True
            forwarded.recheck_at = time.monotonic() + LEASE_RECHECK
        return None

    def _forwarded_event(self, space: str, item: Pending) -> Event | None:
        """The event written for a queued intent, if any."""
        assert self._queue is not None and item.intent_id is not None
        done, sure = None, False
        if self._inbox is not None:
            done, sure = self._inbox.awaited_event(space, item.intent_id)
        if done is None and not sure:
            done = self._queue.find_intent(space, item.intent_id)
        return None if done is None else check_same_intent(done, item)  # IntentConflict

    def _waited_for_news(self, space: str, forwarded: _ForwardedAppend) -> bool:
        """Until the lease is due for another look (every LEASE_RECHECK seconds, not at every
        wake-up: many forwarders, one space), wait on the store's news and return True; else
        set the next look and return False."""
        assert self._queue is not None
        now = time.monotonic()
        if now >= forwarded.recheck_at:
            forwarded.recheck_at = now + LEASE_RECHECK
            return False
        if now >= forwarded.deadline:
            raise forwarded.expired()
        self._queue.wait_for_change([space], min(forwarded.recheck_at, forwarded.deadline) - now)
        return True

    def _pause(self, space: str, forwarded: _ForwardedAppend) -> None:
        """Between two attempts: a queued intent waits on the store's news, others sleep."""
        left = forwarded.remaining()
        if forwarded.queued and self._queue is not None:
            self._queue.wait_for_change([space], min(BACKOFF_MAX, left))
        else:
            time.sleep(min(forwarded.backoff, left))
        forwarded.backoff = min(forwarded.backoff * 2, BACKOFF_MAX)

    def write_if_held(self, space: str, batch: list[Pending]) -> list[Event] | None:
        """Write `batch` under this node's lease; None when it does not hold the space."""
        try:
            return self._write_batch(space, batch)
        except NotHolder:
            return None

    def _write_batch(self, space: str, batch: list[Pending]) -> list[Event]:
        """Write fenced by this node's lease at the space's head (known here, else read),
        renewing the lease when due, re-reading the head after a write without the lease (a
        direct `store.append`); `NotHolder` when it does not hold the space."""
        lock = self._locks.get(space) or self._lock(space)
        lock.acquire()  # not `with`: 0.1 us less
        try:
            lease = self._leases.get(space)
            now = self.registry.now()
            if lease is None or not now < lease.expires_at:
                raise NotHolder(space)
            if self._renewal_due(space, lease, now):
                lease = self._renew(space, lease)
            heads, registry, writer = self._heads, self.registry, self._writer
            expected = -1
            for _ in range(MAX_CONFLICT_RETRIES):
                known = heads.get(space)
                expected = self.store.head(space) if known is None else known
                try:
                    events = registry.fenced_write(
                        writer, space, batch, expected_seq=expected, lease=lease
                    )
                except SeqConflict:
                    heads.pop(space, None)
                    continue
                except StaleLease:
                    self._forget_lease(space)
                    raise NotHolder(space) from None
                if events[0].seq == expected:
                    heads[space] = expected + len(events)
                return events
            raise SeqConflict(space, expected)
        finally:
            lock.release()

    def _renewal_due(self, space: str, lease: Lease, now: datetime) -> bool:
        """`renewal_due` for this node's `lease` on `space`, asked only once `now` is past a time
        before which it cannot be due (two comparisons per append instead of its arithmetic)."""
        known = self._renewals.get(space)
        if known is None or known[0] is not lease:
            known = self._renewals[space] = (lease, renewal_not_due_before(lease, self.ttl_seconds))
        return now >= known[1] and renewal_due(lease, now, self.ttl_seconds)

    # -- transactions (docs/embedding.md) ---------------------------------------------------

    def transaction(self, connection: object | None = None) -> NodeTransaction:
        """`store.transaction(connection)` whose `append` and `append_many` write to spaces this
        node holds, fenced by its leases: an unleased space is acquired first; a space another
        node holds raises `LeaseHeld` naming it (forwarding cannot join a transaction). See
        `NodeTransaction`. Needs leases kept in the store (`LeaseRegistry(store)`)."""
        store = self.store
        if not isinstance(store, FeedStore):
            raise InvalidEvent("store", f"{type(store).__name__} has no transactions")
        if self.registry.store is not store:
            raise InvalidEvent(
                "registry",
                "keeps its leases outside the store, which then cannot check a transaction's "
                "fences in the transaction: use LeaseRegistry(store)",
            )
        return NodeTransaction(self, store.transaction(connection))

    def lease_for_transaction(self, space: str) -> Lease:
        """This node's lease on `space` to fence a transaction's write: the one it holds (no
        round trip, no renewal), else a new grant; `LeaseHeld` while another node holds it."""
        check_space(space)
        lease = self._leases.get(space)
        if lease is not None and self.registry.now() < lease.expires_at:
            return lease
        cur = self.registry.current(space)
        if cur is not None and cur.holder != self.node_id:
            self._routes[space] = cur
            raise _held_elsewhere(cur)
        try:
            return self.acquire(space)
        except LeaseHeld as e:
            self._routes[space] = e.lease
            raise _held_elsewhere(e.lease) from None
        except InvalidEvent as e:
            if e.field != "transaction":
                raise
            raise InvalidEvent(
                "space",
                f"{space!r} is not leased to this node yet, and its grant (a write) waits for "
                "the write lock this transaction holds: acquire it before the transaction's "
                "first write (node.acquire(space))",
            ) from e

    def forget_heads(self, spaces: Iterable[str]) -> None:
        """The heads of `spaces` may have moved (a transaction wrote there): read them again."""
        for space in spaces:
            self._heads.pop(space, None)

    # -- serving -----------------------------------------------------------------------------

    def serve(self, space: str) -> int:
        """Apply the intents forwarded to this node for `space`, in arrival order.

        Returns how many were applied; 0 when this node does not hold the space.
        """
        return self._server.serve(space)

    def tick(self) -> None:
        """One round of upkeep: renew the leases due, drop lost ones, serve forwarded intents."""
        self._server.round(defer_forget=False)

    def group_stats(self) -> GroupStats:
        """How its grouped writes went (the items per write), for benchmarks and tests."""
        return self._group.stats

    def handoff_outcomes(self) -> dict[str, int]:
        """How its hand-offs to other processes' holders ended ("written", "not_holder",
        "unreachable", "unknown"); empty when it hands nothing over."""
        return {} if self._client is None else dict(self._client.outcomes)

    def _handed_over(self, space: str, entries: list[tuple[Pending, Reply]]) -> None:
        """The listener's call for items forwarders handed over: written only while this node
        holds the space (its lease valid, the write fenced by its generation); each answer goes
        to its reply from the thread that wrote it, right after the commit."""
        if space not in self._leases:
            for _, reply in entries:
                reply(None, NotHolder(space))
            return
        self._group.submit(space, entries)

    def __enter__(self) -> AppendAuthority:
        if not self._listeners:
            self._listeners = start_listeners(
                self._endpoints, self._network, self.node_id, self._handed_over
            )
        if self._inbox is not None:
            self._unwatch = self._inbox.watch_intents(self._server.intent_arrived)
        self._server.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for listener in self._listeners:
            listener.stop()
        self._listeners = []
        self._group.close()
        self._server.stop()
        if self._client is not None:
            self._client.close()
        if self._unwatch is not None:
            self._unwatch()
            self._unwatch = None
        try:
            self._server.forget_due(force=True)
        except Exception as e:  # garbage the next holder sweeps
            log.warning("node %s: forgetting applied intents failed: %s", self.node_id, e)
        for lease in self.leases():
            self.release(lease.space)
