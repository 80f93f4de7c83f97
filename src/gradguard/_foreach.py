"""Grouping tensors by (device, dtype) and the foreach-or-loop rule, in one place.

torch's fused ``_foreach_*`` kernels take one list per (device, dtype); anything they do not
support (DTensor on some versions, exotic devices) falls back to a plain per-tensor loop.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.utils._foreach_utils import (
    _device_has_foreach_support,
    _group_tensors_by_device_and_dtype,
    _has_foreach_support,
)

Groups = dict[tuple[torch.device, torch.dtype], list[Tensor]]


def group_by_device_dtype(tensors: Sequence[Tensor]) -> Groups:
    """Split ``tensors`` into lists that share a device and a dtype, keeping their order."""
    if not tensors:
        return {}
    grouped = _group_tensors_by_device_and_dtype([list(tensors)])  # type: ignore[list-item]
    return {key: list(lists[0]) for key, (lists, _) in grouped.items()}  # type: ignore[misc,arg-type]


def use_foreach(tensors: Sequence[Tensor], device: torch.device, foreach: bool | None) -> bool:
    """torch's rule: ``None`` means "when supported"; ``True`` insists and raises if it can't."""
    if foreach is None:
        return _has_foreach_support(list(tensors), device)
    if foreach and not _device_has_foreach_support(device):
        raise RuntimeError(
            f"foreach=True was passed, but can't use the foreach API on {device.type} tensors"
        )
    return bool(foreach)


def mul_(tensors: Sequence[Tensor], factor: Tensor, foreach: bool | None = None) -> None:
    """Multiply every tensor in place by the 0-dim ``factor`` (moved to each device once)."""
    for (device, _), group in group_by_device_dtype(tensors).items():
        local = factor.to(device)
        if use_foreach(group, device, foreach):
            torch._foreach_mul_(group, local)
        else:
            for t in group:
                t.mul_(local)
