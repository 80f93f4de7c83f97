"""Lab 4, rnn: a vanilla tanh RNN on the adding problem, with and without gradient-norm clipping.

In the manner of Pascanu, Mikolov & Bengio, "On the difficulty of training recurrent neural
networks" (ICML 2013): a 50-unit tanh RNN whose recurrent matrix starts with spectral radius 1.1
(the regime where gradients can explode through time), trained with SGD and momentum on the
adding problem. Without clipping a single exploding gradient throws the weights out of the
region where learning works and the loss goes non-finite; clipping the global gradient norm to 1
(``gradguard.clip_grad_norm_``) keeps every step bounded. A run succeeds when its mean squared
error on 1000 fresh test sequences is below 0.05, under a third of the 1/6 that predicting the
mean achieves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from gradguard.app.lab._plot import figure
from gradguard.app.lab._result import LabResult, NullTicker, Ticker, fmt, read_curves
from gradguard.app.lab.data import adding_problem
from gradguard.app.lab.models import TanhRNN
from gradguard.core.clip import clip_grad_norm_
from gradguard.core.norms import grad_norms

HIDDEN = 50
RADIUS = 1.1
LR = 0.05
MOMENTUM = 0.9
BATCH = 32
MAX_NORM = 1.0
SUCCESS_MSE = 0.05


@dataclass
class RNNRun:
    """What one RNN training run measured."""

    test_mse: float
    first_nonfinite: int | None
    max_grad_norm: float
    losses: list[float]

    @property
    def solved(self) -> bool:
        return self.first_nonfinite is None and self.test_mse < SUCCESS_MSE


def train(*, length: int, clip: bool, steps: int, seed: int) -> RNNRun:
    """Train one RNN on the adding problem of sequence length ``length``.

    Returns:
        Test MSE (NaN if the run went non-finite), first non-finite step, largest finite
        pre-clip gradient norm and the training loss curve.
    """
    model = TanhRNN(inputs=2, hidden=HIDDEN, radius=RADIUS, seed=seed)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    g = torch.Generator().manual_seed(seed)
    losses: list[Tensor] = []
    norms: list[Tensor] = []
    for step in range(steps):
        x, y = adding_problem(BATCH, length, g)
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            norms.append(clip_grad_norm_(model.parameters(), MAX_NORM))
        else:
            norms.append(
                grad_norms([p.grad for p in model.parameters() if p.grad is not None]).total
            )
        opt.step()
        losses.append(loss.detach())
        if step % 100 == 99 and not bool(torch.stack(losses[-100:]).isfinite().all()):
            break
    loss_list, norm_list, bad = read_curves(losses, norms)
    x, y = adding_problem(1000, length, torch.Generator().manual_seed(123_456))
    with torch.no_grad():
        test = float(nn.functional.mse_loss(model(x), y))
    finite = [n for n in norm_list if math.isfinite(n)]
    return RNNRun(
        test_mse=test if not bad else math.nan,
        first_nonfinite=bad[0] if bad else None,
        max_grad_norm=max(finite) if finite else math.nan,
        losses=loss_list,
    )


def run(
    *, seeds: int = 5, quick: bool = False, out: Path | None = None, ticker: Ticker | None = None
) -> LabResult:
    """Train with and without clipping over ``seeds`` seeds; tabulate success rates.

    Args:
        seeds: runs per setting.
        quick: sequence length 20 and 1500 steps; the full run adds length 30 with 2500 steps.
        out: folder for ``rnn.png`` (training loss, seed 0); ``None`` writes nothing.
        ticker: progress callbacks.

    Returns:
        A :class:`LabResult`; ``passed`` when, at every length, clipping solves more seeds than
        no clipping does.
    """
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds must be an int >= 1, got {seeds!r}")
    torch.set_num_threads(1)
    settings = [(20, 1500)] if quick else [(20, 1500), (30, 2500)]
    ticker = ticker or NullTicker()
    ticker.start(f"rnn: {len(settings) * 2 * seeds} runs", len(settings) * 2 * seeds)
    rows: list[list[object]] = []
    curves: dict[str, list[float]] = {}
    wins = []
    for length, steps in settings:
        solved = {}
        for clip in (False, True):
            runs = []
            for seed in range(seeds):
                runs.append(train(length=length, clip=clip, steps=steps, seed=seed))
                ticker.advance()
            label = f"T={length}, {'clip 1.0' if clip else 'no clip'}"
            curves[label] = runs[0].losses
            solved[clip] = sum(r.solved for r in runs)
            mses = sorted(r.test_mse for r in runs if math.isfinite(r.test_mse))
            diverged = [r.first_nonfinite for r in runs if r.first_nonfinite is not None]
            rows.append(
                [
                    length,
                    steps,
                    f"norm <= {MAX_NORM:g}" if clip else "none",
                    f"{solved[clip]}/{seeds}",
                    f"{len(diverged)}/{seeds}",
                    fmt(mses[len(mses) // 2], 3) if mses else "nan",
                    fmt(max(r.max_grad_norm for r in runs), 3),
                ]
            )
        wins.append(solved[True] > solved[False])
    figures: list[str] = []
    if out is not None:
        path = out / "rnn.png"
        with figure(path) as ax:
            for label, losses in curves.items():
                xs = [i for i, v in enumerate(losses) if math.isfinite(v)]
                ax.semilogy(xs, [losses[i] for i in xs], label=label, linewidth=1)
            ax.axhline(1 / 6, color="gray", linestyle=":", label="predict the mean (1/6)")
            # a diverging run reaches 1e30 and more: keep the scale where learning happens
            ax.set_ylim(top=10.0)
            ax.set_xlabel("SGD step")
            ax.set_ylabel("training MSE")
            ax.set_title("Tanh RNN (50 units) on the adding problem, seed 0")
            ax.legend(fontsize=8)
        figures.append(str(path))
    return LabResult(
        name="rnn",
        title="Vanilla tanh RNN on the adding problem, with and without gradient-norm clipping",
        setup=(
            f"tanh RNN, {HIDDEN} hidden units, recurrent init = {RADIUS} x orthogonal; adding "
            f"problem; SGD lr {LR}, momentum {MOMENTUM}, batch {BATCH}; clipping = "
            f"clip_grad_norm_(params, {MAX_NORM:g}); {seeds} seed(s) per setting"
        ),
        criterion=(
            f"a run is solved when its test MSE (1000 fresh sequences) < {SUCCESS_MSE} and it "
            "never went non-finite (predicting the mean gives 1/6 = 0.167); clipping must solve "
            "more seeds than no clipping at every length"
        ),
        columns=[
            "length T",
            "steps",
            "clipping",
            "solved",
            "diverged",
            "median test MSE",
            "largest grad norm",
        ],
        rows=rows,
        passed=all(wins),
        summary="; ".join(f"T={r[0]} {r[2]}: solved {r[3]}" for r in rows),
        figures=figures,
    )
