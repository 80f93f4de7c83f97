"""Figures built from records alone: gradient flow, norm timeline, clip rate, layer heatmap.

Every function takes host rows (see :mod:`gradguard.records.recorder`) and returns a matplotlib
``Figure`` (or ``None`` when the rows hold nothing to plot); no live model is needed, so a report
can be drawn long after the run, from its JSONL file. Figures are built with the object API
(``matplotlib.figure.Figure``), not pyplot: no global state, no GUI backend, safe in a server.

Like cockpit's instruments, these are pure plotting functions over a log.
"""

from __future__ import annotations

import io
import itertools
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from gradguard.records.recorder import Row

__all__ = [
    "clip_rate",
    "gradient_flow",
    "layer_heatmap",
    "norm_timeline",
    "render_figures",
    "write_figures",
]

# How actions are drawn on the timeline: marker, colour, label.
ACTION_STYLE = {
    "clip": ("o", "#e69f00", "clipped"),
    "skip": ("X", "#d62728", "skipped"),
    "backoff": ("v", "#9467bd", "LR back-off"),
    "rollback": ("|", "#8c564b", "rollback"),
    "abort": ("*", "#000000", "abort"),
}
_MAX_COLUMNS = 400


def _figure(width: float = 8.0, height: float = 3.6) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _num(v: Any) -> float:
    if isinstance(v, bool) or v is None:
        return math.nan
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _steps(rows: Iterable[Row]) -> list[Row]:
    return sorted((r for r in rows if r.get("kind") == "step"), key=lambda r: r["step"])


def _layer_names(steps: list[Row]) -> list[str]:
    names: dict[str, None] = {}
    for r in steps:
        layers = r.get("layers")
        if isinstance(layers, dict):
            names.update(dict.fromkeys(str(k) for k in layers))
    return list(names)


def _diagnosis_layers(rows: Iterable[Row]) -> list[Row]:
    found = [r for r in rows if r.get("kind") == "diagnosis" and r.get("part") == "layer"]
    return sorted(found, key=lambda r: int(r.get("index", 0)))


