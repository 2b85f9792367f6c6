"""Input checks shared by every adapter. They run before anything is written; the name rule
is `shard_sql.names`, re-exported here."""

from __future__ import annotations

import json
import math
import re
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from shard_sql.errors import InvalidEvent
from shard_sql.names import CHECKED_NAMES, check_name
from shard_sql.names import MAX_INTENT_ID_LENGTH as MAX_INTENT_ID_LENGTH
from shard_sql.names import MAX_SPACE_LENGTH as MAX_SPACE_LENGTH
from shard_sql.names import MAX_TYPE_LENGTH as MAX_TYPE_LENGTH
from shard_sql.names import check_intent_id as check_intent_id
from shard_sql.names import check_space as check_space
from shard_sql.names import check_stored_space as check_stored_space
from shard_sql.names import check_stored_type as check_stored_type
from shard_sql.names import check_text as check_text
from shard_sql.names import check_type as check_type
from shard_sql.values import Lease, slots_twin

MAX_PAYLOAD_BYTES = 1024 * 1024
"""A payload serializes to at most 1 MiB of UTF-8 JSON."""
MAX_BATCH = 10_000
"""`append_many` takes at most 10,000 events at once."""
MAX_POSITION = 2**63 - 1
"""Feed positions, `after` and `limit` of feed reads fit a signed 64-bit integer."""
MAX_TYPES = 1000
"""A feed read filters on at most 1,000 types."""
MAX_PAYLOAD_DEPTH = 64
"""A payload nests at most 64 levels: the object itself is level 1, each list or object inside
adds one. Readers decode it recursively; see README "Input rules"."""

_R = TypeVar("_R")
_loads = json.loads


def on_fresh_stack(fn: Callable[..., _R], *args: Any) -> _R:
    """`fn(*args)` run in a new thread, on a stack of its own: what a caller already deep in
    its stack does when the recursion limit stops it (decoding a nested payload, say)."""
    out: list[tuple[bool, Any]] = []

    def run() -> None:
        try:
            out.append((True, fn(*args)))
        except BaseException as e:  # handed to the caller as it is
            out.append((False, e))

    thread = threading.Thread(target=run, name="shard-sql-fresh-stack")
    thread.start()
    thread.join()
    ok, value = out[0]
    if ok:
        return value  # type: ignore[no-any-return]
    raise value


def load_json(text: str | bytes) -> Any:
    """`json.loads` that also works from a deep call stack (every adapter's payload reader)."""
    try:
        return _loads(text)
    except RecursionError:
        return on_fresh_stack(_loads, text)


def check_seq(field: str, value: object) -> int:
    """A seq, `from_seq` or `limit`: an int from 0 to 2**63 - 1 (a SQL bigint)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidEvent(field, f"must be an integer, not {type(value).__name__}")
    if value < 0:
        raise InvalidEvent(field, "must be >= 0")
    if value > MAX_POSITION:
        raise InvalidEvent(field, f"{value} is past 2**63 - 1, the largest a store keeps")
    return value


def check_lease(field: str, value: object) -> Lease:
    """A `Lease` argument (a fence, a lease to renew or release)."""
    if not isinstance(value, Lease):
        raise InvalidEvent(field, f"must be a Lease, not {type(value).__name__}")
    return value


EARLIEST_CLOCK = datetime(1970, 1, 1, tzinfo=UTC)
LATEST_CLOCK = datetime(9000, 1, 1, tzinfo=UTC)
"""A registry clock's time lies between these: lease expiry times (up to a year of TTL later)
then fit every backend's time types."""


def check_clock_time(now: object) -> datetime:
    """What a registry's clock returned: an aware `datetime` from 1970 to 9000 (UTC)."""
    if not isinstance(now, datetime) or now.tzinfo is None or now.utcoffset() is None:
        raise InvalidEvent("clock", "must return a timezone-aware datetime")
    try:
        within = EARLIEST_CLOCK <= now <= LATEST_CLOCK
    except OverflowError:  # year 1 at UTC+14, say
        within = False
    if not within:
        raise InvalidEvent("clock", f"returned {now.isoformat()}, not between 1970 and 9000 (UTC)")
    return now


