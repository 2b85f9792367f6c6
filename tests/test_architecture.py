"""The layout's rules (docs/architecture.md), read from the source with `ast`:

- no import cycle among shard_sql's modules, counting imports inside functions and under
  `TYPE_CHECKING` (a cycle hidden in a function is still a cycle);
- the domain (values, errors, validation, ports, leases, authority and what they are made of)
  imports no adapter, no driver and not the CLI, directly or through another module;
- no module over 600 lines, no function over 60 unless the line above its `def` (or its first
  decorator) is a comment with `long:` and a reason.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "shard_sql"
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 60
DOMAIN = (
    "shard_sql.values",
    "shard_sql.errors",
    "shard_sql.validation",
    "shard_sql.ports",
    "shard_sql.leases",
    "shard_sql.authority",
    "shard_sql.serving",  # the holder's half of the authority
    "shard_sql.store_base",  # what adapters share
)
FORBIDDEN_IN_DOMAIN = re.compile(
    r"^(shard_sql\.(memory|sql|git|orm|cli|urls|_sql\w*|_git\w*|_orm)"
    r"|sqlalchemy|alembic|pygit2|psycopg|psycopg_pool|rich)(\.|$)"
)
LONG_REASON = re.compile(r"#.*\blong:\s*\S")


@dataclass(frozen=True)
class Source:
    name: str  # dotted module name
    path: Path
    shown: str  # the path from the repository's root
    text: str
    is_package: bool


def package_sources(root: Path = PACKAGE) -> dict[str, Source]:
    sources = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts.pop()
        name = ".".join(parts)
        shown = str(path.relative_to(root.parent))
        sources[name] = Source(name, path, shown, path.read_text(encoding="utf-8"), is_package)
    return sources


def imports_of(source: Source, known: set[str]) -> set[str]:
    """Every module `source` imports, wherever the import statement is (module level, in a
    function, under `if TYPE_CHECKING:`); names inside shard_sql resolve to known modules."""
    package = source.name if source.is_package else source.name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source.text, str(source.path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                # `from a import b`: the module a.b if there is one, else a name of module a.
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return found


def import_graph(sources: dict[str, Source]) -> dict[str, set[str]]:
    known = set(sources)
    graph: dict[str, set[str]] = {}
    for name, source in sources.items():
        graph[name] = set()
        for target in imports_of(source, known):
            internal = _known_module(target, known)
            graph[name].add(internal or target)
    return graph


def _known_module(target: str, known: set[str]) -> str | None:
    """The shard_sql module `target` names (an import of a.b.c where only a.b is a module)."""
    while target:
        if target in known:
            return target
        target = target.rpartition(".")[0]
    return None


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles among the graph's own modules, one path per strongly connected set."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's algorithm
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node] & graph.keys()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1 or node in graph[node]:
                found.append(_cycle_path(graph, set(group)))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _cycle_path(graph: dict[str, set[str]], group: set[str]) -> list[str]:
    """One cycle through the first member of a strongly connected set: a -> ... -> a."""
    start = min(group)
    paths = {start: [start]}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for nxt in sorted(graph[node] & group):
            if nxt == start:
                return [*paths[node], start]
            if nxt not in paths:
                paths[nxt] = [*paths[node], nxt]
                queue.append(nxt)
    return [start, start]


def forbidden_reaches(graph: dict[str, set[str]], roots: tuple[str, ...]) -> list[str]:
    """Each forbidden module a domain module imports, directly or through other modules."""
    problems = []
    for root in roots:
        if root not in graph:
            continue
        seen = {root: [root]}
        queue = [root]
        while queue:
            node = queue.pop(0)
            for target in sorted(graph.get(node, ())):
                if FORBIDDEN_IN_DOMAIN.match(target):
                    problems.append(" -> ".join([*seen[node], target]))
                elif target in graph and target not in seen:
                    seen[target] = [*seen[node], target]
                    queue.append(target)
    return problems


def long_functions(source: Source) -> Iterator[str]:
    lines = source.text.splitlines()
    for node in ast.walk(ast.parse(source.text, str(source.path))):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        length = (node.end_lineno or node.lineno) - node.lineno + 1
        if length <= MAX_FUNCTION_LINES:
            continue
        first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
        above = {lines[line - 2] for line in (first, node.lineno) if line >= 2}
        if not any(LONG_REASON.search(line) for line in above):
            yield f"{source.shown}:{node.lineno} {node.name}: {length}"


# -- the package ---------------------------------------------------------------------------


def test_no_import_cycle() -> None:
    found = cycles(import_graph(package_sources()))
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_the_domain_imports_no_adapter_driver_or_cli() -> None:
    found = forbidden_reaches(import_graph(package_sources()), DOMAIN)
    assert not found, "the domain reaches outward:\n" + "\n".join(found)


def test_no_module_over_600_lines() -> None:
    found = [
        f"{s.shown}: {n} lines"
        for s in package_sources().values()
        if (n := len(s.text.splitlines())) > MAX_MODULE_LINES
    ]
    assert not found, "modules too long:\n" + "\n".join(found)


def test_no_function_over_60_lines_without_a_reason() -> None:
    found = [f for s in package_sources().values() for f in long_functions(s)]
    assert not found, "functions too long (or say `# long: why` above the def):\n" + "\n".join(
        found
    )


def test_the_domain_modules_exist() -> None:
    # A renamed module must be renamed here too, or its rules silently stop applying.
    sources = package_sources()
    assert [m for m in DOMAIN if m not in sources] == []


# -- the checks themselves can fail --------------------------------------------------------


def fake_package(tmp_path: Path, files: dict[str, str]) -> dict[str, Source]:
    root = tmp_path / "shard_sql"
    for name, text in {"__init__.py": "", **files}.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return package_sources(root)


def test_cycles_are_found_in_functions_and_under_type_checking(tmp_path: Path) -> None:
    sources = fake_package(
        tmp_path,
        {
            "a.py": "from shard_sql import b\n",
            "b.py": "def f():\n    from shard_sql.c import x\n",
            "c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import shard_sql.a\n",
            "d.py": "from shard_sql.e import thing\n",
            "e.py": "from . import d\n",
            "ok.py": "import shard_sql.a\n",
        },
    )
    found = cycles(import_graph(sources))
    assert sorted(found) == [
        ["shard_sql.a", "shard_sql.b", "shard_sql.c", "shard_sql.a"],
        ["shard_sql.d", "shard_sql.e", "shard_sql.d"],
    ]


def test_the_domain_check_follows_imports(tmp_path: Path) -> None:
    sources = fake_package(
        tmp_path,
        {
            "leases.py": "from shard_sql import helper\n",
            "helper.py": "def f():\n    import sqlalchemy.engine\n",
            "values.py": "from shard_sql.sql.store import SqlEventStore\n",
            "sql/__init__.py": "",
            "sql/store.py": "",
            "errors.py": "import shard_sql.cli\n",
            "cli/__init__.py": "",
            "ports.py": "import shard_sql.wake\nfrom shard_sql.sqlite_notes import x\n",
            "wake.py": "import os\n",
            "sqlite_notes.py": "",
        },
    )
    roots = ("shard_sql.leases", "shard_sql.values", "shard_sql.errors", "shard_sql.ports")
    assert sorted(forbidden_reaches(import_graph(sources), roots)) == [
        "shard_sql.errors -> shard_sql.cli",
        "shard_sql.leases -> shard_sql.helper -> sqlalchemy.engine",
        "shard_sql.values -> shard_sql.sql.store",
    ]


def test_long_functions_need_a_reason(tmp_path: Path) -> None:
    body = "".join(f"    x{i} = {i}\n" for i in range(60))  # with its def: 61 lines
    short = "".join(f"    x{i} = {i}\n" for i in range(59))
    sources = fake_package(
        tmp_path,
        {
            "m.py": (
                f"def short():\n{short}\n"
                f"def bare():\n{body}\n"
                f"# long: one table of cases, read top to bottom\ndef explained():\n{body}\n"
                f"# long:\ndef no_reason():\n{body}\n"
                f"class C:\n    # long: a reason\n    @staticmethod\n    def method():\n"
                + body.replace("    ", "        ")
            )
        },
    )
    found = [f.split(" ")[1] for f in long_functions(sources["shard_sql.m"])]
    assert found == ["bare:", "no_reason:"]
