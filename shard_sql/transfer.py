"""Export, import and copy: move a log between stores, keeping seq, writer, generation and times.

The format is JSON lines, one event per line (`event_to_json`). Import writes through the
target's `BatchWriter` without a fence, `IMPORT_BATCH` events per transaction; see docs/cli.md.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import IO, Any

from shard_sql.errors import InvalidEvent, SeqConflict, ShardSqlError
from shard_sql.ports import BatchWriter, EventStore, GenerationFloor, LeaseStore, system_clock
from shard_sql.validation import (
    MAX_PAYLOAD_DEPTH,
    Pending,
    check_seq,
    check_space,
    check_text,
    on_fresh_stack,
    pending,
    same_payload,
)
from shard_sql.values import Event

IMPORT_BATCH = 500
"""Events written per transaction by `import_events`, `import_jsonl` and `copy_events`."""

EVENT_KEYS = ("space", "seq", "type", "payload", "recorded_at", "writer", "generation")
"""The keys every exported line has (`intent_id` may be missing: None)."""

MAX_POSITION = 2**63 - 1
"""The largest seq or generation every store keeps (a signed 64-bit integer)."""

Progress = Callable[[int], None]
"""Called with the work done since its last call (events; bytes for `import_jsonl`)."""


class TransferError(ShardSqlError):
    """The events cannot go into the target as they are: a gap, an event that differs from the
    one already there, an intent id used twice. Nothing of the failing batch was written."""


class UnknownSpace(ShardSqlError):
    """A space named explicitly has no events."""

    def __init__(self, space: str) -> None:
        super().__init__(f"unknown space {space!r}: it has no events")
        self.space = space


class InvalidLine(InvalidEvent):
    """An input line (or a copied event) is not acceptable; `where` names it (`log.jsonl line
    7`, `'wiki' seq 3`)."""

    def __init__(self, where: str, field: str, message: str) -> None:
        super().__init__(field, message)
        self.where = where
        self.args = (f"{where}: {message}",)


class TargetChanged(SeqConflict):
    """Another writer moved a space's head during the import; run it again to continue."""

    def __init__(self, space: str, head: int) -> None:
        super().__init__(space, head)
        self.args = (
            f"space {space!r} changed during the import (head moved past {head}); "
            "run the import again to continue",
        )


@dataclass(frozen=True, slots=True)
class ImportReport:
    """What an import or copy did: events written, events already there (skipped), spaces."""

    written: int
    skipped: int
    spaces: int


# -- the format ----------------------------------------------------------------------------------


def event_to_json(e: Event) -> dict[str, Any]:
    """An event as the JSON object of an export line (and of `log --json`)."""
    return {
        "space": e.space,
        "seq": e.seq,
        "type": e.type,
        "payload": e.payload,
        "recorded_at": e.recorded_at.astimezone(UTC).isoformat(),
        "writer": e.writer,
        "generation": e.generation,
        "intent_id": e.intent_id,
    }


