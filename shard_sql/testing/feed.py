"""The contracts of the feed and transactions (api.md 8, 9); subscriptions: `subscriptions.py`.

Mixed with an adapter's `AdapterCase` like every contract (`make_store` returns a `FeedStore`;
`make_registry` is the subscriptions' registry). SQL stores override
`TransactionContract.test_connection_is_refused`: they take a host connection.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from typing import Any

import pytest

from shard_sql.authority import AppendAuthority
from shard_sql.errors import IntentConflict, InvalidEvent, LeaseHeld, SeqConflict, StaleLease
from shard_sql.leases import LeaseRegistry
from shard_sql.ports import FeedStore
from shard_sql.testing.contracts import AdapterCase
from shard_sql.values import Event


class FeedCase(AdapterCase):
    """What the feed contracts share: `self.store` is a `FeedStore`."""

    store: FeedStore

    def check_feed(self, got: list[Event]) -> None:
        """Placed, positions increasing, each space in seq order."""
        positions = [e.position for e in got]
        assert None not in positions
        assert positions == sorted(set(positions)), positions  # type: ignore[type-var]
        assert all(p >= 1 for p in positions)  # type: ignore[operator]
        seqs: dict[str, int] = {}
        for e in got:
            assert e.seq > seqs.get(e.space, -1), (e.space, e.seq)
            seqs[e.space] = e.seq


def _key(e: Event) -> tuple[str, int]:
    return (e.space, e.seq)


class FeedContract(FeedCase):
    """The feed: positions, order, filters, paging, the head, waits, checkpoints."""

    def _fill(self) -> list[Event]:
        written: list[Event] = []
        for i in range(12):
            space = f"s{i % 3}"
            written.append(
                self.store.append(space, f"t{i % 2}", {"i": i}, expected_seq=self.store.head(space))
            )
        return written

    def test_empty_feed(self) -> None:
        assert self.store.feed() == []
        assert list(self.store.iter_feed()) == []
        assert self.store.feed_head() == 0
        assert self.store.checkpoints() == {}

    def test_every_event_once_with_a_position(self) -> None:
        written = self._fill()
        got = self.store.feed()
        self.check_feed(got)
        assert sorted(map(_key, got)) == sorted(map(_key, written))
        assert sorted(got, key=_key) == sorted(written, key=_key)  # equal but for positions
        assert self.store.feed_head() == got[-1].position

    def test_positions_follow_the_head_already_read(self) -> None:
        """An event appended after `feed_head()` returned h is placed above h."""
        for i in range(5):
            head = self.store.feed_head()
            space = f"s{i % 2}"
            self.store.append(space, "t", {"i": i}, expected_seq=self.store.head(space))
            got = self.store.feed(head)
            assert [e.payload["i"] for e in got] == [i]
        assert [e.payload["i"] for e in self.store.feed()] == list(range(5))

    def test_positions_never_change(self) -> None:
        self._fill()
        first = [(e.position, _key(e)) for e in self.store.feed()]
        self.store.append("later", "t", {}, expected_seq=0)
        again = [(e.position, _key(e)) for e in self.store.feed()]
        assert again[: len(first)] == first
        by_key = dict((k, p) for p, k in again)
        for space in self.store.spaces():
            for e in self.store.events(space):
                assert e.position in (None, by_key[_key(e)])

    def test_after_and_limit(self) -> None:
        self._fill()
        every = self.store.feed()
        positions = [e.position or 0 for e in every]
        for n in (0, 1, 5, 11, 12):
            after = positions[n - 1] if n else 0
            assert self.store.feed(after) == every[n:]
            assert [e.position for e in self.store.feed(after, limit=3)] == positions[n : n + 3]
        assert self.store.feed(limit=0) == []
        assert self.store.feed(positions[-1]) == []
        assert self.store.feed(2**63 - 1) == []

    def test_types(self) -> None:
        self._fill()
        every = self.store.feed()
        t0 = [e for e in every if e.type == "t0"]
        assert self.store.feed(types=["t0"]) == t0
        assert self.store.feed(types={"t0", "t1"}) == every
        assert self.store.feed(types=("nothing",)) == []
        assert self.store.feed(types=[]) == []
        assert self.store.feed(t0[1].position or 0, limit=2, types=["t0"]) == t0[2:4]
        assert list(self.store.iter_feed(types=["t0"])) == t0

    def test_iter_feed_is_lazy_and_long(self) -> None:
        n = 2_500
        for k in range(3):
            self.store.append_many(
                f"s{k}", [(f"t{i % 2}", {"i": i}) for i in range(n)], expected_seq=0
            )
        it = self.store.iter_feed()
        assert not isinstance(it, list | tuple)
        first = next(it)
        rest = list(it)
        got = [first, *rest]
        assert len(got) == 3 * n
        self.check_feed(got)
        after = got[n - 1].position or 0
        assert [_key(e) for e in self.store.iter_feed(after)] == [_key(e) for e in got[n:]]
        odd = list(self.store.iter_feed(types=["t1"]))
        assert odd == [e for e in got if e.type == "t1"]

    def test_feed_head(self) -> None:
        assert self.store.feed_head() == 0
        self.store.append("s", "t", {}, expected_seq=0)
        h1 = self.store.feed_head()
        assert h1 >= 1
        self.store.append_many("s", [("t", {}), ("t", {})], expected_seq=1)
        h2 = self.store.feed_head()
        assert h2 >= h1 + 2
        assert self.store.feed()[-1].position == h2

    def test_wait_feed(self) -> None:
        start = time.monotonic()
        assert self.store.wait_feed(0, timeout=0.2) is False
        assert time.monotonic() - start >= 0.15
        self.store.append("s", "t", {}, expected_seq=0)
        assert self.store.wait_feed(0, timeout=5) is True
        head = self.store.feed_head()
        assert self.store.wait_feed(head, timeout=0) is False

    def test_wait_feed_wakes_on_commits_of_other_threads(self) -> None:
        def later(write: Any) -> None:
            time.sleep(0.3)
            write()

        def in_transaction() -> None:
            with self.store.transaction() as tx:
                tx.append("s", "t", {"tx": True})

        writes = [
            lambda: self.store.append("s", "t", {}, expected_seq=self.store.head("s")),
            in_transaction,
        ]
        for write in writes:
            head = self.store.feed_head()
            thread = threading.Thread(target=later, args=(write,))
            thread.start()
            start = time.monotonic()
            assert self.store.wait_feed(head, timeout=20) is True
            assert time.monotonic() - start < 10
            thread.join()
            assert self.store.feed(head) != []

    def test_bad_feed_arguments(self) -> None:
        store: Any = self.store
        calls: list[Any] = [
            lambda: store.feed(-1),
            lambda: store.feed("1"),
            lambda: store.feed(2**63),
            lambda: store.feed(limit=-1),
            lambda: store.feed(limit=1.5),
            lambda: store.feed(types="t"),
            lambda: store.feed(types=[""]),
            lambda: store.feed(types=[None]),
            lambda: store.iter_feed(-1),
            lambda: store.iter_feed(types="t"),
            lambda: store.wait_feed(-1, timeout=0),
            lambda: store.wait_feed(0, timeout=-1),
            lambda: store.wait_feed(0, timeout=float("nan")),
            lambda: store.checkpoint(""),
            lambda: store.checkpoint(None),
            lambda: store.checkpoint("a\nb"),
        ]
        for call in calls:
            with pytest.raises(InvalidEvent):
                call()

    # -- checkpoints -------------------------------------------------------------------------

    def save(self, name: str, position: int, **kwargs: Any) -> None:
        with self.store.transaction() as tx:
            tx.save_checkpoint(name, position, **kwargs)

    def test_checkpoints_never_move_back(self) -> None:
        assert self.store.checkpoint("c") == 0
        self.save("c", 5)
        assert self.store.checkpoint("c") == 5
        self.save("c", 5)  # the same position again: fine
        with pytest.raises(SeqConflict):
            self.save("c", 4)
        assert self.store.checkpoint("c") == 5
        self.save("c", 9)
        self.save("b", 0)
        self.save("a", 2**63 - 1)
        assert self.store.checkpoints() == {"a": 2**63 - 1, "b": 0, "c": 9}
        assert list(self.store.checkpoints()) == ["a", "b", "c"]

    def test_checkpoint_within_one_transaction(self) -> None:
        with self.store.transaction() as tx:
            tx.save_checkpoint("c", 3)
            tx.save_checkpoint("c", 3)
            tx.save_checkpoint("c", 4)
        assert self.store.checkpoint("c") == 4
        with pytest.raises(SeqConflict), self.store.transaction() as tx:
            tx.save_checkpoint("c", 6)
            tx.save_checkpoint("c", 5)  # below an earlier save in this transaction
        assert self.store.checkpoint("c") == 4

    def test_checkpoint_fenced(self) -> None:
        registry = LeaseRegistry(self.store)
        lease = registry.acquire("subscription:c", "me", 30)
        self.save("c", 1, fence=lease)
        assert self.store.checkpoint("c") == 1
        registry.revoke("subscription:c")
        with pytest.raises(StaleLease):
            self.save("c", 2, fence=lease)
        assert self.store.checkpoint("c") == 1

    def test_bad_checkpoint_saves(self) -> None:
        for name, position in (("", 1), ("c", -1), ("c", "1"), ("c", 2**63), (5, 1)):
            with pytest.raises(InvalidEvent), self.store.transaction() as tx:
                tx.save_checkpoint(name, position)  # type: ignore[arg-type]
        assert self.store.checkpoints() == {}


class TransactionContract(FeedCase):
    """`store.transaction()`: several writes, one commit, or none."""

    def test_several_spaces_commit_together(self) -> None:
        self.store.append("a", "t", {"before": True}, expected_seq=0)
        with self.store.transaction() as tx:
            ea = tx.append("a", "t", {"n": 1})
            eb = tx.append_many("b", [("t", {"n": 2}), ("u", {"n": 3}, "intent-3")])
            tx.save_checkpoint("c", 1)
        assert (ea.seq, [e.seq for e in eb]) == (1, [0, 1])
        assert self.store.events("a")[1] == ea
        assert self.store.events("b") == eb
        assert self.store.checkpoint("c") == 1
        got = self.store.feed()
        self.check_feed(got)
        assert len(got) == 4

    def test_empty_transaction(self) -> None:
        with self.store.transaction():
            pass
        assert self.store.feed() == []

    def test_exception_rolls_everything_back(self) -> None:
        self.store.append("a", "t", {}, expected_seq=0)
        with self.store.transaction() as tx:
            tx.save_checkpoint("c", 1)
        with pytest.raises(RuntimeError), self.store.transaction() as tx:
            tx.append("a", "t", {})
            tx.append_many("b", [("t", {}), ("t", {})])
            tx.save_checkpoint("c", 5)
            raise RuntimeError("boom")
        self._nothing_more()

    def _nothing_more(self) -> None:
        assert self.store.head("a") == 1
        assert self.store.head("b") == 0
        assert self.store.checkpoint("c") == 1
        assert len(self.store.feed()) == 1
        # the store still works
        self.store.append("b", "t", {}, expected_seq=0)
        assert self.store.head("b") == 1

    def test_seq_conflict_in_any_space_rolls_everything_back(self) -> None:
        self.store.append("a", "t", {}, expected_seq=0)
        with self.store.transaction() as tx:
            tx.save_checkpoint("c", 1)
        with pytest.raises(SeqConflict), self.store.transaction() as tx:
            tx.append("a", "t", {})
            tx.append("b", "t", {})
            tx.save_checkpoint("c", 2)
            tx.append("a", "t", {}, expected_seq=1)  # the transaction's own write is at 1
        self._nothing_more()

    def test_stale_fence_rolls_everything_back(self) -> None:
        registry = LeaseRegistry(self.store)
        lease = registry.acquire("b", "me", 30)
        self.store.append("a", "t", {}, expected_seq=0)
        with self.store.transaction() as tx:
            tx.save_checkpoint("c", 1)
        registry.revoke("b")
        with pytest.raises(StaleLease), self.store.transaction() as tx:
            tx.append("a", "t", {})
            tx.save_checkpoint("c", 2)
            tx.append("b", "t", {}, fence=lease)
        self._nothing_more()

    def test_a_failed_write_dooms_the_block(self) -> None:
        """A write that failed, even one the block caught, dooms the transaction: nothing of it
        commits and the block's end raises (the first failure, or InvalidEvent("transaction"))."""
        self.store.append("a", "t", {"k": 0}, expected_seq=0, intent_id="i0")
        registry = LeaseRegistry(self.store)
        lease = registry.acquire("f", "me", 30)
        registry.revoke("f")
        with self.store.transaction() as tx:
            tx.save_checkpoint("c", 1)
        failing: list[tuple[type[Exception], Any]] = [
            (SeqConflict, lambda tx: tx.append("a", "t", {}, expected_seq=5)),
            (StaleLease, lambda tx: tx.append("f", "t", {}, fence=lease)),
            (IntentConflict, lambda tx: tx.append("a", "t", {"k": 1}, intent_id="i0")),
            (SeqConflict, lambda tx: tx.save_checkpoint("c", 0)),
            (InvalidEvent, lambda tx: tx.append_many("a", [])),
        ]
        for error, write in failing:
            with pytest.raises((error, InvalidEvent)) as info, self.store.transaction() as tx:
                tx.append("b", "t", {})
                tx.save_checkpoint("c", 2)
                with pytest.raises(error):
                    write(tx)
                with contextlib.suppress(InvalidEvent):  # a backend may refuse more writes
                    tx.append("b", "t", {"after": True})
            if not isinstance(info.value, error):
                assert isinstance(info.value, InvalidEvent) and info.value.field == "transaction"
            with pytest.raises(InvalidEvent):
                tx.append("b", "t", {})
        self._nothing_more()

    def test_current_fence_writes(self) -> None:
        registry = LeaseRegistry(self.store)
        lease = registry.acquire("a", "me", 30)
        with self.store.transaction() as tx:
            e = tx.append("a", "t", {}, fence=lease)
            [f] = tx.append_many("a", [("t", {})], fence=lease)
        assert (e.writer, e.generation, f.seq) == ("me", lease.generation, 1)
        assert self.store.events("a") == [e, f]
        with pytest.raises(InvalidEvent), self.store.transaction() as tx:
            tx.append("other", "t", {}, fence=lease)

    def test_expected_seq_none_is_the_head_with_own_writes(self) -> None:
        self.store.append_many("a", [("t", {}), ("t", {})], expected_seq=0)
        with self.store.transaction() as tx:
            assert tx.append("a", "t", {"n": 2}).seq == 2
            assert tx.append("a", "t", {"n": 3}).seq == 3
            assert [e.seq for e in tx.append_many("a", [("t", {}), ("t", {})])] == [4, 5]
            assert tx.append("a", "t", {}, expected_seq=6).seq == 6
            assert tx.append("fresh", "t", {}).seq == 0
        assert self.store.head("a") == 7
        assert self.store.head("fresh") == 1

    def test_wrong_expected_seq(self) -> None:
        self.store.append("a", "t", {}, expected_seq=0)
        for seq in (0, 2):
            with pytest.raises(SeqConflict), self.store.transaction() as tx:
                tx.append("a", "t", {}, expected_seq=seq)
        assert self.store.head("a") == 1

    def test_intent_ids_as_outside(self) -> None:
        before = self.store.append("a", "t", {"k": 0}, expected_seq=0, intent_id="i0")
        with self.store.transaction() as tx:
            assert tx.append("a", "t", {"k": 0}, intent_id="i0") == before
            one = tx.append("a", "t", {"k": 1}, intent_id="i1")
            assert tx.append("a", "t", {"k": 1}, intent_id="i1") == one
            assert tx.append_many("a", [("t", {"k": 1}, "i1")]) == [one]
            assert tx.append("a", "t", {"k": 2}).seq == 2
        assert [e.payload["k"] for e in self.store.events("a")] == [0, 1, 2]

    def test_use_after_the_block_ended(self) -> None:
        with self.store.transaction() as done:
            done.append("a", "t", {})
        with pytest.raises(RuntimeError), self.store.transaction() as failed:
            raise RuntimeError
        calls: list[Any] = [
            lambda t: t.append("a", "t", {}),
            lambda t: t.append_many("a", [("t", {})]),
            lambda t: t.save_checkpoint("c", 1),
        ]
        for tx in (done, failed):
            for call in calls:
                with pytest.raises(InvalidEvent) as info:
                    call(tx)
                assert info.value.field == "transaction"
        assert self.store.head("a") == 1

    def test_bad_input_writes_nothing(self) -> None:
        calls: list[Any] = [
            lambda tx: tx.append("a", "t", {"x": float("nan")}),
            lambda tx: tx.append("", "t", {}),
            lambda tx: tx.append("a", "", {}),
            lambda tx: tx.append("a", "t", {}, expected_seq=-1),
            lambda tx: tx.append_many("a", []),
            lambda tx: tx.append_many("a", "t"),
        ]
        for call in calls:
            with pytest.raises(InvalidEvent), self.store.transaction() as tx:
                tx.append("b", "t", {})
                call(tx)
        assert self.store.feed() == []

    def test_connection_is_refused(self) -> None:
        """Memory and git stores join no host connection (SQL suites override this)."""
        with pytest.raises(InvalidEvent) as info, self.store.transaction(connection=object()):
            pass
        assert info.value.field == "connection"
        assert self.store.feed() == []

    # -- concurrency -------------------------------------------------------------------------

    WRITERS = 4
    TRANSACTIONS = 25

    def test_concurrent_transactions_and_a_reader(self) -> None:
        """Writers hold transactions open for random times, some roll back, while a reader pages
        the feed: it reads exactly the committed events, once each, in order."""
        committed: list[tuple[str, int, str]] = []
        lock = threading.Lock()
        writers_done = threading.Event()

        def writer(w: int) -> None:
            rnd = random.Random(w)
            for i in range(self.TRANSACTIONS):
                spaces = rnd.sample(["shared-0", "shared-1", f"own-{w}"], rnd.randint(1, 2))
                try:
                    with self.store.transaction() as tx:
                        out: list[Event] = []
                        for space in spaces:
                            n = rnd.randint(1, 3)
                            items = [("t", {"id": f"{w}.{i}.{space}.{k}"}) for k in range(n)]
                            out.extend(tx.append_many(space, items))
                            time.sleep(rnd.random() * 0.004)
                        if rnd.random() < 0.25:
                            raise _RolledBack
                except (_RolledBack, SeqConflict):
                    continue
                with lock:
                    committed.extend((e.space, e.seq, e.payload["id"]) for e in out)

        seen: list[Event] = []

        def reader() -> None:
            after = 0
            while True:
                done = writers_done.is_set()
                page = self.store.feed(after, limit=7)
                seen.extend(page)
                if page:
                    after = page[-1].position or after
                elif done:
                    return
                else:
                    self.store.wait_feed(after, timeout=0.05)

        threads = [threading.Thread(target=writer, args=(w,)) for w in range(self.WRITERS)]
        read = threading.Thread(target=reader)
        read.start()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        writers_done.set()
        read.join()
        self.check_feed(seen)
        got = [(e.space, e.seq, e.payload["id"]) for e in seen]
        assert len(got) == len(set(got))
        assert sorted(got) == sorted(committed)
        assert sorted(got) == sorted((e.space, e.seq, e.payload["id"]) for e in self.store.feed())
        assert committed, "no transaction committed"


