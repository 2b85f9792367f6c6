"""The `bench` command: run benchmark suites and print each figure next to its baseline."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from shard_sql.cli.errors import CommandFailed, UsageError
from shard_sql.cli.options import AddCommand
from shard_sql.cli.output import PROG, emit, progress, table
from shard_sql.transfer import dumps

SUITES = {"sql": "benchmarks.sql_bench", "git": "benchmarks.git_bench"}
"""The benchmark suites always looked for; any other `benchmarks/NAME_bench.py` of the source
checkout is the suite NAME. Each module provides `run(*, quick: bool = False, ...)` returning
rows (mappings or objects) with a work name, a figure, a baseline, a ratio and a target."""

DEFAULT_SUITE = "perf"
"""The suite `bench` runs by default when it exists: the one table of every target
(benchmarks/perf_bench.py); else every suite runs."""


def register(add: AddCommand) -> None:
    p = add(
        "bench",
        "run the benchmarks and print figures next to their baselines",
        "Run the benchmarks of a source checkout (benchmarks/NAME_bench.py: suite NAME; by "
        "default the perf suite, the table of every target, else all) and print each figure "
        "next to its baseline measured in the same run, the ratio, the target and a pass/short "
        "mark.",
        "shard-sql bench",
        "shard-sql bench --only sql --only git --quick --json",
        "shard-sql bench --all",
    )
    p.add_argument(
        "--only",
        action="append",
        metavar="SUITE",
        help="run this suite only (sql, git, or NAME of benchmarks/NAME_bench.py); repeatable",
    )
    p.add_argument("--all", action="store_true", help="run every suite (default: perf, if present)")
    p.add_argument("--quick", action="store_true", help="tiny counts (a smoke run)")
    p.set_defaults(func=bench)


def _bench_root() -> Path | None:
    """The directory holding `benchmarks/`: the source checkout of this package, else the
    current directory."""
    for root in (Path(__file__).resolve().parents[2], Path.cwd()):
        if (root / "benchmarks").is_dir():
            return root
    return None


def suites() -> dict[str, str]:
    """Suite name -> module, `sql` and `git` first."""
    found = dict(SUITES)
    root = _bench_root()
    if root is not None:
        for f in sorted((root / "benchmarks").glob("*_bench.py")):
            found.setdefault(f.stem.removesuffix("_bench"), f"benchmarks.{f.stem}")
    return found


def load_suite(module: str) -> Any | None:
    """Import a suite's module; None when it does not exist."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name not in (module, "benchmarks"):
            raise
    root = _bench_root()
    if root is None or str(root) in sys.path:
        return None
    sys.path.insert(0, str(root))
    importlib.invalidate_caches()
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name in (module, "benchmarks"):
            return None
        raise


def _run(module: Any, args: argparse.Namespace) -> list[Any]:
    import inspect

    run = getattr(module, "run", None)
    if not callable(run):
        raise CommandFailed(f"{module.__name__} has no run() function")
    offered = {"quick": args.quick, "url": args.url}
    params = inspect.signature(run).parameters
    kwargs = {k: v for k, v in offered.items() if k in params and v is not None}
    return list(run(**kwargs) or [])


# -- rows ----------------------------------------------------------------------------------------

_FIELDS = {
    "work": ("work", "name", "row", "figure_name"),
    "figure": ("figure", "value", "shard_sql", "rate"),
    "baseline": ("baseline", "baseline_figure", "raw"),
    "ratio": ("ratio",),
    "target": ("target",),
    "unit": ("unit", "units"),
    "ok": ("ok", "passed", "pass"),
    "note": ("note", "notes"),
}


def _field(row: object, name: str) -> Any:
    for key in _FIELDS[name]:
        if isinstance(row, Mapping):
            if key in row:
                return row[key]
        elif hasattr(row, key):
            return getattr(row, key)
    return None


