"""Benchmarks for gradguard, run by ``benchmarks/run.py`` (``make bench``); not timed tests.

Every ``benchmarks/bench_*.py`` module exposes ``run(quick: bool) -> str`` returning a markdown
section; the driver collects them into docs/benchmarks.md. The helpers here time a function the
same way for every module: warm-up calls first, then the median of repeated calls, with the
device synchronized around each call so GPU times are real.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence

import torch


def sync(device: torch.device | str) -> None:
    """Wait for queued kernels on ``device`` (a no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(
    fn: Callable[[], object], repeats: int, warmup: int = 1, device: torch.device | str = "cpu"
) -> float:
    """Median wall time of ``fn()`` in milliseconds over ``repeats`` calls after ``warmup``."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def median_ms_interleaved(
    fns: dict[str, tuple[Callable[[], object], int]],
    warmup: int = 1,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Median ms of each ``name: (fn, repeats)``, timed round-robin.

    Interleaving the methods (one call of each per round) spreads a busy machine's load changes
    over all of them instead of penalizing whichever ran during a burst.
    """
    for fn, _ in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(max(n for _, n in fns.values())):
        for name, (fn, n) in fns.items():
            if r >= n:
                continue
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) * 1e3 for name, ts in times.items()}


def cpu_ms_interleaved(
    fns: Mapping[str, Callable[[], object]], repeats: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Thread CPU milliseconds of every call of each ``name: fn``, timed round-robin.

    ``time.thread_time_ns`` counts only the time this thread ran, so another job on a shared
    machine does not inflate it (with one intra-op thread, torch runs every CPU kernel, the
    backward pass included, on the calling thread). Returns the per-round times; round ``i``
    of every name ran back to back, so ``a[i] - b[i]`` is a paired difference.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.thread_time_ns()
            fn()
            times[name].append((time.thread_time_ns() - start) / 1e6)
    return times


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table; floats are printed with 2 decimals."""

    def cell(x: object) -> str:
        return f"{x:.2f}" if isinstance(x, float) else str(x)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)
