"""A smoke run of the git benchmark with tiny counts (figures meaningless), to keep it working."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_git_bench_quick_run() -> None:
    root = str(Path(__file__).resolve().parent.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    from benchmarks import git_bench

    rows = git_bench.run(quick=True)
    works = [r["work"] for r in rows]
    assert any("fenced, lease held" in w for w in works)
    assert any("events()" in w for w in works)
    for r in rows:
        assert r["unit"] in ("ev/s", "ms") and (r["figure"] > 0 or r["unit"] == "ms")
        if r["baseline"] is not None:
            assert r["ratio"] == pytest.approx(r["figure"] / r["baseline"], rel=0.01)
