"""Forwarded intents in a git repository: the `IntentQueue` half of `GitEventStore`.

Layout (beside the spaces and leases, never a branch):

- `refs/shard-sql/intents/<name>/<h>`: one ref per pending intent, where `<name>` is the space's
  encoded name (as for `spaces/` and `leases/`) and `<h>` the SHA-256 of the intent id (64 hex
  digits). It points at a blob, one line of JSON:

      {"space":"wiki","intent_id":"fwd-1f3a...","type":"alias.set","to":"node-a",
       "arrived_ns":1767225600123456789,"payload":{"page":"Home"}}

  `to` names the holder the sender forwarded to (informative: any holder of the space applies it).

The ref name is a function of (space, intent id), so recording is an atomic create-if-absent:
the sender takes the ref's lock (`<ref>.lock`, O_EXCL), and writes the ref only if it does not
exist under the lock. Two senders of one intent id (a caller retrying from another process while
the first still waits) can never record it twice; the first record wins, as in memory.

Neither the record nor its ref is fsynced (the SQL adapter commits intents without waiting for
the flush, for the same reason): nobody is told anything until the intent's event is written,
durably, by the holder. A record lost in a crash (or, after a power loss, a ref left empty or
naming a lost object: skipped as unreadable, see below) leaves its caller waiting until it times
out (`IntentTimeout`) and retries with the same intent id. The ref is written as git writes one
(`<ref>.lock`, renamed over the ref), not through libgit2, whose fsync switch is process-wide.

Arrival order is `(arrived_ns, h)`: `arrived_ns` is the sender's wall clock (nanoseconds since the
epoch, strictly increasing within a process) when it recorded the intent. Across hosts it is as
good as their clocks agree; it orders only intents pending at the same time, for fairness, and
never decides safety: a caller's append blocks until its event exists, so an append issued after
another was acknowledged is recorded after that one was written and gets a higher seq whatever the
clocks say. A sender whose clock lags is served a little early, nothing worse.

Applied = the event exists: the holder writes the event (its intent id goes into the tip tree's
intent index in the same ref update), so an intent is applied at most once. The ref is garbage
then: `forget_intents` deletes the refs of applied intents, and `pending_intents` skips (and
deletes) any it meets, such as those of a holder that died between its write and its forget.

Deleting never goes through libgit2, whose deletion of a packed ref rewrites `packed-refs` from
a cache not re-read under `packed-refs.lock`, and so can roll back refs that a concurrent
`git pack-refs` (run by `git gc`) has just packed, a space's tip among them: a loose intent ref is
unlinked (without its lock: it is garbage whatever happens beside it), a packed one dropped from
`packed-refs` rewritten under `packed-refs.lock` from the file read under that lock, as git itself
does (a `packed-refs.lock` held by someone else leaves it for a later round). `git gc` may run
beside forwarding, as beside appends.

A record that cannot be read or does not validate (a foreign or corrupt blob, a pruned object) is
skipped with one warning on the `shard_sql.git` logger, never applied and never deleted: an
operator removes it with `git update-ref -d <ref>`. The holder keeps serving the other intents.

Waiting (`wait_for_change`): git has no notifications. On Linux a waiter sleeps on bells
(`shard_sql.wake`, in `<git dir>/shard-sql-bells`): a holder's serving thread on the intent
bells of its spaces, rung by `put_intent`, a forwarder on the event bell of the space it awaits,
rung by a write of forwarded intents; it looks at the stamp below every `BELL_FALLBACK` seconds.
Elsewhere, or where the bells cannot be made, the waiter polls a cheap stamp of what it
waits for: `stat` of each space's loose space and lease refs, the names in its intent directory,
and `stat` of `packed-refs`; every loose ref update is a rename (a new inode), so a change shows
even within one mtime tick. A poll costs ~20 us for one space. Polls come every `POLL_MIN`
(1 ms) for the first `POLL_FAST` (20 ms) of a wait, then back off to `POLL_MAX` (5 ms): an idle
holder costs ~0.5% of a core and notices a new intent 2.5 ms later on average (and a pause is
never shorter than 20 times the poll's own cost, so many spaces stay under ~5%). The stamp
seen when the previous wait of the same thread on the same spaces returned is the baseline, so a
change between two waits (while the holder was serving) ends the next wait at once; a thread's
first wait on a set of spaces ends at once (it has no baseline).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

import pygit2
from pygit2.enums import ObjectType

from shard_sql import wake
from shard_sql._git_errors import guarded as _guarded
from shard_sql.errors import InvalidEvent, ShardSqlError, StoreUnavailable
from shard_sql.ports import IntentQueue, SpaceWakeups
from shard_sql.validation import (
    Pending,
    check_intent_id,
    check_seq,
    check_space,
    check_text,
    pending,
)
from shard_sql.values import Event
from shard_sql.wake import Bells

if TYPE_CHECKING:
    from shard_sql.git import _Objects, _Tip

INTENT_REFS = "refs/shard-sql/intents/"
"""Where pending intents live: `INTENT_REFS + <encoded space> + "/" + <sha256 of intent id>`."""
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

log = logging.getLogger("shard_sql.git")

P = ParamSpec("P")
R = TypeVar("R")

_HEX = frozenset("0123456789abcdef")
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


def intent_key(intent_id: str) -> str:
    """The last component of an intent's ref: the SHA-256 of its UTF-8, in hex."""
    return hashlib.sha256(intent_id.encode("utf-8")).hexdigest()


