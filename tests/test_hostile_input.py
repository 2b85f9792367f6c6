"""Hostile input on every backend (memory, SQLite, PostgreSQL, git): what is refused is refused
with `InvalidEvent` before anything is written, and what is accepted reads back as written."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from shard_sql import (
    AppendAuthority,
    GitEventStore,
    InMemoryEventStore,
    IntentConflict,
    InvalidEvent,
    LeaseRegistry,
    SqlEventStore,
)
from shard_sql.ports import EventStore
from shard_sql.validation import MAX_PAYLOAD_DEPTH
from shard_sql.verify import verify

_R = TypeVar("_R")

BACKENDS = ["memory", "sqlite", pytest.param("postgresql", marks=pytest.mark.postgres), "git"]


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[EventStore]:
    kind = request.param
    s: EventStore
    if kind == "memory":
        s = InMemoryEventStore()
    elif kind == "sqlite":
        s = SqlEventStore(f"sqlite:///{tmp_path}/shard.db")
    elif kind == "postgresql":
        s = SqlEventStore(request.getfixturevalue("pg_url"), migrate=True)
    else:
        s = GitEventStore(tmp_path / "repo")
    try:
        yield s
    finally:
        close = getattr(s, "close", None)
        if close is not None:
            close()


def nested(levels: int) -> dict[str, Any]:
    """A payload `levels` deep: objects and lists in turn, the outer object being level 1."""
    inner: Any = {}
    for n in range(levels - 2):
        inner = {"a": inner} if n % 2 else [inner]
    return {"a": inner} if levels > 1 else inner


def stack_depth() -> int:
    depth, frame = 0, sys._getframe()
    while frame is not None:
        depth, frame = depth + 1, frame.f_back
    return depth


def at_stack_depth(depth: int, fn: Callable[[], _R]) -> _R:
    """`fn()` called from a stack `depth` frames deep (a reader inside a web framework, say)."""

    def down(n: int) -> _R:
        return fn() if n <= 0 else down(n - 1)

    return down(depth - stack_depth())


# -- item 3: one nesting limit, and every reader handles what was accepted ------------------------


def test_nesting_limit(store: EventStore) -> None:
    for levels in (MAX_PAYLOAD_DEPTH + 1, 990, 100_000):
        with pytest.raises(InvalidEvent) as info:
            store.append("s", "t", nested(levels), expected_seq=0)
        assert info.value.field == "payload"
        assert f"more than {MAX_PAYLOAD_DEPTH} levels" in str(info.value)
    with pytest.raises(InvalidEvent):
        store.append_many("s", [("t", {}), ("t", nested(MAX_PAYLOAD_DEPTH + 1))], expected_seq=0)
    assert store.head("s") == 0
    e = store.append("s", "t", nested(MAX_PAYLOAD_DEPTH), expected_seq=0)
    assert e.payload == nested(MAX_PAYLOAD_DEPTH)
    # Brackets inside strings are no levels.
    text = {"s": "[[[{{{" * 100, "k" + "]" * 100: ["}}}" * 50, "\\[" * 70]}
    store.append_many("s", [("t", text)] * 2, expected_seq=1)
    assert store.events("s", from_seq=1)[0].payload == text


def test_deepest_payload_reads_from_a_deep_stack(store: EventStore) -> None:
    deepest = nested(MAX_PAYLOAD_DEPTH)
    store.append("s", "t", deepest, expected_seq=0)
    store.append_many("s", [("t", deepest), ("t", {"x": 1})], expected_seq=1)
    limit = sys.getrecursionlimit()
    for depth in (limit - 100, limit - 60):
        events = at_stack_depth(depth, lambda: store.events("s"))
        assert [e.payload for e in events] == [deepest, deepest, {"x": 1}]
        streamed = at_stack_depth(depth, lambda: list(store.iter_events("s", from_seq=1)))
        assert streamed[0].payload == deepest
        assert at_stack_depth(depth, lambda: verify(store)).ok
    # Appending from there too.
    e = at_stack_depth(limit - 60, lambda: store.append("s", "t", deepest, expected_seq=3))
    assert e.payload == deepest


# -- item 15: NUL characters are looked for in the decoded strings, not in the encoded text -------

TEXT_U0000 = [
    {"re": "C:\\u0000"},  # a backslash, then the text u0000
    {"re": "\\\\u0000"},  # two backslashes, then u0000
    {"C:\\u0000": ["\\u0000", {"k": "x\\u0000y"}]},
    {"mixed": "\\u0000 and \\\\\\u0000"},
]


def test_text_u0000_is_no_nul(store: EventStore) -> None:
    for n, payload in enumerate(TEXT_U0000):
        space = f"s{n}"
        e = store.append(space, "t", payload, expected_seq=0)
        batch = store.append_many(space, [("t", payload), ("t", {"n": 1})], expected_seq=1)
        assert e.payload == payload and batch[0].payload == payload
        assert [x.payload for x in store.events(space)] == [payload, payload, {"n": 1}]


NULS = [{"n": "\x00"}, {"n": "\\\x00"}, {"k\x00": 1}, {"a": [{"b": "x\\\\\x00"}]}]


def test_nul_refused(store: EventStore) -> None:
    for payload in NULS:
        with pytest.raises(InvalidEvent) as one:
            store.append("s", "t", payload, expected_seq=0)
        with pytest.raises(InvalidEvent) as many:
            store.append_many("s", [("t", {}), ("t", payload)], expected_seq=0)
        for info in (one, many):
            assert info.value.field == "payload" and "NUL character" in str(info.value)
    assert store.head("s") == 0


# -- item 4: a number reads back as it was written (type included), or it is refused everywhere --


def typed(value: Any) -> Any:
    """`value` with each number tagged by its type and sign: equal only if equal as JSON types."""
    if isinstance(value, dict):
        return {k: typed(v) for k, v in value.items()}
    if isinstance(value, list):
        return [typed(v) for v in value]
    if isinstance(value, float):
        return ("float", value.hex())
    return (type(value).__name__, value)


CHANGED_BY_JSONB = [1e23, 1.7976931348623157e308, 1e16, -1e16, 1.2345678901234568e16, -0.0]
KEPT_EVERYWHERE: list[Any] = [
    0.0, 1.0, -1.5, 123.0, 0.1, 1e15, 9999999999999998.0, -9999999999999998.0, 1e-7, 5e-324,
    2.2250738585072014e-308, 1.5e-300, 0, -1, 10**30, -(10**30), 2**63, 2**64 + 1, True, False,
    None, "1e+16", "-0.0",
]  # fmt: skip


def random_floats(n: int) -> list[float]:
    import math
    import random
    import struct

    rng = random.Random(4)
    out: list[float] = []
    while len(out) < n:
        x = struct.unpack("<d", struct.pack("<Q", rng.getrandbits(64)))[0]
        if math.isfinite(x):
            out.append(x)
    return out


def test_numbers_read_back_as_written_or_refused(store: EventStore) -> None:
    for n, value in enumerate(CHANGED_BY_JSONB):
        for payload in ({"v": value}, {"a": [1, {"b": [value]}]}):
            with pytest.raises(InvalidEvent) as info:
                store.append("s", "t", payload, expected_seq=0)
            assert info.value.field == "payload" and repr(value) in str(info.value)
            with pytest.raises(InvalidEvent):
                store.append_many("s", [("t", {}), ("t", payload)], expected_seq=0)
        assert store.head("s") == 0, n
    written = [{"v": v, "in": [v, {"k": v}]} for v in KEPT_EVERYWHERE]
    events = [store.append(f"k{n}", "t", p, expected_seq=0) for n, p in enumerate(written)]
    events += store.append_many("many", [("t", p) for p in written], expected_seq=0)
    stored = [e for n in range(len(written)) for e in store.events(f"k{n}")]
    stored += store.events("many")
    for e, s, p in zip(events, stored, written + written, strict=True):
        assert typed(e.payload) == typed(s.payload) == typed(p)
    # Random doubles: each one refused, or kept bit for bit.
    kept = []
    for x in random_floats(400):
        try:
            store.append("r", "t", {"x": x}, expected_seq=len(kept))
        except InvalidEvent:
            assert abs(x) >= 1e16 or x == 0.0
        else:
            kept.append(x)
    assert len(kept) > 100
    assert [typed(e.payload["x"]) for e in store.events("r")] == [typed(x) for x in kept]


def test_same_payload_compares_types() -> None:
    from shard_sql.validation import same_payload

    assert same_payload({"a": 1, "b": [1.5, None]}, {"b": [1.5, None], "a": 1})
    for a, b in [(1, 1.0), (1, True), (0.0, -0.0), (10**16, 1e16), ("1", 1), ([1], [1, 1])]:
        assert not same_payload({"v": a}, {"v": b})
    assert same_payload(nested(MAX_PAYLOAD_DEPTH), nested(MAX_PAYLOAD_DEPTH))


# -- item 5: an intent id written with other content is an IntentConflict, and nothing is written -


def test_intent_id_with_other_content(store: EventStore) -> None:
    first = store.append("s", "t", {"a": 1, "b": [1.5]}, expected_seq=0, intent_id="req-1")
    again = store.append("s", "t", {"b": [1.5], "a": 1}, expected_seq=1, intent_id="req-1")
    assert again == first  # the same content (key order aside): the first event
    for type_, payload in [
        ("t", {"a": 2, "b": [1.5]}),
        ("t", {"a": 1.0, "b": [1.5]}),
        ("u", first.payload),
    ]:
        with pytest.raises(IntentConflict) as info:
            store.append("s", type_, payload, expected_seq=1, intent_id="req-1")
        assert (info.value.space, info.value.intent_id, info.value.seq) == ("s", "req-1", 0)
        assert "'req-1'" in str(info.value)
    # A batch: all of it written before with the same content returns it; else nothing is written.
    batch = [("t", {"n": 1}, "b-1"), ("t", {"n": 2}, "b-2")]
    written = store.append_many("s", batch, expected_seq=1)
    assert store.append_many("s", batch, expected_seq=3) == written
    for other in (
        [("t", {"n": 1}, "b-1"), ("t", {"n": 3}, "b-2")],
        [("t", {"n": 9}, "req-1"), ("t", {}, "new")],
    ):
        with pytest.raises(IntentConflict):
            store.append_many("s", other, expected_seq=3)
    assert store.head("s") == 3
    assert store.events("s")[0] == first


def test_forwarded_intent_with_other_content(store: EventStore) -> None:
    holder = AppendAuthority("holder", store, LeaseRegistry(store))
    first = holder.append("s", "t", {"a": 1}, intent_id="req-1")
    # Another node of the same registry: the intent is handed to the holder directly.
    near = AppendAuthority("near", store, holder.registry, forward_timeout=5)
    assert near.append("s", "t", {"a": 1}, intent_id="req-1") == first
    with pytest.raises(IntentConflict):
        near.append("s", "t", {"a": 2}, intent_id="req-1")
    # A node of another registry (another process): through the store's intents.
    far = AppendAuthority("far", store, LeaseRegistry(store), forward_timeout=5)
    assert far.append("s", "t", {"a": 1}, intent_id="req-1") == first
    with pytest.raises(IntentConflict):
        far.append("s", "t", {"a": 2}, intent_id="req-1")
    holder.serve("s")
    assert [e.payload for e in store.events("s")] == [{"a": 1}]


@pytest.mark.parametrize(
    "kind", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres), "git"]
)
def test_cli_append_intent_with_other_payload(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from shard_sql.cli import main

    if kind == "sqlite":
        url = f"sqlite:///{tmp_path}/shard.db"
    elif kind == "postgresql":
        url = request.getfixturevalue("pg_url")
        SqlEventStore(url, migrate=True).close()
    else:
        url = f"git+file://{tmp_path}/repo"
    append = ["--url", url, "append", "demo", "t", "--intent-id", "req-1"]
    assert main([*append, '{"a": 1}']) == 0
    assert main([*append, '{"a": 1}']) == 0
    capsys.readouterr()
    assert main([*append, '{"a": 2}']) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "req-1" in err and "Traceback" not in err


# -- item 8: one name rule on every Python version; names already stored are never re-checked ----

REFUSED_RANGES = [
    (0x00, 0x1F), (0x7F, 0x9F),  # controls
    (0xA0, 0xA0), (0x1680, 0x1680), (0x2000, 0x200A), (0x2028, 0x2029), (0x202F, 0x202F),
    (0x205F, 0x205F), (0x3000, 0x3000),  # white space but ' '
    (0xAD, 0xAD), (0x61C, 0x61C), (0x180E, 0x180E), (0x200B, 0x200B), (0x200E, 0x200F),
    (0x202A, 0x202E), (0x2060, 0x206F), (0xFEFF, 0xFEFF), (0xFFF9, 0xFFFB), (0xE0001, 0xE0001),
    (0xD800, 0xDFFF),  # surrogates
    (0xE000, 0xF8FF), (0xF0000, 0x10FFFF),  # private use
    (0xFDD0, 0xFDEF),  # noncharacters, with U+nFFFE and U+nFFFF below
]  # fmt: skip


def refused_by_the_rule(cp: int) -> bool:
    return cp & 0xFFFE == 0xFFFE or any(lo <= cp <= hi for lo, hi in REFUSED_RANGES)


def test_name_rule_is_one_fixed_table() -> None:
    from shard_sql.validation import check_space

    wrong = []
    for cp in range(0x110000):
        try:
            check_space("a" + chr(cp))
            refused = False
        except InvalidEvent:
            refused = True
        if refused != refused_by_the_rule(cp):
            wrong.append(f"U+{cp:04X}")
    assert not wrong, wrong[:20]


NEW_NAMES = [
    "\U0001fae8",  # Unicode 15 (shaking face): unassigned in Python 3.11's tables
    "\U0001f469\u200d\U0001f4bb",  # a ZWJ sequence (woman technologist)
    "\U0001f3f4\U000e0067\U000e0062\U000e0073\U000e0063\U000e0074\U000e007f",  # flag: tags
    "\u0627\u0628\u0646\u200c\u0633\u06cc\u0646\u0627",  # Persian with a ZWNJ
    "\u2764\ufe0f e\u0301",  # a variation selector, a combining accent
    "\U000e0080\U0003134a",  # unassigned; CJK Extension H (Unicode 15)
]
REFUSED_NAMES = ["a\u202eb", "a\u2066b", "\ue000", "\U0010fffd", "\ufdd0", "\U0001ffff", "a\xa0b",
                 "a\u200bb", "a\x85b", "a\u2028b", "\ufeffa"]  # fmt: skip


def test_names_on_every_backend(store: EventStore) -> None:
    for name in NEW_NAMES:
        store.append(name, name, {}, expected_seq=0, intent_id=name)
        assert store.events(name)[0].type == name
    assert sorted(store.spaces()) == sorted(NEW_NAMES)
    for name in REFUSED_NAMES:
        with pytest.raises(InvalidEvent) as space:
            store.append(name, "t", {}, expected_seq=0)
        with pytest.raises(InvalidEvent) as type_:
            store.append("s", name, {}, expected_seq=0)
        with pytest.raises(InvalidEvent) as intent_id:
            store.append("s", "t", {}, expected_seq=0, intent_id=name)
        assert (space.value.field, type_.value.field) == ("space", "type")
        assert intent_id.value.field == "intent_id"
        assert store.head(name) == 0 and store.events(name) == []  # a read finds nothing


def test_stored_names_are_not_checked_again(
    store: EventStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A name that the rule refuses, written by a version whose rule was another: every read
    works (`spaces`, `events`, `iter_events`, `head`, the lease, `verify`, export)."""
    from shard_sql.transfer import export_events
    from shard_sql.validation import pending

    old = "old\u202ename\ue000"
    if isinstance(store, GitEventStore):
        import shard_sql.git.store

        monkeypatch.setattr(shard_sql.git.store, "check_space", lambda s: s)
    store.write(old, [pending("t", {"n": 1})], expected_seq=0, fence=None)  # type: ignore[attr-defined]
    monkeypatch.undo()
    with pytest.raises(InvalidEvent):
        store.append(old, "t", {}, expected_seq=1)  # new writes follow today's rule
    registry = LeaseRegistry(store)
    assert store.spaces() == [old]
    assert store.head(old) == 1
    assert [e.payload for e in store.events(old)] == [{"n": 1}]
    assert [e.seq for e in store.iter_events(old)] == [0]
    assert registry.current(old) is None
    registry.revoke(old)
    assert verify(store).ok
    assert [e.space for e in export_events(store)] == [old]


