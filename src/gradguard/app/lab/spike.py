"""Lab 5, spike: a tiny transformer LM with injected poisoned batches, unguarded vs guarded.

Setup: a 2-layer pre-norm causal transformer (width 64, 4 heads, context 32) learns a random
first-order Markov chain over 32 tokens with AdamW. The stream carries two kinds of poison:
batches whose loss is multiplied by 10,000 (a loss spike: a corrupted shard or a mis-set loss
scale) and a window of batches whose loss is NaN (a corrupt record). Four runs see the same
batches: a clean reference (no poison), unguarded, guarded with ``skip`` (the bad steps are
not applied: weights, Adam moments, weight decay and step counter unchanged, OLMo-core style)
and guarded with ``rollback`` (restore the last snapshot and skip the bad window on replay,
PaLM style). The criterion: the unguarded run ends non-finite or clearly worse than the
reference, and both guarded runs end within 0.05 nats of the reference's held-out loss.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import torch
from torch import Tensor, nn

from gradguard.app.lab._plot import figure
from gradguard.app.lab._result import LabResult, NullTicker, Ticker, fmt
from gradguard.app.lab.data import markov_tokens, markov_transition
from gradguard.app.lab.models import TinyLM
from gradguard.decide.detect import SpikeDetector
from gradguard.guard.guard import Guard, GuardConfig
from gradguard.guard.response import Budgets

VOCAB = 32
CONTEXT = 32
BATCH = 16
LR = 3e-3
TOLERANCE = 0.05  # nats
MODES = ("clean", "unguarded", "guarded: skip", "guarded: rollback")


def entropy_rate(transition: Tensor) -> float:
    """Entropy (nats per token) of a Markov chain at stationarity: the best loss any model gets."""
    p = transition.double()
    evals, evecs = torch.linalg.eig(p.T)
    i = int(torch.argmin((evals - 1).abs()))
    pi = evecs[:, i].real
    pi = pi / pi.sum()
    h = -(p * torch.log(p.clamp_min(1e-300))).sum(dim=1)
    return float((pi * h).sum())


def poison_plan(steps: int) -> dict[int, str]:
    """Batch positions with a spiked (x 1e4) or NaN loss for a run of ``steps`` steps."""
    nan_start = int(steps * 0.55)
    return {
        int(steps * 0.3): "spike",
        **{nan_start + i: "nan" for i in range(4)},
        int(steps * 0.8): "spike",
    }


def _batch(position: int, seed: int, transition: Tensor) -> Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + position)
    return markov_tokens(BATCH, CONTEXT + 1, VOCAB, transition, g)


def _loss(model: nn.Module, tokens: Tensor) -> Tensor:
    logits = model(tokens[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))


def train(mode: str, *, steps: int, seed: int) -> tuple[float, list[float], dict[str, int]]:
    """Train one run; returns (held-out loss, training-loss curve, guard action counts)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    transition = markov_transition(VOCAB, seed=seed)
    model = TinyLM(vocab=VOCAB, context=CONTEXT, seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    plan = {} if mode == "clean" else poison_plan(steps)
    guard: Guard | None = None
    if mode.startswith("guarded"):
        warm = max(5, steps // 10)
        ladder = ("skip", "abort") if mode.endswith("skip") else ("rollback", "abort")
        guard = Guard(
            model,
            opt,
            config=GuardConfig(
                detectors=[
                    SpikeDetector("loss", window=64, z=6.0, warmup=warm),
                    SpikeDetector("grad_norm", window=64, z=6.0, warmup=warm),
                ],
                default_response=ladder,
                budgets=Budgets(skip=8, rollback=8),
                snapshot_every=max(5, steps // 20),
                record_layers=False,
            ),
        )
    losses: list[Tensor] = []
    iterations = 0
    while (
        guard.step_count if guard is not None else iterations
    ) < steps and iterations < 2 * steps:
        position = guard.position if guard is not None else iterations
        loss = _loss(model, _batch(position, seed, transition))
        kind = plan.get(position)
        if kind == "spike":
            loss = loss * 1e4
        elif kind == "nan":
            loss = loss * math.nan
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if guard is not None:
            guard.step(loss)
        else:
            opt.step()
        losses.append(loss.detach())
        iterations += 1
    counts: dict[str, int] = {}
    if guard is not None:
        for r in guard.records:
            if r["kind"] == "step" and r.get("action") not in (None, "step"):
                counts[r["action"]] = counts.get(r["action"], 0) + 1
    g = torch.Generator().manual_seed(777_777)
    held = markov_tokens(256, CONTEXT + 1, VOCAB, transition, g)
    model.eval()
    with torch.no_grad():
        test = float(_loss(model, held))
    return test, torch.stack(losses).tolist(), counts


def run(
    *, seeds: int = 2, quick: bool = False, out: Path | None = None, ticker: Ticker | None = None
) -> LabResult:
    """Train clean, unguarded, guarded-skip and guarded-rollback runs over ``seeds`` seeds.

    Args:
        seeds: runs per mode.
        quick: 150 steps instead of 400.
        out: folder for ``spike.png`` (training loss, seed 0); ``None`` writes nothing.
        ticker: progress callbacks.

    Returns:
        A :class:`LabResult`; ``passed`` when, on every seed, the unguarded run is non-finite or
        more than 0.05 nats worse than the clean run and both guarded runs are within 0.05.
    """
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds must be an int >= 1, got {seeds!r}")
    torch.set_num_threads(1)
    steps = 150 if quick else 400
    ticker = ticker or NullTicker()
    ticker.start(f"spike: {len(MODES)} modes x {seeds} seeds, {steps} steps", len(MODES) * seeds)
    results: dict[str, list[float]] = {m: [] for m in MODES}
    counts: dict[str, dict[str, int]] = {m: {} for m in MODES}
    curves: dict[str, list[float]] = {}
    for seed in range(seeds):
        for mode in MODES:
            test, losses, c = train(mode, steps=steps, seed=seed)
            results[mode].append(test)
            for k, v in c.items():
                counts[mode][k] = counts[mode].get(k, 0) + v
            if seed == 0:
                curves[mode] = losses
            ticker.advance()
    optimum = statistics.fmean(entropy_rate(markov_transition(VOCAB, seed=s)) for s in range(seeds))
    ok = True
    for s in range(seeds):
        clean = results["clean"][s]
        bad = results["unguarded"][s]
        ok &= (not math.isfinite(bad)) or bad > clean + TOLERANCE
        for mode in ("guarded: skip", "guarded: rollback"):
            ok &= math.isfinite(results[mode][s]) and abs(results[mode][s] - clean) <= TOLERANCE
    rows: list[list[object]] = []
    for mode in MODES:
        vals = results[mode]
        finite = [v for v in vals if math.isfinite(v)]
        c = counts[mode]
        actions = ", ".join(f"{k} {v}" for k, v in sorted(c.items())) if c else "-"
        rows.append(
            [
                mode,
                "none" if mode == "clean" else "2 x loss*1e4, 4 x NaN loss",
                "; ".join(fmt(v, 4) for v in vals),
                fmt(statistics.median(finite), 4) if finite else "nan",
                actions,
            ]
        )
    figures: list[str] = []
    if out is not None:
        path = out / "spike.png"
        with figure(path) as ax:
            for mode, losses in curves.items():
                xs = [i for i, v in enumerate(losses) if math.isfinite(v) and v < 50]
                ax.plot(xs, [losses[i] for i in xs], label=mode, linewidth=1)
            ax.axhline(optimum, color="gray", linestyle=":", label="entropy rate (best possible)")
            ax.set_xlabel("iteration")
            ax.set_ylabel("training loss (nats; spikes and NaN not drawn)")
            ax.set_title("Tiny transformer LM with poisoned batches (seed 0)")
            ax.legend(fontsize=8)
        figures.append(str(path))
    return LabResult(
        name="spike",
        title="A tiny transformer LM with injected poisoned batches: unguarded vs guarded",
        setup=(
            f"causal transformer, 2 pre-norm layers, width 64, 4 heads, context {CONTEXT}, "
            f"vocab {VOCAB}; data: a random Markov chain (entropy rate {optimum:.3f} nats); "
            f"AdamW lr {LR}, batch {BATCH}, {steps} steps; poison at 30% and 80% (loss x 1e4) "
            "and 55% (4 NaN losses); "
            f"guard: spike detectors (loss, grad norm; window 64, 6 sigma), snapshot every "
            f"{max(5, steps // 20)} steps; {seeds} seed(s)"
        ),
        criterion=(
            f"unguarded ends non-finite or > {TOLERANCE} nats above the clean run; both guarded "
            f"runs end within {TOLERANCE} nats of the clean run (held-out loss, 256 sequences), "
            "every seed"
        ),
        columns=["run", "poison", "held-out loss per seed", "median", "guard actions (all seeds)"],
        rows=rows,
        passed=ok,
        summary="; ".join(f"{r[0]}: {r[3]}" for r in rows),
        figures=figures,
    )
