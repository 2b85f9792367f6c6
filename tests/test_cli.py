"""The command line in-process: every command and error path, on SQLite files.

`main()` runs in this process; `stores["NAME"]` is a store the test opens on the file that
`stores.url("NAME")` names for the command. tests/test_cli_process.py drives the installed
command against SQLite, PostgreSQL and git.
"""

from __future__ import annotations

import dataclasses
import io
import json
import sys
import types
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from shard_sql import LeaseRegistry, SqlEventStore
from shard_sql.cli import bench, main
from shard_sql.cli.events import default_node_id
from shard_sql.cli.output import human_time, progress
from shard_sql.cli.parser import build_parser, commands
from shard_sql.cli.stores import display_url
from shard_sql.urls import StoreNotFound, open_store
from shard_sql.validation import pending

UNREACHABLE = "postgresql+psycopg://nobody@127.0.0.1:1/x"


class Run:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err

    def lines(self) -> list[Any]:
        """JSON lines: split at "\\n" only (a payload may hold other line breaks, as JSON may)."""
        return [json.loads(line) for line in self.out.split("\n") if line]


class Stores:
    """SQLite files by name: `url(name)` for the command, `[name]` a store on it for the test."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.opened: dict[str, SqlEventStore] = {}

    def url(self, name: str) -> str:
        return f"sqlite:///{self.root}/{name}.db"

    def __getitem__(self, name: str) -> SqlEventStore:
        if name not in self.opened:
            self.opened[name] = SqlEventStore(self.url(name))
        return self.opened[name]

    def close(self) -> None:
        for store in self.opened.values():
            store.close()


@pytest.fixture
def stores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Stores]:
    opened = Stores(tmp_path)
    monkeypatch.setenv("SHARD_SQL_URL", opened.url("main"))
    opened["main"]  # exists: commands that only read need a store
    yield opened
    opened.close()


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str], stores: Stores) -> Iterator[Any]:
    def go(*argv: str, stdin: str | None = None) -> Run:
        if stdin is not None:
            sys.stdin = io.TextIOWrapper(io.BytesIO(stdin.encode()), encoding="utf-8")
        try:
            code = main(list(argv))
        finally:
            sys.stdin = sys.__stdin__
        out, err = capsys.readouterr()
        if code != 0:
            assert len(err.strip().splitlines()) == 1, err
            assert err.startswith("shard-sql: error: "), err
        assert "Traceback" not in err
        return Run(code, out, err)

    yield go


def main_store(stores: Stores) -> SqlEventStore:
    return stores["main"]


# -- help ----------------------------------------------------------------------------------------


def test_every_command_has_a_description_and_an_example() -> None:
    parser = build_parser()
    every = commands(parser)
    assert set(every) >= {
        "migrate",
        "append",
        "log",
        "spaces",
        "lease",
        "verify",
        "export",
        "import",
        "copy",
        "bench",
    }
    assert parser.description and "shard-sql append" in (parser.epilog or "")
    for name, sub in every.items():
        assert sub.description and len(sub.description) > 30, name
        assert sub.epilog and "examples:" in sub.epilog, name
        assert f"shard-sql {name}" in sub.epilog, name
        help_text = sub.format_help()
        assert "--url" in help_text and "--json" in help_text, name


def test_help_exits_zero(run: Any) -> None:
    r = run("--help")
    assert r.code == 0 and "append" in r.out
    r = run("log", "--help")
    assert r.code == 0 and "--follow" in r.out and "examples:" in r.out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "the following arguments are required: COMMAND"),
        (["nope"], "invalid choice: 'nope'"),
        (["append", "s"], "the following arguments are required: TYPE, PAYLOAD_JSON"),
        (["log", "s", "--from-seq", "-1"], "'-1' must be >= 0"),
        (["log", "s", "--limit", "x"], "'x' is not an integer"),
        (["append", "s", "t", "{}", "--timeout", "0"], "'0' must be > 0"),
    ],
)
def test_usage_errors(run: Any, argv: list[str], message: str) -> None:
    r = run(*argv)
    assert r.code == 2 and message in r.err


# -- append and log ------------------------------------------------------------------------------


def test_append_and_log(run: Any, stores: Stores) -> None:
    r = run("append", "demo", "page.created", '{"title": "Home"}')
    assert r.code == 0 and r.out.startswith("demo seq 0: page.created (writer cli-")
    r = run("append", "demo", "alias.set", '{"alias": "index", "n": [1, {"x": null}]}', "--json")
    event = r.lines()[0]
    assert event["seq"] == 1 and event["payload"] == {"alias": "index", "n": [1, {"x": None}]}
    assert event["writer"].startswith("cli-") and event["generation"] == 2
    # Each CLI append released its lease: the space is free again.
    assert LeaseRegistry(main_store(stores)).current("demo") is None

    r = run("log", "demo")
    assert r.code == 0
    header, *rows = r.out.splitlines()
    assert header.split()[:3] == ["SEQ", "RECORDED", "(UTC)"]
    assert len(rows) == 2 and rows[0].startswith("0 ") and '{"title":"Home"}' in rows[0]
    r = run("log", "demo", "--json")
    assert [e["seq"] for e in r.lines()] == [0, 1]
    got = r.lines()[0]
    assert set(got) == {
        "space",
        "seq",
        "type",
        "payload",
        "recorded_at",
        "writer",
        "generation",
        "intent_id",
    }
    assert datetime.fromisoformat(got["recorded_at"]).tzinfo is not None
    r = run("log", "demo", "--from-seq", "1", "--limit", "5", "--json")
    assert [e["seq"] for e in r.lines()] == [1]
    r = run("log", "demo", "--from-seq", "9")
    assert r.code == 0 and r.out == ""


def test_append_options(run: Any, stores: Stores) -> None:
    r = run(
        "append", "s", "t", "-", "--intent-id", "req-1", "--node", "ops", "--json", stdin='{"a": 1}'
    )
    first = r.lines()[0]
    assert (first["writer"], first["intent_id"], first["payload"]) == ("ops", "req-1", {"a": 1})
    again = run("append", "s", "t", '{"a": 1}', "--intent-id", "req-1", "--json").lines()[0]
    assert again == first
    assert main_store(stores).head("s") == 1


def test_many_appends_page_through_log(run: Any, stores: Stores) -> None:
    store = main_store(stores)
    store.append_many("big", [("t", {"i": i}) for i in range(2500)], expected_seq=0)
    r = run("log", "big", "--json")
    assert [e["seq"] for e in r.lines()] == list(range(2500))
    r = run("log", "big", "--from-seq", "100", "--limit", "1500")
    assert len(r.out.splitlines()) == 1501


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ("{bad", "PAYLOAD_JSON is not valid JSON"),
        ("[1, 2]", "PAYLOAD_JSON must be a JSON object, not an array"),
        ('"x"', "not a string"),
        ("3", "not a number"),
        ("null", "not null"),
        ('{"x": NaN}', "NaN is not allowed"),
        ('{"x": -Infinity}', "-Infinity is not allowed"),
        ('{"x": "\\u0000"}', "invalid payload: contains a NUL character"),
    ],
)
def test_bad_payloads(run: Any, stores: Stores, payload: str, message: str) -> None:
    r = run("append", "s", "t", payload)
    assert r.code == 2 and message in r.err
    assert main_store(stores).spaces() == []


def test_bad_names(run: Any) -> None:
    r = run("append", "", "t", "{}")
    assert r.code == 2 and "invalid space: must not be empty" in r.err
    r = run("append", "s", "bad\ntype", "{}")
    assert r.code == 2 and "invalid type" in r.err
    r = run("append", "s", "t", "{}", "--node", "x\ty")
    assert r.code == 2 and "invalid node" in r.err
    r = run("log", "a\x00b")
    assert r.code == 2 and "invalid space" in r.err


def test_unknown_space(run: Any) -> None:
    r = run("log", "nowhere")
    assert r.code == 1 and "unknown space 'nowhere': it has no events" in r.err
    r = run("export", "nowhere")
    assert r.code == 1 and "unknown space 'nowhere'" in r.err
    r = run("verify", "nowhere")
    assert r.code == 1 and "unknown space 'nowhere'" in r.err


def test_store_errors_are_one_line(run: Any) -> None:
    r = run("--url", UNREACHABLE, "spaces")
    assert r.code == 1 and "cannot connect to PostgreSQL at 127.0.0.1:1" in r.err


def test_url_option_after_the_command(run: Any, stores: Stores) -> None:
    assert run("append", "s", "t", "{}", "--url", stores.url("other")).code == 0
    assert stores["other"].head("s") == 1
    assert run("--url", stores.url("other"), "log", "s").code == 0
    assert run("log", "s").code == 1  # SHARD_SQL_URL: main


def test_held_space_forwards_then_times_out(run: Any, stores: Stores) -> None:
    store = main_store(stores)
    LeaseRegistry(store).acquire("s", "other-node", 60)
    r = run("append", "s", "t", "{}", "--no-forward")
    assert r.code == 3 and "space 's' is held by 'other-node'" in r.err
    r = run("append", "s", "t", "{}", "--timeout", "0.2", "--intent-id", "k")
    assert r.code == 3 and "no holder wrote the append within 0.2s" in r.err and "(k)" in r.err
    assert store.head("s") == 0


# -- spaces and leases ---------------------------------------------------------------------------


def test_spaces(run: Any, stores: Stores) -> None:
    assert run("spaces").out == "no spaces yet\n"
    assert run("spaces", "--json").out == ""
    store = main_store(stores)
    store.append_many("b", [("t", {}), ("t", {})], expected_seq=0)
    store.append("a", "t", {}, expected_seq=0)
    LeaseRegistry(store).acquire("b", "node-1", 60)
    r = run("spaces")
    lines = r.out.splitlines()
    assert lines[0].split() == ["SPACE", "HEAD", "HOLDER", "GEN", "TIME", "LEFT"]
    assert lines[1].split() == ["a", "1", "-", "-", "-"]
    assert lines[2].split()[:4] == ["b", "2", "node-1", "1"]
    rows = run("spaces", "--json").lines()
    assert [(x["space"], x["head"], x["holder"]) for x in rows] == [
        ("a", 1, None),
        ("b", 2, "node-1"),
    ]


def test_lease_show_and_revoke(run: Any, stores: Stores) -> None:
    assert "s: no valid lease" in run("lease", "s").out
    assert run("lease", "s", "--json").lines() == [
        {
            "space": "s",
            "held": False,
            "holder": None,
            "generation": None,
            "expires_at": None,
            "seconds_left": None,
        }
    ]
    assert "nothing to revoke" in run("lease", "s", "--revoke").out
    registry = LeaseRegistry(main_store(stores))
    lease = registry.acquire("s", "node-1", 60)
    r = run("lease", "s")
    header, row = r.out.splitlines()
    assert header.split()[:3] == ["SPACE", "HOLDER", "GEN"]
    assert row.split()[:3] == ["s", "node-1", "1"] and row.endswith("s")
    shown = run("lease", "s", "--json").lines()[0]
    assert shown["held"] and shown["holder"] == "node-1" and 58 < shown["seconds_left"] <= 60
    r = run("lease", "s", "--revoke", "--json")
    assert r.lines() == [
        {"space": "s", "revoked": True, "previous_holder": "node-1", "generation": 2}
    ]
    assert registry.current("s") is None
    assert registry.acquire("s", "node-2", 60).generation == 3
    assert lease.generation == 1


# -- verify --------------------------------------------------------------------------------------


def test_verify(run: Any, stores: Stores) -> None:
    r = run("verify")
    assert r.code == 0 and r.out.strip() == "ok: 0 spaces, 0 events, 0 violations"
    run("append", "s", "t", "{}")
    run("append", "s", "t", "{}")
    r = run("verify")
    assert r.code == 0 and r.out.splitlines()[-1] == "ok: 1 space, 2 events, 0 violations"
    store = main_store(stores)
    bad = dataclasses.replace(pending("t", {}), writer="intruder", generation=1)
    store.write("s", [bad], expected_seq=2, fence=None, verify_fence=False)
    r = run("verify")
    assert r.code == 4 and "verify found 2 violations" in r.err
    assert "VIOLATION 's' seq 2: [generation] generation 1 after generation 2" in r.out
    assert "VIOLATION 's' seq 2: [writer] generation 1 written by 'intruder'" in r.out
    report = run("verify", "s", "--json").lines()[0]
    assert report["ok"] is False and report["details"][0]["rule"] == "generation"


# -- export, import, copy ------------------------------------------------------------------------


def fill(store: SqlEventStore) -> None:
    registry = LeaseRegistry(store)
    lease = registry.acquire("wiki", "node-a", 60)
    store.append("wiki", "page.created", {"t": "Home", "ü": [1, 2.5]}, expected_seq=0, fence=lease)
    store.append("wiki", "alias.set", {}, expected_seq=1, fence=lease, intent_id="i-1")
    registry.revoke("wiki")
    lease = registry.acquire("wiki", "node-b", 60)
    store.append("wiki", "page.edited", {"n": 1}, expected_seq=2, fence=lease)
    store.append_many("other", [("t", {"i": i}) for i in range(1200)], expected_seq=0)


def test_export_import_round_trip(run: Any, stores: Stores, tmp_path: Path) -> None:
    source = main_store(stores)
    fill(source)
    r = run("export")
    lines = r.out.splitlines()
    assert len(lines) == 1203 and json.loads(lines[0])["space"] == "other"
    dump = tmp_path / "log.jsonl"
    r = run("export", "--file", str(dump), "--json")
    assert r.lines() == [{"exported": 1203, "spaces": 2, "file": str(dump)}]
    assert dump.read_text().splitlines() == lines

    r = run("import", "--url", stores.url("copy"), "--file", str(dump))
    assert r.code == 0 and r.out == "imported 1203 events into 2 spaces\n"
    target = stores["copy"]
    for space in ("wiki", "other"):
        assert target.events(space) == source.events(space)
    assert target.events("wiki")[2].writer == "node-b"
    assert target.events("wiki")[2].generation == 3
    # Again: everything is there already and identical.
    r = run("import", "--url", stores.url("copy"), "--json", stdin=dump.read_text())
    assert r.lines() == [{"imported": 0, "skipped": 1203, "spaces": 2}]
    # One space only, to a third store, through stdin.
    wiki = run("export", "wiki").out
    r = run("import", "--url", stores.url("third"), stdin=wiki)
    assert stores["third"].spaces() == ["wiki"]


def test_import_errors(run: Any, stores: Stores, tmp_path: Path) -> None:
    fill(main_store(stores))
    good = run("export", "wiki").out.splitlines()
    r = run("import", "--url", stores.url("t"), stdin=good[0] + "\n{oops\n")
    assert r.code == 2 and "stdin line 2: not valid JSON" in r.err
    assert stores["t"].head("wiki") == 0  # the batch never reached the store
    r = run("import", "--url", stores.url("t"), stdin="\n".join([good[0], good[2]]))
    assert r.code == 1 and "stdin line 2: space 'wiki' seq 2 does not follow seq 0" in r.err
    r = run("import", "--url", stores.url("t"), stdin=good[1])
    assert r.code == 1 and "starts at seq 1, but the target's head is 0" in r.err
    obj = json.loads(good[0])
    changes: list[tuple[dict[str, Any], str]] = [
        ({"payload": [1]}, "invalid payload"),
        ({"recorded_at": "2026-01-01T00:00:00"}, "has no time zone"),
        ({"recorded_at": "yesterday"}, "is not an ISO 8601 time"),
        ({"generation": -1}, "invalid generation"),
        ({"seq": "0"}, "invalid seq"),
        ({"writer": 5}, "invalid writer"),
    ]
    for change, message in changes:
        r = run("import", "--url", stores.url("t"), stdin=json.dumps({**obj, **change}))
        assert r.code == 2 and message in r.err, (change, r.err)
    del obj["type"]
    r = run("import", "--url", stores.url("t"), stdin=json.dumps(obj) + "\n")
    assert r.code == 2 and "stdin line 1: missing type" in r.err
    r = run("import", "--url", stores.url("t"), stdin="[1]")
    assert r.code == 2 and "expected a JSON object, not an array" in r.err
    # A different log already in the target.
    stores["t"].append("wiki", "other.type", {}, expected_seq=0)
    r = run("import", "--url", stores.url("t"), stdin="\n".join(good))
    assert r.code == 1 and "seq 0 differs from the event already in the target" in r.err
    r = run("import", "--file", str(tmp_path / "missing.jsonl"))
    assert r.code == 1 and "missing.jsonl: No such file or directory" in r.err


def test_duplicate_intent_in_import(run: Any, stores: Stores) -> None:
    fill(main_store(stores))
    lines = [json.loads(x) for x in run("export", "wiki").out.splitlines()]
    lines[2]["intent_id"] = "i-1"
    r = run("import", "--url", stores.url("t"), stdin="\n".join(json.dumps(x) for x in lines))
    assert r.code == 1 and "intent_id 'i-1' appears twice in space 'wiki'" in r.err


def test_copy(run: Any, stores: Stores) -> None:
    source = main_store(stores)
    fill(source)
    r = run("copy", "wiki", "--to", stores.url("dst"))
    assert r.code == 0 and r.out == "imported 3 events into 1 space\n"
    assert stores["dst"].events("wiki") == source.events("wiki")
    r = run("copy", "--to", stores.url("dst"), "--json")
    assert r.lines() == [{"imported": 1200, "skipped": 3, "spaces": 2}]
    assert stores["dst"].events("other") == source.events("other")
    r = run("copy", "--to", stores.url("main"))
    assert r.code == 2 and "--to names the source store itself" in r.err
    r = run("copy", "--to", UNREACHABLE)
    assert r.code == 1 and "cannot connect to PostgreSQL" in r.err


# -- bench ---------------------------------------------------------------------------------------


def test_bench_table_and_json(run: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bool] = []

    def fake_run(*, quick: bool = False) -> list[dict[str, Any]]:
        calls.append(quick)
        return [
            {"work": "append", "figure": 900.0, "baseline": 1000.0, "target": 0.85, "unit": "ev/s"},
            {"work": "read", "figure": 5.0, "baseline": 10.0, "ratio": 0.5, "target": 1.0},
            {"work": "abs", "figure": 400.0, "baseline": None, "target": 300.0, "ok": True},
            {"work": "pg", "figure": None, "baseline": None, "note": "no server"},
            {"work": "lat", "figure": 150.0, "baseline": 100.0, "target": 2.0, "at_most": True},
            {"work": "slow", "figure": 250.0, "baseline": 100.0, "target": 2.0, "at_most": True},
        ]

    module = types.ModuleType("shard_sql.bench.sql_bench")
    module.run = fake_run  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "shard_sql.bench.sql_bench", module)
    r = run("bench", "--only", "sql", "--quick")
    assert r.code == 0 and calls == [True]
    header, first, second, absolute, skipped, latency, slow = r.out.splitlines()
    assert header.split() == [
        "WORK",
        "FIGURE",
        "BASELINE",
        "RATIO",
        "TARGET",
        "MARK",
        "UNIT",
        "NOTE",
    ]
    assert first.split() == ["append", "900", "1,000", "0.90x", "0.85x", "pass", "ev/s"]
    assert second.split()[-2:] == ["1x", "short"]
    assert absolute.split()[1:] == ["400", "-", "-", ">=", "300", "pass"]
    assert skipped.split() == ["pg", "-", "-", "-", "-", "-", "no", "server"]
    # Lower is better (at_most): the ratio judged <= the target.
    assert latency.split()[1:] == ["150", "100", "1.50x", "<=", "2x", "pass"]
    assert slow.split()[1:] == ["250", "100", "2.50x", "<=", "2x", "short"]
    rows = run("bench", "--only", "sql", "--json").lines()
    assert rows[0]["ratio"] == pytest.approx(0.9) and rows[1]["ok"] is False
    assert [(r["at_most"], r["ok"]) for r in rows[4:]] == [(True, True), (True, False)]


def test_bench_without_runners(run: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench, "load_suite", lambda name: None)
    r = run("bench")
    assert r.code == 1 and "no benchmark suites installed" in r.err
    r = run("bench", "--only", "nope")
    assert r.code == 2 and "unknown suite 'nope' (known: sql, git" in r.err


def test_bench_suites_are_discovered() -> None:
    suites = bench.suites()
    assert list(suites)[:2] == ["sql", "git"]
    root = Path(__file__).resolve().parent.parent  # the source, installed as shard_sql.bench
    for f in (root / "benchmarks").glob("*_bench.py"):
        assert suites[f.stem.removesuffix("_bench")] == f"shard_sql.bench.{f.stem}"


# -- odds and ends -------------------------------------------------------------------------------


def test_unexpected_errors_are_one_line(
    run: Any, stores: Stores, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(self: SqlEventStore) -> list[str]:
        raise RuntimeError("kaput\nsecond line")

    main_store(stores)  # created
    monkeypatch.setattr(SqlEventStore, "spaces", boom)
    r = run("spaces")
    assert r.code == 1
    assert r.err == (
        "shard-sql: error: unexpected RuntimeError: kaput second line "
        "(set SHARD_SQL_DEBUG=1 for the traceback)\n"
    )


def test_progress_bar_only_on_a_terminal() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    quiet = io.StringIO()
    with progress("x", 10, stream=quiet) as bar:
        bar.advance(5)
    assert quiet.getvalue() == ""
    tty = Tty()
    with progress("export", 4, stream=tty) as bar:
        bar.advance(4)
    drawn = tty.getvalue()
    assert "export" in drawn and "100%" in drawn and "4/4" in drawn


def test_display_url_hides_passwords() -> None:
    assert display_url("postgresql+psycopg://u:secret@h/db") == ("postgresql+psycopg://u:***@h/db")
    assert display_url("git+file:///x") == "git+file:///x"
    shown = display_url("postgresql+psycopg://u:secret@h/db?sslpassword=s3cr3t&password=pw")
    assert "secret" not in shown and "s3cr3t" not in shown and "=pw" not in shown


def test_default_node_id() -> None:
    node = default_node_id()
    assert node.startswith("cli-") and node.endswith(f"-{__import__('os').getpid()}")


def test_times_are_utc() -> None:
    t = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    assert human_time(t) == "2026-01-02 03:04:05.678Z"


def test_url_errors(run: Any, tmp_path: Path) -> None:
    r = run("spaces", "--url", "")
    assert r.code == 2 and "--url must not be empty" in r.err
    (tmp_path / "shard.db").write_bytes(b"SQLite format 3\x00")
    r = run("spaces", "--url", str(tmp_path / "shard.db"))
    assert r.code == 1
    assert f"{tmp_path}/shard.db is a file, not a git repository; for a SQLite file use " in r.err


def test_follow_until_limit(run: Any, stores: Stores) -> None:
    """--follow waits for events of an empty space; --limit ends it (Ctrl-C: test_cli_process)."""
    import threading
    import time

    store = main_store(stores)

    def writer() -> None:
        for n in range(3):
            time.sleep(0.05)
            store.append("later", "t", {"n": n}, expected_seq=n)

    thread = threading.Thread(target=writer)
    thread.start()
    r = run("log", "later", "--follow", "--limit", "3", "--json", "--interval", "0.1")
    thread.join()
    assert r.code == 0 and [e["payload"]["n"] for e in r.lines()] == [0, 1, 2]


def test_bench_skips_a_missing_suite(
    capsys: pytest.CaptureFixture[str], stores: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Row:
        work, figure, baseline, target = "read", 2.0, 1.0, 1.0

    module = types.SimpleNamespace(__name__="shard_sql.bench.sql_bench", run=lambda: [Row()])
    monkeypatch.setattr(
        bench, "load_suite", lambda name: module if name == "shard_sql.bench.sql_bench" else None
    )
    monkeypatch.setattr(bench, "suites", lambda: dict(bench.SUITES))
    assert main(["bench", "--json"]) == 0
    out, err = capsys.readouterr()
    assert err == "shard-sql: note: shard_sql.bench.git_bench not found; skipped\n"
    assert json.loads(out)["ok"] is True and json.loads(out)["ratio"] == 2.0

    def broken(name: str) -> None:
        raise ModuleNotFoundError("No module named 'eventsourcing'")

    monkeypatch.setattr(bench, "load_suite", broken)
    assert main(["bench", "--only", "git"]) == 1
    assert capsys.readouterr().err == (
        "shard-sql: error: cannot import shard_sql.bench.git_bench: "
        "No module named 'eventsourcing'\n"
    )


def test_bench_runs_perf_by_default(run: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    def suite(name: str) -> Any:
        def rows(*, quick: bool = False, url: str | None = None) -> list[dict[str, Any]]:
            return [
                {
                    "work": f"{name} append",
                    "backend": "sqlite FULL",
                    "vs": "raw driver insert",
                    "figure": 90.0,
                    "baseline": 100.0,
                    "ratio": 0.9,
                    "target": 0.85,
                    "target_text": ">= 0.85x",
                    "unit": "events/s",
                    "ok": True,
                    "note": "",
                }
            ]

        return types.SimpleNamespace(__name__=f"shard_sql.bench.{name}_bench", run=rows)

    suites = {n: f"shard_sql.bench.{n}_bench" for n in ("sql", "git", "perf")}
    monkeypatch.setattr(bench, "suites", lambda: dict(suites))
    monkeypatch.setattr(
        bench, "load_suite", lambda module: suite(module.removeprefix("shard_sql.bench.")[:-6])
    )
    r = run("bench")
    header, row = r.out.splitlines()
    assert header.split()[:3] == ["BACKEND", "WORK", "VS"]
    assert row.split() == [
        *("sqlite", "FULL", "perf", "append", "raw", "driver", "insert"),
        *("90", "100", "0.90x", ">=", "0.85x", "pass", "events/s"),
    ]
    rows = run("bench", "--all", "--json").lines()
    assert [(x["suite"], x["backend"], x["vs"]) for x in rows] == [
        ("sql", "sqlite FULL", "raw driver insert"),
        ("git", "sqlite FULL", "raw driver insert"),
        ("perf", "sqlite FULL", "raw driver insert"),
    ]
    assert run("bench", "--all").out.splitlines()[0].split()[0] == "SUITE"


def test_help_does_not_load_rich_nor_the_adapters() -> None:
    """`shard-sql --help` starts fast: rich, SQLAlchemy and pygit2 load only when used."""
    import subprocess

    code = (
        "import sys\n"
        "from shard_sql.cli import main\n"
        "assert main(['--help']) == 0\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'rich', 'sqlalchemy', 'pygit2'}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.splitlines()[-1] == "[]"


def test_every_subpackage_is_listed_in_pyproject() -> None:
    """A subpackage missing from `packages` is missing from the wheel."""
    import tomllib

    root = Path(__file__).resolve().parent.parent
    listed = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    found = {
        ".".join(init.parent.relative_to(root).parts)
        for init in (root / "shard_sql").rglob("__init__.py")
        if "__pycache__" not in init.parts
    }
    assert found <= set(listed)


def test_tables_fit_120_columns(run: Any, stores: Stores) -> None:
    long_space, long_type = "s" * 200, "t" * 150
    payload = {"text": "x" * 500}
    main_store(stores).append(long_space, long_type, payload, expected_seq=0)
    LeaseRegistry(main_store(stores)).acquire(long_space, "h" * 200, 60)
    for argv in (["log", long_space], ["spaces"], ["lease", long_space], ["verify"]):
        r = run(*argv)
        assert r.code == 0 and max(len(line) for line in r.out.splitlines()) <= 120, argv
    _, row = run("log", long_space).out.splitlines()
    assert row.endswith("…") and '{"text":"xxx' in row  # the payload is cut, on one line
    assert run("log", long_space, "--json").lines()[0]["payload"] == payload  # JSON: whole
    shown = run("spaces").out
    assert shown.count("h") == 200 and shown.count("s") >= 200  # long names wrap, whole


def test_log_escapes_terminal_control_characters(run: Any, stores: Stores) -> None:
    """A payload cannot drive the reader's terminal: right-to-left overrides, C1 controls (CSI,
    NEL), ESC, line separators and invisible format characters are shown escaped."""
    hostile = "\u202eevil\x1b[2J\x9b31m\x85\u2028\u200b\x07"
    family = "\U0001f468\u200d\U0001f469\u200d\U0001f467"  # a ZWJ sequence: kept whole
    main_store(stores).append_many(
        "s", [("t", {"x": hostile}), ("t", {"f": family})], expected_seq=0
    )
    out = run("log", "s").out
    assert not set(out) & set("\u202e\x1b\x9b\x85\u2028\u200b\x07")
    assert "\\u202eevil\\u001b[2J\\u009b31m\\u0085\\u2028\\u200b\\u0007" in out
    assert family in out
    assert run("log", "s", "--json").lines()[0]["payload"] == {"x": hostile}  # JSON: as written


@pytest.mark.parametrize(
    "url", ["postgresql:/h/db", "postgres//h/db", "sqlite//shard.db", "memory", "::::", "new-dir"]
)
def test_a_mistyped_url_is_refused(
    run: Any, url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not a git store in the current directory: a git store comes from git+file:// or an
    existing repository."""
    here = tmp_path / "cwd"
    here.mkdir()
    monkeypatch.chdir(here)
    for argv in (["append", "s", "t", "{}"], ["migrate"], ["spaces"]):
        r = run(*argv, "--url", url)
        assert r.code == 2 and "invalid url" in r.err, (argv, r.err)
    assert list(here.iterdir()) == []
    assert "git+file://" in run("append", "s", "t", "{}", "--url", "new-dir").err


