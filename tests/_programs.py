"""Ordinary training programs, run under a Guard and as a never-seen twin, compared bit for bit.

A **program** is a :class:`Setup` (what a user chooses once: model, optimizer and implementation,
LR scheduler, precision, plain or framework path, sync mode, gradient accumulation, snapshots,
budgets, clipping) and a list of **operations**, written as :meth:`Program.run` reads them:

* ``step KIND``: one optimizer step on the batch at the guard's data position (the documented
  position-driven loop, ``batch = batches[guard.position]``). A new position gets a ``KIND``
  batch: ``clean``; ``nan``/``inf`` (one input and one target value, so BatchNorm's statistics
  see it and the loss is never finite); ``huge`` (targets x1e4, a loss near 1e8 that
  :class:`LossAbove` flags; ``inf`` under fp16, where an overflow is the GradScaler's
  business). A position replayed after a rollback or a checkpoint load keeps its batch.
* ``fail``: a clean step whose ``optimizer.step()`` raises once (an OOM, before it changes
  anything); the program catches it, everything must be as before the call (the guard ready,
  its counters, BatchNorm, the scaler), and the batch is retried. Plain path only.
* ``save``: a checkpoint, through ``torch.save`` bytes: model, optimizer, scheduler, scaler and
  guard ``state_dict()``, and the RNG state.
* ``load I HOW``: back to checkpoint ``I``. ``live``: into the objects in use. ``fresh``: new
  objects, their states loaded, then a new Guard and its state. ``guard-first``: new objects
  and a new Guard, then the states. ``other-impl``, ``other-impl-guard-first``: the same with
  the optimizer built fused <-> foreach (a resumed run that turns ``fused=True`` on).
  ``model-only``: pretrained weights, ``model.load_state_dict`` alone; the run goes on.
* ``unfreeze``: the frozen first layer joins the optimizer (``add_param_group``).
* ``to_double``: ``model.double()`` after the Guard was built, before the first step.

The **twin** is the same program without a guard, correct by construction:

* a plain loop: ``loss.backward(); optimizer.step(); scheduler.step()``; under AMP
  ``scaler.unscale_(opt)``, ``scaler.step(opt)`` when the gradients are finite, and
  ``scaler.update()``; ``gradguard.clip_grad_norm_`` when the Setup clips (the guard's policy is
  ``FixedThreshold`` of the same value, else ``FixedThreshold(1e30)``, a multiply by exactly 1);
* it never sees a poisoned batch: where the guarded run skips one, the twin does nothing. Its
  scheduler steps on applied steps only, and a GradScaler overflow leaves its BatchNorm
  statistics as they were (docs/guard.md, AMP: "no statistic learns from it");
* a rollback (or an abort that restores a snapshot) takes the twin back to the moment the guard
  should have taken that snapshot: the twin logs its operations, and is rebuilt from fresh
  objects by replaying the log up to that moment (neither ``load_state_dict``, the path under
  test, nor ``deepcopy``, whose copy of an optimizer still steps through the original through
  its scheduler's wrapper). Both runs then replay the good batches, as the guard's position
  says. Checkpoints are saved and loaded by both runs in the same way.

**Randomness** (dropout). Each run has its own stream of torch's global RNG: every operation runs
inside :meth:`Run.own_rng`, which installs the run's RNG state and keeps it after, so the guard's
snapshots read, and its rollbacks restore, the guarded run's stream. ``Setup.rng``:

* ``"stream"``: seeded once. A forward the guarded run does and the twin must not (a poisoned
  batch, a step whose optimizer raised) is mirrored by the twin on a throwaway copy of its model
  (dropout's draws depend on shapes only), so the streams stay equal; after a rollback the masks
  match only if the guard restored the snapshot's RNG state.
* ``"position"``: seeded from the data position before each forward: a replayed batch gets the
  same masks whatever happened before.

**The expected guard** (:class:`Expected`) is the documented ladder, kept by hand: a poisoned
batch is skipped while the streak of skips is below ``Budgets.skip``, then rolled back to the
newest snapshot taken at a data position <= the streak's start (the skip list gets the streak,
widened by ``skip_before``/``skip_after``) while ``Budgets.rollback`` lasts, else ``GuardAbort``.
A GradScaler overflow is a skip that spends no budget and leaves the streak alone. Snapshots are
due at the start (the first step's state) and after every ``snapshot_every``-th counted step
unless a streak of skips is under way, ``keep_snapshots`` are kept; a user's checkpoint load,
``add_param_group`` or cast starts them again from that moment: a rollback must never undo
what the user did (read the live objects, do not remember copies). After a ``GuardAbort`` the
model, optimizer, scheduler and scaler must be the restored snapshot's, or the state before the
streak, and usable (docs/guard.md: "catch GuardAbort and go on"; on the framework path too,
where the framework unscaled before the abort); the guard's counters are not compared, and only
a checkpoint load goes on.

**Compared after every operation**, bitwise (``tests._matrix_util.assert_same``): parameters and
buffers; ``optimizer.state_dict()`` (state and every param-group value, ``step`` included, up to
the two differences without meaning that :func:`optimizer_state` explains); no ``found_inf`` left
on the optimizer; ``scheduler.state_dict()`` and ``get_last_lr()`` (a scheduler without
``state_dict``: its attributes); ``scaler.state_dict()`` and its per-optimizer stage; the
param-group values of every applied optimizer step (a step pre-hook: the LR each group had when
the optimizer stepped); the guard's stage, step count, data position, counters, skip list and
``should_skip`` against :class:`Expected`.

A program that plain PyTorch refuses (the twin raises), that diverges on clean data, or that the
Guard refuses with a clear ``TypeError``/``ValueError`` when it is built, raises
:class:`InvalidProgram`: the fuzzer discards it.

**Widening it**: an optimizer goes into :data:`OPTIMIZERS`, a scheduler into
:func:`make_scheduler`, a model part into :func:`make_model` (and a :class:`Setup` field); an
operation is a :class:`Program` method that does it to both runs and to :class:`Expected`, with a
rule in ``tests/test_fuzz_programs.py``; the late sync route of ``tests/_matrix_util.make_deferred``
would be a ``Setup.sync`` value whose :class:`Expected` acts one step late.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

import pytorch_optimizer as po
import torch
from torch import Tensor, nn
from torch.optim import lr_scheduler as S

import gradguard
from gradguard import Budgets, Detection, Detector, FixedThreshold, Guard, GuardAbort, GuardConfig
from tests._matrix_util import assert_same

KINDS = ("clean", "nan", "inf", "huge")
LOADS = ("live", "fresh", "guard-first", "other-impl", "other-impl-guard-first", "model-only")
LIMIT = 1e5  # LossAbove's bar: a "huge" batch's loss is about 1e8, a clean one about 1
BATCH, INPUTS, OUTPUTS, HIDDEN = 8, 4, 2, 8


class InvalidProgram(Exception):
    """The program is not an ordinary training run (plain PyTorch refuses it, or it diverges
    on clean data): the fuzzer discards it."""


class GuardRefused(InvalidProgram):
    """The Guard refused the program when it was built (a clear ``TypeError``/``ValueError``):
    a fine answer for a program it cannot guard."""


class InjectedFault(RuntimeError):
    """What the ``fail`` operation makes ``optimizer.step()`` raise (like an OOM, before it
    changes anything)."""


class LossAbove(Detector):
    """Flags a loss above ``limit``: fires on the ``huge`` batches only (a clean loss is ~1)."""

    name: ClassVar[str] = "loss_above"
    _config_keys = ("limit",)

    def __init__(self, limit: float = LIMIT) -> None:
        super().__init__()
        self.limit = limit

    def check(self, s: Any) -> Detection:
        device = s.total_norm.device
        if s.loss is None:
            flag = torch.zeros((), dtype=torch.bool, device=device)
        else:
            flag = (s.loss.detach().float() > self.limit).to(device)
        return Detection(flag, flag.float())


# --------------------------------------------------------------------------- the setup


@dataclass(frozen=True)
class Optim:
    make: Callable[..., torch.optim.Optimizer]
    lr: float
    impls: tuple[str, ...] = ("plain",)  # "plain" (the for-loop), "foreach", "fused"


def _torch(cls: Any, **kw: Any) -> Callable[..., torch.optim.Optimizer]:
    def make(params: Any, lr: float, impl: str) -> torch.optim.Optimizer:
        flag = {"plain": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}
        return cls(params, lr=lr, **kw, **flag[impl])

    return make


def _po(cls: Any, **kw: Any) -> Callable[..., torch.optim.Optimizer]:
    def make(params: Any, lr: float, impl: str) -> torch.optim.Optimizer:
        return cls(params, lr=lr, **kw)

    return make


ALL3 = ("plain", "foreach", "fused")
OPTIMIZERS: dict[str, Optim] = {
    "sgd": Optim(_torch(torch.optim.SGD), 0.05, ALL3),
    "sgd-momentum": Optim(_torch(torch.optim.SGD, momentum=0.9, weight_decay=0.01), 0.05, ALL3),
    "adam": Optim(_torch(torch.optim.Adam), 0.01, ALL3),
    "adamw": Optim(_torch(torch.optim.AdamW, weight_decay=0.1), 0.01, ALL3),
    "rmsprop": Optim(_torch(torch.optim.RMSprop, momentum=0.5), 0.01, ("plain", "foreach")),
    "adagrad": Optim(_torch(torch.optim.Adagrad), 0.05, ALL3),
    "nadam": Optim(_torch(torch.optim.NAdam), 0.01, ("plain", "foreach")),
    "radam": Optim(_torch(torch.optim.RAdam, weight_decay=0.01), 0.01, ("plain", "foreach")),
    "adamax": Optim(_torch(torch.optim.Adamax), 0.01, ("plain", "foreach")),
    "lion": Optim(_po(po.Lion), 1e-3),
    "adan": Optim(_po(po.Adan), 1e-3),
    "prodigy": Optim(_po(po.Prodigy), 1.0),
    "schedulefree": Optim(_po(po.ScheduleFreeAdamW, warmup_steps=3), 1e-2),
}
SCHEDULERS = ("none", "steplr", "onecycle", "warmup", "custom")


@dataclass(frozen=True)
class Setup:
    """What a user chooses once. The repr names only what differs from the defaults."""

    optimizer: str = "sgd"
    impl: str = "plain"
    scheduler: str = "none"
    precision: str = "fp32"  # "fp32", "bf16" (autocast), "fp16" (autocast and GradScaler)
    path: str = "plain"  # "plain": guard.step; "framework": before/after_optimizer_step
    sync: str = "step"  # "step" or "auto" (fused optimizers: the lazy, found_inf route)
    accumulation: int = 1  # micro-batches per optimizer step
    batchnorm: bool = False
    dropout: bool = False
    tied: bool = False  # two hidden layers share one weight
    frozen: bool = False  # the first layer starts frozen, outside the optimizer
    snapshot_every: int = 0
    keep_snapshots: int = 2
    skip_budget: int = 8
    rollback_budget: int = 2
    skip_before: int = 0
    skip_after: int = 0
    clip: float | None = None  # FixedThreshold(clip), and the twin's clip_grad_norm_
    rng: str = "stream"  # "stream" or "position" (see the module docstring)
    init_scale: float = 2.0**16  # GradScaler's initial scale (fp16)

    def __post_init__(self) -> None:
        assert self.impl in OPTIMIZERS[self.optimizer].impls, self
        assert self.scheduler in SCHEDULERS and self.precision in ("fp32", "bf16", "fp16")

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:  # Hypothesis prints this
        p.text(repr(self))

    def __repr__(self) -> str:
        fields = [
            f"{f.name}={getattr(self, f.name)!r}"
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != f.default
        ]
        return f"Setup({', '.join(fields)})"

    @property
    def lazy(self) -> bool:
        """The guard takes its sync-free route (fused optimizer, ``sync="auto"``)."""
        return self.impl == "fused" and self.sync == "auto"


def make_model(setup: Setup) -> nn.Sequential:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        layers: list[nn.Module] = [nn.Linear(INPUTS, HIDDEN)]
        if setup.batchnorm:
            layers.append(nn.BatchNorm1d(HIDDEN))
        layers.append(nn.Tanh())
        if setup.tied:
            a, b = nn.Linear(HIDDEN, HIDDEN), nn.Linear(HIDDEN, HIDDEN)
            b.weight = a.weight
            layers += [a, nn.Tanh(), b, nn.Tanh()]
        if setup.dropout:
            layers.append(nn.Dropout(0.25))
        layers.append(nn.Linear(HIDDEN, OUTPUTS))
        model = nn.Sequential(*layers)
    if setup.frozen:
        model[0].requires_grad_(False)
    return model


def warmup(step: int) -> float:
    """LambdaLR's factor: a linear warm-up over four steps."""
    return min(1.0, (step + 1) / 4)