def bench_row(suite: str, row: object) -> dict[str, Any]:
    """A runner's row, normalized; the runner's other fields (backend, vs, ...) are kept."""
    extra: dict[str, Any] = dict(row) if isinstance(row, Mapping) else {}
    if not extra and dataclasses.is_dataclass(row) and not isinstance(row, type):
        extra = dataclasses.asdict(row)
    figure, baseline, ratio = _field(row, "figure"), _field(row, "baseline"), _field(row, "ratio")
    if ratio is None and figure and baseline:
        ratio = figure / baseline
    target, ok = _field(row, "target"), _field(row, "ok")
    if ok is None and ratio is not None and target is not None:
        ok = ratio >= target
    return {
        "suite": suite,
        **extra,
        "work": _field(row, "work"),
        "figure": figure,
        "baseline": baseline,
        "ratio": ratio,
        "target": target,
        "unit": _field(row, "unit"),
        "ok": ok,
        "note": _field(row, "note") or "",
    }


def _number(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.2f}" if abs(value) < 10 else f"{value:,.0f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _target(r: Mapping[str, Any]) -> str:
    """A ratio target (`0.85x`), or an absolute one (`>= 300`) for a row without a baseline."""
    target = r["target"]
    if target is None:
        return "-"
    if r["baseline"] is None:
        return f">= {_number(target)}"
    return f"{target:g}x"


def _print_table(results: Sequence[Mapping[str, Any]]) -> None:
    """One table; the SUITE, BACKEND and VS columns only when they say something."""
    columns: list[tuple[str, Callable[[Mapping[str, Any]], str]]] = []
    if len({r["suite"] for r in results}) > 1:
        columns.append(("SUITE", lambda r: str(r["suite"])))
    if any(r.get("backend") for r in results):
        columns.append(("BACKEND", lambda r: str(r.get("backend") or "-")))
    columns.append(("WORK", lambda r: str(r["work"])))
    if any(r.get("vs") for r in results):
        columns.append(("VS", lambda r: str(r.get("vs") or "-")))
    columns += [
        ("FIGURE", lambda r: _number(r["figure"])),
        ("BASELINE", lambda r: _number(r["baseline"])),
        ("RATIO", lambda r: "-" if r["ratio"] is None else f"{r['ratio']:.2f}x"),
        ("TARGET", lambda r: r.get("target_text") or _target(r)),
        ("MARK", lambda r: {True: "pass", False: "short", None: "-"}[r["ok"]]),
        ("UNIT", lambda r: str(r["unit"] or "")),
        ("NOTE", lambda r: str(r["note"])),
    ]
    table(
        [c[0] for c in columns],
        [[f(r) for _, f in columns] for r in results],
        wrap=("BACKEND", "WORK", "VS", "NOTE"),
    )


# -- the command ---------------------------------------------------------------------------------


def _chosen(args: argparse.Namespace, known: Mapping[str, str]) -> list[str]:
    if args.only:
        names: list[str] = list(dict.fromkeys(args.only))
    elif args.all or DEFAULT_SUITE not in known:
        names = list(known)
    else:
        names = [DEFAULT_SUITE]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UsageError(f"unknown suite {unknown[0]!r} (known: {', '.join(known)})")
    return names


def bench(args: argparse.Namespace) -> None:
    known = suites()
    names = _chosen(args, known)
    modules: dict[str, Any] = {}
    for n in names:
        try:
            modules[n] = load_suite(known[n])
        except ImportError as e:
            raise CommandFailed(f"cannot import {known[n]}: {e}") from e
    found = {n: m for n, m in modules.items() if m is not None}
    if not found:
        raise CommandFailed(
            "no benchmarks found (benchmarks/sql_bench.py, benchmarks/git_bench.py); "
            "run from a source checkout"
        )
    for n in [n for n in names if n not in found]:
        print(f"{PROG}: note: {known[n]} not found; skipped", file=sys.stderr)
    results: list[dict[str, Any]] = []
    with progress("bench", len(found)) as bar:
        for name, module in found.items():
            results += [bench_row(name, row) for row in _run(module, args)]
            bar.advance()
    if args.json:
        for r in results:
            emit(dumps(r))
    elif results:
        _print_table(results)
