"""`python -m shard_sql.cli`: the `shard-sql` command line."""

from __future__ import annotations

import sys

from shard_sql.cli import main

sys.exit(main())
