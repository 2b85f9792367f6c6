"""The subscription contract (api.md 10), mixed with an adapter's `AdapterCase` like every
contract; `make_registry` is the subscriptions' registry."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from shard_sql.errors import InvalidEvent, LeaseHeld, StaleLease
from shard_sql.leases import LeaseRegistry
from shard_sql.ports import Transaction
from shard_sql.subscription import Subscription
from shard_sql.testing.feed import FeedCase
from shard_sql.values import Event


class SubscriptionContract(FeedCase):
    """`Subscription`: batches in the checkpoint's transaction, waits, one copy at a time."""

    def append(self, n: int, space: str = "s", type: str = "t") -> None:
        head = self.store.head(space)
        self.store.append_many(
            space, [(type, {"i": head + k}) for k in range(n)], expected_seq=head
        )

    def recorder(self, into: list[list[Event]], project: bool = False) -> Any:
        def handle(tx: Transaction, events: list[Event]) -> None:
            into.append(list(events))
            if project:
                tx.append("projection", "seen", {"n": len(events)})

        return handle

    def test_run_once_in_batches(self) -> None:
        self.append(25)
        batches: list[list[Event]] = []
        # The handler's own writes are in the feed too: the type filter leaves them out.
        handler = self.recorder(batches, True)
        sub = Subscription(self.store, "c", handler, batch_size=10, types=["t"])
        assert sub.run_once() == 25
        assert [len(b) for b in batches] == [10, 10, 5]
        every = [e for b in batches for e in b]
        assert [e.payload["i"] for e in every] == list(range(25))
        assert self.store.checkpoint("c") >= (every[-1].position or 0)
        assert [e.payload["n"] for e in self.store.events("projection")] == [10, 10, 5]
        assert sub.run_once() == 0
        assert self.store.checkpoint("c") == self.store.feed_head()
        self.append(3)
        assert sub.run_once() == 3
        # a new copy starts from the saved checkpoint
        again: list[list[Event]] = []
        assert Subscription(self.store, "c", self.recorder(again), types=["t"]).run_once() == 0

    def test_types(self) -> None:
        self.append(5, type="a")
        self.append(5, space="x", type="b")
        batches: list[list[Event]] = []
        sub = Subscription(self.store, "c", self.recorder(batches), types=["b"], batch_size=2)
        assert sub.run_once() == 5
        assert {e.type for b in batches for e in b} == {"b"}
        assert self.store.checkpoint("c") == self.store.feed_head()

    def test_handler_error_stops_and_keeps_the_checkpoint(self) -> None:
        self.append(5)
        calls: list[int] = []

        def handler(tx: Transaction, events: list[Event]) -> None:
            calls.append(len(events))
            tx.append("projection", "seen", {})
            if len(calls) == 2:
                raise ValueError("handler failed")

        sub = Subscription(self.store, "c", handler, batch_size=2)
        with pytest.raises(ValueError, match="handler failed"):
            sub.run_once()
        first_two = self.store.feed(limit=2)
        assert self.store.checkpoint("c") == first_two[-1].position
        assert self.store.head("projection") == 1  # the failed batch's write rolled back
        stop = threading.Event()
        with pytest.raises(ValueError, match="handler failed"):
            calls.clear()
            calls.append(1)  # the next call fails again
            Subscription(self.store, "c", handler, batch_size=2).run(stop)
        assert self.store.checkpoint("c") == first_two[-1].position

    def test_run_follows_the_feed(self) -> None:
        seen: list[list[Event]] = []
        sub = Subscription(self.store, "c", self.recorder(seen), batch_size=4)
        stop = threading.Event()
        thread = threading.Thread(target=sub.run, args=(stop,))
        thread.start()
        try:
            self.append(6)
            _eventually(lambda: sum(map(len, seen)) == 6)
            self.append(3, space="other")
            _eventually(lambda: sum(map(len, seen)) == 9)
        finally:
            stop.set()
            thread.join(10)
        assert not thread.is_alive()
        self.check_feed([e for b in seen for e in b])
        assert self.store.checkpoint("c") == self.store.feed_head()

    def test_two_copies_never_both_process(self) -> None:
        registry = self.make_registry(self.store)
        seen: list[tuple[str, Event]] = []
        lock = threading.Lock()

        def handler_of(copy: str) -> Any:
            def handle(tx: Transaction, events: list[Event]) -> None:
                with lock:
                    seen.extend((copy, e) for e in events)

            return handle

        copies = {
            c: Subscription(
                self.store, "c", handler_of(c), batch_size=3, registry=registry, node_id=c
            )
            for c in ("A", "B")
        }
        stops = {c: threading.Event() for c in copies}
        threads = {c: threading.Thread(target=copies[c].run, args=(stops[c],)) for c in copies}
        threads["A"].start()
        _eventually(lambda: copies["A"].lease is not None)
        threads["B"].start()
        try:
            self.append(10)
            _eventually(lambda: len(seen) == 10)
            assert {c for c, _ in seen} == {"A"}
            assert copies["B"].lease is None
            stops["A"].set()
            threads["A"].join(10)
            self.append(5)
            _eventually(lambda: len(seen) == 15)
            assert {c for c, _ in seen[10:]} == {"B"}
        finally:
            for c in copies:
                stops[c].set()
                threads[c].join(10)
        self.check_feed([e for _, e in seen])
        assert registry.current("subscription:c") is None  # released on the way out

    def test_a_stale_copy_is_fenced(self) -> None:
        registry = self.make_registry(self.store)
        a_seen: list[list[Event]] = []
        b_seen: list[list[Event]] = []
        a, b = (
            Subscription(self.store, "c", self.recorder(x, True), types=["t"], registry=registry)
            for x in (a_seen, b_seen)
        )
        self.append(2)
        assert a.run_once() == 2
        with pytest.raises(LeaseHeld):
            b.run_once()
        registry.revoke("subscription:c")  # A's lease is taken away; A does not know yet
        self.append(2)
        assert b.run_once() == 2
        self.append(1)
        with pytest.raises(StaleLease):
            a.run_once()
        assert self.store.head("projection") == 2  # A's fenced batch wrote nothing
        assert b.run_once() == 1
        with pytest.raises(LeaseHeld):
            a.run_once()
        b.release()
        assert [len(x) for x in a_seen][:1] == [2], a_seen  # a second batch was rolled back
        assert [len(x) for x in b_seen] == [2, 1]
        assert self.store.checkpoint("c") >= (self.store.feed(types=["t"])[-1].position or 0)

    def test_bad_arguments(self) -> None:
        def handler(tx: Transaction, events: list[Event]) -> None:
            pass

        store = self.store
        thing: Any = object()
        calls: list[Any] = [
            lambda: Subscription(store, "", handler),
            lambda: Subscription(store, "c", thing),
            lambda: Subscription(store, "c", handler, batch_size=0),
            lambda: Subscription(store, "c", handler, batch_size=True),
            lambda: Subscription(store, "c", handler, types="t"),
            lambda: Subscription(thing, "c", handler),
            lambda: Subscription(store, "c", handler, registry=thing),
            lambda: Subscription(store, "x" * 200, handler, registry=LeaseRegistry()),
            lambda: Subscription(store, "c", handler, node_id=""),
        ]
        for call in calls:
            with pytest.raises(InvalidEvent):
                call()


def _eventually(condition: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)
