"""The intent-queue contract (the durable intents of a store that forwards across processes) and
the forwarding contract (two registries on one store, as two processes)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest

from shard_sql.authority import AppendAuthority
from shard_sql.errors import IntentTimeout, InvalidEvent
from shard_sql.leases import LeaseRegistry
from shard_sql.ports import IntentQueue
from shard_sql.testing.clocks import ManualClock
from shard_sql.testing.contracts import HOSTILE_SPACES, AdapterCase
from shard_sql.validation import pending
from shard_sql.values import Event


class IntentQueueContract(AdapterCase):
    """`IntentQueue`: intents recorded once, read in arrival order per space, pending until
    their event is written, readable from another opening of the store, and waits a put ends."""

    def test_is_an_intent_queue(self) -> None:
        assert isinstance(self.store, IntentQueue)

    def test_put_is_idempotent_and_readable(self) -> None:
        self.store.put_intent("wiki", pending("alias.set", {"page": "Home"}, "k1"), holder="a")
        self.store.put_intent("wiki", pending("alias.set", {"page": "Other"}, "k1"), holder="b")
        [p] = self.store.pending_intents("wiki", limit=10)
        assert (p.type, p.payload, p.intent_id) == ("alias.set", {"page": "Home"}, "k1")
        other = self.open_again()  # another process sees the same
        assert [x.intent_id for x in other.pending_intents("wiki", limit=10)] == ["k1"]
        assert self.store.spaces() == []  # intents are not events
        assert self.store.head("wiki") == 0

    def test_arrival_order_and_limit(self) -> None:
        ids = [f"id-{i}" for i in (7, 3, 11, 0, 5, 1, 9, 2, 10, 4, 8, 6)]
        for n, i in enumerate(ids):
            self.store.put_intent("s", pending("t", {"n": n}, i), holder="h")
        assert [p.intent_id for p in self.store.pending_intents("s", limit=100)] == ids
        assert [p.intent_id for p in self.store.pending_intents("s", limit=5)] == ids[:5]
        assert [p.payload["n"] for p in self.store.pending_intents("s", limit=3)] == [0, 1, 2]
        assert self.store.pending_intents("s", limit=0) == []

    def test_an_intent_is_applied_by_its_event(self) -> None:
        ids = ["a", "b", "c", "d", "e"]
        for n, i in enumerate(ids):
            self.store.put_intent("s", pending("t", {"n": n}, i), holder="h")
        e0 = self.store.append("s", "t", {"n": 0}, expected_seq=0, intent_id="a")
        e2 = self.store.append("s", "t", {"n": 2}, expected_seq=1, intent_id="c")
        assert self.store.find_intent("s", "a") == e0 and self.store.find_intent("s", "c") == e2
        assert self.store.find_intent("s", "b") is None
        assert self.store.find_intent("other", "a") is None
        # Applied, forgotten or not (a holder that died in between), they are not pending.
        self.store.forget_intents("s", ["a", "b", "never-put"])  # drops applied records only
        assert [p.intent_id for p in self.store.pending_intents("s", limit=10)] == ["b", "d", "e"]
        # A limit counts unapplied intents only.
        self.store.append("s", "t", {}, expected_seq=2, intent_id="b")
        assert [p.intent_id for p in self.store.pending_intents("s", limit=1)] == ["d"]
        # A late retry of an applied intent is not pending again.
        self.store.put_intent("s", pending("t", {"n": 0}, "a"), holder="h")
        assert [p.intent_id for p in self.store.pending_intents("s", limit=10)] == ["d", "e"]

    def test_spaces_do_not_mix(self) -> None:
        names = [*HOSTILE_SPACES, "a", "A", "a+", "é" * 200, "a" * 101]
        for n, space in enumerate(names):
            self.store.put_intent(space, pending("t", {"n": n}, "same-id"), holder="h")
        for n, space in enumerate(names):
            [p] = self.store.pending_intents(space, limit=10)
            assert p.payload == {"n": n}
        self.store.append("a", "t", {}, expected_seq=0, intent_id="same-id")
        assert self.store.pending_intents("a", limit=10) == []
        assert len(self.store.pending_intents("A", limit=10)) == 1

    def test_bad_arguments(self) -> None:
        store = self.store
        calls: list[Callable[[], object]] = [
            lambda: store.put_intent("s", pending("t", {}), holder="h"),  # no intent id
            lambda: store.put_intent("", pending("t", {}, "i"), holder="h"),
            lambda: store.put_intent("s", pending("t", {}, "i"), holder=""),
            lambda: store.pending_intents("s", limit=-1),
            lambda: store.find_intent("s", ""),
            lambda: store.forget_intents("s", "abc"),  # a string
            lambda: store.forget_intents("s", [""]),
            lambda: store.wait_for_change("s", 0),  # a string
            lambda: store.wait_for_change(["s"], float("nan")),
            lambda: store.wait_for_change(["s"], -1),
            lambda: store.wait_for_change([""], 0),
        ]
        for call in calls:
            with pytest.raises(InvalidEvent):
                call()
        assert store.pending_intents("s", limit=10) == []

    def test_a_put_ends_a_wait(self) -> None:
        self.store.wait_for_change(["s", "t"], 0)  # a first wait may end at once
        other = self.open_again()

        def later(action: object) -> float:
            timer = threading.Timer(0.1, action)  # type: ignore[arg-type]
            timer.start()
            t0 = time.monotonic()
            self.store.wait_for_change(["s", "t"], 10)
            timer.join()
            return time.monotonic() - t0

        assert later(lambda: other.put_intent("t", pending("x", {}, "w1"), holder="h")) < 5
        assert later(lambda: other.append("t", "x", {}, expected_seq=0, intent_id="w1")) < 5
        t0 = time.monotonic()
        self.store.wait_for_change(["s"], 0.2)  # nothing needs to happen: a bounded wait
        assert time.monotonic() - t0 < 5


class ForwardingContract(AdapterCase):
    """Forwarding through the store's durable intents (`IntentQueue`), as between processes.

    Two registries on one store stand for two processes: neither sees the other's nodes, so an
    intent can only travel through the store, or the holder's socket (`handoff`, the default;
    off: durable intents only).
    """

    handoff = True

    @pytest.fixture(autouse=True)
    def _registries(self, _adapter: None) -> None:
        self.clock = ManualClock(datetime.now(UTC))
        self.here = LeaseRegistry(self.store, clock=self.clock)
        self.there = LeaseRegistry(self.store, clock=self.clock)

    def test_forwarded_to_holder_in_another_registry(self) -> None:
        holder = AppendAuthority(
            "holder", self.store, self.here, ttl_seconds=30, handoff=self.handoff
        )
        other = AppendAuthority(
            "other", self.store, self.there, forward_timeout=20, handoff=self.handoff
        )
        holder.append("s", "t", {"n": 0})
        with holder:
            e = other.append("s", "t", {"n": 1})
            e2 = other.append("s", "t", {"n": 2}, intent_id="k")
        assert (e.seq, e.writer, e2.seq, e2.intent_id) == (1, "holder", 2, "k")
        assert e.intent_id is not None  # generated for the forwarded intent
        assert [x.payload["n"] for x in self.store.events("s")] == [0, 1, 2]

    def test_timeout_then_safe_retry(self) -> None:
        holder = AppendAuthority(
            "holder", self.store, self.here, ttl_seconds=30, handoff=self.handoff
        )
        other = AppendAuthority(
            "other", self.store, self.there, forward_timeout=0.3, handoff=self.handoff
        )
        holder.acquire("s")
        with pytest.raises(IntentTimeout):
            other.append("s", "t", {"n": 0}, intent_id="retry-me")
        assert self.store.head("s") == 0
        assert holder.serve("s") == 1
        again = other.append("s", "t", {"n": 0}, intent_id="retry-me")
        assert (again.seq, again.writer) == (0, "holder")
        assert holder.serve("s") == 0
        assert self.store.head("s") == 1

    def test_dead_holder_pending_intents_applied_by_next(self) -> None:
        dead = AppendAuthority("dead", self.store, self.here, ttl_seconds=5, handoff=self.handoff)
        dead.append("s", "t", {"n": "first"})
        waiters = [
            AppendAuthority(
                f"w{i}",
                self.store,
                LeaseRegistry(self.store, clock=self.clock),
                handoff=self.handoff,
            )
            for i in range(3)
        ]
        results: dict[int, Event] = {}

        def call(i: int) -> None:
            results[i] = waiters[i].append("s", "t", {"n": i}, intent_id=f"i{i}")

        threads = [threading.Thread(target=call, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        deadline = datetime.now(UTC) + timedelta(seconds=10)
        while len(self.store.pending_intents("s", limit=10)) < 3:
            assert datetime.now(UTC) < deadline, "intents were not queued"
            threading.Event().wait(0.01)
        self.clock.advance(6)  # the holder's lease lapses; one waiter takes over
        for t in threads:
            t.join(30)
        assert sorted(results) == [0, 1, 2]
        got = self.store.events("s")
        assert [e.seq for e in got] == [0, 1, 2, 3]
        assert sorted(e.intent_id or "" for e in got[1:]) == ["i0", "i1", "i2"]
        assert {e.writer for e in got[1:]} == {results[0].writer}
        assert got[1].generation == got[0].generation + 1
