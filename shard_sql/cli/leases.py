"""The `lease` command: show a space's lease, or revoke it (operators)."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from typing import Any

from shard_sql.cli.options import AddCommand
from shard_sql.cli.output import emit, human_time, iso, table, time_left
from shard_sql.cli.stores import lease_registry, opened, store_url
from shard_sql.transfer import dumps
from shard_sql.values import Lease


def register(add: AddCommand) -> None:
    p = add(
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
    p.set_defaults(func=lease)


def lease(args: argparse.Namespace) -> None:
    space = args.space
    with opened(store_url(args), create=False) as store:
        registry = lease_registry(store)
        before = registry.current(space)
        if args.revoke:
            _revoked(args, space, before, registry.revoke(space))
            return
    now = datetime.now(UTC)
    if args.json:
        emit(dumps(_shown(space, before, now)))
    elif before is None:
        emit(f"{space}: no valid lease (the next writer acquires it)")
    else:
        table(
            ("SPACE", "HOLDER", "GEN", "EXPIRES (UTC)", "TIME LEFT"),
            [
                [
                    space,
                    before.holder,
                    str(before.generation),
                    human_time(before.expires_at),
                    time_left(before.expires_at, now),
                ]
            ],
            wrap=("SPACE", "HOLDER"),
        )


def _shown(space: str, lease: Lease | None, now: datetime) -> dict[str, Any]:
    return {
        "space": space,
        "held": lease is not None,
        "holder": lease.holder if lease else None,
        "generation": lease.generation if lease else None,
        "expires_at": iso(lease.expires_at) if lease else None,
        "seconds_left": (
            round(max((lease.expires_at - now).total_seconds(), 0.0), 3) if lease else None
        ),
    }


def _revoked(
    args: argparse.Namespace, space: str, before: Lease | None, record: Lease | None
) -> None:
    if args.json:
        emit(
            dumps(
                {
                    "space": space,
                    "revoked": record is not None,
                    "previous_holder": before.holder if before else None,
                    "generation": record.generation if record else None,
                }
            )
        )
    elif record is None:
        emit(f"{space}: no lease was ever granted; nothing to revoke")
    else:
        who = f"{before.holder!r} is fenced" if before else "it was not held"
        emit(
            f"{space}: lease revoked, generation is now {record.generation} ({who}); "
            "the next grant takes a newer generation"
        )