class HandWarmup:
    """A user's hand-written scheduler: ``step()`` only, no ``state_dict``."""

    def __init__(self, opt: torch.optim.Optimizer) -> None:
        self.opt, self.t = opt, 0
        self.base = [g["lr"] for g in opt.param_groups]

    def step(self) -> None:
        self.t += 1
        for g, lr in zip(self.opt.param_groups, self.base):
            g["lr"] = lr * min(1.0, (self.t + 1) / 4)


def make_scheduler(name: str, opt: torch.optim.Optimizer, lr: float) -> Any:
    if name == "none":
        return None
    if name == "steplr":
        return S.StepLR(opt, step_size=2, gamma=0.5)
    if name == "onecycle":
        cycle = "momentum" in opt.defaults or "betas" in opt.defaults
        return S.OneCycleLR(opt, max_lr=lr, total_steps=400, pct_start=0.05, cycle_momentum=cycle)
    if name == "warmup":
        return S.LambdaLR(opt, warmup)
    if name == "custom":
        return HandWarmup(opt)
    raise ValueError(name)


def guard_config(setup: Setup) -> GuardConfig:
    """The non-finite rule, and :class:`LossAbove` for the ``huge`` batches: nothing else can
    fire on a clean batch, so the guard and the twin must agree exactly."""
    return GuardConfig(
        policy=FixedThreshold(setup.clip if setup.clip is not None else 1e30),
        detectors=[] if setup.precision == "fp16" else [LossAbove()],
        budgets=Budgets(skip=setup.skip_budget, rollback=setup.rollback_budget),
        snapshot_every=setup.snapshot_every,
        keep_snapshots=setup.keep_snapshots,
        skip_before=setup.skip_before,
        skip_after=setup.skip_after,
        sync=setup.sync,
    )


