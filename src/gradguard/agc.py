"""Adaptive gradient clipping (AGC): clip each unit's gradient relative to its weight norm.

Brock, De, Smith & Simonyan, "High-Performance Large-Scale Image Recognition Without
Normalization" (NFNets, arXiv 2102.06171). For every unit i (a row of a Linear weight, an output
filter of a Conv weight, the whole tensor for biases and gains):

    g_i <- g_i * min(1, clip_factor * max(||W_i||, eps) / ||g_i||)

Batched: per-unit norms are computed per tensor (one reduction each for W and G), every
coefficient of a (device, dtype) group in one fused pass over a short vector, and the
multiplication with one foreach call. A per-parameter loop (timm's) issues about eight kernels
and allocates three gradient-sized temporaries per parameter.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from gradguard import _validate
from gradguard._foreach import group_by_device_dtype, use_foreach

Exclusion = str | nn.Module | Tensor


def agc_parameters(
    parameters: nn.Module | Iterable[Tensor], exclude: Iterable[Exclusion] = ()
) -> list[Tensor]:
    """The parameters AGC should act on: all of ``parameters`` but the excluded ones.

    Args:
        parameters: a module (qualified names usable in ``exclude``) or an iterable of tensors.
        exclude: module names (``"head"`` excludes ``head.weight`` and ``head.bias``), modules,
            or parameters. NFNets leave the final classifier unclipped.

    Returns:
        The kept parameters, in order.

    Example:
        >>> params = agc_parameters(model, exclude=["fc"])
    """
    excluded = list(exclude) if not isinstance(exclude, (str, nn.Module, Tensor)) else [exclude]
    drop: set[int] = set()
    names: list[str] = []
    for i, e in enumerate(excluded):
        if isinstance(e, str):
            names.append(e)
        elif isinstance(e, nn.Module):
            drop.update(id(p) for p in e.parameters())
        elif isinstance(e, Tensor):
            drop.add(id(e))
        else:
            raise TypeError(
                f"exclude[{i}] must be a module name, a module or a parameter, got "
                f"{type(e).__name__}"
            )
    if isinstance(parameters, nn.Module):
        known = dict(parameters.named_modules())
        for n in names:
            if n not in known:
                raise ValueError(f"exclude names module {n!r}, which the model does not have")
            drop.update(id(p) for p in known[n].parameters())
        items: list[Tensor] = list(parameters.parameters())
    else:
        if names:
            raise TypeError("exclude can name modules only when parameters is an nn.Module")
        items = _validate.materialize(parameters)
    return [p for p in items if id(p) not in drop]


def _unit_norm(t: Tensor) -> Tensor:
    acc = torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else None
    if t.ndim <= 1:
        return torch.linalg.vector_norm(t, dtype=acc)
    return torch.linalg.vector_norm(t, dim=tuple(range(1, t.ndim)), keepdim=True, dtype=acc)


@torch.no_grad()
def agc_(
    parameters: nn.Module | Iterable[Tensor],
    clip_factor: float = 0.01,
    eps: float = 1e-3,
    *,
    exclude: Iterable[Exclusion] = (),
    foreach: bool | None = None,
) -> Tensor:
    """Unit-wise adaptive gradient clipping, in place (NFNets, arXiv 2102.06171).

    Args:
        parameters: a module or parameters; their ``.grad`` is clipped.
        clip_factor: lambda, finite and ``> 0`` (0.01 for large batches in the paper).
        eps: the floor on a unit's weight norm so zero-initialized units can still move,
            finite and ``> 0``.
        exclude: module names, modules or parameters to leave alone (e.g. the classifier).
        foreach: torch's flag for the final multiply.

    Returns:
        The number of units whose gradient was scaled down (0-dim int64 tensor, no host sync).

    Example:
        >>> loss.backward()
        >>> gradguard.agc_(model, clip_factor=0.01, exclude=["fc"])
    """
    lam = _validate.threshold("clip_factor", clip_factor, allow_zero=False)
    eps = _validate.threshold("eps", eps, allow_zero=False)
    foreach = _validate.foreach_flag(foreach)
    params = [p for p in agc_parameters(parameters, exclude) if p.grad is not None]
    grads = [p.grad for p in params]
    _validate.check_tensors(grads, "gradients")  # type: ignore[arg-type]
    counts: list[Tensor] = []
    by_grad = {id(p.grad): p for p in params}
    for (device, _), group in group_by_device_dtype(grads).items():  # type: ignore[arg-type]
        weights = [by_grad[id(g)] for g in group]
        w_norms = [_unit_norm(w) for w in weights]
        g_norms = [_unit_norm(g) for g in group]
        sizes = [n.numel() for n in w_norms]
        wn = torch.cat([n.reshape(-1) for n in w_norms])
        gn = torch.cat([n.reshape(-1) for n in g_norms])
        max_norm = wn.clamp(min=eps).mul(lam)
        coef = (max_norm / gn.clamp(min=1e-6)).clamp(max=1.0)
        counts.append((gn > max_norm).sum().to("cpu" if device.type == "cpu" else device))
        coef = coef.to(group[0].dtype)
        factors = [c.view(n.shape) for c, n in zip(coef.split(sizes), w_norms)]
        if use_foreach(group, device, foreach):
            torch._foreach_mul_(group, factors)
        else:
            for g, f in zip(group, factors):
                g.mul_(f)
    if not counts:
        return torch.zeros((), dtype=torch.int64)
    first = counts[0].device
    return torch.stack([c.to(first) for c in counts]).sum()
