"""The contract suites on the in-memory adapter, with leases in the store and in the registry."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from shard_sql import AppendAuthority, InMemoryEventStore, InvalidEvent, Lease, LeaseRegistry
from shard_sql.leases import MemoryLeases, renewal_due, renewal_not_due_before
from shard_sql.ports import EventStore, LeaseStore
from shard_sql.testing import (
    AdapterCase,
    AuthorityContract,
    ForwardingContract,
    IntentQueueContract,
    LeaseRulesContract,
    ManualClock,
    StoreContract,
)


class Memory(AdapterCase):
    def make_store(self) -> EventStore:
        return InMemoryEventStore()


class TestMemoryStore(Memory, StoreContract):
    pass


class TestMemoryAuthority(Memory, AuthorityContract):
    pass


class TestMemoryAuthorityRegistryLeases(Memory, AuthorityContract):
    """Leases kept in the registry's own memory (`LeaseRegistry()`), the store separate."""

    def make_registry(self, store: EventStore, clock: ManualClock | None = None) -> LeaseRegistry:
        return LeaseRegistry(clock=clock)


class TestMemoryLeaseRules(Memory, LeaseRulesContract):
    pass


class TestRegistryLeaseRules(Memory, LeaseRulesContract):
    """The records of a `LeaseRegistry()` without a store."""

    def make_lease_store(self) -> LeaseStore:
        return MemoryLeases()


class TestMemoryIntentQueue(Memory, IntentQueueContract):
    pass


class TestMemoryForwarding(Memory, ForwardingContract):
    pass


def test_registry_of_another_store_is_refused() -> None:
    one, other = InMemoryEventStore(), InMemoryEventStore()
    with pytest.raises(InvalidEvent):
        AppendAuthority("A", one, LeaseRegistry(other))


def test_registry_needs_a_lease_store() -> None:
    with pytest.raises(InvalidEvent):
        LeaseRegistry(object())


def test_renewal_is_never_due_before_the_time_the_lease_rules_give() -> None:
    """`renewal_not_due_before` lets a holder skip `renewal_due` until then; it must never skip
    a time at which the renewal is due, and the renewal comes due soon after it."""
    start = datetime(2026, 1, 1, tzinfo=UTC)
    for ttl in (0.01, 1.0, 30.0, 3600.0):
        lease = Lease("s", "n", start + timedelta(seconds=ttl), 1)
        before = renewal_not_due_before(lease, ttl)
        for step in range(0, 2001):
            now = start + timedelta(seconds=ttl * step / 1000)
            if now < before:
                assert not renewal_due(lease, now, ttl), (ttl, now)
        assert renewal_due(lease, before + timedelta(seconds=1.001), ttl)