class AuthorityTransactionContract(FeedCase):
    """`node.transaction()`: writes fenced by the node's leases; a space another node holds is
    `LeaseHeld` (no forwarding into a transaction), at once."""

    def nodes(self) -> tuple[AppendAuthority, AppendAuthority]:
        registry = LeaseRegistry(self.store)
        return (
            AppendAuthority("node-a", self.store, registry),
            AppendAuthority("node-b", self.store, registry),
        )

    def test_held_and_unleased_spaces(self) -> None:
        a, _ = self.nodes()
        held = a.acquire("held")
        with a.transaction() as tx:
            # Unleased: acquired first (before the block's first write, as SQLite needs).
            [f] = tx.append_many("fresh", [("t", {})])
            e = tx.append("held", "t", {})
            tx.save_checkpoint("c", 1)
        assert (e.writer, e.generation) == ("node-a", held.generation)
        assert a.holds("fresh") and f.writer == "node-a"
        assert self.store.events("held") == [e]
        assert self.store.checkpoint("c") == 1
        assert a.append("held", "t", {}).seq == 1  # the node's own append after it

    def test_a_space_another_node_holds_is_lease_held(self) -> None:
        a, b = self.nodes()
        b.acquire("theirs")
        start = time.monotonic()
        with pytest.raises(LeaseHeld) as info, a.transaction() as tx:
            tx.append("mine", "t", {})
            tx.append("theirs", "t", {})
        assert time.monotonic() - start < 5
        assert info.value.lease.holder == "node-b"
        assert "node-b" in str(info.value)
        assert (self.store.head("mine"), self.store.head("theirs")) == (0, 0)
        # a caught LeaseHeld still dooms the block
        with pytest.raises(LeaseHeld), a.transaction() as tx:
            tx.append("mine", "t", {})
            with pytest.raises(LeaseHeld):
                tx.append("theirs", "t", {})
        assert self.store.head("mine") == 0
        assert a.append("theirs", "t", {"forwarded": True}).writer == "node-b"

    def test_a_lost_lease_fences_the_block(self) -> None:
        a, b = self.nodes()
        a.acquire("s")
        a.registry.revoke("s")
        b.acquire("s")
        with pytest.raises(StaleLease), a.transaction() as tx:
            tx.append("other", "t", {})
            tx.append("s", "t", {})  # the node still believes it holds it
        assert (self.store.head("s"), self.store.head("other")) == (0, 0)

    def test_leases_kept_outside_the_store_are_refused(self) -> None:
        node = AppendAuthority("node-a", self.store, LeaseRegistry())
        with pytest.raises(InvalidEvent) as info:
            node.transaction()
        assert info.value.field == "registry"


class _RolledBack(Exception):
    pass
