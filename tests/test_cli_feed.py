"""`shard-sql feed` and `shard-sql checkpoints`, in-process, on every store that has the feed.

The in-memory store is handed to the command through its URL `memory:` (one store shared by the
test and the command); SQLite files and git repositories run as soon as their adapters have the
feed (`FeedStore`).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shard_sql import InMemoryEventStore, LeaseRegistry, Subscription
from shard_sql.cli import main, stores
from shard_sql.cli.parser import commands
from shard_sql.ports import FeedStore, Transaction
from shard_sql.urls import open_store
from shard_sql.values import Event


class Run:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err

    def lines(self) -> list[Any]:
        return [json.loads(line) for line in self.out.split("\n") if line]


def _sql_store(tmp_path: Path) -> tuple[str, Any]:
    from shard_sql import SqlEventStore

    url = f"sqlite:///{tmp_path}/feed.db"
    return url, SqlEventStore(url)


def _git_store(tmp_path: Path) -> tuple[str, Any]:
    from shard_sql import GitEventStore

    return f"git+file://{tmp_path}/feed.git", GitEventStore(tmp_path / "feed.git")


@pytest.fixture(params=["memory", "sqlite", "git"])
def store(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[FeedStore]:
    if request.param == "memory":
        memory = InMemoryEventStore()
        real = open_store
        monkeypatch.setattr(
            stores,
            "open_store",
            lambda url, **kw: memory if url == "memory:" else real(url, **kw),
        )
        url, opened = "memory:", memory
    else:
        url, opened = (_sql_store if request.param == "sqlite" else _git_store)(tmp_path)
    assert isinstance(opened, FeedStore)  # every adapter has the feed
    monkeypatch.setenv("SHARD_SQL_URL", url)
    yield opened
    close = getattr(opened, "close", None)
    if close is not None:
        close()


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str]) -> Any:
    def go(*argv: str) -> Run:
        code = main(list(argv))
        out, err = capsys.readouterr()
        if code != 0:
            assert len(err.strip().splitlines()) == 1, err
            assert err.startswith("shard-sql: error: "), err
        assert "Traceback" not in err
        return Run(code, out, err)

    return go


def _fill(store: FeedStore) -> list[Event]:
    for i in range(6):
        space = f"s{i % 2}"
        store.append(space, f"t{i % 3}", {"i": i}, expected_seq=store.head(space))
    return store.feed()


def test_commands_are_listed() -> None:
    assert {"feed", "checkpoints"} <= set(commands())


def test_feed_json(run: Any, store: FeedStore) -> None:
    every = _fill(store)
    r = run("feed", "--json")
    assert r.code == 0
    got = r.lines()
    assert [g["position"] for g in got] == [e.position for e in every]
    assert [(g["space"], g["seq"], g["payload"]) for g in got] == [
        (e.space, e.seq, e.payload) for e in every
    ]


def test_feed_after_types_limit(run: Any, store: FeedStore) -> None:
    every = _fill(store)
    after = every[1].position or 0
    r = run("feed", "--after", str(after), "--json")
    assert [g["position"] for g in r.lines()] == [e.position for e in every[2:]]
    want = [e.position for e in every if e.type in ("t0", "t2")]
    for argv in (["--type", "t0", "--type", "t2"], ["--type", "t0", "t2"]):
        r = run("feed", *argv, "--json")
        assert [g["position"] for g in r.lines()] == want
    r = run("feed", "--limit", "2", "--json")
    assert [g["position"] for g in r.lines()] == [e.position for e in every[:2]]


def test_feed_table(run: Any, store: FeedStore) -> None:
    every = _fill(store)
    r = run("feed")
    assert r.code == 0
    lines = r.out.splitlines()
    assert lines[0].split()[:3] == ["POSITION", "SPACE", "SEQ"]
    assert len(lines) == 1 + len(every)
    assert lines[1].split()[:3] == [str(every[0].position), every[0].space, "0"]


def test_empty_feed_prints_nothing(run: Any, store: FeedStore) -> None:
    r = run("feed")
    assert r.code == 0 and r.out == ""


def test_feed_follow_until_limit(run: Any, store: FeedStore) -> None:
    def writer() -> None:
        for n in range(3):
            time.sleep(0.05)
            store.append("later", "t", {"n": n}, expected_seq=n)

    thread = threading.Thread(target=writer)
    thread.start()
    r = run("feed", "--follow", "--limit", "3", "--json", "--interval", "0.1")
    thread.join()
    assert r.code == 0 and [g["payload"]["n"] for g in r.lines()] == [0, 1, 2]


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (["feed", "--after", "-1"], 2, "'-1' must be >= 0"),
        (["feed", "--after", "x"], 2, "'x' is not an integer"),
        (["feed", "--type", ""], 2, "invalid type"),
        (["feed", "--interval", "0"], 2, "'0' must be > 0"),
    ],
)
def test_feed_usage_errors(
    run: Any, store: FeedStore, argv: list[str], code: int, message: str
) -> None:
    r = run(*argv)
    assert r.code == code and message in r.err


def test_checkpoints(run: Any, store: FeedStore) -> None:
    r = run("checkpoints")
    assert r.code == 0 and "no checkpoints yet" in r.out
    every = _fill(store)
    registry = LeaseRegistry(store)

    def handler(tx: Transaction, events: list[Event]) -> None:
        pass

    with Subscription(store, "projector", handler, registry=registry, node_id="node-1") as sub:
        sub.run_once()
        with store.transaction() as tx:
            tx.save_checkpoint("relay", every[1].position or 0)
        r = run("checkpoints", "--json")
        assert r.code == 0
        rows = {row["name"]: row for row in r.lines()}
        assert set(rows) == {"projector", "relay"}
        assert rows["projector"]["lag"] == 0 and rows["projector"]["holder"] == "node-1"
        assert rows["relay"]["position"] == every[1].position
        assert rows["relay"]["lag"] == store.feed_head() - (every[1].position or 0)
        assert rows["relay"]["holder"] is None
        r = run("checkpoints")
        assert r.out.splitlines()[0].split() == ["NAME", "POSITION", "LAG", "HOLDER"]
        assert "node-1" in r.out
    r = run("checkpoints", "--json")
    assert {row["name"]: row["holder"] for row in r.lines()} == {"projector": None, "relay": None}
