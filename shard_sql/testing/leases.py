"""The lease-rules contract: every `LeaseStore` gives exactly the answers of the rules in
`shard_sql.leases` (`granted`, `renewed`, `released`, `revoked`, `valid`, and `advanced` for a
store that is also a `GenerationFloor`), over a table of cases.

Each case is a few steps on one space, at times given in seconds after `T0`. The rules run beside
the store as a model: every step's answer (the lease returned, or the error and the lease it
carries) and the valid lease after it must be the same.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from shard_sql.leases import advanced, granted, released, renewed, revoked, valid
from shard_sql.ports import GenerationFloor, LeaseStore
from shard_sql.testing.contracts import AdapterCase
from shard_sql.values import Lease

T0 = datetime(2026, 1, 1, tzinfo=UTC)
TTL = 10.0


@dataclass(frozen=True)
class Forged:
    """A lease the store never granted: this holder and generation (expiry far away)."""

    holder: str
    generation: int


@dataclass(frozen=True)
class Step:
    op: str  # acquire, renew, release, revoke, current, advance
    at: float  # seconds after T0
    holder: str = ""
    ttl: Any = TTL
    lease: int | Forged | None = None  # renew, release: the lease step n returned, or a forgery
    generation: int = 0  # advance


def acquire(holder: str, at: float, ttl: Any = TTL) -> Step:
    return Step("acquire", at, holder=holder, ttl=ttl)


def renew(lease: int | Forged, at: float, ttl: Any = TTL) -> Step:
    return Step("renew", at, lease=lease, ttl=ttl)


def release(lease: int | Forged, at: float) -> Step:
    return Step("release", at, lease=lease)


def revoke(at: float) -> Step:
    """Revoking also shows the whole record (holder, expiry), valid or not."""
    return Step("revoke", at)


def current(at: float) -> Step:
    return Step("current", at)


def advance(generation: int, at: float) -> Step:
    """What an import does after writing events of generations up to `generation`."""
    return Step("advance", at, generation=generation)


CASES: dict[str, list[Step]] = {
    "a first grant is generation 1, valid until its expiry (excluded)": [
        acquire("A", 0),
        current(9.999),
        current(10),
        revoke(11),
    ],
    "the holder acquiring again extends, never shortens, in its generation": [
        acquire("A", 0),
        acquire("A", 4),
        acquire("A", 5, ttl=2),
        current(13.999),
        revoke(14),
    ],
    "another holder is refused while the lease is valid, told which lease": [
        acquire("A", 0),
        acquire("B", 9.999),
        acquire("B", 5, ttl=100),
    ],
    "another holder gets the next generation once the lease expired": [
        acquire("A", 0),
        acquire("B", 10),
        acquire("A", 12),
        current(19.999),
    ],
    "the holder gets a new generation after its own lease lapsed": [
        acquire("A", 0),
        acquire("A", 10),
        acquire("A", 20.5),
    ],
    "a renewal extends from now, never shortens, keeps the generation": [
        acquire("A", 0),
        renew(0, 5),
        renew(1, 6, ttl=1),
        renew(0, 7, ttl=20),
        revoke(8),
    ],
    "a renewal at or after expiry is stale": [
        acquire("A", 0),
        renew(0, 10),
        renew(0, 30),
    ],
    "a renewal after another grant is stale; the new grant renews": [
        acquire("A", 0),
        acquire("B", 11),
        renew(0, 12),
        renew(1, 12),
    ],
    "a renewal of a lease never granted is stale": [
        renew(Forged("A", 1), 0),
        acquire("A", 0),
        renew(Forged("A", 7), 1),
        renew(Forged("B", 1), 1),
        current(1),
    ],
    "a release ends the lease now; anyone acquires at once, generation + 1": [
        acquire("A", 0),
        release(0, 3),
        current(3),
        acquire("B", 3),
        revoke(4),
    ],
    "the holder acquiring after its release gets a new generation": [
        acquire("A", 0),
        release(0, 1),
        acquire("A", 1),
    ],
    "a release after expiry keeps the expiry": [
        acquire("A", 0),
        release(0, 20),
        revoke(25),
    ],
    "a second release keeps the first end": [
        acquire("A", 0),
        release(0, 2),
        release(0, 3),
        revoke(4),
    ],
    "a release of a lease no longer current does nothing": [
        acquire("A", 0),
        acquire("B", 11),
        release(0, 12),
        current(12),
        release(Forged("B", 9), 13),
        current(13),
    ],
    "a release where there never was a lease does nothing": [
        release(Forged("A", 1), 0),
        current(0),
        acquire("A", 0),
    ],
    "a revocation ends the lease now and bumps the generation; the holder is fenced": [
        revoke(0),
        acquire("A", 0),
        revoke(4),
        current(4),
        renew(1, 5),
        acquire("A", 5),
        revoke(30),
    ],
    "a revocation after expiry keeps the expiry": [
        acquire("A", 0),
        revoke(15),
        revoke(16),
    ],
    "an import raises the generation; a lease below it ends now, its holder fenced": [
        acquire("A", 0),
        advance(5, 2),
        current(2),
        renew(0, 3),
        acquire("B", 3),
        advance(4, 4),
        advance(6, 5),
        revoke(6),
    ],
    "an import into a space never leased leaves a record that is never valid": [
        advance(0, 0),
        advance(3, 0),
        current(0),
        acquire("A", 1),
    ],
    "an import after expiry keeps the expiry": [
        acquire("A", 0),
        advance(2, 15),
        revoke(16),
    ],
    "a TTL must be a positive number of seconds up to a year": [
        acquire("A", 0, ttl=0),
        acquire("A", 0, ttl=-1),
        acquire("A", 0, ttl=86_400 * 366),
        acquire("A", 0, ttl=math.nan),
        acquire("A", 0, ttl=True),
        acquire("A", 0, ttl=86_400 * 365),
        renew(5, 1, ttl=0),
        acquire("B", 2, ttl=0),
    ],
}


def _outcome(call: Any) -> tuple[Any, ...]:
    """("ok", value) or ("raised", error type, the lease it carries)."""
    try:
        return ("ok", call())
    except Exception as e:
        return ("raised", type(e).__name__, getattr(e, "lease", None))


def _lease_of(ref: int | Forged | None, answers: list[Any], space: str) -> Lease:
    if isinstance(ref, Forged):
        return Lease(space, ref.holder, T0 + timedelta(days=365), ref.generation)
    answer = answers[ref] if ref is not None else None
    assert isinstance(answer, Lease), f"step {ref} returned no lease to use"
    return answer


class _Rules:
    """The rules as a model of one space's record."""

    def __init__(self, space: str) -> None:
        self.space = space
        self.record: Lease | None = None

    def apply(self, step: Step, lease: Lease | None, now: datetime) -> Any:
        if step.op == "acquire":
            self.record = granted(self.record, self.space, step.holder, step.ttl, now)
            return self.record
        if step.op == "renew":
            assert lease is not None
            self.record = renewed(self.record, lease, step.ttl, now)
            return self.record
        if step.op == "release":
            assert lease is not None
            self.record = released(self.record, lease, now) or self.record
            return None
        if step.op == "revoke":
            new = revoked(self.record, self.space, now)
            self.record = new or self.record
            return new
        if step.op == "advance":
            new = advanced(self.record, self.space, step.generation, now)
            self.record = new or self.record
            return new
        return valid(self.record, now)


