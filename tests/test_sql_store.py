"""The contracts on the SQL adapter: a SQLite file and a real PostgreSQL."""

from __future__ import annotations

import pytest

from shard_sql.ports import EventStore
from shard_sql.sql import SqlEventStore
from shard_sql.testing import (
    AdapterCase,
    AuthorityContract,
    IntentQueueContract,
    LeaseRulesContract,
    StoreContract,
)


class SqliteFile(AdapterCase):
    def make_store(self) -> EventStore:
        return SqlEventStore(self.store_url())

    def store_url(self) -> str:
        return f"sqlite:///{self.tmp_path}/shard.db"


class Postgres(AdapterCase):
    def make_store(self) -> EventStore:
        return SqlEventStore(self.store_url())

    def store_url(self) -> str:
        if not hasattr(self, "_pg"):
            self._pg: str = self.request.getfixturevalue("pg_migrated_url")
        return self._pg


class TestSqliteStore(SqliteFile, StoreContract):
    pass


class TestSqliteAuthority(SqliteFile, AuthorityContract):
    pass


class TestSqliteLeaseRules(SqliteFile, LeaseRulesContract):
    pass


class TestSqliteIntentQueue(SqliteFile, IntentQueueContract):
    pass


@pytest.mark.postgres
class TestPostgresStore(Postgres, StoreContract):
    pass


@pytest.mark.postgres
class TestPostgresAuthority(Postgres, AuthorityContract):
    pass


@pytest.mark.postgres
class TestPostgresLeaseRules(Postgres, LeaseRulesContract):
    pass


@pytest.mark.postgres
class TestPostgresIntentQueue(Postgres, IntentQueueContract):
    pass
