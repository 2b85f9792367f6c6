"""eventsourcing, when installed, as a baseline: its own recorders and `Application` on the same
database as shard_sql (`EsSide`), for the append and read rows of `sql_rows`."""

from __future__ import annotations

import functools
import json
import uuid
from typing import Any

from .raw_drivers import PAYLOAD, TYPE
from .sql_bench import Step


def eventsourcing_installed() -> Any | None:
    try:
        import eventsourcing  # noqa: F401
    except ImportError:
        return None
    return True


@functools.cache
def page_class() -> Any:
    """An eventsourcing aggregate (defined once: the library registers its topic)."""
    from eventsourcing.domain import Aggregate, event

    class Page(Aggregate):
        def __init__(self, page: str) -> None:
            self.page = page

        @event("Edited")
        def edit(self, title: str, tags: list[str], rev: int) -> None:
            self.title, self.tags, self.rev = title, tags, rev

    return Page


def es_env(backend: str, where: str) -> dict[str, str]:
    """eventsourcing's own persistence module on a SQLite file or a PostgreSQL database URL."""
    if backend != "postgresql":
        return {"PERSISTENCE_MODULE": "eventsourcing.sqlite", "SQLITE_DBNAME": where}
    from sqlalchemy import make_url

    u = make_url(where)
    return {
        "PERSISTENCE_MODULE": "eventsourcing.postgres",
        "POSTGRES_DBNAME": str(u.database),
        "POSTGRES_HOST": u.host or "127.0.0.1",
        "POSTGRES_PORT": str(u.port or 5432),
        "POSTGRES_USER": u.username or "postgres",
        "POSTGRES_PASSWORD": u.password or "",
    }


class EsSide:
    """The eventsourcing library on the same database: its application recorder (one stored
    event per `insert_events`) and an `Application` saving one new aggregate event at a time."""

    def __init__(self, backend: str, where: str, db_functions: bool = False) -> None:
        from eventsourcing.application import Application

        self.backend = backend
        self.env = es_env(backend, where)
        if backend == "postgresql":
            from eventsourcing.postgres import PostgresApplicationRecorder, PostgresDatastore
            from sqlalchemy import make_url

            u = make_url(where)
            self.datastore: Any = PostgresDatastore(
                str(u.database),
                u.host or "127.0.0.1",
                u.port or 5432,
                u.username or "postgres",
                u.password or "",
                enable_db_functions=db_functions,
            )
            self.recorder: Any = PostgresApplicationRecorder(self.datastore)
        else:
            from eventsourcing.sqlite import SQLiteApplicationRecorder, SQLiteDatastore

            self.datastore = SQLiteDatastore(where)
            self.recorder = SQLiteApplicationRecorder(self.datastore)
        self.recorder.create_table()

        self.Page = page_class()
        self.app: Any = None
        self._app_cls = Application

    def stored(self, originator: uuid.UUID, version: int) -> Any:
        from eventsourcing.persistence import StoredEvent

        return StoredEvent(originator, version, TYPE, json.dumps(PAYLOAD).encode())

    def recorder_step(self) -> Step:
        originator = uuid.uuid4()
        insert, stored = self.recorder.insert_events, self.stored
        return lambda n: insert([stored(originator, n)]) and None

    def save_step(self) -> Step:
        if self.app is None:
            self.app = self._app_cls(env=self.env)
        app = self.app
        page = self.Page("Home")
        app.save(page)

        def step(n: int) -> None:
            page.edit("A wiki page", ["a", "b"], n)
            app.save(page)

        return step

    def fill(self, count: int) -> uuid.UUID:
        originator = uuid.uuid4()
        for start in range(0, count, 1000):
            self.recorder.insert_events(
                [self.stored(originator, v) for v in range(start, min(count, start + 1000))]
            )
        return originator

    def read(self, originator: uuid.UUID) -> list[Any]:
        loads = json.loads
        return [(s, loads(s.state)) for s in self.recorder.select_events(originator)]

    def close(self) -> None:
        if self.app is not None:
            self.app.close()
        self.datastore.close()
