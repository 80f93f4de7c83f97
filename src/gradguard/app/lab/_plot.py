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
