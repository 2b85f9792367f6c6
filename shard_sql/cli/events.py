"""The commands that write and read events: `append`, `log` (and `--follow`), `spaces`."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from types import FrameType
from typing import Any

from shard_sql.cli.errors import UsageError
from shard_sql.cli.options import AddCommand, non_negative_int, positive_float
from shard_sql.cli.output import LogPrinter, emit, iso, table, time_left
from shard_sql.cli.stores import lease_registry, opened, store_url
from shard_sql.errors import InvalidEvent, ShardSqlError
from shard_sql.ports import EventStore, IntentQueue, LeaseStore
from shard_sql.transfer import UnknownSpace, dumps, event_to_json, json_kind, loads
from shard_sql.validation import check_text, pending
from shard_sql.values import Event

APPEND_TTL = 5.0
"""Seconds of the lease a CLI `append` takes; it is released as soon as the append is done, so
the TTL only matters when the process is killed mid-append (the space is then blocked this long)."""
FORWARD_TIMEOUT = 10.0
"""Seconds `append` waits for another node (the space's holder) to write a forwarded append."""
PAGE = 1000
"""Events read per call by `log`."""
FOLLOW_MIN_WAIT = 0.05
FOLLOW_MAX_WAIT = 1.0


def register(add: AddCommand) -> None:
    _register_append(add)
    _register_log(add)
    p = add(
        "spaces",
        "list the spaces with their heads and leases",
        "List the spaces that have events: head (the next seq = number of events) and the "
        "current lease, if any.",
        "shard-sql spaces",
        "shard-sql spaces --json",
    )
    p.set_defaults(func=spaces)


def _register_append(add: AddCommand) -> None:
    p = add(
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
        type=positive_float,
        default=FORWARD_TIMEOUT,
        help=f"seconds to wait for a forwarded append (default {FORWARD_TIMEOUT:g})",
    )
    p.add_argument(
        "--no-forward",
        action="store_true",
        help="fail (exit 3) instead of forwarding when another node holds the space",
    )
    p.set_defaults(func=append)


def _register_log(add: AddCommand) -> None:
    p = add(
        "log",
        "print the events of a space",
        "Print the events of SPACE in seq order (all, from --from-seq, or the --last N). A "
        "space that has no event is an error, "
        "except with --follow, which waits for its first events. --follow keeps printing new "
        "events as they commit until Ctrl-C (exit 0).",
        "shard-sql log demo",
        "shard-sql log demo --from-seq 100 --limit 10 --json",
        "shard-sql log demo --last 20",
        "shard-sql log demo --follow",
    )
    p.add_argument("space", metavar="SPACE", help="the space to read")
    start = p.add_mutually_exclusive_group()
    start.add_argument(
        "--from-seq", type=non_negative_int, default=0, metavar="N", help="start at seq N"
    )
    start.add_argument(
        "--last", type=non_negative_int, default=None, metavar="N", help="the last N events"
    )
    p.add_argument(
        "--limit", type=non_negative_int, default=None, metavar="N", help="at most N events"
    )
    p.add_argument("--follow", "-f", action="store_true", help="wait for new events")
    p.add_argument(
        "--interval",
        type=positive_float,
        default=FOLLOW_MAX_WAIT,
        metavar="SECONDS",
        help=f"longest wait between polls with --follow (default {FOLLOW_MAX_WAIT:g})",
    )
    p.set_defaults(func=log)


# -- append --------------------------------------------------------------------------------------


def read_payload(text: str) -> dict[str, Any]:
    """PAYLOAD_JSON (`-`: stdin) as a JSON object."""
    if text == "-":
        text = sys.stdin.read()
    try:
        value = loads(text)  # InvalidEvent("payload") when it nests too deep
    except InvalidEvent:
        raise
    except ValueError as e:
        raise UsageError(f"PAYLOAD_JSON is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise UsageError(f"PAYLOAD_JSON must be a JSON object, not {json_kind(value)}")
    return value


def default_node_id() -> str:
    """The node id of a CLI append: `cli-<host>-<pid>`, unique among live processes."""
    import socket

    host = socket.gethostname().split(".")[0] or "host"
    return f"cli-{host}-{os.getpid()}"


REUSED_AFTER = timedelta(seconds=1)
"""An event of the intent id recorded this long before the command started was not written by
it: the id was used before (an idempotent retry), so the output says so, not "forwarded to"."""


def append(args: argparse.Namespace) -> None:
    from shard_sql.authority import AppendAuthority

    payload = read_payload(args.payload)
    item = pending(args.type, payload, args.intent_id)  # checks before opening the store
    node_id = default_node_id() if args.node is None else check_text("node", args.node)
    started = datetime.now(UTC)
    with opened(store_url(args), create=True) as store:
        node = AppendAuthority(
            node_id,
            store,
            lease_registry(store),
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
    if args.json:
        emit(dumps(event_to_json(event)))
    else:
        how = "" if event.writer == node_id else f", forwarded to {event.writer!r}"
        if item.intent_id is not None and event.recorded_at < started - REUSED_AFTER:
            how = f", already written at {iso(event.recorded_at)} for intent {item.intent_id!r}"
        emit(
            f"{event.space} seq {event.seq}: {event.type} "
            f"(writer {event.writer}, generation {event.generation}{how})"
        )


# -- log -----------------------------------------------------------------------------------------


def log(args: argparse.Namespace) -> None:
    printer = LogPrinter(args.json)
    with opened(store_url(args), create=False) as store:
        space = args.space
        head = store.head(space)
        if not args.follow and head == 0:
            raise UnknownSpace(space)
        start = args.from_seq if args.last is None else max(head - args.last, 0)
        seq, remaining = _print_pages(store, space, start, args.limit, printer)
        if args.follow and remaining != 0:
            _follow(store, space, seq, remaining, printer, args.interval)


def _print_pages(
    store: EventStore, space: str, seq: int, remaining: int | None, printer: LogPrinter
) -> tuple[int, int | None]:
    """Print from `seq` to the head (at most `remaining` events); the next seq and what is left."""
    while remaining is None or remaining > 0:
        n = PAGE if remaining is None else min(PAGE, remaining)
        page: list[Event] = store.events(space, from_seq=seq, limit=n)
        printer.print(page)
        seq += len(page)
        if remaining is not None:
            remaining -= len(page)
        if len(page) < n:
            break
    return seq, remaining


def _follow(
    store: EventStore,
    space: str,
    seq: int,
    remaining: int | None,
    printer: LogPrinter,
    max_wait: float,
) -> None:
    """Print new events until Ctrl-C (or SIGTERM). Polls with back-off; a store that can wait
    for changes (`IntentQueue.wait_for_change`) ends each sleep early when something commits."""
    with until_interrupted():
        _follow_pages(store, space, seq, remaining, printer, max_wait)


@contextlib.contextmanager
def until_interrupted() -> Iterator[None]:
    """A block that Ctrl-C or SIGTERM ends normally (the end of a `--follow`: exit 0)."""
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.getsignal(signal.SIGTERM)

    def on_term(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    if previous is not None:
        signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    except KeyboardInterrupt:
        pass
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _follow_pages(
    store: EventStore,
    space: str,
    seq: int,
    remaining: int | None,
    printer: LogPrinter,
    max_wait: float,
) -> None:
    wait: Callable[[float], None] = time.sleep
    if isinstance(store, IntentQueue):
        queue = store

        def wait(seconds: float) -> None:
            queue.wait_for_change([space], seconds)

    delay = FOLLOW_MIN_WAIT
    while remaining is None or remaining > 0:
        before = seq
        seq, remaining = _print_pages(store, space, seq, remaining, printer)
        if seq > before:
            delay = FOLLOW_MIN_WAIT
            continue
        wait(delay)
        delay = min(delay * 2, max_wait)


# -- spaces --------------------------------------------------------------------------------------


def spaces(args: argparse.Namespace) -> None:
    with opened(store_url(args), create=False) as store:
        registry = lease_registry(store) if isinstance(store, LeaseStore) else None
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
                    "expires_at": iso(lease.expires_at) if lease else None,
                    "time_left": time_left(lease.expires_at, now) if lease else None,
                }
            )
    if args.json:
        for r in rows:
            emit(dumps({k: v for k, v in r.items() if k != "time_left"}))
    elif not rows:
        emit("no spaces yet")
    else:
        table(
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
            wrap=("SPACE", "HOLDER"),
        )
