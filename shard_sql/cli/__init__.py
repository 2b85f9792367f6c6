"""The `shard-sql` command line: a thin layer over the library (parse, call, print).

`main` runs one command and is the one place that turns an error into one stderr line,
`shard-sql: error: ...`, and an exit code (the table is in docs/cli.md).
"""

from __future__ import annotations

import os
import sys
import traceback

from shard_sql.cli.errors import UsageError, ViolationsFound
from shard_sql.cli.output import PROG, one_line, printable
from shard_sql.cli.parser import build_parser
from shard_sql.errors import (
    IntentConflict,
    IntentTimeout,
    InvalidEvent,
    LeaseHeld,
    SeqConflict,
    ShardSqlError,
    StaleLease,
)

__all__ = ["EXIT_CODES", "exit_code", "main"]

EXIT_OK = 0
EXIT_ERROR = 1
"""Operational: store unreachable, schema not migrated, not a git repository, unknown space."""
EXIT_USAGE = 2
"""Bad arguments, bad JSON, an invalid space, type, payload, URL or input line, an intent id
already written with another payload."""
EXIT_CONFLICT = 3
"""The lease is held by another node, a stale lease, a seq conflict, a forward not confirmed."""
EXIT_VIOLATION = 4
"""`verify` found a violated invariant."""
EXIT_INTERRUPTED = 130
"""Ctrl-C (but for `log --follow`, whose normal end it is: 0)."""
EXIT_BROKEN_PIPE = 141
"""stdout was closed early (`shard-sql log demo | head`): quietly."""

EXIT_CODES: tuple[tuple[type[BaseException] | tuple[type[BaseException], ...], int], ...] = (
    (ViolationsFound, EXIT_VIOLATION),
    ((UsageError, InvalidEvent, IntentConflict), EXIT_USAGE),
    ((LeaseHeld, StaleLease, SeqConflict, IntentTimeout), EXIT_CONFLICT),
    (ShardSqlError, EXIT_ERROR),
)
"""The exit code of each kind of `ShardSqlError`, the first that matches."""


def main(argv: list[str] | None = None) -> int:
    """Run one `shard-sql` command; return its exit code."""
    try:
        args = build_parser().parse_args(argv)
        args.func(args)
        return EXIT_OK
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else EXIT_OK
    except ShardSqlError as e:
        return _fail(str(e), exit_code(e))
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
            f"unexpected {type(e).__name__}: {one_line(str(e))} "
            "(set SHARD_SQL_DEBUG=1 for the traceback)",
            EXIT_ERROR,
        )


def exit_code(error: ShardSqlError) -> int:
    for kinds, code in EXIT_CODES:
        if isinstance(error, kinds):
            return code
    return EXIT_ERROR


def _fail(message: str, code: int) -> int:
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        _silence_stdout()
    print(f"{PROG}: error: {printable(one_line(message))}", file=sys.stderr, flush=True)
    return code


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
