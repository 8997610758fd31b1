"""What this machine gives a process: the cores it may run on and the cores no one is using.  Read by the
steps that size their workers and threads (``prepare``'s labelling workers, collect's loaders and torch's
threads), so that each decides from the same counts."""

from __future__ import annotations

import os
import time


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity, which a job scheduler may narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def idle_cores(seconds: float = 0.2) -> float | None:
    """How many cores no process used over ``seconds`` (this one sleeps meanwhile): from the kernel's
    counters in ``/proc/stat`` (steal time counts as used); None where there are none to read."""

    def sample() -> tuple[int, int, int] | None:
        try:
            with open("/proc/stat") as f:
                lines = [line.split() for line in f if line.startswith("cpu")]
        except OSError:
            return None
        ticks = [int(v) for v in lines[0][1:]]
        return sum(ticks), ticks[3] + ticks[4], len(lines) - 1  # all, idle + iowait, cores

    first = sample()
    if first is None:
        return None
    time.sleep(seconds)
    second = sample()
    total = second[0] - first[0]
    return second[2] * (second[1] - first[1]) / total if total > 0 else None