def test_a_plain_path_names_an_existing_repository(run: Any, tmp_path: Path) -> None:
    import pygit2

    pygit2.init_repository(str(tmp_path / "bare.git"), bare=True)
    pygit2.init_repository(str(tmp_path / "work"))
    for path in (tmp_path / "bare.git", tmp_path / "work"):
        assert run("append", "s", "t", '{"n": 1}', "--url", str(path)).code == 0
        assert run("log", "s", "--json", "--url", str(path)).lines()[0]["payload"] == {"n": 1}
    assert run("append", "s", "t", "{}", "--url", f"git+file://{tmp_path}/new.git").code == 0


@pytest.mark.parametrize("kind", ["sqlite", "git", "empty directory"])
def test_commands_that_only_read_never_create_a_store(
    run: Any, stores: Stores, tmp_path: Path, kind: str
) -> None:
    url = {
        "sqlite": f"sqlite:///{tmp_path}/typo.db",
        "git": f"git+file://{tmp_path}/typo.git",
        "empty directory": f"git+file://{tmp_path}/empty",
    }[kind]
    if kind == "empty directory":
        (tmp_path / "empty").mkdir()
    before = sorted(tmp_path.rglob("*"))
    for argv in (
        ["log", "s"],
        ["log", "s", "--follow"],
        ["spaces"],
        ["lease", "s"],
        ["lease", "s", "--revoke"],
        ["verify"],
        ["export"],
        ["copy", "--to", stores.url("copy")],
    ):
        r = run(*argv, "--url", url)
        assert r.code == 1 and f"no store at {url}: " in r.err, (argv, r.err)
    assert sorted(tmp_path.rglob("*")) == before
    with pytest.raises(StoreNotFound):
        open_store(url, create=False)