def gradient_flow(rows: list[Row]) -> Any | None:
    """Gradient norm per layer, log scale: median and max over the logged steps (the step rows'
    ``layers``), or, without them, the preflight diagnosis's gradient norm per depth."""
    steps = _steps(rows)
    names = _layer_names(steps)
    fig = _figure()
    ax = fig.add_subplot()
    if names:
        med, top = [], []
        for n in names:
            vals = sorted(
                v
                for r in steps
                if isinstance(r.get("layers"), dict)
                for v in [_num(r["layers"].get(n))]
                if math.isfinite(v) and v > 0
            )
            med.append(vals[len(vals) // 2] if vals else math.nan)
            top.append(vals[-1] if vals else math.nan)
        x = range(len(names))
        ax.plot(x, med, "o-", color="#0072b2", label="median over steps")
        ax.plot(x, top, "^--", color="#d55e00", label="max over steps", alpha=0.8)
        ax.set_title("Gradient flow: gradient norm per layer")
    else:
        diag = _diagnosis_layers(rows)
        if not diag:
            return None
        names = [str(r.get("name", i)) for i, r in enumerate(diag)]
        x = range(len(names))
        ax.plot(x, [_num(r.get("grad_norm")) for r in diag], "o-", color="#0072b2",
                label="gradient norm at the layer's input")  # fmt: skip
        ax.plot(x, [_num(r.get("act_rms")) for r in diag], "s--", color="#009e73",
                label="activation RMS", alpha=0.8)  # fmt: skip
        ax.set_title("Gradient flow at initialization (preflight diagnosis)")
    ax.set_yscale("log")
    ax.set_xlabel("layer (input side left)")
    ax.set_ylabel("norm")
    step = max(1, len(names) // 30)
    ax.set_xticks(list(x)[::step], [n[:18] for n in names][::step], rotation=60, fontsize=7)
    ax.legend(fontsize=8)
    ax.grid(True, which="major", alpha=0.3)
    return fig


def _actions(rows: list[Row]) -> dict[str, list[int]]:
    """Steps per action, from action events and from step rows' ``action``/``clipped``."""
    found: dict[str, set[int]] = {k: set() for k in ACTION_STYLE}
    for r in rows:
        kind = r.get("kind")
        action = r.get("action")
        if kind in ("action", "step") and action in found:
            found[str(action)].add(int(r["step"]))
        if kind == "step" and r.get("clipped") is True and action in (None, "clip", "step"):
            found["clip"].add(int(r["step"]))
    return {k: sorted(v) for k, v in found.items()}


def norm_timeline(rows: list[Row]) -> Any | None:
    """Total gradient norm over steps (log scale) with the threshold, the clipped norm, and
    clips, skips, LR back-offs, rollbacks and aborts marked. Non-finite norms are drawn as red
    ticks at the top edge. When the rows carry a loss, a second panel below shows it."""
    steps = _steps(rows)
    if not steps:
        return None
    xs = [int(r["step"]) for r in steps]
    norms = [_num(r.get("grad_norm")) for r in steps]
    losses = [_num(r.get("loss")) for r in steps]
    with_loss = any(math.isfinite(v) for v in losses)
    fig = _figure(9.0, 5.6 if with_loss else 4.0)
    if with_loss:
        ax, lax = fig.subplots(2, 1, sharex=True, height_ratios=(3, 2))
    else:
        ax = fig.add_subplot()
    ax.plot(xs, norms, "-", color="#0072b2", lw=1.0, label="grad norm (pre-clip)")
    clipped = [_num(r.get("clipped_norm")) for r in steps]
    if any(math.isfinite(v) for v in clipped):
        ax.plot(xs, clipped, "-", color="#56b4e9", lw=0.8, alpha=0.8, label="after clipping")
    thr = [_num(r.get("threshold")) for r in steps]
    if any(math.isfinite(v) for v in thr):
        ax.plot(xs, thr, "--", color="#555555", lw=0.8, label="threshold")
    by_step = dict(zip(xs, norms))
    finite = [v for v in norms if math.isfinite(v) and v > 0]
    top = max(finite) * 2 if finite else 1.0
    for action, at in _actions(rows).items():
        if not at:
            continue
        marker, color, label = ACTION_STYLE[action]
        if action in ("rollback", "abort"):
            for i, s in enumerate(at):
                ax.axvline(s, color=color, lw=1.2, ls=":", label=label if i == 0 else None)
            continue
        ys = [by_step.get(s, math.nan) for s in at]
        ys = [y if math.isfinite(y) and y > 0 else top for y in ys]
        ax.scatter(at, ys, marker=marker, color=color, s=28, zorder=3, label=label)
    bad = [s for s, v in zip(xs, norms) if not math.isfinite(v)]
    if bad:
        ax.scatter(bad, [top] * len(bad), marker="|", color="#d62728", s=80, label="non-finite")
    if finite:
        ax.set_yscale("log")
    ax.set_ylabel("gradient norm")
    ax.set_title("Gradient norm timeline")
    ax.legend(fontsize=8, loc="upper left", ncols=3)
    ax.grid(True, alpha=0.3)
    if not with_loss:
        ax.set_xlabel("step")
        return fig
    lax.plot(xs, losses, "-", color="#009e73", lw=1.0, label="loss")
    acts = _actions(rows)
    for action in ("skip", "rollback", "abort"):
        for s in acts[action]:
            lax.axvline(s, color=ACTION_STYLE[action][1], lw=0.8, ls=":", alpha=0.8)
    fin = [v for v in losses if math.isfinite(v)]
    bad_loss = [s for s, v in zip(xs, losses) if not math.isfinite(v)]
    if bad_loss:
        lax.scatter(bad_loss, [max(fin)] * len(bad_loss), marker="|", color="#d62728", s=80,
                    label="non-finite loss")  # fmt: skip
    if min(fin) > 0 and max(fin) / min(fin) > 100:
        lax.set_yscale("log")
    lax.set_xlabel("step")
    lax.set_ylabel("loss")
    lax.legend(fontsize=8, loc="upper right")
    lax.grid(True, alpha=0.3)
    return fig


def clip_rate(rows: list[Row], window: int | None = None) -> Any | None:
    """Fraction of steps clipped (and skipped) in a moving window over steps."""
    steps = _steps(rows)
    if not steps:
        return None
    xs = [int(r["step"]) for r in steps]
    acts = _actions(rows)
    clip_at, skip_at = set(acts["clip"]), set(acts["skip"])
    w = window or max(1, min(50, len(xs) // 10 or 1))
    clip = [1.0 if s in clip_at else 0.0 for s in xs]
    skip = [1.0 if s in skip_at else 0.0 for s in xs]

    def moving(v: list[float]) -> list[float]:
        out, acc = [], 0.0
        for i, x in enumerate(v):
            acc += x - (v[i - w] if i >= w else 0.0)
            out.append(acc / min(i + 1, w))
        return out

    fig = _figure(9.0, 3.0)
    ax = fig.add_subplot()
    ax.plot(xs, moving(clip), color="#e69f00", label=f"clipped (moving mean of {w})")
    if skip_at:
        ax.plot(xs, moving(skip), color="#d62728", label=f"skipped (moving mean of {w})")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("step")
    ax.set_ylabel("fraction of steps")
    total = sum(clip) / len(clip)
    ax.set_title(f"Clip rate ({total:.1%} of {len(xs)} steps clipped)")
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    return fig


def layer_heatmap(rows: list[Row]) -> Any | None:
    """log10 gradient norm per layer (rows, input side on top) and step (columns); non-finite
    cells are red. Long runs are binned to at most 400 columns, keeping each bin's maximum."""
    import numpy as np
    from matplotlib.colors import ListedColormap

    steps = [r for r in _steps(rows) if isinstance(r.get("layers"), dict)]
    names = _layer_names(steps)
    if not names:
        return None
    grid = np.full((len(names), len(steps)), np.nan)
    bad = np.zeros_like(grid, dtype=bool)
    for j, r in enumerate(steps):
        for i, n in enumerate(names):
            v = _num(r["layers"].get(n))
            if n in r["layers"] and not math.isfinite(v):
                bad[i, j] = True
            elif v > 0:
                grid[i, j] = math.log10(v)
    xs = [int(r["step"]) for r in steps]
    if len(steps) > _MAX_COLUMNS:
        edges = np.linspace(0, len(steps), _MAX_COLUMNS + 1).astype(int)
        cols = [slice(a, b) for a, b in itertools.pairwise(edges) if b > a]
        with np.errstate(all="ignore"):
            grid = np.stack([_nanmax(grid[:, c]) for c in cols], axis=1)
        bad = np.stack([bad[:, c].any(axis=1) for c in cols], axis=1)
        xs = [xs[c.start] for c in cols]
    fig = _figure(9.0, max(2.5, min(9.0, 0.25 * len(names) + 1.5)))
    ax = fig.add_subplot()
    extent = (xs[0] - 0.5, xs[-1] + 0.5, len(names) - 0.5, -0.5)
    im = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest", extent=extent)
    if bad.any():
        ax.imshow(np.where(bad, 1.0, np.nan), aspect="auto", interpolation="nearest",
                  cmap=ListedColormap(["#d62728"]), extent=extent)  # fmt: skip
    fig.colorbar(im, ax=ax, label="log10 gradient norm")
    step = max(1, len(names) // 25)
    ax.set_yticks(range(0, len(names), step), [n[:24] for n in names][::step], fontsize=7)
    ax.set_xlabel("step")
    ax.set_title("Gradient norm per layer and step")
    return fig


def _nanmax(block: Any) -> Any:
    import numpy as np

    out = np.full(block.shape[0], np.nan)
    has = ~np.isnan(block).all(axis=1)
    out[has] = np.nanmax(block[has], axis=1)
    return out


FIGURES: list[tuple[str, str, Callable[[list[Row]], Any | None]]] = [
    ("norm_timeline", "Gradient norm timeline", norm_timeline),
    ("clip_rate", "Clip rate over time", clip_rate),
    ("gradient_flow", "Gradient flow per layer", gradient_flow),
    ("layer_heatmap", "Gradient norm per layer and step", layer_heatmap),
]


def render_figures(rows: list[Row]) -> list[tuple[str, str, bytes]]:
    """Every figure the rows have data for, as ``(name, title, PNG bytes)``."""
    out = []
    for name, title, make in FIGURES:
        fig = make(rows)
        if fig is None:
            continue
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        out.append((name, title, buf.getvalue()))
    return out


def write_figures(rows: list[Row], out_dir: str | Path) -> list[Path]:
    """Write every figure the rows have data for as ``<out_dir>/<name>.png``.

    Args:
        rows: host rows (e.g. ``read_jsonl(path)`` or ``guard.records``).
        out_dir: created if missing.

    Returns:
        The paths written, in the order timeline, clip rate, gradient flow, heatmap.

    Raises:
        TypeError: ``rows`` is not a list.

    Example:
        >>> write_figures(read_jsonl("run.jsonl"), "figs/")
    """
    if not isinstance(rows, list):
        raise TypeError(f"rows must be a list of record dicts, got {type(rows).__name__}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, _, png in render_figures(rows):
        path = out / f"{name}.png"
        path.write_bytes(png)
        paths.append(path)
    return paths
