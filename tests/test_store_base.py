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
