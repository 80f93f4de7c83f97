"""Shared pieces of the conformance matrix and the regression tests: a bitwise comparison of
state trees, a recorder of the hyperparameters each applied optimizer step used, and a way to
make the CPU take the sync-free path that CUDA takes (flags read one step late).

A guarded run is compared with a reference run that never saw the bad batch; "equal" means the
bytes of every tensor and ``==`` for everything else, so NaN equals NaN and -0.0 differs from 0.0.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor


def assert_same(a: Any, b: Any, where: str = "") -> None:
    """Assert two state trees are equal: tensors bitwise (dtype, shape, bytes), others ``==``."""
    if isinstance(a, Tensor):
        assert isinstance(b, Tensor), f"{where}: tensor vs {type(b).__name__}"
        assert a.dtype == b.dtype and a.shape == b.shape, (
            f"{where}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
        )
        bytes_a = a.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        bytes_b = b.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        assert torch.equal(bytes_a, bytes_b), f"{where} differs:\n{a}\nvs\n{b}"
    elif isinstance(a, dict):
        assert isinstance(b, dict), f"{where}: dict vs {type(b).__name__}"
        assert a.keys() == b.keys(), f"{where}: keys {sorted(map(str, a))} vs {sorted(map(str, b))}"
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)), f"{where}: list vs {type(b).__name__}"
        assert len(a) == len(b), f"{where}: {len(a)} items vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), f"{where}: {a!r} != {b!r}"
    elif callable(a) and not isinstance(a, type):
        # A scheduler's or an optimizer group's function: the same function, not the same object.
        assert getattr(a, "__qualname__", a) == getattr(b, "__qualname__", b), f"{where}"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _copy(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().clone()
    if isinstance(value, (list, tuple)):
        return [_copy(v) for v in value]
    return value


class UsedHyperparameters:
    """What ``optimizer.step()`` saw in its param groups, for each step that was applied.

    A step pre-hook copies every group's hyperparameters (``lr``, ``momentum``, ``betas``, ...),
    the ``found_inf`` flag a sync-free guard hands a fused optimizer (a step whose flag is set
    was skipped inside the kernel) and, with ``step_of``, the guard's step index. A rollback
    takes the guard's step back: a later call at step ``i`` replaces what was recorded from
    step ``i`` on, so :attr:`applied` holds the steps that shaped the final weights.
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, step_of: Callable[[], int] | None = None
    ) -> None:
        self._calls: list[tuple[int, Tensor | None, list[dict[str, Any]]]] = []
        self._step_of = step_of
        self.handle = optimizer.register_step_pre_hook(self._hook)

    def _hook(self, opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        flag = getattr(opt, "found_inf", None)
        groups = [{k: _copy(v) for k, v in g.items() if k != "params"} for g in opt.param_groups]
        step = self._step_of() if self._step_of is not None else len(self._calls)
        self._calls.append(
            (step, flag.detach().clone() if isinstance(flag, Tensor) else None, groups)
        )

    @property
    def applied(self) -> list[list[dict[str, Any]]]:
        """The param groups of every applied step, in order (reads the skip flags: a sync)."""
        kept: list[tuple[int, list[dict[str, Any]]]] = []
        for step, flag, groups in self._calls:
            kept = [(i, g) for i, g in kept if i < step]
            if flag is None or not bool(flag.item()):
                kept.append((step, groups))
        return [g for _, g in kept]


class _LateEvent:
    """Stands in for the CUDA event of a pinned copy: the bits are there, only read later."""

    def synchronize(self) -> None:
        pass


def make_deferred(guard: Any) -> Any:
    """Make a sync-free guard on the CPU read its flags at the next step, as it does on CUDA.

    On the CPU the flag bits are host memory already and the guard settles a fused step at its
    end; with an event attached (what a pinned copy on CUDA carries) the bits stay unread until
    the next ``guard.step``, a ``state_dict()`` or ``settle()``: the one-step-late path whose
    scheduler guess must be undone. Returns the guard.
    """
    real = guard._to_host
    guard._to_host = lambda flags: (real(flags)[0], _LateEvent())
    return guard