def check_position(field: str, value: object) -> int:
    """A feed position (`after`, `position`, `limit`): an int from 0 to 2**63 - 1."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidEvent(field, f"must be an integer, not {type(value).__name__}")
    if not 0 <= value <= MAX_POSITION:
        raise InvalidEvent(field, f"must be from 0 to {MAX_POSITION}")
    return value


def check_events_read(space: object, from_seq: object, limit: object) -> bool:
    """The arguments of a read of a space's events, checked: whether it reads nothing (a
    `limit` of 0)."""
    check_stored_space(space)
    check_seq("from_seq", from_seq)
    return limit is not None and check_seq("limit", limit) == 0


def check_feed_read(
    after: object, limit: object, types: object
) -> tuple[bool, frozenset[str] | None]:
    """The arguments of a read of the feed, checked: whether it reads nothing (a `limit` of 0,
    answered before the types are looked at; an empty type filter), and its type filter."""
    check_position("after", after)
    if limit is not None and check_position("limit", limit) == 0:
        return True, None
    wanted = check_types(types)
    return wanted is not None and not wanted, wanted


def check_types(types: object) -> frozenset[str] | None:
    """A feed's type filter: None (every type) or a collection of type names (not one string).
    An empty collection matches no event."""
    if types is None:
        return None
    if isinstance(types, str | bytes | bytearray | Mapping) or not isinstance(types, Iterable):
        raise InvalidEvent("types", "must be a collection of type names, such as a list")
    out: set[str] = set()
    for n, t in enumerate(types):
        if n == MAX_TYPES:
            raise InvalidEvent("types", f"names more than {MAX_TYPES} types")
        out.add(check_stored_type(t))
    return frozenset(out)


def check_checkpoint_name(name: object) -> str:
    """A checkpoint's name follows the rule of space names."""
    return check_name("name", name, MAX_SPACE_LENGTH)


def check_timeout(timeout: object, field: str = "timeout") -> float:
    """A wait's timeout in seconds: a finite number >= 0 (very long ones are cut to what the
    platform's waits take)."""
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise InvalidEvent(field, f"must be a number, not {type(timeout).__name__}")
    if not math.isfinite(timeout) or timeout < 0:
        raise InvalidEvent(field, "must be a finite number >= 0")
    return min(float(timeout), threading.TIMEOUT_MAX)


# Built once: json.dumps with options builds a new encoder on every call.
_encode = json.JSONEncoder(allow_nan=False, ensure_ascii=False, separators=(",", ":")).encode

# The fast path under them: the C encoder called directly (no circular-reference markers, so it
# keeps no state between calls and threads), and the C scanner, which parses the one complete
# value our encoder wrote. Any failure reruns the checks above, which raise the same error as
# always. Together they halve the cost of a small payload's check (4.0 -> 2.0 us).
_fast_encoder: Any = None
_scan: Any = None
_c_make_encoder: Any = getattr(json.encoder, "c_make_encoder", None)
if _c_make_encoder is not None:  # pragma: no branch
    _fast_encoder = _c_make_encoder(
        None,
        json.JSONEncoder().default,
        json.encoder.encode_basestring,
        None,
        ":",
        ",",
        False,
        False,
        False,
    )
    _scan = getattr(json.JSONDecoder(), "scan_once")  # noqa: B009 (untyped attribute)


_BRACKETS = bytes.maketrans(b"{}", b"[]")
_NOT_STRUCTURE = bytes(b for b in range(256) if b not in b'"[]{}')
_NOT_OPENING = bytes(b for b in range(256) if b not in b"[{")
_NUL = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")
"""A NUL character as the encoder writes it: `\\u0000` after an even number of backslashes (an odd
number is an escaped backslash followed by the text `u0000`)."""
_CHANGED_NUMBER = re.compile(r"[:,\[]-?[0-9][0-9.]*e\+|[:,\[]-0\.0[,\]}]")
"""A float that PostgreSQL's jsonb does not give back as it was: one the encoder writes with a
positive exponent (abs >= 1e16; jsonb returns its digits, an int), or -0.0 (jsonb keeps 0.0)."""


