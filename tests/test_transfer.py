"""Export, import and copy as a library: what an application calls without the command line."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from shard_sql import InMemoryEventStore, InvalidEvent, LeaseRegistry, SeqConflict, SqlEventStore
from shard_sql.transfer import (
    ImportReport,
    InvalidLine,
    TransferError,
    UnknownSpace,
    copy_events,
    dumps,
    event_from_json,
    event_to_json,
    export_jsonl,
    import_events,
    import_jsonl,
)


def filled() -> InMemoryEventStore:
    store = InMemoryEventStore()
    lease = LeaseRegistry(store).acquire("wiki", "node-a", 60)
    store.append("wiki", "page.created", {"t": "Home"}, expected_seq=0, fence=lease)
    store.append("wiki", "alias.set", {"a": "ü"}, expected_seq=1, fence=lease, intent_id="i-1")
    store.append_many("other", [("t", {"i": i}) for i in range(3)], expected_seq=0)
    return store


def test_copy_between_stores(tmp_path: Path) -> None:
    source = filled()
    target = SqlEventStore(f"sqlite:///{tmp_path}/copy.db")
    try:
        assert copy_events(source, target) == ImportReport(written=5, skipped=0, spaces=2)
        assert target.events("wiki") == source.events("wiki")
        # Again: all there already, identical.
        assert copy_events(source, target, ["wiki"]) == ImportReport(0, 2, 1)
    finally:
        target.close()


def test_export_then_import_lines() -> None:
    source = filled()
    out = io.StringIO()
    seen: list[int] = []
    assert export_jsonl(source, out, progress=seen.append) == 5 and sum(seen) == 5
    lines = out.getvalue().encode().splitlines(keepends=True)
    target = InMemoryEventStore()
    read: list[int] = []
    report = import_jsonl(target, lines, "log.jsonl", progress=read.append)
    assert report == ImportReport(5, 0, 2) and sum(read) == len(out.getvalue().encode())
    assert target.events("other") == source.events("other")
    assert event_from_json(event_to_json(source.events("wiki")[1])) == source.events("wiki")[1]


def test_errors_are_typed_and_name_the_line() -> None:
    source = filled()
    line = dumps(event_to_json(source.events("wiki")[0])).encode()
    with pytest.raises(InvalidLine) as info:
        import_jsonl(InMemoryEventStore(), [line, b"{oops\n"], "log.jsonl")
    assert isinstance(info.value, InvalidEvent) and info.value.where == "log.jsonl line 2"
    assert str(info.value).startswith("log.jsonl line 2: not valid JSON")
    with pytest.raises(InvalidLine, match=r"log\.jsonl line 1: invalid payload"):
        import_jsonl(InMemoryEventStore(), [line.replace(b'{"t":"Home"}', b"[1]")], "log.jsonl")
    with pytest.raises(TransferError, match="starts at seq 1, but the target's head is 0"):
        import_events(InMemoryEventStore(), source.events("wiki")[1:])
    with pytest.raises(TransferError, match="cannot import events"):
        import_events(object(), [])
    with pytest.raises(UnknownSpace, match="unknown space 'nope'"):
        copy_events(source, InMemoryEventStore(), ["nope"])


def test_a_target_written_meanwhile_is_a_seq_conflict() -> None:
    source = filled()
    target = InMemoryEventStore()
    events = iter(source.events("other"))

    def racing() -> object:
        yield next(events)
        target.append("other", "t", {"by": "someone else"}, expected_seq=0)
        yield from events

    with pytest.raises(SeqConflict, match="changed during the import"):
        import_events(target, racing())  # type: ignore[arg-type]


def test_a_generation_no_store_keeps_is_refused_before_writing(tmp_path: Path) -> None:
    """A memory or git store may hold a generation past 2**63 - 1; SQL cannot: copy says so."""
    import dataclasses

    from shard_sql.validation import pending

    source = InMemoryEventStore()
    huge = dataclasses.replace(pending("t", {}), writer="w", generation=2**70)
    source.write("s", [huge], expected_seq=0, fence=None, verify_fence=False)
    target = SqlEventStore(f"sqlite:///{tmp_path}/t.db")
    try:
        with pytest.raises(InvalidLine, match=r"'s' seq 0: invalid generation: .* past 2\*\*63"):
            copy_events(source, target)
        assert target.spaces() == []
    finally:
        target.close()


def test_the_next_grant_after_a_copy_is_newer_than_the_copied_log() -> None:
    source = filled()
    registry = LeaseRegistry(source)
    registry.revoke("wiki")
    lease = registry.acquire("wiki", "node-b", 60)
    source.append("wiki", "page.edited", {}, expected_seq=2, fence=lease)  # generation 3
    target = InMemoryEventStore()
    copy_events(source, target)
    assert LeaseRegistry(target).acquire("wiki", "node-c", 60).generation == 4
    assert LeaseRegistry(target).acquire("other", "node-c", 60).generation == 1  # unfenced log


def test_an_event_already_there_differs_when_a_number_changed_type() -> None:
    """1 and 1.0 compare equal in Python but are different JSON: the import comparison keeps
    the payload rule (`validation.same_payload`), so a copy over a different log is refused."""
    source = InMemoryEventStore()
    source.append("s", "t", {"v": 1}, expected_seq=0)
    target = InMemoryEventStore()
    target.append("s", "t", {"v": 1.0}, expected_seq=0)
    with pytest.raises(TransferError, match="differs"):
        copy_events(source, target)
