"""A node process of the fault-injection suite: appends through its authority, records all.

Run: python node.py URL NODE_ID SPACES DURATION TTL OUT SEED [--no-fence]
Every append is recorded as `invoke` before the call and `ok` / `failed` / `unknown` after it,
every lease grant as `grant` (see shard_sql.history). A SIGKILL leaves an `invoke` alone: unknown.
"""

from __future__ import annotations

import math
import random
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from shard_sql import AppendAuthority, InvalidEvent, LeaseRegistry, ShardSqlError
from shard_sql.history import record
from shard_sql.urls import open_store
from shard_sql.validation import pending


class UnfencedAuthority(AppendAuthority):
    """The self-test's broken node: once it held a space it writes there forever, unfenced."""

    def append(
        self, space: str, type: str, payload: dict[str, Any], *, intent_id: str | None = None
    ) -> Any:
        lease = self._leases.get(space)
        if lease is None:
            return super().append(space, type, payload, intent_id=intent_id)
        with self._lock(space):
            item = pending(type, payload, intent_id)
            head = self.store.head(space)
            return self._writer.write(
                space, [item], expected_seq=head, fence=lease, verify_fence=False
            )[0]

    def keep_leases(self) -> list[str]:
        # Never renews, never drops a lapsed lease (the serving thread's round).
        return [lease.space for lease in self.leases()]


def main(argv: list[str]) -> int:
    url, node_id, spaces_csv, duration, ttl, out, seed = argv[:7]
    no_fence = "--no-fence" in argv
    spaces = spaces_csv.split(",")
    path = Path(out)
    rng = random.Random(int(seed))
    store = open_store(url)
    registry = LeaseRegistry(store)
    acquire = registry.acquire

    def recording_acquire(space: str, holder: str, ttl_seconds: float = 30.0) -> Any:
        lease = acquire(space, holder, ttl_seconds)
        record(
            path,
            kind="grant",
            space=space,
            holder=holder,
            generation=lease.generation,
            granted=datetime.now(UTC).isoformat(),
        )
        return lease

    registry.acquire = recording_acquire  # type: ignore[method-assign]
    cls = UnfencedAuthority if no_fence else AppendAuthority
    node = cls(node_id, store, registry, ttl_seconds=float(ttl), forward_timeout=float(ttl) * 4)
    end = time.monotonic() + float(duration)
    n = 0
    with node:
        while time.monotonic() < end:
            n += 1
            op = f"{node_id}-{n}"
            space = rng.choice(spaces)
            bad = rng.random() < 0.02
            payload: dict[str, Any] = {"op": op, "x": math.nan} if bad else {"op": op}
            intent = op if n % 2 else None
            record(path, kind="invoke", op=op, space=space, node=node_id, t=time.monotonic())
            try:
                e = node.append(space, "fault.test", payload, intent_id=intent)
            except InvalidEvent:
                record(path, kind="failed", op=op, t=time.monotonic())
            except ShardSqlError as exc:
                record(path, kind="unknown", op=op, t=time.monotonic(), error=type(exc).__name__)
                time.sleep(0.05)
            except Exception as exc:
                record(
                    path,
                    kind="unknown",
                    op=op,
                    t=time.monotonic(),
                    error=f"UNTRANSLATED {type(exc).__name__}: {exc}",
                )
                time.sleep(0.05)
            else:
                record(path, kind="ok", op=op, t=time.monotonic(), seq=e.seq)
            time.sleep(rng.random() * 0.004)
    close = getattr(store, "close", None)
    if close is not None:
        close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
