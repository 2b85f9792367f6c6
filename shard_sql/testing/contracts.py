"""The store and authority contracts: every adapter runs the same cases.

See `shard_sql.testing` for how an adapter plugs in.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from shard_sql.authority import AppendAuthority
from shard_sql.errors import (
    InvalidEvent,
    LeaseHeld,
    SeqConflict,
    ShardSqlError,
    StaleLease,
)
from shard_sql.leases import LeaseRegistry
from shard_sql.ports import Clock, EventStore
from shard_sql.testing.clocks import ManualClock
from shard_sql.urls import open_store
from shard_sql.values import Event, EventType, Lease

HOSTILE_SPACES = [
    "../HEAD",
    "refs/heads/main",
    "a..b",
    "x.lock",
    "a@{1}",
    "with space",
    "ünïcødé-空间",
    "s" * 200,
    "'; DROP TABLE events; --",
    "a/b/c",
    "trailing.",
    "-dash",
    "%2F",
    "HEAD",
]

BAD_PAYLOADS: list[Any] = [
    None,
    [1, 2],
    "text",
    42,
    {"x": math.nan},
    {"x": math.inf},
    {"x": -math.inf},
    {1: "int key"},
    {"x": (1, 2)},
    {"x": {1, 2}},
    {"x": object()},
    {"x": b"bytes"},
    {"x": "nul\x00char"},
    {"x": "\ud800"},
    {"x": datetime(2026, 1, 1)},
]

BAD_SPACES: list[Any] = ["", "a\x00b", "tab\there", "new\nline", "s" * 201, None, 7, b"bytes"]


class AdapterCase:
    """How a contract opens the adapter under test: a test file mixes one adapter class (its
    `make_store`, and `store_url` when other processes can open the store) into each contract.
    Cases reach pytest's fixtures through `self.request` and `self.tmp_path`."""

    request: pytest.FixtureRequest
    tmp_path: Path
    store: Any

    def make_store(self) -> EventStore:
        raise NotImplementedError

    def store_url(self) -> str | None:
        """A URL other processes can open (`shard_sql.urls.open_store`); None: no such tests."""
        return None

    def make_registry(self, store: EventStore, clock: Clock | None = None) -> LeaseRegistry:
        """A registry whose leases live in `store` (override for stores that keep none)."""
        return LeaseRegistry(store, clock=clock)

    def open_again(self) -> Any:
        """The store opened a second time, as another process would (closed after the case);
        the store itself when it cannot be (in memory)."""
        url = self.store_url()
        if url is None:
            return self.store
        other = open_store(url)
        self._opened.append(other)
        return other

    @pytest.fixture(autouse=True)
    def _adapter(self, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[None]:
        self.request, self.tmp_path = request, tmp_path
        self._opened: list[object] = []
        self.store = self.make_store()
        yield
        for store in [*self._opened, self.store]:
            close = getattr(store, "close", None)
            if close is not None:
                close()


class StoreContract(AdapterCase):
    """The store contract: compare-and-set, fence, batches, idempotency, reads, threads."""

    # -- compare-and-set ---------------------------------------------------------------------

    def test_empty_space(self) -> None:
        assert self.store.head("nothing") == 0
        assert self.store.events("nothing") == []
        assert list(self.store.iter_events("nothing")) == []
        assert self.store.spaces() == []

    def test_append_returns_event(self) -> None:
        e = self.store.append("s", EventType.ALIAS_SET, {"a": [1, {"b": None}]}, expected_seq=0)
        assert isinstance(e, Event)
        assert (e.space, e.seq, e.type) == ("s", 0, "alias.set")
        assert e.payload == {"a": [1, {"b": None}]}
        assert e.recorded_at.tzinfo is not None and e.recorded_at.utcoffset() == timedelta(0)
        assert e.intent_id is None
        assert self.store.head("s") == 1
        assert self.store.events("s") == [e]

    def test_round_trip_values(self) -> None:
        payload = {
            "s": 'ünïcødé ✓ 空间 "quoted" \\ /',
            "i": 2**62,
            "neg": -1,
            "f": 1.5,
            "t": True,
            "n": None,
            "l": [],
            "o": {},
            "deep": {"a": [{"b": [1, 2.25, "x"]}]},
        }
        self.store.append("s", "custom.type", payload, expected_seq=0, intent_id="i-1")
        [e] = self.store.events("s")
        assert e.payload == payload
        assert type(e.payload["f"]) is float and type(e.payload["i"]) is int
        assert e.type == "custom.type" and e.intent_id == "i-1"

    def test_seq_conflict_writes_nothing(self) -> None:
        self.store.append("s", "t", {"n": 0}, expected_seq=0)
        for wrong in (0, 2, 5):
            with pytest.raises(SeqConflict):
                self.store.append("s", "t", {"n": "x"}, expected_seq=wrong)
        assert self.store.head("s") == 1
        assert [e.payload for e in self.store.events("s")] == [{"n": 0}]
        with pytest.raises(SeqConflict):
            self.store.append("other", "t", {}, expected_seq=1)
        assert self.store.head("other") == 0

    def test_spaces_are_independent(self) -> None:
        self.store.append("a", "t", {}, expected_seq=0)
        self.store.append("b", "t", {}, expected_seq=0)
        self.store.append("a", "t", {}, expected_seq=1)
        assert (self.store.head("a"), self.store.head("b")) == (2, 1)
        assert self.store.spaces() == ["a", "b"]

    # -- the fence ---------------------------------------------------------------------------

    def test_fence_current_lease_writes(self) -> None:
        reg = self.make_registry(self.store, ManualClock())
        lease = reg.acquire("s", "node-a", 10)
        e = self.store.append("s", "t", {}, expected_seq=0, fence=lease)
        assert (e.writer, e.generation) == ("node-a", lease.generation)
        renewed = reg.renew(lease)
        e2 = self.store.append("s", "t", {}, expected_seq=1, fence=renewed)
        assert e2.generation == lease.generation

    def test_fence_stale_lease_writes_nothing(self) -> None:
        clock = ManualClock()
        reg = self.make_registry(self.store, clock)
        old = reg.acquire("s", "node-a", 10)
        clock.advance(11)
        new = reg.acquire("s", "node-b", 10)
        assert new.generation == old.generation + 1
        with pytest.raises(StaleLease):
            self.store.append("s", "t", {"from": "a"}, expected_seq=0, fence=old)
        with pytest.raises(StaleLease):
            self.store.append_many("s", [("t", {})], expected_seq=0, fence=old)
        assert self.store.head("s") == 0
        self.store.append("s", "t", {"from": "b"}, expected_seq=0, fence=new)
        assert [e.writer for e in self.store.events("s")] == ["node-b"]

    def test_fence_revoked_lease_writes_nothing(self) -> None:
        reg = self.make_registry(self.store, ManualClock())
        lease = reg.acquire("s", "node-a", 10)
        revoked = reg.revoke("s")
        assert revoked is not None and revoked.generation == lease.generation + 1
        assert reg.current("s") is None
        with pytest.raises(StaleLease):
            self.store.append("s", "t", {}, expected_seq=0, fence=lease)
        assert self.store.head("s") == 0

    def test_fence_without_lease_record(self) -> None:
        fake = Lease("s", "nobody", datetime(2100, 1, 1, tzinfo=UTC), 1)
        with pytest.raises(StaleLease):
            self.store.append("s", "t", {}, expected_seq=0, fence=fake)
        assert self.store.head("s") == 0

    def test_fence_of_another_space(self) -> None:
        reg = self.make_registry(self.store, ManualClock())
        lease = reg.acquire("a", "node-a", 10)
        with pytest.raises(InvalidEvent):
            self.store.append("b", "t", {}, expected_seq=0, fence=lease)
        assert self.store.head("b") == 0

    # -- batches -----------------------------------------------------------------------------

    def test_append_many(self) -> None:
        self.store.append("s", "t", {"n": 0}, expected_seq=0)
        out = self.store.append_many("s", [("t", {"n": 1}), ("u", {"n": 2}, "k2")], expected_seq=1)
        assert [e.seq for e in out] == [1, 2]
        assert out[1].intent_id == "k2"
        assert self.store.events("s") == [self.store.events("s")[0], *out]

    def test_append_many_all_or_nothing(self) -> None:
        self.store.append("s", "t", {}, expected_seq=0)
        with pytest.raises(SeqConflict):
            self.store.append_many("s", [("t", {})] * 3, expected_seq=0)
        with pytest.raises(InvalidEvent):
            self.store.append_many("s", [("t", {}), ("t", {"x": math.nan})], expected_seq=1)
        with pytest.raises(InvalidEvent):
            self.store.append_many("s", [], expected_seq=1)
        assert self.store.head("s") == 1

    def test_append_many_large(self) -> None:
        out = self.store.append_many("s", [("t", {"i": i}) for i in range(500)], expected_seq=0)
        assert [e.seq for e in out] == list(range(500))
        assert self.store.head("s") == 500

    # -- idempotency -------------------------------------------------------------------------

    def test_intent_id_is_idempotent(self) -> None:
        first = self.store.append("s", "t", {"v": 1}, expected_seq=0, intent_id="once")
        again = self.store.append("s", "t", {"v": 1}, expected_seq=1, intent_id="once")
        assert again == first
        stale = self.store.append("s", "t", {"v": 1}, expected_seq=0, intent_id="once")
        assert stale == first
        assert self.store.head("s") == 1
        other_space = self.store.append("s2", "t", {"v": 1}, expected_seq=0, intent_id="once")
        assert other_space.space == "s2"

    def test_intent_id_in_batches(self) -> None:
        out = self.store.append_many("s", [("t", {}, "a"), ("t", {}, "b")], expected_seq=0)
        assert self.store.append_many("s", [("t", {}, "a"), ("t", {}, "b")], expected_seq=2) == out
        with pytest.raises(InvalidEvent):
            self.store.append_many("s", [("t", {}, "b"), ("t", {}, "c")], expected_seq=2)
        with pytest.raises(InvalidEvent):
            self.store.append_many("s", [("t", {}, "d"), ("t", {}, "d")], expected_seq=2)
        assert self.store.head("s") == 2

    def test_intent_id_returned_even_with_stale_fence(self) -> None:
        clock = ManualClock()
        reg = self.make_registry(self.store, clock)
        old = reg.acquire("s", "a", 10)
        first = self.store.append("s", "t", {}, expected_seq=0, fence=old, intent_id="k")
        clock.advance(11)
        reg.acquire("s", "b", 10)
        assert self.store.append("s", "t", {}, expected_seq=1, fence=old, intent_id="k") == first

    # -- reads -------------------------------------------------------------------------------

    def test_reads_with_from_seq_and_limit(self) -> None:
        self.store.append_many("s", [("t", {"i": i}) for i in range(25)], expected_seq=0)
        assert [e.seq for e in self.store.events("s", from_seq=20)] == [20, 21, 22, 23, 24]
        assert [e.seq for e in self.store.events("s", from_seq=3, limit=4)] == [3, 4, 5, 6]
        assert self.store.events("s", limit=0) == []
        assert self.store.events("s", from_seq=25) == []
        assert self.store.events("s", from_seq=99) == []
        assert [e.seq for e in self.store.iter_events("s", from_seq=10)] == list(range(10, 25))
        assert list(self.store.iter_events("s")) == self.store.events("s")

    def test_iter_events_is_lazy_and_long(self) -> None:
        n = 2_500
        self.store.append_many("s", [("t", {"i": i}) for i in range(n)], expected_seq=0)
        it = self.store.iter_events("s")
        assert next(it).seq == 0
        assert [e.seq for e in it] == list(range(1, n))

    def test_bad_read_arguments(self) -> None:
        for kwargs in ({"from_seq": -1}, {"limit": -1}, {"from_seq": "1"}):
            with pytest.raises(InvalidEvent):
                self.store.events("s", **kwargs)
        with pytest.raises(InvalidEvent):
            self.store.iter_events("s", from_seq=-1)

    # -- input checks ------------------------------------------------------------------------

    def test_bad_payloads_write_nothing(self) -> None:
        for payload in BAD_PAYLOADS:
            with pytest.raises(InvalidEvent) as info:
                self.store.append("s", "t", payload, expected_seq=0)
            assert info.value.field == "payload", payload
        with pytest.raises(InvalidEvent):
            self.store.append("s", "t", {"big": "x" * (1024 * 1024)}, expected_seq=0)
        assert self.store.head("s") == 0
        assert self.store.spaces() == []

    def test_bad_types_write_nothing(self) -> None:
        for type_ in ("", None, 5, "a\nb", "x" * 201):
            with pytest.raises(InvalidEvent) as info:
                self.store.append("s", type_, {}, expected_seq=0)
            assert info.value.field == "type"
        assert self.store.head("s") == 0

    def test_bad_spaces_write_nothing(self) -> None:
        for space in BAD_SPACES:
            with pytest.raises(InvalidEvent) as info:
                self.store.append(space, "t", {}, expected_seq=0)
            assert info.value.field == "space"
        assert self.store.spaces() == []

    def test_bad_expected_seq_and_intent(self) -> None:
        for seq in (-1, "0", 1.0, None, True):
            with pytest.raises(InvalidEvent):
                self.store.append("s", "t", {}, expected_seq=seq)
        for intent in ("", "a\x00", 5):
            with pytest.raises(InvalidEvent):
                self.store.append("s", "t", {}, expected_seq=0, intent_id=intent)
        assert self.store.head("s") == 0

    def test_errors_are_shard_sql_errors(self) -> None:
        for exc in (InvalidEvent, SeqConflict, StaleLease, LeaseHeld):
            assert issubclass(exc, ShardSqlError)

    def test_hostile_space_names_are_distinct(self) -> None:
        for n, space in enumerate(HOSTILE_SPACES):
            for k in range(n % 3 + 1):
                self.store.append(space, "t", {"space": space, "k": k}, expected_seq=k)
        for n, space in enumerate(HOSTILE_SPACES):
            got = self.store.events(space)
            assert [e.payload for e in got] == [{"space": space, "k": k} for k in range(n % 3 + 1)]
            assert all(e.space == space for e in got)
        assert self.store.spaces() == sorted(HOSTILE_SPACES)

    # -- threads -----------------------------------------------------------------------------

    def test_threads_racing_compare_and_set(self) -> None:
        acked: list[int] = []
        lock = threading.Lock()

        def worker(w: int) -> None:
            for i in range(15):
                while True:
                    head = self.store.head("s")
                    try:
                        self.store.append("s", "t", {"w": w, "i": i}, expected_seq=head)
                    except SeqConflict:
                        continue
                    with lock:
                        acked.append(w * 1000 + i)
                    break

        threads = [threading.Thread(target=worker, args=(w,)) for w in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        got = self.store.events("s")
        assert [e.seq for e in got] == list(range(len(acked)))
        assert sorted(e.payload["w"] * 1000 + e.payload["i"] for e in got) == sorted(acked)

    def test_threads_through_authorities(self) -> None:
        reg = self.make_registry(self.store)
        nodes = [AppendAuthority(f"node-{n}", self.store, reg, ttl_seconds=30) for n in range(4)]
        acked: list[tuple[int, int]] = []
        lock = threading.Lock()

        def worker(w: int) -> None:
            node = nodes[w % len(nodes)]
            for i in range(15):
                e = node.append("s", "t", {"w": w, "i": i})
                with lock:
                    acked.append((e.seq, w * 1000 + i))

        threads = [threading.Thread(target=worker, args=(w,)) for w in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        got = self.store.events("s")
        assert [e.seq for e in got] == list(range(8 * 15))
        assert sorted(acked) == [(e.seq, e.payload["w"] * 1000 + e.payload["i"]) for e in got]
        assert len({(e.writer, e.generation) for e in got}) == 1


class AuthorityContract(AdapterCase):
    """The seven behaviours of the append authority, with an injected clock."""

    @pytest.fixture(autouse=True)
    def _nodes(self, _adapter: None) -> None:
        self.clock = ManualClock()
        self.registry = self.make_registry(self.store, self.clock)
        self.a = AppendAuthority("A", self.store, self.registry, ttl_seconds=10)
        self.b = AppendAuthority("B", self.store, self.registry, ttl_seconds=10)

    def test_1_one_holder_at_a_time(self) -> None:
        lease = self.a.acquire("s")
        with pytest.raises(LeaseHeld) as info:
            self.b.acquire("s")
        assert info.value.lease == lease
        assert info.value.lease.holder == "A"
        assert self.a.holds("s") and not self.b.holds("s")

    def test_2_total_order_across_nodes(self) -> None:
        e0 = self.a.append("s", "t", {"by": "A"})
        e1 = self.b.append("s", "t", {"by": "B"})
        e2 = self.a.append("s", "t", {"by": "A2"})
        assert [e0.seq, e1.seq, e2.seq] == [0, 1, 2]
        assert [e.payload["by"] for e in self.store.events("s")] == ["A", "B", "A2"]

    def test_3_non_holder_forwards_to_holder(self) -> None:
        lease = self.a.acquire("s")
        e = self.b.append("s", "t", {"by": "B"}, intent_id="b-1")
        assert (e.writer, e.generation) == ("A", lease.generation)
        assert not self.b.holds("s")
        assert self.store.events("s") == [e]
        assert self.b.append("s", "t", {"by": "B"}, intent_id="b-1") == e
        assert self.store.head("s") == 1

    def test_4_lapsed_lease_is_regranted(self) -> None:
        self.a.append("s", "t", {"n": 0})
        self.a.append("s", "t", {"n": 1})
        first = self.registry.current("s")
        assert first is not None and first.holder == "A"
        self.clock.advance(11)
        assert self.registry.current("s") is None
        lease = self.b.acquire("s")
        assert lease.generation == first.generation + 1
        e = self.b.append("s", "t", {"n": 2})
        assert (e.seq, e.writer, e.generation) == (2, "B", lease.generation)
        assert [x.seq for x in self.store.events("s")] == [0, 1, 2]

    def test_5_stale_ex_holder_forwards(self) -> None:
        old = self.a.acquire("s")
        self.a.append("s", "t", {"n": 0})
        self.clock.advance(11)
        new = self.b.acquire("s")
        assert not self.a.holds("s") and self.b.holds("s")
        e = self.a.append("s", "t", {"by": "stale A"})
        assert (e.seq, e.writer, e.generation) == (1, "B", new.generation)
        with pytest.raises(StaleLease):
            self.store.append("s", "t", {}, expected_seq=2, fence=old)
        gens = [x.generation for x in self.store.events("s")]
        assert gens == sorted(gens)

    def test_5b_stale_holder_whose_clock_lags_is_fenced(self) -> None:
        # A believes its lease is still valid (it never looks at the registry again); the fence
        # in the write's transaction still turns it away and it forwards to B.
        self.a.append("s", "t", {"n": 0})
        self.registry.revoke("s")
        self.b.acquire("s")
        e = self.a.append("s", "t", {"n": 1})
        assert (e.seq, e.writer) == (1, "B")

    def test_6_unleased_space_is_acquired_by_first_appender(self) -> None:
        assert self.registry.current("s") is None
        e = self.b.append("s", "t", {})
        assert e.writer == "B"
        assert self.b.holds("s") and not self.a.holds("s")

    def test_7_renew_release_reacquire(self) -> None:
        lease = self.a.acquire("s")
        self.clock.advance(5)
        renewed = self.registry.renew(lease)
        assert renewed.generation == lease.generation
        assert renewed.expires_at > lease.expires_at
        self.a.release("s")
        assert not self.a.holds("s")
        b_lease = self.b.acquire("s")
        assert b_lease.generation == lease.generation + 1
        self.b.release("s")
        again = self.a.acquire("s")
        assert again.generation == b_lease.generation + 1
        self.clock.advance(11)
        lapsed = self.a.acquire("s")
        assert lapsed.generation == again.generation + 1

    def test_renew_lost_lease_raises(self) -> None:
        lease = self.a.acquire("s")
        self.clock.advance(11)
        self.b.acquire("s")
        with pytest.raises(StaleLease):
            self.registry.renew(lease)

    def test_holder_renews_on_append(self) -> None:
        self.a.append("s", "t", {})
        for _ in range(5):
            self.clock.advance(6)
            self.a.append("s", "t", {})
        cur = self.registry.current("s")
        assert cur is not None and cur.holder == "A"
        assert {e.generation for e in self.store.events("s")} == {cur.generation}

    def test_context_manager_releases(self) -> None:
        with AppendAuthority("C", self.store, self.registry, ttl_seconds=10) as c:
            c.append("s", "t", {})
            assert c.holds("s")
        assert self.registry.current("s") is None
        self.b.acquire("s")

    def test_bad_input_to_authority(self) -> None:
        with pytest.raises(InvalidEvent):
            self.a.append("s", "t", {"x": math.nan})
        with pytest.raises(InvalidEvent):
            self.a.append("", "t", {})
        with pytest.raises(InvalidEvent):
            AppendAuthority("", self.store, self.registry)
        assert self.store.head("s") == 0
        assert self.registry.current("s") is None

    def test_clock_must_be_aware(self) -> None:
        reg = LeaseRegistry(clock=lambda: datetime(2026, 1, 1))
        with pytest.raises(InvalidEvent):
            reg.acquire("s", "A", 10)
