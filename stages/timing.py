"""Timing and memory measurement shared by benchmark and register (not a stage).

``measure`` times one call at a time (host arrays in, host arrays out, so a GPU is synchronized by the
copy back) until both a minimum number of calls and a minimum time are reached. ``interleaved`` runs
several callables in rounds, one slice each per round, so slow drift in the load of a shared machine
hits every contender alike instead of whichever happened to run during a busy second. Peak host memory
is the high-water mark of the process's resident set (Linux ``VmHWM``, reset through
``/proc/self/clear_refs``) minus the resident set before; elsewhere it is not measured (None).
"""

from __future__ import annotations

import re
import time
from typing import Callable

import numpy as np


def measure(call: Callable[[], object], *, warmup: int = 0, min_runs: int = 1, min_seconds: float = 0.0,
            max_seconds: float = 10.0) -> list[float]:
    """Seconds per ``call()`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        call()
    times = []
    start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
        elapsed = time.perf_counter() - start
        if (len(times) >= min_runs and elapsed >= min_seconds) or elapsed >= max_seconds:
            return times


def interleaved(calls: dict[str, Callable[[], object]], *, rounds: int, min_runs: int, min_seconds: float,
                max_seconds: float) -> dict[str, list[float]]:
    """Each ``calls[name]()`` timed in ``rounds`` slices, round-robin; the limits are per callable in total."""
    rounds = max(1, rounds)
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            times[name] += measure(call, min_runs=max(1, -(-min_runs // rounds)), min_seconds=min_seconds / rounds,
                                   max_seconds=max_seconds / rounds)
    return times


def summarize(times_s: list[float], batch_size: int) -> dict:
    """Median, p90, p99, mean and min latency in ms, and samples/s at the median."""
    ms = np.asarray(times_s) * 1e3
    median = float(np.median(ms))
    return {"runs": int(len(ms)), "median_ms": median, "p90_ms": float(np.percentile(ms, 90)),
            "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean()), "min_ms": float(ms.min()),
            "samples_per_s": batch_size / (median / 1e3)}


# ---------------------------------------------------------------- host memory (Linux)

MEMORY_METHOD = ("peak resident set (VmHWM, reset via /proc/self/clear_refs) minus the resident set before "
                 "session creation; covers session creation, first inference and warm-up")


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
        return int(m.group(1)) if m else None
    except OSError:
        return None


def reset_peak_rss() -> int | None:
    """Reset the high-water mark; -> the resident set now (KiB), or None where not measurable."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # 5: reset the peak RSS to the current RSS (Linux >= 4.0)
    except OSError:
        return None
    return _status_kib("VmRSS")


def peak_rss_delta_mib(before_kib: int | None) -> float | None:
    peak = _status_kib("VmHWM")
    if before_kib is None or peak is None:
        return None
    return max(0.0, (peak - before_kib) / 1024)