def _depth_ok(data: bytes) -> bool:
    """Whether the JSON text `data` (from our encoder) nests at most `MAX_PAYLOAD_DEPTH` levels.

    Escapes, then everything but quotes and brackets are dropped, then strings; each round then
    removes the innermost level. All of it runs in C, bytes at a time.
    """
    if b"\\" in data:
        data = data.replace(b"\\\\", b"").replace(b'\\"', b"")
    data = data.translate(_BRACKETS, _NOT_STRUCTURE).replace(b'""', b"")
    if b'"' in data:
        data = b"".join(data.split(b'"')[0::2])
    for _ in range(MAX_PAYLOAD_DEPTH):
        data = data.replace(b"[]", b"")
        if not data:
            return True
    return False


def too_deep_text(text: str, size: int, data: bytes | None = None) -> bool:
    """Whether encoded `text` (`size` bytes of UTF-8: `data`, if at hand) nests too deep. Each
    level takes two characters at least, and a list or object more: most texts need no look."""
    if size <= 2 * MAX_PAYLOAD_DEPTH:
        return False
    if data is None:
        data = text.encode("utf-8")
    if len(data.translate(None, _NOT_OPENING)) <= MAX_PAYLOAD_DEPTH:
        return False
    return not _depth_ok(data)


def _too_deep(payload: object) -> bool:
    """`_depth_ok` for a payload that cannot be encoded (the encoder's recursion stopped it)."""
    level: list[Any] = [payload]
    budget = MAX_PAYLOAD_BYTES // 2  # containers a payload of at most 1 MiB can have
    for _ in range(MAX_PAYLOAD_DEPTH):
        inner = []
        for c in level:
            for v in c.values() if isinstance(c, dict) else c:
                if isinstance(v, dict | list | tuple):
                    inner.append(v)
            if len(inner) > budget:  # too large anyway (or it contains itself)
                return True
        if not inner:
            return False
        budget -= len(inner)
        level = inner
    return True


def _path(keys: list[Any]) -> str:
    return "payload" + "".join(f"[{k!r}]" for k in keys)


def _check_values(copy: dict[str, Any]) -> None:
    """The rules only the decoded values show: no NUL in a key or string, no float that a backend
    would give back changed. Called when the text's quick look (`_finish`) found a candidate."""
    todo: list[tuple[Any, list[Any]]] = [(copy, [])]
    while todo:
        value, keys = todo.pop()
        for k, v in value.items() if type(value) is dict else enumerate(value):
            if type(k) is str and "\x00" in k:
                raise InvalidEvent(
                    "payload", f"contains a NUL character in the key {k!r} of {_path(keys)}"
                )
            t = type(v)
            if t is str:
                if "\x00" in v:
                    raise InvalidEvent(
                        "payload", f"contains a NUL character at {_path([*keys, k])}"
                    )
            elif t is float:
                _check_float(v, [*keys, k])
            elif t is dict or t is list:
                todo.append((v, [*keys, k]))


def _check_float(v: float, keys: list[Any]) -> None:
    """Refuse a float that a backend would give back changed (PostgreSQL's jsonb: see
    `_CHANGED_NUMBER`); every backend refuses it, so that all of them give back what was written."""
    if v == 0.0 and math.copysign(1.0, v) < 0:
        raise InvalidEvent(
            "payload", f"{_path(keys)} is -0.0, which PostgreSQL keeps as 0.0: write 0.0"
        )
    if abs(v) >= 1e16:
        raise InvalidEvent(
            "payload",
            f"{_path(keys)} is the float {v!r}, which PostgreSQL gives back as the integer "
            f"{int(v)}: write it as an int (or a string)",
        )


