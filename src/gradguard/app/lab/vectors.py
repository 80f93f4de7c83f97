"""Lab 2, vectors: element-wise products, above 1 and below 1, and norm rescaling.

The loop multiplies ``v1 = [1.3, 2.1, 1.73, 0.42, 1.25]`` five times, element by element, by
``v2 = [1.26, 1.35, 2.58, 2.81, 1.32]`` (explodes) and the below-1 pair
``[0.3, 0.1, 0.73, 0.42, 0.25]``, ``[0.26, 0.35, 0.58, 0.81, 0.32]`` (vanishes). The closed form is
``v1 * v2**5``. The classic remedy: after each multiplication, when the norm of the result passes a
threshold, divide by the norm. We also show gradguard's ``clip_by_norm`` (rescale *to* the
threshold, TF's rule), which keeps the direction and bounds the norm at the threshold.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from gradguard.app.lab._plot import figure
from gradguard.app.lab._result import LabResult, NullTicker, Ticker, fmt
from gradguard.core.clip import clip_by_norm

EXPLODING = ([1.3, 2.1, 1.73, 0.42, 1.25], [1.26, 1.35, 2.58, 2.81, 1.32])
VANISHING = ([0.3, 0.1, 0.73, 0.42, 0.25], [0.26, 0.35, 0.58, 0.81, 0.32])
POWER = 5
THRESHOLD = 10.0
LONG = 20  # multiplications in the rescaling demonstration


def seed_loop(v1: list[float], v2: list[float], power: int = POWER) -> list[float]:
    """The plain-Python loop: ``resultant[i] *= v2[i]``, ``power`` times.

    Example:
        >>> [round(x, 3) for x in seed_loop([1.0, 2.0], [2.0, 0.5], 3)]
        [8.0, 0.25]
    """
    result = list(v1)
    for _ in range(power):
        for i in range(len(result)):
            result[i] = result[i] * v2[i]
    return result


def rescaled_products(
    v1: list[float], v2: list[float], steps: int, threshold: float, rule: str
) -> list[float]:
    """L2 norm of the running product after each of ``steps`` multiplications, with a rescale.

    Args:
        v1, v2: the starting vector and the per-step factor.
        steps: multiplications.
        threshold: the norm above which the rule acts.
        rule: ``"none"``; ``"divide"`` (classic: ``r / ||r||`` when ``||r|| > threshold``) or
            ``"clip"`` (:func:`gradguard.clip_by_norm`: ``r * threshold / ||r||``).

    Returns:
        The norm after each step.
    """
    if rule not in ("none", "divide", "clip"):
        raise ValueError(f"rule must be 'none', 'divide' or 'clip', got {rule!r}")
    r = torch.tensor(v1, dtype=torch.float64)
    f = torch.tensor(v2, dtype=torch.float64)
    norms = []
    for _ in range(steps):
        r = r * f
        n = torch.linalg.vector_norm(r)
        if rule == "divide":
            r = torch.where(n > threshold, r / n, r)
        elif rule == "clip":
            r = clip_by_norm(r, threshold)
        norms.append(float(torch.linalg.vector_norm(r)))
    return norms


def run(
    *, seeds: int = 1, quick: bool = False, out: Path | None = None, ticker: Ticker | None = None
) -> LabResult:
    """Compare the plain-Python loop with ``v1 * v2**5`` and show that rescaling bounds the norm.

    Args:
        seeds, quick: unused (deterministic, milliseconds); accepted for a uniform CLI.
        out: folder for ``vectors.png``; ``None`` writes nothing.
        ticker: progress callbacks.

    Returns:
        A :class:`LabResult`; ``passed`` when the loop matches the closed form to 1e-12 and both
        rescaling rules keep every norm at or below ``threshold * max(v2)``.
    """
    del seeds, quick
    ticker = ticker or NullTicker()
    ticker.start("vectors: products and rescaling", 4)
    rows: list[list[object]] = []
    worst = 0.0
    for label, (v1, v2) in (("above 1", EXPLODING), ("below 1", VANISHING)):
        loop = seed_loop(v1, v2)
        closed = (
            torch.tensor(v1, dtype=torch.float64) * torch.tensor(v2, dtype=torch.float64) ** POWER
        ).tolist()
        err = max(abs(a - b) / abs(b) for a, b in zip(loop, closed))
        worst = max(worst, err)
        rows.append(
            [label, "v1 * v2^5", "[" + ", ".join(fmt(x, 5) for x in loop) + "]", fmt(err, 2)]
        )
        ticker.advance()
    traces = {
        rule: rescaled_products(*EXPLODING, LONG, THRESHOLD, rule)
        for rule in ("none", "divide", "clip")
    }
    ticker.advance()
    bound = THRESHOLD * max(EXPLODING[1])
    bounded = all(max(traces[r]) <= bound + 1e-9 for r in ("divide", "clip"))
    for rule, text in (
        ("none", "no rescaling"),
        ("divide", f"r / ||r|| when ||r|| > {THRESHOLD:g}"),
        ("clip", f"clip_by_norm(r, {THRESHOLD:g})"),
    ):
        rows.append(
            [
                f"above 1, {LONG} steps",
                text,
                f"final ||r|| = {fmt(traces[rule][-1])}",
                f"max {fmt(max(traces[rule]))}",
            ]
        )
    figures: list[str] = []
    if out is not None:
        path = out / "vectors.png"
        with figure(path) as ax:
            xs = list(range(1, LONG + 1))
            for rule, label in (
                ("none", "no rescaling"),
                ("divide", "divide by norm"),
                ("clip", "clip_by_norm"),
            ):
                ax.semilogy(xs, traces[rule], "o-", label=label, markersize=3)
            ax.axhline(THRESHOLD, color="gray", linestyle=":", label=f"threshold {THRESHOLD:g}")
            ax.set_xlabel("multiplications by v2")
            ax.set_ylabel("||resultant||_2")
            ax.set_title("Element-wise products explode; rescaling by the norm bounds them")
            ax.legend()
        figures.append(str(path))
    ticker.advance()
    return LabResult(
        name="vectors",
        title="Products of factors: above 1 explode, below 1 vanish; rescaling bounds them",
        setup=(
            f"vectors v1, v2 (above 1: {EXPLODING}; below 1: {VANISHING}); v1 * v2^{POWER} "
            f"element-wise; then {LONG} multiplications with a rescale when ||r||_2 > {THRESHOLD:g}"
        ),
        criterion=(
            "the plain loop equals v1 * v2^5 within 1e-12 relative error; with either rescaling "
            f"rule ||r|| never exceeds threshold * max(v2) = {bound:g}"
        ),
        columns=["case", "rule", "result", "check"],
        rows=rows,
        passed=worst < 1e-12 and bounded and math.isfinite(traces["none"][-1]),
        summary=(
            f"above 1: ||v1*v2^5|| = {math.dist(seed_loop(*EXPLODING), [0.0] * 5):.4g}; below 1: "
            f"{math.dist(seed_loop(*VANISHING), [0.0] * 5):.3g}; after {LONG} steps: "
            f"{traces['none'][-1]:.3g} unrescaled vs {traces['clip'][-1]:.3g} clipped"
        ),
        figures=figures,
    )
