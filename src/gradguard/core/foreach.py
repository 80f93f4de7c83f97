"""Grouping tensors by (device, dtype) and the foreach-or-loop rule, in one place.

torch's fused ``_foreach_*`` kernels take one list per (device, dtype); anything they do not
support (DTensor on some versions, exotic devices) falls back to a plain per-tensor loop.
Grouping is done once per call (in C++, by torch) and the groups are handed to every stage, so
that measuring and scaling thousands of gradients costs no more Python than torch's own loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor
from torch.utils._foreach_utils import (
    _device_has_foreach_support,
    _group_tensors_by_device_and_dtype,
    _has_foreach_support,
)


class Group(NamedTuple):
    """Tensors sharing a device and a dtype, with their positions in the input list."""

    device: torch.device
    dtype: torch.dtype
    tensors: list[Tensor]
    indices: list[int]


Groups = dict[tuple[torch.device, torch.dtype], list[Tensor]]


def groups_of(tensors: Sequence[Tensor]) -> list[Group]:
    """Split ``tensors`` into (device, dtype) groups in torch's order, keeping input order inside.

    The group order is the one torch's clip functions use, so totals stacked in this order are
    bit-identical to torch's.
    """
    if not tensors:
        return []
    grouped = _group_tensors_by_device_and_dtype(
        [list(tensors)],  # type: ignore[list-item]
        with_indices=True,
    )
    return [
        Group(device, dtype, list(lists[0]), list(indices))  # type: ignore[arg-type]
        for (device, dtype), (lists, indices) in grouped.items()  # type: ignore[misc]
    ]


def group_by_device_dtype(tensors: Sequence[Tensor]) -> Groups:
    """Split ``tensors`` into lists that share a device and a dtype, keeping their order."""
    return {(g.device, g.dtype): g.tensors for g in groups_of(tensors)}


def use_foreach(tensors: Sequence[Tensor], device: torch.device, foreach: bool | None) -> bool:
    """torch's rule: ``None`` means "when supported"; ``True`` insists and raises if it can't."""
    if foreach is None:
        return _has_foreach_support(list(tensors), device)
    if foreach and not _device_has_foreach_support(device):
        raise RuntimeError(
            f"foreach=True was passed, but can't use the foreach API on {device.type} tensors"
        )
    return bool(foreach)


def mul_(
    tensors: Sequence[Tensor],
    factor: Tensor,
    foreach: bool | None = None,
    *,
    groups: list[Group] | None = None,
) -> None:
    """Multiply every tensor in place by the 0-dim ``factor`` (moved to each device once).

    ``groups`` (from :func:`groups_of` on the same ``tensors``) saves regrouping.
    """
    for group in groups_of(tensors) if groups is None else groups:
        local = factor if factor.device == group.device else factor.to(group.device)
        if use_foreach(group.tensors, group.device, foreach):
            torch._foreach_mul_(group.tensors, local)
        else:
            for t in group.tensors:
                t.mul_(local)


def mul_each_(
    tensors: Sequence[Tensor],
    factors: Sequence[Tensor] | Tensor,
    foreach: bool | None = None,
    *,
    groups: list[Group] | None = None,
) -> None:
    """Multiply each tensor in place by its own 0-dim factor: ``tensors[i] *= factors[i]``.

    Grouped by (device, dtype) like :func:`mul_`; each group takes one ``_foreach_mul_`` with a
    list of factors, or a plain loop where foreach is not supported. Factors are moved to their
    tensor's device and dtype first (a bf16 gradient times an fp32 factor rounds the factor to
    bf16 either way); no value is read on the host.

    Args:
        tensors: the tensors to scale, in place.
        factors: one 0-dim tensor per tensor, or a 1-D tensor with one entry per tensor (moved
            once per group rather than once per factor).
        foreach: torch's flag: ``None`` uses the fused kernel where supported.
        groups: :func:`groups_of` of the same ``tensors``, to save regrouping.

    Raises:
        ValueError: not one factor per tensor.

    Example:
        >>> ts = [torch.ones(2), torch.ones(3)]
        >>> mul_each_(ts, torch.tensor([0.5, 2.0]))
        >>> ts
        [tensor([0.5000, 0.5000]), tensor([2., 2., 2.])]
    """
    n = factors.numel() if isinstance(factors, Tensor) else len(factors)
    if n != len(tensors):
        raise ValueError(f"mul_each_ needs one factor per tensor: {n} for {len(tensors)}")
    for group in groups_of(tensors) if groups is None else groups:
        if isinstance(factors, Tensor):
            parts = factors.reshape(-1).to(group.device, group.dtype).unbind(0)
            local = [parts[i] for i in group.indices]
        else:
            local = [factors[i].to(group.device, group.dtype) for i in group.indices]
        if use_foreach(group.tensors, group.device, foreach):
            torch._foreach_mul_(group.tensors, local)
        else:
            for t, f in zip(group.tensors, local):
                t.mul_(f)
