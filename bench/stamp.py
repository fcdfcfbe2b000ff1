"""Fallback dispatch-latency probe where no C compiler is found (see stamp.c): writes
CLOCK_MONOTONIC in nanoseconds to ./stamp (or $BENCH_STAMP) as its first action. Run as
`python -I -S stamp.py`; it then counts this interpreter's own start-up, which the bench also
measures on its own (python_start_p50_ms)."""

import os
import time

NOW_NS = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
with open(os.environ.get("BENCH_STAMP", "stamp"), "w") as out:
    out.write(f"{NOW_NS}\n")
