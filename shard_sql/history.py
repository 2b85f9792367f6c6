"""A history checker: proves a concurrent run kept the log's promises.

A run records every append as an `Op` (invoked, then ok / failed / unknown) and every lease it
was granted as a `Grant`; `check` compares them with the final log and lists each violation:

- no fork and no gap: each space's seqs are 0..n-1;
- every acknowledged append is present exactly once, at its acknowledged seq;
- nothing from a definitely failed append; an unknown outcome is present once or absent;
- no event that no operation asked for;
- generations never decrease along seq, and one writer per generation;
- one holder per generation across all grants;
- no write under a generation that started after a newer grant had committed;
- real-time order: an append invoked after another was acknowledged gets a higher seq.

Events are matched to operations by `payload["op"]`, so appends without an intent id count too.

`check_consumer` checks a feed consumer's run: it saw every event of the logs exactly once, in
position order, and its checkpoint never moved backwards.
"""

from __future__ import annotations

import bisect
import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from shard_sql.values import Event

Outcome = Literal["ok", "failed", "unknown"]
Key = tuple[str, str]
"""(space, op id)."""


@dataclass(frozen=True, slots=True)
class Op:
    """One append as the caller saw it. Times are `time.monotonic()` (one clock per machine)."""

    op: str
    space: str
    node: str
    invoked: float
    outcome: Outcome = "unknown"
    completed: float | None = None
    seq: int | None = None


@dataclass(frozen=True, slots=True)
class Grant:
    """A lease a node was granted; `granted` is the wall time after the grant committed."""

    space: str
    holder: str
    generation: int
    granted: datetime


@dataclass
class Report:
    operations: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    events: int = 0
    violations: list[str] = field(default_factory=list)
    consumed: int = 0
    """Events a feed consumer handled (`check_consumer`), 0 without one."""

    @property
    def ok(self) -> bool:
        return not self.violations

    def summary(self) -> str:
        outcomes = ", ".join(f"{k} {v}" for k, v in sorted(self.outcomes.items()))
        consumed = f", consumed {self.consumed}" if self.consumed else ""
        return (
            f"operations {self.operations} ({outcomes}), events {self.events}{consumed}, "
            f"violations {len(self.violations)}"
        )


def check(
    logs: Mapping[str, Sequence[Event]], ops: Iterable[Op], grants: Iterable[Grant] = ()
) -> Report:
    """Check a run: `logs` maps each space to its final events in seq order."""
    report = Report()
    op_list = list(ops)
    by_op = _check_logs(logs, report)
    acked = _check_outcomes(op_list, by_op, report)
    _check_real_time_order(acked, op_list, by_op, report.violations)
    _check_fencing(logs, grants, report.violations)
    return report


def _check_logs(logs: Mapping[str, Sequence[Event]], report: Report) -> dict[Key, list[Event]]:
    """No fork, no gap, one writer per generation, generations never decrease; returns the
    events of each (space, op id)."""
    v = report.violations
    by_op: dict[Key, list[Event]] = defaultdict(list)
    for space, events in logs.items():
        report.events += len(events)
        seqs = [e.seq for e in events]
        if seqs != list(range(len(events))):
            v.append(f"{space}: seqs are not 0..{len(events) - 1}: fork or gap")
        for e in events:
            if e.space != space:
                v.append(f"{space}: seq {e.seq} belongs to space {e.space!r}")
            op = e.payload.get("op") if isinstance(e.payload, dict) else None
            if isinstance(op, str):
                by_op[(space, op)].append(e)
            else:
                v.append(f"{space}: seq {e.seq} carries no op id")
        _check_generations(space, events, v)
    return by_op


def _check_generations(space: str, events: Sequence[Event], v: list[str]) -> None:
    last_gen = 0
    writers: dict[int, str] = {}
    for e in events:
        if e.generation < last_gen:
            v.append(f"{space}: generation decreases at seq {e.seq} ({last_gen} -> {e.generation})")
        last_gen = max(last_gen, e.generation)
        if writers.setdefault(e.generation, e.writer) != e.writer:
            v.append(
                f"{space}: generation {e.generation} written by {writers[e.generation]!r} "
                f"and {e.writer!r}"
            )


