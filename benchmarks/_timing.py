"""Shared by the benchmark scripts (run as `python benchmarks/NAME.py`, so this imports as `_timing`)."""

from __future__ import annotations

import ctypes
import gc
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


def median_seconds(fn: Callable[[], object], repeats: int = 5) -> float:
    """Median wall time of ``fn`` over ``repeats`` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# Peak resident memory of one call on Linux: hand freed heap back (malloc_trim), reset the
# high-water mark VmHWM to the current RSS, call, read VmHWM (PeakMemory below).


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


class PeakMemory:
    """Peak memory of one call above what the process held just before it (model and inputs
    loaded). CUDA: ``torch.cuda.max_memory_allocated``. CPU: the peak resident set, the quantity
    temporal_tiling.py measures (there ru_maxrss of a fresh process per case); here the kernel's
    high-water mark VmHWM is reset in-process (``/proc/self/clear_refs`` = 5) after handing freed
    heap back to the OS (``malloc_trim``), so every call of one process gets its own peak."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cpu_ok = device.type == "cpu" and reset_hwm()

    def describe(self) -> str:
        if self.device.type == "cuda":
            return "torch.cuda.max_memory_allocated during the call minus memory_allocated before it (tensors only)"
        if self.cpu_ok:
            return ("peak resident set size (RSS; not tracemalloc) during the call minus the RSS before it, model and "
                    "input loaded: VmHWM of /proc/self/status, reset via /proc/self/clear_refs after malloc_trim "
                    "(temporal_tiling.py reads the same high-water mark as ru_maxrss of a fresh process)")
        return "not available (cannot reset /proc/self VmHWM here)"

    def run(self, fn: Callable[[], Any]) -> tuple[Any, float, float | None]:
        """(output, seconds, peak MiB or None) of one call of ``fn``."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            t0 = time.perf_counter()
            out = fn()
            torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            return out, dt, (torch.cuda.max_memory_allocated() - base) / 2**20
        if not self.cpu_ok:
            t0 = time.perf_counter()
            out = fn()
            return out, time.perf_counter() - t0, None
        if malloc_trim is not None:
            malloc_trim(0)
        reset_hwm()
        base = proc_status_kib("VmRSS")
        t0 = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t0
        return out, dt, max(proc_status_kib("VmHWM") - base, 0) / 1024