# --------------------------------------------------------------------------- data


def batch_at(position: int, kind: str, accumulation: int) -> list[tuple[Tensor, Tensor]]:
    """The micro-batches of a data position; a poison goes into the first one (NaN/inf in an
    input, which also reaches BatchNorm's statistics, and in a target, so that the loss is
    never finite, whatever a frozen layer or a saturated tanh make of the input)."""
    out = []
    for j in range(accumulation):
        g = torch.Generator().manual_seed(1000 * position + j + 1)
        x, y = torch.randn(BATCH, INPUTS, generator=g), torch.randn(BATCH, OUTPUTS, generator=g)
        if j == 0 and kind in ("nan", "inf"):
            x[0, 0] = y[0, 0] = math.nan if kind == "nan" else math.inf
        if j == 0 and kind == "huge":
            y = y * 1e4
        out.append((x, y))
    return out


def _autocast(precision: str) -> Any:
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None)


# --------------------------------------------------------------------------- one run


class Used:
    """The hyperparameters of every applied optimizer step (a step pre-hook records each call;
    :meth:`commit` keeps those of an applied step, without a set ``found_inf``)."""

    def __init__(self) -> None:
        self.applied: list[list[dict[str, Any]]] = []
        self._pending: list[tuple[list[dict[str, Any]], bool]] = []

    def attach(self, opt: torch.optim.Optimizer) -> None:
        opt.register_step_pre_hook(self._hook)

    def _hook(self, opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        flag = getattr(opt, "found_inf", None)
        skipped = bool(flag.item()) if isinstance(flag, Tensor) else False
        groups = [
            {
                k: v.detach().clone() if isinstance(v, Tensor) else copy.deepcopy(v)
                for k, v in g.items()
                if k != "params" and not (k == "differentiable" and v is False)
            }
            for g in opt.param_groups
        ]  # fmt: skip (differentiable: see optimizer_state)
        self._pending.append((groups, skipped))

    def commit(self, applied: bool) -> None:
        if applied:
            self.applied += [g for g, skipped in self._pending if not skipped]
        self._pending = []


@dataclass
class Run:
    """One run's objects and its own RNG stream."""

    setup: Setup
    impl: str
    model: nn.Sequential
    opt: torch.optim.Optimizer
    sched: Any
    scaler: Any
    used: Used
    rng: Tensor
    guard: Guard | None = None

    @classmethod
    def build(cls, setup: Setup, impl: str, unfrozen: bool, double: bool, used: Used) -> Run:
        model = make_model(setup)
        if double:
            model.double()
        params = [p for p in model.parameters() if p.requires_grad]
        spec = OPTIMIZERS[setup.optimizer]
        opt = spec.make(params, spec.lr, impl)
        if unfrozen:
            _unfreeze(model, opt, spec.lr)
        sched = make_scheduler(setup.scheduler, opt, spec.lr)
        scaler = (
            torch.amp.GradScaler("cpu", init_scale=setup.init_scale, growth_interval=3)
            if setup.precision == "fp16"
            else None
        )
        used.attach(opt)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1234)
            rng = torch.get_rng_state()
        return cls(setup, impl, model, opt, sched, scaler, used, rng)

    @contextlib.contextmanager
    def own_rng(self) -> Iterator[None]:
        """Make this run's RNG stream the global one for the duration."""
        torch.set_rng_state(self.rng)
        try:
            yield
        finally:
            self.rng = torch.get_rng_state()

    @property
    def params(self) -> list[Tensor]:
        return [p for g in self.opt.param_groups for p in g["params"]]

    def backward(self, micro: list[tuple[Tensor, Tensor]], position: int) -> Tensor:
        """Forward and backward of every micro-batch; returns the step's (detached) loss."""
        dtype = next(self.model.parameters()).dtype
        total = torch.zeros((), dtype=torch.float32)
        for j, (x, y) in enumerate(micro):
            if self.setup.rng == "position":
                torch.manual_seed(10_000 + 100 * position + j)
            with _autocast(self.setup.precision):
                out = self.model(x.to(dtype))
            loss = nn.functional.mse_loss(out.to(dtype), y.to(dtype)) / len(micro)
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            total = total + loss.detach().float()
        return total

    def mirror_forwards(self, micro: list[tuple[Tensor, Tensor]], position: int) -> None:
        """Draw what the forwards of ``micro`` draw from the RNG, changing nothing else."""
        if self.setup.dropout and self.setup.rng == "stream":
            shadow = copy.deepcopy(self.model)
            dtype = next(shadow.parameters()).dtype
            for x, _ in micro:
                with _autocast(self.setup.precision):
                    shadow(x.to(dtype))

    def state_bytes(self, unfrozen: bool, double: bool) -> bytes:
        """A user's checkpoint, through ``torch.save`` (as a file would be); ``unfrozen`` and
        ``double`` say how to build the objects it loads into."""
        ckpt: dict[str, Any] = {
            "unfrozen": unfrozen,
            "double": double,
            "model": self.model.state_dict(),
            "opt": self.opt.state_dict(),
            "rng": self.rng.clone(),
            "used": len(self.used.applied),
        }
        if self.sched is not None and callable(getattr(self.sched, "state_dict", None)):
            ckpt["sched"] = self.sched.state_dict()
        if self.scaler is not None:
            ckpt["scaler"] = self.scaler.state_dict()
        if self.guard is not None:
            ckpt["guard"] = self.guard.state_dict()
        buf = io.BytesIO()
        torch.save(ckpt, buf)
        return buf.getvalue()

    def load_states(self, ckpt: dict[str, Any]) -> None:
        """Model, optimizer, scheduler and scaler states, and the RNG (not the guard's); call it
        inside :meth:`own_rng`."""
        self.model.load_state_dict(ckpt["model"])
        self.opt.load_state_dict(ckpt["opt"])
        if "sched" in ckpt:
            self.sched.load_state_dict(ckpt["sched"])
        if "scaler" in ckpt:
            self.scaler.load_state_dict(ckpt["scaler"])
            fused = any(g.get("fused") for g in self.opt.param_groups)
            if getattr(self.opt, "_step_supports_amp_scaling", False) and not fused:
                # Built fused, loaded non-fused: GradScaler still hands the optimizer found_inf,
                # which its non-fused step refuses (torch 2.13), with or without a guard.
                raise InvalidProgram("a fused-built optimizer loaded non-fused under GradScaler")
        torch.set_rng_state(ckpt["rng"])
        del self.used.applied[int(ckpt["used"]) :]


