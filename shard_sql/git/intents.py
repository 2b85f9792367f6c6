"""Forwarded intents in a git repository: one ref per pending intent, created only if absent,
deleted once its event exists; and the waits of holders and forwarders (wake-up files, else
polling). docs/git.md explains the records, the arrival order, deletion beside `git gc`, and
waiting."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import pygit2
from pygit2.enums import ObjectType

from shard_sql import wake
from shard_sql.errors import InvalidEvent, ShardSqlError
from shard_sql.git.chain import SpaceChains
from shard_sql.git.errors import translated
from shard_sql.git.layout import (
    FEED,
    INTENT_REFS,
    intent_key,
    intent_ref,
    intents_dir,
    is_intent_key,
    lease_ref,
)
from shard_sql.git.repo import GitRepo
from shard_sql.ports import IntentQueue, SpaceWakeups
from shard_sql.store_base import checked_intent_ids, checked_wait
from shard_sql.validation import (
    Pending,
    check_intent_id,
    check_seq,
    check_space,
    check_text,
    pending,
)
from shard_sql.values import Event
from shard_sql.wake import FEED_WRITTEN, INTENT_RECORDED, WakeupWatch

POLL_MIN = 0.001
"""Pause between two polls of `wait_for_change` during its first `POLL_FAST` seconds (an answer
is most likely within a few ms), in seconds; then doubled after every unchanged poll..."""
POLL_FAST = 0.02
POLL_MAX = 0.005
"""... up to this. A pause is never shorter than 20 times the poll's own cost (at most ~5% of a
core, however many spaces are watched)."""
RECORD_CACHE = 4096
"""Parsed intent records kept per store (objects never change: keyed by ref and object id)..."""
CACHED_PAYLOAD = 64 * 1024
"""... if their payload is at most this long (JSON characters); larger ones are re-read."""
WAIT_BASELINES = 64
"""Sets of spaces per thread whose last seen stamp a wait remembers."""

log = logging.getLogger("shard_sql.git")

_MISS = object()
_Stamp = tuple[object, ...]

_arrival_lock = threading.Lock()
_last_arrival = 0


def arrival_ns() -> int:
    """The wall clock in nanoseconds, strictly increasing within this process."""
    global _last_arrival
    with _arrival_lock:
        _last_arrival = max(time.time_ns(), _last_arrival + 1)
        return _last_arrival


def record_bytes(space: str, item: Pending, holder: str, arrived: int) -> bytes:
    """The blob of a pending intent: one line of JSON."""
    head = json.dumps(
        {
            "space": space,
            "intent_id": item.intent_id,
            "type": item.type,
            "to": holder,
            "arrived_ns": arrived,
        },
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return f'{head[:-1]},"payload":{item.payload_json}}}\n'.encode()


def _reject_constant(value: str) -> Any:
    raise ValueError(f"{value} is not valid JSON")


def parse_record(space: str, key: str, data: bytes) -> tuple[int, Pending]:
    """`(arrived_ns, intent)` of a record blob, validated as a new append would be.

    Raises `ValueError` (or `InvalidEvent`, a subclass) when the record is not one this module
    writes for `space` under `key`.
    """
    record = json.loads(data.decode("utf-8"), parse_constant=_reject_constant)
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    intent_id, arrived = record.get("intent_id"), record.get("arrived_ns")
    if record.get("space") != space:
        raise ValueError(f"it belongs to space {record.get('space')!r}")
    if not isinstance(intent_id, str) or intent_key(intent_id) != key:
        raise ValueError("its intent_id does not match the ref name")
    if isinstance(arrived, bool) or not isinstance(arrived, int) or arrived < 0:
        raise ValueError("arrived_ns is not a non-negative integer")
    return arrived, pending(record.get("type"), record.get("payload"), intent_id)


def _stat(path: str) -> _Stamp | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def _names(path: str) -> frozenset[str] | None:
    try:
        with os.scandir(path) as it:
            return frozenset(e.name for e in it)
    except OSError:
        return None


class GitIntentQueue(IntentQueue, SpaceWakeups):
    """The `IntentQueue` of a `GitEventStore`, on its repository and chains."""

    def __init__(self, git: GitRepo, chains: SpaceChains) -> None:
        self.git = git
        self.chains = chains
        self._records: dict[tuple[str, str], tuple[int, Pending] | None] = {}
        self._warned: set[tuple[str, str]] = set()
        self._waits = threading.local()

    @property
    def path(self) -> object:
        return self.git.path

    # -- recording ---------------------------------------------------------------------------

    @translated
    def put_intent(self, space: str, item: Pending, *, holder: str) -> None:
        check_space(space)
        check_text("holder", holder)
        if item.intent_id is None:
            raise InvalidEvent("intent_id", "a forwarded intent needs one")
        item = pending(item.type, item.payload, item.intent_id)  # never record unchecked input
        assert item.intent_id is not None
        ref = intent_ref(space, item.intent_id)
        handle = self.git.handle()
        self.awaited()[space] = item.intent_id  # this thread's waits are for its event now
        if self.git.target(handle, ref) is not None:
            return  # recorded before
        if self.chains.find_intent_now(handle, space, item.intent_id):
            return  # applied already: a late retry leaves nothing behind
        data = record_bytes(space, item, holder, arrival_ns())
        # Neither the record nor its ref is fsynced: nobody is told anything until the event is
        # written, durably; a record lost in a crash leaves its caller waiting until it times out
        # and retries with the same intent id.
        blob = self.git.objects(durable=False).put(ObjectType.BLOB, data)
        self.git.refs.create(ref, blob)
        if self.git.wakeup_files is not None:
            self.git.wakeup_files.signal(INTENT_RECORDED, space)

    def awaited(self) -> dict[str, str]:
        """This thread's spaces where it waits for an intent it recorded (by its intent id):
        its waits on them wait for the event (the event wake-up file), not for intents."""
        try:
            out: dict[str, str] = self._waits.awaited
        except AttributeError:
            out = self._waits.awaited = {}
        return out

    # -- reading -----------------------------------------------------------------------------

    @translated
    def find_intent(self, space: str, intent_id: str) -> Event | None:
        check_space(space)
        checked = check_intent_id(intent_id)
        assert checked is not None
        found = self.chains.find_intent_now(self.git.handle(), space, checked)
        if found is not None and self.awaited().get(space) == checked:
            del self.awaited()[space]
        return found

    def _intent_refs(self, space: str) -> list[str]:
        """The names of the space's intent refs, loose and packed.

        The loose directory is listed before `packed-refs` is read: `git pack-refs` writes
        `packed-refs` before it deletes the loose files, so no ref is missed while it runs.
        """
        prefix = intents_dir(space)
        names: set[str] = set()
        try:
            with os.scandir(self.git.refs.file(prefix)) as it:
                names.update(prefix + e.name for e in it if is_intent_key(e.name))
        except (FileNotFoundError, NotADirectoryError):
            pass
        names.update(n for n in self.git.refs.packed_under(INTENT_REFS) if n.startswith(prefix))
        return [n for n in names if is_intent_key(n[len(prefix) :])]

    def _record(self, handle: Any, space: str, ref: str) -> tuple[int, Pending] | None:
        """The parsed record `ref` points at; None when it is gone, unreadable or invalid."""
        try:
            oid = self.git.target(handle, ref)
        except (ShardSqlError, pygit2.GitError, OSError, ValueError) as e:
            self._warn(ref, "(unresolved)", e)
            return None
        if oid is None:
            return None
        cache = (ref, oid)
        hit = self._records.get(cache, _MISS)
        if hit is not _MISS:
            return hit  # type: ignore[return-value]
        key = ref.rsplit("/", 1)[1]
        try:
            parsed: tuple[int, Pending] | None = parse_record(
                space, key, self.git.read(handle, oid, ObjectType.BLOB)
            )
        except (ValueError, RecursionError, ShardSqlError, pygit2.GitError, OSError) as e:
            # A defect of a stored record (`InvalidEvent` is a ValueError): skip it, keep serving.
            self._warn(ref, oid, e)
            parsed = None
        if parsed is None or len(parsed[1].payload_json) <= CACHED_PAYLOAD:
            if len(self._records) >= RECORD_CACHE:
                self._records.clear()
            self._records[cache] = parsed
        return parsed

    def _warn(self, ref: str, oid: str, e: BaseException) -> None:
        if (ref, oid) in self._warned:
            return
        if len(self._warned) >= RECORD_CACHE:
            self._warned.clear()
        self._warned.add((ref, oid))
        log.warning(
            "git store %s: skipping the unreadable intent record %s (%s): %s: %s; "
            "inspect it, then remove it with `git update-ref -d %s`",
            self.git.path,
            ref,
            oid,
            type(e).__name__,
            e,
            ref,
        )

    @translated
    def pending_intents(self, space: str, *, limit: int) -> list[Pending]:
        check_space(space)
        check_seq("limit", limit)
        handle = self.git.handle()
        records = []
        for ref in self._intent_refs(space):
            parsed = self._record(handle, space, ref)
            if parsed is not None:
                records.append((parsed[0], ref, parsed[1]))
        if not records:
            return []  # the common case of a holder's idle rounds: no tip to read
        records.sort(key=lambda r: (r[0], r[1]))
        feed = self.chains.feed.current(handle)
        tip = self.chains.tip_in(handle, feed, space)
        out: list[Pending] = []
        applied: list[str] = []
        for _, ref, item in records:
            if len(out) >= limit:
                break
            assert item.intent_id is not None
            if self.chains.find_intent(space, feed, tip, item.intent_id) is not None:
                applied.append(ref)  # left by a holder that died before forgetting it
            else:
                out.append(item)
        self._delete(applied)
        return out

    # -- forgetting --------------------------------------------------------------------------

    @translated
    def forget_intents(self, space: str, intent_ids: Sequence[str]) -> None:
        check_space(space)
        ids = checked_intent_ids(intent_ids)
        handle = self.git.handle()
        feed = self.chains.feed.current(handle)
        tip = self.chains.tip_in(handle, feed, space)
        gone = []
        for intent_id in ids:
            assert intent_id is not None
            ref = intent_ref(space, intent_id)
            if self.git.target(handle, ref) is None:
                continue
            if self.chains.find_intent(space, feed, tip, intent_id) is not None:
                gone.append(ref)  # only applied intents: their events remain
        self._delete(gone)

    def _delete(self, refs: Sequence[str]) -> None:
        """Delete the refs of applied intents, best effort (leftovers are harmless garbage).

        Never through libgit2: deleting a packed ref makes it rewrite `packed-refs` from its
        cache without re-reading it under `packed-refs.lock`, which can roll back refs that a
        concurrent `git pack-refs` (`git gc`) has just packed, a space's tip among them.
        A loose ref is unlinked without its lock (it is garbage whatever happens beside it: a
        sender retrying the same intent id may record it again, swept later); a packed one is
        dropped from `packed-refs` under git's protocol (`RefFiles.drop_packed`).
        """
        if not refs:
            return
        packed = set(self.git.refs.packed_under(INTENT_REFS))
        try:
            for ref in refs:
                self.git.refs.unlink_loose(ref)
            in_pack = [r for r in refs if r in packed]
            if in_pack:
                self.git.refs.drop_packed(in_pack)
        except OSError as e:
            log.warning("git store %s: applied intents left for later: %s", self.git.path, e)

    # -- waiting -----------------------------------------------------------------------------

    def wakes_per_space(self) -> bool:
        """`SpaceWakeups`: True with wake-up files (Linux)."""
        return self.git.wakeup_files is not None and self.git.wakeup_files.working

    def wait_for_change(self, spaces: Sequence[str], timeout: float) -> None:
        """Block until a space, lease or intent ref of `spaces` changed since this thread's last
        wait on them (its first wait on a set of spaces ends at once), or `timeout` passes."""
        self.git.handle()  # a closed store raises StoreUnavailable
        watched = tuple(sorted(set(checked_wait(spaces, timeout))))
        paths = [os.path.join(self.git.root, "packed-refs")]
        dirs = []
        for space in watched:
            paths.append(self.git.refs.file(lease_ref(space)))
            dirs.append(self.git.refs.file(intents_dir(space)))
        tips = self._tips_stamp(watched)

        def stamp() -> _Stamp:
            return (*(_stat(p) for p in paths), *(_names(d) for d in dirs), tips())

        seen: dict[tuple[str, ...], _Stamp] = getattr(self._waits, "seen", None) or {}
        self._waits.seen = seen
        start = time.monotonic()
        deadline = start + max(0.0, timeout)
        now_stamp = stamp()
        cost = time.monotonic() - start
        files = self.git.wakeup_files
        found = None
        if files is not None:
            found = files.watch(self._waits, files.paths_to_wait_on(watched, self.awaited()))
        baseline = seen.get(watched)
        try:
            if baseline is None:
                # A first wait on these spaces: what changed since the caller's look is unknown,
                # so it ends at once (the caller looks again); the next has this stamp to go by.
                return
            if found is not None:
                now_stamp = self._wait_on_wakeups(found[0], stamp, now_stamp, baseline, deadline)
            else:
                now_stamp = self._poll(stamp, now_stamp, cost, baseline, start, deadline)
        finally:
            if len(seen) >= WAIT_BASELINES:
                seen.clear()
            seen[watched] = now_stamp

    def _tips_stamp(self, spaces: Sequence[str]) -> Callable[[], tuple[str | None, ...]]:
        """The tips of `spaces` in the feed as of now, read again only when the feed ref's file
        changed (a `stat`): the space refs are copies moved at snapshots, not by every write."""
        feed_file = self.git.refs.file(FEED)
        seen: tuple[_Stamp | None, tuple[str | None, ...]] | None = None

        def tips() -> tuple[str | None, ...]:
            nonlocal seen
            st = _stat(feed_file)
            if seen is None or st != seen[0] or st is None:  # None: packed, or no feed yet
                handle = self.git.handle()
                feed = self.chains.feed.current(handle)
                seen = (st, tuple(self.chains.feed.tip_oid(handle, feed, s) for s in spaces))
            return seen[1]

        return tips

    def wait_feed(self, after: int, timeout: float, feed_head: Callable[[], int]) -> bool:
        """True as soon as `feed_head()` passes `after`, False after `timeout` seconds.

        Sleeps on the feed's wake-up file (signalled after every commit) where there are wake-up
        files, looking at a stamp of the feed ref every WAKEUP_POLL_FALLBACK seconds (a commit
        whose writer died before it signalled); elsewhere polls that stamp, as `wait_for_change`
        does.
        """
        self.git.handle()  # a closed store raises StoreUnavailable
        deadline = time.monotonic() + timeout
        paths = [self.git.refs.file(FEED), os.path.join(self.git.root, "packed-refs")]

        def stamp() -> _Stamp:
            return tuple(_stat(p) for p in paths)

        files = self.git.wakeup_files
        found = None if files is None else files.watch(self._waits, [files.path(FEED_WRITTEN, "")])
        while True:
            start = time.monotonic()
            before = stamp()
            cost = time.monotonic() - start
            if feed_head() > after:
                return True
            if time.monotonic() >= deadline:
                return False
            if found is not None:
                self._wait_on_wakeups(found[0], stamp, before, before, deadline)
            else:
                self._poll(stamp, before, cost, before, start, deadline)

    @staticmethod
    def _wait_on_wakeups(
        watch: WakeupWatch, stamp: Any, now_stamp: _Stamp, baseline: _Stamp, deadline: float
    ) -> _Stamp:
        """Sleep on the wake-up files until one is signalled or the stamp differs from
        `baseline` (a signal missed before the watch began shows in the stamp, looked at every
        WAKEUP_POLL_FALLBACK seconds); return the last stamp seen."""
        while now_stamp == baseline:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            signalled = watch.signalled(min(remaining, wake.WAKEUP_POLL_FALLBACK))
            now_stamp = stamp()
            if signalled:
                break
        return now_stamp

    @staticmethod
    def _poll(
        stamp: Any, now_stamp: _Stamp, cost: float, baseline: _Stamp, start: float, deadline: float
    ) -> _Stamp:
        """Look at the stamp (whose last look took `cost` seconds) until it differs from
        `baseline`, with back-off from `start`; return the last stamp seen."""
        delay = POLL_MIN
        while now_stamp == baseline:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            # At most ~5% of a core, however many spaces a poll stats.
            time.sleep(min(max(delay, 20 * cost), remaining))
            if time.monotonic() - start >= POLL_FAST:
                delay = min(delay * 2, POLL_MAX)
            t = time.monotonic()
            now_stamp = stamp()
            cost = time.monotonic() - t
        return now_stamp
