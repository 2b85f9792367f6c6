"""The direct hand-off's messages (`shard_sql.handoff`): a request and its answer, as bytes.

Each message travels as a 4-byte big-endian length and its body (`handoff.frame`).

A request's body: the byte `VERSION`, then the UTF-8 lengths of the space, the type and the
intent id (2 bytes each, big-endian), those three names in UTF-8, then the payload's JSON text
in UTF-8 up to the end: the text the forwarder's check (`validation.pending`) wrote, sent as it
is. No JSON around it: the holder parses the payload once, and the names not at all.

The holder checks it as an append would, without trusting the forwarder (`parse_request`): the
version, the lengths, UTF-8, each name by the name rule, and the payload: at most
`MAX_PAYLOAD_BYTES`, at most `MAX_PAYLOAD_DEPTH` levels (looked at before parsing), a JSON
object parsed by the C scanner with NaN and Infinity refused, whose text is exactly what the
append's check writes for it (the encoder run on the parsed copy gives the same text back:
no other spacing, escapes, number forms or repeated keys, no lone surrogate), and neither a NUL
character nor a float a backend would give back changed. So the stored text is the one a
direct append of the same payload stores. Anything else is `Malformed`: the listener closes
the connection and writes nothing. A forwarder of the JSON requests before (version 1, a body
that begins with `{`) is closed so too, and takes the durable path with the same intent id.

An answer's body: for a written event, the byte 1, then its seq, its time (microseconds since
1970-01-01 UTC), its generation and its feed position (-1: not placed yet), 8 bytes each
(signed, big-endian), then the writer's name in UTF-8 up to the end; otherwise a refusal, a
JSON object `{"error": kind, ...}` (rare: not worth a format of their own).
"""

from __future__ import annotations

import json
import struct
from datetime import UTC, datetime, timedelta
from typing import Any

from shard_sql.errors import IntentConflict, InvalidEvent
from shard_sql.names import CHECKED_NAMES
from shard_sql.validation import (
    MAX_PAYLOAD_BYTES,
    MAX_TYPE_LENGTH,
    Pending,
    check_encoded_values,
    check_intent_id,
    check_space,
    check_type,
    new_pending,
    payload_text,
    too_deep_text,
)
from shard_sql.values import Event, new_event

VERSION = 2
"""The first byte of a request. Version 1 sent a JSON object (its first byte `{`)."""
REQUEST = struct.Struct(">BHHH")
WRITTEN = struct.Struct(">Bqqqq")
OK = 1
"""The first byte of the answer that carries a written event."""
NOT_HOLDER = "not_holder"
"""The answer of a node that does not hold the space (any more): the forwarder looks again."""
UNKNOWN = "unknown"
"""Sent, but no answer (a timeout, a closed connection): it may have been written."""
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MICROSECOND = timedelta(microseconds=1)


class Malformed(Exception):
    """A message that is not one this protocol sends: the connection is closed."""


# -- the request -----------------------------------------------------------------------------


def request(space: str, item: Pending) -> bytes:
    """A hand-off request: the space and the checked item (its intent id set), its payload's
    JSON text as it is."""
    assert item.intent_id is not None
    s = space.encode()
    t = item.type.encode()
    i = item.intent_id.encode()
    head = REQUEST.pack(VERSION, len(s), len(t), len(i))
    return b"".join((head, s, t, i, item.payload_json.encode()))


def parse_request(body: bytes) -> tuple[str, Pending]:
    """The space and item of a request, checked as an append checks them (see the module);
    `Malformed` for anything else."""
    try:
        version, ns, nt, ni = REQUEST.unpack_from(body)
    except struct.error:
        raise Malformed("not a hand-off request") from None
    if version != VERSION:
        raise Malformed(f"not a hand-off request of version {VERSION}")
    a = REQUEST.size
    b, c = a + ns, a + ns + nt
    d = c + ni
    if len(body) < d or len(body) - d > MAX_PAYLOAD_BYTES:
        raise Malformed("a hand-off request whose lengths do not add up")
    try:
        space, type_ = body[a:b].decode(), body[b:c].decode()
        intent_id, text = body[c:d].decode(), body[d:].decode()
    except UnicodeDecodeError:
        raise Malformed("a hand-off request that is not UTF-8") from None
    try:
        check_space(space)
        if not (type_ in CHECKED_NAMES and len(type_) <= MAX_TYPE_LENGTH):
            check_type(type_)
        check_intent_id(intent_id)  # "" is refused: a request carries an intent id
        payload = _payload(text, len(body) - d)
    except InvalidEvent as e:
        raise Malformed(str(e)) from None
    item: Pending = new_pending(type_, text, payload, intent_id)
    return space, item


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


_scan_strict: Any = getattr(json.JSONDecoder(parse_constant=_reject_constant), "scan_once")  # noqa: B009


def _payload(text: str, size: int) -> dict[str, Any]:
    """The payload of a request whose JSON text is `text` (`size` bytes of UTF-8): parsed once,
    and held to the text `validation.check_payload` writes (see the module). `Malformed` or
    `InvalidEvent` otherwise."""
    if too_deep_text(text, size):  # before parsing: a deep text is refused without recursion
        raise Malformed("a payload nested too deep")
    try:
        payload, end = _scan_strict(text, 0)
    except (ValueError, RecursionError, StopIteration):
        raise Malformed("a payload that is not strict JSON") from None
    if end != len(text) or type(payload) is not dict:
        raise Malformed("a payload that is not one JSON object")
    if payload_text(payload) != text:
        raise Malformed("a payload's text other than the one an append's check writes")
    check_encoded_values(text, payload)  # InvalidEvent: a NUL character, a changed float
    return payload


# -- the answer ------------------------------------------------------------------------------


def written(event: Event) -> bytes:
    """The answer for a written event: what the forwarder does not know already."""
    position = event.position
    return (
        WRITTEN.pack(
            OK,
            event.seq,
            (event.recorded_at - EPOCH) // MICROSECOND,
            event.generation,
            -1 if position is None else position,
        )
        + event.writer.encode()
    )


def refusal(kind: str, **details: Any) -> bytes:
    return json.dumps({"error": kind, **details}).encode()


_delta = timedelta


def answer_event(space: str, item: Pending, body: bytes) -> Event | str:
    """The forwarder's reading of an answer: the event, `NOT_HOLDER` or `UNKNOWN`; raises
    `IntentConflict` / `InvalidEvent` as the holder's write did."""
    if body[:1] == b"\x01":
        try:
            _, seq, micros, generation, position = WRITTEN.unpack_from(body)
            writer = body[WRITTEN.size :].decode()
        except (struct.error, UnicodeDecodeError):
            return UNKNOWN
        event: Event = new_event(  # Event(...) without the frozen __init__'s cost
            space,
            seq,
            item.type,
            item.payload,
            EPOCH + _delta(0, 0, micros),
            writer,
            generation,
            item.intent_id,
            None if position < 0 else position,
        )
        return event
    try:
        answer = json.loads(body)
    except (ValueError, RecursionError):
        return UNKNOWN
    kind = answer.get("error") if isinstance(answer, dict) else None
    if kind == NOT_HOLDER:
        return NOT_HOLDER
    if kind == "conflict":
        raise IntentConflict(space, item.intent_id or "", int(answer["seq"]))
    if kind == "invalid":
        raise InvalidEvent(str(answer["field"]), str(answer["message"]))
    return UNKNOWN  # "unavailable": the holder's store failed; it may have committed