def _unfreeze(model: nn.Sequential, opt: torch.optim.Optimizer, lr: float) -> None:
    first = model[0]
    first.requires_grad_(True)
    opt.add_param_group({"params": list(first.parameters()), "lr": lr * 0.5})


def read_ckpt(blob: bytes) -> dict[str, Any]:
    return torch.load(io.BytesIO(blob), weights_only=True)  # type: ignore[no-any-return]


def other_impl(setup: Setup, impl: str) -> str:
    return "foreach" if impl == "fused" else "fused"


# --------------------------------------------------------------------------- the twin


Mark = tuple[tuple[str, tuple[Any, ...]], ...]


class Snap(NamedTuple):
    """A snapshot the guard should hold: its step and data position, the twin's history up to
    it, and the hyperparameters of the guarded run's applied steps until then."""

    step: int
    position: int
    mark: Mark
    used: tuple[Any, ...]


class Twin:
    """The unguarded run: a log of operations, replayed on fresh objects to go back in time."""

    def __init__(self, setup: Setup) -> None:
        self.setup = setup
        self.log: list[tuple[str, tuple[Any, ...]]] = []
        self._fresh()

    def _fresh(self) -> None:
        self.unfrozen = self.double = False
        self.run = Run.build(self.setup, self.setup.impl, False, False, Used())

    def do(self, op: str, *args: Any) -> Any:
        self.log.append((op, args))
        torch.set_rng_state(self.run.rng)
        try:
            return getattr(self, f"_{op}")(*args)
        except (RuntimeError, ValueError, KeyError, TypeError, AssertionError) as e:
            raise InvalidProgram(f"plain PyTorch refuses it: {e!r}") from e
        finally:
            self.run.rng = torch.get_rng_state()  # a load may have put a new run in place

    def mark(self) -> Mark:
        """This moment: the operations that led here (a snapshot from before a rollback
        keeps the history it was taken in)."""
        return tuple(self.log)

    def restore(self, mark: Mark) -> None:
        self.log = []
        self._fresh()
        for op, args in mark:
            self.do(op, *args)

    # -- operations

    def _step(self, micro: list[tuple[Tensor, Tensor]], position: int) -> bool:
        """A plain optimizer step; returns whether it was applied (a GradScaler overflow is
        not)."""
        r, setup = self.run, self.setup
        kept = {k: b.clone() for k, b in r.model.state_dict().items()}
        loss = r.backward(micro, position)
        if r.scaler is not None:
            r.scaler.unscale_(r.opt)
        finite = all(bool(p.grad.isfinite().all()) for p in r.params if p.grad is not None)
        if not (math.isfinite(float(loss)) and float(loss) < LIMIT / 100) or (
            r.scaler is None and not finite
        ):
            raise InvalidProgram(f"a clean batch gave loss {float(loss)}: the run diverged")
        if setup.clip is not None:
            gradguard.clip_grad_norm_([p for p in r.params if p.grad is not None], setup.clip)
        if finite:
            # Not scaler.step() on an overflow: a fused SGD handed found_inf on its first step
            # keeps an uninitialized momentum buffer (torch 2.13); the step never happened.
            (r.scaler.step if r.scaler is not None else lambda o: o.step())(r.opt)
        if r.scaler is not None:
            r.scaler.update()
        if finite and r.sched is not None:
            r.sched.step()
        if not finite:  # "no statistic learns from it": BatchNorm's neither (docs/guard.md)
            with torch.no_grad():
                for k, b in r.model.named_buffers():
                    b.copy_(kept[k])
        r.opt.zero_grad(set_to_none=True)
        r.used.commit(finite)
        return finite

    def _mirror(self, micro: list[tuple[Tensor, Tensor]], position: int) -> None:
        self.run.mirror_forwards(micro, position)

    def _load(self, blob: bytes, how: str) -> None:
        ckpt = read_ckpt(blob)
        if how == "model-only":
            self.run.model.load_state_dict(ckpt["model"])
            return
        if how != "live":
            other = how.startswith("other-impl")
            impl = other_impl(self.setup, self.run.impl) if other else self.run.impl
            self.unfrozen, self.double = bool(ckpt["unfrozen"]), bool(ckpt["double"])
            self.run = Run.build(self.setup, impl, self.unfrozen, self.double, self.run.used)
        self.run.load_states(ckpt)

    def _unfreeze(self) -> None:
        self.unfrozen = True
        _unfreeze(self.run.model, self.run.opt, OPTIMIZERS[self.setup.optimizer].lr)

    def _double(self) -> None:
        self.double = True
        self.run.model.double()


