"""The ports: the store interface and its optional capabilities, as Protocols only."""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from typing import Any, Protocol, runtime_checkable

from shard_sql.validation import Pending
from shard_sql.values import Event, Lease

Clock = Callable[[], datetime]
"""A zero-argument callable returning a timezone-aware `datetime`."""

Item = tuple[str, dict[str, Any]] | tuple[str, dict[str, Any], str | None]
"""One event of a batch: `(type, payload)` or `(type, payload, intent_id)`."""


def system_clock() -> datetime:
    """The default clock: the system time in UTC."""
    return datetime.now(UTC)


@runtime_checkable
class EventStore(Protocol):
    """An append-only log per space with a transactional compare-and-set append."""

    def events(self, space: str, *, from_seq: int = 0, limit: int | None = None) -> list[Event]:
        """Events of `space` in seq order, starting at `from_seq`, at most `limit` of them."""
        ...

    def iter_events(self, space: str, *, from_seq: int = 0) -> Iterator[Event]:
        """The same as `events`, streamed in bounded memory."""
        ...

    def head(self, space: str) -> int:
        """The next seq of `space` (= the number of events in it)."""
        ...

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
        """Write seq `expected_seq`, or raise `SeqConflict` (or `StaleLease` for a stale fence).

        A repeated `intent_id` returns the event already written for it and writes nothing
        (`IntentConflict` when that event has another type or payload).
        """
        ...

    def append_many(
        self,
        space: str,
        items: Iterable[Item],
        *,
        expected_seq: int,
        fence: Lease | None = None,
    ) -> list[Event]:
        """Write a batch at `expected_seq`, all or nothing."""
        ...

    def spaces(self) -> list[str]:
        """The spaces that have events, sorted."""
        ...


@runtime_checkable
class Transaction(Protocol):
    """Writes that commit together when the `store.transaction()` block exits normally, or not
    at all (an exception, a `SeqConflict` in any space, a stale fence). Using it after the block
    ended raises `InvalidEvent("transaction", ...)`. SQL transactions also have `.connection`.
    """

    def append(
        self,
        space: str,
        type: str,
        payload: dict[str, Any],
        *,
        expected_seq: int | None = None,
        fence: Lease | None = None,
        intent_id: str | None = None,
    ) -> Event:
        """As `EventStore.append`; `expected_seq=None` writes at the space's head as of this
        transaction (its own earlier writes included)."""
        ...

    def append_many(
        self,
        space: str,
        items: Iterable[Item],
        *,
        expected_seq: int | None = None,
        fence: Lease | None = None,
    ) -> list[Event]:
        """As `EventStore.append_many`, with `expected_seq=None` as in `append`."""
        ...

    def save_checkpoint(self, name: str, position: int, *, fence: Lease | None = None) -> None:
        """Store the checkpoint `name` at `position` in this transaction. A lower position than
        the stored one raises `SeqConflict` (an equal one is fine). With `fence`, raise
        `StaleLease` unless that lease is its space's current grant."""
        ...


@runtime_checkable
class FeedStore(EventStore, Protocol):
    """A store with the feed, checkpoints and transactions (api.md 8, 9, 10).

    Its members join `EventStore` once every adapter implements them; until then code that
    needs them takes a `FeedStore`.
    """

    def feed(
        self,
        after: int = 0,
        *,
        limit: int | None = None,
        types: Collection[str] | None = None,
    ) -> list[Event]:
        """Placed events with position > `after` in position order, at most `limit` of them,
        only those whose type is in `types` (when given)."""
        ...

    def iter_feed(self, after: int = 0, *, types: Collection[str] | None = None) -> Iterator[Event]:
        """The same as `feed`, streamed in bounded memory."""
        ...

    def feed_head(self) -> int:
        """The highest placed position (0 for an empty store)."""
        ...

    def wait_feed(self, after: int, *, timeout: float) -> bool:
        """True as soon as an event with a position above `after` is readable; False after
        `timeout` seconds. Every commit wakes it."""
        ...

    def checkpoint(self, name: str) -> int:
        """The position saved for the consumer `name`; 0 if never saved."""
        ...

    def checkpoints(self) -> dict[str, int]:
        """Every saved checkpoint: name -> position, in name order."""
        ...

    def transaction(self, connection: object | None = None) -> AbstractContextManager[Transaction]:
        """A block whose writes commit together. `connection` (SQL stores only) is the host's
        SQLAlchemy `Connection` or `Session` to join; elsewhere it raises `InvalidEvent`."""
        ...


@runtime_checkable
class PayloadReads(Protocol):
    """Reads of a few top-level payload keys of each event, extracted by the store, without
    building `Event`s or decoding whole payloads: an adapter's fast path for readers that turn
    every event into a record of their own (the eventsourcing module). Internal.

    Each key's value comes as text: a JSON string's own text, an integer's digits, None where
    the payload has no such key or null there (other values as the database renders them: do
    not rely on those). Keys are names of letters, digits and underscores (`InvalidEvent`).
    """

    def event_fields(
        self, space: str, keys: Sequence[str], *, from_seq: int = 0, limit: int | None = None
    ) -> list[tuple[Any, ...]]:
        """`(seq, type, *values of keys)` of each event `events(space, ...)` returns."""
        ...

    def feed_fields(
        self,
        keys: Sequence[str],
        after: int = 0,
        *,
        limit: int | None = None,
        types: Collection[str] | None = None,
    ) -> list[tuple[Any, ...]]:
        """`(position, space, type, *values of keys)` of each event `feed(after, ...)` returns."""
        ...


