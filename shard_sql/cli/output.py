"""What the commands print: lines, tables (rich), the event log's rows, progress bars (rich).

rich is imported only when a table or a bar is drawn, so `shard-sql --help` does not load it.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import IO, Any

from shard_sql.transfer import dumps, event_to_json
from shard_sql.values import Event

PROG = "shard-sql"

TABLE_WIDTH = 120
"""Tables fit this many columns (fewer on a narrower terminal)."""


def emit(line: str, out: IO[str] | None = None) -> None:
    print(line, file=out or sys.stdout)


def plural(count: int, noun: str) -> str:
    """`1 event`, `2 events`."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def one_line(text: str) -> str:
    return " ".join(text.split()) or "(no message)"


def iso(t: datetime) -> str:
    return t.astimezone(UTC).isoformat()


def human_time(t: datetime) -> str:
    """`2026-01-02 03:04:05.678Z`."""
    return t.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"


def time_left(expires_at: datetime, now: datetime) -> str:
    seconds = (expires_at - now).total_seconds()
    return f"{seconds:.1f}s" if seconds > 0 else "expired"


_CONTROLS = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
_KEPT = frozenset({"\u200d"})
"""Format characters shown as they are: the zero-width joiner of emoji sequences."""


def printable(text: str) -> str:
    """`text` with what could drive a terminal escaped as JSON does (`\\u202e`): C0 and C1
    controls (ESC, CSI, NEL...), format characters (bidi overrides, zero-width spaces) and line
    or paragraph separators. Inside a payload's JSON text the result is still that JSON."""
    if text.isprintable():
        return text
    import unicodedata

    out: list[str] = []
    for ch in text:
        if ch in _KEPT or unicodedata.category(ch) not in _CONTROLS:
            out.append(ch)
        elif ord(ch) > 0xFFFF:  # as JSON writes it: a surrogate pair
            code = ord(ch) - 0x10000
            out.append(f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}")
        else:
            out.append(f"\\u{ord(ch):04x}")
    return "".join(out)


def _is_tty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def table_width(stream: IO[str] | None = None) -> int:
    """`TABLE_WIDTH`, or the terminal's width when it is narrower."""
    stream = stream or sys.stdout
    if _is_tty(stream):
        import shutil

        return max(40, min(TABLE_WIDTH, shutil.get_terminal_size((TABLE_WIDTH, 24)).columns))
    return TABLE_WIDTH


def table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], *, wrap: Sequence[str] = ()
) -> None:
    """Print a table that fits `table_width()`: the columns named in `wrap` wrap their text,
    the others keep each cell on one line (cut with an ellipsis if they must)."""
    from rich.console import Console
    from rich.table import Table

    console = Console(
        file=sys.stdout,
        width=table_width(),
        markup=False,
        emoji=False,
        highlight=False,
    )
    t = Table(box=None, show_edge=False, pad_edge=False, padding=(0, 2, 0, 0))
    for h in headers:
        t.add_column(h, no_wrap=h not in wrap, overflow="fold" if h in wrap else "ellipsis")
    for row in rows:
        t.add_row(*(printable(cell) for cell in row))
    with console.capture() as captured:
        console.print(t)
    sys.stdout.write("".join(line.rstrip() + "\n" for line in captured.get().splitlines()))


# -- the event log -------------------------------------------------------------------------------


def _cells(text: str) -> int:
    if text.isascii():
        return len(text)
    from rich.cells import cell_len

    return int(cell_len(text))


def _fit(text: str, width: int) -> str:
    """`text` cut to `width` terminal cells, with an ellipsis if it was cut."""
    if _cells(text) <= width:
        return text
    if text.isascii():
        return text[: width - 1] + "…"
    from rich.cells import set_cell_size

    return str(set_cell_size(text, width - 1)).rstrip() + "…"


