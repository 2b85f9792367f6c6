"""Check a live store's invariants: what every shard_sql log must satisfy, whatever wrote it.

    from shard_sql.verify import verify
    report = verify(store)            # every space; or verify(store, spaces=["wiki"])
    if not report.ok:
        for v in report.violations:
            print(v)

The rules, per space, along seq:

- `seq`: the seqs are 0, 1, ..., n-1 with n = `head(space)`, each event of that space;
- `intent`: an `intent_id` names at most one event;
- `generation`: the generation never decreases along seq;
- `writer`: one writer per generation (a generation is one lease grant, held by one node).

Events written without a fence (`store.append` with no lease: writer `""`, generation 0) belong to
no grant; they are counted as `unfenced` and exempt from the `generation` and `writer` rules.

A store may add checks of its own internals (forwarded intents applied twice, for instance) by
providing `verify_store() -> Iterable[Violation]`; its findings join the report.
The check streams each space with `iter_events`: memory grows with the number of distinct intent
ids and generations, not with the number of events.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from shard_sql.ports import EventStore
from shard_sql.values import Event

MAX_VIOLATIONS = 1000
"""A report keeps the first 1000 violations in detail and counts the rest."""

RULES = ("seq", "intent", "generation", "writer", "head", "space", "store")


@dataclass(frozen=True, slots=True)
class Violation:
    """One broken invariant: the space, the seq where it shows (None: the space as a whole),
    the rule's name and what was found."""

    space: str
    seq: int | None
    rule: str
    message: str

    def __str__(self) -> str:
        at = f"seq {self.seq}" if self.seq is not None else "space"
        return f"{self.space!r} {at}: [{self.rule}] {self.message}"

    def to_dict(self) -> dict[str, Any]:
        return {"space": self.space, "seq": self.seq, "rule": self.rule, "message": self.message}


@dataclass(frozen=True, slots=True)
class SpaceSummary:
    """What `verify` saw in one space."""

    space: str
    head: int
    events: int
    unfenced: int
    generations: int
    violations: int


@dataclass(slots=True)
class Report:
    """The outcome of `verify`: `ok` when no violation was found."""

    spaces: list[SpaceSummary] = field(default_factory=list)
    violations: list[Violation] = field(default_factory=list)
    violation_count: int = 0

    @property
    def ok(self) -> bool:
        return self.violation_count == 0

    @property
    def events(self) -> int:
        return sum(s.events for s in self.spaces)

    def add(self, violation: Violation) -> None:
        self.violation_count += 1
        if len(self.violations) < MAX_VIOLATIONS:
            self.violations.append(violation)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "spaces": len(self.spaces),
            "events": self.events,
            "violations": self.violation_count,
            "details": [v.to_dict() for v in self.violations],
            "per_space": [
                {
                    "space": s.space,
                    "head": s.head,
                    "events": s.events,
                    "unfenced": s.unfenced,
                    "generations": s.generations,
                    "violations": s.violations,
                }
                for s in self.spaces
            ],
        }


def verify(
    store: EventStore,
    *,
    spaces: Sequence[str] | None = None,
    progress: Callable[[int], None] | None = None,
) -> Report:
    """Check the invariants of `store` (all its spaces, or `spaces`) and return a `Report`.

    `progress`, if given, is called with the number of events checked since its last call.
    Store errors (`StoreUnavailable`, ...) propagate; a violation never raises.
    """
    report = Report()
    names = store.spaces() if spaces is None else list(spaces)
    for space in names:
        report.spaces.append(_verify_space(store, space, report, progress))
    extra = getattr(store, "verify_store", None)
    if callable(extra):
        found: Iterable[Violation] = extra()
        for v in found:
            report.add(v)
    return report


def _verify_space(
    store: EventStore,
    space: str,
    report: Report,
    progress: Callable[[int], None] | None,
) -> SpaceSummary:
    before = report.violation_count
    head = store.head(space)
    check = _SpaceCheck(space, report)
    pending_progress = 0
    for event in store.iter_events(space):
        check.event(event)
        if progress is not None:
            pending_progress += 1
            if pending_progress >= 1000:
                progress(pending_progress)
                pending_progress = 0
    if progress is not None and pending_progress:
        progress(pending_progress)
    if check.count != head or check.last_seq + 1 != head:
        found = (
            f"head is {head} but {check.count} events were read, the last at seq {check.last_seq}"
        )
        report.add(Violation(space, None, "head", found))
    violations = report.violation_count - before
    return SpaceSummary(space, head, check.count, check.unfenced, len(check.writers), violations)


class _SpaceCheck:
    """The rules along one space's events, in seq order."""

    def __init__(self, space: str, report: Report) -> None:
        self.space, self.report = space, report
        self.intents: dict[str, int] = {}
        self.writers: dict[int, tuple[str, int]] = {}
        self.last_gen: tuple[int, int] | None = None  # (generation, seq) of the last fenced event
        self.count = self.unfenced = 0
        self.last_seq = -1

    def add(self, seq: int, rule: str, message: str) -> None:
        self.report.add(Violation(self.space, seq, rule, message))

    def event(self, event: Event) -> None:
        self.count += 1
        if event.space != self.space:
            self.add(event.seq, "space", f"event belongs to {event.space!r}")
        self.seq(event.seq)
        if event.intent_id is not None:
            first = self.intents.setdefault(event.intent_id, event.seq)
            if first != event.seq:
                self.add(
                    event.seq,
                    "intent",
                    f"intent_id {event.intent_id!r} already written at seq {first}",
                )
        if event.writer == "" and event.generation == 0:
            self.unfenced += 1
        else:
            self.fenced(event)

    def seq(self, seq: int) -> None:
        last = self.last_seq
        if seq != last + 1:
            if seq <= last:
                found = f"seq {seq} again after seq {last} (a fork or a duplicate)"
            elif seq == last + 2:
                found = f"seq {last + 1} is missing"
            else:
                found = f"seqs {last + 1}..{seq - 1} are missing"
            self.add(seq, "seq", found)
        self.last_seq = max(last, seq)

    def fenced(self, event: Event) -> None:
        """The generation never decreases; one writer per generation."""
        gen, seq = event.generation, event.seq
        if self.last_gen is not None and gen < self.last_gen[0]:
            last, at = self.last_gen
            self.add(seq, "generation", f"generation {gen} after generation {last} at seq {at}")
        self.last_gen = (gen, seq)
        owner = self.writers.setdefault(gen, (event.writer, seq))
        if owner[0] != event.writer:
            self.add(
                seq,
                "writer",
                f"generation {gen} written by {event.writer!r}, but by {owner[0]!r} at seq "
                f"{owner[1]}",
            )
