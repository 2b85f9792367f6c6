"""The aggregate, application, tracking and process recorders over one shard_sql store.

An aggregate is a space (`<app>.events:<id>`), a notification id is a feed position, a tracking
record is a checkpoint; docs/eventsourcing.md says why and what follows.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from threading import Thread
from typing import TYPE_CHECKING, Any
from uuid import UUID

from eventsourcing.persistence import (
    AggregateRecorder,
    ApplicationRecorder,
    DataError,
    IntegrityError,
    ListenNotifySubscription,
    Notification,
    ProcessRecorder,
    Recorder,
    StoredEvent,
    Subscription,
    Tracking,
    TrackingRecorder,
)

from shard_sql.errors import InvalidEvent, SeqConflict
from shard_sql.eventsourcing._mapping import (
    FIELDS,
    Row,
    event_row,
    id_text,
    joined_state,
    parse_id,
    part_of,
    payloads,
    record,
    row_state,
    row_version,
    stored_events,
    topic_of,
    translated,
    type_of,
    usual_pending,
    version_of,
)
from shard_sql.eventsourcing._placed import placed_appends, placed_later
from shard_sql.ports import BatchWriter, FeedStore, PayloadReads
from shard_sql.validation import Pending, check_items, check_seq, check_space
from shard_sql.values import Event

if TYPE_CHECKING:
    from shard_sql.ports import Transaction

WRITE_TRIES = 8
"""Writes tried again after a SeqConflict that was not a duplicate (a guessed base, or another
snapshot written first) before it is reported as an IntegrityError."""
WAKE_POLL = 0.25
"""Seconds a subscription's waker waits on `wait_feed` before it looks at `stop()` again."""
MAX_BASES = 100_000
"""Spaces whose first version a recorder remembers (then it forgets them all and reads again)."""

_new = object.__new__
_set = object.__setattr__

_Run = tuple[str, list[StoredEvent]]
"""Consecutive stored events of one space."""


def _valid_space(space: str) -> bool:
    try:
        check_space(space)
    except InvalidEvent:
        return False
    return True


class ShardSqlRecorder(Recorder):
    """What every recorder here shares: the store, and the names of its spaces and checkpoints.

    `prefix` is the application's name and a dot (or empty); `purpose` is "events" (versions
    follow each other: seq = version - first version) or another (e.g. "snapshots": versions
    only grow, a snapshot may span several events).
    """

    def __init__(
        self,
        store: FeedStore,
        *,
        prefix: str = "",
        purpose: str = "events",
        uuid_ids: bool = True,
    ) -> None:
        self.store = store
        self.space_prefix = f"{prefix}{purpose}:"
        self.tracking_prefix = f"{prefix}tracking:"
        self.contiguous = purpose == "events"
        self.uuid_ids = uuid_ids
        # The space of a UUID is the prefix and 36 hex digits and dashes: a valid space name
        # whenever the prefix makes one (checked here once, not on every write).
        self._uuid_spaces_valid = _valid_space(self.space_prefix + "0" * 36)
        self._bases: dict[str, int] = {}
        # Checked once: isinstance against a Protocol costs more than reading an event.
        self._payload_reads = store if isinstance(store, PayloadReads) else None
        self._batch_writer = store if isinstance(store, BatchWriter) else None
        self._placed = placed_appends(store)

    def _rows(self, space: str, from_seq: int = 0, limit: int | None = None) -> list[Row]:
        """The rows (`Row`) of the events `store.events` returns: the store extracts the
        payload keys where it can (`PayloadReads`, SQL stores), no `Event` is built."""
        reads = self._payload_reads
        if reads is not None:
            return reads.event_fields(space, FIELDS, from_seq=from_seq, limit=limit)
        return [event_row(e) for e in self.store.events(space, from_seq=from_seq, limit=limit)]

    def _feed_rows(self, after: int, limit: int, types: list[str] | None) -> list[Row]:
        """`(position, space, type, version, state, topic, state_b64)` of the events
        `store.feed` returns."""
        reads = self._payload_reads
        if reads is not None:
            return reads.feed_fields(FIELDS, after, limit=limit, types=types)
        return [
            (e.position or 0, e.space, *event_row(e)[1:])
            for e in self.store.feed(after, limit=limit, types=types)
        ]

    def space(self, originator_id: UUID | str) -> str:
        """The space of an aggregate's events (or snapshots)."""
        return self.space_prefix + id_text(originator_id)

    def tracking_name(self, application_name: str) -> str:
        """The checkpoint that keeps the tracking records of an upstream application."""
        return self.tracking_prefix + application_name

    def _save_tracking(self, tx: Transaction, tracking: Tracking) -> None:
        n = tracking.notification_id
        if type(n) is not int or n < 1:
            raise DataError(f"notification_id must be an int >= 1, not {n!r}")
        name = self.tracking_name(tracking.application_name)
        # A checkpoint may be saved again at its position; a tracking record may not. Saving
        # n - 1 first fails (SeqConflict) when n or more is stored already.
        tx.save_checkpoint(name, n - 1)
        tx.save_checkpoint(name, n)


