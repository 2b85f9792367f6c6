"""The rows every benchmark module of the performance suite returns (`Row`), the counts of a run
(`Counts`) and the targets of the issues' tables."""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

TARGET_APPEND = 0.85
NORMAL_APPENDS_FACTOR = 10
TARGET_VS_RECORDER = {"sqlite FULL": 1.1, "sqlite NORMAL": 1.1, "postgresql": 2.5}
TARGET_MANY = {"sqlite FULL": 0.8, "sqlite NORMAL": 0.8, "postgresql": 1.0}
TARGET_READ = 1.0
TARGET_GIT_APPEND = 0.8
TARGET_GIT_READS = 10_000.0
TARGET_PROCESSES = 0.9
MEMORY_BUDGET_MB = 50.0

ES_NOTE = "eventsourcing not installed: skipped"
INSTALL_COMPARE = "pip install 'shard_sql[compare]'"
"""The one install hint for the eventsourcing rows (shown once under the table)."""


@dataclass
class Row:
    work: str
    backend: str
    vs: str
    figure: float | None
    baseline: float | None
    ratio: float | None
    target: float | None
    unit: str = "events/s"
    ok: bool | None = None
    note: str = ""
    target_text: str = ""
    install: str = ""  # what installs the missing library a skipped row needs
    at_most: bool = False  # lower is better: ok when the ratio (or figure) <= target


REPORT: contextvars.ContextVar[Callable[[dict[str, Any]], None] | None] = contextvars.ContextVar(
    "report", default=None
)
"""`run(progress=...)`: called with each row as soon as it is measured."""


def reported(row: Row) -> Row:
    report = REPORT.get()
    if report is not None:
        report(asdict(row))
    return row


@dataclass
class Counts:
    appends: int
    batches: int
    reads: int
    rounds: int
    git_appends: int
    git_reads: int
    proc_appends: int
    memory_events: int

    @classmethod
    def of(cls, quick: bool, rounds: int | None) -> Counts:
        if quick:
            return cls(50, 2, 2_000, rounds or 1, 30, 500, 20, 5_000)
        return cls(600, 20, 100_000, rounds or 5, 400, 10_000, 1_000, 1_000_000)


def measured(
    work: str,
    backend: str,
    vs: str,
    figure: float,
    baseline: float | None,
    target: float | None,
    unit: str = "events/s",
    note: str = "",
    ratio: float | None = None,
    target_text: str = "",
    *,
    at_most: bool = False,
) -> Row:
    """A measured row; its ratio is figure / baseline unless given. The target is a least ratio
    (or figure, without a baseline), or with `at_most` a most one: lower is better (a latency)."""
    if ratio is None and baseline:
        ratio = figure / baseline
    ok = None
    if target is not None:
        judged = ratio if baseline is not None and ratio is not None else figure
        ok = judged <= target if at_most else judged >= target
    if not target_text and target is not None:
        sign = "<=" if at_most else ">="
        target_text = f"{sign} {target:g}x" if baseline is not None else f"{sign} {target:,.0f}"
    return reported(
        Row(
            work,
            backend,
            vs,
            round(figure, 1),
            None if baseline is None else round(baseline, 1),
            None if ratio is None else round(ratio, 3),
            target,
            unit,
            ok,
            note,
            target_text,
            at_most=at_most,
        )
    )


def skipped(work: str, backend: str, vs: str, note: str) -> Row:
    install = INSTALL_COMPARE if note == ES_NOTE else ""
    return reported(Row(work, backend, vs, None, None, None, None, "", None, note, "", install))
