"""Input checks: everything is refused with InvalidEvent naming the field, before any write."""

from __future__ import annotations

import math
from typing import Any

import pytest

from shard_sql import InMemoryEventStore, InvalidEvent
from shard_sql.validation import (
    MAX_PAYLOAD_BYTES,
    MAX_POSITION,
    MAX_TYPES,
    check_checkpoint_name,
    check_items,
    check_payload,
    check_position,
    check_space,
    check_timeout,
    check_type,
    check_types,
)


@pytest.mark.parametrize(
    "payload",
    [
        {"x": math.nan},
        {"nested": [{"deep": math.inf}]},
        {1: "a"},
        {"a": {2: "b"}},
        {"1": 1, 1: 2},
        {"t": (1,)},
        {"s": {1}},
        {"o": object()},
        {"b": b"x"},
        {"n": "\x00"},
        {"k\x00": 1},
        {"u": "\udfff"},
        [],
        "{}",
        None,
    ],
)
def test_payloads_refused(payload: Any) -> None:
    with pytest.raises(InvalidEvent) as info:
        check_payload(payload)
    assert info.value.field == "payload"
    assert "payload" in str(info.value)


def test_deeply_nested_payload_refused_cleanly() -> None:
    deep: dict[str, Any] = {}
    cur = deep
    for _ in range(100_000):
        cur["a"] = {}
        cur = cur["a"]
    with pytest.raises(InvalidEvent):
        check_payload(deep)


def test_payload_size_limit() -> None:
    overhead = len('{"x":""}')
    text, _ = check_payload({"x": "a" * (MAX_PAYLOAD_BYTES - overhead)})
    assert len(text) == MAX_PAYLOAD_BYTES
    with pytest.raises(InvalidEvent):
        check_payload({"x": "a" * (MAX_PAYLOAD_BYTES - overhead + 1)})
    with pytest.raises(InvalidEvent):  # counted in UTF-8 bytes, not characters
        check_payload({"x": "é" * (MAX_PAYLOAD_BYTES // 2)})


def test_payload_is_copied() -> None:
    store = InMemoryEventStore()
    payload: dict[str, Any] = {"list": [1]}
    e = store.append("s", "t", payload, expected_seq=0)
    payload["list"].append(2)
    assert e.payload == {"list": [1]}
    assert store.events("s")[0].payload == {"list": [1]}


def test_valid_names() -> None:
    for name in ("a", "with space", "ünï/ç@{1}..lock", "x" * 200):
        assert check_space(name) == name
        assert check_type(name) == name


@pytest.mark.parametrize("name", ["", "\t", "a\x7f", "a\u200bb", "a\u2028b", "\ud800", "x" * 201])
def test_invalid_names(name: str) -> None:
    with pytest.raises(InvalidEvent) as info:
        check_space(name)
    assert info.value.field == "space"


@pytest.mark.parametrize(
    "items", [None, 5, "ab", {"t": {}}, [("t",)], [("t", {}, "i", "extra")], ["t"], []]
)
def test_invalid_batches(items: Any) -> None:
    with pytest.raises(InvalidEvent):
        check_items(items)


def test_invalid_event_is_a_value_error() -> None:
    assert issubclass(InvalidEvent, ValueError)


@pytest.mark.parametrize("value", [-1, MAX_POSITION + 1, 1.0, "3", True, None])
def test_positions_refused(value: Any) -> None:
    with pytest.raises(InvalidEvent, match="after"):
        check_position("after", value)


def test_positions_accepted() -> None:
    assert check_position("limit", 0) == 0
    assert check_position("position", MAX_POSITION) == MAX_POSITION


@pytest.mark.parametrize(
    "types", ["alias.set", b"x", {"a": 1}, 3, [""], ["ok", None], ["t"] * (MAX_TYPES + 1)]
)
def test_feed_types_refused(types: Any) -> None:
    with pytest.raises(InvalidEvent, match="type"):
        check_types(types)


def test_feed_types_accepted() -> None:
    assert check_types(None) is None
    assert check_types(["a", "b", "a"]) == {"a", "b"}
    assert check_types(t for t in ("x",)) == {"x"}
    assert check_types(()) == frozenset()


@pytest.mark.parametrize("name", ["", "a\nb", "s" * 201, None, 5])
def test_checkpoint_names_refused(name: Any) -> None:
    with pytest.raises(InvalidEvent, match="name"):
        check_checkpoint_name(name)


@pytest.mark.parametrize("timeout", [-0.1, math.nan, math.inf, "1", None, False])
def test_timeouts_refused(timeout: Any) -> None:
    with pytest.raises(InvalidEvent, match="timeout"):
        check_timeout(timeout)


def test_timeouts_accepted() -> None:
    assert check_timeout(0) == 0.0
    assert check_timeout(1e300) > 0