class ShardSqlAggregateRecorder(ShardSqlRecorder, AggregateRecorder):
    """Stored events of aggregates, one space per aggregate."""

    returns_ids = False

    def insert_events(
        self, stored_events: Sequence[StoredEvent], **kwargs: Any
    ) -> Sequence[int] | None:
        ids = self._insert(stored_events, None)
        return ids if self.returns_ids else None

    def select_events(
        self,
        originator_id: UUID | str,
        *,
        gt: int | None = None,
        lte: int | None = None,
        desc: bool = False,
        limit: int | None = None,
    ) -> Sequence[StoredEvent]:
        space = self.space(originator_id)
        with translated():
            if self.contiguous:
                rows = self._select_contiguous(space, gt, lte, desc, limit)
                return stored_events(originator_id, space, rows)
            records = self._select_parts(space, gt, lte, desc, limit)
            return [self._stored(originator_id, r) for r in records]

    # -- writing ---------------------------------------------------------------------------

    def _insert(self, stored_events: Sequence[StoredEvent], tracking: Tracking | None) -> list[int]:
        """Write the events (and the tracking record) in one transaction; their positions."""
        runs = self._runs(stored_events)
        if not runs and tracking is None:
            return []
        with translated():
            for attempt in range(WRITE_TRIES):
                expected = self._expected(runs)
                try:
                    ids = self._write(runs, expected, tracking)
                except SeqConflict as e:
                    if attempt + 1 < WRITE_TRIES and self._learn(e, expected):
                        continue
                    raise
                break
            for space, (_, v1, guessed) in expected.items():
                if guessed:
                    self._remember(space, v1)
            return ids

    def _runs(self, stored_events: Sequence[StoredEvent]) -> list[_Run]:
        """Group consecutive events of one space; refuse versions that cannot be appended."""
        if len(stored_events) == 1:  # `Application.save` of a new aggregate: one event
            s = stored_events[0]
            if type(s.originator_version) is not int:
                name = type(s.originator_version).__name__
                raise DataError(f"originator_version must be an int, not {name}")
            return [(self.space(s.originator_id), [s])]
        runs: list[_Run] = []
        last: dict[str, int] = {}
        for s in stored_events:
            space = self.space(s.originator_id)
            v = s.originator_version
            if type(v) is not int:
                raise DataError(f"originator_version must be an int, not {type(v).__name__}")
            prev = last.get(space)
            if prev is not None and (v != prev + 1 if self.contiguous else v <= prev):
                raise IntegrityError(f"{space}: version {v} cannot follow version {prev}")
            last[space] = v
            if runs and runs[-1][0] == space:
                runs[-1][1].append(s)
            else:
                runs.append((space, [s]))
        return runs

    def _items(self, events: list[StoredEvent]) -> list[tuple[str, dict[str, Any]]]:
        """The (type, payload) items that write `events`; `DataError` for one that cannot be
        written (over the payload limit)."""
        split = not self.contiguous
        return [(type_of(s.topic), p) for s in events for p in payloads(s, split=split)]

    def _batch(self, events: list[StoredEvent]) -> list[Pending]:
        """`events` ready to write: the usual events as `usual_pending` builds them (their
        payloads made here, so not checked again), any other batch through the store's checks
        (`check_items`)."""
        out = []
        for s in events:
            p = usual_pending(s)
            if p is None:
                return check_items(self._items(events))
            out.append(p)
        return out

    def _expected(self, runs: list[_Run]) -> dict[str, tuple[int, int, bool]]:
        """Per space: (the seq to write at, the first version written, whether the seq is a
        guess). With an unknown first version, the guess is a new aggregate: seq 0."""
        out: dict[str, tuple[int, int, bool]] = {}
        for space, events in runs:
            if space in out:
                continue
            v1 = events[0].originator_version
            if not self.contiguous:
                out[space] = (self._next_sparse(space, v1), v1, False)
                continue
            base = self._bases.get(space)
            if base is None:
                out[space] = (0, v1, True)
            elif v1 < base:
                raise IntegrityError(f"{space}: version {v1} is before its first, {base}")
            else:
                out[space] = (v1 - base, v1, False)
        return out

    def _next_sparse(self, space: str, v1: int) -> int:
        head = self.store.head(space)
        if head:
            last = version_of(self.store.events(space, from_seq=head - 1, limit=1)[0])
            if last >= v1:
                raise IntegrityError(f"{space}: version {v1} is not after version {last}")
        return head

    def _write(
        self,
        runs: list[_Run],
        expected: dict[str, tuple[int, int, bool]],
        tracking: Tracking | None,
    ) -> list[int]:
        """Write the runs (and the tracking record) in one transaction; the positions of their
        events when the recorder returns them (else [])."""
        if len(runs) == 1 and tracking is None:
            # One aggregate (what `Application.save` of one aggregate writes): the store's own
            # write, one transaction as below, in fewer statements (SQLite and PostgreSQL: one
            # event is one statement in autocommit, no BEGIN, head read and COMMIT of its own).
            # The checks of `append_many`, with the payloads this module built not checked again
            # (`_batch`): the store's `write` takes the batch.
            space, events = runs[0]
            seq = expected[space][0]
            if not (self._uuid_spaces_valid and type(events[0].originator_id) is UUID):
                check_space(space)
            if seq:
                check_seq("expected_seq", seq)
            batch = self._batch(events)
            placed = self._placed
            if placed is not None and self.returns_ids:
                # PostgreSQL: written and placed in one transaction (`PlacedAppends`).
                ids = placed(space, batch, seq)
                return placed_later(self.store, [(space, seq, len(batch))]) if ids is None else ids
            writer = self._batch_writer
            if writer is not None:
                out = writer.write(space, batch, expected_seq=seq, fence=None)
            else:
                items = [(p.type, p.payload) for p in batch]
                out = self.store.append_many(space, items, expected_seq=seq)
            return self._positions([out]) if self.returns_ids else []
        seqs = {space: seq for space, (seq, _, _) in expected.items()}
        written: list[list[Event]] = []
        with self.store.transaction() as tx:
            for space, events in runs:
                out = tx.append_many(space, self._items(events), expected_seq=seqs[space])
                seqs[space] += len(out)
                written.append(out)
            if tracking is not None:
                self._save_tracking(tx, tracking)
        return self._positions(written) if self.returns_ids else []

    def _learn(self, e: SeqConflict, expected: dict[str, tuple[int, int, bool]]) -> bool:
        """After a SeqConflict: is the write worth trying again?"""
        got = expected.get(e.space)
        if got is None:
            return False  # a tracking record already there
        _, v1, guessed = got
        if not self.contiguous:
            return True  # another snapshot came first: `_next_sparse` looks again
        if not guessed:
            return False
        first = self.store.events(e.space, limit=1)
        if not first:
            return True
        base = version_of(first[0])
        self._remember(e.space, base)
        return v1 != base

    def _remember(self, space: str, base: int) -> None:
        if len(self._bases) >= MAX_BASES:
            self._bases.clear()
        self._bases[space] = base

    def _positions(self, written: list[list[Event]]) -> list[int]:
        """Feed positions of the written events (`placed_later` for those not placed yet)."""
        ids = [e.position for out in written for e in out]
        if None not in ids:
            return ids  # type: ignore[return-value]
        return placed_later(self.store, [(out[0].space, out[0].seq, len(out)) for out in written])

    # -- reading ---------------------------------------------------------------------------

    def _stored(self, originator_id: UUID | str, parts: list[Event]) -> StoredEvent:
        first = parts[0]
        s: StoredEvent = record(
            StoredEvent,
            {
                "originator_id": originator_id,
                "originator_version": version_of(first),
                "topic": topic_of(first),
                "state": joined_state(parts),
            },
        )
        return s

    def _base(self, space: str) -> int | None:
        base = self._bases.get(space)
        if base is None:
            first = self.store.events(space, limit=1)
            if not first:
                return None
            base = version_of(first[0])
            self._remember(space, base)
        return base

    def _select_contiguous(
        self, space: str, gt: int | None, lte: int | None, desc: bool, limit: int | None
    ) -> list[Row]:
        """Versions follow each other from the first: seq = version - first version."""
        if gt is None and lte is None and not desc:
            found = self._rows(space, limit=limit)
            if found and space not in self._bases:
                self._remember(space, row_version(found[0][2], space, "seq", found[0][0]))
            return found
        base = self._base(space)
        if base is None:
            return []
        lo = 0 if gt is None else max(0, gt + 1 - base)
        hi = self.store.head(space) if lte is None else max(0, lte + 1 - base)
        if hi <= lo or limit == 0:
            return []
        if not desc:
            n = hi - lo if limit is None else min(limit, hi - lo)
            return self._rows(space, from_seq=lo, limit=n)
        start = lo if limit is None else max(lo, hi - limit)
        found = self._rows(space, from_seq=start, limit=hi - start)
        found.reverse()
        return found

    def _select_parts(
        self, space: str, gt: int | None, lte: int | None, desc: bool, limit: int | None
    ) -> list[list[Event]]:
        """Versions only grow, and a record may span several events (parts)."""
        if limit == 0:
            return []
        if desc and limit == 1 and gt is None:
            last = self._last_at_most(space, lte)
            return [] if last is None else [last]
        records: list[list[Event]] = []
        for e in self.store.iter_events(space):
            v = version_of(e)
            if part_of(e) and records and version_of(records[-1][0]) == v:
                records[-1].append(e)
            elif (gt is None or v > gt) and (lte is None or v <= lte):
                records.append([e])
        if desc:
            records.reverse()
        return records if limit is None else records[:limit]

    def _last_at_most(self, space: str, lte: int | None) -> list[Event] | None:
        """The last record with a version <= lte: the last event, else a binary search."""
        head = self.store.head(space)
        if not head:
            return None
        last = self.store.events(space, from_seq=head - 1, limit=1)[0]
        if lte is None or version_of(last) <= lte:
            seq, found = head - 1, last
        else:
            lo, hi, found_at = 0, head - 1, None  # the answer is in [lo, hi)
            while lo < hi:
                mid = (lo + hi) // 2
                e = self.store.events(space, from_seq=mid, limit=1)[0]
                if version_of(e) <= lte:
                    found_at, lo = e, mid + 1
                else:
                    hi = mid
            if found_at is None:
                return None
            seq, found = found_at.seq, found_at
        part = part_of(found)
        if not part:
            return [found]
        return self.store.events(space, from_seq=seq - part, limit=part + 1)


