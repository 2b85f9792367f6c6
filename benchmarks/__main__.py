"""`python -m benchmarks`: the performance suite (benchmarks/perf_bench.py) as one table."""

from __future__ import annotations

import sys

from .perf_bench import main

sys.exit(main())
