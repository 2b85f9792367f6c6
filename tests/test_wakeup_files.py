"""Wake-up files (`shard_sql.wake`): the per-space wake-ups of forwarding on the stores without
notifications, SQLite files and git repositories, on Linux."""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from shard_sql import GitEventStore, SqlEventStore
from shard_sql.validation import pending
from shard_sql.wake import EVENTS_WRITTEN, INTENT_RECORDED, WakeupFiles

STORES: dict[str, Callable[[Path], Any]] = {
    "sqlite": lambda d: SqlEventStore(f"sqlite:///{d}/shard.db"),
    "git": lambda d: GitEventStore(d / "log.git"),
}
WAKEUP_DIRS = {"sqlite": "shard.db-wakeups", "git": "log.git/shard-sql-wakeups"}


@pytest.mark.parametrize("kind", sorted(STORES))
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify is Linux's")
def test_wakeup_files(kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SQLite and git on Linux: a holder's wait sleeps on its spaces' intent wake-up files, a
    forwarder's on the event file of the space it awaits; a forwarded intent's put signals the
    first, the write of events with intent ids the second, each after its commit. With the
    `data_version` look pushed out of reach, only a signal can end these waits."""
    import shard_sql.wake as wake_module

    open_ = STORES[kind]
    with open_(tmp_path) as holder, open_(tmp_path) as fwd:
        # Where the stores keep theirs:
        files = WakeupFiles.if_supported(str(tmp_path / WAKEUP_DIRS[kind]))
        assert files is not None
        intent_file = Path(files.path(INTENT_RECORDED, "s"))
        event_file = Path(files.path(EVENTS_WRITTEN, "s"))
        holder.wait_for_change(["s"], 0)  # the first wait: the file is made
        assert intent_file.exists() and not event_file.exists()  # files are made by waiters only
        monkeypatch.setattr(wake_module, "WAKEUP_POLL_FALLBACK", 60.0)
        stamp = intent_file.stat().st_mtime_ns
        watching, found = threading.Event(), []

        def forwarder() -> None:
            fwd.put_intent("s", pending("t", {}, "k1"), holder="h")
            fwd.wait_for_change(["s"], 0.1)  # its first: the event file is made
            watching.set()
            fwd.wait_for_change(["s"], 60)
            found.append(fwd.find_intent("s", "k1"))

        thread = threading.Thread(target=forwarder)
        thread.start()
        t0 = time.monotonic()
        holder.wait_for_change(["s"], 60)  # ended by the put's signal, not the timeout
        assert time.monotonic() - t0 < 30
        assert intent_file.stat().st_mtime_ns > stamp
        [item] = holder.pending_intents("s", limit=10)
        assert watching.wait(10) and event_file.exists()
        stamp = event_file.stat().st_mtime_ns
        time.sleep(0.01)  # past the file system's timestamp granularity
        holder.append("s", "t", {}, expected_seq=0)  # no intent id: nobody waits, no signal
        assert event_file.stat().st_mtime_ns == stamp
        holder.write("s", [item], expected_seq=1, fence=None)
        thread.join(30)  # a forwarder's wait left to its 60 s timeout would still be running
        assert not thread.is_alive() and found[0] is not None and found[0].seq == 1
        assert event_file.stat().st_mtime_ns > stamp
        # A signal between a caller's look and its next wait ends that wait at once.
        files.signal(INTENT_RECORDED, "s")
        t0 = time.monotonic()
        holder.wait_for_change(["s"], 60)
        assert time.monotonic() - t0 < 30


def test_sqlite_uri_filename_wakeup_files_beside_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A `file:` URI filename (`uri=true`) puts the wake-up files beside that file, not under a
    directory called `file:` in the working directory."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    url = f"sqlite:///file:{tmp_path}/data/u.db?uri=true"
    with SqlEventStore(url) as store:
        store.wait_for_change(["s"], 0)
        files = WakeupFiles.if_supported(f"{tmp_path}/data/u.db-wakeups")
        if files is not None:  # Linux: the store made its file there
            assert Path(files.path(INTENT_RECORDED, "s")).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


@pytest.mark.parametrize("kind", sorted(STORES))
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify is Linux's")
def test_wakeup_files_removed_under_a_waiter(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The wake-up directory removed while a thread waits on it (an operator's cleanup): that
    wait ends, the next one makes the files again, and signals reach it."""
    import shutil

    import shard_sql.wake as wake_module

    open_ = STORES[kind]
    with open_(tmp_path) as holder, open_(tmp_path) as fwd:
        # Where the stores keep theirs:
        files = WakeupFiles.if_supported(str(tmp_path / WAKEUP_DIRS[kind]))
        assert files is not None
        holder.wait_for_change(["s"], 0)
        assert Path(files.path(INTENT_RECORDED, "s")).exists()
        monkeypatch.setattr(wake_module, "WAKEUP_POLL_FALLBACK", 60.0)
        timer = threading.Timer(0.05, shutil.rmtree, args=(files.dir,))
        timer.start()
        t0 = time.monotonic()
        holder.wait_for_change(["s"], 60)  # ended by the removal, not the timeout
        assert time.monotonic() - t0 < 30
        timer.join()
        holder.wait_for_change(["s"], 0)  # watches anew
        assert Path(files.path(INTENT_RECORDED, "s")).exists()
        timer = threading.Timer(
            0.05, lambda: fwd.put_intent("s", pending("t", {}, "k"), holder="h")
        )
        timer.start()
        t0 = time.monotonic()
        holder.wait_for_change(["s"], 60)
        assert time.monotonic() - t0 < 30
        timer.join()
        assert [p.intent_id for p in holder.pending_intents("s", limit=10)] == ["k"]


def test_a_watch_closes_its_descriptor_once(tmp_path: Path) -> None:
    """Closed, then collected: the second close must not hit a descriptor number reused by
    another file meanwhile."""
    from shard_sql.wake import Inotify

    watch = Inotify(os.open(os.devnull, os.O_RDONLY))
    watch.close()
    assert watch.fd == -1 and not watch.alive
    other = os.open(tmp_path / "f", os.O_CREAT | os.O_WRONLY)  # may reuse the number
    try:
        del watch
        os.write(other, b"still open")
    finally:
        os.close(other)


def test_sqlite_file_of_uri_filenames() -> None:
    """https://www.sqlite.org/uri.html: authority, percent-encoding, query and fragment."""
    from sqlalchemy.engine import make_url

    from shard_sql.sql import sqlite_file

    def of(url: str) -> str | None:
        return sqlite_file(make_url(url))

    assert of("sqlite:///rel/a.db") == "rel/a.db"
    assert of("sqlite:////abs/a.db") == "/abs/a.db"
    assert of("sqlite:///file:/abs/a%20b.db?uri=true") == "/abs/a b.db"
    assert of("sqlite:///file://localhost/abs/a.db?mode=ro&uri=true") == "/abs/a.db"
    assert of("sqlite:///file:///abs/a.db?uri=true") == "/abs/a.db"
    assert of("sqlite:///file:/abs/a.db?uri=true") == "/abs/a.db"
    assert of("sqlite://") is None and of("sqlite:///:memory:") is None


def test_readable_takes_descriptors_past_1024() -> None:
    """`select` refuses descriptor numbers of 1024 and above; the waits use `poll`."""
    import resource

    from shard_sql.wake import readable

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"the hard limit of open files is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
    r, w = os.pipe()
    high = os.dup2(r, 1100)
    try:
        assert readable([high], 0) == []
        os.write(w, b"x")
        assert readable([high], 1) == [high]
    finally:
        for fd in (r, w, high):
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_signal_to_a_missing_file_creates_nothing_and_reaches_one_made_later(
    tmp_path: Path,
) -> None:
    files = WakeupFiles(str(tmp_path))
    path = Path(files.path(EVENTS_WRITTEN, "s"))
    files.signal(EVENTS_WRITTEN, "s")  # nobody waits: no file, no error
    assert not path.exists()
    path.touch()
    os.utime(path, ns=(0, 0))
    files.signal(EVENTS_WRITTEN, "s")
    assert path.stat().st_mtime_ns > 0