class ShardSqlApplicationRecorder(ShardSqlAggregateRecorder, ApplicationRecorder):
    """Aggregate events, and the application's notification log: the store's feed, less the
    events of other applications and of snapshots (other spaces)."""

    returns_ids = True

    def select_notifications(
        self,
        start: int | None,
        limit: int,
        stop: int | None = None,
        topics: Sequence[str] = (),
        *,
        inclusive_of_start: bool = True,
    ) -> Sequence[Notification]:
        after = 0 if start is None else start - 1 if inclusive_of_start else start
        after = max(after, 0)
        wanted = set(topics)
        types = [type_of(t) for t in wanted] or None
        out: list[Notification] = []
        with translated():
            while len(out) < limit:
                want = limit - len(out)
                page = self._feed_rows(after, want, types)
                if self._notifications(page, stop, wanted, out):
                    break  # past `stop`
                if len(page) < want:
                    break
                after = page[-1][0]
        return out

    def _notifications(
        self, page: list[Row], stop: int | None, wanted: set[str], out: list[Notification]
    ) -> bool:
        """Add the notifications of this application's events in `page` to `out`; True when
        an event is past `stop`."""
        prefix, cut, as_uuid = self.space_prefix, len(self.space_prefix), self.uuid_ids
        ids: dict[str, UUID | str] = {}
        new, set_, append = _new, _set, out.append
        for position, space, type_, v, text, topic, b64 in page:
            if stop is not None and position > stop:
                return True
            if not space.startswith(prefix):
                continue
            if topic is not None:
                type_ = topic
            if wanted and type_ not in wanted:
                continue
            try:
                v = int(v)
            except (TypeError, ValueError):
                v = row_version(v, space, "position", position)  # raises
            if text is not None:
                state = text.encode("utf-8")
            else:
                state = row_state(text, b64, space, "position", position)
            originator_id = ids.get(space)
            if originator_id is None:
                originator_id = ids[space] = parse_id(space[cut:], as_uuid=as_uuid)
            n = new(Notification)  # as `stored_events` builds records
            set_(
                n,
                "__dict__",
                {"originator_id": originator_id, "originator_version": v, "topic": type_,
                 "state": state, "id": position},
            )  # fmt: skip
            append(n)
        return False

    def max_notification_id(self) -> int | None:
        """The last position of this application's events: looked for back from the feed's
        head, in windows that grow (the head is usually one of them)."""
        with translated():
            hi = self.store.feed_head()
            width = 4
            while hi > 0:
                lo = max(0, hi - width)
                for e in reversed(self.store.feed(lo, limit=hi - lo)):
                    if e.position is not None and e.position <= hi and self._mine(e):
                        return e.position
                hi, width = lo, width * 8
        return None

    def subscribe(
        self, gt: int | None = None, topics: Sequence[str] = ()
    ) -> Subscription[ApplicationRecorder]:
        return ShardSqlSubscription(self, gt=gt, topics=topics)

    def _mine(self, e: Event) -> bool:
        return e.space.startswith(self.space_prefix)