def _check_outcomes(
    op_list: list[Op], by_op: dict[Key, list[Event]], report: Report
) -> dict[str, list[tuple[float, int]]]:
    """Each acknowledged op present once at its seq, no failed op present, an unknown one at
    most once, no event without an op; returns each space's (completion time, seq) acks."""
    v = report.violations
    known: set[Key] = set()
    acked: dict[str, list[tuple[float, int]]] = defaultdict(list)
    for op in op_list:
        report.operations += 1
        report.outcomes[op.outcome] += 1
        key = (op.space, op.op)
        known.add(key)
        found = by_op.get(key, [])
        if op.outcome == "ok":
            if len(found) != 1:
                v.append(f"{op.space}: acknowledged op {op.op} present {len(found)} times")
            elif found[0].seq != op.seq:
                v.append(
                    f"{op.space}: op {op.op} acknowledged at seq {op.seq}, found at {found[0].seq}"
                )
            if op.completed is not None and op.seq is not None:
                acked[op.space].append((op.completed, op.seq))
        elif op.outcome == "failed":
            if found:
                v.append(f"{op.space}: failed op {op.op} is present")
        elif len(found) > 1:
            v.append(f"{op.space}: op {op.op} of unknown outcome present {len(found)} times")
    for (space, op_id), events in by_op.items():
        if (space, op_id) not in known:
            v.append(f"{space}: seq {events[0].seq} was written by no recorded op ({op_id})")
    return acked


def _check_real_time_order(
    acked: dict[str, list[tuple[float, int]]],
    op_list: list[Op],
    by_op: dict[Key, list[Event]],
    v: list[str],
) -> None:
    """Anything invoked after an ack lands after it."""
    for space, acks in acked.items():
        acks.sort()
        times = [t for t, _ in acks]
        best: list[int] = []  # best[i]: the highest seq acknowledged by the i-th completion
        for _, s in acks:
            best.append(max(s, best[-1]) if best else s)
        for op in op_list:
            found = by_op.get((op.space, op.op), []) if op.space == space else []
            if len(found) != 1:
                continue
            i = bisect.bisect_left(times, op.invoked)
            if i and found[0].seq <= best[i - 1]:
                v.append(
                    f"{space}: op {op.op} (seq {found[0].seq}) invoked after seq {best[i - 1]} "
                    "was acknowledged, yet ordered before it"
                )


def _check_fencing(
    logs: Mapping[str, Sequence[Event]], grants: Iterable[Grant], v: list[str]
) -> None:
    """One holder per generation; no write begun after a newer grant committed."""
    holders: dict[tuple[str, int], str] = {}
    newer: dict[str, list[Grant]] = defaultdict(list)
    for g in grants:
        first = holders.setdefault((g.space, g.generation), g.holder)
        if first != g.holder:
            v.append(f"{g.space}: generation {g.generation} granted to {first!r} and {g.holder!r}")
        newer[g.space].append(g)
    for space, events in logs.items():
        grants_here = sorted(newer.get(space, ()), key=lambda g: g.granted)
        for e in events:
            for g in grants_here:
                if g.generation > e.generation and g.granted < e.recorded_at:
                    v.append(
                        f"{space}: seq {e.seq} written under generation {e.generation} at "
                        f"{e.recorded_at.isoformat()}, after generation {g.generation} was "
                        f"granted at {g.granted.isoformat()}"
                    )
                    break


@dataclass(frozen=True, slots=True)
class Observed:
    """A read of a consumer's checkpoint: `position`, read between `start` and `end`
    (`time.monotonic()`)."""

    start: float
    end: float
    position: int


