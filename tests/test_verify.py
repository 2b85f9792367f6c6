"""`shard_sql.verify.verify`: a clean log passes; each broken invariant is reported."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from datetime import UTC, datetime

from shard_sql import AppendAuthority, InMemoryEventStore, LeaseRegistry
from shard_sql.store_base import StoreBase
from shard_sql.validation import Pending, pending
from shard_sql.values import Event
from shard_sql.verify import MAX_VIOLATIONS, Violation, verify

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def raw(type_: str, *, writer: str, generation: int, intent_id: str | None = None) -> Pending:
    return dataclasses.replace(
        pending(type_, {"n": 1}, intent_id), recorded_at=T0, writer=writer, generation=generation
    )


def write(store: InMemoryEventStore, space: str, *items: Pending) -> None:
    store.write(space, list(items), expected_seq=store.head(space), fence=None, verify_fence=False)


def rules(store: object) -> list[tuple[str, int | None, str]]:
    report = verify(store)  # type: ignore[arg-type]
    return [(v.space, v.seq, v.rule) for v in report.violations]


def test_clean_log_through_authorities() -> None:
    store = InMemoryEventStore()
    registry = LeaseRegistry(store)
    a = AppendAuthority("a", store, registry)
    b = AppendAuthority("b", store, registry)
    a.append("s", "t", {"i": 0}, intent_id="x0")
    b.append("s", "t", {"i": 1})
    a.release("s")
    b.append("s", "t", {"i": 2}, intent_id="x2")
    store.append("u", "t", {}, expected_seq=0)  # unfenced
    seen: list[int] = []
    report = verify(store, progress=seen.append)
    assert report.ok, report.violations
    assert report.events == 4 and sum(seen) == 4
    by_space = {s.space: s for s in report.spaces}
    assert by_space["s"].generations == 2 and by_space["s"].unfenced == 0
    assert by_space["u"].unfenced == 1
    assert report.to_dict()["ok"] is True


def test_empty_store() -> None:
    report = verify(InMemoryEventStore())
    assert report.ok and report.spaces == [] and report.events == 0


def test_generation_decreasing() -> None:
    store = InMemoryEventStore()
    write(store, "s", raw("t", writer="a", generation=2), raw("t", writer="b", generation=1))
    assert rules(store) == [("s", 1, "generation")]


def test_two_writers_in_one_generation() -> None:
    store = InMemoryEventStore()
    write(store, "s", raw("t", writer="a", generation=1), raw("t", writer="b", generation=1))
    report = verify(store)
    assert [(v.seq, v.rule) for v in report.violations] == [(1, "writer")]
    assert "'b'" in report.violations[0].message and "'a'" in report.violations[0].message
    assert not report.ok and report.to_dict()["violations"] == 1


def test_unfenced_events_are_exempt() -> None:
    store = InMemoryEventStore()
    write(
        store,
        "s",
        raw("t", writer="a", generation=3),
        raw("t", writer="", generation=0),
        raw("t", writer="a", generation=3),
    )
    assert rules(store) == []


class FakeStore(StoreBase):
    """A store that returns whatever log it is given (to show broken seqs and intents)."""

    def __init__(self, logs: dict[str, list[Event]], heads: dict[str, int] | None = None):
        self.logs = logs
        self.heads = heads or {s: len(log) for s, log in logs.items()}
        self.extra: list[Violation] = []

    def events(self, space: str, *, from_seq: int = 0, limit: int | None = None) -> list[Event]:
        log = self.logs.get(space, [])[from_seq:]
        return log if limit is None else log[:limit]

    def iter_events(self, space: str, *, from_seq: int = 0) -> Iterator[Event]:
        return iter(self.events(space, from_seq=from_seq))

    def head(self, space: str) -> int:
        return self.heads.get(space, 0)

    def spaces(self) -> list[str]:
        return sorted(self.logs)

    def write(self, *args: object, **kwargs: object) -> list[Event]:
        raise NotImplementedError

    def verify_store(self) -> list[Violation]:
        return self.extra


def ev(space: str, seq: int, intent_id: str | None = None, gen: int = 1) -> Event:
    return Event(space, seq, "t", {}, T0, "w", gen, intent_id)


def test_gap_duplicate_and_head() -> None:
    store = FakeStore({"s": [ev("s", 0), ev("s", 2), ev("s", 2)]}, heads={"s": 4})
    assert rules(store) == [("s", 2, "seq"), ("s", 2, "seq"), ("s", None, "head")]
    messages = [v.message for v in verify(store).violations]
    assert "seq 1 is missing" in messages[0] and "again" in messages[1]


def test_intent_written_twice_and_wrong_space() -> None:
    store = FakeStore({"s": [ev("s", 0, "i"), ev("x", 1, "i")]})
    assert rules(store) == [("s", 1, "space"), ("s", 1, "intent")]


def test_store_checks_join_the_report() -> None:
    store = FakeStore({})
    store.extra = [Violation("s", 3, "store", "intent applied twice")]
    report = verify(store)
    assert not report.ok and str(report.violations[0]) == "'s' seq 3: [store] intent applied twice"


def test_only_selected_spaces() -> None:
    store = FakeStore({"bad": [ev("bad", 1)], "good": [ev("good", 0)]})
    assert verify(store, spaces=["good"]).ok
    assert not verify(store).ok


def test_many_violations_are_counted_not_kept() -> None:
    n = MAX_VIOLATIONS + 50
    store = FakeStore({"s": [ev("s", i, gen=n - i) for i in range(n)]})
    report = verify(store)
    assert report.violation_count == n - 1
    assert len(report.violations) == MAX_VIOLATIONS
