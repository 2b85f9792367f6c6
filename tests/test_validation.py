"""Input checks: everything is refused with InvalidEvent naming the field, before any write."""

from __future__ import annotations

import math
from typing import Any

import pytest

from shard_sql import InMemoryEventStore, InvalidEvent
from shard_sql.validation import (
    MAX_PAYLOAD_BYTES,
    check_items,
    check_payload,
    check_space,
    check_type,
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
