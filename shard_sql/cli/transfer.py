"""The `export`, `import` and `copy` commands, over `shard_sql.transfer`."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator
from typing import IO

from shard_sql import transfer
from shard_sql.cli.errors import UsageError
from shard_sql.cli.options import AddCommand
from shard_sql.cli.output import emit, plural, progress
from shard_sql.cli.stores import opened, store_url
from shard_sql.transfer import ImportReport, dumps


def register(add: AddCommand) -> None:
    p = add(
        "export",
        "write events as JSON lines",
        "Write the events of every space (or the SPACEs given) as JSON lines, one event per "
        "line with space, seq, type, payload, recorded_at, writer, generation and intent_id, "
        "to stdout or --file. `import` reads them back.",
        "shard-sql export > log.jsonl",
        "shard-sql export demo --file demo.jsonl --url git+file:///srv/log.git",
    )
    p.add_argument("spaces", metavar="SPACE", nargs="*", help="spaces to export (default all)")
    p.add_argument("--file", "-o", metavar="PATH", help="write here instead of stdout")
    p.set_defaults(func=export)

    p = add(
        "import",
        "read events from JSON lines (an export)",
        "Append the events of an export (JSON lines from stdin or --file) keeping their seq, "
        "writer, generation, intent_id and recorded_at. Each space must continue at the "
        "store's head; events already present and identical are skipped, so an interrupted "
        "import can be run again.",
        "shard-sql import --file log.jsonl --url postgresql+psycopg://postgres@127.0.0.1/app",
        "shard-sql export --url git+file:///srv/log.git | shard-sql import",
    )
    p.add_argument("--file", "-i", metavar="PATH", help="read here instead of stdin")
    p.set_defaults(func=import_)

    p = add(
        "copy",
        "copy the log of one store into another",
        "Copy every space (or the SPACEs given) from the store --url into the store --to, "
        "keeping seq, writer, generation, intent_id and recorded_at (export piped into import).",
        "shard-sql copy --url git+file:///srv/log.git --to postgresql+psycopg://postgres@db/app",
        "shard-sql copy demo --to git+file:///tmp/demo.git",
    )
    p.add_argument("spaces", metavar="SPACE", nargs="*", help="spaces to copy (default all)")
    p.add_argument("--to", required=True, metavar="URL", help="the store to copy into")
    p.set_defaults(func=copy)


@contextlib.contextmanager
def _output(path: str | None) -> Iterator[IO[str]]:
    """The file at `path` (UTF-8), or stdout."""
    if path is None or path == "-":
        yield sys.stdout
        return
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        yield f


def export(args: argparse.Namespace) -> None:
    with opened(store_url(args), create=False) as store:
        spaces = transfer.select_spaces(store, args.spaces)
        total = sum(store.head(s) for s in spaces)
        with _output(args.file) as out, progress("export", total) as bar:
            n = transfer.export_jsonl(store, out, spaces, progress=bar.advance)
    if args.file:
        emit(
            dumps({"exported": n, "spaces": len(spaces), "file": args.file})
            if args.json
            else f"exported {plural(n, 'event')} of {plural(len(spaces), 'space')} to {args.file}"
        )


def import_(args: argparse.Namespace) -> None:
    path = args.file
    if path is None or path == "-":
        name, size, source = "stdin", None, sys.stdin.buffer
        closing: contextlib.AbstractContextManager[object] = contextlib.nullcontext()
    else:
        source = open(path, "rb")  # noqa: SIM115 (closed below)
        name, size, closing = path, os.fstat(source.fileno()).st_size, source
    with (
        closing,
        opened(store_url(args), create=True) as store,
        progress("import", size, unit="bytes") as bar,
    ):
        report = transfer.import_jsonl(store, source, name, progress=bar.advance)
    _report(args, report)


def copy(args: argparse.Namespace) -> None:
    source_url, target_url = store_url(args), args.to
    if source_url == target_url:
        raise UsageError("--to names the source store itself")
    with opened(source_url, create=False) as source, opened(target_url, create=True) as target:
        spaces = transfer.select_spaces(source, args.spaces)
        total = sum(source.head(s) for s in spaces)
        with progress("copy", total) as bar:
            report = transfer.copy_events(source, target, spaces, progress=bar.advance)
    _report(args, report)


def _report(args: argparse.Namespace, report: ImportReport) -> None:
    if args.json:
        emit(
            dumps({"imported": report.written, "skipped": report.skipped, "spaces": report.spaces})
        )
    else:
        skipped = f" ({report.skipped} already present, skipped)" if report.skipped else ""
        emit(
            f"imported {plural(report.written, 'event')} into "
            f"{plural(report.spaces, 'space')}{skipped}"
        )
