"""A named consumer of the feed: batches handed to a handler in the transaction that saves the
consumer's checkpoint, one running copy at a time with a lease. See docs/feed.md."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Collection
from typing import Any

from shard_sql.errors import InvalidEvent, LeaseHeld, StaleLease, StoreUnavailable
from shard_sql.leases import DEFAULT_TTL, LeaseRegistry, check_ttl, renewal_due
from shard_sql.ports import FeedStore, Transaction
from shard_sql.validation import (
    MAX_BATCH,
    check_checkpoint_name,
    check_space,
    check_text,
    check_types,
)
from shard_sql.values import Event, Lease

Handler = Callable[[Transaction, list[Event]], Any]
"""`handler(tx, events)`: one batch, inside the transaction that saves the checkpoint."""

LEASE_PREFIX = "subscription:"
"""The lease of subscription `name` is the space-like name `subscription:<name>`."""
POLL_SECONDS = 0.25
"""How long `run` waits at most (for the feed, or for the lease) before it looks at `stop`."""
UNAVAILABLE_PAUSE = 0.1
"""How long `run` pauses before it tries a store that was unavailable again."""


class Subscription:
    """Follows the feed of `store` from the checkpoint `name` and hands `handler` the events.

    Each batch of at most `batch_size` events (only those whose type is in `types`, if given)
    is handled in one transaction that also saves the checkpoint: the handler's writes to the
    store (`tx.append`, and on SQL stores its own rows on `tx.connection`) commit with it, so
    each event is processed once. A handler that raises rolls the batch back and stops the
    subscription with its error.

    With `registry`, the copy holds the lease `subscription:<name>` as `node_id` while it
    processes (a second copy waits for it in `run`; `run_once` raises `LeaseHeld`), and its
    checkpoint saves are fenced by it. Without one, run a single copy. `run_once` keeps the
    lease until `release()` (or the end of a `with` block); `run` releases it when it returns.
    """

    def __init__(
        self,
        store: FeedStore,
        name: str,
        handler: Handler,
        *,
        types: Collection[str] | None = None,
        batch_size: int = 100,
        registry: LeaseRegistry | None = None,
        node_id: str | None = None,
        ttl_seconds: float = DEFAULT_TTL,
    ) -> None:
        if not isinstance(store, FeedStore):
            raise InvalidEvent("store", f"{type(store).__name__} has no feed")
        self.store = store
        self.name = check_checkpoint_name(name)
        if not callable(handler):
            raise InvalidEvent("handler", "must be callable as handler(tx, events)")
        self.handler = handler
        self.types = check_types(types)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int):
            raise InvalidEvent("batch_size", "must be an integer")
        if not 1 <= batch_size <= MAX_BATCH:
            raise InvalidEvent("batch_size", f"must be from 1 to {MAX_BATCH}")
        self.batch_size = batch_size
        if registry is not None:
            if not isinstance(registry, LeaseRegistry):
                raise InvalidEvent("registry", "must be a LeaseRegistry")
            if not registry.fences(store):
                raise InvalidEvent("registry", "keeps its leases in another store")
            try:
                check_space(LEASE_PREFIX + name)
            except InvalidEvent as e:
                raise InvalidEvent("name", f"is too long for its lease name: {e}") from e
        self.registry = registry
        self.lease_name = LEASE_PREFIX + name
        if node_id is None:
            node_id = f"subscriber-{uuid.uuid4().hex[:12]}"
        self.node_id = check_text("node_id", node_id)
        self.ttl_seconds = check_ttl(ttl_seconds)
        self.lease: Lease | None = None
        self._position: int | None = None  # the checkpoint as this copy last saved or read it

    # -- running -----------------------------------------------------------------------------

    def run_once(self) -> int:
        """Process every event there is now, batch by batch; return how many were handled.

        With a registry: raises `LeaseHeld` while another copy holds the lease, and
        `StaleLease` (nothing of that batch written) when another copy took it over meanwhile.
        """
        handled = 0
        while True:
            if self.registry is not None:
                self._hold()
            try:
                n, caught_up = self._batch()
            except StaleLease:
                self._drop_lease()
                raise
            handled += n
            if caught_up:
                return handled

    def run(self, stop: threading.Event) -> None:
        """Follow the feed until `stop` is set: process, then wait with `wait_feed` when caught
        up. With a registry, wait for the lease while another copy holds it, and go back to
        waiting when it is lost. A handler's error ends the run with it; a store unavailable
        for a while (`StoreUnavailable`) is tried again after a pause."""
        try:
            while not stop.is_set():
                if self.registry is not None and not self._wait_for_lease(stop):
                    continue
                try:
                    _, caught_up = self._batch()
                except StaleLease:
                    self._drop_lease()  # another copy holds it now: wait for our turn again
                    continue
                except StoreUnavailable:
                    # The store went away for a while (a restart, a lost connection): the batch
                    # was not saved; follow the feed again from the saved checkpoint.
                    self._position = None
                    stop.wait(UNAVAILABLE_PAUSE)
                    continue
                if caught_up:
                    after = self._position or 0
                    self.store.wait_feed(after, timeout=POLL_SECONDS)
        finally:
            self.release()

    def release(self) -> None:
        """Give the lease up (if held) so another copy can take over at once."""
        lease, self.lease = self.lease, None
        if lease is not None and self.registry is not None:
            self.registry.release(lease)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    # -- steps -------------------------------------------------------------------------------

    def _batch(self) -> tuple[int, bool]:
        """Handle the next batch and save the checkpoint; (events handled, caught up)."""
        store = self.store
        after = self._position
        if after is None:
            after = store.checkpoint(self.name)
        # With a type filter, a short page leaves out events up to the head read before it
        # (no event is placed below a head already read): the checkpoint moves past them.
        head = store.feed_head() if self.types is not None else 0
        page = store.feed(after, limit=self.batch_size, types=self.types)
        last = page[-1].position if page else None
        full = len(page) == self.batch_size
        new = last if full and last is not None else max(last or 0, head, after)
        if not page and new == after:
            self._position = after
            return 0, True
        registry = self.registry
        if registry is None or self.lease is None:
            self._commit(page, new, None)
        else:
            with registry.fenced(store, self.lease) as fence:
                self._commit(page, new, fence)
        self._position = new
        return len(page), not full

    def _commit(self, page: list[Event], position: int, fence: Lease | None) -> None:
        with self.store.transaction() as tx:
            if page:
                self.handler(tx, page)
            tx.save_checkpoint(self.name, position, fence=fence)

    def _hold(self) -> None:
        """Acquire the lease, or renew it when due; `LeaseHeld` while another copy holds it."""
        registry = self.registry
        assert registry is not None
        if self.lease is None:
            self.lease = registry.acquire(self.lease_name, self.node_id, self.ttl_seconds)
            self._position = None  # another copy may have moved the checkpoint
        elif renewal_due(self.lease, registry.now(), self.ttl_seconds):
            try:
                self.lease = registry.renew(self.lease, ttl_seconds=self.ttl_seconds)
            except StaleLease:
                self._drop_lease()
                raise

    def _wait_for_lease(self, stop: threading.Event) -> bool:
        """`_hold`, or a short wait while another copy holds the lease (or ours was lost)."""
        try:
            self._hold()
            return True
        except (LeaseHeld, StaleLease):
            stop.wait(POLL_SECONDS)
            return False

    def _drop_lease(self) -> None:
        self.lease = None
        self._position = None
