"""Rows of `perf_bench` (work `transaction`, issue 15): appends that join the host application's
transaction, next to a raw INSERT the host would run on its own connection in its transaction.

- one event, `tx.append` in `store.transaction(connection)` between the host's `begin()` and
  `commit()` (SQLAlchemy `Connection`), next to the raw driver's INSERT of the same row on the
  cursor of such a connection, between the same `begin()` and `commit()`: target 0.85x;
- `tx.append_many` of 100 the same way, next to `executemany` of 100 rows: `append_many`'s
  targets.

Same durability on both sides (SQLite: WAL and the same `synchronous`, each side on a file of
its own, as perf's appends; PostgreSQL: the same database). `python -m benchmarks --only
transaction`.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event, make_url
from sqlalchemy.engine import Connection, Engine

from shard_sql import SqlEventStore

from .raw_drivers import INSERT_SQL, PAYLOAD, TYPE, WRITER, now_text
from .rows import TARGET_APPEND, TARGET_MANY, measured
from .sql_bench import Step, _Spaces, _steps

WORK_ONE = "tx.append in the host's transaction"
WORK_MANY = "tx.append_many of 100 in the host's transaction"


def _sqlite_engine(path: Path, synchronous: str) -> Engine:
    engine = create_engine(f"sqlite:///{path}")

    @event.listens_for(engine, "connect")
    def _sync(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.execute(f"PRAGMA synchronous = {synchronous}")

    return engine


class _Host:
    """The host's engines: `figure` on the store's database, `bare` for the raw INSERTs."""

    def __init__(self, url: str) -> None:
        u = make_url(url)
        if u.get_backend_name() == "sqlite":
            sync = str(u.query.get("synchronous", "FULL"))
            path = Path(str(u.database))
            bare = path.with_name(f"{path.stem}-tx-raw.db")
            SqlEventStore(f"sqlite:///{bare}").close()  # the same schema
            self.figure, self.bare = _sqlite_engine(path, sync), _sqlite_engine(bare, sync)
            self.insert = INSERT_SQL.format(p="?", payload="?")
            self.now: Any = now_text
        else:
            self.figure = self.bare = create_engine(url)
            self.insert = INSERT_SQL.format(p="%s", payload="CAST(%s AS jsonb)")
            self.now = lambda: datetime.now(UTC)
        self.conn: Connection = self.figure.connect()
        self.bare_conn: Connection = self.bare.connect()
        self.cur = self.bare_conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]

    def close(self) -> None:
        self.conn.close()
        self.bare_conn.close()
        self.figure.dispose()
        self.bare.dispose()


def tx_rows(label: str, url: str, rounds: int, appends: int, batches: int) -> list[Any]:
    """(work, vs, figure, baseline, unit) of one backend, events per second."""

    new_space = _Spaces()
    host = _Host(url)
    rows = []
    try:
        with SqlEventStore(url) as store:
            conn, bare, cur, insert = host.conn, host.bare_conn, host.cur, host.insert
            items = [(TYPE, PAYLOAD)] * 100

            def one() -> Step:
                space = new_space("tx")

                def step(_seq: int) -> None:
                    conn.begin()
                    with store.transaction(conn) as tx:
                        tx.append(space, TYPE, PAYLOAD)
                    conn.commit()

                return step

            def raw_one() -> Step:
                space = new_space("tx-raw")

                def step(seq: int) -> None:
                    bare.begin()
                    row = (space, seq, TYPE, json.dumps(PAYLOAD), host.now(), WRITER, 1, None)
                    cur.execute(insert, row)
                    bare.commit()

                return step

            def many() -> Step:
                space = new_space("tx-many")

                def step(_b: int) -> None:
                    conn.begin()
                    with store.transaction(conn) as tx:
                        tx.append_many(space, items)
                    conn.commit()

                return step

            def raw_many() -> Step:
                space = new_space("tx-rawmany")

                def step(b: int) -> None:
                    at, dumps = host.now(), json.dumps  # a payload per row, as perf's raw rows
                    rows = [
                        (space, b * 100 + k, TYPE, dumps(PAYLOAD), at, WRITER, 1, None)
                        for k in range(100)
                    ]
                    bare.begin()
                    cur.executemany(insert, rows)
                    bare.commit()

                return step

            fig, base = _steps(rounds, appends, one, raw_one, 25)
            rows.append(
                measured(WORK_ONE, label, "raw INSERT in the host's transaction", fig, base,
                     TARGET_APPEND)
            )  # fmt: skip
            fig, base = _steps(rounds, batches, many, raw_many, 1)
            rows.append(
                measured(WORK_MANY, label, "raw executemany in the host's transaction", fig * 100,
                     base * 100, TARGET_MANY[label])
            )  # fmt: skip
    finally:
        host.close()
    return rows
