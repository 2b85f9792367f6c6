"""What every adapter shares (`shard_sql.store_base`): decoding a page of stored payloads."""

from __future__ import annotations

import json

import pytest

from shard_sql.store_base import decode_payloads


def test_decode_payloads_is_json_loads_of_each() -> None:
    texts = ['{"a": [1, {"b": null}]}', "{}", '{"s": "x],[{\\"y"}', '{"n": 1.5e3, "t": true}']
    assert decode_payloads(texts) == [json.loads(t) for t in texts]
    assert decode_payloads(texts[:1]) == [json.loads(texts[0])]
    assert decode_payloads([]) == []


def test_decode_payloads_falls_back_to_each_text() -> None:
    # Two values in one text and none in another: the loop's answer (its error), not a shift.
    with pytest.raises(json.JSONDecodeError):
        decode_payloads(['{"a": 1}, {"b": 2}', "{}", "   "])
    with pytest.raises(json.JSONDecodeError):
        decode_payloads(['{"a": [1', "2]}"])
    assert decode_payloads([b'{"a": 1}', b"{}"]) == [{"a": 1}, {}]  # bytes: one by one


def test_new_event_and_pending_build_the_frozen_values() -> None:
    """The internal constructors (`slots_twin`) give the same values as the classes: the same
    type, equal (an event hashes as one), frozen, picklable."""
    import dataclasses
    import pickle
    from datetime import UTC, datetime

    from shard_sql.validation import Pending, pending
    from shard_sql.values import Event, new_event

    at = datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=UTC)
    e = new_event("s", 3, "t", {"a": [1]}, at, "w", 2, "i", 7)
    assert type(e) is Event
    assert e == Event("s", 3, "t", {"a": [1]}, at, "w", 2, "i", 7)
    assert hash(e) == hash(Event("s", 3, "t", {}, at, "w", 2, "i"))
    assert (e.space, e.seq, e.type, e.payload, e.recorded_at) == ("s", 3, "t", {"a": [1]}, at)
    assert (e.writer, e.generation, e.intent_id, e.position) == ("w", 2, "i", 7)
    assert new_event("s", 3, "t", {}, at, "w", 2, None).position is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        e.seq = 4  # type: ignore[misc]
    assert pickle.loads(pickle.dumps(e)) == e
    p = pending("t", {"a": 1}, "i")
    assert type(p) is Pending
    assert p == Pending("t", '{"a":1}', {"a": 1}, "i", None, None, None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.type = "u"  # type: ignore[misc]