def _finish(payload: object, text: str) -> tuple[str, dict[str, Any]] | None:
    """The checks of an encoded payload: NUL characters, changed floats, size, depth, and the
    round trip.
    Raises `InvalidEvent`; None when the copy differs from the payload (non-string keys,
    tuples: the caller says which)."""
    if text.isascii():
        data = None
        size = len(text)
    else:
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise InvalidEvent("payload", "contains a lone surrogate, not valid Unicode") from e
        size = len(data)
    if size > MAX_PAYLOAD_BYTES:
        raise InvalidEvent("payload", f"is {size} bytes of JSON, at most {MAX_PAYLOAD_BYTES}")
    if too_deep_text(text, size, data):
        raise InvalidEvent("payload", f"nests more than {MAX_PAYLOAD_DEPTH} levels")
    copy, end = _scan(text, 0)
    if end != len(text) or copy != payload:
        return None
    check_encoded_values(text, copy)
    return text, copy


def check_encoded_values(text: str, copy: dict[str, Any]) -> None:
    """`check_payload`'s rules on the values of a payload encoded as `text` (`copy`: parsed
    from it): no NUL character, no float a backend gives back changed. Raises `InvalidEvent`."""
    if ("\\u0000" in text and _NUL.search(text)) or (
        ("e+" in text or "-0.0" in text) and _CHANGED_NUMBER.search(text)
    ):
        _check_values(copy)


def _fast_payload(payload: object) -> tuple[str, dict[str, Any]] | None:
    """`check_payload` for a plain `dict`, with the C encoder; None when it cannot say (the
    caller then runs `_check_payload`, which says which rule is broken)."""
    if type(payload) is not dict or _fast_encoder is None:
        return None
    try:
        return _finish(payload, payload_text(payload))
    except InvalidEvent:
        raise
    except Exception:  # not JSON, or a RecursionError: `_check_payload` says which
        return None


def payload_text(payload: dict[str, Any]) -> str:
    """The text `check_payload` writes for `payload` (the C encoder where there is one); raises
    what the encoder raises for a value that is not JSON."""
    if _fast_encoder is None:
        return _encode(payload)
    return "".join(_fast_encoder(payload, 0))


def check_payload(payload: object) -> tuple[str, dict[str, Any]]:
    """Serialize a payload with strict JSON; return the text and an independent copy.

    A payload is a JSON object: a dict with string keys whose values are strings, finite
    numbers, booleans, null, lists and such objects. No NaN/Infinity, no non-string keys, no
    tuples, sets or other objects, no NUL characters (PostgreSQL's JSONB cannot hold them), no
    float that a backend would give back changed (-0.0, and floats of 1e16 or more, which
    PostgreSQL returns as ints), at most `MAX_PAYLOAD_DEPTH` levels, at most `MAX_PAYLOAD_BYTES`
    of UTF-8.
    """
    fast = _fast_payload(payload)
    if fast is not None:
        return fast
    return _check_payload(payload)


def _check_payload(payload: object, fresh: bool = False) -> tuple[str, dict[str, Any]]:
    """`check_payload` without its fast path: the error that says which rule is broken.
    `fresh`: running on a fresh stack already (see `on_fresh_stack`)."""
    if not isinstance(payload, Mapping) or not isinstance(payload, dict):
        raise InvalidEvent("payload", f"must be a JSON object (dict), not {type(payload).__name__}")
    try:
        try:
            text = _encode(payload)
        except (TypeError, ValueError) as e:
            raise InvalidEvent("payload", f"is not strict JSON: {e}") from e
        checked = _finish(payload, text)
    except RecursionError as e:
        if _too_deep(payload):
            raise InvalidEvent("payload", f"nests more than {MAX_PAYLOAD_DEPTH} levels") from e
        if fresh:
            raise InvalidEvent("payload", f"is not strict JSON: {e}") from e
        # Not too deep: the caller's stack is. Check it again where there is room.
        return on_fresh_stack(_check_payload, payload, True)
    if checked is None:
        # A round trip catches what json.dumps silently converts: int/float/bool/None keys
        # become strings, tuples become lists.
        raise InvalidEvent(
            "payload", "is not plain JSON (non-string keys, tuples or other non-JSON values)"
        )
    return checked


