"""Shared by the benchmark scripts (run as `python benchmarks/NAME.py`, so this imports as `_timing`)."""

from __future__ import annotations

import ctypes
import statistics
import time
from collections.abc import Callable


def median_seconds(fn: Callable[[], object], repeats: int = 5) -> float:
    """Median wall time of ``fn`` over ``repeats`` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# Peak resident memory of one call on Linux (throughput.py, train_step.py): hand freed heap back
# (malloc_trim), reset the high-water mark VmHWM to the current RSS, call, read VmHWM.


def proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the resident-set high-water mark (VmHWM) to the current RSS
        return True
    except OSError:
        return False


try:
    malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
except (OSError, AttributeError):
    malloc_trim = None