def _on_store(store: LeaseStore, space: str, step: Step, lease: Lease | None, now: datetime) -> Any:
    if step.op == "acquire":
        return store.lease_acquire(space, step.holder, step.ttl, now)
    if step.op == "renew":
        assert lease is not None
        return store.lease_renew(lease, step.ttl, now)
    if step.op == "release":
        assert lease is not None
        return store.lease_release(lease, now)
    if step.op == "revoke":
        return store.lease_revoke(space, now)
    if step.op == "advance":
        assert isinstance(store, GenerationFloor), f"{type(store).__name__}: no lease_advance"
        return store.lease_advance(space, step.generation, now)
    return store.lease_current(space, now)


def run_case(store: LeaseStore, space: str, name: str, steps: list[Step]) -> str | None:
    """The first difference between the store and the rules in this case, if any."""
    rules = _Rules(space)
    answers: list[Any] = []
    for n, step in enumerate(steps):
        now = T0 + timedelta(seconds=step.at)
        lease = _lease_of(step.lease, answers, space) if step.lease is not None else None
        want = _outcome(lambda: rules.apply(step, lease, now))  # noqa: B023
        got = _outcome(lambda: _on_store(store, space, step, lease, now))  # noqa: B023
        if got != want:
            return f"{name}: step {n} {step}: the rules say {want}, the store {got}"
        answers.append(want[1] if want[0] == "ok" else None)
        want_valid, got_valid = valid(rules.record, now), store.lease_current(space, now)
        if got_valid != want_valid:
            return f"{name}: after step {n} {step}: valid {want_valid} by the rules, {got_valid}"
    return None


class LeaseRulesContract(AdapterCase):
    """Every lease call of the store (`LeaseStore`) answers as the rules do, case by case."""

    def make_lease_store(self) -> LeaseStore:
        """The lease store under test: the adapter's store by default."""
        store = self.store
        assert isinstance(store, LeaseStore), f"{type(store).__name__} keeps no leases"
        return store

    def test_every_case_answers_as_the_rules(self) -> None:
        leases = self.make_lease_store()
        problems = [
            run_case(leases, f"rules-{n}", name, steps)
            for n, (name, steps) in enumerate(CASES.items())
        ]
        assert [p for p in problems if p] == []

    @pytest.mark.parametrize("space", ["a/b", "ünïcødé-空间", "'; DROP TABLE leases; --"])
    def test_spaces_keep_their_own_records(self, space: str) -> None:
        leases = self.make_lease_store()
        for n, other in enumerate([space, space + "x", space.upper()]):
            assert run_case(leases, other, f"space {other!r}", CASES[list(CASES)[n]]) is None