def _is_key(name: str) -> bool:
    return len(name) == 64 and set(name) <= _HEX


def record_bytes(space: str, item: Pending, holder: str, arrived: int) -> bytes:
    """The blob of a pending intent (see the module docstring)."""
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


class GitIntents(IntentQueue, SpaceWakeups):
    """The `IntentQueue` of `GitEventStore` (a mixin: it uses the store's handles and locks)."""

    if TYPE_CHECKING:
        path: Path
        lock_timeout: float
        durable: bool
        _gitdir: str

        def _repo(self) -> Any: ...
        def _target(self, repo: Any, ref: str) -> str | None: ...
        def _read(self, repo: Any, oid: str, kind: int) -> bytes: ...
        def _objects(self, durable: bool | None = None) -> _Objects: ...
        def _tip(self, repo: Any, space: str) -> _Tip | None: ...
        def _find_intent(self, space: str, tip: _Tip | None, intent_id: str) -> Event | None: ...

    def _init_intents(self) -> None:
        """Called by `GitEventStore.__init__` once `_gitdir` is known."""
        self._records: dict[tuple[str, str], tuple[int, Pending] | None] = {}
        self._warned: set[tuple[str, str]] = set()
        self._packed: tuple[_Stamp | None, list[str]] = (None, [])
        self._waits = threading.local()
        # Refs shared by the worktrees of a repository live in its common directory.
        common = os.path.join(self._gitdir, "commondir")
        root = self._gitdir
        if os.path.isfile(common):
            with open(common, encoding="utf-8") as f:
                root = os.path.normpath(os.path.join(self._gitdir, f.read().strip()))
        self._refs_root = root
        self._bells = Bells.beside(os.path.join(root, "shard-sql-bells"))

    # -- names -------------------------------------------------------------------------------

    @staticmethod
    def _intent_dir(space: str) -> str:
        from shard_sql.git import encode_name

        return INTENT_REFS + encode_name(space) + "/"

    def _file(self, ref: str) -> str:
        return os.path.join(self._refs_root, *ref.split("/"))

    # -- recording ---------------------------------------------------------------------------

    @_guarded
    def put_intent(self, space: str, item: Pending, *, holder: str) -> None:
        check_space(space)
        check_text("holder", holder)
        if item.intent_id is None:
            raise InvalidEvent("intent_id", "a forwarded intent needs one")
        item = pending(item.type, item.payload, item.intent_id)  # never record unchecked input
        assert item.intent_id is not None
        ref = self._intent_dir(space) + intent_key(item.intent_id)
        repo = self._repo()
        self._awaited()[space] = item.intent_id  # this thread's waits are for its event now
        if self._target(repo, ref) is not None:
            return  # recorded before
        if self._find_intent(space, self._tip(repo, space), item.intent_id) is not None:
            return  # applied already: a late retry leaves nothing behind
        data = record_bytes(space, item, holder, arrival_ns())
        # Neither the record nor its ref is fsynced: nobody is told anything until the event is
        # written, durably; a record lost in a crash leaves its caller waiting until it times out
        # and retries with the same intent id (see the module docstring).
        blob = self._objects(durable=False).put(ObjectType.BLOB, data)
        self._create_ref(repo, ref, blob, time.monotonic() + self.lock_timeout)
        if self._bells is not None:
            self._bells.ring("i", space)

    def _awaited(self) -> dict[str, str]:
        """This thread's spaces where it waits for an intent it recorded (by its intent id)."""
        try:
            out: dict[str, str] = self._waits.awaited
        except AttributeError:
            out = self._waits.awaited = {}
        return out

    def _create_ref(self, repo: Any, ref: str, target: str, deadline: float) -> None:
        """Create `ref` at `target` unless it exists, under `<ref>.lock` as git does, without
        fsync (libgit2's fsync setting is process-wide: this does not go through libgit2)."""
        path = self._file(ref)
        lock = path + ".lock"
        backoff = 0.0005
        while True:
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
                break
            except FileNotFoundError:
                pass  # `git pack-refs` removed the emptied directory meanwhile: again
            except FileExistsError:
                if time.monotonic() >= deadline:
                    raise StoreUnavailable(
                        f"git store {self.path}: {ref} stayed locked for {self.lock_timeout}s; "
                        f"if no writer is running, a crashed one left {lock} behind: remove it"
                    ) from None
                time.sleep(backoff * random.uniform(0.5, 1.5))
                backoff = min(backoff * 2, 0.02)
        renamed = False
        try:
            if self._target(repo, ref) is not None:
                return  # another sender of the same intent id was first
            os.write(fd, (target + "\n").encode("ascii"))
            os.close(fd)
            fd = -1
            os.rename(lock, path)
            renamed = True
        finally:
            if fd >= 0:
                os.close(fd)
            if not renamed:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(lock)

    # -- reading -----------------------------------------------------------------------------

    @_guarded
    def find_intent(self, space: str, intent_id: str) -> Event | None:
        check_space(space)
        checked = check_intent_id(intent_id)
        assert checked is not None
        found = self._find_intent(space, self._tip(self._repo(), space), checked)
        if found is not None and self._awaited().get(space) == checked:
            del self._awaited()[space]
        return found

    def _intent_refs(self, space: str) -> list[str]:
        """The names of the space's intent refs, loose and packed.

        The loose directory is listed before `packed-refs` is read: `git pack-refs` writes
        `packed-refs` before it deletes the loose files, so no ref is missed while it runs.
        """
        prefix = self._intent_dir(space)
        names: set[str] = set()
        try:
            with os.scandir(self._file(prefix)) as it:
                names.update(prefix + e.name for e in it if _is_key(e.name))
        except (FileNotFoundError, NotADirectoryError):
            pass
        names.update(n for n in self._packed_intents() if n.startswith(prefix))
        return [n for n in names if _is_key(n[len(prefix) :])]

    def _packed_intents(self) -> list[str]:
        """The intent refs listed in `packed-refs` (re-read only when the file changed)."""
        path = os.path.join(self._refs_root, "packed-refs")
        try:
            f = open(path, "rb")  # noqa: SIM115 (fstat of the very file read)
        except FileNotFoundError:
            self._packed = (None, [])
            return []
        with f:
            st = os.fstat(f.fileno())
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
            known, names = self._packed
            if known == stamp:
                return names
            found = []
            needle = (" " + INTENT_REFS).encode()
            for line in f:
                at = line.find(needle)
                if at > 0 and not line.startswith((b"#", b"^")):
                    found.append(line[at + 1 :].rstrip(b"\r\n").decode("utf-8", "replace"))
        self._packed = (stamp, found)
        return found

    def _record(self, repo: Any, space: str, ref: str) -> tuple[int, Pending] | None:
        """The parsed record `ref` points at; None when it is gone, unreadable or invalid."""
        try:
            oid = self._target(repo, ref)
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
                space, key, self._read(repo, oid, ObjectType.BLOB)
            )
        except Exception as e:  # any defect of a stored record: skip it, keep serving
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
            self.path,
            ref,
            oid,
            type(e).__name__,
            e,
            ref,
        )

    @_guarded
    def pending_intents(self, space: str, *, limit: int) -> list[Pending]:
        check_space(space)
        check_seq("limit", limit)
        repo = self._repo()
        records = []
        for ref in self._intent_refs(space):
            parsed = self._record(repo, space, ref)
            if parsed is not None:
                records.append((parsed[0], ref, parsed[1]))
        if not records:
            return []  # the common case of a holder's idle rounds: no tip to read
        records.sort(key=lambda r: (r[0], r[1]))
        tip = self._tip(repo, space)
        out: list[Pending] = []
        applied: list[str] = []
        for _, ref, item in records:
            if len(out) >= limit:
                break
            assert item.intent_id is not None
            if self._find_intent(space, tip, item.intent_id) is not None:
                applied.append(ref)  # left by a holder that died before forgetting it
            else:
                out.append(item)
        self._delete(applied)
        return out

    # -- forgetting --------------------------------------------------------------------------

    @_guarded
    def forget_intents(self, space: str, intent_ids: Sequence[str]) -> None:
        check_space(space)
        ids = [check_intent_id(i) for i in intent_ids]
        repo = self._repo()
        tip = self._tip(repo, space)
        prefix = self._intent_dir(space)
        gone = []
        for intent_id in ids:
            assert intent_id is not None
            ref = prefix + intent_key(intent_id)
            if self._target(repo, ref) is None:
                continue
            if self._find_intent(space, tip, intent_id) is not None:
                gone.append(ref)  # only applied intents: their events remain
        self._delete(gone)

    def _delete(self, refs: Sequence[str]) -> None:
        """Delete the refs of applied intents, best effort (leftovers are harmless garbage).

        Never through libgit2: deleting a packed ref makes it rewrite `packed-refs` from its
        cache without re-reading it under `packed-refs.lock`, which can roll back refs that a
        concurrent `git pack-refs` (`git gc`) has just packed, a space's tip among them. So:
        a loose ref is unlinked (see `_unlink_loose`); a packed one is dropped from
        `packed-refs` rewritten under `packed-refs.lock` from the file read under that lock,
        as git does. A `packed-refs.lock` held by anyone else leaves it for a later round.
        """
        if not refs:
            return
        packed = set(self._packed_intents())
        try:
            for ref in refs:
                self._unlink_loose(ref)
            in_pack = [r for r in refs if r in packed]
            if in_pack:
                self._unpack(in_pack)
        except OSError as e:
            log.warning("git store %s: applied intents left for later: %s", self.path, e)

    def _unlink_loose(self, ref: str) -> None:
        # Without taking `<ref>.lock`: the ref of an applied intent is garbage whatever happens
        # beside it. A sender retrying the same intent id may record it again (garbage too, swept
        # later); `git pack-refs` may have packed it first (dropped from `packed-refs` below).
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            os.unlink(self._file(ref))

    def _unpack(self, refs: Sequence[str]) -> None:
        """Drop `refs` from `packed-refs` under `packed-refs.lock` (git's own protocol)."""
        packed = os.path.join(self._refs_root, "packed-refs")
        lock = packed + ".lock"
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            return  # `git gc` or another holder rewrites it: later
        done = False
        try:
            try:
                with open(packed, "rb") as f:
                    lines = f.read().splitlines(keepends=True)
            except FileNotFoundError:
                return
            drop = {r.encode() for r in refs}
            kept: list[bytes] = []
            dropping = False
            for line in lines:
                if line.startswith(b"^"):  # the peeled value of the line before
                    if not dropping:
                        kept.append(line)
                    continue
                name = line.partition(b" ")[2].rstrip(b"\r\n")
                dropping = not line.startswith(b"#") and name in drop
                if not dropping:
                    kept.append(line)
            if len(kept) == len(lines):
                return
            os.write(fd, b"".join(kept))
            os.fsync(fd)  # packed-refs holds every packed ref: never expose a partial file
            os.close(fd)
            fd = -1
            os.rename(lock, packed)
            done = True
        finally:
            if fd >= 0:
                os.close(fd)
            if not done:
                os.unlink(lock)

    # -- waiting -----------------------------------------------------------------------------

    def wakes_per_space(self) -> bool:
        """`SpaceWakeups`: True with bells (Linux)."""
        return self._bells is not None and self._bells.working

    def wait_for_change(self, spaces: Sequence[str], timeout: float) -> None:
        from shard_sql.git import lease_ref, space_ref

        self._repo()  # a closed store raises StoreUnavailable
        watched = tuple(sorted({check_space(s) for s in spaces}))
        paths = [os.path.join(self._refs_root, "packed-refs")]
        dirs = []
        for space in watched:
            paths += [self._file(space_ref(space)), self._file(lease_ref(space))]
            dirs.append(self._file(self._intent_dir(space)))

        def stamp() -> _Stamp:
            return (*(_stat(p) for p in paths), *(_names(d) for d in dirs))

        seen: dict[tuple[str, ...], _Stamp] = getattr(self._waits, "seen", None) or {}
        self._waits.seen = seen
        start = time.monotonic()
        deadline = start + max(0.0, timeout)
        now_stamp = stamp()
        cost = time.monotonic() - start
        bells = self._bells
        found = None
        if bells is not None:
            found = bells.watch(self._waits, bells.waited_on(watched, self._awaited()))
        if watched not in seen:
            # A first wait on these spaces: what changed since the caller's look is unknown,
            # so it ends at once (the caller looks again); the next has this stamp to go by.
            if len(seen) >= 64:
                seen.clear()
            seen[watched] = now_stamp
            return
        baseline = seen[watched]
        if found is not None:
            # A ring missed before the watch began (`fresh`) shows in the stamp, looked at
            # every BELL_FALLBACK seconds: its change came after the baseline was taken.
            watch, _fresh = found
            try:
                while now_stamp == baseline:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return
                    rung = watch.rung(min(remaining, wake.BELL_FALLBACK))
                    now_stamp = stamp()
                    if rung:
                        return
            finally:
                if len(seen) >= 64:
                    seen.clear()
                seen[watched] = now_stamp
            return
        delay = POLL_MIN
        try:
            while now_stamp == baseline:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                # At most ~5% of a core, however many spaces a poll stats.
                time.sleep(min(max(delay, 20 * cost), remaining))
                if time.monotonic() - start >= POLL_FAST:
                    delay = min(delay * 2, POLL_MAX)
                t = time.monotonic()
                now_stamp = stamp()
                cost = time.monotonic() - t
        finally:
            if len(seen) >= 64:
                seen.clear()
            seen[watched] = now_stamp


__all__ = ["INTENT_REFS", "GitIntents", "intent_key"]
