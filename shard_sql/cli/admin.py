"""The operators' commands: `migrate` (the SQL schema) and `verify` (the invariants)."""

from __future__ import annotations

import argparse

from shard_sql.cli.errors import ViolationsFound
from shard_sql.cli.options import AddCommand
from shard_sql.cli.output import emit, plural, progress, table
from shard_sql.cli.stores import display_url, opened, store_url
from shard_sql.transfer import UnknownSpace, dumps
from shard_sql.urls import is_git_url


def register(add: AddCommand) -> None:
    p = add(
        "migrate",
        "upgrade a SQL database to the head schema",
        "Upgrade the SQL database to the head schema (alembic) and say what it did (from which "
        "revision, or already at the head). A SQLite file is also migrated on open; PostgreSQL "
        "needs this once per upgrade. A git store needs no migration: a git+file:// one is "
        "created if missing. With --check, change nothing: exit 0 when shard_sql's tables are "
        "at the head schema, else 1 with one line saying what is behind, foreign or different "
        "(only shard_sql's tables are looked at: it works in a database shared with an "
        "application).",
        "shard-sql migrate --url postgresql+psycopg://postgres@127.0.0.1/app",
        "shard-sql migrate --check",
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="only check that the schema is at head (exit 1 with the reason if not)",
    )
    p.set_defaults(func=migrate)

    p = add(
        "verify",
        "check the invariants of the store",
        "Check every space (or the SPACEs given): seqs 0..n-1, one event per intent_id, "
        "generation never decreasing along seq, one writer per generation. Prints a report; "
        "exit 4 when an invariant is violated.",
        "shard-sql verify",
        "shard-sql verify demo --json",
    )
    p.add_argument("spaces", metavar="SPACE", nargs="*", help="spaces to check (default all)")
    p.set_defaults(func=verify)


def migrate(args: argparse.Namespace) -> None:
    if args.check:
        check(args)
        return
    url = store_url(args)
    shown = display_url(url)
    before: str | None = None
    after: str | None = None
    if is_git_url(url) or url.startswith("memory:"):
        with opened(url, create=True):
            pass
        message = f"{shown}: no schema to migrate (store ready)"
    else:
        from shard_sql.sql import upgrade

        done = upgrade(url)
        before, after = done.before, done.after
        if done.changed:
            message = f"{shown}: migrated from {before or 'none'} to {after}"
        else:
            message = f"{shown}: already at {after}"
    if args.json:
        emit(dumps({"url": shown, "migrated": before != after, "from": before, "to": after}))
    else:
        emit(message)


def check(args: argparse.Namespace) -> None:
    url = store_url(args)
    shown = display_url(url)
    if is_git_url(url) or url.startswith("memory:"):
        revision = None
        message = f"{shown}: no schema to check"
    else:
        from shard_sql.sql import check_schema

        revision = check_schema(url)
        message = f"{shown}: at {revision} (head)"
    if args.json:
        emit(dumps({"url": shown, "ok": True, "revision": revision}))
    else:
        emit(message)


def verify(args: argparse.Namespace) -> None:
    from shard_sql.verify import verify

    with opened(store_url(args), create=False) as store:
        spaces: list[str] = args.spaces or store.spaces()
        for space in args.spaces:
            if store.head(space) == 0:
                raise UnknownSpace(space)
        total = sum(store.head(s) for s in spaces)
        with progress("verify", total) as bar:
            report = verify(store, spaces=spaces, progress=bar.advance)
    if args.json:
        emit(dumps(report.to_dict()))
    else:
        rows = [
            [s.space, str(s.head), str(s.unfenced), str(s.generations), str(s.violations)]
            for s in report.spaces
        ]
        if rows:
            table(("SPACE", "HEAD", "UNFENCED", "GENS", "VIOLATIONS"), rows, wrap=("SPACE",))
        for v in report.violations:
            emit(f"VIOLATION {v}")
        if report.violation_count > len(report.violations):
            emit(f"... and {report.violation_count - len(report.violations)} more")
        verdict = "ok" if report.ok else "FAILED"
        emit(
            f"{verdict}: {plural(len(report.spaces), 'space')}, "
            f"{plural(report.events, 'event')}, {plural(report.violation_count, 'violation')}"
        )
    if not report.ok:
        raise ViolationsFound(f"verify found {plural(report.violation_count, 'violation')}")
