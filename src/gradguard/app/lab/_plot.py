"""Matplotlib without a display: every lab figure goes through :func:`figure`."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def figure(path: Path, *, width: float = 6.4, height: float = 3.6) -> Iterator[Any]:
    """Yield a matplotlib Axes; save it to ``path`` (PNG, 110 dpi) and close it on exit."""
    import matplotlib

    matplotlib.use("Agg", force=True)  # headless CI and servers: never try to open a window
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(width, height))
    try:
        yield ax
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)


@contextmanager
def figure_grid(path: Path, rows: int, cols: int, *, width: float, height: float) -> Iterator[Any]:
    """Yield the flat list of a ``rows`` x ``cols`` grid of Axes; save and close on exit."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(rows, cols, figsize=(width, height), squeeze=False)
    try:
        yield [ax for row in axes for ax in row]
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
