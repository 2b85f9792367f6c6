"""Contract suites every adapter runs, and what they need (clocks, hostile inputs).

An adapter plugs in with one small test file: a class that opens it (`make_store`, and
`store_url` when other processes can open the same store), mixed into each contract:

    class MyStore(AdapterCase):
        def make_store(self) -> EventStore:
            return MyEventStore(self.store_url())

        def store_url(self) -> str:
            return f"my://{self.tmp_path}/db"

    class TestMyStore(MyStore, StoreContract): ...
    class TestMyAuthority(MyStore, AuthorityContract): ...
    class TestMyLeaseRules(MyStore, LeaseRulesContract): ...
    class TestMyIntentQueue(MyStore, IntentQueueContract): ...  # stores that forward
    class TestMyForwarding(MyStore, ForwardingContract): ...
    class TestMyFeed(MyStore, FeedContract): ...  # stores with the feed (FeedStore)
    class TestMyTransactions(MyStore, TransactionContract): ...
    class TestMySubscription(MyStore, SubscriptionContract): ...
    class TestMyNodeTransactions(MyStore, AuthorityTransactionContract): ...
    class TestMyProcesses(MyStore, ProcessForwardingContract): ...  # needs store_url

The cases use pytest; the contracts are classes, so pytest collects them only as `Test*`
subclasses. docs/architecture.md lists every contract.
"""

from shard_sql.testing.clocks import ManualClock
from shard_sql.testing.contracts import (
    BAD_PAYLOADS,
    BAD_SPACES,
    HOSTILE_SPACES,
    AdapterCase,
    AuthorityContract,
    StoreContract,
)
from shard_sql.testing.feed import (
    AuthorityTransactionContract,
    FeedContract,
    TransactionContract,
)
from shard_sql.testing.intent_queue import ForwardingContract, IntentQueueContract
from shard_sql.testing.leases import LeaseRulesContract
from shard_sql.testing.processes import ProcessForwardingContract
from shard_sql.testing.subscriptions import SubscriptionContract

__all__ = [
    "BAD_PAYLOADS",
    "BAD_SPACES",
    "HOSTILE_SPACES",
    "AdapterCase",
    "AuthorityContract",
    "AuthorityTransactionContract",
    "FeedContract",
    "ForwardingContract",
    "IntentQueueContract",
    "LeaseRulesContract",
    "ManualClock",
    "ProcessForwardingContract",
    "StoreContract",
    "SubscriptionContract",
    "TransactionContract",
]
