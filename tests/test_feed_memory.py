"""The feed, transaction and subscription contracts on the in-memory adapter."""

from __future__ import annotations

import dataclasses
import threading
import time

import pytest

from shard_sql import InMemoryEventStore, LeaseRegistry, SeqConflict, Subscription
from shard_sql.ports import Clock, EventStore
from shard_sql.testing import (
    AdapterCase,
    AuthorityTransactionContract,
    FeedContract,
    SubscriptionContract,
    TransactionContract,
)


class Memory(AdapterCase):
    def make_store(self) -> EventStore:
        return InMemoryEventStore()


class TestMemoryFeed(Memory, FeedContract):
    pass


class TestMemoryTransactions(Memory, TransactionContract):
    pass


class TestMemoryNodeTransactions(Memory, AuthorityTransactionContract):
    pass


class TestMemorySubscription(Memory, SubscriptionContract):
    pass


class TestMemorySubscriptionRegistryLeases(Memory, SubscriptionContract):
    """Subscription leases kept in the registry's own memory (`LeaseRegistry()`)."""

    def make_registry(self, store: EventStore, clock: Clock | None = None) -> LeaseRegistry:
        return LeaseRegistry(clock=clock)


def test_position_takes_no_part_in_equality() -> None:
    store = InMemoryEventStore()
    e = store.append("s", "t", {}, expected_seq=0)
    assert e.position == 1
    unplaced = dataclasses.replace(e, position=None)
    assert unplaced == e and hash(unplaced) == hash(e)
    assert store.feed() == [unplaced]


def test_transaction_events_are_placed_when_the_block_ends() -> None:
    store = InMemoryEventStore()
    store.append("a", "t", {}, expected_seq=0)
    with store.transaction() as tx:
        written = tx.append_many("b", [("t", {}), ("t", {})])
        assert [e.position for e in written] == [None, None]
        assert store.head("b") == 0  # not applied before the end
    assert [e.position for e in store.events("b")] == [2, 3]
    assert store.feed_head() == 3


def test_a_transaction_holds_the_store_for_its_block() -> None:
    store = InMemoryEventStore()
    order: list[str] = []

    def other() -> None:
        store.append("b", "t", {}, expected_seq=0)
        order.append("other")

    thread = threading.Thread(target=other)
    with store.transaction() as tx:
        tx.append("a", "t", {})
        thread.start()
        time.sleep(0.1)
        order.append("block")
    thread.join()
    assert order == ["block", "other"]
    assert [e.space for e in store.feed()] == ["a", "b"]


def test_commit_checks_again() -> None:
    """A write of the block's own thread outside the transaction comes between: the block's
    write to that space then conflicts at the end, and nothing of the block is applied."""
    store = InMemoryEventStore()
    with pytest.raises(SeqConflict), store.transaction() as tx:
        tx.append("a", "t", {})
        tx.append("b", "t", {})
        store.append("a", "t", {"outside": True}, expected_seq=0)
    assert [e.payload for e in store.feed()] == [{"outside": True}]


def test_subscription_is_exported() -> None:
    import shard_sql

    assert shard_sql.Subscription is Subscription
