"""A feed consumer of the fault-injection suite: a `Subscription` that follows the feed of any
store (by URL) and records what it handles in the store, in each batch's transaction.

Run: python consumer.py URL NAME NODE_ID TTL OUT STOP_FILE SEED
Each batch of `fault.test` events is written to the space `seen:<NAME>` as one event whose
payload lists `[position, space, seq, op]` of the batch, in the transaction that saves the
checkpoint (so it is there exactly when the checkpoint moved past the batch). Reads of the
checkpoint are recorded in OUT as `checkpoint` lines (shard_sql.history.load_observed), errors as
`consumer_error` lines. Several copies (same NAME) take turns through the lease
`subscription:<NAME>`. Ends when STOP_FILE exists.
"""

from __future__ import annotations

import os
import random
import sys
import threading
import time
from pathlib import Path
from typing import Any

from shard_sql import LeaseRegistry, ShardSqlError, Subscription
from shard_sql.history import record
from shard_sql.urls import open_store

TYPE = "fault.test"
"""The type of the node processes' events (node.py)."""


def projection(name: str) -> str:
    """The space where consumer NAME records its batches."""
    return f"seen:{name}"


def main(argv: list[str]) -> int:
    url, name, node_id, ttl, out, stop_file, seed = argv[:7]
    path = Path(out)
    rng = random.Random(int(seed))
    store: Any = open_store(url)
    registry = LeaseRegistry(store)
    stop = threading.Event()

    def handler(tx: Any, events: list[Any]) -> None:
        seen = [[e.position, e.space, e.seq, e.payload.get("op")] for e in events]
        tx.append(projection(name), "fault.seen", {"node": node_id, "events": seen})

    def watch() -> None:
        """Stop at the stop file; meanwhile read the checkpoint every 20-50 ms."""
        while not os.path.exists(stop_file):
            start = time.monotonic()
            try:
                position = store.checkpoint(name)
            except ShardSqlError:
                pass
            else:
                end = time.monotonic()
                record(path, kind="checkpoint", start=start, end=end, position=position)
            time.sleep(0.02 + rng.random() * 0.03)
        stop.set()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    sub = Subscription(
        store,
        name,
        handler,
        types=[TYPE],
        batch_size=rng.randint(3, 20),
        registry=registry,
        node_id=node_id,
        ttl_seconds=float(ttl),
    )
    while not stop.is_set():
        try:
            sub.run(stop)
        except ShardSqlError as e:
            # A stale copy's batch (fenced, or its projection write lost the race), a store
            # that went away for a while: the batch was not saved; follow the feed again.
            record(path, kind="consumer_error", t=time.monotonic(), error=type(e).__name__)
            stop.wait(0.05)
    watcher.join()
    close = getattr(store, "close", None)
    if close is not None:
        close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