# -- item 14: out-of-range numbers and wrong argument types are InvalidEvent, nothing else -------


def test_numbers_past_a_bigint(store: EventStore) -> None:
    from shard_sql import SeqConflict

    big = 2**63
    for field, call in [
        ("from_seq", lambda: store.events("s", from_seq=big)),
        ("limit", lambda: store.events("s", limit=big)),
        ("limit", lambda: store.events("s", from_seq=big - 1, limit=2**70)),
        ("from_seq", lambda: list(store.iter_events("s", from_seq=2**70))),
        ("expected_seq", lambda: store.append("s", "t", {}, expected_seq=big)),
        ("expected_seq", lambda: store.append_many("s", [("t", {})], expected_seq=big)),
    ]:
        with pytest.raises(InvalidEvent) as info:
            call()
        assert info.value.field == field
    assert store.events("s", from_seq=big - 1, limit=big - 1) == []
    with pytest.raises(SeqConflict):
        store.append("s", "t", {}, expected_seq=big - 1)
    assert store.head("s") == 0


def test_wrong_argument_types(store: EventStore) -> None:
    registry = LeaseRegistry(store)
    for fence in ("x", 3, {"space": "s"}):
        with pytest.raises(InvalidEvent) as info:
            store.append("s", "t", {}, expected_seq=0, fence=fence)  # type: ignore[arg-type]
        assert info.value.field == "fence"
        with pytest.raises(InvalidEvent):
            store.append_many("s", [("t", {})], expected_seq=0, fence=fence)  # type: ignore[arg-type]
    for lease in (None, "x", ("s", "h")):
        with pytest.raises(InvalidEvent) as info:
            registry.renew(lease)  # type: ignore[arg-type]
        assert info.value.field == "lease"
        with pytest.raises(InvalidEvent):
            registry.release(lease)  # type: ignore[arg-type]
    for timeout in (float("nan"), -1, float("inf"), "10", None):
        with pytest.raises(InvalidEvent) as info:
            AppendAuthority("n", store, registry, forward_timeout=timeout)  # type: ignore[arg-type]
        assert info.value.field == "forward_timeout"
    assert store.head("s") == 0


def test_clock_far_out(store: EventStore) -> None:
    from datetime import UTC, datetime, timedelta, timezone

    for when in (
        datetime(9999, 12, 31, 23, 59, tzinfo=UTC),
        datetime.max.replace(tzinfo=UTC),
        datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=14))),
        datetime(1969, 12, 31, tzinfo=UTC),
    ):
        registry = LeaseRegistry(store, clock=lambda when=when: when)
        with pytest.raises(InvalidEvent) as acquire:
            registry.acquire("s", "h", 30)
        with pytest.raises(InvalidEvent) as current:
            registry.current("s")
        with pytest.raises(InvalidEvent) as append:
            AppendAuthority("n", store, registry).append("s", "t", {})
        for info in (acquire, current, append):
            assert info.value.field == "clock" and str(when.year) in str(info.value)
    assert store.head("s") == 0