def dumps(obj: object) -> str:
    """Compact JSON, non-ASCII kept: the text of one line."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed (strict JSON)")


def _strict(text: str | bytes) -> Any:
    return json.loads(text, parse_constant=_reject_constant)


def loads(text: str | bytes) -> Any:
    """Strict JSON (no NaN or Infinity); `InvalidEvent("payload")` when it nests too deep to
    decode (far past `MAX_PAYLOAD_DEPTH`), from a deep call stack too."""
    try:
        try:
            return _strict(text)
        except RecursionError:
            return on_fresh_stack(_strict, text)
    except RecursionError:
        raise InvalidEvent("payload", f"nests more than {MAX_PAYLOAD_DEPTH} levels") from None


def json_kind(value: object) -> str:
    """`an array`, `a string`, ... for an error message."""
    kinds = {list: "an array", str: "a string", bool: "a boolean", int: "a number"}
    if value is None:
        return "null"
    return kinds.get(type(value), "a number")


def event_from_json(obj: object, where: str = "event") -> Event:
    """An exported event back from its JSON object; every field checked (`InvalidLine`)."""
    if not isinstance(obj, dict):
        raise InvalidLine(where, "line", f"expected a JSON object, not {json_kind(obj)}")
    missing = [k for k in EVENT_KEYS if k not in obj]
    if missing:
        raise InvalidLine(where, missing[0], f"missing {', '.join(missing)}")
    try:
        space = check_space(obj["space"])
        seq = _position("seq", obj["seq"])
        generation = _position("generation", obj["generation"])
        writer = obj["writer"]
        if writer != "":
            writer = check_text("writer", writer)
        p = pending(obj["type"], obj["payload"], obj.get("intent_id"))
        recorded_at = _time(obj["recorded_at"])
    except InvalidEvent as e:
        raise InvalidLine(where, e.field, str(e)) from None
    return Event(space, seq, p.type, p.payload, recorded_at, writer, generation, p.intent_id)


def _position(field: str, value: object) -> int:
    number = check_seq(field, value)
    if number > MAX_POSITION:
        raise InvalidEvent(field, f"{number} is past 2**63 - 1, the largest a store keeps")
    return number


def _time(at: object) -> datetime:
    if not isinstance(at, str):
        raise InvalidEvent("recorded_at", "must be an ISO 8601 string")
    try:
        recorded_at = datetime.fromisoformat(at)
    except ValueError:
        raise InvalidEvent("recorded_at", f"{at!r} is not an ISO 8601 time") from None
    if recorded_at.tzinfo is None:
        raise InvalidEvent("recorded_at", f"{at!r} has no time zone")
    try:
        return recorded_at.astimezone(UTC)
    except OverflowError:
        raise InvalidEvent("recorded_at", f"{at!r} is out of range in UTC") from None


def read_jsonl(
    lines: Iterable[bytes], name: str = "input", *, progress: Progress | None = None
) -> Iterator[tuple[str, Event]]:
    """`(where, event)` for each non-blank line of an export; `progress` gets bytes read."""
    for number, raw in enumerate(lines, 1):
        if progress is not None:
            progress(len(raw))
        if not raw.strip():
            continue
        where = f"{name} line {number}"
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            byte = f"byte 0x{raw[e.start]:02x} at column {e.start + 1}"
            raise InvalidLine(where, "line", f"not valid UTF-8 ({byte})") from None
        try:
            obj = loads(text)
        except InvalidEvent as e:
            raise InvalidLine(where, e.field, str(e)) from None
        except ValueError as e:
            raise InvalidLine(where, "line", f"not valid JSON: {e}") from None
        yield where, event_from_json(obj, where)


# -- export --------------------------------------------------------------------------------------


def select_spaces(store: EventStore, spaces: Sequence[str] = ()) -> list[str]:
    """`spaces` without repeats, each checked to have events (`UnknownSpace`); none: all."""
    if not spaces:
        return store.spaces()
    for space in spaces:
        if store.head(space) == 0:
            raise UnknownSpace(space)
    return list(dict.fromkeys(spaces))


def export_events(store: EventStore, spaces: Sequence[str] = ()) -> Iterator[Event]:
    """Every event of the spaces (all: none given), space by space, in seq order."""
    for space in select_spaces(store, spaces):
        yield from store.iter_events(space)


def export_jsonl(
    store: EventStore,
    out: IO[str],
    spaces: Sequence[str] = (),
    *,
    progress: Progress | None = None,
) -> int:
    """Write the events of `spaces` (all: none given) to `out` as JSON lines; their count."""
    n = 0
    for e in export_events(store, spaces):
        out.write(dumps(event_to_json(e)) + "\n")
        n += 1
        if progress is not None:
            progress(1)
    return n


# -- import and copy -----------------------------------------------------------------------------


def same_event(a: Event, b: Event) -> bool:
    """Equal as far as every store can keep it: payloads as JSON with their types (1, 1.0 and
    True differ), times to the millisecond."""
    return (
        (a.space, a.seq, a.type, a.writer, a.generation, a.intent_id)
        == (b.space, b.seq, b.type, b.writer, b.generation, b.intent_id)
        and same_payload(a.payload, b.payload)
        and abs((a.recorded_at - b.recorded_at).total_seconds()) < 0.001
    )


class Importer:
    """Writes a stream of existing events into a store, keeping seq, writer, generation, times.

    Consecutive events of a space go in batches of `batch` through the target's `BatchWriter`
    (no fence). Each space must continue at the target's head: events below it must be
    identical to those already there (they are skipped), and a gap is a `TransferError`.
    Call `add` for each event, then `finish`, which raises each space's lease generation to the
    highest in its log (`GenerationFloor`), so that the next grant is newer than all of them.
    """

    def __init__(self, target: object, *, batch: int = IMPORT_BATCH) -> None:
        if not isinstance(target, BatchWriter):
            raise TransferError(f"{type(target).__name__} cannot import events")
        if isinstance(target, LeaseStore) and not isinstance(target, GenerationFloor):
            raise TransferError(
                f"{type(target).__name__} cannot raise its lease generations (lease_advance): "
                "its next grants would go back below the imported generations"
            )
        self.target = target
        self.batch_size = batch
        self.heads: dict[str, int] = {}
        self._expect: dict[str, int] = {}
        self._intents: dict[str, set[str]] = {}
        self._buffer: list[Event] = []
        self.generations: dict[str, int] = {}
        """The highest generation of each space's events (written or already there)."""
        self.written = 0
        self.skipped = 0

    def add(self, event: Event, where: str | None = None) -> None:
        """Queue `event`; `where` names it in errors (default: its space and seq)."""
        space = event.space
        where = where or f"{space!r} seq {event.seq}"
        for field in ("seq", "generation"):
            try:
                _position(field, getattr(event, field))
            except InvalidEvent as e:
                raise InvalidLine(where, field, str(e)) from None
        expected = self._expect.get(space)
        if expected is not None and event.seq != expected:
            raise TransferError(
                f"{where}: space {space!r} seq {event.seq} does not follow seq {expected - 1}"
            )
        if event.intent_id is not None:
            seen = self._intents.setdefault(space, set())
            if event.intent_id in seen:
                raise TransferError(
                    f"{where}: intent_id {event.intent_id!r} appears twice in space {space!r}"
                )
            seen.add(event.intent_id)
        self._expect[space] = event.seq + 1
        if event.generation > self.generations.get(space, 0):
            self.generations[space] = event.generation
        buffer = self._buffer
        if buffer and (buffer[0].space != space or len(buffer) >= self.batch_size):
            self.flush()
        if space not in self.heads:
            head = self._head(space)
            if event.seq > head:
                raise TransferError(
                    f"{where}: space {space!r} starts at seq {event.seq}, "
                    f"but the target's head is {head} (events {head}..{event.seq - 1} missing)"
                )
            self.heads[space] = head
        self._buffer.append(event)

    def _head(self, space: str) -> int:
        head: int = self.target.head(space) if isinstance(self.target, EventStore) else 0
        return head

    def flush(self) -> None:
        """Write what is queued."""
        if not self._buffer:
            return
        batch, self._buffer = self._buffer, []
        space = batch[0].space
        head = self.heads[space]
        old = [e for e in batch if e.seq < head]
        new = batch[len(old) :]
        if old:
            self._check_present(space, old)
        if new:
            self._write(space, head, new)

    def _check_present(self, space: str, old: list[Event]) -> None:
        if isinstance(self.target, EventStore):
            there = self.target.events(space, from_seq=old[0].seq, limit=len(old))
            for mine, theirs in zip(old, there, strict=False):
                if not same_event(mine, theirs):
                    raise TransferError(
                        f"space {space!r} seq {mine.seq} differs from the event already in the "
                        "target; import into an empty space (or a copy of this log)"
                    )
        self.skipped += len(old)

    def _write(self, space: str, head: int, new: list[Event]) -> None:
        items = [_pending_of(e) for e in new]
        try:
            written = self.target.write(
                space, items, expected_seq=head, fence=None, verify_fence=False
            )
        except SeqConflict as e:
            raise TargetChanged(space, head) from e
        if len(written) != len(new) or written[0].seq != head:
            raise TransferError(
                f"space {space!r}: intent ids of seqs {new[0].seq}..{new[-1].seq} are already "
                "written at other seqs in the target; nothing was imported for them"
            )
        self.heads[space] = head + len(new)
        self.written += len(new)

    def finish(self) -> ImportReport:
        """Write what is queued and raise the lease generations; the report."""
        self.flush()
        if isinstance(self.target, GenerationFloor):
            now = system_clock()
            for space, generation in self.generations.items():
                self.target.lease_advance(space, generation, now)
        return ImportReport(self.written, self.skipped, len(self.heads))