def test_hostile_input_is_one_typed_line(run: Any, stores: Stores, tmp_path: Path) -> None:
    """Exit 2 and one line naming the input line, never "unexpected ..." (issue 13, item 14)."""
    good: dict[str, Any] = {
        "space": "s",
        "seq": 0,
        "type": "t",
        "payload": {},
        "recorded_at": "2026-01-01T00:00:00+00:00",
        "writer": "",
        "generation": 0,
    }
    deep = b'{"a":' * 5000 + b"1" + b"}" * 5000

    def line(**change: Any) -> bytes:
        return json.dumps({**good, **change}).encode()

    cases = [
        (line().replace(b'"payload": {}', b'"payload": {"a": "\xff"}'), "not valid UTF-8"),
        (line().replace(b'"payload": {}', b'"payload": ' + deep), "invalid payload: nests"),
        (line(recorded_at="0001-01-01T00:00:00+14:00"), "invalid recorded_at: "),
        (line(recorded_at="9999-12-31T23:59:59-14:00"), "invalid recorded_at: "),
        (line(generation=2**70), "invalid generation: "),
        (line(seq=2**63), "invalid seq: "),
    ]
    source = tmp_path / "in.jsonl"
    for data, message in cases:
        source.write_bytes(line() + b"\n" + data + b"\n")
        r = run("import", "--file", str(source), "--url", stores.url("t"))
        assert r.code == 2 and f"{source} line 2: {message}" in r.err, (data[:80], r.err)
    assert stores["t"].spaces() == []
    r = run("append", "s", "t", deep.decode())
    assert r.code == 2 and "invalid payload: nests more than" in r.err


