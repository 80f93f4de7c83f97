"""Heap growth over a long guarded run: the Python heap must stay flat, whatever the run length.

A tiny model (8 -> 16 -> 1 MLP, batch 32, SGD) is guarded with the defaults, so its default
:class:`~gradguard.records.recorder.Recorder` keeps a window of recent rows and streams the
rest to its sinks (none here: only the memory is measured). ``tracemalloc`` traces every Python
allocation from the end of a 200-step warm-up to the last step; the growth is the traced size
at the end minus at the start, after a flush and a garbage collection, so it counts what the
guard and its recorder still hold. Goal: under 2 MiB over 100k steps.

For comparison, the same run with a recorder that keeps every row (``window=None``, what the
recorder did before it had a window) is traced over fewer steps and its growth per step given.

Usage alone: ``python benchmarks/run.py --only memory --threads 1`` (about 10 minutes on one
busy core: tracing every allocation slows a step several times).
"""

from __future__ import annotations

import gc
import time
import tracemalloc
from typing import Any

import torch
from torch import nn

from benchmarks import markdown_table
from gradguard import Guard
from gradguard.records.recorder import WINDOW, Recorder

GOAL_MIB = 2.0
MiB = 1024 * 1024


def heap_growth(steps: int, recorder: Recorder | None = None, marks: int = 5) -> dict[str, Any]:
    """Traced Python heap growth (bytes) over ``steps`` guarded steps of a tiny model.

    Args:
        steps: guarded steps traced (after a 200-step warm-up that is not).
        recorder: the guard's recorder; ``None``: the default one.
        marks: also report the growth at this many evenly spaced steps.

    Returns:
        ``{"growth": bytes, "marks": [(step, bytes)], "rows": rows kept, "seconds": float}``.
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = Guard(model, opt, recorder=recorder)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 8, generator=g), torch.randn(32, 1, generator=g)

    def step() -> None:
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        guard.step(loss)
        opt.zero_grad(set_to_none=True)

    for _ in range(200):
        step()
    guard.flush()
    gc.collect()
    was_tracing = tracemalloc.is_tracing()
    tracemalloc.start(1)
    start = time.perf_counter()
    base = tracemalloc.get_traced_memory()[0]
    every = max(steps // marks, 1)
    points = []
    try:
        for i in range(1, steps + 1):
            step()
            if i % every == 0 and i < steps:
                gc.collect()
                points.append((i, tracemalloc.get_traced_memory()[0] - base))
        guard.flush()
        gc.collect()
        growth = tracemalloc.get_traced_memory()[0] - base
    finally:
        if not was_tracing:
            tracemalloc.stop()
    points.append((steps, growth))
    return {
        "growth": growth,
        "marks": points,
        "rows": len(guard.recorder.rows),
        "seconds": time.perf_counter() - start,
    }


def run(quick: bool) -> str:
    """The markdown section for docs/benchmarks.md."""
    steps = 10_000 if quick else 100_000
    windowed = heap_growth(steps)
    unbounded_steps = 2_000 if quick else 10_000
    unbounded = heap_growth(unbounded_steps, Recorder(flush_every=50, window=None), marks=1)
    growth = windowed["growth"] / MiB
    verdict = "met" if growth < GOAL_MIB else "**not met**"
    first = windowed["marks"][0]
    steady = (windowed["growth"] - first[1]) / MiB
    per_step_unbounded = unbounded["growth"] / unbounded_steps
    rows = [
        ["default recorder (window of the last " + f"{WINDOW} steps)", f"{steps:,}",
         f"{growth:.2f}", f"{windowed['rows']:,}", f"< {GOAL_MIB:.0f} MiB", verdict],
        ["every row kept (`window=None`)", f"{unbounded_steps:,}",
         f"{unbounded['growth'] / MiB:.2f}", f"{unbounded['rows']:,}", "", ""],
    ]  # fmt: skip
    marks = [[f"{s:,}", f"{b / MiB:.3f}"] for s, b in windowed["marks"]]
    note = " (quick run: 10k steps)" if quick else ""
    return "\n".join(
        [
            "## Heap growth over a long run",
            "",
            "Python heap growth (`tracemalloc`, every allocation traced) of a guarded tiny "
            "model (8-16-1 MLP, SGD) with the defaults, from the end of a 200-step warm-up to "
            f"the last step, after a flush and a garbage collection{note} "
            "(`benchmarks/bench_memory.py`).",
            "",
            markdown_table(["recorder", "steps", "growth MiB", "rows in memory", "goal", ""], rows),
            "",
            f"At step {first[0]:,} (the window full since step {WINDOW:,}): "
            f"{first[1] / MiB:.3f} MiB; from there to step {steps:,}: {steady:+.3f} MiB. "
            f"Keeping every row costs {per_step_unbounded / 1024:.2f} KiB per step here, "
            f"{per_step_unbounded * 1e6 / MiB:,.0f} MiB per million steps.",
            "",
            markdown_table(["step", "growth MiB"], marks),
            "",
        ]
    )


if __name__ == "__main__":
    print(run(quick=True))
