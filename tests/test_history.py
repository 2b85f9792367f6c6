"""The history checker finds each kind of violation, and passes a clean run."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

from shard_sql import AppendAuthority, InMemoryEventStore, LeaseRegistry
from shard_sql.history import Grant, Op, check
from shard_sql.values import Event

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def ev(seq: int, op: str, gen: int = 1, writer: str = "A", at: float = 0, **kw: Any) -> Event:
    return Event("s", seq, "t", {"op": op}, T0 + timedelta(seconds=at), writer, gen, kw.get("i"))


def ok(op: str, seq: int, invoked: float = 0, done: float = 1) -> Op:
    return Op(op, "s", "A", invoked, "ok", done, seq)


def test_clean_run_passes() -> None:
    logs = {"s": [ev(0, "a"), ev(1, "b"), ev(2, "c", gen=2, writer="B")]}
    ops = [ok("a", 0, 0, 1), ok("b", 1, 2, 3), Op("c", "s", "B", 4), Op("d", "s", "B", 4, "failed")]
    grants = [Grant("s", "A", 1, T0 - timedelta(1)), Grant("s", "B", 2, T0 + timedelta(1))]
    report = check(logs, ops, grants)
    assert report.ok, report.violations
    assert report.operations == 4 and report.events == 3


def violations(logs: list[Event], ops: list[Op], grants: list[Grant] | None = None) -> str:
    report = check({"s": logs}, ops, grants or [])
    assert not report.ok
    return "\n".join(report.violations)


def test_gap_and_fork() -> None:
    assert "fork or gap" in violations([ev(0, "a"), ev(2, "b")], [ok("a", 0), ok("b", 2)])
    assert "fork or gap" in violations([ev(0, "a"), ev(0, "b")], [ok("a", 0), ok("b", 0)])


def test_lost_and_duplicated_acks() -> None:
    assert "present 0 times" in violations([ev(0, "a")], [ok("a", 0), ok("b", 1)])
    assert "present 2 times" in violations([ev(0, "a"), ev(1, "a")], [ok("a", 0)])
    assert "acknowledged at seq 1" in violations([ev(0, "a")], [ok("a", 1)])


def test_failed_present_and_unknown_twice() -> None:
    assert "failed op" in violations([ev(0, "a")], [Op("a", "s", "A", 0, "failed")])
    assert "unknown outcome present 2" in violations(
        [ev(0, "a"), ev(1, "a")], [Op("a", "s", "A", 0)]
    )


def test_phantom_event() -> None:
    assert "no recorded op" in violations([ev(0, "a"), ev(1, "z")], [ok("a", 0)])


def test_generation_order_and_writers() -> None:
    logs = [ev(0, "a", gen=2), ev(1, "b", gen=1)]
    assert "generation decreases" in violations(logs, [ok("a", 0), ok("b", 1)])
    logs = [ev(0, "a", writer="A"), ev(1, "b", writer="B")]
    assert "written by" in violations(logs, [ok("a", 0), ok("b", 1)])


def test_two_holders_of_one_generation() -> None:
    grants = [Grant("s", "A", 1, T0), Grant("s", "B", 1, T0)]
    assert "granted to" in violations([ev(0, "a")], [ok("a", 0)], grants)


def test_write_after_newer_grant() -> None:
    grants = [Grant("s", "A", 1, T0), Grant("s", "B", 2, T0 + timedelta(seconds=5))]
    logs = [ev(0, "a", at=1), ev(1, "b", at=9)]
    assert "after generation 2 was granted" in violations(logs, [ok("a", 0), ok("b", 1)], grants)


def test_real_time_order() -> None:
    logs = [ev(0, "b"), ev(1, "a")]
    ops = [ok("a", 1, invoked=0, done=1), ok("b", 0, invoked=2, done=3)]
    assert "yet ordered before it" in violations(logs, ops)


def test_checker_catches_a_run_with_fencing_switched_off() -> None:
    """An ex-holder that still believes in its lease keeps writing; only the fence stops it."""

    def run(fenced: bool) -> list[str]:
        store = InMemoryEventStore()
        registry = LeaseRegistry(store)
        a = AppendAuthority("A", store, registry, ttl_seconds=30)
        b = AppendAuthority("B", store, registry, ttl_seconds=30)
        if not fenced:

            def unfenced(to: Any, space: str, batch: Any, *, expected_seq: int, lease: Any) -> Any:
                return to.write(
                    space, batch, expected_seq=expected_seq, fence=lease, verify_fence=False
                )

            registry.fenced_write = unfenced  # type: ignore[method-assign]
        ops: list[Op] = []
        grants: list[Grant] = []

        def append(node: AppendAuthority, op: str) -> None:
            t = time.monotonic()
            e = node.append("s", "t", {"op": op})
            ops.append(Op(op, "s", node.node_id, t, "ok", time.monotonic(), e.seq))

        lease = a.acquire("s")
        grants.append(Grant("s", "A", lease.generation, datetime.now(UTC)))
        append(a, "a0")
        registry.revoke("s")  # an operator fences A; A's own copy of its lease still looks valid
        lease = b.acquire("s")
        grants.append(Grant("s", "B", lease.generation, datetime.now(UTC)))
        append(b, "b0")
        append(a, "a1")  # fenced: forwarded to B; unfenced: written under A's old generation
        return check({"s": store.events("s")}, ops, grants).violations

    assert run(fenced=True) == []
    found = "\n".join(run(fenced=False))
    assert "generation decreases" in found
    assert "after generation 3 was granted" in found


# -- a feed consumer -----------------------------------------------------------------------------


def placed(space: str, seq: int, op: str, position: int) -> Event:
    return Event(space, seq, "t", {"op": op}, T0, "A", 1, None, position)


def batch(seq: int, *events: Event) -> Event:
    seen = [[e.position, e.space, e.seq, e.payload["op"]] for e in events]
    return Event("seen:c", seq, "fault.seen", {"events": seen}, T0, "c1", 0)


def test_consumer_clean_run_passes() -> None:
    from shard_sql.history import Observed, check_consumer

    a0, b0, a1 = placed("a", 0, "x", 1), placed("b", 0, "y", 2), placed("a", 1, "z", 4)
    logs = {"a": [a0, a1], "b": [b0]}
    seen = [batch(0, a0, b0), batch(1, a1)]
    reads = [Observed(0, 1, 0), Observed(2, 3, 2), Observed(2.5, 5, 1), Observed(6, 7, 4)]
    assert check_consumer(logs, [a0, b0, a1], seen, reads) == []


def test_consumer_violations_are_found() -> None:
    from shard_sql.history import Observed, check_consumer

    a0, b0, a1 = placed("a", 0, "x", 1), placed("b", 0, "y", 2), placed("a", 1, "z", 4)
    logs = {"a": [a0, a1], "b": [b0]}
    feed = [a0, b0, a1]

    def found(seen: list[Event], reads: list[Observed] = [], f: list[Event] = feed) -> str:  # noqa: B006
        v = check_consumer(logs, f, seen, reads)
        assert v
        return "\n".join(v)

    assert "saw" in found([batch(0, a0, b0), batch(1, b0, a1)])  # twice
    assert "never saw" in found([batch(0, a0, a1)])
    assert "out of order" in found([batch(0, b0, a0, a1)])
    assert "not in the feed" in found([batch(0, a0, b0, placed("b", 1, "w", 3), a1)])
    assert "moved back" in found([batch(0, a0, b0, a1)], [Observed(0, 1, 4), Observed(2, 3, 2)])
    assert "missing" in found([batch(0, a0, a1)], f=[a0, a1])  # the feed skipped b0
    assert "out of order" in found([batch(0, a0, b0, a1)], f=[a0, a1, b0])