def test_version(run: Any) -> None:
    from importlib.metadata import version

    r = run("--version")
    assert r.code == 0 and r.out == f"shard-sql {version('shard_sql')}\n"


def test_log_last(run: Any, stores: Stores) -> None:
    main_store(stores).append_many("s", [("t", {"n": n}) for n in range(5)], expected_seq=0)
    seqs = lambda *argv: [e["seq"] for e in run("log", "s", "--json", *argv).lines()]  # noqa: E731
    assert seqs("--last", "2") == [3, 4]
    assert seqs("--last", "9") == [0, 1, 2, 3, 4]
    assert seqs("--last", "3", "--limit", "1") == [2]
    assert seqs("--last", "0") == []
    r = run("log", "s", "--last", "2", "--from-seq", "1")
    assert r.code == 2 and "not allowed with argument" in r.err


def test_an_empty_node_is_an_error(run: Any, stores: Stores) -> None:
    r = run("append", "s", "t", "{}", "--node", "")
    assert r.code == 2 and "invalid node: must not be empty" in r.err
    assert main_store(stores).head("s") == 0


def test_bench_never_imports_from_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A folder holding a `benchmarks/` package runs none of it, even with the current
    directory on sys.path (as `python -m shard_sql` puts it): only the installed suites run."""
    marker = tmp_path / "ran"
    hostile = tmp_path / "benchmarks"
    hostile.mkdir()
    code = f"open({str(marker)!r}, 'w').close()\n\n\ndef run(**kw):\n    return []\n"
    for name in ("__init__", "sql_bench", "git_bench", "perf_bench", "hostile_bench"):
        (hostile / f"{name}.py").write_text(code)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m.split(".")[0] == "benchmarks"]:
        monkeypatch.delitem(sys.modules, name)
    known = bench.suites()
    assert "hostile" not in known and {"sql", "git", "perf"} <= set(known)
    for module in known.values():
        assert bench.load_suite(module) is not None
    assert not marker.exists()


def test_bench_reports_each_row_and_one_install_hint(
    run: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    hint = "pip install 'shard_sql[compare]'"
    reported: list[str] = []

    def rows(*, quick: bool = False, progress: Any = None) -> list[dict[str, Any]]:
        out = []
        for work in ("append", "read", "recorder append", "recorder read"):
            skipped = work.startswith("recorder")
            row = {
                "work": work,
                "figure": None if skipped else 2.0,
                "baseline": None if skipped else 1.0,
                "note": "eventsourcing not installed: skipped" if skipped else "",
                "install": hint if skipped else "",
            }
            progress(row)  # as soon as it is measured
            reported.append(work)
            out.append(row)
        return out

    suite = types.SimpleNamespace(__name__="shard_sql.bench.perf_bench", run=rows)
    monkeypatch.setattr(bench, "suites", lambda: {"perf": "shard_sql.bench.perf_bench"})
    monkeypatch.setattr(bench, "load_suite", lambda module: suite)
    r = run("bench", "--quick")
    assert r.code == 0 and len(reported) == 4
    assert r.err == f"shard-sql: note: the skipped rows run after: {hint}\n"
    assert r.out.count("shard_sql[compare]") == 0  # in the note, not on each row


def test_migrate_says_what_it_did(run: Any, tmp_path: Path) -> None:
    from shard_sql.orm import SCHEMA_REVISION as HEAD

    url = f"sqlite:///{tmp_path}/m.db"
    assert run("migrate", "--url", url, "--json").lines() == [
        {"url": url, "migrated": True, "from": None, "to": HEAD}
    ]
    assert run("migrate", "--url", url, "--json").lines() == [
        {"url": url, "migrated": False, "from": HEAD, "to": HEAD}
    ]
    assert run("migrate", "--url", url).out == f"{url}: already at {HEAD}\n"
    fresh = f"sqlite:///{tmp_path}/fresh.db"
    assert run("migrate", "--url", fresh).out == f"{fresh}: migrated from none to {HEAD}\n"
    git = f"git+file://{tmp_path}/log.git"
    assert run("migrate", "--url", git).out == f"{git}: no schema to migrate (store ready)\n"
    assert run("migrate", "--url", git, "--json").lines() == [
        {"url": git, "migrated": False, "from": None, "to": None}
    ]


def test_a_retried_intent_says_it_was_written_before(run: Any, stores: Stores) -> None:
    """An intent id written long before (by a process long gone) is not "forwarded to" it."""
    import dataclasses
    from datetime import UTC, datetime, timedelta

    from shard_sql.validation import pending

    store = main_store(stores)
    old = dataclasses.replace(
        pending("t", {"a": 1}, "req-9"),
        recorded_at=datetime.now(UTC) - timedelta(hours=1),
        writer="gone-node",
        generation=3,
    )
    store.write("s", [old], expected_seq=0, fence=None)  # type: ignore[attr-defined]
    r = run("append", "s", "t", '{"a": 1}', "--intent-id", "req-9")
    assert r.code == 0 and "already written at" in r.out and "forwarded" not in r.out
