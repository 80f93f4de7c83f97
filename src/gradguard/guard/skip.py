"""SKIP: what a step that is not applied must leave as it was, and the learning-rate back-off.

A skipped step leaves more than the weights alone. Everything that moves with a step must stay
where it was, or the run drifts from one that never saw the bad batch:

* module buffers the forward changed (BatchNorm's running statistics and batch counter):
  :class:`BufferKeeper` copies them before each step's forward and puts them back on a skip
  (on the device with ``torch.where``: no host sync);
* the optimizer: a fused optimizer skips inside its kernel when handed ``found_inf``
  (:func:`arm_found_inf`); torch's other optimizers skip a parameter whose gradient is ``None``
  (:func:`drop_grads`); any other optimizer stepped by a framework is put back afterwards
  (:class:`OptimizerKeeper`);
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
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from gradguard.core.snapshot import forward_rng_state

__all__ = [
    "BufferKeeper",
    "GroupState",
    "LRScale",
    "OptimizerKeeper",
    "arm_found_inf",
    "disarm_found_inf",
    "drop_grads",
    "scaler_update",
]


def _buffer_slots(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """Where the buffers a checkpoint holds (``state_dict``) live: the ones a forward may
    update. Each capture reads ``module._buffers[name]`` (a module may replace one)."""
    out: list[tuple[nn.Module, str]] = []
    seen: set[int] = set()
    for module in model.modules():
        skip = module._non_persistent_buffers_set
        for name, b in module._buffers.items():
            if b is not None and name not in skip and id(b) not in seen:
                seen.add(id(b))
                out.append((module, name))
    return out


class _PreForward:
    """The model's forward pre-hook: the keeper captures the buffers before the first forward
    of a step. A weak reference, and a copied or pickled model gets a hook that does nothing, so
    ``copy.deepcopy(model)`` (a diagnosis of a copy) never writes into this guard."""

    def __init__(self, keeper: BufferKeeper) -> None:
        self._ref = weakref.ref(keeper)

    def __call__(self, module: nn.Module, args: Any) -> None:
        keeper = self._ref()
        if keeper is not None and module is keeper.model:
            keeper.capture_()

    def __reduce__(self) -> tuple[Any, ...]:
        return (_NoHook, ())

    def __deepcopy__(self, memo: dict[int, Any]) -> _NoHook:
        return _NoHook()


class _NoHook:
    """What a copied or unpickled model holds instead of a guard's hook."""

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        return None


