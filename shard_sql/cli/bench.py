"""The `bench` command: run benchmark suites and print each figure next to its baseline."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import pkgutil
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from shard_sql.cli.errors import CommandFailed, UsageError
from shard_sql.cli.options import AddCommand
from shard_sql.cli.output import PROG, Bar, emit, progress, table
from shard_sql.transfer import dumps

SUITES_PACKAGE = "shard_sql.bench"
"""The installed benchmark suites (`benchmarks/` of the source, shipped as this package): each
module `NAME_bench` is the suite NAME. Nothing is ever imported from the current directory."""

SUITES = {"sql": f"{SUITES_PACKAGE}.sql_bench", "git": f"{SUITES_PACKAGE}.git_bench"}
"""The suites always listed (first); each module provides `run(*, quick: bool = False, ...)`
returning rows (mappings or objects) with a work name, a figure, a baseline, a ratio and a
target."""

DEFAULT_SUITE = "perf"
"""The suite `bench` runs by default when it exists: the one table of every target
(perf_bench); else every suite runs."""


def register(add: AddCommand) -> None:
    p = add(
        "bench",
        "run the benchmarks and print figures next to their baselines",
        "Run the installed benchmark suites (shard_sql.bench.NAME_bench: suite NAME; by default "
        "the perf suite, the table of every target) and print each figure next to its "
        "baseline measured in the same run, the ratio, the target and a pass/short mark. "
        "Nothing is imported from the current directory.",
        "shard-sql bench",
        "shard-sql bench --only sql --only git --quick --json",
        "shard-sql bench --all",
    )
    p.add_argument(
        "--only",
        action="append",
        metavar="SUITE",
        help="run this suite only (sql, git, perf, forwarding...); repeatable",
    )
    p.add_argument("--all", action="store_true", help="run every suite (default: perf, if present)")
    p.add_argument("--quick", action="store_true", help="tiny counts (a smoke run)")
    p.set_defaults(func=bench)


def suites() -> dict[str, str]:
    """Suite name -> module of the installed suites, `sql` and `git` first."""
    found = dict(SUITES)
    try:
        package = importlib.import_module(SUITES_PACKAGE)
    except ModuleNotFoundError:
        return found
    for module in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if module.name.endswith("_bench"):
            found.setdefault(module.name.removesuffix("_bench"), f"{SUITES_PACKAGE}.{module.name}")
    return found


def load_suite(module: str) -> Any | None:
    """Import an installed suite's module; None when it is not installed."""
    if not module.startswith(SUITES_PACKAGE + "."):
        raise UsageError(f"{module} is not an installed suite ({SUITES_PACKAGE}.*)")
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name in (module, SUITES_PACKAGE):
            return None
        raise


def _run(module: Any, args: argparse.Namespace, bar: Bar) -> list[Any]:
    """The suite's rows; the bar advances per row (as measured, if the suite reports them)."""
    import inspect

    run = getattr(module, "run", None)
    if not callable(run):
        raise CommandFailed(f"{module.__name__} has no run() function")

    def measured(row: Mapping[str, Any]) -> None:
        bar.describe(f"bench: {_field(row, 'work')}")
        bar.advance()

    offered = {"quick": args.quick, "url": args.url, "progress": measured}
    params = inspect.signature(run).parameters
    kwargs = {k: v for k, v in offered.items() if k in params and v is not None}
    rows = list(run(**kwargs) or [])
    if "progress" not in kwargs:
        bar.advance(len(rows))
    return rows


# -- rows ----------------------------------------------------------------------------------------

_FIELDS = {
    "work": ("work", "name", "row", "figure_name"),
    "figure": ("figure", "value", "shard_sql", "rate"),
    "baseline": ("baseline", "baseline_figure", "raw"),
    "ratio": ("ratio",),
    "target": ("target",),
    "unit": ("unit", "units"),
    "ok": ("ok", "passed", "pass"),
    "at_most": ("at_most",),
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
    target, ok, at_most = _field(row, "target"), _field(row, "ok"), bool(_field(row, "at_most"))
    if ok is None and ratio is not None and target is not None:
        ok = ratio <= target if at_most else ratio >= target
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
        "at_most": at_most,
        "note": _field(row, "note") or "",
    }


def _number(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.2f}" if abs(value) < 10 else f"{value:,.0f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _target(r: Mapping[str, Any]) -> str:
    """A ratio target (`0.85x`, `<= 2x` when lower is better), or an absolute one (`>= 300`,
    `<= 300`) for a row without a baseline."""
    target = r["target"]
    if target is None:
        return "-"
    if r["baseline"] is None:
        return f"{'<=' if r['at_most'] else '>='} {_number(target)}"
    return f"<= {target:g}x" if r["at_most"] else f"{target:g}x"


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
        raise CommandFailed(f"no benchmark suites installed ({SUITES_PACKAGE} is missing)")
    for n in [n for n in names if n not in found]:
        print(f"{PROG}: note: {known[n]} not found; skipped", file=sys.stderr)
    results: list[dict[str, Any]] = []
    with progress("bench", None, unit="rows") as bar:
        for name, module in found.items():
            results += [bench_row(name, row) for row in _run(module, args, bar)]
    if args.json:
        for r in results:
            emit(dumps(r))
    elif results:
        _print_table(results)
    for hint in dict.fromkeys(r["install"] for r in results if r.get("install")):
        print(f"{PROG}: note: the skipped rows run after: {hint}", file=sys.stderr)