class ShardSqlSubscription(ListenNotifySubscription[ShardSqlApplicationRecorder]):
    """eventsourcing's pull loop, woken by the store's `wait_feed`."""

    def __init__(
        self,
        recorder: ShardSqlApplicationRecorder,
        gt: int | None = None,
        topics: Sequence[str] = (),
    ) -> None:
        super().__init__(recorder=recorder, gt=gt, topics=topics)
        self._waker = Thread(target=self._wake_on_feed, daemon=True)
        self._waker.start()

    def __exit__(self, *args: object, **kwargs: Any) -> None:
        try:
            super().__exit__(*args, **kwargs)
        finally:
            self._waker.join()

    def _wake_on_feed(self) -> None:
        store = self._recorder.store
        after = self._last_notification_id or 0
        try:
            while not self._has_been_stopped:
                if store.wait_feed(after, timeout=WAKE_POLL):
                    # Read the head before the wake-up: what is at or below it gets pulled.
                    after = store.feed_head()
                    self._has_been_notified.set()
        except BaseException as e:
            if self._thread_error is None:
                self._thread_error = e
            self.stop()


class ShardSqlTrackingRecorder(ShardSqlRecorder, TrackingRecorder):
    """Tracking records as checkpoints named `<app>.tracking:<upstream app>`."""

    def insert_tracking(self, tracking: Tracking) -> None:
        with translated(), self.store.transaction() as tx:
            self._save_tracking(tx, tracking)

    @contextmanager
    def tracking_transaction(
        self, tracking: Tracking, *, connection: object | None = None
    ) -> Iterator[Transaction]:
        """A shard_sql transaction that records `tracking`: what a projection writes in it
        (events, or its own rows through `tx.connection` on SQL stores; `connection` joins the
        host's) commits with the tracking record, or nothing does."""
        with translated(), self.store.transaction(connection) as tx:
            self._save_tracking(tx, tracking)
            yield tx

    def max_tracking_id(self, application_name: str) -> int | None:
        with translated():
            position = self.store.checkpoint(self.tracking_name(application_name))
        return position or None


class ShardSqlProcessRecorder(
    ShardSqlTrackingRecorder, ShardSqlApplicationRecorder, ProcessRecorder
):
    """Events and the tracking record of the notification they came from, in one transaction."""

    def insert_events(
        self, stored_events: Sequence[StoredEvent], **kwargs: Any
    ) -> Sequence[int] | None:
        tracking = kwargs.get("tracking")
        if tracking is not None and not isinstance(tracking, Tracking):
            raise DataError(f"tracking must be a Tracking, not {type(tracking).__name__}")
        return self._insert(stored_events, tracking)
