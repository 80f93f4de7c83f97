"""FUSE: a component's per-step arithmetic as one pure function, run eagerly or compiled.

The default policy and detectors decide with a dozen tiny tensor operations each: thresholds,
comparisons, ring-buffer writes on 0-dim and small tensors. Eagerly every one is a kernel (a
launch on a GPU, a dispatch on the CPU), and together they are most of what a guarded step
costs beyond a torch-clip step. Written as a pure function of tensors (state in, new state
out, nothing mutated), the same arithmetic compiles under ``torch.compile`` into one fused
kernel per function, and falls back to the very same function run eagerly.

Only operations whose compiled result is bitwise the eager one belong in a kernel:
``+ - * /``, comparisons, ``where``, ``sqrt``, ``amax``, ``median``. ``log`` and ``exp`` are
not (inductor's vectorized versions differ in the last bit), so a component computes those
eagerly, outside its kernel. ``tests/test_fuse.py`` compares every kernel compiled and eager.

A kernel is compiled once per process (per dtype and device of its inputs and per value of
its Python-number arguments), on its first call in a compiling mode. If compiling or running
the compiled kernel fails (no C++ compiler, an unsupported backend), the kernel logs it once
and runs eagerly from then on: the arguments are not modified by either, so nothing is lost.

Example:
    >>> def _twice_max(x: Tensor, factor: float) -> Tensor:
    ...     return factor * x.amax()
    >>> twice_max = Kernel(_twice_max)
    >>> twice_max(None, torch.ones(3), 2.0)  # None: compiled on CUDA, eager elsewhere
    tensor(2.)
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import torch
from torch import Tensor

__all__ = ["Kernel", "Mode", "check_mode", "compiles"]

log = logging.getLogger(__name__)

Mode = bool | None
"""``True``: compile on any device; ``None``: compile on CUDA, eager elsewhere (a compiled kernel
saves launches, which cost most on a GPU); ``False``: always eager."""

R = TypeVar("R")


def check_mode(name: str, mode: Any) -> Mode:
    """``mode`` if it is a :data:`Mode`, else a ``TypeError`` naming ``name``."""
    if mode is not None and not isinstance(mode, bool):
        raise TypeError(
            f"{name} must be True (compile), False (eager) or None (compile on CUDA), got {mode!r}"
        )
    return mode


def compiles(mode: Mode, device: torch.device) -> bool:
    """Whether ``mode`` compiles on ``device``."""
    return mode is True or (mode is None and device.type == "cuda")


class Kernel(Generic[R]):
    """A pure function of tensors and Python numbers, run eagerly or compiled.

    Args:
        fn: the function; it must not modify its arguments (the eager fallback reruns it).

    Example:
        >>> k = Kernel(lambda x, c: torch.where(x > c, c, x))
        >>> k(False, torch.tensor([1.0, 3.0]), 2.0)
        tensor([1., 2.])
    """

    def __init__(self, fn: Callable[..., R]) -> None:
        self.fn = fn
        self._compiled: Callable[..., R] | None = None
        self.failed: str | None = None  # why compiling failed, once it did
        self.compiled = False  # a compiled call has run

    @property
    def name(self) -> str:
        return getattr(self.fn, "__qualname__", repr(self.fn))

    def __call__(self, mode: Mode, first: Tensor, *args: Any) -> R:
        """``fn(first, *args)``, compiled when ``mode`` compiles on ``first``'s device."""
        if self.failed is not None or not compiles(mode, first.device):
            return self.fn(first, *args)
        try:
            if self.compiled:
                return self._compiled(first, *args)  # type: ignore[misc]
            self._compiled = torch.compile(self.fn, fullgraph=True, dynamic=False)
            # torch's own deprecation notices while it compiles are not the user's business
            # (and a test run that makes warnings errors would turn them into failures). A
            # later recompile (other dtypes) that warns falls back to eager below.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out = self._compiled(first, *args)
            self.compiled = True
            return out
        except Exception as e:  # any compiler failure falls back to eager
            self.failed = f"{type(e).__name__}: {e}".splitlines()[0]
            log.warning("gradguard: %s runs eagerly: compiling it failed (%s)", self.name, e)
            return self.fn(first, *args)
