"""eventsourcing applications on shard_sql (`PERSISTENCE_MODULE=shard_sql.eventsourcing`) next
to eventsourcing's own SQLite and PostgreSQL modules (issue 16), in the same run with the same
durability (SQLite: WAL, synchronous FULL, each on its own file; PostgreSQL: the same database,
synchronous_commit on):

- `Application.save` of a new aggregate (one event), target 1.0x on SQLite, 1.5x on PostgreSQL;
- reading an aggregate's events (`repository.get`, replaying them), target 1.0x;
- reading the notification log (`select_notifications` pages of 1,000), target 1.0x.

Rows of `perf_bench` (work `eventsourcing`): `python -m benchmarks --only eventsourcing`.
"""

from __future__ import annotations

import functools
from typing import Any
from uuid import UUID

from .es_side import eventsourcing_installed, page_class
from .rows import ES_NOTE, Counts, Row, measured, skipped
from .sql_bench import Step, _compare, _steps

TARGET_SAVE = {"sqlite FULL": 1.0, "postgresql": 1.5}
TARGET_READ = 1.0
VS = "eventsourcing's own module"
LOG_PAGE = 1000


@functools.cache
def _app_class() -> Any:
    from eventsourcing.application import Application

    class BenchPages(Application[UUID]):
        pass

    return BenchPages


def _fill(app: Any, events: int) -> UUID:
    """One aggregate with `events` events, saved 1,000 at a time."""
    page = page_class()("Home")
    while page.version < events:
        for _ in range(min(1000, events - page.version)):
            page.edit("A wiki page", ["a", "b"], page.version)
        app.save(page)
    return UUID(str(page.id))


def _log_length(app: Any) -> int:
    select, start, total = app.recorder.select_notifications, 0, 0
    while True:
        page = select(start, LOG_PAGE, inclusive_of_start=False)
        total += len(page)
        if len(page) < LOG_PAGE:
            return total
        start = page[-1].id


def es_rows(label: str, module_url: str, own_env: dict[str, str], counts: Counts) -> list[Row]:
    """The rows on one backend: `module_url` for shard_sql, `own_env` for eventsourcing's own."""
    works = ("Application.save of a new aggregate", "reading an aggregate", "reading the log")
    if not eventsourcing_installed():
        return [skipped(w, label, VS, ES_NOTE) for w in works]
    cls, page_cls = _app_class(), page_class()
    try:
        mine = cls(
            env={"PERSISTENCE_MODULE": "shard_sql.eventsourcing", "SHARD_SQL_URL": module_url}
        )
    except Exception as e:  # a store without the feed yet
        return [
            skipped(w, label, VS, f"shard_sql.eventsourcing cannot run here: {e}") for w in works
        ]
    own = cls(env=own_env)
    rows: list[Row] = []
    try:

        def saves(app: Any) -> Any:
            def start() -> Step:
                return lambda n: app.save(page_cls(f"p{n}")) and None

            return start

        fig, base = _steps(counts.rounds, counts.appends, saves(mine), saves(own), 25)
        rows.append(measured(works[0], label, VS, fig, base, TARGET_SAVE.get(label)))

        n = counts.reads
        ids = {id(app): _fill(app, n) for app in (mine, own)}

        def replay(app: Any) -> Any:
            return lambda: app.repository.get(ids[id(app)])

        fig, base = _compare(counts.rounds, n, replay(mine), replay(own))
        work = f"reading an aggregate of {n:,} events (repository.get)"
        rows.append(measured(work, label, VS, fig, base, TARGET_READ))

        length = _log_length(mine)
        assert length == _log_length(own), "both logs hold the same notifications"
        fig, base = _compare(
            counts.rounds, length, lambda: _log_length(mine), lambda: _log_length(own)
        )
        work = f"reading the notification log ({length:,}, pages of {LOG_PAGE:,})"
        rows.append(measured(work, label, VS, fig, base, TARGET_READ))
    finally:
        mine.close()
        own.close()
    return rows
