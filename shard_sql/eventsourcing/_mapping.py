"""How eventsourcing's stored events become shard_sql events and back (docs/eventsourcing.md).

Pure functions: space names, event types, payloads, snapshot parts, and the error translation.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import json
from typing import Any
from uuid import UUID

from eventsourcing.persistence import (
    DataError,
    IntegrityError,
    OperationalError,
    PersistenceError,
    ProgrammingError,
    StoredEvent,
)

from shard_sql.errors import (
    InvalidEvent,
    SchemaError,
    SeqConflict,
    ShardSqlError,
    StoreUnavailable,
)
from shard_sql.validation import MAX_PAYLOAD_BYTES, MAX_TYPE_LENGTH, Pending, built_pending
from shard_sql.values import Event

VERSION = "version"
"""Payload key: the aggregate version (eventsourcing's `originator_version`)."""
STATE = "state"
"""Payload key: the state as text, when it is UTF-8 (the JSON transcoder's output, neither
compressed nor encrypted): readable, and exact on every backend."""
STATE_B64 = "state_b64"
"""Payload key: any other state (compressed, encrypted), base64."""
TOPIC = "topic"
"""Payload key: the full topic, when it is not a valid event type (too long)."""
PART, PARTS = "part", "parts"
"""Payload keys of a snapshot split over several events (part i of n)."""

PART_BYTES = 512 * 1024
"""State bytes per part of a split snapshot (base64: 683 KiB, under `MAX_PAYLOAD_BYTES`)."""
_ROOM = 4096
"""What a payload adds to its state (keys, version, topic) is well under this."""


class _Translated:
    """`with translated():` shard_sql's errors as eventsourcing's (the one place they are
    translated). A class, not a generator: entered on every write and read, it costs 0.2 us
    where `contextlib.contextmanager` costs 1.4 us."""

    __slots__ = ()

    def __call__(self) -> _Translated:
        return self

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, e: BaseException | None, tb: object) -> None:
        if not isinstance(e, ShardSqlError):
            return
        if isinstance(e, SeqConflict):
            raise IntegrityError(str(e)) from e
        if isinstance(e, InvalidEvent):
            raise DataError(str(e)) from e
        if isinstance(e, SchemaError):
            raise ProgrammingError(str(e)) from e
        if isinstance(e, StoreUnavailable):
            raise OperationalError(str(e)) from e
        raise PersistenceError(str(e)) from e


translated = _Translated()


def id_text(originator_id: UUID | str) -> str:
    return str(originator_id) if isinstance(originator_id, UUID) else originator_id


@functools.lru_cache(maxsize=4096)
def parse_id(text: str, *, as_uuid: bool) -> UUID | str:
    """The originator id of a space: a UUID when it reads as one (and ids are UUIDs)."""
    if as_uuid and len(text) == 36:
        try:
            return UUID(text)
        except ValueError:
            pass
    return text


# -- topics and event types --------------------------------------------------------------------


def _is_type(topic: str) -> bool:
    return 0 < len(topic) <= MAX_TYPE_LENGTH and topic.isprintable()


