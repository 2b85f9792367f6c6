"""Change counters per key, and the waits they end: how news of intents and events reaches the
threads of one process that wait for it."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence

__all__ = ["APPLIED", "EVENT_BODY", "FEED", "INTENT", "INTENT_BODY", "Signal"]

INTENT = "i"
"""Notification kind: an intent was recorded in the space."""
APPLIED = "a"
"""Notification kind: the event of an intent recorded in the space was written (PostgreSQL: by the
trigger `events_notify_applied`; in-memory SQLite: when the holder forgets the intent)."""
INTENT_BODY = "j"
"""Notification kind (PostgreSQL): an intent was recorded; the payload is the intent as JSON
(`{"s": space, "i": intent_id, "t": type, "p": payload}`), so that the holder need not read it."""
EVENT_BODY = "e"
"""Notification kind (PostgreSQL, trigger of migration 0003): the event of a recorded intent was
written; the payload is the event as JSON, so that its forwarder need not read it."""
FEED = "f"
"""Notification kind (PostgreSQL, channel shard_sql_feed): events were committed; the feed's
waiters look (key `(FEED, "")`)."""
FALLBACK_SLEEP = 0.05
"""Seconds: the longest a wait sleeps while the source of news is down (then the caller looks)."""
MAX_TRACKED = 10_000
"""Keys remembered at most (then they are forgotten, and every waiter wakes once)."""


class Signal:
    """Change counters per key behind one lock, and waits on them.

    Keys: `(INTENT, space)` (an intent was recorded: news for the holder), `(APPLIED, space)`
    (the event of a recorded intent was written, announced by space only) and `(EVENT_BODY,
    "<space>\\0<intent id>")` (that intent's event was written: news for its forwarder alone).
    `seq` counts changes; `last[key]` is the seq of the latest; a reset (the listener
    reconnected: changes may have been missed) concerns everything. Each thread keeps the seq
    it saw when its previous wait returned: a change after that ends its next wait at once. A
    change wakes only the threads waiting on its key (each waits on its own `threading.Event`):
    with many forwarders on one space, each wakes for its own event, not for everyone's.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.seq = 0
        self.reset_seq = 0
        self.last: dict[tuple[str, str], int] = {}
        self.up = True
        self.received = 0
        """Changes recorded (notifications received, on PostgreSQL)."""
        self.woken = 0
        """Waits a change ended (the others ran to their timeout)."""
        self._waiting: dict[tuple[str, str], set[threading.Event]] = {}
        self._everyone: set[threading.Event] = set()
        self._seen = threading.local()

    def changed(self, changes: Sequence[tuple[str, str]]) -> None:
        """Record changes, each `(kind, key)`; wake the threads waiting on them."""
        with self._lock:
            if len(self.last) > MAX_TRACKED:
                self.last.clear()
                self._reset()
            for key in changes:
                self.seq += 1
                self.last[key] = self.seq
                self.received += 1
                for event in self._waiting.get(key, ()):
                    event.set()

    def reset(self) -> None:
        with self._lock:
            self._reset()

    def _reset(self) -> None:
        self.seq += 1
        self.reset_seq = self.seq
        for event in self._everyone:
            event.set()

    def set_up(self, up: bool) -> None:
        with self._lock:
            self.up = up
            if up:
                self._reset()
            for event in self._everyone:
                event.set()

    def wait(
        self, spaces: Sequence[str], timeout: float, awaited: Mapping[str, str] | None = None
    ) -> bool:
        """Block until one of `spaces` changed since this thread's previous wait, or `timeout`;
        while not `up`, at most `FALLBACK_SLEEP`. In the `awaited` spaces (this thread waits for
        the intent it recorded there, by intent id) only its event counts, elsewhere only
        `INTENT`. True when a change ended the wait."""
        keys: list[tuple[str, str]] = []
        for space in spaces:
            intent_id = awaited.get(space) if awaited else None
            if intent_id is None:
                keys.append((INTENT, space))
            else:
                keys += ((APPLIED, space), (EVENT_BODY, f"{space}\0{intent_id}"))
        return self.wait_keys(keys, timeout)

    def wait_keys(self, keys: Sequence[tuple[str, str]], timeout: float) -> bool:
        """`wait` on these keys (or a reset)."""
        deadline = time.monotonic() + timeout
        event: threading.Event | None = getattr(self._seen, "event", None)
        if event is None:
            event = self._seen.event = threading.Event()
        base: int = getattr(self._seen, "seq", 0)
        fallback = False
        with self._lock:
            for key in keys:
                self._waiting.setdefault(key, set()).add(event)
            self._everyone.add(event)
        try:
            while True:
                with self._lock:
                    if self.reset_seq > base or any(self.last.get(k, 0) > base for k in keys):
                        self.woken += 1
                        return True
                    event.clear()
                    up = self.up
                remaining = deadline - time.monotonic()
                if remaining <= 0 or fallback:
                    return False
                if up:
                    event.wait(remaining)
                else:
                    event.wait(min(remaining, FALLBACK_SLEEP))
                    fallback = not self.up
        finally:
            with self._lock:
                self._seen.seq = self.seq
                self._everyone.discard(event)
                for key in keys:
                    waiting = self._waiting.get(key)
                    if waiting is not None:
                        waiting.discard(event)
                        if not waiting:
                            del self._waiting[key]
