"""The commands that read the store-wide feed: `feed` (and `--follow`), `checkpoints`."""

from __future__ import annotations

import argparse
import contextlib
from typing import Any

from shard_sql.cli.errors import CommandFailed
from shard_sql.cli.events import FOLLOW_MAX_WAIT, PAGE, until_interrupted
from shard_sql.cli.options import AddCommand, non_negative_int, positive_float
from shard_sql.cli.output import FeedPrinter, emit, iso, table
from shard_sql.cli.stores import lease_registry, opened, store_url
from shard_sql.errors import InvalidEvent
from shard_sql.ports import FeedStore, LeaseStore
from shard_sql.subscription import LEASE_PREFIX
from shard_sql.transfer import dumps
from shard_sql.validation import check_space, check_types


def register(add: AddCommand) -> None:
    p = add(
        "feed",
        "print the events of every space in feed order",
        "Print the store-wide feed: every space's events in position order, those after "
        "--after N (the last position a consumer saw), only the types given with --type. "
        "--follow keeps printing new events as they commit until Ctrl-C (exit 0).",
        "shard-sql feed",
        "shard-sql feed --after 1200 --type page.created --type alias.set --json",
        "shard-sql feed --follow",
    )
    p.add_argument(
        "--after", type=non_negative_int, default=0, metavar="N", help="events after position N"
    )
    p.add_argument(
        "--type",
        dest="types",
        action="extend",
        nargs="+",
        metavar="T",
        help="only events of type T (repeat it, or name several)",
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
        help=f"longest wait for news with --follow (default {FOLLOW_MAX_WAIT:g})",
    )
    p.set_defaults(func=feed)
    p = add(
        "checkpoints",
        "list the named consumers of the feed and how far behind they are",
        "List every checkpoint (a named consumer of the feed, such as a Subscription): the "
        "position it processed up to, its lag behind the feed's head, and the holder of its "
        "lease subscription:NAME when one is valid.",
        "shard-sql checkpoints",
        "shard-sql checkpoints --json",
    )
    p.set_defaults(func=checkpoints)


def _feed_store(store: object) -> FeedStore:
    if not isinstance(store, FeedStore):
        raise CommandFailed(f"this {type(store).__name__} keeps no feed")
    return store


def feed(args: argparse.Namespace) -> None:
    types = check_types(args.types)
    printer = FeedPrinter(args.json)
    with opened(store_url(args), create=False) as opened_store:
        store = _feed_store(opened_store)
        after, remaining = args.after, args.limit
        with until_interrupted() if args.follow else contextlib.nullcontext():
            while remaining is None or remaining > 0:
                n = PAGE if remaining is None else min(PAGE, remaining)
                page = store.feed(after, limit=n, types=types)
                printer.print(page)
                if page:
                    after = page[-1].position or after
                if remaining is not None:
                    remaining -= len(page)
                if len(page) < n and not args.follow:
                    return
                if not page:
                    store.wait_feed(after, timeout=args.interval)


def _holder(registry: Any, name: str) -> Any:
    """The valid lease of subscription `name`, if any (a name too long for one has none)."""
    try:
        space = check_space(LEASE_PREFIX + name)
    except InvalidEvent:
        return None
    return registry.current(space)


def checkpoints(args: argparse.Namespace) -> None:
    with opened(store_url(args), create=False) as opened_store:
        store = _feed_store(opened_store)
        saved = store.checkpoints()
        head = store.feed_head()
        registry = lease_registry(store) if isinstance(store, LeaseStore) else None
        rows: list[dict[str, Any]] = []
        for name, position in saved.items():
            lease = _holder(registry, name) if registry is not None else None
            rows.append(
                {
                    "name": name,
                    "position": position,
                    "lag": max(head - position, 0),
                    "holder": lease.holder if lease else None,
                    "generation": lease.generation if lease else None,
                    "expires_at": iso(lease.expires_at) if lease else None,
                }
            )
    if args.json:
        for r in rows:
            emit(dumps(r))
    elif not rows:
        emit(f"no checkpoints yet (feed head {head})")
    else:
        table(
            ("NAME", "POSITION", "LAG", "HOLDER"),
            [[r["name"], str(r["position"]), str(r["lag"]), r["holder"] or "-"] for r in rows],
            wrap=("NAME", "HOLDER"),
        )
