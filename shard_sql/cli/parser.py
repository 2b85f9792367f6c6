"""The `shard-sql` parser: the common options and one subparser per command.

Each group of commands registers its own (`register(add)` in admin, events, leases, transfer,
bench); this module only assembles them.
"""

from __future__ import annotations

import argparse

from shard_sql.cli import admin, bench, events, feed, leases, transfer
from shard_sql.cli.options import Parser, ShowVersion, examples, paragraph
from shard_sql.cli.output import PROG
from shard_sql.urls import DEFAULT_URL, URL_ENV

URL_HELP = (
    f"store URL (overrides ${URL_ENV}; default {DEFAULT_URL}); "
    "git+file:///path or a directory path selects the git store"
)
EXIT_CODES = (
    "exit codes: 0 ok, 1 operational error, 2 usage error, 3 lease held or conflict,\n"
    "  4 verify found a violation, 130 interrupted"
)


SCHEMA_HELP = (
    "PostgreSQL: the schema of shard_sql's tables (beside an application's own), as "
    "?shard_sql_schema=NAME in the URL"
)


def _common_options() -> Parser:
    """`--url`, `--schema` and `--json`, accepted after the command too (they override the ones
    before)."""
    common = Parser(add_help=False)
    common.add_argument("--url", default=argparse.SUPPRESS, help=URL_HELP)
    common.add_argument("--schema", metavar="NAME", default=argparse.SUPPRESS, help=SCHEMA_HELP)
    common.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="print JSON lines"
    )
    return common


def build_parser() -> Parser:
    """The `shard-sql` parser with one subparser per command."""
    parser = Parser(
        prog=PROG,
        description=paragraph(
            "An append-only event log split into spaces, kept in SQL (SQLite, PostgreSQL) or "
            "git. The store is --url, else $SHARD_SQL_URL, else sqlite:///shard.db in the "
            "current directory."
        ),
        epilog=examples(
            'shard-sql append demo page.created \'{"title": "Home"}\'',
            "shard-sql log demo",
            "shard-sql --url postgresql+psycopg://app@db/app spaces",
            "SHARD_SQL_URL=git+file:///srv/log.git shard-sql log demo --follow",
        )
        + "\n\n"
        + EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action=ShowVersion)
    parser.add_argument("--url", default=None, help=URL_HELP)
    parser.add_argument("--schema", metavar="NAME", default=None, help=SCHEMA_HELP)
    parser.add_argument("--json", action="store_true", default=False, help="print JSON lines")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    common = _common_options()

    def add(name: str, summary: str, description: str, *lines: str) -> Parser:
        p: Parser = sub.add_parser(
            name,
            parents=[common],
            help=summary,
            description=paragraph(description),
            epilog=examples(*lines),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        return p

    for group in (admin, events, feed, leases, transfer, bench):
        group.register(add)
    return parser


def commands(parser: argparse.ArgumentParser | None = None) -> dict[str, argparse.ArgumentParser]:
    """Each command's name and parser (for help checks and docs)."""
    parser = parser or build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}
