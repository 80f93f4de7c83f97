"""ACT: clipping rules, torch- and TF-compatible where those exist.

torch-compatible (same signatures, same results for fp32; switch by changing an import):
``clip_grad_norm_``, ``clip_grads_with_norm_``, ``clip_grad_value_`` and ``get_total_norm``.
Each norm-based one also takes ``nonfinite=`` to decide what a NaN/inf total norm does:

* ``"propagate"`` (torch's behaviour): a NaN norm makes every gradient NaN; an inf norm zeroes
  the finite entries and turns inf entries into NaN.
* ``"error"``: raise ``RuntimeError`` (one host sync, like torch's ``error_if_nonfinite``).
* ``"skip"``: leave every gradient bit-for-bit untouched; ``~total_norm.isfinite()`` is the flag.
* ``"zero"``: zero every gradient (one extra pass on a non-finite step only in effect, but the
  pass runs every step so that there is no host sync).

Guarded, for a policy that has already measured
(:meth:`gradguard.decide.policies.ClipPolicy.clip_`): ``clip_with_norms_`` (total norm) and
``clip_each_with_norms_`` (each tensor to its own threshold) take
:class:`~gradguard.core.norms.GradNorms` and a threshold tensor, leave every gradient untouched when
the total norm is not finite, and return :class:`Clipped`. ``clip_with_norms_(...,
scale_free=True)`` uses :func:`ratio_coefficient` instead of torch's rule: no ``1e-6`` (a constant
in gradient units), so a threshold that scales with the gradients clips them exactly alike.

TF-compatible, out of place: ``clip_by_value``, ``clip_by_norm``, ``clip_by_global_norm``.

No function here branches on a tensor value: the coefficient is clamped and multiplied, as torch
does, so a clipped step never waits for the device.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from gradguard.core import validate as _validate
from gradguard.core.buffer import ContiguousGrads
from gradguard.core.foreach import (
    Group,
    group_by_device_dtype,
    groups_of,
    mul_,
    mul_each_,
    use_foreach,
)
from gradguard.core.fuse import Kernel
from gradguard.core.norms import (
    GradNorms,
    _measure,
    get_total_norm,
    grad_norms,
    tensor_norms,
    total_from_norms,
)
from gradguard.core.state import stack

__all__ = [
    "Clipped",
    "clip_by_global_norm",
    "clip_by_norm",
    "clip_by_norm_",
    "clip_by_value",
    "clip_coefficient",
    "clip_each_with_norms_",
    "clip_grad_norm_",
    "clip_grad_value_",
    "clip_grads_with_norm_",
    "clip_with_norms_",
    "get_total_norm",
    "ratio_coefficient",
]

TensorOrTensors = Tensor | Iterable[Tensor]
EPS = 1e-6  # torch's, so results match bit for bit


def clip_coefficient(
    max_norm: float | Tensor, total_norm: Tensor, nonfinite: str, *, finite: Tensor | None = None
) -> Tensor:
    """The factor every gradient is multiplied by: ``min(max_norm / (total + 1e-6), 1)``.

    The one place this rule is written. It is evaluated as torch evaluates it
    (``float / tensor`` is ``reciprocal(tensor) * float`` there), so a tensor ``max_norm``
    holding the same value as torch's float one gives the same bits. Element-wise: a 1-D
    ``total_norm`` (and ``max_norm``) gives one factor per entry.

    Args:
        max_norm: the largest allowed norm: a number, or a tensor never read on the host.
        total_norm: the measured norm(s).
        nonfinite: ``"skip"``: a non-finite norm gives 1 (gradients untouched); ``"zero"``:
            it gives 0; ``"propagate"``/``"error"``: torch's value (NaN, or 0 for inf).
        finite: ``total_norm.isfinite()`` when already known (``GradNorms.finite``): saves
            recomputing it, a few kernels, on every step.

    Returns:
        The factor(s), with ``total_norm``'s shape; computed with ``torch.where``, so that no
        value is read on the host.

    Example:
        >>> clip_coefficient(1.0, torch.tensor([0.5, 4.0, math.nan]), "skip")
        tensor([1.0000, 0.2500, 1.0000])
    """
    if isinstance(max_norm, Tensor):
        inverse = (total_norm + EPS).reciprocal()
        coef = torch.clamp(inverse * max_norm.to(total_norm.device), max=1.0)
    else:
        coef = _torch_coef(max_norm, total_norm)
    if nonfinite in ("skip", "zero"):
        ok = total_norm.isfinite() if finite is None else finite
        coef = torch.where(ok, coef, 1.0 if nonfinite == "skip" else 0.0)
    return coef


def ratio_coefficient(
    threshold: Tensor, total_norm: Tensor, finite: Tensor | None = None
) -> Tensor:
    """The scale-free factor ``min(threshold / total, 1)``: 1 unless ``total > threshold``.

    torch's rule divides by ``total + 1e-6``; that ``1e-6`` is a constant in gradient units, so
    multiplying the loss by ``c`` does not multiply the clipped gradients by exactly ``c``. Here
    the factor is a plain ratio, evaluated only where ``total > threshold > 0`` is possible, so
    for any power of two ``c`` (where nothing overflows or turns subnormal) the factor of
    ``(c * threshold, c * total)`` is bit-for-bit the factor of ``(threshold, total)``. A
    non-finite total (or ``finite`` False), a ``+inf`` threshold and a zero total give 1.

    Args:
        threshold: 0-dim (or matching) tensor, ``> 0`` or ``+inf``.
        total_norm: the measured norm(s).
        finite: ``total_norm.isfinite()`` when already known.

    Returns:
        The factor(s), with ``total_norm``'s shape and dtype; no host read.

    Example:
        >>> ratio_coefficient(torch.tensor(2.0), torch.tensor([1.0, 8.0, math.inf]))
        tensor([1.0000, 0.2500, 1.0000])
    """
    ok = total_norm.isfinite() if finite is None else finite
    limit = threshold.to(total_norm.device, total_norm.dtype)
    over = ok & (total_norm > limit)
    # The division is kept only where total > limit: a finite positive total, so no 0/0 or inf.
    return torch.where(over, limit / torch.where(over, total_norm, 1.0), 1.0)


def _torch_coef(max_norm: float, norm: Tensor) -> Tensor:
    """torch's ``min(max_norm / (norm + 1e-6), 1)``, also for ``max_norm`` above the dtype's range.

    torch would turn such a bound into inf (and ``inf / inf`` into NaN). Every finite norm is
    below it: factor 1; an inf norm gives 0 and a NaN norm NaN, as for an in-range bound.
    """
    top = torch.finfo(norm.dtype).max
    if max_norm > top:
        return torch.where(norm <= top, 1.0, top / norm)
    return torch.clamp(max_norm / (norm + EPS), max=1.0)


def _min_ratio(norm: Tensor, clip: float) -> Tensor:
    """``min(clip / norm, 1)`` for a ``clip`` whose reciprocal does not fit ``norm``'s dtype.

    The TF formulas divide by ``clip`` or by ``max(norm, clip)`` through a reciprocal, which
    overflows (or loses precision as a subnormal) there. Here ``clip`` is rounded to the dtype
    (the largest finite value above its range, a subnormal or 0 below) and divided directly:
    a norm at or below the bound (a zero norm too) gives 1, an inf norm 0, a NaN norm NaN.
    """
    top = torch.finfo(norm.dtype).max
    bound = torch.full((), min(clip, top), device=norm.device, dtype=norm.dtype)
    return torch.where(norm <= bound, 1.0, bound / norm)


def _reciprocal_fits(clip: float, dtype: torch.dtype) -> bool:
    """True when ``clip`` and ``1 / clip`` are both normal numbers of ``dtype``."""
    tiny = torch.finfo(dtype).smallest_normal
    return tiny <= clip <= 1.0 / tiny


def _in_range(value: float, dtype: torch.dtype) -> float:
    """``value`` capped at ``dtype``'s largest finite number.

    torch refuses a larger Python scalar in clamp (and turns it into inf in arithmetic, where
    ``inf / inf`` is NaN). A bound above every finite value of the dtype acts like the largest
    one: a finite entry or norm lies below both, an inf one above both.
    """
    top = torch.finfo(dtype).max if dtype.is_floating_point else math.inf
    return value if value <= top else top


def _scale_(
    grads: list[Tensor],
    coef: Tensor,
    nonfinite: str,
    foreach: bool | None,
    groups: list[Group] | None = None,
) -> None:
    mul_(grads, coef, foreach, groups=groups)
    if nonfinite == "zero":
        # 0 * inf is NaN: scrub what multiplication cannot zero. A no-op on finite gradients.
        for g in grads:
            torch.nan_to_num_(g, nan=0.0, posinf=0.0, neginf=0.0)


def _check_nonfinite_error(total: Tensor, norm_type: float) -> None:
    if not bool(total.isfinite()):
        raise RuntimeError(
            f"The total norm of order {norm_type} for gradients from `parameters` is "
            "non-finite, so it cannot be clipped. To disable this error and scale the gradients "
            "by the non-finite norm anyway, set `error_if_nonfinite=False`"
        )


@torch.no_grad()
def clip_grads_with_norm_(
    parameters: TensorOrTensors,
    max_norm: float | Tensor,
    total_norm: Tensor,
    foreach: bool | None = None,
    *,
    nonfinite: str = "propagate",
) -> None:
    """Drop-in for ``torch.nn.utils.clip_grads_with_norm_``: scale grads given a total norm.

    ``grad *= min(max_norm / (total_norm + 1e-6), 1)``, in place.

    Args:
        parameters: tensors whose ``.grad`` is scaled, or a single tensor.
        max_norm: the largest allowed total norm, finite and ``>= 0``; a one-element tensor
            (an adaptive policy's threshold) is used without reading it on the host.
        total_norm: the norm from :func:`get_total_norm` (may be a DTensor or live elsewhere).
        foreach: torch's flag.
        nonfinite: what a NaN/inf ``total_norm`` does (module docstring).

    Example:
        >>> total = get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
        >>> clip_grads_with_norm_(model.parameters(), 1.0, total)
    """
    max_norm = _validate.threshold_or_tensor("max_norm", max_norm)
    mode = _validate.nonfinite_mode(nonfinite)
    foreach = _validate.foreach_flag(foreach)
    if not isinstance(total_norm, Tensor):
        raise TypeError(f"total_norm must be a tensor, got {type(total_norm).__name__}")
    params = _validate.materialize(parameters)
    grads = _validate.grads_of(params)
    if not grads:
        return
    if type(total_norm).__name__ == "DTensor":
        total_norm = total_norm.full_tensor()  # type: ignore[attr-defined]
    if mode == "error":
        _check_nonfinite_error(total_norm, math.nan)
    _scale_(grads, clip_coefficient(max_norm, total_norm, mode), mode, foreach)


@torch.no_grad()
def clip_grad_norm_(
    parameters: TensorOrTensors | ContiguousGrads,
    max_norm: float | Tensor,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    *,
    nonfinite: str = "propagate",
) -> Tensor:
    """Drop-in for ``torch.nn.utils.clip_grad_norm_``: clip the total gradient norm in place.

    Same signature, same result (bit-identical for fp32/fp64 gradients), plus:

    * fp16/bf16 gradients are measured in fp32 and the returned norm is fp32;
    * ``nonfinite=`` chooses what a NaN/inf norm does (module docstring); ``"skip"`` leaves
      the gradients untouched with no host sync;
    * ``parameters`` may be a :class:`~gradguard.core.buffer.ContiguousGrads`, which measures and
      scales one flat buffer per (device, dtype) instead of thousands of small tensors;
    * bad input (negative/NaN ``max_norm``, ``norm_type <= 0``, integer or sparse gradients,
      an exhausted generator, mixed device types) raises before anything changes.

    Args:
        parameters: parameters (their ``.grad`` is clipped) or a single tensor.
        max_norm: the largest allowed total norm, finite and ``>= 0``; a one-element tensor
            (an adaptive policy's threshold) is used without reading it on the host.
        norm_type: p > 0 or ``inf``.
        error_if_nonfinite: raise ``RuntimeError`` on a NaN/inf norm (same as
            ``nonfinite="error"``).
        foreach: torch's flag.
        nonfinite: ``"propagate"`` (torch), ``"error"``, ``"skip"`` or ``"zero"``.

    Returns:
        The total norm before clipping, a 0-dim tensor.

    Example:
        >>> loss.backward()
        >>> total = gradguard.clip_grad_norm_(model.parameters(), 1.0, nonfinite="skip")
        >>> optimizer.step()
    """
    max_norm = _validate.threshold_or_tensor("max_norm", max_norm)
    mode = _validate.nonfinite_mode(nonfinite)
    if not isinstance(error_if_nonfinite, bool):
        raise TypeError("error_if_nonfinite must be a bool")
    if error_if_nonfinite and mode == "propagate":
        mode = "error"
    p = _validate.norm_type(norm_type)
    foreach = _validate.foreach_flag(foreach)
    if isinstance(parameters, ContiguousGrads):
        total = parameters.total_norm(p)
        if mode == "error":
            _check_nonfinite_error(total, p)
        parameters.scale_(clip_coefficient(max_norm, total, mode), zero_nonfinite=mode == "zero")
        return total
    grads = _validate.grads_of(_validate.materialize(parameters))
    groups = groups_of(grads)
    _, total = _measure(groups, grads, p, foreach)
    if mode == "error":
        _check_nonfinite_error(total, p)
    if grads:
        _scale_(grads, clip_coefficient(max_norm, total, mode), mode, foreach, groups)
    return total


@torch.no_grad()
def clip_grad_value_(
    parameters: TensorOrTensors, clip_value: float, foreach: bool | None = None
) -> None:
    """Drop-in for ``torch.nn.utils.clip_grad_value_``: clamp every gradient entry in place.

    Entries are clamped to ``[-clip_value, clip_value]``; NaN stays NaN, as in torch.

    Args:
        parameters: parameters whose ``.grad`` is clamped, or a single tensor.
        clip_value: finite and ``>= 0``.
        foreach: torch's flag.

    Example:
        >>> gradguard.clip_grad_value_(model.parameters(), 0.5)
    """
    clip_value = _validate.threshold("clip_value", clip_value)
    foreach = _validate.foreach_flag(foreach)
    grads = _validate.grads_of(_validate.materialize(parameters))
    for (device, dtype), group in group_by_device_dtype(grads).items():
        bound = _in_range(clip_value, dtype)
        if use_foreach(group, device, foreach):
            torch._foreach_clamp_min_(group, -bound)
            torch._foreach_clamp_max_(group, bound)
        else:
            for g in group:
                g.clamp_(min=-bound, max=bound)


@torch.no_grad()
def clip_by_norm_(
    parameters: TensorOrTensors,
    max_norm: float,
    norm_type: float = 2.0,
    foreach: bool | None = None,
) -> list[Tensor]:
    """Clip each gradient to its own norm ``max_norm`` (per tensor, not global), in place.

    ``grad *= min(max_norm / (||grad|| + 1e-6), 1)`` for each gradient separately: the rule of
    TF's ``clip_by_norm`` applied to every gradient, or Keras' ``clipnorm``.

    Args:
        parameters: parameters whose ``.grad`` is clipped, or a single tensor.
        max_norm: finite, ``>= 0``.
        norm_type: p > 0 or ``inf``.
        foreach: torch's flag.

    Returns:
        The per-gradient norms before clipping (fp32 for fp16/bf16), in order.

    Example:
        >>> norms = gradguard.clip_by_norm_(model.parameters(), 1.0)
    """
    max_norm = _validate.threshold("max_norm", max_norm)
    p = _validate.norm_type(norm_type)
    foreach = _validate.foreach_flag(foreach)
    grads = _validate.grads_of(_validate.materialize(parameters))
    norms = tensor_norms(grads, p, foreach)
    if not grads:
        return norms
    mul_each_(grads, [_torch_coef(max_norm, n) for n in norms], foreach)
    return norms


# --- guarded, with norms already measured ---------------------------------------------------


class Clipped(NamedTuple):
    """What one threshold clip did, all on the device (nothing read on the host).

    Attributes:
        threshold: 0-dim fp32: the threshold used; for per-tensor clipping the total (same p)
            of the per-tensor thresholds; ``+inf`` where nothing is clipped by a threshold.
        clipped: 0-dim bool: some factor was below 1 (some gradient was scaled down).
        total: 0-dim fp32: the total norm after clipping.
        learn: what a policy's ``update`` learns from: the post-clip total (0-dim, in the
            norms' dtype), or the list of post-clip per-tensor norms.
    """

    threshold: Tensor
    clipped: Tensor
    total: Tensor
    learn: Tensor | list[Tensor]


@torch.no_grad()
def clip_with_norms_(
    grads: Sequence[Tensor],
    threshold: float | Tensor,
    norms: GradNorms,
    *,
    norm_type: float = 2.0,
    foreach: bool | None = None,
    scale_free: bool = False,
    fuse: bool | None = False,
) -> Clipped:
    """Clip the total norm of ``grads`` to ``threshold`` in place, given their measured norms.

    ``grad *= min(threshold / (total + 1e-6), 1)`` (:func:`clip_coefficient`, torch's rule:
    bit-identical to ``torch.nn.utils.clip_grad_norm_`` for fp32/fp64 gradients), or with
    ``scale_free`` the plain ratio ``min(threshold / total, 1)`` (:func:`ratio_coefficient`); a
    non-finite total gives the factor 1, so a step the guard will skip leaves its gradients
    bit-for-bit untouched. No host sync.

    Args:
        grads: the gradients ``norms`` was measured from (already validated).
        threshold: the largest allowed total norm: a 0-dim tensor (a policy's threshold, never
            read on the host) or a number; ``+inf`` clips nothing.
        norms: from :func:`gradguard.core.norms.grad_norms` on ``grads``.
        norm_type: the p ``norms`` was measured with (the post-clip total is ``total *
            factor`` for every p).
        foreach: torch's flag.
        scale_free: the factor without torch's ``1e-6`` (for thresholds relative to the run's
            own norms: the clip is then exactly equivariant to the loss's scale).
        fuse: compile the scale-free factor's arithmetic into one kernel
            (:class:`gradguard.core.fuse.Kernel`; the same result, bit for bit).

    Returns:
        :class:`Clipped`; ``learn`` is the post-clip total.

    Example:
        >>> norms = grad_norms(grads)
        >>> c = clip_with_norms_(grads, torch.tensor(1.0), norms)
        >>> c.total <= 1.0
        tensor(True)
    """
    _validate.norm_type(norm_type)
    total = norms.total
    if isinstance(threshold, Tensor):
        limit = threshold if threshold.ndim == 0 else threshold.reshape(())
        limit = limit if limit.device == total.device else limit.to(total.device)
    else:
        limit = torch.full((), _validate.as_float("threshold", threshold), device=total.device)
    if scale_free:
        coef, clipped, after = _RATIO_CLIP(fuse, limit, total, norms.finite)
    else:
        coef = clip_coefficient(limit, total, "skip", finite=norms.finite)
        clipped, after = coef < 1.0, total * coef
    if grads:
        mul_(grads, coef, foreach)
    return Clipped(limit.float(), clipped, after.float(), after)


def _ratio_clip(limit: Tensor, total: Tensor, finite: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The scale-free factor, whether it clips, and the post-clip total."""
    coef = ratio_coefficient(limit, total, finite)
    # The p-norm is homogeneous: scaling every gradient by coef scales the total by coef.
    return coef, coef < 1.0, total * coef


_RATIO_CLIP = Kernel(_ratio_clip)


@torch.no_grad()
def clip_each_with_norms_(
    grads: Sequence[Tensor],
    thresholds: Sequence[Tensor] | Tensor,
    norms: GradNorms,
    *,
    norm_type: float = 2.0,
    foreach: bool | None = None,
) -> Clipped:
    """Clip each gradient to its own threshold in place, given their measured norms.

    ``grads[i] *= min(thresholds[i] / (norms.per_tensor[i] + 1e-6), 1)``
    (:func:`clip_coefficient`, one vector for all tensors); when the total norm is not finite
    every factor is 1, so a step the guard will skip leaves all its gradients bit-for-bit
    untouched. Per-tensor factors are applied with one foreach multiply per (device, dtype).
    No host sync. The rule of AdaGC (arXiv 2502.11034) and of TF's ``clip_by_norm`` applied to
    every gradient.

    Args:
        grads: the gradients ``norms`` was measured from (already validated).
        thresholds: one 0-dim tensor per gradient, or a 1-D tensor; ``+inf`` leaves one alone.
        norms: from :func:`gradguard.core.norms.grad_norms` on ``grads``.
        norm_type: the p ``norms`` was measured with, for the totals in the result.
        foreach: torch's flag.

    Returns:
        :class:`Clipped`; ``threshold`` is the total of the thresholds and ``learn`` the list
        of post-clip per-tensor norms, in ``grads`` order.

    Raises:
        ValueError: not one threshold and one norm per gradient.

    Example:
        >>> norms = grad_norms(grads)
        >>> c = clip_each_with_norms_(grads, [torch.tensor(1.0)] * len(grads), norms)
        >>> c.learn   # every post-clip norm is <= 1
    """
    p = _validate.norm_type(norm_type)
    n = thresholds.numel() if isinstance(thresholds, Tensor) else len(thresholds)
    if not n == len(grads) == len(norms.per_tensor):
        raise ValueError(
            f"clip_each_with_norms_ needs one threshold and one norm per gradient: {n} "
            f"thresholds and {len(norms.per_tensor)} norms for {len(grads)} gradients"
        )
    total = norms.total
    device = total.device
    if not grads:
        zero = torch.zeros((), device=device)
        return Clipped(zero, zero > 0, zero, [])
    per = stack(norms.per_tensor, total)
    limits = thresholds if isinstance(thresholds, Tensor) else stack(list(thresholds), total)
    limits = limits.detach().reshape(-1).to(device, total.dtype)
    # A NaN norm gives the factor 1 (the "skip" rule): a non-finite total spares every tensor.
    coef = clip_coefficient(limits, torch.where(norms.finite, per, math.nan), "skip")
    mul_each_(grads, coef, foreach)
    after = per * coef
    learn = list(after.unbind(0))
    return Clipped(
        total_from_norms(list(limits.unbind(0)), p, device).float(),
        (coef < 1.0).any(),
        total_from_norms(learn, p, device).float(),
        learn,
    )


# --- TF-compatible, out of place ------------------------------------------------------------


def clip_by_value(
    t: Tensor, clip_value_min: float | Tensor, clip_value_max: float | Tensor
) -> Tensor:
    """TF's ``tf.clip_by_value``: element-wise clamp into ``[clip_value_min, clip_value_max]``.

    TF's rules (``clip_ops_test.py``): the result has ``t``'s shape and dtype. A bound must be a
    scalar or broadcast to ``t``'s shape without enlarging it (TF raises ``ValueError`` for a
    ``(2,)`` bound on a ``(2, 3, 1)`` tensor, where plain broadcasting would give
    ``(2, 3, 2)``). Integer tensors stay integer with integer bounds; a floating bound on an
    integer tensor is a ``TypeError``, as in TF. A number bound beyond a floating dtype's range
    is rounded to it as TF's conversion does (``1e10`` is ``inf`` in fp16).

    Args:
        t: any real tensor.
        clip_value_min: the lower bound: a number (``<= clip_value_max``, not NaN) or a tensor.
        clip_value_max: the upper bound, likewise.

    Returns:
        A new tensor of ``t``'s shape and dtype; ``t`` is unchanged. NaN entries stay NaN.

    Raises:
        TypeError: ``t`` is not a tensor, a bound is not a real number or tensor, or a
            floating bound meets an integer ``t``.
        ValueError: number bounds out of order or NaN, or a tensor bound whose shape would
            enlarge ``t``.

    Example:
        >>> clip_by_value(torch.tensor([-3.0, 0.5, 9.0]), -1.0, 1.0)
        tensor([-1.0000,  0.5000,  1.0000])
        >>> clip_by_value(torch.tensor([1, 5, 9]), 2, 6)
        tensor([2, 5, 6])
    """
    if not isinstance(t, Tensor):
        raise TypeError(f"t must be a tensor, got {type(t).__name__}")
    lo = _bound("clip_value_min", clip_value_min, t)
    hi = _bound("clip_value_max", clip_value_max, t)
    if not isinstance(lo, Tensor) and not isinstance(hi, Tensor):
        if math.isnan(lo) or math.isnan(hi) or lo > hi:
            raise ValueError(
                "clip_value_min must be <= clip_value_max (neither NaN), got "
                f"{clip_value_min!r} and {clip_value_max!r}"
            )
        return t.clamp(min=lo, max=hi)
    lo_t = lo if isinstance(lo, Tensor) else torch.full((), lo, dtype=t.dtype, device=t.device)
    hi_t = hi if isinstance(hi, Tensor) else torch.full((), hi, dtype=t.dtype, device=t.device)
    shape = torch.broadcast_shapes(t.shape, lo_t.shape, hi_t.shape)
    if shape != t.shape:
        raise ValueError(
            f"clip_by_value: bounds of shapes {tuple(lo_t.shape)} and {tuple(hi_t.shape)} would "
            f"broadcast t of shape {tuple(t.shape)} to {tuple(shape)}; TF raises here too"
        )
    return torch.clamp(t, min=lo_t, max=hi_t)


def _bound(name: str, value: object, t: Tensor) -> int | float | Tensor:
    """One ``clip_by_value`` bound in ``t``'s dtype (TF converts bounds to it).

    A number becomes an int for an integer ``t`` (capped to the dtype's range: a bound beyond
    every value acts like the extreme one) or a float rounded to ``t``'s floating dtype (so
    torch does not refuse a bound beyond that range); a tensor moves to ``t``'s device and
    dtype. A floating bound for an integer ``t`` is refused, as in TF.
    """
    integer = not (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool)
    if isinstance(value, Tensor):
        if integer and value.dtype.is_floating_point:
            raise TypeError(
                f"{name} is a {value.dtype} tensor but t is {t.dtype}; TF refuses a floating "
                "bound for an integer tensor too"
            )
        return value.detach().to(device=t.device, dtype=t.dtype)
    if integer:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(
                f"{name} must be an int for a {t.dtype} tensor (TF keeps the dtype and refuses "
                f"a floating bound), got {value!r}"
            )
        info = torch.iinfo(t.dtype)
        return min(max(int(value), info.min), info.max)
    x = _validate.as_float(name, value)
    # A cast through fp64 rounds like TF's conversion: 1e10 is inf in fp16, where torch's
    # clamp would refuse the number.
    return x if math.isnan(x) else float(torch.tensor(x, dtype=torch.float64).to(t.dtype))


def clip_by_norm(t: Tensor, clip_norm: float) -> Tensor:
    """TF's ``tf.clip_by_norm`` on one tensor: ``t * clip_norm / max(||t||_2, clip_norm)``.

    Example:
        >>> clip_by_norm(torch.tensor([3.0, 4.0]), 1.0)
        tensor([0.6000, 0.8000])
    """
    if not isinstance(t, Tensor):
        raise TypeError(f"t must be a tensor, got {type(t).__name__}")
    clip_norm = _validate.threshold("clip_norm", clip_norm, allow_zero=False)
    acc = torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else None
    norm = torch.linalg.vector_norm(t, dtype=acc)
    if _reciprocal_fits(clip_norm, norm.dtype):
        factor = clip_norm / torch.clamp(norm, min=clip_norm)
    else:
        factor = _min_ratio(norm, clip_norm)
    return (t * factor).to(t.dtype)


def clip_by_global_norm(
    t_list: Sequence[Tensor | None], clip_norm: float, use_norm: Tensor | float | None = None
) -> tuple[list[Tensor | None], Tensor]:
    """TF's ``tf.clip_by_global_norm``: scale a list of tensors by one global L2 norm.

    ``t_list[i] * clip_norm / max(global_norm, clip_norm)``, out of place, with TF's semantics:
    ``None`` entries stay ``None``; ``use_norm`` skips computing the norm; a non-finite global
    norm makes every output NaN (TF adds ``use_norm - use_norm`` to the scale on purpose).

    Args:
        t_list: tensors (or ``None``), e.g. a list of gradients.
        clip_norm: the clipping ratio, finite and ``> 0``.
        use_norm: a global norm to use instead of computing one.

    Returns:
        ``(list_clipped, global_norm)``; ``global_norm`` is the norm used (fp32 for bf16/fp16).

    Example:
        >>> clipped, norm = clip_by_global_norm([torch.tensor([3.0]), torch.tensor([4.0])], 1.0)
        >>> norm
        tensor(5.)
    """
    if isinstance(t_list, Tensor) or not isinstance(t_list, Sequence):
        raise TypeError("t_list must be a list or tuple of tensors (or None entries)")
    for i, t in enumerate(t_list):
        if t is not None and not isinstance(t, Tensor):
            raise TypeError(f"t_list[{i}] must be a tensor or None, got {type(t).__name__}")
    present = [t for t in t_list if t is not None]
    _validate.check_tensors(present, "t_list")
    clip = _validate.threshold("clip_norm", clip_norm, allow_zero=False)
    device = present[0].device if present else torch.device("cpu")
    # The norm's dtype: fp64 when any input is fp64, else fp32 (also for fp16/bf16 inputs).
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in present) else torch.float32
    if use_norm is None:
        global_norm = grad_norms(present, 2.0).total if present else torch.zeros((), device=device)
        global_norm = global_norm.to(dtype)
    elif isinstance(use_norm, Tensor):
        if use_norm.numel() != 1 or not use_norm.dtype.is_floating_point:
            raise TypeError(
                "use_norm must be a number or a floating tensor with one element, got a "
                f"{use_norm.dtype} tensor of shape {tuple(use_norm.shape)}"
            )
        global_norm = use_norm.detach().to(device=device, dtype=dtype).reshape(())
    else:
        global_norm = torch.tensor(
            _validate.as_float("use_norm", use_norm), device=device, dtype=dtype
        )
    scale = _global_scale(global_norm, clip)
    # TF adds (use_norm - use_norm): a NaN or inf global norm makes every output NaN.
    scale = scale + (global_norm - global_norm)
    out: list[Tensor | None] = [
        None if t is None else (t * scale.to(t.device)).to(t.dtype) for t in t_list
    ]
    return out, global_norm


def _global_scale(global_norm: Tensor, clip: float) -> Tensor:
    """TF's ``clip * min(1 / global_norm, 1 / clip)``, also for a ``clip`` outside fp32's range."""
    if _reciprocal_fits(clip, global_norm.dtype):
        inv_clip = torch.full((), 1.0 / clip, device=global_norm.device, dtype=global_norm.dtype)
        return clip * torch.minimum(1.0 / global_norm, inv_clip)
    return _min_ratio(global_norm, clip)
