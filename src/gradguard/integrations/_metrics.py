"""Turn the guard's flushed record rows into flat metrics a framework logger accepts.

Both adapters read the guard's own rows (:mod:`gradguard.records.recorder`) instead of measuring
again: the numbers in the trainer's logs are exactly the ones the guard decided on, and they reach
the host in the guard's batched flush, never one ``.item()`` per value.
"""

from __future__ import annotations

import math
from typing import Any

from gradguard.guard.guard import GuardConfig
from gradguard.guard.response import SKIPPING as _SKIPPING
from gradguard.records.recorder import Recorder, Row


def check_adapter_args(config: Any, recorder: Any, prefix: Any) -> None:
    """The argument checks both framework adapters share; raise before anything is built."""
    if config is not None and not isinstance(config, GuardConfig):
        raise TypeError(f"config must be a GuardConfig or None, got {type(config).__name__}")
    if recorder is not None and not isinstance(recorder, Recorder):
        raise TypeError(f"recorder must be a Recorder or None, got {type(recorder).__name__}")
    if not isinstance(prefix, str):
        raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")


class RowBuffer:
    """A record sink that keeps rows until an adapter drains them into the trainer's logs."""

    def __init__(self) -> None:
        self.rows: list[Row] = []

    def write(self, rows: list[Row]) -> None:
        self.rows.extend(rows)

    def close(self) -> None:
        return None

    def drain(self) -> list[Row]:
        rows, self.rows = self.rows, []
        return rows


def _num(value: Any) -> float:
    return (
        float(value) if isinstance(value, int | float) and not isinstance(value, bool) else math.nan
    )


def step_metrics(row: Row, prefix: str, layers: bool) -> dict[str, float]:
    """One step row as ``{prefix + name: number}``: loss (raw, NaN kept), norms, threshold, lr,
    whether it was clipped or skipped, and (``layers``) each parameter's pre-clip gradient norm.
    """
    out = {
        f"{prefix}grad_norm": _num(row.get("grad_norm")),
        f"{prefix}clipped_norm": _num(row.get("clipped_norm")),
        f"{prefix}threshold": _num(row.get("threshold")),
        f"{prefix}lr": _num(row.get("lr")),
        f"{prefix}clipped": float(bool(row.get("clipped"))),
        f"{prefix}step_skipped": float(row.get("action") in _SKIPPING),
    }
    if row.get("loss") is not None:
        out[f"{prefix}loss"] = _num(row["loss"])
    if layers:
        for name, norm in (row.get("layers") or {}).items():
            out[f"{prefix}layer/{name}"] = _num(norm)
    return out


def window_metrics(rows: list[Row], prefix: str, layers: bool) -> dict[str, float]:
    """Several step rows (one logging window) summarised the way a trainer logs a window.

    The loss is the plain mean of the raw step losses, so one NaN makes it NaN (a trainer that
    filters non-finite losses out of its own number cannot hide it here); norms, threshold, lr
    and layers are the last step's (as HF's ``grad_norm``); ``clip_rate`` and ``skip_rate`` are
    the fractions of the window's steps that were clipped and not applied.
    """
    steps = [r for r in rows if r.get("kind") == "step"]
    if not steps:
        return {}
    out = step_metrics(steps[-1], prefix, layers)
    del out[f"{prefix}clipped"], out[f"{prefix}step_skipped"]
    losses = [_num(r["loss"]) for r in steps if r.get("loss") is not None]
    if losses:
        out[f"{prefix}loss"] = sum(losses) / len(losses)
    out[f"{prefix}clip_rate"] = sum(bool(r.get("clipped")) for r in steps) / len(steps)
    out[f"{prefix}skip_rate"] = sum(r.get("action") in _SKIPPING for r in steps) / len(steps)
    return out
