"""Comparing nested training states (model, optimizer, scheduler) in tests."""

from __future__ import annotations

import math
from typing import Any

import torch


def state_diff(a: Any, b: Any, path: str = "") -> str | None:
    """Where two nested states differ (``None``: equal; NaN equals NaN)."""
    if isinstance(a, torch.Tensor):
        same = isinstance(b, torch.Tensor) and a.shape == b.shape
        if same and torch.equal(a.isnan(), b.isnan()):
            return None if torch.equal(a.nan_to_num(), b.nan_to_num()) else path
        return path
    if isinstance(a, dict):
        if not isinstance(b, dict) or a.keys() != b.keys():
            return f"{path} keys"
        return next((d for k in a if (d := state_diff(a[k], b[k], f"{path}.{k}"))), None)
    if isinstance(a, list | tuple):
        if not isinstance(b, list | tuple) or len(a) != len(b):
            return f"{path} length"
        return next(
            (d for i, x in enumerate(a) if (d := state_diff(x, b[i], f"{path}[{i}]"))), None
        )
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return None if math.isnan(b) else path
    return None if a == b else f"{path}: {a!r} != {b!r}"


def states_equal(a: Any, b: Any) -> bool:
    return state_diff(a, b) is None
