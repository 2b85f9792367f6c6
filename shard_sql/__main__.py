"""`python -m shard_sql`: the `shard-sql` command line."""

from __future__ import annotations

import sys

from shard_sql.cli import main

if __name__ == "__main__":
    sys.exit(main())
