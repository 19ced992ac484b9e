"""``python -m benchmarks``: every benchmark table (``benchmarks.bench``; ``--help`` for the sections)."""
from benchmarks.bench import main

raise SystemExit(main())
