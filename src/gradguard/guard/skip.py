"""SKIP: what a step that is not applied must leave as it was, and the learning-rate back-off.

A skipped step leaves more than the weights alone. Everything that moves with a step must stay
where it was, or the run drifts from one that never saw the bad batch:

* module buffers the forward changed (BatchNorm's running statistics and batch counter):
  :class:`BufferKeeper` keeps a copy of the last applied step's buffers and puts them back on
  the device with ``torch.where`` (no host sync);
* the optimizer: a fused optimizer skips inside its kernel when handed ``found_inf``
  (:func:`arm_found_inf`); any other optimizer skips a parameter whose gradient is ``None``
  (:func:`drop_grads`);
* the LR scheduler and every param-group hyperparameter it sets (learning rate, OneCycleLR's
  momentum and betas, tensor learning rates): :class:`GroupState` copies and restores them;
* GradScaler's growth counter: a step the guard skipped is not a step without overflow
  (:func:`scaler_update`).

The back-off (:class:`LRScale`) multiplies the learning rates only while the optimizer steps and
puts the scheduler's values back right after, so a scheduler that recomputes its learning rate
(OneCycleLR, CyclicLR, SequentialLR) cannot undo it, and a rollback, which restores the
scheduler's values, does not either.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "BufferKeeper",
    "GroupState",
    "LRScale",
    "arm_found_inf",
    "disarm_found_inf",
    "drop_grads",
    "scaler_update",
]


def _buffer_slots(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """Where the buffers a checkpoint holds (``state_dict``) live: the ones a forward may
    update. Found once; each step reads ``module._buffers[name]`` (a module may replace one)."""
    out: list[tuple[nn.Module, str]] = []
    seen: set[int] = set()
    for module in model.modules():
        skip = module._non_persistent_buffers_set
        for name, b in module._buffers.items():
            if b is not None and name not in skip and id(b) not in seen:
                seen.add(id(b))
                out.append((module, name))
    return out


class BufferKeeper:
    """Keep module buffers as the last applied step left them, and restore them on a skip.

    One copy of the persistent buffers (BatchNorm: two vectors and a counter per layer). After
    every guarded step :meth:`settle_` runs ``buf = where(skipped, kept, buf); kept = buf`` on the
    device: an applied step keeps what its forward did, a skipped one gets the buffers back. The
    buffers are found when the keeper is made and after :meth:`keep_` (a restore); a module
    that adds a buffer later is not covered until then.

    Args:
        model: the module whose buffers are kept.

    Example:
        >>> keeper = BufferKeeper(model)
        >>> loss = model(x).sum(); ...; keeper.settle_(skip)   # skip: 0-dim bool tensor
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._slots: list[tuple[nn.Module, str]] = []
        self._kept: list[Tensor] = []
        self.keep_()

    def keep_(self) -> None:
        """Find the buffers and keep their current values (after a restore from a snapshot, too)."""
        self._slots = _buffer_slots(self.model)
        self._kept = [m._buffers[n].detach().clone() for m, n in self._slots]  # type: ignore[union-attr]

    def settle_(self, skipped: Tensor | bool) -> None:
        """After a step: restore the buffers if ``skipped`` (a 0-dim bool tensor or a bool)."""
        if not self._slots:
            return
        live = [m._buffers.get(n) for m, n in self._slots]
        if any(b is None or b.shape != k.shape for b, k in zip(live, self._kept)):
            self.keep_()  # a module replaced a buffer by another shape: nothing to compare
            return
        with torch.no_grad():
            for b, k in zip(live, self._kept):
                assert b is not None
                if isinstance(skipped, bool):
                    (b if skipped else k).copy_(k if skipped else b)
                    continue
                flag = skipped if skipped.device == b.device else skipped.to(b.device)
                b.copy_(torch.where(flag, k, b))
                k.copy_(b)


def arm_found_inf(optimizer: torch.optim.Optimizer, skip: Tensor) -> None:
    """Hand a fused optimizer the skip flag: its kernel then leaves everything untouched.

    ``found_inf`` is the attribute GradScaler uses for the same purpose (``step`` reads it).
    """
    device = optimizer.param_groups[0]["params"][0].device
    optimizer.found_inf = skip.to(device, torch.float32)  # type: ignore[attr-defined]


def disarm_found_inf(optimizer: torch.optim.Optimizer) -> None:
    """Remove what :func:`arm_found_inf` set."""
    for attr in ("found_inf", "grad_scale"):
        if hasattr(optimizer, attr):
            delattr(optimizer, attr)


def drop_grads(params: list[Tensor]) -> None:
    """Make a coming ``optimizer.step()`` skip: torch optimizers skip parameters without a grad
    (no moment, weight-decay or step-counter change)."""
    for p in params:
        p.grad = None


def _copy_value(value: Any) -> Any:
    return value.detach().clone() if isinstance(value, Tensor) else copy.deepcopy(value)