@runtime_checkable
class BatchWriter(Protocol):
    """The one write path every adapter implements; `append` and `append_many` call it.

    Internal: also used by the append authority (writes fenced by an in-memory registry) and by
    import (which keeps seq, writer, generation and times).
    """

    def write(
        self,
        space: str,
        batch: Sequence[Pending],
        *,
        expected_seq: int,
        fence: Lease | None,
        verify_fence: bool = True,
    ) -> list[Event]:
        """Write `batch` at `expected_seq` in one transaction, all or nothing.

        If every intent id of the batch is already written, return those events and write
        nothing; if only some are, raise `InvalidEvent`; if one was written with another type or
        payload, `IntentConflict`. With `fence` and `verify_fence`, raise
        `StaleLease` unless the fence is the space's current grant, checked in the transaction.
        Events take writer and generation from the fence (or from the `Pending` when set).
        """
        ...


@runtime_checkable
class IntentQueue(Protocol):
    """Forwarded intents, durable in the store, for holders in other processes and hosts.

    An intent is applied when the event with its `intent_id` exists in its space: writing the
    event is the mark, so an intent is applied at most once by construction (the idempotency of
    `write`), and a holder that dies leaves its pending intents to the next one.
    """

    def put_intent(self, space: str, item: Pending, *, holder: str) -> None:
        """Record `item` (whose `intent_id` is set) durably; wake the holder. Idempotent."""
        ...

    def find_intent(self, space: str, intent_id: str) -> Event | None:
        """The event written for `intent_id` in `space`, if any."""
        ...

    def pending_intents(self, space: str, *, limit: int) -> list[Pending]:
        """Unapplied intents of `space` in arrival order."""
        ...

    def forget_intents(self, space: str, intent_ids: Sequence[str]) -> None:
        """Drop the records of applied intents (their events remain)."""
        ...

    def wait_for_change(self, spaces: Sequence[str], timeout: float) -> None:
        """Block until an intent or event may have arrived in `spaces`, or `timeout` passes.

        A store with notifications (PostgreSQL LISTEN/NOTIFY) wakes early; others may sleep.
        """
        ...


@runtime_checkable
class SpaceWakeups(Protocol):
    """Optional, beside `IntentQueue`: how precise `wait_for_change` is."""

    def wakes_per_space(self) -> bool:
        """True when a wait ends for news of the spaces waited on (notifications, wake-up files),
        not at every change of the store (a holder then needs no rest between empty rounds)."""
        ...


@runtime_checkable
class IntentInbox(Protocol):
    """Optional, beside `IntentQueue`: pending intents as the store's notifications delivered
    them, so that a holder need not read them (PostgreSQL)."""

    def notified_intents(self, space: str, *, limit: int) -> list[Pending] | None:
        """Pending intents of `space` without a read, or None: then call `pending_intents`.
        May include intents applied meanwhile (writing one again returns its event)."""
        ...

    def drop_notified(self, space: str, intent_ids: Sequence[str]) -> None:
        """These intents are applied: no longer offered by `notified_intents`."""
        ...

    def awaited_event(self, space: str, intent_id: str) -> tuple[Event | None, bool]:
        """For an intent put through this store: (its event, True) as notified; (None, True)
        when it is surely not written yet; (None, False) when unknown: call `find_intent`."""
        ...

    def watch_intents(self, callback: Callable[[str], bool]) -> Callable[[], None]:
        """Call `callback(space)` on the store's notification thread whenever an intent of
        `space` arrives (a holder then applies it at once, without a thread switch; it returns
        True when it did, and the intent then wakes no waiter); return the function that stops
        the calls. `callback` should not raise."""
        ...


@runtime_checkable
class LeaseStore(Protocol):
    """Durable lease records kept beside the events, shared by every process that opens them.

    Each call is one compare-and-set; `now` comes from the registry's clock.
    A store implementing it can check `fence=` atomically with the write.
    """

    def lease_acquire(self, space: str, holder: str, ttl_seconds: float, now: datetime) -> Lease:
        """Grant or renew; raise `LeaseHeld` while another holder's lease is valid at `now`."""
        ...

    def lease_renew(self, lease: Lease, ttl_seconds: float, now: datetime) -> Lease:
        """Extend `lease` (same generation) or raise `StaleLease` if it is no longer current."""
        ...

    def lease_release(self, lease: Lease, now: datetime) -> None:
        """End `lease` at `now` if it is still current; otherwise do nothing.

        The record keeps its holder and generation; the next grant bumps the generation.
        """
        ...

    def lease_current(self, space: str, now: datetime) -> Lease | None:
        """The lease of `space` that is valid at `now`, if any."""
        ...

    def lease_revoke(self, space: str, now: datetime) -> Lease | None:
        """End the space's lease at `now` and bump the generation so its holder is fenced.

        Returns the new (already expired) record, or None when the space never had a lease.
        """
        ...


@runtime_checkable
class GenerationFloor(Protocol):
    """Optional, beside `LeaseStore`: what an import calls after writing events that keep the
    generations they were written under (`shard_sql.transfer`)."""

    def lease_advance(self, space: str, generation: int, now: datetime) -> Lease | None:
        """Raise the space's lease generation to at least `generation` (the rule `advanced`),
        so the next grant is newer than every generation in its log; a lease of a lower
        generation ends at `now`. The new record, or None when it was there already."""
        ...


@runtime_checkable
class HandoffSite(Protocol):
    """Optional: where the holders of a store listen for direct hand-offs from forwarders on
    the same host (`shard_sql.handoff`)."""

    def handoff_dir(self) -> str | None:
        """A private directory of this user, the same for every process opening the store on
        this host; None: no hand-off (an in-memory database, no usable directory)."""
        ...
