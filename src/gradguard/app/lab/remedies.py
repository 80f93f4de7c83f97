"""Lab 3, remedies: a deep plain MLP that diverges, trained once per remedy.

Setup: a 20-block ReLU MLP (width 64) whose hidden weights start at ``N(0, 4 / fan_in)``, twice
the variance Kaiming init would use, so each layer multiplies the signal and the backpropagated
gradient by about ``sqrt(2)`` (about 1000 over 20 layers). It is trained with plain
SGD (learning rate 0.003, batch 64) on a smooth regression task. Unremedied, the first update is
so large that the loss is non-finite within a couple of steps. Each textbook remedy
changes one thing: clipping by value, by norm per tensor, by the global norm, adaptive clipping
(AGC, Brock et al. 2021), batch normalization, Kaiming initialization, residual connections,
fewer layers or an L2 penalty. A remedy "fixes" the run when training stays finite and the final
loss is below the loss of predicting the mean.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from gradguard.app.lab._plot import figure
from gradguard.app.lab._result import LabResult, NullTicker, Ticker, fmt, read_curves
from gradguard.app.lab.data import regression
from gradguard.app.lab.models import deep_mlp
from gradguard.core.agc import agc_
from gradguard.core.clip import clip_by_norm_, clip_grad_norm_, clip_grad_value_
from gradguard.core.norms import grad_norms

DEPTH = 20
LR = 0.003
BATCH = 64


@dataclass(frozen=True)
class Remedy:
    """One variant of the baseline: how the model is built and what happens to its gradients."""

    name: str
    description: str
    model: dict[str, object] = field(default_factory=dict)
    clip: Callable[[nn.Module], object] | None = None
    weight_decay: float = 0.0


REMEDIES: tuple[Remedy, ...] = (
    Remedy("none", "the baseline: 20 blocks, init gain 2, SGD lr 0.003"),
    Remedy(
        "clip by value",
        "clip_grad_value_(params, 0.1)",
        clip=lambda m: clip_grad_value_(m.parameters(), 0.1),
    ),
    Remedy(
        "clip by norm",
        "clip_by_norm_(params, 1.0): each tensor to norm <= 1",
        clip=lambda m: clip_by_norm_(m.parameters(), 1.0),
    ),
    Remedy(
        "global norm",
        "clip_grad_norm_(params, 1.0): all gradients together",
        clip=lambda m: clip_grad_norm_(m.parameters(), 1.0),
    ),
    Remedy(
        "adaptive (AGC)",
        "agc_(model, 0.01): unit-wise, relative to the weight norm",
        clip=lambda m: agc_(m, 0.01),
    ),
    Remedy("batch norm", "BatchNorm1d after every hidden linear layer", {"batchnorm": True}),
    Remedy("Kaiming init", "hidden weights N(0, 2 / fan_in)", {"gain": math.sqrt(2.0)}),
    Remedy("residual", "h + relu(W h) / sqrt(20) in every block", {"residual": True}),
    Remedy("fewer layers", "4 blocks instead of 20", {"depth": 4}),
    Remedy("L2 penalty", "weight decay 1e-2 (an L2 penalty on the weights)", weight_decay=1e-2),
)


@dataclass
class Run:
    """What one training run measured."""

    first_nonfinite: int | None
    final_loss: float
    max_grad_norm: float
    losses: list[float]


def train(remedy: Remedy, *, steps: int, seed: int) -> Run:
    """Train the baseline MLP with one remedy for ``steps`` SGD steps.

    Per-step numbers stay tensors; they are read back once at the end (and every 25 steps to
    stop a run that has already gone non-finite).

    Returns:
        The first step with a non-finite loss or gradient norm (``None`` if none), the final
        loss on the whole data set, the largest finite gradient norm and the loss curve.
    """
    x, y = regression(seed=seed)
    kwargs: dict[str, object] = {"depth": DEPTH, "gain": 2.0, "seed": seed, **remedy.model}
    model = deep_mlp(**kwargs)  # type: ignore[arg-type]
    opt = torch.optim.SGD(model.parameters(), lr=LR, weight_decay=remedy.weight_decay)
    g = torch.Generator().manual_seed(seed)
    losses: list[Tensor] = []
    norms: list[Tensor] = []
    for step in range(steps):
        idx = torch.randint(0, x.shape[0], (BATCH,), generator=g)
        loss = nn.functional.mse_loss(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norms.append(grad_norms([p.grad for p in model.parameters() if p.grad is not None]).total)
        if remedy.clip is not None:
            remedy.clip(model)
        opt.step()
        losses.append(loss.detach())
        if step % 25 == 24 and not bool(torch.stack(losses[-25:]).isfinite().all()):
            break
    loss_list, norm_list, bad = read_curves(losses, norms)
    model.eval()
    with torch.no_grad():
        final = float(nn.functional.mse_loss(model(x), y))
    finite_norms = [n for n in norm_list if math.isfinite(n)]
    return Run(
        first_nonfinite=bad[0] if bad else None,
        final_loss=final if not bad else math.nan,
        max_grad_norm=max(finite_norms) if finite_norms else math.nan,
        losses=loss_list,
    )


def run(
    *, seeds: int = 3, quick: bool = False, out: Path | None = None, ticker: Ticker | None = None
) -> LabResult:
    """Train the diverging MLP once per remedy and seed; tabulate what each remedy achieves.

    Args:
        seeds: runs per remedy (seeds 0..seeds-1 for init, data and batches).
        quick: 150 steps instead of 600.
        out: folder for ``remedies.png`` (loss curves, seed 0); ``None`` writes nothing.
        ticker: progress callbacks.

    Returns:
        A :class:`LabResult`; ``passed`` when the baseline diverges on every seed and at least one
        remedy fixes every seed.
    """
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds must be an int >= 1, got {seeds!r}")
    torch.set_num_threads(1)
    steps = 150 if quick else 600
    ticker = ticker or NullTicker()
    ticker.start(
        f"remedies: {len(REMEDIES)} x {seeds} runs of {steps} steps", len(REMEDIES) * seeds
    )
    baseline_loss = statistics.fmean(
        float(regression(seed=s)[1].var(unbiased=False)) for s in range(seeds)
    )
    rows: list[list[object]] = []
    curves: dict[str, list[float]] = {}
    fixed: dict[str, bool] = {}
    for remedy in REMEDIES:
        runs = []
        for seed in range(seeds):
            runs.append(train(remedy, steps=steps, seed=seed))
            ticker.advance()
        curves[remedy.name] = runs[0].losses
        firsts = [r.first_nonfinite for r in runs]
        ok = [r.first_nonfinite is None and r.final_loss < baseline_loss for r in runs]
        fixed[remedy.name] = all(ok)
        diverged = [f for f in firsts if f is not None]
        finals = [r.final_loss for r in runs if math.isfinite(r.final_loss)]
        rows.append(
            [
                remedy.name,
                remedy.description,
                f"{len(diverged)}/{seeds}",
                fmt(min(diverged)) if diverged else "-",
                fmt(statistics.median(finals), 3) if finals else "nan",
                fmt(max(r.max_grad_norm for r in runs), 3),
                f"{sum(ok)}/{seeds}",
            ]
        )
    figures: list[str] = []
    if out is not None:
        path = out / "remedies.png"
        with figure(path, width=7.0, height=4.0) as ax:
            for name, losses in curves.items():
                xs = [i for i, v in enumerate(losses) if math.isfinite(v)]
                ax.semilogy(xs, [losses[i] for i in xs], label=name, linewidth=1)
            ax.axhline(baseline_loss, color="gray", linestyle=":", label="predict the mean")
            ax.set_xlabel("SGD step")
            ax.set_ylabel("training loss (MSE)")
            ax.set_title("20-layer MLP, init gain 2: loss per remedy (seed 0; lines stop at NaN)")
            ax.legend(fontsize=7, ncol=2)
        figures.append(str(path))
    base_diverged = rows[0][2] == f"{seeds}/{seeds}"
    winners = [name for name, ok in fixed.items() if ok]
    return LabResult(
        name="remedies",
        title="A deep plain MLP that diverges, trained once per remedy",
        setup=(
            f"MLP 16 -> 64 -> {DEPTH} ReLU blocks (width 64) -> 1, hidden init N(0, 4/fan_in); "
            f"SGD lr {LR}, batch {BATCH}, {steps} steps; y = sin(2 x.w) + noise, 512 samples; "
            f"{seeds} seed(s)"
        ),
        criterion=(
            "the baseline reaches a non-finite loss on every seed; a remedy fixes the run when it "
            f"stays finite and ends below the loss of predicting the mean ({baseline_loss:.3f})"
        ),
        columns=[
            "remedy",
            "what changes",
            "diverged",
            "first non-finite step",
            "final loss",
            "largest grad norm",
            "fixed",
        ],
        rows=rows,
        passed=base_diverged and bool(winners),
        summary=(
            f"baseline diverged on {rows[0][2]} seeds; fixed on every seed: "
            f"{', '.join(winners) or 'none'}"
        ),
        figures=figures,
    )
