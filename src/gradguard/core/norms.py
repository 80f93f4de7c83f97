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

from gradguard.core import validate as _validate
from gradguard.core.foreach import Group, groups_of, use_foreach

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


def _full_all(norms: list[Tensor]) -> list[Tensor]:
    """Plain tensors for a group's norms: one collective for all DTensor norms, not one each."""
    if not any(_is_dtensor(n) for n in norms):
        return norms
    if not all(_is_dtensor(n) for n in norms):  # mixed plain and sharded tensors
        return [_full(n) for n in norms]
    try:
        stacked = torch.stack(norms)
    except (RuntimeError, NotImplementedError):  # placements stack cannot propagate
        return [_full(n) for n in norms]
    return list(_full(stacked).unbind(0))


def _local_inf_norm(t: Tensor, acc: torch.dtype | None) -> Tensor:
    """The inf-norm of a sharded DTensor from its local shard, as a max-Partial DTensor.

    torch computes it with ``_foreach_norm``/``vector_norm`` on each rank's shard, which raises
    on a rank whose shard is empty (FSDP2 gives the last ranks nothing when a dimension has
    fewer rows than ranks), while ``numel()`` is the global size. |x| >= 0, so an empty shard's
    max is 0, and the max over the mesh is the full norm. ``numel()`` of the local tensor is
    metadata: no host sync.
    """
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.placement_types import Partial

    local = t.to_local()  # type: ignore[attr-defined]
    if local.numel():
        n = torch.linalg.vector_norm(local, math.inf, dtype=acc)
    else:
        n = local.new_zeros((), dtype=acc or local.dtype)
    placements = [Partial("max") if p.is_shard() else p for p in t.placements]  # type: ignore[attr-defined]
    return DTensor.from_local(n, t.device_mesh, placements, run_check=False)  # type: ignore[attr-defined]


def _shard_or_replicate(t: Tensor) -> bool:
    return all(p.is_shard() or p.is_replicate() for p in t.placements)  # type: ignore[attr-defined]


def _group_norms(groups: list[Group], norm_type: float, foreach: bool | None) -> list[list[Tensor]]:
    """Per-tensor norms for each group (fp32 for fp16/bf16), DTensor norms made full."""
    out = []
    for g in groups:
        acc = torch.float32 if g.dtype in LOW_PRECISION else None
        if math.isinf(norm_type) and any(
            _is_dtensor(t) and _shard_or_replicate(t) for t in g.tensors
        ):
            norms = [
                _local_inf_norm(t, acc)
                if _is_dtensor(t) and _shard_or_replicate(t)
                else torch.linalg.vector_norm(t, norm_type if t.numel() else 2.0, dtype=acc)
                for t in g.tensors
            ]
        elif math.isinf(norm_type) and any(t.numel() == 0 for t in g.tensors):
            # torch raises here (max has no identity); the norm of nothing is 0 for every p.
            norms = [
                torch.linalg.vector_norm(t, norm_type if t.numel() else 2.0, dtype=acc)
                for t in g.tensors
            ]
        elif use_foreach(g.tensors, g.device, foreach):
            norms = list(torch._foreach_norm(g.tensors, norm_type, dtype=acc))
        else:
            norms = [torch.linalg.vector_norm(t, norm_type, dtype=acc) for t in g.tensors]
        out.append(_full_all(norms))
    return out


def _in_input_order(groups: list[Group], norms: list[list[Tensor]], n: int) -> list[Tensor]:
    if not groups:
        return []
    if len(groups) == 1:
        return norms[0]
    out: list[Tensor] = [norms[0][0]] * n
    for g, group_norms in zip(groups, norms):
        for i, norm in zip(g.indices, group_norms):
            out[i] = norm
    return out


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

    Example:
        >>> tensor_norms([torch.tensor([3.0, 4.0]), torch.tensor([1.0])])
        [tensor(5.), tensor(1.)]
    """
    groups = groups_of(tensors)
    return _in_input_order(groups, _group_norms(groups, norm_type, foreach), len(tensors))


def _stack_total(norms: list[Tensor], norm_type: float, device: torch.device) -> Tensor:
    stacked = torch.stack([n if n.device == device else n.to(device) for n in norms])
    if stacked.dtype in LOW_PRECISION:
        stacked = stacked.float()
    return torch.linalg.vector_norm(stacked, norm_type)


def total_from_norms(norms: list[Tensor], norm_type: float, device: torch.device) -> Tensor:
    """Combine per-tensor norms into the norm of the concatenation, as torch does.

    Example:
        >>> total_from_norms([torch.tensor(3.0), torch.tensor(4.0)], 2.0, torch.device("cpu"))
        tensor(5.)
    """
    if not norms:
        return torch.zeros((), device=device)
    return _stack_total([_full(n) for n in norms], norm_type, device)


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


def _measure(
    groups: list[Group], items: list[Tensor], norm_type: float, foreach: bool | None
) -> tuple[list[Tensor], Tensor]:
    """Per-tensor norms (input order) and the total, stacked in torch's group order."""
    if not items:
        return [], torch.zeros((), device=torch.device("cpu"))
    norms = _group_norms(groups, norm_type, foreach)
    total = _stack_total([n for group in norms for n in group], norm_type, items[0].device)
    return _in_input_order(groups, norms, len(items)), total


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
            gradients as plain tensors; the total is reduced over it with one all-reduce
            (sum of p-th powers in fp64, or max for inf), so ranks may hold different numbers
            of tensors. ``per_tensor`` stays the local shards' norms. ``None``: no reduction.

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
    per_tensor, total = _measure(groups_of(items), items, p, foreach)
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
    if not isinstance(error_if_nonfinite, bool):
        raise TypeError(
            f"error_if_nonfinite must be a bool, got {type(error_if_nonfinite).__name__}"
        )
    total = grad_norms(tensors, norm_type, foreach=foreach).total
    if error_if_nonfinite and not bool(total.isfinite()):
        raise RuntimeError(
            f"The total norm of order {float(norm_type)} for gradients from `parameters` is "
            "non-finite, so it cannot be clipped. To disable this error and scale the gradients "
            "by the non-finite norm anyway, set `error_if_nonfinite=False`"
        )
    return total
