"""The contract suites on the in-memory adapter, with leases in the store and in the registry."""

from __future__ import annotations

import pytest

from shard_sql import AppendAuthority, InMemoryEventStore, InvalidEvent, LeaseRegistry
from shard_sql.ports import EventStore
from shard_sql.testing import AuthorityContract, ForwardingContract, ManualClock, StoreContract


class TestMemoryStore(StoreContract):
    def make_store(self) -> EventStore:
        return InMemoryEventStore()


class TestMemoryAuthority(AuthorityContract):
    def make_store(self) -> EventStore:
        return InMemoryEventStore()


class TestMemoryAuthorityRegistryLeases(AuthorityContract):
    """Leases kept in the registry's own memory (`LeaseRegistry()`), the store separate."""

    def make_store(self) -> EventStore:
        return InMemoryEventStore()

    def make_registry(self, store: EventStore, clock: ManualClock) -> LeaseRegistry:
        return LeaseRegistry(clock=clock)


def test_registry_of_another_store_is_refused() -> None:
    one, other = InMemoryEventStore(), InMemoryEventStore()
    with pytest.raises(InvalidEvent):
        AppendAuthority("A", one, LeaseRegistry(other))


def test_registry_needs_a_lease_store() -> None:
    with pytest.raises(InvalidEvent):
        LeaseRegistry(object())


class TestMemoryForwarding(ForwardingContract):
    def make_store(self) -> EventStore:
        return InMemoryEventStore()