# --------------------------------------------------------------------------- the expected guard


@dataclass
class Expected:
    """What the guard's own state must be: the documented ladder, kept by hand."""

    step: int = 0
    position: int = 0
    streak: int = 0
    streak_start: int = 0
    skips: int = 0
    rollbacks: int = 0
    amp_skips: int = 0
    windows: list[tuple[int, int]] = field(default_factory=list)
    snapshots: list[Snap] = field(default_factory=list)  # the guard's, oldest first

    def next_allowed(self, position: int) -> int:
        for a, b in self.windows:
            if a <= position <= b:
                position = b + 1
        return position

    def add_window(self, start: int, end: int) -> None:
        merged: list[tuple[int, int]] = []
        for a, b in sorted([*self.windows, (start, end)]):
            if merged and a <= merged[-1][1] + 1:
                merged[-1] = (merged[-1][0], max(merged[-1][1], b))
            else:
                merged.append((a, b))
        self.windows = merged

    def snapshot_for(self, position: int) -> Snap | None:
        """The newest snapshot taken at a data position <= ``position``."""
        return next((s for s in reversed(self.snapshots) if s[1] <= position), None)

    def saved(self) -> Expected:
        return dataclasses.replace(self, windows=list(self.windows), snapshots=[])


def guard_view(guard: Guard) -> dict[str, Any]:
    """The guard's own state that :class:`Expected` predicts (one place to follow a rename)."""
    c = guard.counters
    return {
        "stage": guard.stage.value,
        "step": guard.step_count,
        "position": guard.position,
        "streak": c.streak,
        "skips": c.skips,
        "rollbacks": c.rollbacks,
        "amp_skips": c.amp_skips,
        "backoffs": c.backoffs,
        "windows": [tuple(w) for w in guard.skip_list.windows],
    }


