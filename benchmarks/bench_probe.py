"""Probe cost per training step: off step, gather step and trace step against a plain step.

A step is forward, backward, ``SGD.step()`` and ``zero_grad()``; with a probe, also
``probe.step()``. Modes:

* **plain**: no probe;
* **off step**: a probe attached whose interval skips this step (no hook installed);
* **gather step**: a gathered step (``every=1``: per-layer gradient norm, output-gradient norm,
  activation RMS, max-abs and dead fraction; rows queued to a ``Recorder`` flushed every 50
  steps, its cost included);
* **trace step**: ``trace=True``: every module's inputs, outputs and gradients checked for
  NaN/inf, resolved with one host read per step.

Models (CPU sized): an MLP of 8 ReLU layers of width 512 on a batch of 64, and a 2-layer
``nn.TransformerEncoder`` (d_model 128, 4 heads, feed-forward 512) on 8 sequences of 64 tokens.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from benchmarks import markdown_table
from gradguard.insight.probe import Probe
from gradguard.records.recorder import Recorder


def make_mlp() -> tuple[nn.Module, torch.Tensor]:
    layers: list[nn.Module] = []
    width = 512
    for _ in range(8):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 1)), torch.randn(64, width)


def make_transformer() -> tuple[nn.Module, torch.Tensor]:
    layer = nn.TransformerEncoderLayer(128, 4, 512, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    return model, torch.randn(8, 64, 128)


MODES = ("plain", "off", "gather", "trace")


def _probe(mode: str, model: nn.Module) -> Probe | None:
    rec = Recorder(flush_every=50, keep=False)
    if mode == "off":
        return Probe(model, every=10**9, start_step=1, recorder=rec)
    if mode == "gather":
        return Probe(model, every=1, recorder=rec)
    if mode == "trace":
        return Probe(model, every=10**9, start_step=1, recorder=rec, trace=True)
    return None


def cpu_ms(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    """Median CPU time of ``fn()`` in ms (``time.process_time``: the CPU this process used).

    CPU time, not wall time: on a machine shared with other jobs, wall time mostly measures
    the neighbours. With one intra-op thread (``--threads 1``) this is the step's cost.
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return statistics.median(times) * 1e3


def time_modes(make: Callable[[], tuple[nn.Module, torch.Tensor]], quick: bool) -> dict[str, float]:
    """Per mode, the best round's median CPU ms per step.

    Modes are interleaved within each round so that load from other processes hits all of
    them alike, and the best round is the one least disturbed.
    """
    torch.manual_seed(0)
    model, x = make()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    rounds, repeats = (3, 5) if quick else (5, 15)
    per_mode: dict[str, list[float]] = {m: [] for m in MODES}
    for _ in range(rounds):
        for mode in MODES:
            probe = _probe(mode, model)

            def step(probe: Probe | None = probe) -> None:
                model(x).float().pow(2).mean().backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                if probe is not None:
                    probe.step()

            per_mode[mode].append(cpu_ms(step, repeats))
            if probe is not None:
                probe.recorder.flush()
                probe.close()
    return {m: min(v) for m, v in per_mode.items()}


def run(quick: bool) -> str:
    """Time every mode on both models (CPU); returns a markdown section."""
    labels = {
        "plain": "plain step (no probe)",
        "off": "off step (probe attached, not gathering)",
        "gather": "gather step (per-layer statistics)",
        "trace": "trace step (non-finite origin)",
    }
    rows = []
    for name, make in (("MLP 8x512", make_mlp), ("Transformer 2x128", make_transformer)):
        t = time_modes(make, quick)
        for mode in MODES:
            extra = "" if mode == "plain" else f"{100 * (t[mode] / t['plain'] - 1):+.0f}%"
            rows.append([name, labels[mode], t[mode], extra])
    table = markdown_table(["model", "mode", "CPU ms / step", "vs plain"], rows)
    return "\n".join(
        [
            "## Probe cost per step (CPU)",
            "",
            "Forward + backward + SGD step + `probe.step()`; CPU time per step (process "
            "time, robust to other jobs on the machine), best round's median "
            "(`benchmarks/bench_probe.py`). Run alone with "
            "`python benchmarks/run.py --only probe --threads 1`.",
            "",
            table,
            "",
        ]
    )
