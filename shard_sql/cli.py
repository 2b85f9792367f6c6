"""The `shard-sql` command line: a thin layer over the library (parse, call, print).

Every command opens the store named by `--url`, else `SHARD_SQL_URL`, else `sqlite:///shard.db`
in the current directory (created and migrated on first use). A `git+file:///path` URL or a plain
directory path selects the git store. Human output is a table; `--json` prints JSON lines.

Exit codes (see docs/cli.md):

    0  success
    1  operational error: store unreachable, schema not migrated, not a git repository,
       unknown space, file not readable
    2  usage error: bad arguments, bad JSON, invalid space/type/payload/URL
    3  contention: the space's lease is held by another node, a stale lease, a seq conflict,
       or a forwarded append not confirmed in time (retry with the same --intent-id)
    4  `verify` found a violated invariant
    130  interrupted (Ctrl-C), except `log --follow`, for which Ctrl-C is the normal end (0)
    141  stdout was closed early (`shard-sql log demo | head`), quietly

Any error ends with exactly one line on stderr, `shard-sql: error: ...`, and never a traceback
(`SHARD_SQL_DEBUG=1` shows the traceback of an unexpected error).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import inspect
import io
import json
import os
import signal
import socket
import sys
import textwrap
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Any, NoReturn

from shard_sql.errors import (
    IntentTimeout,
    InvalidEvent,
    LeaseHeld,
    SeqConflict,
    ShardSqlError,
    StaleLease,
)
from shard_sql.ports import BatchWriter, EventStore, IntentQueue, LeaseStore
from shard_sql.urls import DEFAULT_URL, URL_ENV, default_url, git_path, is_git_url, open_store
from shard_sql.validation import Pending, check_seq, check_space, check_text, pending
from shard_sql.values import Event

PROG = "shard-sql"

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_CONFLICT = 3
EXIT_VIOLATION = 4
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141

APPEND_TTL = 5.0
"""Seconds of the lease a CLI `append` takes; it is released as soon as the append is done, so
the TTL only matters when the process is killed mid-append (the space is then blocked this long)."""
FORWARD_TIMEOUT = 10.0
"""Seconds `append` waits for another node (the space's holder) to write a forwarded append."""
IMPORT_BATCH = 500
"""Events written per transaction by `import` and `copy`."""
FOLLOW_MIN_WAIT = 0.05
FOLLOW_MAX_WAIT = 1.0


class CliError(Exception):
    """A user-facing failure: one line on stderr and `code` as the exit status."""

    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.code = code


# -- argument parsing ----------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (`shard-sql: error: ...`) and exit code 2."""

    def error(self, message: str) -> NoReturn:
        hint = f" (see '{self.prog} --help')"
        raise CliError(f"{message}{hint}", EXIT_USAGE)


def _epilog(*examples: str) -> str:
    lines = "\n".join(f"  {e}" for e in examples)
    return f"examples:\n{lines}"


def build_parser() -> argparse.ArgumentParser:
    """The `shard-sql` parser with one subparser per command."""
    common = _Parser(add_help=False)
    common.add_argument(
        "--url",
        default=argparse.SUPPRESS,
        help=f"store URL (overrides ${URL_ENV}; default {DEFAULT_URL}); "
        "git+file:///path or a directory path selects the git store",
    )
    common.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="print JSON lines"
    )

    parser = _Parser(
        prog=PROG,
        description=textwrap.fill(
            "An append-only event log split into spaces, kept in SQL (SQLite, PostgreSQL) or "
            "git. The store is --url, else $SHARD_SQL_URL, else sqlite:///shard.db in the "
            "current directory.",
            79,
        ),
        epilog=_epilog(
            'shard-sql append demo page.created \'{"title": "Home"}\'',
            "shard-sql log demo",
            "shard-sql --url postgresql+psycopg://app@db/app spaces",
            "SHARD_SQL_URL=git+file:///srv/log.git shard-sql log demo --follow",
        )
        + "\n\nexit codes: 0 ok, 1 operational error, 2 usage error, 3 lease held or conflict,\n"
        "  4 verify found a violation, 130 interrupted",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--url", default=None, help=common._actions[0].help)
    parser.add_argument("--json", action="store_true", default=False, help="print JSON lines")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, summary: str, description: str, *examples: str) -> _Parser:
        p: _Parser = sub.add_parser(
            name,
            parents=[common],
            help=summary,
            description=textwrap.fill(description, 79),
            epilog=_epilog(*examples),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        return p

    p = command(
        "migrate",
        "upgrade a SQL database to the head schema",
        "Upgrade the SQL database to the head schema (alembic). A SQLite file is also migrated "
        "on open; PostgreSQL needs this once per upgrade. A git store needs no migration: it is "
        "created if missing.",
        "shard-sql migrate --url postgresql+psycopg://postgres@127.0.0.1/app",
    )
    p.set_defaults(func=cmd_migrate)

    p = command(
        "append",
        "append one event to a space",
        "Append one event through an append authority (node --node, lease TTL "
        f"{APPEND_TTL:g}s). When no node holds the space, this command takes its lease, writes "
        "at the head and releases the lease at once; when another node holds it, the event is "
        "forwarded to that holder, which writes it (waiting at most --timeout seconds). "
        "PAYLOAD_JSON is a JSON object, or '-' to read it from stdin.",
        'shard-sql append demo page.created \'{"title": "Home"}\'',
        'echo \'{"alias": "index"}\' | shard-sql append demo alias.set - --intent-id req-42',
    )
    p.add_argument("space", metavar="SPACE", help="the space (log) to append to")
    p.add_argument("type", metavar="TYPE", help="the event type, e.g. page.created")
    p.add_argument("payload", metavar="PAYLOAD_JSON", help="a JSON object, or - for stdin")
    p.add_argument("--intent-id", help="idempotency key: an append repeated with it writes once")
    p.add_argument("--node", help="node id of this writer (default cli-HOST-PID)")
    p.add_argument(
        "--timeout",
        type=_positive_float,
        default=FORWARD_TIMEOUT,
        help=f"seconds to wait for a forwarded append (default {FORWARD_TIMEOUT:g})",
    )
    p.add_argument(
        "--no-forward",
        action="store_true",
        help="fail (exit 3) instead of forwarding when another node holds the space",
    )
    p.set_defaults(func=cmd_append)

    p = command(
        "log",
        "print the events of a space",
        "Print the events of SPACE in seq order. A space that has no event is an error, "
        "except with --follow, which waits for its first events. --follow keeps printing new "
        "events as they commit until Ctrl-C (exit 0).",
        "shard-sql log demo",
        "shard-sql log demo --from-seq 100 --limit 10 --json",
        "shard-sql log demo --follow",
    )
    p.add_argument("space", metavar="SPACE", help="the space to read")
    p.add_argument(
        "--from-seq", type=_non_negative_int, default=0, metavar="N", help="start at seq N"
    )
    p.add_argument(
        "--limit", type=_non_negative_int, default=None, metavar="N", help="at most N events"
    )
    p.add_argument("--follow", "-f", action="store_true", help="wait for new events")
    p.add_argument(
        "--interval",
        type=_positive_float,
        default=FOLLOW_MAX_WAIT,
        metavar="SECONDS",
        help=f"longest wait between polls with --follow (default {FOLLOW_MAX_WAIT:g})",
    )
    p.set_defaults(func=cmd_log)

    p = command(
        "spaces",
        "list the spaces with their heads and leases",
        "List the spaces that have events: head (the next seq = number of events) and the "
        "current lease, if any.",
        "shard-sql spaces",
        "shard-sql spaces --json",
    )
    p.set_defaults(func=cmd_spaces)

    p = command(
        "lease",
        "show (or revoke) the lease of a space",
        "Show the valid lease of SPACE: holder, generation, expiry and time left. "
        "--revoke (operators) ends it now and bumps the generation, so the old holder is fenced "
        "and can no longer write.",
        "shard-sql lease demo",
        "shard-sql lease demo --revoke",
    )
    p.add_argument("space", metavar="SPACE", help="the space whose lease to show")
    p.add_argument("--revoke", action="store_true", help="end the lease now, fencing its holder")
    p.set_defaults(func=cmd_lease)

    p = command(
        "verify",
        "check the invariants of the store",
        "Check every space (or the SPACEs given): seqs 0..n-1, one event per intent_id, "
        "generation never decreasing along seq, one writer per generation. Prints a report; "
        "exit 4 when an invariant is violated.",
        "shard-sql verify",
        "shard-sql verify demo --json",
    )
    p.add_argument("spaces", metavar="SPACE", nargs="*", help="spaces to check (default all)")
    p.set_defaults(func=cmd_verify)

    p = command(
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
    p.set_defaults(func=cmd_export)

    p = command(
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
    p.set_defaults(func=cmd_import)

    p = command(
        "copy",
        "copy the log of one store into another",
        "Copy every space (or the SPACEs given) from the store --url into the store --to, "
        "keeping seq, writer, generation, intent_id and recorded_at (export piped into import).",
        "shard-sql copy --url git+file:///srv/log.git --to postgresql+psycopg://postgres@db/app",
        "shard-sql copy demo --to git+file:///tmp/demo.git",
    )
    p.add_argument("spaces", metavar="SPACE", nargs="*", help="spaces to copy (default all)")
    p.add_argument("--to", required=True, metavar="URL", help="the store to copy into")
    p.set_defaults(func=cmd_copy)

    p = command(
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
    p.set_defaults(func=cmd_bench)

    return parser


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 0")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
    return value


# -- main ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Run one `shard-sql` command; return its exit code."""
    try:
        args = build_parser().parse_args(argv)
    except CliError as e:
        return _fail(str(e), e.code)
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else EXIT_OK
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except CliError as e:
        return _fail(str(e), e.code)
    except (LeaseHeld, StaleLease, SeqConflict, IntentTimeout) as e:
        return _fail(str(e), EXIT_CONFLICT)
    except InvalidEvent as e:
        return _fail(str(e), EXIT_USAGE)
    except ShardSqlError as e:
        return _fail(str(e), EXIT_ERROR)
    except KeyboardInterrupt:
        return _fail("interrupted", EXIT_INTERRUPTED)
    except BrokenPipeError:
        # The reader of stdout went away (`shard-sql log x | head`): stop quietly.
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except OSError as e:
        return _fail(_os_error(e), EXIT_ERROR)
    except Exception as e:
        if os.environ.get("SHARD_SQL_DEBUG"):
            traceback.print_exc()
        return _fail(
            f"unexpected {type(e).__name__}: {_one_line(str(e))} "
            "(set SHARD_SQL_DEBUG=1 for the traceback)",
            EXIT_ERROR,
        )


def _fail(message: str, code: int) -> int:
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        _silence_stdout()
    print(f"{PROG}: error: {_one_line(message)}", file=sys.stderr, flush=True)
    return code


def _n(count: int, noun: str) -> str:
    """`1 event`, `2 events`."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _one_line(text: str) -> str:
    return " ".join(text.split()) or "(no message)"


def _os_error(e: OSError) -> str:
    if e.filename is not None and e.strerror:
        return f"{e.filename}: {e.strerror}"
    return str(e)


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


# -- the store -----------------------------------------------------------------------------------


def _url(args: argparse.Namespace) -> str:
    url: str | None = getattr(args, "url", None)
    if url is None:
        return default_url()
    if not url.strip():
        raise CliError("--url must not be empty", EXIT_USAGE)
    return url


def _json(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "json", False))


def display_url(url: str) -> str:
    """The URL with any password masked."""
    if is_git_url(url) or url.startswith("memory:"):
        return url
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


def _check_git_path(url: str) -> None:
    if not is_git_url(url):
        return
    path = git_path(url)
    if path.is_file():
        hint = ""
        if not url.startswith("git+file:"):
            hint = f"; for a SQLite file use sqlite:///{path}"
        raise CliError(f"{path} is a file, not a git repository{hint}", EXIT_ERROR)


class _Opened:
    """`with _Opened(url) as store:` opens a store and closes it at the end."""

    def __init__(self, url: str, *, migrate: bool = False) -> None:
        self.url = url
        self.migrate = migrate
        self.store: Any = None

    def __enter__(self) -> Any:
        _check_git_path(self.url)
        try:
            self.store = open_store(self.url, migrate=self.migrate)
        except ImportError as e:
            raise CliError(f"cannot open {display_url(self.url)}: {e}") from e
        return self.store

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        close = getattr(self.store, "close", None)
        if callable(close):
            try:
                close()
            except Exception:
                if exc is None:
                    raise


def _registry(store: object) -> Any:
    from shard_sql.leases import LeaseRegistry

    return LeaseRegistry(store if isinstance(store, LeaseStore) else None)


# -- output --------------------------------------------------------------------------------------


def event_dict(e: Event) -> dict[str, Any]:
    """An event as the JSON object of `log --json` and `export`."""
    return {
        "space": e.space,
        "seq": e.seq,
        "type": e.type,
        "payload": e.payload,
        "recorded_at": _iso(e.recorded_at),
        "writer": e.writer,
        "generation": e.generation,
        "intent_id": e.intent_id,
    }


def _iso(t: datetime) -> str:
    return t.astimezone(UTC).isoformat()


def _human_time(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"


def _dumps(obj: object) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def _emit(line: str, out: IO[str] | None = None) -> None:
    print(line, file=out or sys.stdout)


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    return [_row(r, widths) for r in [list(headers), *rows]]


def _row(cells: Sequence[str], widths: Sequence[int]) -> str:
    last = len(cells) - 1
    return "  ".join(c if i == last else c.ljust(widths[i]) for i, c in enumerate(cells)).rstrip()


class _LogPrinter:
    """Prints events as a table (column widths fixed by the first page) or JSON lines."""

    HEADERS = ("SEQ", "RECORDED (UTC)", "TYPE", "WRITER", "GEN", "INTENT", "PAYLOAD")

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self.widths: list[int] | None = None

    def print(self, events: Sequence[Event]) -> None:
        if not events:
            return
        if self.as_json:
            sys.stdout.write("".join(_dumps(event_dict(e)) + "\n" for e in events))
        else:
            rows = [
                [
                    str(e.seq),
                    _human_time(e.recorded_at),
                    e.type,
                    e.writer or "-",
                    str(e.generation),
                    e.intent_id or "-",
                    _dumps(e.payload),
                ]
                for e in events
            ]
            if self.widths is None:
                self.widths = [len(h) for h in self.HEADERS]
                for row in rows:
                    for i, cell in enumerate(row):
                        self.widths[i] = max(self.widths[i], len(cell))
                self.widths[0] = max(self.widths[0], len(str(events[-1].seq + 1000)))
                sys.stdout.write(_row(self.HEADERS, self.widths) + "\n")
            sys.stdout.write("".join(_row(r, self.widths) + "\n" for r in rows))
        sys.stdout.flush()


class Progress:
    """A progress bar on stderr, shown only when stderr is a terminal."""

    def __init__(self, label: str, total: int | None = None, *, stream: IO[str] | None = None):
        self.stream = stream or sys.stderr
        try:
            self.enabled = self.stream.isatty()
        except (AttributeError, ValueError):
            self.enabled = False
        self.label = label
        self.total = total
        self.done = 0
        self._last = 0.0

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self.enabled:
            now = time.monotonic()
            if now - self._last >= 0.1:
                self._last = now
                self._draw()

    def _draw(self) -> None:
        if self.total:
            frac = min(self.done / self.total, 1.0)
            bar = "#" * int(frac * 30)
            text = f"{self.label} [{bar:<30}] {frac:4.0%} {self.done}/{self.total}"
        else:
            text = f"{self.label} {self.done}"
        self.stream.write("\r" + text)
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self._draw()
            self.stream.write("\n")
            self.stream.flush()
            self.enabled = False


# -- commands ------------------------------------------------------------------------------------


def cmd_migrate(args: argparse.Namespace) -> int:
    url = _url(args)
    if is_git_url(url) or url.startswith("memory:"):
        with _Opened(url):
            pass
        message = f"{display_url(url)}: no schema to migrate (store ready)"
    else:
        import shard_sql

        shard_sql.migrate(url)
        message = f"{display_url(url)}: at the head schema"
    if _json(args):
        _emit(_dumps({"url": display_url(url), "migrated": True}))
    else:
        _emit(message)
    return EXIT_OK


def _read_payload(text: str) -> dict[str, Any]:
    if text == "-":
        text = sys.stdin.read()
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except ValueError as e:
        raise CliError(f"PAYLOAD_JSON is not valid JSON: {e}", EXIT_USAGE) from None
    if not isinstance(value, dict):
        raise CliError(f"PAYLOAD_JSON must be a JSON object, not {_json_kind(value)}", EXIT_USAGE)
    return value


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed (strict JSON)")


def _json_kind(value: object) -> str:
    kinds = {list: "an array", str: "a string", bool: "a boolean", int: "a number"}
    if value is None:
        return "null"
    return kinds.get(type(value), "a number")


def default_node_id() -> str:
    """The node id of a CLI append: `cli-<host>-<pid>`, unique among live processes."""
    host = socket.gethostname().split(".")[0] or "host"
    return f"cli-{host}-{os.getpid()}"


def cmd_append(args: argparse.Namespace) -> int:
    from shard_sql.authority import AppendAuthority

    payload = _read_payload(args.payload)
    item = pending(args.type, payload, args.intent_id)  # checks before opening the store
    node_id = check_text("node", args.node) if args.node else default_node_id()
    with _Opened(_url(args)) as store:
        node = AppendAuthority(
            node_id,
            store,
            _registry(store),
            ttl_seconds=APPEND_TTL,
            forward_timeout=args.timeout,
        )
        try:
            if args.no_forward:
                node.acquire(args.space)  # LeaseHeld when another node holds the space
                node.serve(args.space)  # what was forwarded to the previous holder comes first
            event = node.append(args.space, item.type, item.payload, intent_id=item.intent_id)
        finally:
            # A CLI process is short-lived: never keep the space from the other nodes.
            # (If the release fails, the lease lapses after its short TTL.)
            with contextlib.suppress(ShardSqlError):
                node.release(args.space)
    if _json(args):
        _emit(_dumps(event_dict(event)))
    else:
        how = "" if event.writer == node_id else f", forwarded to {event.writer!r}"
        _emit(
            f"{event.space} seq {event.seq}: {event.type} "
            f"(writer {event.writer}, generation {event.generation}{how})"
        )
    return EXIT_OK


def cmd_log(args: argparse.Namespace) -> int:
    page_size = 1000
    printer = _LogPrinter(_json(args))
    with _Opened(_url(args)) as store:
        space = args.space
        if not args.follow and store.head(space) == 0:
            raise CliError(f"unknown space {space!r}: it has no events (see 'shard-sql spaces')")
        seq: int = args.from_seq
        remaining: int | None = args.limit
        while remaining is None or remaining > 0:
            n = page_size if remaining is None else min(page_size, remaining)
            page: list[Event] = store.events(space, from_seq=seq, limit=n)
            printer.print(page)
            seq += len(page)
            if remaining is not None:
                remaining -= len(page)
            if len(page) < n:
                break
        if not args.follow or remaining == 0:
            return EXIT_OK
        return _follow(store, space, seq, remaining, printer, args.interval)


def _follow(
    store: EventStore,
    space: str,
    seq: int,
    remaining: int | None,
    printer: _LogPrinter,
    max_wait: float,
) -> int:
    """Print new events until Ctrl-C (or SIGTERM): exit 0. Polls with back-off; a store with
    notifications (PostgreSQL) wakes it as soon as something commits."""
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.getsignal(signal.SIGTERM)

    def on_term(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    if previous is not None:
        signal.signal(signal.SIGTERM, on_term)
    wait: Callable[[float], None] = time.sleep
    if isinstance(store, IntentQueue):
        queue = store

        def wait(seconds: float) -> None:
            queue.wait_for_change([space], seconds)

    delay = FOLLOW_MIN_WAIT
    try:
        while remaining is None or remaining > 0:
            n = 1000 if remaining is None else min(1000, remaining)
            page = store.events(space, from_seq=seq, limit=n)
            if page:
                printer.print(page)
                seq += len(page)
                if remaining is not None:
                    remaining -= len(page)
                delay = FOLLOW_MIN_WAIT
                continue
            wait(delay)
            delay = min(delay * 2, max_wait)
    except KeyboardInterrupt:
        pass
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return EXIT_OK


def cmd_spaces(args: argparse.Namespace) -> int:
    as_json = _json(args)
    with _Opened(_url(args)) as store:
        registry = _registry(store) if isinstance(store, LeaseStore) else None
        now = datetime.now(UTC)
        rows: list[dict[str, Any]] = []
        for space in store.spaces():
            lease = registry.current(space) if registry is not None else None
            rows.append(
                {
                    "space": space,
                    "head": store.head(space),
                    "holder": lease.holder if lease else None,
                    "generation": lease.generation if lease else None,
                    "expires_at": _iso(lease.expires_at) if lease else None,
                    "time_left": _left(lease.expires_at, now) if lease else None,
                }
            )
    if as_json:
        for r in rows:
            _emit(_dumps({k: v for k, v in r.items() if k != "time_left"}))
    elif not rows:
        _emit("no spaces yet")
    else:
        table = _table(
            ("SPACE", "HEAD", "HOLDER", "GEN", "TIME LEFT"),
            [
                [
                    r["space"],
                    str(r["head"]),
                    r["holder"] or "-",
                    "-" if r["generation"] is None else str(r["generation"]),
                    r["time_left"] or "-",
                ]
                for r in rows
            ],
        )
        _emit("\n".join(table))
    return EXIT_OK


def _left(expires_at: datetime, now: datetime) -> str:
    seconds = (expires_at - now).total_seconds()
    return f"{seconds:.1f}s" if seconds > 0 else "expired"


def cmd_lease(args: argparse.Namespace) -> int:
    space = args.space
    with _Opened(_url(args)) as store:
        registry = _registry(store)
        before = registry.current(space)
        if args.revoke:
            record = registry.revoke(space)
            result: dict[str, Any] = {
                "space": space,
                "revoked": record is not None,
                "previous_holder": before.holder if before else None,
                "generation": record.generation if record else None,
            }
            if _json(args):
                _emit(_dumps(result))
            elif record is None:
                _emit(f"{space}: no lease was ever granted; nothing to revoke")
            else:
                who = f"{before.holder!r} is fenced" if before else "it was not held"
                _emit(
                    f"{space}: lease revoked, generation is now {record.generation} ({who}); "
                    "the next grant takes a newer generation"
                )
            return EXIT_OK
    now = datetime.now(UTC)
    if _json(args):
        _emit(
            _dumps(
                {
                    "space": space,
                    "held": before is not None,
                    "holder": before.holder if before else None,
                    "generation": before.generation if before else None,
                    "expires_at": _iso(before.expires_at) if before else None,
                    "seconds_left": (
                        round(max((before.expires_at - now).total_seconds(), 0.0), 3)
                        if before
                        else None
                    ),
                }
            )
        )
    elif before is None:
        _emit(f"{space}: no valid lease (the next writer acquires it)")
    else:
        table = _table(
            ("SPACE", "HOLDER", "GEN", "EXPIRES (UTC)", "TIME LEFT"),
            [
                [
                    space,
                    before.holder,
                    str(before.generation),
                    _human_time(before.expires_at),
                    _left(before.expires_at, now),
                ]
            ],
        )
        _emit("\n".join(table))
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    from shard_sql.verify import verify

    with _Opened(_url(args)) as store:
        spaces: list[str] = args.spaces or store.spaces()
        for space in args.spaces:
            if store.head(space) == 0:
                raise CliError(f"unknown space {space!r}: it has no events")
        total = sum(store.head(s) for s in spaces)
        with Progress("verify", total) as bar:
            report = verify(store, spaces=spaces, progress=bar.advance)
    if _json(args):
        _emit(_dumps(report.to_dict()))
    else:
        rows = [
            [s.space, str(s.head), str(s.unfenced), str(s.generations), str(s.violations)]
            for s in report.spaces
        ]
        if rows:
            _emit("\n".join(_table(("SPACE", "HEAD", "UNFENCED", "GENS", "VIOLATIONS"), rows)))
        for v in report.violations:
            _emit(f"VIOLATION {v}")
        if report.violation_count > len(report.violations):
            _emit(f"... and {report.violation_count - len(report.violations)} more")
        verdict = "ok" if report.ok else "FAILED"
        _emit(
            f"{verdict}: {_n(len(report.spaces), 'space')}, {_n(report.events, 'event')}, "
            f"{_n(report.violation_count, 'violation')}"
        )
    if not report.ok:
        raise CliError(f"verify found {_n(report.violation_count, 'violation')}", EXIT_VIOLATION)
    return EXIT_OK


# -- export, import, copy ------------------------------------------------------------------------


def _selected(store: EventStore, spaces: Sequence[str]) -> list[str]:
    if not spaces:
        return store.spaces()
    for space in spaces:
        if store.head(space) == 0:
            raise CliError(f"unknown space {space!r}: it has no events")
    return list(dict.fromkeys(spaces))


def _events_of(store: EventStore, spaces: Sequence[str]) -> Iterator[Event]:
    for space in spaces:
        yield from store.iter_events(space)


def cmd_export(args: argparse.Namespace) -> int:
    with _Opened(_url(args)) as store:
        spaces = _selected(store, args.spaces)
        total = sum(store.head(s) for s in spaces)
        with _output(args.file) as out, Progress("export", total) as bar:
            n = 0
            for e in _events_of(store, spaces):
                out.write(_dumps(event_dict(e)) + "\n")
                n += 1
                bar.advance()
    if args.file:
        _emit(
            _dumps({"exported": n, "spaces": len(spaces), "file": args.file})
            if _json(args)
            else f"exported {_n(n, 'event')} of {_n(len(spaces), 'space')} to {args.file}"
        )
    return EXIT_OK


class _output:
    """A text output: the file at `path` (UTF-8), or stdout."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self.file: IO[str] | None = None

    def __enter__(self) -> IO[str]:
        if self.path is None or self.path == "-":
            return sys.stdout
        self.file = open(self.path, "w", encoding="utf-8", newline="\n")
        return self.file

    def __exit__(self, *exc: object) -> None:
        if self.file is not None:
            self.file.close()


def _check_target(store: object) -> BatchWriter:
    if not isinstance(store, BatchWriter):
        raise CliError(f"{type(store).__name__} cannot import events")
    return store


def cmd_import(args: argparse.Namespace) -> int:
    path = args.file
    stdin: io.TextIOWrapper | None = None
    if path is None or path == "-":
        stdin = io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8")
        source: IO[str] = stdin
        name = "stdin"
    else:
        source = open(path, encoding="utf-8")  # noqa: SIM115
        name = path
    try:
        with _Opened(_url(args)) as store:
            importer = Importer(_check_target(store))
            with Progress("import", None) as bar:
                for where, event in _parse_lines(source, name):
                    importer.add(event, where)
                    bar.advance()
                importer.flush()
    finally:
        if stdin is not None:
            stdin.detach()  # leave the process's stdin open
        else:
            source.close()
    _report_import(args, importer)
    return EXIT_OK


def cmd_copy(args: argparse.Namespace) -> int:
    source_url, target_url = _url(args), args.to
    if source_url == target_url:
        raise CliError("--to names the source store itself", EXIT_USAGE)
    with _Opened(source_url) as source, _Opened(target_url) as target:
        spaces = _selected(source, args.spaces)
        importer = Importer(_check_target(target))
        total = sum(source.head(s) for s in spaces)
        with Progress("copy", total) as bar:
            for e in _events_of(source, spaces):
                importer.add(e, f"{e.space!r} seq {e.seq}")
                bar.advance()
            importer.flush()
    _report_import(args, importer)
    return EXIT_OK


def _report_import(args: argparse.Namespace, importer: Importer) -> None:
    if _json(args):
        _emit(
            _dumps(
                {
                    "imported": importer.written,
                    "skipped": importer.skipped,
                    "spaces": len(importer.heads),
                }
            )
        )
    else:
        skipped = f" ({importer.skipped} already present, skipped)" if importer.skipped else ""
        _emit(
            f"imported {_n(importer.written, 'event')} into "
            f"{_n(len(importer.heads), 'space')}{skipped}"
        )


EVENT_KEYS = ("space", "seq", "type", "payload", "recorded_at", "writer", "generation")


def _parse_lines(source: Iterable[str], name: str) -> Iterator[tuple[str, Event]]:
    for number, line in enumerate(source, 1):
        if not line.strip():
            continue
        where = f"{name} line {number}"
        try:
            obj = json.loads(line, parse_constant=_reject_constant)
        except ValueError as e:
            raise CliError(f"{where}: not valid JSON: {e}", EXIT_USAGE) from None
        yield where, _event_from(obj, where)


def _event_from(obj: object, where: str) -> Event:
    """An exported event back from its JSON object; every field checked."""
    if not isinstance(obj, dict):
        raise CliError(f"{where}: expected a JSON object, not {_json_kind(obj)}", EXIT_USAGE)
    missing = [k for k in EVENT_KEYS if k not in obj]
    if missing:
        raise CliError(f"{where}: missing {', '.join(missing)}", EXIT_USAGE)
    try:
        space = check_space(obj["space"])
        seq = check_seq("seq", obj["seq"])
        generation = check_seq("generation", obj["generation"])
        writer = obj["writer"]
        if writer != "":
            writer = check_text("writer", writer)
        p = pending(obj["type"], obj["payload"], obj.get("intent_id"))
        at = obj["recorded_at"]
        if not isinstance(at, str):
            raise InvalidEvent("recorded_at", "must be an ISO 8601 string")
        try:
            recorded_at = datetime.fromisoformat(at)
        except ValueError:
            raise InvalidEvent("recorded_at", f"{at!r} is not an ISO 8601 time") from None
        if recorded_at.tzinfo is None:
            raise InvalidEvent("recorded_at", f"{at!r} has no time zone")
    except InvalidEvent as e:
        raise CliError(f"{where}: {e}", EXIT_USAGE) from None
    return Event(
        space,
        seq,
        p.type,
        p.payload,
        recorded_at.astimezone(UTC),
        writer,
        generation,
        p.intent_id,
    )


def same_event(a: Event, b: Event) -> bool:
    """Equal as far as every store can keep it (times compared to the millisecond)."""
    return (a.space, a.seq, a.type, a.payload, a.writer, a.generation, a.intent_id) == (
        b.space,
        b.seq,
        b.type,
        b.payload,
        b.writer,
        b.generation,
        b.intent_id,
    ) and abs((a.recorded_at - b.recorded_at).total_seconds()) < 0.001


class Importer:
    """Writes a stream of existing events into a store, keeping seq, writer, generation, times.

    Consecutive events of a space go in batches of `IMPORT_BATCH` through the store's internal
    `BatchWriter.write` (no fence: the events keep the writer and generation they were written
    under). Each space must continue at the target's head: events below it must be identical to
    those already there (they are skipped), and a gap is an error.
    """

    def __init__(self, target: BatchWriter, batch: int = IMPORT_BATCH) -> None:
        self.target = target
        self.batch_size = batch
        self.heads: dict[str, int] = {}
        self.expect: dict[str, int] = {}
        self.intents: dict[str, set[str]] = {}
        self.buffer: list[Event] = []
        self.written = 0
        self.skipped = 0

    def add(self, event: Event, where: str) -> None:
        space = event.space
        expected = self.expect.get(space)
        if expected is not None and event.seq != expected:
            raise CliError(
                f"{where}: space {space!r} seq {event.seq} does not follow seq {expected - 1}"
            )
        if event.intent_id is not None:
            seen = self.intents.setdefault(space, set())
            if event.intent_id in seen:
                raise CliError(
                    f"{where}: intent_id {event.intent_id!r} appears twice in space {space!r}"
                )
            seen.add(event.intent_id)
        self.expect[space] = event.seq + 1
        if self.buffer and (self.buffer[0].space != space or len(self.buffer) >= self.batch_size):
            self.flush()
        if space not in self.heads:
            head = self._head(space)
            if event.seq > head:
                raise CliError(
                    f"{where}: space {space!r} starts at seq {event.seq}, "
                    f"but the target's head is {head} (events {head}..{event.seq - 1} missing)"
                )
            self.heads[space] = head
        self.buffer.append(event)

    def _head(self, space: str) -> int:
        head: int = self.target.head(space) if isinstance(self.target, EventStore) else 0
        return head

    def flush(self) -> None:
        if not self.buffer:
            return
        batch, self.buffer = self.buffer, []
        space = batch[0].space
        head = self.heads[space]
        old = [e for e in batch if e.seq < head]
        new = batch[len(old) :]
        if old and isinstance(self.target, EventStore):
            there = self.target.events(space, from_seq=old[0].seq, limit=len(old))
            for mine, theirs in zip(old, there, strict=False):
                if not same_event(mine, theirs):
                    raise CliError(
                        f"space {space!r} seq {mine.seq} differs from the event already in the "
                        "target; import into an empty space (or a copy of this log)"
                    )
            self.skipped += len(old)
        if not new:
            return
        items = [_pending_of(e) for e in new]
        try:
            written = self.target.write(
                space, items, expected_seq=head, fence=None, verify_fence=False
            )
        except SeqConflict as e:
            raise CliError(
                f"space {space!r} changed during the import (head moved past {head}); "
                "run the import again to continue",
                EXIT_CONFLICT,
            ) from e
        if len(written) != len(new) or written[0].seq != head:
            raise CliError(
                f"space {space!r}: intent ids of seqs {new[0].seq}..{new[-1].seq} are already "
                "written at other seqs in the target; nothing was imported for them"
            )
        self.heads[space] = head + len(new)
        self.written += len(new)


def _pending_of(e: Event) -> Pending:
    return dataclasses.replace(
        pending(e.type, e.payload, e.intent_id),
        recorded_at=e.recorded_at,
        writer=e.writer,
        generation=e.generation,
    )


# -- bench ---------------------------------------------------------------------------------------

BENCH_MODULES = {"sql": "benchmarks.sql_bench", "git": "benchmarks.git_bench"}
"""The benchmark suites always looked for; any other `benchmarks/NAME_bench.py` of the source
checkout is the suite NAME. Each module provides `run(*, quick: bool = False, ...)` returning
rows (mappings or objects) with a work name, a figure, a baseline, a ratio and a target."""


def _bench_root() -> Path | None:
    """The directory holding `benchmarks/`: the source checkout of this package, else the
    current directory."""
    for root in (Path(__file__).resolve().parent.parent, Path.cwd()):
        if (root / "benchmarks").is_dir():
            return root
    return None


def bench_suites() -> dict[str, str]:
    """Suite name -> module, `sql` and `git` first."""
    suites = dict(BENCH_MODULES)
    root = _bench_root()
    if root is not None:
        for f in sorted((root / "benchmarks").glob("*_bench.py")):
            suites.setdefault(f.stem.removesuffix("_bench"), f"benchmarks.{f.stem}")
    return suites


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


def _load_bench(module: str) -> Any | None:
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


def _run_bench(module: Any, args: argparse.Namespace) -> list[Any]:
    run = getattr(module, "run", None)
    if not callable(run):
        raise CliError(f"{module.__name__} has no run() function")
    offered = {"quick": args.quick, "url": getattr(args, "url", None)}
    params = inspect.signature(run).parameters
    kwargs = {k: v for k, v in offered.items() if k in params and v is not None}
    return list(run(**kwargs) or [])


def _fmt_number(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.2f}" if abs(value) < 10 else f"{value:,.0f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _fmt_target(r: Mapping[str, Any]) -> str:
    """A ratio target (`0.85x`), or an absolute one (`>= 300`) for a row without a baseline."""
    target = r["target"]
    if target is None:
        return "-"
    if r["baseline"] is None:
        return f">= {_fmt_number(target)}"
    return f"{target:g}x"


def _bench_row(suite: str, row: object) -> dict[str, Any]:
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


def _bench_table(results: Sequence[Mapping[str, Any]]) -> list[str]:
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
        ("FIGURE", lambda r: _fmt_number(r["figure"])),
        ("BASELINE", lambda r: _fmt_number(r["baseline"])),
        ("RATIO", lambda r: "-" if r["ratio"] is None else f"{r['ratio']:.2f}x"),
        ("TARGET", lambda r: r.get("target_text") or _fmt_target(r)),
        ("MARK", lambda r: {True: "pass", False: "short", None: "-"}[r["ok"]]),
        ("UNIT", lambda r: str(r["unit"] or "")),
        ("NOTE", lambda r: str(r["note"])),
    ]
    return _table([c[0] for c in columns], [[f(r) for _, f in columns] for r in results])


DEFAULT_BENCH = "perf"
"""The suite `bench` runs by default when it exists: the one table of every target
(benchmarks/perf_bench.py); else every suite runs."""


def cmd_bench(args: argparse.Namespace) -> int:
    suites = bench_suites()
    if args.only:
        names: list[str] = list(dict.fromkeys(args.only))
    elif args.all or DEFAULT_BENCH not in suites:
        names = list(suites)
    else:
        names = [DEFAULT_BENCH]
    unknown = [n for n in names if n not in suites]
    if unknown:
        raise CliError(f"unknown suite {unknown[0]!r} (known: {', '.join(suites)})", EXIT_USAGE)
    modules: dict[str, Any] = {}
    for n in names:
        try:
            modules[n] = _load_bench(suites[n])
        except ImportError as e:
            raise CliError(f"cannot import {suites[n]}: {e}") from e
    found = {n: m for n, m in modules.items() if m is not None}
    if not found:
        raise CliError(
            "no benchmarks found (benchmarks/sql_bench.py, benchmarks/git_bench.py); "
            "run from a source checkout"
        )
    for n in [n for n in names if n not in found]:
        print(f"{PROG}: note: {suites[n]} not found; skipped", file=sys.stderr)
    results: list[dict[str, Any]] = []
    with Progress("bench", len(found)) as bar:
        for name, module in found.items():
            results += [_bench_row(name, row) for row in _run_bench(module, args)]
            bar.advance()
    if _json(args):
        for r in results:
            _emit(_dumps(r))
    elif results:
        _emit("\n".join(_bench_table(results)))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