class LogPrinter:
    """Prints events as table rows or JSON lines, page by page (`log`, `log --follow`).

    Column widths are fixed by the first page (later rows line up under the same header);
    rows are cut to fit `table_width()`, the payload last. Hand-written rather than rich: rich
    renders about 0.3 ms per row (0.33 s per 1,000), this about 100 times less.
    """

    HEADERS: tuple[str, ...] = (
        "SEQ",
        "RECORDED (UTC)",
        "TYPE",
        "WRITER",
        "GEN",
        "INTENT",
        "PAYLOAD",
    )
    CAPS: tuple[int, ...] = (20, 24, 24, 24, 12, 20)
    """The widest each column but the payload may be."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self.widths: list[int] | None = None

    def print(self, events: Sequence[Event]) -> None:
        if not events:
            return
        if self.as_json:
            sys.stdout.write("".join(dumps(event_to_json(e)) + "\n" for e in events))
        else:
            rows = [self._cells(e) for e in events]
            if self.widths is None:
                self.widths = self._widths(rows, self._number(events[-1]))
                sys.stdout.write(self._line(self.HEADERS) + "\n")
            sys.stdout.write("".join(self._line(r) + "\n" for r in rows))
        sys.stdout.flush()

    @staticmethod
    def _number(e: Event) -> int:
        """The number of the first column."""
        return e.seq

    @staticmethod
    def _cells(e: Event) -> list[str]:
        return [
            str(e.seq),
            human_time(e.recorded_at),
            printable(e.type),
            printable(e.writer) or "-",
            str(e.generation),
            printable(e.intent_id or "-"),
            printable(dumps(e.payload)),
        ]

    def _widths(self, rows: Sequence[Sequence[str]], last_number: int) -> list[int]:
        widths = [_cells(h) for h in self.HEADERS[:-1]]
        for row in rows:
            for i, cell in enumerate(row[:-1]):
                widths[i] = max(widths[i], _cells(cell))
        widths[0] = max(widths[0], len(str(last_number + 1000)))
        widths = [min(w, cap) for w, cap in zip(widths, self.CAPS, strict=True)]
        payload = max(table_width() - sum(widths) - 2 * len(widths), 16)
        return [*widths, payload]

    def _line(self, cells: Sequence[str]) -> str:
        assert self.widths is not None
        last = len(cells) - 1
        out: list[str] = []
        for i, (cell, width) in enumerate(zip(cells, self.widths, strict=True)):
            text = _fit(cell, width)
            out.append(text if i == last else text + " " * (width - _cells(text)))
        return "  ".join(out).rstrip()


class FeedPrinter(LogPrinter):
    """`LogPrinter` for the feed (`feed`, `feed --follow`): position, space and seq first; JSON
    lines carry the position too."""

    HEADERS = ("POSITION", "SPACE", "SEQ", "RECORDED (UTC)", "TYPE", "PAYLOAD")
    CAPS = (20, 32, 12, 24, 24)

    def print(self, events: Sequence[Event]) -> None:
        if events and self.as_json:
            sys.stdout.write(
                "".join(dumps({"position": e.position, **event_to_json(e)}) + "\n" for e in events)
            )
            sys.stdout.flush()
            return
        super().print(events)

    @staticmethod
    def _number(e: Event) -> int:
        return e.position or 0

    @staticmethod
    def _cells(e: Event) -> list[str]:
        return [
            str(e.position),
            printable(e.space),
            str(e.seq),
            human_time(e.recorded_at),
            printable(e.type),
            printable(dumps(e.payload)),
        ]


# -- progress ------------------------------------------------------------------------------------


class Bar:
    """A progress bar on stderr; does nothing unless stderr is a terminal."""

    def __init__(self, progress: Any = None, task: Any = None) -> None:
        self._progress = progress
        self._task = task
        self.done = 0
        self._shown = 0.0

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self._progress is not None:
            now = time.monotonic()
            if now - self._shown >= 0.05:
                self._shown = now
                self._progress.update(self._task, completed=self.done)

    def describe(self, text: str) -> None:
        """Show `text` as the bar's label (`bench`: the row being measured)."""
        if self._progress is not None:
            self._progress.update(self._task, description=text)

    def _finish(self) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=self.done)


@contextlib.contextmanager
def progress(
    label: str, total: int | None = None, *, unit: str = "", stream: IO[str] | None = None
) -> Iterator[Bar]:
    """A `Bar` with a percentage when `total` is known; `unit="bytes"` counts in kB/MB."""
    stream = stream or sys.stderr
    if not _is_tty(stream):
        yield Bar()
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        MofNCompleteColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeRemainingColumn,
    )

    count = DownloadColumn() if unit == "bytes" else MofNCompleteColumn()
    columns = [TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), count]
    if unit and unit != "bytes":
        columns.append(TextColumn(unit))
    with Progress(
        *columns,
        TimeRemainingColumn(),
        console=Console(file=stream, width=table_width(stream)),
        redirect_stdout=False,
        redirect_stderr=False,
    ) as p:
        bar = Bar(p, p.add_task(label, total=total))
        try:
            yield bar
        finally:
            bar._finish()
