"""A smoke run of the performance suite (benchmarks/perf_bench.py) with tiny counts, to keep it
working. Figures are meaningless at these counts: nothing here looks at a time or a ratio's
value, only at the table's shape."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

ROOT = str(Path(__file__).resolve().parent.parent)


@pytest.fixture
def perf() -> Any:
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    from benchmarks import perf_bench

    return perf_bench


def _check_rows(rows: list[dict[str, Any]]) -> None:
    assert rows
    for r in rows:
        assert set(r) >= {"work", "backend", "vs", "figure", "baseline", "ratio", "target", "ok"}
        if r["figure"] is None:
            assert r["note"]  # a skipped row says why
            continue
        assert r["figure"] >= 0
        if r["baseline"] is not None and r["ratio"] is not None:
            expected = r["figure"] / r["baseline"]
            assert r["ratio"] == pytest.approx(expected, rel=0.01, abs=0.01)
        if r["target"] is not None:
            assert r["ok"] in (True, False)
            if r["at_most"]:  # lower is better: the ratio, or the figure without a baseline
                judged = r["figure"] if r["baseline"] is None else r["ratio"]
                assert r["ok"] == (judged <= r["target"])


def test_measured_at_most(perf: Any) -> None:
    from benchmarks.rows import measured

    def row(figure: float, **kw: Any) -> Any:
        return measured("w", "b", "v", figure, 100.0, 2.0, unit="us", **kw)

    # Lower is better: the ratio is figure / baseline, judged <= the target.
    assert (row(150.0, at_most=True).ratio, row(150.0, at_most=True).ok) == (1.5, True)
    assert (row(250.0, at_most=True).ratio, row(250.0, at_most=True).ok) == (2.5, False)
    assert row(250.0, at_most=True).target_text == "<= 2x"
    # The default: at least the target.
    assert (row(250.0).ok, row(150.0).ok, row(150.0).target_text) == (True, False, ">= 2x")
    no_baseline = measured("w", "b", "v", 250.0, None, 300.0, at_most=True)
    assert (no_baseline.ok, no_baseline.target_text) == (True, "<= 300")


def test_budget_rows_judge_the_figure_directly(perf: Any) -> None:
    """The wake-up and memory rows: the figure against the budget, lower is better, without a
    baseline or a ratio; the same pass/short as the former ratio budget / figure >= 1.0."""
    from benchmarks.feed_bench import wake_row
    from benchmarks.process_rows import memory_row

    for make, budget, floor, unit in (
        (wake_row, 5.0, 0.001, "ms"),
        (lambda label, x: memory_row(label, 1_000, x), 50.0, 0.01, "MB"),
    ):
        for figure in (0.0, 0.0005, 1.0, budget - 0.01, budget, budget + 0.01, 2 * budget):
            row = make("sqlite FULL", figure)
            assert (row.baseline, row.ratio, row.target, row.at_most) == (None, None, budget, True)
            assert (row.unit, row.target_text) == (unit, f"<= {budget:g} {unit}")
            assert row.ok == (figure <= budget) == (budget / max(figure, floor) >= 1.0)
            assert row.note.startswith("lower is better: the ")
            assert f"<= the {budget:g} {unit} budget" in row.note


def test_sqlite_rows_quick(perf: Any) -> None:
    seen: list[dict[str, Any]] = []
    rows = perf.run(
        quick=True,
        backends=("sqlite-full",),
        works=("append", "many", "read"),
        progress=seen.append,
    )
    _check_rows(rows)
    assert seen == rows  # each row reported as soon as it was measured (shard-sql bench's bar)
    vs = {(r["work"].split(",")[0], r["vs"]) for r in rows}
    assert ("fenced append via AppendAuthority", "raw driver insert") in vs
    assert ("append_many of 100", "raw executemany") in vs
    assert any(r["vs"] == "eventsourcing recorder" for r in rows)  # run, or skipped with a note


def test_processes_and_memory_quick(perf: Any) -> None:
    rows = perf.run(quick=True, backends=("sqlite-normal",), works=("processes", "memory"))
    _check_rows(rows)
    assert rows[0]["work"] == "4 processes appending to one space (total)"
    if os.path.exists("/proc/stat"):
        # Where the time goes: machine-wide CPU per event, four processes next to one alone.
        assert [(r["work"].strip(), r["unit"]) for r in rows[1:]] == [
            ("CPU per event, machine-wide (4 processes)", "us"),
            ("forwarded append latency p50 (4 processes)", "us"),
            ("group commit: items per write (4 processes)", "items"),
            ("forwarded append latency p50, idle holder (1 forwarder)", "us"),
            ("forwarded append latency p90, idle holder (1 forwarder)", "us"),
            ("bare socket ping-pong, 4 clients to 1 server (no database)", "msgs/s"),
            ("bare socket round trip p50, 1 client (no database)", "us"),
        ]
        assert rows[1]["figure"] > 0 and "cores bound 4 processes" in rows[1]["note"]
        # The forwarded appends went over the holder's socket; the holder grouped its writes.
        handed = re.search(r"(\d+) appends over the holder's socket", rows[2]["note"])
        assert handed is not None and int(handed.group(1)) > 0
        # Under load the latency mirrors the rate (Little's law): reported, the target is idle's.
        assert rows[2]["target"] is None and "4 / total rate" in rows[2]["note"]
        assert rows[3]["figure"] >= 1
        # Without load: one forwarder through an idle holder's socket, next to direct appends.
        idle = re.search(r"(\d+) of (\d+) over the holder's socket", rows[4]["note"])
        assert idle is not None and int(idle.group(1)) > 0
        assert rows[4]["target_text"] == "<= 2x" and rows[4]["baseline"] > 0
        # Lower is better: forwarded p50 / direct p50, judged <= 2.
        assert (rows[4]["target"], rows[4]["at_most"]) == (2.0, True)
        assert rows[4]["note"].startswith("ratio = forwarded / direct")
        assert rows[4]["ratio"] == pytest.approx(rows[4]["figure"] / rows[4]["baseline"], rel=0.01)
        assert rows[4]["ok"] == (rows[4]["ratio"] <= 2.0)
        # The floor, measured in the same run: a bare socket ping-pong, no database.
        assert rows[6]["figure"] > 0 and rows[6]["baseline"] == rows[0]["baseline"]
        assert rows[7]["figure"] > 0 and rows[7]["baseline"] == rows[4]["baseline"]
    rows = perf.run(quick=True, backends=("sqlite-full",), works=("memory",))
    _check_rows(rows)
    assert rows[0]["unit"] == "MB" and rows[0]["target_text"] == "<= 50 MB"
    assert (rows[0]["baseline"], rows[0]["target"], rows[0]["at_most"]) == (None, 50.0, True)


@pytest.mark.postgres
def test_eventsourcing_rows_quick(perf: Any) -> None:
    rows = perf.run(quick=True, backends=("sqlite-full", "postgresql"), works=("eventsourcing",))
    _check_rows(rows)
    for backend in ("sqlite FULL", "postgresql"):
        works = [r["work"].split(" (")[0] for r in rows if r["backend"] == backend]
        assert works == [
            "Application.save of a new aggregate",
            "reading an aggregate of 2,000 events",
            "reading the notification log",
        ]
    assert all(r["figure"] is not None for r in rows)


@pytest.mark.postgres
def test_feed_rows_quick(perf: Any) -> None:
    rows = perf.run(quick=True, backends=("sqlite-normal", "postgresql"), works=("feed",))
    _check_rows(rows)
    works = [(r["backend"], r["work"].split(",")[0].split(" of ")[0]) for r in rows]
    for backend in ("sqlite NORMAL", "postgresql"):
        assert [w for b, w in works if b == backend][:4] == [
            "read 2",
            "read 2",
            "Subscription",
            "wait_feed wake-up after another process's append",
        ]
    assert works[-1] == ("postgresql", "4 processes appending to 4 different spaces (total)")
    wake = [r for r in rows if r["unit"] == "ms"]
    assert len(wake) == 2 and all(r["target_text"] == "<= 5 ms" for r in wake)
    assert all((r["baseline"], r["target"], r["at_most"]) == (None, 5.0, True) for r in wake)


def test_git_rows_quick(perf: Any) -> None:
    rows = perf.run(quick=True, backends=("git",), works=("append", "read"))
    _check_rows(rows)
    assert sum(1 for r in rows if r["work"].startswith("git append")) == 2


def test_main_prints_one_table_and_json(
    perf: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    rows = [
        perf.asdict(perf.measured("w", "sqlite FULL", "raw", 90.0, 100.0, 0.85)),
        perf.asdict(perf.skipped("w", "postgresql", "raw", "no server")),
    ]
    monkeypatch.setattr(perf, "run", lambda **kw: rows)
    out = tmp_path / "rows.jsonl"
    assert perf.main(["--quick", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "shard_sql" in text and "0.90x" in text and "pass" in text and "no server" in text
    assert [json.loads(line) for line in out.read_text().splitlines()] == rows
    assert perf.main(["--json"]) == 0
    assert [json.loads(x) for x in capsys.readouterr().out.splitlines()] == rows


@pytest.mark.postgres
def test_transaction_rows_quick(perf: Any) -> None:
    rows = perf.run(quick=True, backends=("sqlite-full", "postgresql"), works=("transaction",))
    _check_rows(rows)
    for backend in ("sqlite FULL", "postgresql"):
        assert [(r["work"], r["vs"]) for r in rows if r["backend"] == backend] == [
            ("tx.append in the host's transaction", "raw INSERT in the host's transaction"),
            (
                "tx.append_many of 100 in the host's transaction",
                "raw executemany in the host's transaction",
            ),
        ]
    assert all(r["figure"] is not None and r["target"] is not None for r in rows)
