"""What every adapter shares: argument checks, `append`/`append_many` over `write`, the
idempotency rule and the event a write stamps."""

from __future__ import annotations

import functools
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from datetime import datetime
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar, cast

from shard_sql.errors import IntentConflict, InvalidEvent, SeqConflict
from shard_sql.ports import BatchWriter, EventStore, FeedStore, Item
from shard_sql.validation import (
    Pending,
    check_intent_id,
    check_items,
    check_lease,
    check_position,
    check_seq,
    check_space,
    check_stored_space,
    check_text,
    check_types,
    load_json,
    pending,
    same_payload,
)
from shard_sql.values import Event, Lease, new_event

_loads = load_json  # json.loads, from a deep call stack too


def fence_space_matches(fence: Lease | None, space: str) -> None:
    if fence is not None and check_lease("fence", fence).space != space:
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
        check_stored_space(space)
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

    def iter_feed(self, after: int = 0, *, types: Collection[str] | None = None) -> Iterator[Event]:
        """Pages of `ITER_PAGE` events of `feed` (adapters that are a `FeedStore` have it)."""
        check_position("after", after)
        wanted = check_types(types)
        store = cast(FeedStore, self)
        return feed_pages(lambda a, n: store.feed(a, limit=n, types=wanted), after, self.ITER_PAGE)


def feed_pages(
    read: Callable[[int, int], list[Event]], after: int, page_size: int
) -> Iterator[Event]:
    """`read(after, limit)` (a `feed`) `page_size` events at a time, each page after the last
    one's position."""
    while True:
        page = read(after, page_size)
        yield from page
        if len(page) < page_size:
            return
        last = page[-1].position
        assert last is not None  # the feed returns placed events only
        after = last


class TransactionState:
    """The state every backend's `Transaction` keeps for its block: whether it ended, and the
    first write in it that failed. A failed write (any error a write method raised, even one
    the caller caught) dooms the transaction: later writes raise, and at the block's end
    nothing commits and the first failure is raised again (docs/feed.md, Transactions)."""

    __slots__ = ("ended", "failure")

    def __init__(self) -> None:
        self.ended = False
        self.failure: BaseException | None = None

    def check_open(self) -> None:
        """`InvalidEvent("transaction")` once the block ended, or after a failed write."""
        if self.ended:
            raise InvalidEvent("transaction", "its block ended; open a new transaction")
        if self.failure is not None:
            raise InvalidEvent(
                "transaction",
                f"a write in it failed ({type(self.failure).__name__}): nothing in it will "
                "commit; leave the block",
            ) from self.failure

    def failed(self, e: BaseException) -> None:
        """Record a write's failure (the first one is kept)."""
        if self.failure is None:
            self.failure = e

    def raise_failure(self) -> None:
        """At the end of a block that exited normally: raise the first failure, if any."""
        if self.failure is not None:
            raise self.failure


class _InTransaction(Protocol):
    state: TransactionState


_T = TypeVar("_T", bound=_InTransaction)
_P = ParamSpec("_P")
_R = TypeVar("_R")


def transaction_write(fn: Callable[Concatenate[_T, _P], _R]) -> Callable[Concatenate[_T, _P], _R]:
    """A write method of a `Transaction` (whose `state` is a `TransactionState`): refused once
    the block ended or a write failed; a failure it raises dooms the transaction."""

    @functools.wraps(fn)
    def write(self: _T, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        state = self.state
        state.check_open()
        try:
            return fn(self, *args, **kwargs)
        except BaseException as e:
            state.failed(e)
            raise

    return write


def checkpoint_conflict(name: str, position: int, stored: int) -> SeqConflict:
    """The error for a checkpoint save below the stored position (its `space` is the name)."""
    e = SeqConflict(name, position, stored)
    e.args = (f"checkpoint {name!r} is at {stored}: saving {position} would move it back",)
    return e


def already_written(found: Sequence[Event | None], batch: Sequence[Pending]) -> list[Event] | None:
    """The idempotency rule, given the event found for each item's intent id (None: not found,
    or no intent id) in the `batch` being written.

    Returns the events when the whole batch was written before, None when none of it was. Raises
    `IntentConflict` when an intent id was written with other content (type or payload), and
    `InvalidEvent` when only part of the batch was written.
    """
    hits = [e for e in found if e is not None]
    if not hits:
        return None
    for e, p in zip(found, batch, strict=True):
        if e is not None:
            check_same_intent(e, p)
    if len(hits) == len(found):
        return hits
    raise InvalidEvent("intent_id", "part of this batch was already written")


def check_same_intent(event: Event, item: Pending) -> Event:
    """`event`, the one written for `item`'s intent id, if it has the item's content (type and
    payload, see `same_payload`); else `IntentConflict`."""
    if event.type != item.type or not same_payload(event.payload, item.payload):
        raise IntentConflict(event.space, event.intent_id or "", event.seq)
    return event


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


def placed(e: Event, position: int | None) -> Event:
    """`e` at feed position `position`."""
    out: Event = new_event(
        e.space,
        e.seq,
        e.type,
        e.payload,
        e.recorded_at,
        e.writer,
        e.generation,
        e.intent_id,
        position,
    )
    return out


def decode_payloads(texts: Sequence[Any]) -> list[Any]:
    """`[json.loads(t) for t in texts]` in one `json.loads` call for the page: its per-call cost
    once, not per event (the garbage collector then runs as the host set it; the page still reads
    faster than the raw driver with a `json.loads` per row).

    Each stored text is one JSON value, so the joined array has one element per text; a parse
    error or another count (a text that is not one JSON value) falls back to the loop, with its
    errors. Only rows crafted to re-balance each other could shift payloads, and whoever can
    write rows can write any payload.
    """
    if len(texts) > 1:
        try:
            values = _loads("[" + ",".join(texts) + "]")
        except (TypeError, ValueError):
            pass
        else:
            if len(values) == len(texts):
                return values  # type: ignore[no-any-return]
    return [_loads(t) for t in texts]


# -- the arguments of the intent queue (`IntentQueue`), checked alike by the adapters ---------


def checked_put(space: object, item: object, holder: object) -> str:
    """The intent id of a `put_intent`; `InvalidEvent` for a bad space, holder or item."""
    check_space(space)
    check_text("holder", holder)
    intent_id = check_intent_id(item.intent_id) if isinstance(item, Pending) else None
    if intent_id is None:
        raise InvalidEvent("intent_id", "a forwarded intent needs one")
    return intent_id


def checked_intent_ids(intent_ids: object) -> list[str]:
    """The intent ids given to `forget_intents`."""
    if isinstance(intent_ids, str) or not isinstance(intent_ids, Iterable):
        raise InvalidEvent("intent_ids", "must be a sequence of intent ids, not a string")
    return [i for i in intent_ids if check_intent_id(i) is not None]


def checked_wait(spaces: object, timeout: object) -> list[str]:
    """The spaces of a `wait_for_change`; `InvalidEvent` for them or a bad timeout."""
    if isinstance(spaces, str) or not isinstance(spaces, Iterable):
        raise InvalidEvent("spaces", "must be a sequence of spaces, not a string")
    names = [check_space(s) for s in spaces]
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout >= 0:
        raise InvalidEvent("timeout", "must be a number of seconds >= 0")
    return names
