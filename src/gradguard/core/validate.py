"""Argument checks shared by the public functions.

Every check runs before anything is mutated, so a bad call changes nothing. Errors name the
argument and the accepted range.
"""

from __future__ import annotations

import math
import numbers
import types
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

NONFINITE_MODES = ("propagate", "error", "skip", "zero")


def as_float(name: str, value: Any) -> float:
    """A real Python number (or a 0-dim real tensor, read once) as float, else TypeError."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a real number, got bool {value!r}")
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
            raise TypeError(
                f"{name} must be a real scalar, got a {value.dtype} tensor of shape "
                f"{tuple(value.shape)}"
            )
        return float(value.item())
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, str) and value.lower() in ("inf", "+inf", "infinity"):
        return math.inf
    raise TypeError(f"{name} must be a real number, got {type(value).__name__}")


def threshold(name: str, value: Any, *, allow_zero: bool = True) -> float:
    """A finite threshold ``>= 0`` (or ``> 0`` when ``allow_zero`` is False)."""
    x = as_float(name, value)
    lo = ">= 0" if allow_zero else "> 0"
    if not math.isfinite(x) or x < 0 or (x == 0 and not allow_zero):
        raise ValueError(f"{name} must be a finite number {lo}, got {x!r}")
    return x


def threshold_or_tensor(name: str, value: Any) -> float | Tensor:
    """Like :func:`threshold`, but a one-element floating tensor passes through unread.

    An adaptive policy's threshold lives on the device; reading it to check its range would be a
    host sync every step, so its shape and dtype are checked and its value is trusted.
    """
    if isinstance(value, Tensor):
        if value.numel() != 1 or not value.dtype.is_floating_point:
            raise TypeError(
                f"{name} must be a finite number >= 0 or a floating tensor with one element, got "
                f"a {value.dtype} tensor of shape {tuple(value.shape)}"
            )
        return value.detach().reshape(())
    return threshold(name, value)


def norm_type(value: Any, name: str = "norm_type") -> float:
    """p > 0 or inf (``'inf'`` accepted, as in torch)."""
    p = as_float(name, value)
    if math.isnan(p) or p <= 0:
        raise ValueError(f"{name} must be a number > 0 or inf, got {p!r}")
    return p


def nonfinite_mode(value: Any) -> str:
    if value not in NONFINITE_MODES:
        raise ValueError(f"nonfinite must be one of {NONFINITE_MODES}, got {value!r}")
    return str(value)


def foreach_flag(value: Any) -> bool | None:
    if value is not None and not isinstance(value, bool):
        raise TypeError(f"foreach must be None, True or False, got {type(value).__name__}")
    return value


def materialize(parameters: Any, name: str = "parameters") -> list[Tensor]:
    """Turn torch's ``Tensor | Iterable[Tensor]`` into a list, refusing an exhausted generator.

    torch only warns on an empty generator; a generator consumed by an earlier call is almost
    always a bug (``params = model.parameters()`` reused), so we say so.
    """
    if isinstance(parameters, Tensor):
        return [parameters]
    if isinstance(parameters, torch.nn.Module):
        raise TypeError(
            f"{name} must be a tensor or an iterable of tensors, got a Module; "
            "pass module.parameters()"
        )
    if not isinstance(parameters, Iterable) or isinstance(parameters, (str, bytes)):
        raise TypeError(
            f"{name} must be a tensor or an iterable of tensors, got {type(parameters).__name__}"
        )
    is_generator = isinstance(parameters, (types.GeneratorType, map, filter))
    items = list(parameters)
    if is_generator and not items:
        raise ValueError(
            f"{name} is an empty generator: it was probably consumed by an earlier call. "
            "Pass a list, e.g. list(model.parameters())"
        )
    for i, t in enumerate(items):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}[{i}] must be a tensor, got {type(t).__name__}")
    return items


def check_tensors(tensors: list[Tensor], name: str = "gradients") -> None:
    """Floating dense tensors on a single device type.

    The common case (all fine) reads three attributes per tensor; the slow per-tensor scan that
    names the offending index runs only once something is wrong.
    """
    if not tensors:
        return
    strided = torch.strided
    if any(t.layout != strided for t in tensors):
        i = next(i for i, t in enumerate(tensors) if t.layout != strided)
        raise TypeError(
            f"{name}[{i}] has layout {tensors[i].layout}; only dense (strided) tensors can be "
            "clipped. Convert with .to_dense() or clip sparse gradients yourself"
        )
    dtypes = {t.dtype for t in tensors}
    if not all(d.is_floating_point or d.is_complex for d in dtypes):
        i = next(
            i
            for i, t in enumerate(tensors)
            if not (t.dtype.is_floating_point or t.dtype.is_complex)
        )
        raise TypeError(
            f"{name}[{i}] has dtype {tensors[i].dtype}; gradients must be floating point"
        )
    device_types = {d.type for d in {t.device for t in tensors}}
    if len(device_types) > 1:
        raise ValueError(
            f"{name} live on several device types {sorted(device_types)}; clip each device's "
            "gradients separately (mixed CPU/accelerator gradients are usually a missing .to())"
        )


def grads_of(parameters: list[Tensor], name: str = "parameters") -> list[Tensor]:
    """The ``.grad`` of each parameter that has one, checked."""
    grads = [p.grad for p in parameters if p.grad is not None]
    check_tensors(grads, f"{name} gradients")
    return grads
