"""What one lab experiment hands back: its setup, criterion, table and verdict."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from torch import Tensor


class Ticker(Protocol):
    """Progress callbacks an experiment calls; the CLI draws them as rich progress bars."""

    def start(self, description: str, total: int) -> None: ...

    def advance(self, n: int = 1) -> None: ...


class NullTicker:
    """A :class:`Ticker` that draws nothing (library use and tests)."""

    def start(self, description: str, total: int) -> None:
        pass

    def advance(self, n: int = 1) -> None:
        pass


@dataclass
class LabResult:
    """The outcome of one experiment.

    Attributes:
        name: the experiment's CLI name (``chain``, ``vectors``, ...).
        title: one line saying what is measured.
        setup: the model, data and optimizer, in words, with every size that matters.
        criterion: what must hold for the experiment to count as reproduced.
        columns: table header.
        rows: table cells (numbers or strings), one list per row.
        passed: whether the criterion held.
        summary: one line with the headline numbers.
        figures: PNG files written (empty when no output folder was given).
    """

    name: str
    title: str
    setup: str
    criterion: str
    columns: list[str]
    rows: list[list[Any]]
    passed: bool
    summary: str
    figures: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_markdown(self, seconds: float | None = None) -> str:
        """The result as a markdown section: setup, criterion, table and verdict."""
        took = f" ({seconds:.1f} s)" if seconds is not None else ""
        verdict = "held" if self.passed else "FAILED"
        lines = [
            f"### {self.name}: {self.title}{took}",
            "",
            f"*Setup:* {self.setup}",
            "",
            f"*Success criterion:* {self.criterion}",
            "",
            "| " + " | ".join(self.columns) + " |",
            "|" + "---|" * len(self.columns),
        ]
        lines += [
            "| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in self.rows
        ]
        lines += ["", f"*Criterion {verdict}:* {self.summary}"]
        return "\n".join(lines)

    def save(self, out: Path) -> Path:
        """Write ``<out>/<name>.json`` (the numbers behind the printed table)."""
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"{self.name}.json"
        path.write_text(json.dumps(self.to_dict(), indent=2, default=str) + "\n", encoding="utf-8")
        return path


def fmt(x: Any, digits: int = 4) -> str:
    """A table cell: floats in ``%g`` style with ``digits`` significant digits."""
    if isinstance(x, bool) or x is None:
        return "-" if x is None else ("yes" if x else "no")
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return str(x)


def read_curves(
    losses: list[Tensor], norms: list[Tensor]
) -> tuple[list[float], list[float], list[int]]:
    """Bring a run's per-step loss and gradient-norm tensors to the host in one transfer each.

    Returns:
        ``(losses, norms, bad)`` as floats, with ``bad`` the steps where either is non-finite.
    """
    import torch

    loss_list = torch.stack(losses).tolist()
    norm_list = torch.stack(norms).tolist()
    bad = [
        i
        for i, (a, b) in enumerate(zip(loss_list, norm_list))
        if not (math.isfinite(a) and math.isfinite(b))
    ]
    return loss_list, norm_list, bad