class BufferKeeper:
    """Keep module buffers as they were before this step's forward; restore them on a skip.

    A forward in training mode moves BatchNorm's running statistics and batch counter before the
    guard sees the step. The keeper reads the buffers at the last moment they are right: a
    forward pre-hook on the model copies them (one ``torch._foreach_copy_``) before the first
    forward after each settled step, so whatever the user did between steps (loaded a
    checkpoint, cast the model to another dtype or device, replaced a buffer) is what a skip
    puts back. :meth:`settle_` then restores them on a skipped step (``torch.where`` on the
    device when the decision is a device flag: no host sync).

    A step whose forward did not go through the model's own ``__call__`` (a loop that calls a
    submodule directly) falls back to the copy taken when the previous step settled.

    Args:
        model: the module whose buffers are kept.

    Example:
        >>> keeper = BufferKeeper(model)
        >>> loss = model(x).sum(); ...; keeper.settle_(skip)   # skip: 0-dim bool tensor
    """

    def __init__(self, model: nn.Module, buffers: bool = True, rng: bool = False) -> None:
        self.model = model
        self.buffers = buffers
        self.rng_too = rng
        self.rng: dict[str, Any] | None = None  # the RNG state before this step's forward
        self._slots: list[tuple[nn.Module, str]] = []
        self._kept: list[Tensor] = []
        self.fresh = False  # the kept copy is this step's (the pre-forward hook fired)
        self.keep_()
        self.fresh = False
        self._handle = model.register_forward_pre_hook(_PreForward(self))

    def close(self) -> None:
        """Remove the forward pre-hook."""
        self._handle.remove()

    def _live(self) -> list[Tensor]:
        live = [m._buffers.get(n) for m, n in self._slots]
        if any(b is None for b in live) or len(live) != len(self._kept):
            self._slots = _buffer_slots(self.model)
            live = [m._buffers.get(n) for m, n in self._slots]
            self._kept = [b.detach().clone() for b in live if b is not None]
        out = [b for b in live if b is not None]
        for i, (b, k) in enumerate(zip(out, self._kept)):
            if b.shape != k.shape or b.dtype != k.dtype or b.device != k.device:
                # Cast or moved since (model.double(), .to(device)): follow the live buffer.
                self._kept[i] = b.detach().clone()
        return out

    def capture_(self) -> None:
        """Copy the buffers (and, with ``rng``, the RNG state) now: the forward pre-hook calls
        it before the first forward after each settled step."""
        if self.fresh:
            return
        if self.rng_too:
            self.rng = forward_rng_state()
        live = self._live() if self.buffers else []
        if live:
            with torch.no_grad():
                torch._foreach_copy_(self._kept, live)
        self.fresh = True

    def keep_(self) -> None:
        """Take the buffers as they are now as the state to restore (after a restore, too)."""
        if self.rng_too:
            self.rng = forward_rng_state()
        if not self.buffers:
            self.fresh = True
            return
        self._slots = _buffer_slots(self.model)
        self._kept = [m._buffers[n].detach().clone() for m, n in self._slots]  # type: ignore[union-attr]
        self.fresh = True

    def before_forward(self) -> dict[str, Tensor]:
        """The kept buffers by ``model.state_dict()`` key (for snapshots and incident bundles:
        the state before this step's forward)."""
        if not self.buffers:
            return {}
        kept = {id(m._buffers[n]): k for (m, n), k in zip(self._slots, self._kept)}
        return {
            key: kept[id(v)]
            for key, v in self.model.state_dict(keep_vars=True).items()
            if id(v) in kept
        }

    def settle_(self, skipped: Tensor | bool) -> None:
        """After a step: restore the buffers if ``skipped`` (a 0-dim bool tensor or a bool)."""
        fallback = not self.fresh  # no pre-forward copy this step: copy after settling
        self.fresh = False
        if fallback and self.rng_too:
            self.rng = forward_rng_state()
        live = self._live() if self.buffers else []
        if not live:
            return
        with torch.no_grad():
            if isinstance(skipped, bool):
                if skipped:
                    torch._foreach_copy_(live, self._kept)
            else:
                for b, k in zip(live, self._kept):
                    flag = skipped if skipped.device == b.device else skipped.to(b.device)
                    b.copy_(torch.where(flag, k, b))
            if fallback:
                torch._foreach_copy_(self._kept, live)

    def restore_(self) -> None:
        """Put the kept buffers back now (an abandoned step) and wait for the next forward."""
        self.settle_(True)


class OptimizerKeeper:
    """Everything an optimizer outside ``torch.optim`` may change in a skipped step, kept to put
    back: its parameters' values and its ``state_dict``.

    torch's optimizers skip a parameter without a gradient entirely (no moment, weight-decay or
    step-counter change), so a framework's ``optimizer.step()`` after :func:`drop_grads` is a
    skip. Others (pytorch-optimizer's Lion, Adan, Prodigy, ScheduleFree...) advance a per-group
    step counter or move the weights anyway; for them a skip decided on the host is undone
    after the framework's step. It costs a copy of the weights and the optimizer state, on
    skipped steps only.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, params: list[Tensor]) -> None:
        self.params = params
        with torch.no_grad():
            self.values = [p.detach().clone() for p in params]
        self.state = copy.deepcopy(optimizer.state_dict())
        self.groups = GroupState(optimizer, None)

    def restore(self, optimizer: torch.optim.Optimizer) -> None:
        """Put the weights, the optimizer state and the group hyperparameters back."""
        with torch.no_grad():
            for p, v in zip(self.params, self.values):
                p.copy_(v)
        optimizer.load_state_dict(self.state)
        self.groups.restore(optimizer, None)


def skips_without_grads(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step()`` leaves a parameter whose ``.grad`` is ``None`` untouched:
    true of torch's own optimizers (pytorch-optimizer's are not all so)."""
    return type(optimizer).__module__.startswith("torch.optim")


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
