"""The contracts on the SQL adapter: a SQLite file, SQLite in memory and a real PostgreSQL."""

from __future__ import annotations

import pytest
from sqlalchemy import create_engine

from shard_sql.ports import EventStore
from shard_sql.sql import SqlEventStore
from shard_sql.testing import (
    AdapterCase,
    AuthorityContract,
    ForwardingContract,
    IntentQueueContract,
    LeaseRulesContract,
    ProcessForwardingContract,
    StoreContract,
)


def intent_records(url: str) -> int:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return int(conn.exec_driver_sql("SELECT count(*) FROM intents").scalar_one())
    finally:
        engine.dispose()


class SqlHooks(AdapterCase):
    def check_after(self, *, holder_killed: bool) -> None:
        if not holder_killed:  # a holder that lived forgot what it applied
            assert intent_records(self.store_url() or "") == 0


class SqliteFile(SqlHooks):
    def make_store(self) -> EventStore:
        return SqlEventStore(self.store_url())

    def store_url(self) -> str:
        return f"sqlite:///{self.tmp_path}/shard.db"


class SqliteMemory(AdapterCase):
    def make_store(self) -> EventStore:
        return SqlEventStore("sqlite://")


class Postgres(SqlHooks):
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


class TestSqliteForwarding(SqliteFile, ForwardingContract):
    pass


class TestSqliteForwardingDurable(SqliteFile, ForwardingContract):
    handoff = False


class TestSqliteProcesses(SqliteFile, ProcessForwardingContract):
    pass


class TestSqliteProcessesDurable(SqliteFile, ProcessForwardingContract):
    handoff = False


class TestSqliteMemoryForwarding(SqliteMemory, ForwardingContract):
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


@pytest.mark.postgres
class TestPostgresForwarding(Postgres, ForwardingContract):
    pass


@pytest.mark.postgres
class TestPostgresForwardingDurable(Postgres, ForwardingContract):
    handoff = False


@pytest.mark.postgres
class TestPostgresProcesses(Postgres, ProcessForwardingContract):
    pass


@pytest.mark.postgres
class TestPostgresProcessesDurable(Postgres, ProcessForwardingContract):
    handoff = False
