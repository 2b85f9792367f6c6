"""The bare drivers the SQL rows measure shard_sql against: stdlib sqlite3 and psycopg 3 writing
and reading the same rows of the store's `events` table (autocommit inserts, a BEGIN +
`executemany` + COMMIT batch, a SELECT + `json.loads` read, and the store's guarded append
statement or a statement per check, bare), and the event every benchmark appends."""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from shard_sql.sql.dialects import postgres, sqlite

PAYLOAD: dict[str, Any] = {"page": "Home", "title": "A wiki page", "tags": ["a", "b"], "rev": 7}
TYPE = "page.edited"
WRITER = "bench-node"
INSERT_SQL = (
    "INSERT INTO events (space, seq, type, payload, recorded_at, writer, generation, intent_id) "
    "VALUES ({p}, {p}, {p}, {payload}, {p}, {p}, {p}, {p})"
)
SELECT_SQL = (
    "SELECT seq, type, {payload}, recorded_at, writer, generation, intent_id FROM events "
    "WHERE space = {p} ORDER BY seq"
)


def now_text() -> str:
    """Now as the `recorded_at` text of a bare SQLite insert (UTC, no offset)."""
    return datetime.now(UTC).replace(tzinfo=None).isoformat(" ", "microseconds")


class RawSqlite:
    """stdlib sqlite3 with the store's settings: WAL, the same `synchronous`, autocommit."""

    def __init__(self, path: Path, synchronous: str) -> None:
        self.conn = sqlite3.connect(path, isolation_level=None, timeout=30)
        self.conn.execute("PRAGMA journal_mode = WAL").fetchall()
        self.conn.execute(f"PRAGMA synchronous = {synchronous}")
        self.cur = self.conn.cursor()
        self.insert = INSERT_SQL.format(p="?", payload="?")
        self.select = SELECT_SQL.format(p="?", payload="payload")
        self.guarded = sqlite.append_one_sql(fence=True, intent=False, own=True)

    def insert_one(self, space: str, seq: int) -> None:
        # One statement in autocommit: its own transaction, the cheapest form there is.
        self.cur.execute(
            self.insert, (space, seq, TYPE, json.dumps(PAYLOAD), now_text(), WRITER, 1, None)
        )

    def insert_many(self, space: str, seq: int, n: int) -> None:
        at = now_text()
        rows = [(space, seq + k, TYPE, json.dumps(PAYLOAD), at, WRITER, 1, None) for k in range(n)]
        self.cur.execute("BEGIN")
        self.cur.executemany(self.insert, rows)
        self.cur.execute("COMMIT")

    def read(self, space: str) -> list[tuple[Any, ...]]:
        loads = json.loads
        self.cur.execute(self.select, (space,))
        return [(s, t, loads(p), at, w, g, i) for s, t, p, at, w, g, i in self.cur.fetchall()]

    def fenced_one_statement(self, space: str, seq: int, holder: str, generation: int) -> None:
        """The store's guarded INSERT ... VALUES (CASE WHEN <checks> ...), bare: the cost of the
        checks alone (the fence is the row's writer and generation, as in the store)."""
        params = (space, seq, TYPE, json.dumps(PAYLOAD), now_text(), holder, generation, None)
        self.cur.execute(self.guarded, params)
        assert self.cur.fetchone() is not None  # RETURNING position: the row was written

    def fenced_multi_statement(self, space: str, seq: int, holder: str, generation: int) -> None:
        """The alternative to the one-statement append: BEGIN IMMEDIATE, a statement per check."""
        cur = self.cur
        cur.execute("BEGIN IMMEDIATE")
        cur.execute("SELECT holder, generation FROM leases WHERE space = ?", (space,))
        assert cur.fetchone() == (holder, generation)
        cur.execute("SELECT seq FROM events WHERE space = ? ORDER BY seq DESC LIMIT 1", (space,))
        row = cur.fetchone()
        assert (0 if row is None else row[0] + 1) == seq
        cur.execute(
            self.insert,
            (space, seq, TYPE, json.dumps(PAYLOAD), now_text(), holder, generation, None),
        )
        cur.execute("COMMIT")

    def close(self) -> None:
        self.conn.close()


class RawPostgres:
    """psycopg 3 in autocommit: each bare INSERT is its own transaction."""

    def __init__(self, url: str) -> None:
        import psycopg

        self.conn = psycopg.connect(libpq_url(url), autocommit=True)
        self.cur = self.conn.cursor()
        self.insert = INSERT_SQL.format(p="%s", payload="CAST(%s AS jsonb)")
        self.select = SELECT_SQL.format(p="%s", payload="payload::text")
        self.guarded = postgres.append_one_sql(fence=True, intent=False)

    def insert_one(self, space: str, seq: int) -> None:
        self.cur.execute(
            self.insert,
            (space, seq, TYPE, json.dumps(PAYLOAD), datetime.now(UTC), WRITER, 1, None),
        )

    def insert_many(self, space: str, seq: int, n: int) -> None:
        at = datetime.now(UTC)
        rows = [(space, seq + k, TYPE, json.dumps(PAYLOAD), at, WRITER, 1, None) for k in range(n)]
        with self.conn.transaction():
            self.cur.executemany(self.insert, rows)

    def read(self, space: str) -> list[tuple[Any, ...]]:
        loads = json.loads
        self.cur.execute(self.select, (space,))
        return [(s, t, loads(p), at, w, g, i) for s, t, p, at, w, g, i in self.cur.fetchall()]

    def fenced_one_statement(self, space: str, seq: int, holder: str, generation: int) -> None:
        """The store's guarded INSERT ... SELECT ... WHERE, bare: one round trip."""
        params = (space, seq, TYPE, json.dumps(PAYLOAD), datetime.now(UTC), holder, generation)
        self.cur.execute(self.guarded, (*params, None, space, seq, space, holder, generation))
        assert self.cur.rowcount == 1

    def fenced_multi_statement(self, space: str, seq: int, holder: str, generation: int) -> None:
        """The alternative to the one-statement append: a transaction, a round trip per check."""
        cur = self.cur
        with self.conn.transaction():
            cur.execute(
                "SELECT holder, generation FROM leases WHERE space = %s FOR SHARE", (space,)
            )
            assert cur.fetchone() == (holder, generation)
            cur.execute(
                "SELECT seq FROM events WHERE space = %s ORDER BY seq DESC LIMIT 1", (space,)
            )
            row = cur.fetchone()
            assert (0 if row is None else row[0] + 1) == seq
            cur.execute(
                self.insert,
                (
                    space,
                    seq,
                    TYPE,
                    json.dumps(PAYLOAD),
                    datetime.now(UTC),
                    holder,
                    generation,
                    None,
                ),
            )

    def close(self) -> None:
        self.conn.close()


def libpq_url(url: str) -> str:
    """A SQLAlchemy `postgresql+psycopg://` URL as libpq (psycopg.connect) takes it."""
    return url.replace("postgresql+psycopg://", "postgresql://", 1)