def type_of(topic: str) -> str:
    """The event type for a topic: the topic itself, or, when it is not a valid type (longer
    than 200 characters), its first 183 characters, '#' and 16 hex digits of its SHA-256."""
    if _is_type(topic):
        return topic
    digest = hashlib.sha256(topic.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    head = "".join(c if c.isprintable() else "?" for c in topic[: MAX_TYPE_LENGTH - 17])
    return f"{head}#{digest}"


def topic_of(e: Event) -> str:
    topic = e.payload.get(TOPIC)
    return topic if isinstance(topic, str) else e.type


# -- state bytes -------------------------------------------------------------------------------

_string = json.JSONEncoder(ensure_ascii=False).encode


def text_state(state: bytes, room: int) -> str | None:
    """The state as text, when it is UTF-8 without NUL (which JSONB cannot hold) and fits in
    `room` bytes as a JSON string; else None (base64). Text comes back byte for byte."""
    try:
        text = state.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if "\x00" in text:
        return None
    if len(state) * 6 > room and len(_string(text).encode("utf-8")) > room:  # escapes
        return None
    return text


def state_of(payload: dict[str, Any]) -> bytes:
    text = payload.get(STATE)
    if type(text) is str:
        return text.encode("utf-8")
    try:
        return base64.b64decode(payload[STATE_B64], validate=True)
    except (KeyError, TypeError, binascii.Error) as e:
        raise DataError(f"not an eventsourcing event payload: {e}") from e


_SMALL = (MAX_PAYLOAD_BYTES - _ROOM - MAX_TYPE_LENGTH * 4) // 6
"""A state of at most this many bytes fits as text whatever its escapes (`text_state`)."""


def _usual_state(s: StoredEvent) -> str | None:
    """The state of the usual event as text: a valid type (the topic itself), a small UTF-8
    state (what `text_state` says, in short) without NUL; None for any other event."""
    state, topic = s.state, s.topic
    if len(state) <= _SMALL and 0 < len(topic) <= MAX_TYPE_LENGTH and topic.isprintable():
        try:
            text = state.decode("utf-8")
        except UnicodeDecodeError:
            return None
        if "\x00" not in text:
            return text
    return None


_BIG = 2**63
"""Versions the usual event's text is written for (a larger one, whose digits could take the
room `_SMALL` leaves, goes through the store's checks)."""
_json_string = json.encoder.encode_basestring
"""A str as a JSON string, as the store's payload check writes it (`ensure_ascii` off)."""


def usual_pending(s: StoredEvent) -> Pending | None:
    """The usual event (`_usual_state`) ready to write: its payload `{"version": v, "state":
    text}` and the JSON text the store's check (`check_payload`) gives it, written here without
    that check's encode and decode back (50k of a save's 510k instructions on SQLite).

    The payload rules hold by construction: an object of two keys, an int (not a bool) of at
    most 19 digits and a string decoded from UTF-8 (no lone surrogate) without NUL, short enough
    to fit the payload limit whatever its escapes. tests/test_eventsourcing.py holds the text
    and payload to the checked path's. None for any other event (`payloads`, and the store's
    checks, then)."""
    v = s.originator_version
    if type(v) is not int or not -_BIG < v < _BIG:
        return None
    text = _usual_state(s)
    if text is None:
        return None
    payload_json = f'{{"{VERSION}":{v},"{STATE}":{_json_string(text)}}}'
    return built_pending(s.topic, payload_json, {VERSION: v, STATE: text})


def payloads(s: StoredEvent, *, split: bool) -> list[dict[str, Any]]:
    """The payload(s) of a stored event: one, or (`split`: snapshots) as many parts as its state
    needs. An event over the payload limit raises `DataError`."""
    text = _usual_state(s)
    if text is not None:
        return [{VERSION: s.originator_version, STATE: text}]
    head: dict[str, Any] = {VERSION: s.originator_version}
    if not _is_type(s.topic):
        head[TOPIC] = s.topic
    room = MAX_PAYLOAD_BYTES - _ROOM - len(s.topic) * 4
    text = text_state(s.state, room) if len(s.state) <= room else None
    if text is not None:
        return [{**head, STATE: text}]
    if len(s.state) * 4 // 3 + 4 <= room:
        return [{**head, STATE_B64: base64.b64encode(s.state).decode("ascii")}]
    if not split:
        raise DataError(
            f"event {s.originator_id} v{s.originator_version}: state of {len(s.state)} bytes is "
            f"over shard_sql's payload limit ({MAX_PAYLOAD_BYTES} bytes); set COMPRESSOR_TOPIC"
        )
    chunks = [s.state[i : i + PART_BYTES] for i in range(0, len(s.state), PART_BYTES)]
    return [
        {**head, PART: n, PARTS: len(chunks), STATE_B64: base64.b64encode(c).decode("ascii")}
        for n, c in enumerate(chunks)
    ]


def version_of(e: Event) -> int:
    v = e.payload.get(VERSION)
    if type(v) is not int:
        raise DataError(f"event {e.space}#{e.seq} is not an eventsourcing event (no version)")
    return v


def part_of(e: Event) -> int:
    part = e.payload.get(PART, 0)
    return part if type(part) is int else 0


def joined_state(parts: list[Event]) -> bytes:
    """The state of a snapshot from its parts (one event, or parts 0..n-1 in order)."""
    if len(parts) == 1:
        return state_of(parts[0].payload)
    return b"".join(state_of(p.payload) for p in parts)


# -- records from rows (`PayloadReads`) ---------------------------------------------------------

FIELDS = (VERSION, STATE, TOPIC, STATE_B64)
"""The payload keys a record is made of, read as text by a store's `PayloadReads`."""

Row = tuple[Any, ...]
"""An event as `event_fields(space, FIELDS)` gives it: `(seq, type, version, state, topic,
state_b64)`, the last four as text or None (`feed_fields`: `(position, space, type, ...)`)."""

_new = object.__new__
_set = object.__setattr__


def event_row(e: Event) -> Row:
    """The row of an `Event` (stores without `PayloadReads`)."""
    p = e.payload
    v, text, topic, b64 = (p.get(k) for k in FIELDS)
    return (
        e.seq,
        e.type,
        v if type(v) is int else None,
        text if type(text) is str else None,
        topic if type(topic) is str else None,
        b64 if type(b64) is str else None,
    )


def row_version(value: Any, space: str, at: str, n: int) -> int:
    """A row's version; `DataError` names the event by its space and `at` ("seq", "position")
    `n`."""
    try:
        return int(value)
    except (TypeError, ValueError):
        msg = f"event {space} {at} {n} is not an eventsourcing event (no version)"
        raise DataError(msg) from None


def row_state(text: str | None, b64: str | None, space: str, at: str, n: int) -> bytes:
    """A row's state bytes (`row_version` says what `space`, `at` and `n` are)."""
    if text is not None:
        return text.encode("utf-8")
    try:
        return base64.b64decode(b64, validate=True)  # type: ignore[arg-type]
    except (TypeError, binascii.Error) as e:
        msg = f"event {space} {at} {n} is not an eventsourcing event payload: {e}"
        raise DataError(msg) from e


def record(cls: type[Any], fields: dict[str, Any]) -> Any:
    """An instance of eventsourcing's `StoredEvent` or `Notification` (frozen dataclasses) with
    these fields, built as its mapper builds events: `__init__` costs as much as the rest of
    the conversion (0.6 us against 0.3 us per event read)."""
    r = _new(cls)
    _set(r, "__dict__", fields)
    return r


def stored_events(originator_id: UUID | str, space: str, rows: list[Row]) -> list[StoredEvent]:
    """The stored events of rows of one aggregate's events (one event per record)."""
    out: list[StoredEvent] = []
    append, new, set_ = out.append, _new, _set
    for seq, type_, v, text, topic, b64 in rows:
        try:
            version = int(v)
        except (TypeError, ValueError):
            version = row_version(v, space, "seq", seq)  # raises
        s = new(StoredEvent)
        set_(
            s,
            "__dict__",
            {"originator_id": originator_id, "originator_version": version,
             "topic": type_ if topic is None else topic,
             "state": text.encode("utf-8") if text is not None else row_state(
                 text, b64, space, "seq", seq)},
        )  # fmt: skip
        append(s)
    return out
