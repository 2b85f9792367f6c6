"""What every adapter shares: argument checks, `append`/`append_many` over `write`, the
idempotency rule and the event a write stamps."""

from __future__ import annotations

import gc
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from shard_sql.errors import InvalidEvent
from shard_sql.ports import BatchWriter, EventStore, Item
from shard_sql.validation import Pending, check_items, check_seq, check_space, pending
from shard_sql.values import Event, Lease, new_event


def fence_space_matches(fence: Lease | None, space: str) -> None:
    if fence is not None and fence.space != space:
        raise InvalidEvent("fence", f"is a lease on {fence.space!r}, not on {space!r}")


class StoreBase(EventStore, BatchWriter):
    """What every adapter shares: argument checks, and `append`/`append_many` over `write`."""

    def append(
        self,
        space: str,
        type: str,
        payload: dict[str, Any],
        *,
        expected_seq: int,
        fence: Lease | None = None,
        intent_id: str | None = None,
    ) -> Event:
        check_space(space)
        check_seq("expected_seq", expected_seq)
        fence_space_matches(fence, space)
        batch = [pending(type, payload, intent_id)]
        return self.write(space, batch, expected_seq=expected_seq, fence=fence)[0]

    def append_many(
        self,
        space: str,
        items: Iterable[Item],
        *,
        expected_seq: int,
        fence: Lease | None = None,
    ) -> list[Event]:
        check_space(space)
        check_seq("expected_seq", expected_seq)
        fence_space_matches(fence, space)
        return self.write(space, check_items(items), expected_seq=expected_seq, fence=fence)

    def iter_events(self, space: str, *, from_seq: int = 0) -> Iterator[Event]:
        """Pages of `ITER_PAGE` events; adapters with a cheaper cursor override it."""
        check_space(space)
        check_seq("from_seq", from_seq)
        return self._pages(space, from_seq)

    ITER_PAGE = 1000

    def _pages(self, space: str, seq: int) -> Iterator[Event]:
        while True:
            page = self.events(space, from_seq=seq, limit=self.ITER_PAGE)
            yield from page
            if len(page) < self.ITER_PAGE:
                return
            seq += len(page)


def already_written(found: Sequence[Event | None]) -> list[Event] | None:
    """The idempotency rule, given the event found for each item's intent id (None: not found,
    or no intent id).

    Returns the events when the whole batch was written before, None when none of it was, and
    raises `InvalidEvent` when only part of it was.
    """
    hits = [e for e in found if e is not None]
    if not hits:
        return None
    if len(hits) == len(found):
        return hits
    raise InvalidEvent("intent_id", "part of this batch was already written")


def stamp(space: str, seq: int, p: Pending, fence: Lease | None, now: datetime) -> Event:
    """The event a store writes for `p` at `seq`."""
    e: Event = new_event(
        space,
        seq,
        p.type,
        p.payload,
        p.recorded_at or now,
        p.writer if p.writer is not None else (fence.holder if fence else ""),
        p.generation if p.generation is not None else (fence.generation if fence else 0),
        p.intent_id,
    )
    return e


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while a page of events is built.

    Thousands of new `Event` objects (each with a payload dict) trigger collections that scan the
    whole, growing heap; the objects form no cycles, so the pause frees nothing late. Measured on
    100,000 SQLite events: 154k -> 258k events/s. The collector is re-enabled only if it was
    enabled before (a caller that disabled it keeps it so).
    """
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()
