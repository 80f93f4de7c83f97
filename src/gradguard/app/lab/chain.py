"""Lab 1, chain: a 20-layer one-neuron ReLU network, measured against its closed form.

Every layer is ``a_i = relu(w_i * a_{i-1})`` with ``a_0 = x = 1`` and every ``w_i = w``. For
``w > 0`` the output after ``d`` layers is ``w**d`` and, with the output as the loss, the
gradient with respect to the first weight is ``x * w**(d-1)`` (the chain rule multiplies the
``d - 1`` later weights). With ``w = 2.34`` both grow exponentially with depth (2.34**20 is about
2.42e7); with ``w = 0.5`` they vanish (0.5**19 is about 1.9e-6). Autograd in float64 must agree with
the closed form to 1e-12 relative error.
"""

from __future__ import annotations

from pathlib import Path

import torch

from gradguard.app.lab._plot import figure
from gradguard.app.lab._result import LabResult, NullTicker, Ticker, fmt

WEIGHTS = (2.34, 0.5)
DEPTH = 20
TOLERANCE = 1e-12


def chain_forward_backward(
    weight: float, depth: int, x: float = 1.0, dtype: torch.dtype = torch.float64
) -> tuple[float, list[float]]:
    """Run the one-neuron ReLU chain with autograd.

    Args:
        weight: the value of every weight ``w_i``.
        depth: number of layers (>= 1).
        x: the scalar input.
        dtype: floating dtype of the computation.

    Returns:
        ``(output, grads)`` where ``grads[i]`` is ``d output / d w_{i+1}``.

    Example:
        >>> out, grads = chain_forward_backward(2.34, 20)
        >>> round(out / 2.34**20, 12), round(grads[0] / 2.34**19, 12)
        (1.0, 1.0)
    """
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth must be an int >= 1, got {depth!r}")
    ws = [torch.tensor(float(weight), dtype=dtype, requires_grad=True) for _ in range(depth)]
    a = torch.tensor(float(x), dtype=dtype)
    for w in ws:
        a = torch.relu(w * a)
    a.backward()
    grads = [float(w.grad) if w.grad is not None else 0.0 for w in ws]
    return float(a.detach()), grads


def closed_form(weight: float, depth: int, x: float = 1.0) -> tuple[float, float]:
    """``(w**depth * x, w**(depth-1) * x)``: output and gradient for the first weight (w > 0)."""
    return weight**depth * x, weight ** (depth - 1) * x


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b) if b != 0 else abs(a)


def run(
    *, seeds: int = 1, quick: bool = False, out: Path | None = None, ticker: Ticker | None = None
) -> LabResult:
    """Measure output and dL/dw1 for depths 1..20 and both seed weights; compare to closed form.

    Args:
        seeds: unused (the chain has no randomness); accepted for a uniform CLI.
        quick: unused (the experiment takes milliseconds).
        out: folder for ``chain.png``; ``None`` writes nothing.
        ticker: progress callbacks.

    Returns:
        A :class:`LabResult`; ``passed`` when every relative error is below 1e-12.
    """
    del seeds, quick
    ticker = ticker or NullTicker()
    depths = list(range(1, DEPTH + 1))
    ticker.start("chain: autograd vs closed form", len(WEIGHTS) * len(depths))
    series: dict[float, tuple[list[float], list[float]]] = {}
    worst = 0.0
    rows: list[list[object]] = []
    for w in WEIGHTS:
        outs, grads = [], []
        for d in depths:
            y, g = chain_forward_backward(w, d)
            y_cf, g_cf = closed_form(w, d)
            err = max(_rel(y, y_cf), _rel(g[0], g_cf))
            worst = max(worst, err)
            outs.append(y)
            grads.append(g[0])
            if d in (1, 5, 10, 15, 20):
                rows.append(
                    [fmt(w), d, fmt(y, 6), fmt(y_cf, 6), fmt(g[0], 6), fmt(g_cf, 6), fmt(err, 2)]
                )
            ticker.advance()
        series[w] = (outs, grads)
    figures: list[str] = []
    if out is not None:
        path = out / "chain.png"
        with figure(path) as ax:
            for w, (_, grads) in series.items():
                ax.semilogy(depths, [abs(g) for g in grads], "o", label=f"autograd, w = {w}")
                ax.semilogy(depths, [closed_form(w, d)[1] for d in depths], "-", color="gray")
            ax.set_xlabel("depth d of the chain")
            ax.set_ylabel("|dL/dw1|")
            ax.set_title("One-neuron ReLU chain: gradient = w^(d-1) (gray: closed form)")
            ax.legend()
        figures.append(str(path))
    y20 = series[2.34][0][-1]
    g20 = series[2.34][1][-1]
    return LabResult(
        name="chain",
        title="20-layer one-neuron ReLU chain: gradients grow or vanish as w^depth",
        setup=(
            f"a_i = relu(w * a_(i-1)), a_0 = x = 1, every weight w in {list(WEIGHTS)}, "
            f"depth 1..{DEPTH}; loss = output; autograd in float64"
        ),
        criterion=(
            f"output = w^d and dL/dw1 = w^(d-1) within relative error {TOLERANCE:g} at every depth"
        ),
        columns=["w", "depth", "output", "w^d", "dL/dw1", "w^(d-1)", "rel. error"],
        rows=rows,
        passed=worst < TOLERANCE,
        summary=(
            f"w = 2.34, depth 20: output {y20:.6g} (closed form {2.34**20:.6g}), dL/dw1 {g20:.6g}; "
            f"w = 0.5: dL/dw1 {series[0.5][1][-1]:.3g}; worst relative error {worst:.1e}"
        ),
        figures=figures,
    )