def _untouched(entry: dict[str, Any]) -> bool:
    """Step 0 (or none) and zero moments: what the next applied step treats as a fresh start
    (SGD's zero momentum buffer: without dampening, the first step's buffer is the gradient)."""
    return all(
        (isinstance(v, Tensor) and not bool(v.any())) or (k == "step" and float(v) == 0)
        for k, v in entry.items()
    )


def optimizer_state(opt: torch.optim.Optimizer) -> dict[str, Any]:
    """``opt.state_dict()`` up to two differences without meaning: entries no step has
    advanced (:func:`_untouched`: a fused kernel told to skip the first step creates them, a
    skipped ``step()`` call does not, and the next applied step starts from either in the same
    way) and ``differentiable=False`` (see below)."""
    state = opt.state_dict()
    state["state"] = {k: v for k, v in state["state"].items() if not _untouched(v)}
    for group in state["param_groups"]:
        # torch's load_state_dict (a restore) adds differentiable=False to the defaults of an
        # optimizer that lacks it, so a group added later has the key: same meaning.
        if group.get("differentiable") is False:
            del group["differentiable"]
    return state


def _scaler_stages(scaler: Any) -> list[str]:
    """GradScaler's per-optimizer stages (empty after ``update()``: ready for a new step)."""
    states = getattr(scaler, "_per_optimizer_states", {})
    return sorted(str(getattr(s.get("stage"), "name", s.get("stage"))) for s in states.values())


# --------------------------------------------------------------------------- the program


