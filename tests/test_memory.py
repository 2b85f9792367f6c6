"""The contract suites on the in-memory adapter, with leases in the store and in the registry."""

from __future__ import annotations

import pytest

from shard_sql import AppendAuthority, InMemoryEventStore, InvalidEvent, LeaseRegistry
from shard_sql.leases import MemoryLeases
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