def _pending_of(e: Event) -> Pending:
    return dataclasses.replace(
        pending(e.type, e.payload, e.intent_id),
        recorded_at=e.recorded_at,
        writer=e.writer,
        generation=e.generation,
    )


def import_events(
    target: object,
    events: Iterable[Event] | Iterable[tuple[str, Event]],
    *,
    progress: Progress | None = None,
) -> ImportReport:
    """Write `events` (or `(where, event)` pairs, as `read_jsonl` yields) into `target`."""
    importer = Importer(target)
    for item in events:
        where, event = item if isinstance(item, tuple) else (None, item)
        importer.add(event, where)
        if progress is not None:
            progress(1)
    return importer.finish()


def import_jsonl(
    target: object,
    lines: Iterable[bytes],
    name: str = "input",
    *,
    progress: Progress | None = None,
) -> ImportReport:
    """Import an export's lines (bytes, as a file opened `rb` yields); `progress` gets bytes."""
    return import_events(target, read_jsonl(lines, name, progress=progress))


def copy_events(
    source: EventStore,
    target: object,
    spaces: Sequence[str] = (),
    *,
    progress: Progress | None = None,
) -> ImportReport:
    """Copy the spaces (all: none given) of `source` into `target`, as export then import."""
    return import_events(target, export_events(source, spaces), progress=progress)