def check_consumer(
    logs: Mapping[str, Sequence[Event]],
    feed: Sequence[Event],
    seen: Sequence[Event],
    observed: Iterable[Observed] = (),
) -> list[str]:
    """The violations of a feed consumer's run.

    `logs`: the final logs of the spaces it consumed (as for `check`); `feed`: the final feed of
    the types it consumed; `seen`: the events of its projection (one per handled batch, written
    in the batch's transaction), each with `payload["events"]`, the `[position, space, seq, op]`
    of every event of the batch, in the order handed over; `observed`: reads of its checkpoint.
    """
    v: list[str] = []
    want = [(e.position, e.space, e.seq, e.payload.get("op")) for e in feed]
    # The feed itself: every event of the logs once, positions increasing, each space in order.
    in_logs = {(e.space, e.seq): e.payload.get("op") for events in logs.values() for e in events}
    in_feed = Counter((space, seq) for _, space, seq, _ in want)
    v += [f"feed: {k} appears {n} times" for k, n in in_feed.items() if n > 1][:10]
    v += [f"feed: {k} is not in its space's log" for k in in_feed if k not in in_logs][:10]
    v += [f"feed: {k} (op {op}) is missing" for k, op in in_logs.items() if k not in in_feed][:10]
    v += _order("feed", want)
    got: list[tuple[Any, ...]] = []
    for e in seen:
        events = e.payload.get("events") if isinstance(e.payload, dict) else None
        if not isinstance(events, list):
            v.append(f"consumer: projection seq {e.seq} carries no events")
            continue
        got += [tuple(x) for x in events]
    counts = Counter(got)
    v += [f"consumer: saw {k} {n} times" for k, n in counts.items() if n > 1][:10]
    wanted = set(want)
    v += [f"consumer: saw {k}, which is not in the feed" for k in counts if k not in wanted][:10]
    v += [f"consumer: never saw {k}" for k in want if k not in counts][:10]
    v += _order("consumer", got)
    # A checkpoint read that ended before another began never shows a higher position.
    reads = sorted(observed, key=lambda o: o.start)
    ended = sorted(reads, key=lambda o: o.end)
    best: Observed | None = None
    i = 0
    for r in reads:
        while i < len(ended) and ended[i].end < r.start:
            if best is None or ended[i].position > best.position:
                best = ended[i]
            i += 1
        if best is not None and r.position < best.position:
            v.append(f"checkpoint moved back from {best.position} to {r.position}")
            break
    return v


def _order(who: str, items: Sequence[tuple[Any, ...]]) -> list[str]:
    """Positions strictly increasing; within a space, seqs too."""
    v: list[str] = []
    last = 0
    seqs: dict[str, int] = {}
    for position, space, seq, _ in items:
        if not isinstance(position, int) or position <= last:
            v.append(f"{who}: position {position} after {last}: out of order")
            break
        last = position
        if seq <= seqs.get(space, -1):
            v.append(f"{who}: {space!r} seq {seq} after seq {seqs[space]}: out of order")
            break
        seqs[space] = seq
    return v


# -- recording, one JSON line per record, safe to append from many processes -----------------


def record(path: Path, **fields: Any) -> None:
    """Append one record; a single `write` of one line, so lines from processes never mix."""
    line = (json.dumps(fields, separators=(",", ":")) + "\n").encode()
    with open(path, "ab", buffering=0) as f:
        f.write(line)


def load_observed(paths: Iterable[Path]) -> list[Observed]:
    """The `checkpoint` records of a run (reads of a consumer's checkpoint)."""
    out = []
    for path in paths:
        if not path.exists():
            continue
        for raw in path.read_text().splitlines():
            try:
                r = json.loads(raw)
            except ValueError:
                continue  # a line cut short by SIGKILL
            if r.get("kind") == "checkpoint":
                out.append(Observed(r["start"], r["end"], r["position"]))
    return out


def load(paths: Iterable[Path]) -> tuple[list[Op], list[Grant]]:
    """Read the records of a run: `invoke`, `ok`, `failed`, `unknown` and `grant` lines."""
    invoked: dict[str, dict[str, Any]] = {}
    ends: dict[str, dict[str, Any]] = {}
    grants: list[Grant] = []
    for path in paths:
        if not path.exists():
            continue
        for raw in path.read_text().splitlines():
            try:
                r = json.loads(raw)
            except ValueError:
                continue  # a line cut short by SIGKILL
            kind = r.get("kind")
            if kind == "invoke":
                invoked[r["op"]] = r
            elif kind in ("ok", "failed", "unknown"):
                ends[r["op"]] = r
            elif kind == "grant":
                grants.append(
                    Grant(
                        r["space"],
                        r["holder"],
                        r["generation"],
                        datetime.fromisoformat(r["granted"]),
                    )
                )
    ops = []
    for op_id, r in invoked.items():
        end = ends.get(op_id, {})
        ops.append(
            Op(
                op_id,
                r["space"],
                r["node"],
                r["t"],
                end.get("kind", "unknown"),
                end.get("t"),
                end.get("seq"),
            )
        )
    return ops, grants
