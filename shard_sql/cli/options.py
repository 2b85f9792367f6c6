"""Building blocks of the parser: the one-line usage error, argument types, a command's help."""

from __future__ import annotations

import argparse
import sys
import textwrap
from collections.abc import Sequence
from typing import Any, NoReturn, Protocol

from shard_sql.cli.errors import UsageError


class Parser(argparse.ArgumentParser):
    """argparse whose errors are a `UsageError` (one line, exit 2), not a print and exit."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


class ShowVersion(argparse.Action):
    """`--version`: the installed distribution's version (importlib.metadata, loaded only here:
    it costs tens of milliseconds that every other command would pay)."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS) -> None:
        super().__init__(
            option_strings, dest, default=argparse.SUPPRESS, nargs=0, help="show the version"
        )

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> NoReturn:
        from importlib.metadata import PackageNotFoundError, version

        try:
            installed = version("shard_sql")
        except PackageNotFoundError:
            installed = "(not installed)"
        print(f"{parser.prog} {installed}", file=sys.stdout, flush=True)
        parser.exit()


class AddCommand(Protocol):
    """Adds one command: its summary (one line in `shard-sql --help`), its description (a
    paragraph in `shard-sql NAME --help`) and its examples (at least one)."""

    def __call__(self, name: str, summary: str, description: str, *examples: str) -> Parser: ...


def examples(*lines: str) -> str:
    """An epilog listing example command lines."""
    return "examples:\n" + "\n".join(f"  {e}" for e in lines)


def paragraph(text: str) -> str:
    return textwrap.fill(text, 79)


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 0")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
    return value