_canonical = json.JSONEncoder(
    ensure_ascii=False, separators=(",", ":"), sort_keys=True, check_circular=False
).encode


def same_payload(a: object, b: object) -> bool:
    """Whether two payloads hold the same JSON, types included (`1` is not `1.0` nor `True`,
    `-0.0` is not `0.0`), key order aside: what a read gives back of what was written."""
    try:
        return _same_text(a, b)
    except RecursionError:
        return on_fresh_stack(_same_text, a, b)


def _same_text(a: object, b: object) -> bool:
    try:
        return bool(_canonical(a) == _canonical(b))
    except (TypeError, ValueError):  # not JSON at all
        return a == b


def pending(type_: object, payload: object, intent_id: object = None) -> Pending:
    """Check one event's fields and return it ready to write."""
    # The checks' common cases inline (one call per check less: 0.3 us of ~3).
    if type(type_) is str and type_ in CHECKED_NAMES and len(type_) <= MAX_TYPE_LENGTH:
        t = type_
    else:
        t = check_type(type_)
    fast = _fast_payload(payload)
    text, copy = fast if fast is not None else _check_payload(payload)
    p: Pending = new_pending(
        t, text, copy, None if intent_id is None else check_intent_id(intent_id)
    )
    return p


def check_items(items: object) -> list[Pending]:
    """Check a batch: each item is `(type, payload)` or `(type, payload, intent_id)`."""
    if isinstance(items, str | bytes | dict):
        raise InvalidEvent("items", "must be a list of (type, payload) pairs")
    try:
        seq_items = list(items)  # type: ignore[call-overload]
    except TypeError as e:
        raise InvalidEvent("items", "must be an iterable of (type, payload) pairs") from e
    if not seq_items:
        raise InvalidEvent("items", "must not be empty")
    if len(seq_items) > MAX_BATCH:
        raise InvalidEvent("items", f"has {len(seq_items)} events, at most {MAX_BATCH}")
    fast = _fast_items(seq_items)
    if fast is not None:
        return fast
    out: list[Pending] = []
    seen: set[str] = set()
    for item in seq_items:
        if not isinstance(item, tuple | list) or len(item) not in (2, 3):
            raise InvalidEvent(
                "items", "each item must be (type, payload) or (type, payload, intent_id)"
            )
        p = pending(item[0], item[1], item[2] if len(item) == 3 else None)
        if p.intent_id is not None:
            if p.intent_id in seen:
                raise InvalidEvent("intent_id", f"{p.intent_id!r} appears twice in one batch")
            seen.add(p.intent_id)
        out.append(p)
    return out


def _fast_items(seq_items: list[Any]) -> list[Pending] | None:
    """`check_items` for a valid batch, cheaply: each payload encoded by the C encoder, all of
    them parsed back in one call and compared at once. None when any rule may be broken (the
    caller then checks item by item, which raises the first error in order)."""
    if _fast_encoder is None:
        return None
    enc, new = _fast_encoder, new_pending
    texts: list[str] = []
    payloads: list[Any] = []
    types: list[str] = []
    ids: list[str | None] = []
    good_types: dict[Any, str] = {}
    suspects: list[int] = []
    try:
        for item in seq_items:
            kind = type(item)
            if kind is not tuple and kind is not list:
                return None
            if len(item) == 2:
                t, payload = item
                intent_id = None
            elif len(item) == 3:
                t, payload, intent_id = item
                intent_id = check_intent_id(intent_id)
            else:
                return None
            if type(payload) is not dict:
                return None
            text = "".join(enc(payload, 0))
            size = len(text if text.isascii() else text.encode("utf-8"))
            if size > MAX_PAYLOAD_BYTES:
                return None
            if too_deep_text(text, size):
                return None
            if "\\u0000" in text or "e+" in text or "-0.0" in text:
                suspects.append(len(texts))
            checked = good_types.get(t)
            if checked is None:  # a batch repeats few types: check each once
                checked = good_types[t] = check_type(t)
            types.append(checked)
            texts.append(text)
            payloads.append(payload)
            ids.append(intent_id)
        copies = _scan("[" + ",".join(texts) + "]", 0)[0]
        if copies != payloads:
            return None
        for n in suspects:
            _check_values(copies[n])
    except Exception:
        return None
    named = [i for i in ids if i is not None]
    if len(set(named)) != len(named):
        return None
    return [new(t, x, c, i) for t, x, c, i in zip(types, texts, copies, ids, strict=True)]


