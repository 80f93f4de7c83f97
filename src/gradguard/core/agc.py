"""Adaptive gradient clipping (AGC): clip each unit's gradient relative to its weight norm.

Brock, De, Smith & Simonyan, "High-Performance Large-Scale Image Recognition Without
Normalization" (NFNets, arXiv 2102.06171). For every unit i (a row of a Linear weight, an output
filter of a Conv weight, the whole tensor for biases and gains):

    g_i <- g_i * min(1, clip_factor * max(||W_i||, eps) / ||g_i||)

Batched: a per-parameter loop (timm's) issues about ten kernels and allocates three
gradient-sized temporaries per parameter. Here large tensors take one unit-norm reduction each
for W and G and one in-place multiply; small tensors with the same unit length are gathered as
rows of one matrix (``torch.cat``, a cache-sized chunk at a time), clipped with one norm and one
multiply, and copied back with one foreach copy; a few odd-length biases share two fused
``_foreach_norm`` calls and one ``_foreach_mul_``. Results equal timm's bit for bit on fp32.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from gradguard.core import validate as _validate
from gradguard.core.foreach import groups_of, use_foreach
from gradguard.core.norms import LOW_PRECISION

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
    grads: list[Tensor] = [p.grad for p in params]  # type: ignore[misc]
    _validate.check_tensors(grads, "gradients")
    counts: list[Tensor] = []
    for group in groups_of(grads):
        weights = [params[i] for i in group.indices]
        buckets: dict[int, list[int]] = {}  # unit length -> small tensors
        for j, g in enumerate(group.tensors):
            n = g.numel()
            if n == 0:
                continue
            if n > SMALL or not g.is_contiguous():
                counts.append(_clip_one_(weights[j], g, lam, eps))
            else:
                buckets.setdefault(n // _units(g), []).append(j)
        fe = use_foreach(group.tensors, group.device, foreach)
        whole: list[int] = []  # single-unit tensors too few per length to be worth a matrix
        for k, js in buckets.items():
            if len(js) < MIN_ROWS_BUCKET and all(_units(group.tensors[j]) == 1 for j in js):
                whole += js
                continue
            ws = [weights[j] for j in js]
            counts.append(_clip_rows_(ws, [group.tensors[j] for j in js], k, lam, eps, fe))
        if whole:
            ws = [weights[j] for j in whole]
            counts.append(_clip_whole_(ws, [group.tensors[j] for j in whole], lam, eps, fe))
    if not counts:
        return torch.zeros((), dtype=torch.int64)
    first = counts[0].device
    return torch.stack([c.to(first) for c in counts]).sum()


# Tensors up to this many values are clipped together: with thousands of small parameters the
# per-kernel overhead (several kernels per tensor in a plain loop) costs more than the arithmetic.
SMALL = 1 << 15
# Gathering rows costs a dozen kernels per chunk: single-unit tensors (biases, gains) of one
# length take that path only when there are this many of them, else two fused foreach norms.
MIN_ROWS_BUCKET = 4


def _units(t: Tensor) -> int:
    return t.shape[0] if t.ndim > 1 else 1


def _coefficient(w_norm: Tensor, g_norm: Tensor, lam: float, eps: float) -> tuple[Tensor, Tensor]:
    """Per-unit factors (timm's rule: a unit below its bound keeps 1) and how many were cut."""
    top = torch.finfo(w_norm.dtype).max
    if eps <= top and lam <= top:
        max_norm = w_norm.clamp_(min=eps).mul_(lam)  # w_norm is a temporary: reuse it
    else:
        max_norm = _wide_bound(w_norm, lam, eps)
    coef = torch.where(g_norm < max_norm, 1.0, max_norm / g_norm.clamp(min=1e-6))
    return coef, (g_norm > max_norm).sum()


def _wide_bound(w_norm: Tensor, lam: float, eps: float) -> Tensor:
    """``lam * max(w_norm, eps)`` for ``lam`` or ``eps`` beyond ``w_norm``'s dtype (rare).

    torch refuses such a scalar in ``clamp`` and turns it into inf in ``mul``, although the
    product can be finite (``lam = 1e39``, ``||W|| = 1e-3``). fp64 holds every Python float; a
    bound that still overflows is capped at the largest finite value, which every finite
    gradient norm lies below (factor 1) and an inf one above (factor 0), as for the exact bound.
    """
    wide = torch.float64 if w_norm.device.type != "mps" else torch.float32  # mps has no fp64
    top = torch.finfo(wide).max
    return w_norm.to(wide).clamp_(min=min(eps, top)).mul_(min(lam, top)).clamp_(max=top)


def _clip_one_(w: Tensor, g: Tensor, lam: float, eps: float) -> Tensor:
    coef, count = _coefficient(_unit_norm(w), _unit_norm(g), lam, eps)
    g.mul_(coef.to(g.dtype))
    return count


def _copy_(dst: list[Tensor], src: list[Tensor], foreach: bool) -> None:
    if foreach:
        torch._foreach_copy_(dst, src)
    else:
        for d, s in zip(dst, src):
            d.copy_(s)


def _clip_whole_(
    weights: list[Tensor], grads: list[Tensor], lam: float, eps: float, foreach: bool
) -> Tensor:
    """Tensors that are a single unit each: fused per-tensor norms, one coefficient vector."""
    acc = torch.float32 if grads[0].dtype in LOW_PRECISION else None
    ws = weights
    if foreach:
        w_norm = torch.stack(torch._foreach_norm(ws, 2.0, dtype=acc))
        g_norm = torch.stack(torch._foreach_norm(grads, 2.0, dtype=acc))
    else:
        w_norm = torch.stack([torch.linalg.vector_norm(w, dtype=acc) for w in ws])
        g_norm = torch.stack([torch.linalg.vector_norm(g, dtype=acc) for g in grads])
    coef, count = _coefficient(w_norm, g_norm, lam, eps)
    factors = list(coef.to(grads[0].dtype).unbind(0))
    if foreach:
        torch._foreach_mul_(grads, factors)
    else:
        for g, f in zip(grads, factors):
            g.mul_(f)
    return count


def _clip_rows_(
    weights: list[Tensor], grads: list[Tensor], k: int, lam: float, eps: float, foreach: bool
) -> Tensor:
    """Small tensors whose units all hold ``k`` values, as rows of one matrix a chunk at a time.

    Each chunk is gathered with one ``torch.cat`` (W and G), clipped with one norm per operand
    and one multiply, and copied back with one foreach copy, while it is still in cache; a large
    scratch buffer would instead cost a page fault per 4 KiB on CPU.
    """
    views = [g if g.ndim == 2 else g.view(-1, k) for g in grads]  # a 2-D tensor is its rows
    w_views = [w if w.ndim == 2 else w.reshape(-1, k) for w in weights]
    over: list[Tensor] = []
    start, size = 0, 0
    chunk = chunk_size()
    for i, g in enumerate(grads):
        if size and size + g.numel() > chunk:  # SMALL <= chunk: every tensor fits in a chunk
            over.append(_clip_rows_chunk_(w_views[start:i], views[start:i], lam, eps, foreach))
            start, size = i, 0
        size += g.numel()
    over.append(_clip_rows_chunk_(w_views[start:], views[start:], lam, eps, foreach))
    # Sums per chunk, then of the sums: one long reduction would enter a parallel region.
    return torch.stack(over).sum()


def _clip_rows_chunk_(
    w_views: list[Tensor], views: list[Tensor], lam: float, eps: float, foreach: bool
) -> Tensor:
    rows = torch.cat(views)
    coef, count = _coefficient(_unit_norm(torch.cat(w_views)), _unit_norm(rows), lam, eps)
    rows.mul_(coef.to(rows.dtype))
    _copy_(views, list(rows.split([v.shape[0] for v in views])), foreach)
    return count


def chunk_size() -> int:
    """Values per chunk: small enough to stay in cache and be recycled by the allocator.

    With several intra-op threads a chunk stays at torch's CPU grain size, below which
    element-wise kernels skip the parallel region: with other processes on the cores, a parallel
    region waits for a descheduled thread, which made 2-thread runs several times slower here.
    With one thread there is no such region, and larger chunks spread the per-chunk kernels.
    """
    return CHUNK if torch.get_num_threads() > 1 else CHUNK_ONE_THREAD


CHUNK = 1 << 15
CHUNK_ONE_THREAD = 1 << 17
