"""Shared helpers of the bench scripts: timing, the machine's description and the results file.

Timing: on CUDA, CUDA events around the call (device time, no host-side noise); on CPU,
``time.perf_counter``.  Each helper takes the device the work runs on.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).with_name("RESULTS.md")
TIMING = {"repeat": 10, "warmup": 2}
"""Defaults of :func:`timed` (a ``--smoke`` run sets them to one call and no warm-up)."""


def is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def sync(device) -> None:
    if is_cuda(device):
        torch.cuda.synchronize()


def once(fn: Callable[[], object], device) -> float:
    """Seconds of one call of ``fn()``, device-synchronised (CUDA events on a GPU)."""
    if is_cuda(device):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def timed(fn: Callable[[], object], device, repeat: int | None = None, warmup: int | None = None) -> float:
    """Median seconds of ``fn()`` over ``repeat`` calls after ``warmup`` calls (defaults: :data:`TIMING`)."""
    repeat = TIMING["repeat"] if repeat is None else repeat
    for _ in range(TIMING["warmup"] if warmup is None else warmup):
        fn()
    sync(device)
    return statistics.median(once(fn, device) for _ in range(repeat))


def machine(device) -> str:
    """The card, or the CPU with its cores and threads, and the torch version."""
    if is_cuda(device):
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda}), torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, torch {torch.__version__}"


def emit(text: str, *paths: str | Path | None) -> None:
    """Prints a finished section and appends it to each results file given (at once: nothing is lost
    when a later step times out)."""
    print(text, flush=True)
    for path in filter(None, paths):
        with open(path, "a") as f:
            f.write("\n" + text)