@dataclass(frozen=True, slots=True)
class Pending:
    """An event checked and serialized, not yet given a seq.

    `recorded_at`, `writer` and `generation` are set only when copying an existing log
    (import); otherwise the store stamps the time and takes writer and generation from the fence.
    """

    type: str
    payload_json: str
    payload: dict[str, Any]
    intent_id: str | None
    recorded_at: datetime | None = None
    writer: str | None = None
    generation: int | None = None


def _pending_factory() -> Any:
    """`Pending(type, payload_json, payload, intent_id)` built through `slots_twin`: the same
    frozen value, without the frozen dataclass's `__init__` (4.2k instructions, 6.5k through
    the slots' `__set__`)."""
    twin = slots_twin(Pending)
    if twin is None:
        return Pending
    new, cls = object.__new__, Pending

    def make(t: str, text: str, payload: dict[str, Any], intent_id: str | None) -> Pending:
        p = new(twin)
        p.type = t
        p.payload_json = text
        p.payload = payload
        p.intent_id = intent_id
        p.recorded_at = None
        p.writer = None
        p.generation = None
        p.__class__ = cls
        return p  # type: ignore[no-any-return]

    return make


new_pending: Any = _pending_factory()


def with_intent_id(item: Pending, intent_id: str) -> Pending:
    """`item` given `intent_id` (a forwarder's, for an append whose caller gave none): a new
    `Pending` built as `pending` builds one (1k instructions; `Pending(...)` 4k)."""
    if item.recorded_at is None and item.writer is None and item.generation is None:
        p: Pending = new_pending(item.type, item.payload_json, item.payload, intent_id)
        return p
    return Pending(
        item.type, item.payload_json, item.payload, intent_id,
        item.recorded_at, item.writer, item.generation,
    )  # fmt: skip


def built_pending(type_: object, payload_json: str, payload: dict[str, Any]) -> Pending:
    """A `Pending` for a payload shard_sql built itself, with the JSON text `check_payload`
    would give it, written by the builder: the type is checked, the payload is not (no encode,
    no decode back). Never for a caller's payload; a test holds each builder to `pending`."""
    if type(type_) is str and type_ in CHECKED_NAMES and len(type_) <= MAX_TYPE_LENGTH:
        t = type_  # `check_type`'s common case inline, as in `pending`
    else:
        t = check_type(type_)
    p: Pending = new_pending(t, payload_json, payload, None)
    return p


# -- `PayloadReads` -------------------------------------------------------------------------

FIELD_KEY = re.compile(r"[A-Za-z0-9_]{1,64}")
MAX_FIELD_KEYS = 16


def check_field_keys(keys: object) -> tuple[str, ...]:
    """The keys of a `PayloadReads` call: 1 to 16 names of letters, digits and underscores."""
    if isinstance(keys, str) or not isinstance(keys, Sequence):
        raise InvalidEvent("keys", "must be a sequence of payload keys")
    out = tuple(keys)
    if not 0 < len(out) <= MAX_FIELD_KEYS:
        raise InvalidEvent("keys", f"must be 1 to {MAX_FIELD_KEYS} keys")
    for k in out:
        if not isinstance(k, str) or FIELD_KEY.fullmatch(k) is None:
            raise InvalidEvent("keys", f"{k!r} is not a key of letters, digits and underscores")
    return out
