"""The database server's clock, for leases judged by one clock on every host."""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime, timedelta

from shard_sql.errors import StoreUnavailable
from shard_sql.ports import system_clock
from shard_sql.sql.connections import Database
from shard_sql.sql.dialects import Conn
from shard_sql.sql.errors import raise_translated

__all__ = ["CLOCK_REFRESH", "DatabaseClock"]

log = logging.getLogger("shard_sql.sql")

CLOCK_REFRESH = 1.0
"""Seconds between two reads of the server's clock."""


class DatabaseClock:
    """The server's `clock_timestamp()`, read at most every `CLOCK_REFRESH` seconds and
    extrapolated in between with this process's monotonic clock (so it costs no round trip per
    call and ignores steps of the local wall clock); the system clock where the database has no
    clock of its own (SQLite)."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._lock = threading.Lock()
        self._base: datetime | None = None
        self._at = 0.0
        self._tried = -CLOCK_REFRESH

    def __call__(self) -> datetime:
        if not self._db.dialect.has_server_clock:
            return system_clock()
        with self._lock:
            now = time.monotonic()
            if now - self._tried >= CLOCK_REFRESH:
                self._tried = now
                self._refresh()
            assert self._base is not None
            return self._base + timedelta(seconds=time.monotonic() - self._at)

    def _refresh(self) -> None:
        try:
            before = time.monotonic()
            server = self._db.call(self._server_time)
            after = time.monotonic()
        except Exception as e:
            if self._base is None:
                raise_translated(e, self._db.site)
            log.debug("%s: database clock not refreshed: %s", self._db.site, e)
        else:
            self._base, self._at = server, (before + after) / 2

    def _server_time(self, c: Conn) -> datetime:
        value = self._db.dialect.server_time(c)
        if not isinstance(value, datetime) or value.tzinfo is None:
            raise StoreUnavailable(f"{self._db.site}: clock_timestamp() returned {value!r}")
        return value.astimezone(UTC)
