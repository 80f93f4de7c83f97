"""MEASURE: per-tensor norms, the total norm for any p > 0 or inf, and a finiteness flag.

Everything stays on the device: nothing here calls ``.item()`` or branches on a value, so a
training step that measures gradients never waits for the accelerator. Low-precision tensors
(fp16, bf16) are reduced in fp32: torch keeps a bf16 gradient's norm in bf16, which loses about
three significant digits exactly where clipping decisions are made.

Sharded gradients are handled two ways: DTensor inputs (FSDP2's ``fully_shard``) are reduced to
the full norm with ``full_tensor()``, and ``group=`` all-reduces norms of plain local shards
(sum of p-th powers, or max for inf).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from gradguard import _validate
from gradguard._foreach import group_by_device_dtype, use_foreach

LOW_PRECISION = (torch.float16, torch.bfloat16)


class GradNorms(NamedTuple):
    """What :func:`grad_norms` measured, all 0-dim fp32 tensors (or a list of them).

    Attributes:
        per_tensor: the norm of each input tensor, in input order.
        total: the norm of all inputs viewed as one vector.
        finite: ``total.isfinite()``: False when any element is NaN or inf (or the p-th power
            sum overflowed), in which case no clipping coefficient is meaningful.
    """

    per_tensor: list[Tensor]
    total: Tensor
    finite: Tensor


def _is_dtensor(t: Tensor) -> bool:
    return type(t).__name__ == "DTensor"


def _full(t: Tensor) -> Tensor:
    # A DTensor norm is Partial over the mesh; full_tensor() all-reduces it to the real value.
    return t.full_tensor() if _is_dtensor(t) else t  # type: ignore[attr-defined]


def tensor_norms(
    tensors: list[Tensor], norm_type: float = 2.0, foreach: bool | None = None
) -> list[Tensor]:
    """The p-norm of each tensor as a 0-dim tensor; fp16/bf16 inputs are reduced in fp32.

    Args:
        tensors: dense floating tensors (already validated).
        norm_type: p > 0 or ``math.inf``.
        foreach: torch's flag: ``None`` uses the fused kernel where supported.

    Returns:
        One norm per input, in input order, on each input's device. fp32/fp64 inputs give norms
        in their own dtype, bit-identical to torch; low-precision inputs give fp32 norms.
    """
    out: list[Tensor | None] = [None] * len(tensors)
    index = {id(t): i for i, t in enumerate(tensors)}
    for (device, dtype), group in group_by_device_dtype(tensors).items():
        acc = torch.float32 if dtype in LOW_PRECISION else None
        if use_foreach(group, device, foreach):
            norms = list(torch._foreach_norm(group, norm_type, dtype=acc))
        else:
            norms = [torch.linalg.vector_norm(t, norm_type, dtype=acc) for t in group]
        for t, n in zip(group, norms):
            out[index[id(t)]] = n
    # Duplicated tensor objects map to one index; fill any holes from the first occurrence.
    for i, t in enumerate(tensors):
        if out[i] is None:
            out[i] = out[index[id(t)]]
    return [n for n in out if n is not None]


def total_from_norms(norms: list[Tensor], norm_type: float, device: torch.device) -> Tensor:
    """Combine per-tensor norms into the norm of the concatenation, as torch does."""
    if not norms:
        return torch.zeros((), device=device)
    stacked = torch.stack([_full(n).to(device) for n in norms])
    if stacked.dtype in LOW_PRECISION:
        stacked = stacked.float()
    return torch.linalg.vector_norm(stacked, norm_type)


def _reduce_over_group(total: Tensor, norm_type: float, group: Any) -> Tensor:
    """All-reduce a local total norm over ``group``: sum of p-th powers, or max for inf."""
    if math.isinf(norm_type):
        reduced = total.clone()
        dist.all_reduce(reduced, op=dist.ReduceOp.MAX, group=group)
        return reduced
    # Powers in fp64 where the device allows it: 1e20**2 overflows fp32 but not the true norm.
    work = total.double() if total.device.type != "mps" else total.float()
    powered = work.pow(norm_type)
    dist.all_reduce(powered, op=dist.ReduceOp.SUM, group=group)
    return powered.pow(1.0 / norm_type).to(total.dtype)


def grad_norms(
    tensors: Tensor | Iterable[Tensor],
    norm_type: float | str = 2.0,
    *,
    foreach: bool | None = None,
    group: Any = None,
) -> GradNorms:
    """Measure per-tensor norms, the total norm and a finiteness flag in one pass, no host sync.

    Args:
        tensors: gradients (not parameters) or a single tensor. DTensors are reduced over their
            mesh.
        norm_type: p > 0 or ``inf``/``'inf'``.
        foreach: use torch's fused ``_foreach_norm`` (``None``: where supported).
        group: a ``torch.distributed`` process group whose ranks each hold a shard of the
            gradients as plain tensors; the total is reduced over it. ``None``: no reduction.

    Returns:
        :class:`GradNorms` with the per-tensor norms, the total (fp32 for fp16/bf16 inputs) and
        ``finite``. An empty input gives a total of 0, as torch does.

    Example:
        >>> p = torch.nn.Parameter(torch.ones(4)); p.grad = torch.full((4,), 2.0)
        >>> grad_norms([p.grad]).total
        tensor(4.)
    """
    p = _validate.norm_type(norm_type)
    items = _validate.materialize(tensors, "tensors")
    _validate.check_tensors(items, "tensors")
    foreach = _validate.foreach_flag(foreach)
    device = items[0].device if items else torch.device("cpu")
    per_tensor = tensor_norms(items, p, foreach)
    total = total_from_norms(per_tensor, p, device)
    if group is not None:
        total = _reduce_over_group(total, p, group)
    return GradNorms(per_tensor, total, total.isfinite())


def get_total_norm(
    tensors: Tensor | Iterable[Tensor],
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
) -> Tensor:
    """Drop-in for ``torch.nn.utils.get_total_norm``: the norm of ``tensors`` as one vector.

    Same signature and, for fp32/fp64, bit-identical results; fp16/bf16 inputs are reduced in
    fp32 and the result is fp32 (closer to the exact value than torch's bf16 result).
    DTensor inputs give the full (reduced) norm as a plain tensor.

    Args:
        tensors: tensors (usually gradients) or a single tensor.
        norm_type: p > 0 or ``inf``.
        error_if_nonfinite: raise ``RuntimeError`` when the total is NaN or inf (one host sync).
        foreach: torch's flag.

    Returns:
        The total norm, a 0-dim tensor on the first tensor's device (CPU if empty: ``0.0``).

    Example:
        >>> get_total_norm([torch.tensor([3.0]), torch.tensor([4.0])])
        tensor(5.)
    """
    total = grad_norms(tensors, norm_type, foreach=foreach).total
    if error_if_nonfinite and not bool(total.isfinite()):
        raise RuntimeError(
            f"The total norm of order {float(norm_type)} for gradients from `parameters` is "
            "non-finite, so it cannot be clipped. To disable this error and scale the gradients "
            "by the non-finite norm anyway, set `error_if_nonfinite=False`"
        )
    return total