class GroupState:
    """The param-group hyperparameters (everything but ``params``) and the scheduler's state.

    Taken before a scheduler steps on the guess that a step was applied; :meth:`restore`
    puts back both exactly: a tensor learning rate is copied into the live tensor (a fused
    optimizer holds it), a cycled momentum or ``betas`` is reassigned.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
        self.groups = [
            {k: _copy_value(v) for k, v in g.items() if k != "params"}
            for g in optimizer.param_groups
        ]
        self.scheduler = (
            copy.deepcopy(scheduler_state(scheduler)) if scheduler is not None else None
        )

    def restore(self, optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
        """Put the hyperparameters and the scheduler back as they were when taken."""
        if scheduler is not None and self.scheduler is not None:
            scheduler.load_state_dict(copy.deepcopy(self.scheduler))
        for group, saved in zip(optimizer.param_groups, self.groups):
            for key, value in saved.items():
                live = group.get(key)
                if isinstance(live, Tensor) and isinstance(value, Tensor):
                    live.copy_(value)
                else:
                    group[key] = _copy_value(value)


class LRScale:
    """The learning-rate back-off: a factor applied only while the optimizer steps.

    ``scale`` starts at 1 (then :meth:`apply` does nothing: the run is bitwise what it would be
    without a guard). After :meth:`backoff`, :meth:`apply` multiplies every group's ``lr`` by
    ``scale`` just before ``optimizer.step()`` and :meth:`restore` puts the exact previous
    values back right after it, so the scheduler only ever sees its own values.
    """

    def __init__(self) -> None:
        self.scale = 1.0
        self._saved: list[tuple[dict[str, Any], Any]] = []

    def backoff(self, factor: float) -> None:
        """Multiply the scale by ``factor`` (in (0, 1))."""
        self.scale *= factor

    def apply(self, optimizer: torch.optim.Optimizer) -> None:
        """Scale the learning rates for the coming optimizer step."""
        if self.scale == 1.0 or self._saved:
            return
        for group in optimizer.param_groups:
            lr = group.get("lr")
            if lr is None:
                continue
            self._saved.append((group, _copy_value(lr)))
            if isinstance(lr, Tensor):
                lr.mul_(self.scale)
            else:
                group["lr"] = lr * self.scale

    def restore(self) -> None:
        """Put back the learning rates :meth:`apply` scaled."""
        for group, lr in self._saved:
            live = group["lr"]
            if isinstance(live, Tensor) and isinstance(lr, Tensor):
                live.copy_(lr)
            else:
                group["lr"] = lr
        self._saved = []

    def effective(self, lr: Any) -> Any:
        """The learning rate the optimizer uses for a scheduler value ``lr``."""
        return lr * self.scale if self.scale != 1.0 else lr


def scaler_unscaled(scaler: Any, optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``scaler.unscale_(optimizer)`` already ran this step (Lightning unscales before
    its ``on_before_optimizer_step`` hook; unscaling twice raises). GradScaler has no public
    query for its stage: this reads its per-optimizer record."""
    states = getattr(scaler, "_per_optimizer_states", {})
    stage = states.get(id(optimizer), {}).get("stage") if states else None
    return getattr(stage, "name", "") == "UNSCALED"


def scaler_update(scaler: Any, guard_skipped: Tensor | bool, sync: bool) -> None:
    """``scaler.update()`` that does not count a step the guard skipped as a good step.

    GradScaler grows its scale after ``growth_interval`` steps without overflow; a finite step
    the guard skipped was not such a step. With ``sync`` (the decision is on the host) the
    public ``state_dict``/``load_state_dict`` route puts the scale and the growth counter back;
    otherwise (the fused, sync-free path) the two device tensors are restored with
    ``torch.where`` (GradScaler has no public device-side route, so this reads its private
    ``_scale``/``_growth_tracker``).
    """
    if isinstance(guard_skipped, bool):
        if not guard_skipped:
            scaler.update()
            return
        saved = scaler.state_dict()
        scaler.update()  # also clears the per-optimizer unscale_ record
        scaler.load_state_dict(saved)
        return
    if sync:
        raise ValueError("scaler_update: with sync=True pass the host bool")
    scale, tracker = getattr(scaler, "_scale", None), getattr(scaler, "_growth_tracker", None)
    if scale is None or tracker is None:
        scaler.update()
        return
    kept = scale.clone(), tracker.clone()
    scaler.update()
    flag = guard_skipped.to(scale.device)
    scale.copy_(torch.where(flag, kept[0], scale))
    tracker.copy_(torch.where(flag, kept[1], tracker))


def _ours(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn._gradguard = True  # type: ignore[attr-defined]
    return fn


def scheduler_state(scheduler: Any) -> dict[str, Any]:
    """``scheduler.state_dict()`` by the class's own method, without the guard's instance
    patches (an LRScheduler's state is its ``__dict__``, patches included)."""
    state = type(scheduler).state_dict(scheduler)
    return {k: v for k, v in state.items() if not getattr(v, "_gradguard", False)}


def settle_on_read(scheduler: Any, settle: Callable[[], None]) -> None:
    """Make ``scheduler.state_dict()`` and ``get_last_lr()`` settle a pending guarded step
    first, so that between steps they never show a scheduler step taken on a wrong guess
    (an LRScheduler has no state-dict hook to do it)."""

    def state_dict() -> dict[str, Any]:
        settle()
        return scheduler_state(scheduler)

    def get_last_lr() -> list[Any]:
        settle()
        return type(scheduler).get_last_lr(scheduler)  # type: ignore[no-any-return]

    scheduler.state_dict = _ours(state_dict)
    scheduler.get_last_lr = _ours(get_last_lr)


def noop_scheduler_step(scheduler: Any) -> Callable[[], None]:
    """Make ``scheduler.step()`` a no-op until the returned function is called."""
    scheduler.step = _ours(lambda *a, **k: None)

    def undo() -> None:
        if "step" in vars(scheduler):
            del scheduler.step  # the instance attribute; the class method shows again

    return undo