class Program:
    """A guarded run and its twin, driven one operation at a time; :meth:`check` compares.

    Example:
        >>> p = Program(Setup(optimizer="adamw", impl="fused", sync="auto", batchnorm=True))
        >>> p.run("step; step nan; save; step; load 0 fresh; step")
    """

    def __init__(self, setup: Setup) -> None:
        self.setup = setup
        self.script: list[str] = []
        self.kinds: dict[int, str] = {}  # the batch of each data position made so far
        self.checkpoints: list[tuple[bytes, bytes, Expected]] = []
        self.expected = Expected()
        self.twin = Twin(setup)
        self.unfrozen = self.double = False
        self.aborted = False  # after a GuardAbort only a checkpoint load goes on
        self.steps = 0  # optimizer steps attempted (for the statistics)
        self.actions: list[str] = []
        self.guarded = Run.build(setup, setup.impl, False, False, Used())
        self._new_guard(self.guarded)
        if setup.snapshot_every:
            self.expected.snapshots = [self._snap(0, 0)]

    def __repr__(self) -> str:
        return f"Program({self.setup!r}).run({'; '.join(self.script)!r})"

    @classmethod
    def resumed(cls, setup: Setup, saved: dict[str, Any]) -> Program:
        """A program that starts from a checkpoint :meth:`dump` wrote (new objects, states
        loaded, then a new Guard), as a fresh process would."""
        p = cls(setup)
        p.kinds = dict(saved["kinds"])
        p.checkpoints = [(saved["guarded"], saved["twin"], Expected(**saved["expected"]))]
        p.load(0, "fresh")
        return p

    def dump(self, index: int = -1) -> dict[str, Any]:
        """Checkpoint ``index`` and what :meth:`resumed` needs besides it (plain values)."""
        blob, twin_blob, saved = self.checkpoints[index]
        return {
            "guarded": blob,
            "twin": twin_blob,
            "expected": dataclasses.asdict(saved),
            "kinds": dict(self.kinds),
        }

    def _new_guard(self, run: Run) -> None:
        with run.own_rng():
            try:
                run.guard = Guard(
                    run.model, run.opt, run.sched, run.scaler, guard_config(run.setup)
                )
            except (TypeError, ValueError) as e:  # a clear refusal is a fine answer
                raise GuardRefused(f"the Guard refuses this program: {e}") from e

    @property
    def guard(self) -> Guard:
        assert self.guarded.guard is not None
        return self.guarded.guard

    # -- the operations

    def run(self, script: str) -> Program:
        """Run operations written as in :attr:`script` (``"step nan; save; load 0 live"``),
        checking after each one."""
        for line in filter(None, (s.strip() for s in script.split(";"))):
            op, *args = line.split()
            if op == "step":
                self.step(*args)
            elif op == "load":
                self.load(int(args[0]), args[1])
            else:
                getattr(self, op)()
            self.check()
        return self

    def step(self, kind: str = "clean", *, written: bool = True) -> None:
        """One optimizer step at the guard's data position."""
        assert not self.aborted, "after a GuardAbort only a checkpoint load goes on"
        e = self.expected
        p = e.position
        kind = self._kind_at(p, kind)
        if written:
            self.script.append("step" if kind == "clean" else f"step {kind}")
        micro = batch_at(p, kind, self.setup.accumulation)
        self.steps += 1
        if kind == "clean":
            applied = self.twin.do("step", micro, p)  # first: plain PyTorch may refuse it
            outcome = self._guarded_step(micro, p)
            if applied:
                e.streak = 0
            else:
                e.amp_skips += 1  # a GradScaler overflow: no budget, the streak as it was
            self._counted_step(applied, outcome)
            return
        outcome = self._guarded_step(micro, p)
        self.twin.do("mirror", micro, p)
        self._incident(p, outcome)

    def fail(self) -> None:
        """A clean step whose ``optimizer.step()`` raises once; the program catches it and
        retries the batch."""
        assert not self.aborted and self.setup.path == "plain"
        p = self.expected.position
        kind = self._kind_at(p, "clean")
        if kind != "clean":  # a replayed poisoned batch: just step
            self.step(kind)
            return
        self.script.append("fail")
        micro = batch_at(p, "clean", self.setup.accumulation)
        fired: list[bool] = []

        def raise_once(opt: Any, args: Any, kwargs: Any) -> None:
            if not fired:
                fired.append(True)
                raise InjectedFault("simulated: out of memory in optimizer.step()")

        handle = self.guarded.opt.register_step_pre_hook(raise_once)
        try:
            outcome = self._guarded_step(micro, p)
        finally:
            handle.remove()
        if not fired:
            # No optimizer.step() call at all: only right when the step is not applied.
            applied = self.twin.do("step", micro, p)
            assert not applied, "an applied step never called optimizer.step()"
            self.expected.amp_skips += 1
            self._counted_step(applied, outcome)
            return
        assert isinstance(outcome, InjectedFault), f"the fault did not reach the program: {outcome}"
        self.guarded.used.commit(False)
        self.twin.do("mirror", micro, p)
        self.check()  # the failed step must have left everything as it was
        self.step("clean", written=False)

    def save(self) -> None:
        self.script.append("save")
        with self.guarded.own_rng():
            blob = self.guarded.state_bytes(self.unfrozen, self.double)
        with self.twin.run.own_rng():
            twin_blob = self.twin.run.state_bytes(self.unfrozen, self.double)
        self.checkpoints.append((blob, twin_blob, self.expected.saved()))

    def load(self, index: int, how: str) -> None:
        if not self.checkpoints:
            raise InvalidProgram("no checkpoint to load")
        index %= len(self.checkpoints)
        if how.startswith("other-impl") and "fused" not in OPTIMIZERS[self.setup.optimizer].impls:
            how = "guard-first" if how.endswith("guard-first") else "fresh"
        self.script.append(f"load {index} {how}")
        blob, twin_blob, saved = self.checkpoints[index]
        ckpt = read_ckpt(blob)
        g = self.guarded
        if how == "live" and (ckpt["unfrozen"], ckpt["double"]) != (self.unfrozen, self.double):
            raise InvalidProgram("a checkpoint of other param groups or dtype into live objects")
        if how == "model-only" and self.expected.streak:
            raise InvalidProgram("pretrained weights loaded inside a skip streak")
        if how == "model-only":
            with g.own_rng():
                g.model.load_state_dict(ckpt["model"])
            self.twin.do("load", twin_blob, how)
            self._fresh_snapshots()
            return
        if how == "live":
            with g.own_rng():
                g.load_states(ckpt)
                self.guard.load_state_dict(ckpt["guard"])
        else:
            impl = other_impl(self.setup, g.impl) if how.startswith("other-impl") else g.impl
            self.unfrozen, self.double = bool(ckpt["unfrozen"]), bool(ckpt["double"])
            new = Run.build(self.setup, impl, self.unfrozen, self.double, g.used)
            guard_first = how.endswith("guard-first")
            if guard_first:
                self._new_guard(new)
            with new.own_rng():
                new.load_states(ckpt)
            if not guard_first:
                self._new_guard(new)
            with new.own_rng():
                assert new.guard is not None
                new.guard.load_state_dict(ckpt["guard"])
            self.guarded = new
        self.twin.do("load", twin_blob, how)
        self.expected = dataclasses.replace(saved, windows=list(saved.windows))
        self.aborted = False
        e = self.expected
        at = (e.step - e.streak, e.streak_start) if e.streak else (e.step, e.position)
        self._fresh_snapshots(at)

    def unfreeze(self) -> None:
        assert self.setup.frozen and not self.unfrozen
        if self.expected.streak:
            raise InvalidProgram("unfrozen inside a skip streak")
        self.script.append("unfreeze")
        self.unfrozen = True
        with self.guarded.own_rng():
            _unfreeze(self.guarded.model, self.guarded.opt, OPTIMIZERS[self.setup.optimizer].lr)
        self.twin.do("unfreeze")
        self._fresh_snapshots()

    def to_double(self) -> None:
        assert not self.double
        self.script.append("to_double")
        self.double = True
        with self.guarded.own_rng():
            self.guarded.model.double()
        self.twin.do("double")
        self._fresh_snapshots()

    # -- the pieces

    def _kind_at(self, position: int, kind: str) -> str:
        if kind == "huge" and self.setup.precision == "fp16":
            kind = "inf"  # a GradScaler overflow is the scaler's: see the module docstring
        return self.kinds.setdefault(position, kind)

    def _guarded_step(self, micro: list[tuple[Tensor, Tensor]], position: int) -> Any:
        """The guarded run's step; returns the report, or the exception the step raised."""
        g = self.guarded
        with g.own_rng():
            loss = g.backward(micro, position)
            try:
                if self.setup.path == "plain":
                    report = self.guard.step(loss)
                else:
                    report = self._framework_step(loss)
                action = report.action
            except (GuardAbort, InjectedFault) as err:
                g.opt.zero_grad(set_to_none=True)
                return err
            g.opt.zero_grad(set_to_none=True)
        self.actions.append(action)
        return report

    def _framework_step(self, loss: Tensor) -> Any:
        """What Lightning does around its ``on_before_optimizer_step`` hook."""
        g = self.guarded
        if g.scaler is not None:
            g.scaler.unscale_(g.opt)
        report = self.guard.before_optimizer_step(loss)
        if g.scaler is not None:
            g.scaler.step(g.opt)
            g.scaler.update()
        else:
            g.opt.step()
        if g.sched is not None:
            g.sched.step()
        self.guard.after_optimizer_step()
        return report

    def _counted_step(self, applied: bool, outcome: Any) -> None:
        """A step the guard counts (applied, or skipped without a rollback)."""
        assert not isinstance(outcome, BaseException), f"the step raised {outcome!r}"
        e = self.expected
        want = ("step", "clip") if applied else ("skip",)
        assert outcome.action in want, f"guard said {outcome.action!r}, expected one of {want}"
        self.guarded.used.commit(applied)
        e.step += 1
        e.position = e.next_allowed(e.position + 1)
        every = self.setup.snapshot_every
        # Not inside a streak of skips: the snapshot from before it is the one to return to.
        if every and e.step % every == 0 and not e.streak:
            e.snapshots = [*e.snapshots, self._snap(e.step, e.position)]
            del e.snapshots[: -self.setup.keep_snapshots]

    def _incident(self, p: int, outcome: Any) -> None:
        """A poisoned batch: skip, roll back or abort, as the ladder says."""
        e, s = self.expected, self.setup
        if e.streak == 0:
            e.streak_start = p
        snap = e.snapshot_for(e.streak_start)
        if e.streak < s.skip_budget:
            e.streak += 1
            e.skips += 1
            self._counted_step(False, outcome)
            return
        self.guarded.used.commit(False)
        if snap is not None and e.rollbacks < s.rollback_budget:
            assert not isinstance(outcome, BaseException), f"the step raised {outcome!r}"
            assert outcome.action == "rollback", f"guard said {outcome.action!r}, not rollback"
            e.rollbacks += 1
            e.streak = 0
            e.add_window(max(0, e.streak_start - s.skip_before), p + s.skip_after)
            self._back_to(snap)
            return
        assert isinstance(outcome, GuardAbort), f"expected GuardAbort, got {outcome!r}"
        self.aborted = True
        if snap is not None:  # restored before raising; else the state before the streak
            self._back_to(snap)

    def _snap(self, step: int, position: int) -> Snap:
        return Snap(step, position, self.twin.mark(), tuple(self.guarded.used.applied))

    def _back_to(self, snap: Snap) -> None:
        e = self.expected
        self.twin.restore(snap.mark)
        e.step, e.position = snap.step, e.next_allowed(snap.position)
        self.guarded.used.applied = list(snap.used)
        # The snapshots newer than the one restored stay (they are the guard's store).

    def _fresh_snapshots(self, at: tuple[int, int] | None = None) -> None:
        """After a user's load, add_param_group or cast, the snapshots start again from here."""
        if self.setup.snapshot_every:
            e = self.expected
            e.snapshots = [self._snap(*(at if at is not None else (e.step, e.position)))]

    # -- the comparison

    def check(self) -> None:
        """Everything the promise covers, guarded vs twin, and the guard vs :class:`Expected`."""
        g, t = self.guarded, self.twin.run
        where = f"after {'; '.join(self.script) or 'building'} in {self.setup!r}"
        model_g, model_t = g.model, t.model
        assert_same(dict(model_g.named_parameters()), dict(model_t.named_parameters()), "param")
        assert_same(dict(model_g.named_buffers()), dict(model_t.named_buffers()), "buffer")
        assert_same(optimizer_state(g.opt), optimizer_state(t.opt), "optimizer")
        for attr in ("found_inf", "grad_scale"):
            assert not hasattr(g.opt, attr), f"optimizer.{attr} left set {where}"
        if g.sched is not None:
            if callable(getattr(g.sched, "state_dict", None)):
                assert_same(g.sched.state_dict(), t.sched.state_dict(), "scheduler")
                assert_same(g.sched.get_last_lr(), t.sched.get_last_lr(), "last lr")
            else:
                keep = lambda s: {k: v for k, v in vars(s).items() if k != "opt"}  # noqa: E731
                assert_same(keep(g.sched), keep(t.sched), "scheduler")
        if g.scaler is not None:
            assert_same(g.scaler.state_dict(), t.scaler.state_dict(), "scaler")
        if g.scaler is not None:
            assert _scaler_stages(g.scaler) == _scaler_stages(t.scaler), (
                f"GradScaler stage {_scaler_stages(g.scaler)} {where}"
            )
        assert_same(g.used.applied, t.used.applied, "hyperparameters of the applied steps")
        if self.aborted:
            return  # the guard's counters after an abort are its own business
        e = self.expected
        want = {
            "stage": "ready",
            "step": e.step,
            "position": e.position,
            "streak": e.streak,
            "skips": e.skips,
            "rollbacks": e.rollbacks,
            "amp_skips": e.amp_skips,
            "backoffs": 0,
            "windows": e.windows,
        }
        got = guard_view(self.guard)
        wrong = [k for k in want if got[k] != want[k]]
        assert not wrong, f"guard {', '.join(wrong)}: {got}\nexpected {want}\n{where}"
        for p in range(e.position + 2):
            assert self.guard.should_skip(p) == any(a <= p <= b for a, b in e.windows), p


def resume_in_this_process(setup: str, checkpoint: str, script: str, out: str) -> None:
    """Continue a program from a checkpoint file in a new process, checking every operation
    against its twin, and write the guarded run's final states to ``out``."""
    torch.set_num_threads(1)
    with open(checkpoint, "rb") as f:
        saved = torch.load(f, weights_only=False)
    p = Program.resumed(eval(setup, {"Setup": Setup}), saved).run(script)  # the repr of a Setup
    torch.save({"model": p.guarded.model.state_dict(), "opt": optimizer_state(p.guarded.opt)}, out)
