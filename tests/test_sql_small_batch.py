"""SQLite: a small batch (a holder's group commit) is one statement whose checks hold for the
whole batch or write nothing (`shard_sql.sql.dialects.sqlite_batch`)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shard_sql import InvalidEvent, LeaseRegistry, SeqConflict, SqlEventStore, StaleLease
from shard_sql.sql.dialects import sqlite_batch


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqlEventStore]:
    s = SqlEventStore(f"sqlite:///{tmp_path / 'b.db'}")
    yield s
    s.close()


def traced(store: SqlEventStore) -> list[str]:
    """The statements the store's next calls run (one thread: the pool gives back this
    connection)."""
    seen: list[str] = []
    with store.database.connection() as c:
        c.raw.set_trace_callback(seen.append)
    return seen


def items(n: int, prefix: str = "i") -> list[tuple[str, dict[str, Any], str]]:
    return [("t", {"n": k}, f"{prefix}{k}") for k in range(n)]


def test_a_small_batch_is_one_statement_and_its_events_carry_their_positions(
    store: SqlEventStore,
) -> None:
    store.append("other", "t", {}, expected_seq=0)
    seen = traced(store)
    written = store.append_many("s", items(4), expected_seq=0)
    inserts = [s for s in seen if s.startswith("INSERT")]
    assert len(inserts) == 1 and not any(s.startswith("BEGIN") for s in seen)
    assert [e.seq for e in written] == [0, 1, 2, 3]
    assert [e.position for e in written] == [2, 3, 4, 5]
    assert store.events("s") == written
    assert [e.position for e in store.feed()] == [1, 2, 3, 4, 5]


def test_a_batch_over_the_bound_is_one_transaction(store: SqlEventStore) -> None:
    n = sqlite_batch.SMALL_BATCH + 1
    seen = traced(store)
    written = store.append_many("s", items(n), expected_seq=0)
    assert any(s.startswith("BEGIN") for s in seen)
    assert [e.position for e in written] == list(range(1, n + 1))
    assert store.events("s") == written


def test_a_wrong_head_writes_nothing(store: SqlEventStore) -> None:
    store.append("s", "t", {}, expected_seq=0)
    with pytest.raises(SeqConflict):
        store.append_many("s", items(3), expected_seq=0)
    with pytest.raises(SeqConflict):
        store.append_many("s", items(3), expected_seq=2)
    assert store.head("s") == 1 and store.feed_head() == 1


def test_a_stale_fence_writes_nothing(store: SqlEventStore) -> None:
    registry = LeaseRegistry(store)
    old = registry.acquire("s", "a", 60)
    registry.revoke("s")
    with pytest.raises(StaleLease):
        store.append_many("s", items(3), expected_seq=0, fence=old)
    new = registry.acquire("s", "b", 60)
    written = store.append_many("s", items(3), expected_seq=0, fence=new)
    assert {(e.writer, e.generation) for e in written} == {("b", new.generation)}


def test_written_intent_ids_return_their_events_and_write_nothing(store: SqlEventStore) -> None:
    first = store.append_many("s", items(3), expected_seq=0)
    assert store.append_many("s", items(3), expected_seq=3) == first
    # Some written, some not: refused whole.
    with pytest.raises(InvalidEvent):
        store.append_many("s", [*items(1), ("t", {"n": 9}, "new")], expected_seq=3)
    # An id written, then other items: the id's event is there, so nothing of the batch is.
    with pytest.raises(InvalidEvent):
        store.append_many("s", [("t", {}, "fresh"), ("t", {"n": 2}, "i2")], expected_seq=3)
    assert store.head("s") == 3 and store.feed_head() == 3


def test_items_without_intent_ids_beside_ones_with(store: SqlEventStore) -> None:
    written = store.append_many(
        "s", [("t", {"a": 1}), ("t", {"a": 2}, "x"), ("t", {"a": 3})], expected_seq=0
    )
    assert [e.intent_id for e in written] == [None, "x", None]
    assert store.append_many("s", [("t", {"a": 2}, "x")], expected_seq=3) == [written[1]]
    assert store.events("s") == written


@pytest.mark.parametrize("n", [1, 2, 5, sqlite_batch.SMALL_BATCH])
def test_the_statement_binds_six_parameters_a_row(n: int) -> None:
    sql = sqlite_batch.small_batch_sql(n, fence=True)
    assert f"?{sqlite_batch.FIRST_ROW + sqlite_batch.ROW * n - 1}" in sql
    assert f"?{sqlite_batch.FIRST_ROW + sqlite_batch.ROW * n}" not in sql
