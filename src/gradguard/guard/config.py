"""CONFIG: what a :class:`~gradguard.guard.guard.Guard` is told, checked before it is built.

Everything a guard will call later is validated here, when it is built, so that a wrong
argument raises a clear ``TypeError``/``ValueError`` naming it before any step is applied.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from gradguard.core import validate as _validate
from gradguard.core.fuse import check_mode
from gradguard.decide.detect import Detector, NonFiniteDetector
from gradguard.decide.policies import ClipPolicy
from gradguard.guard.response import DEFAULT_LADDER, Budgets, check_ladder

__all__ = [
    "SYNC_MODES",
    "GuardConfig",
    "check_objects",
    "check_state",
    "has_state",
    "is_fused",
    "sync_free",
]

SYNC_MODES = ("auto", "step", "lazy")


@dataclass
class GuardConfig:
    """How a :class:`Guard` measures, decides and responds.

    Attributes:
        policy: the clipping policy (``None``:
            :func:`gradguard.guard.defaults.default_policy`).
        detectors: detectors (``None``: :func:`gradguard.guard.defaults.default_detectors`).
            Non-finite checks are built in; a :class:`~gradguard.decide.detect.NonFiniteDetector`
            given here replaces the built-in rule.
        responses: ladder per signal, keyed ``"name:signal"`` (``"spike:loss"``), ``name``
            (``"spike"``) or ``"nonfinite"``; e.g. ``{"spike:loss": ("skip", "rollback")}``.
        default_response: the ladder of a signal not in ``responses`` whose detector declares
            no ``default_response`` of its own (vanishing and update-ratio detectors: log).
        budgets: when a rung escalates (:class:`~gradguard.guard.response.Budgets`).
        backoff_factor: LR multiplier of a ``"backoff"`` response, in (0, 1).
        snapshot_every: take a snapshot every this many steps (0: never; then ``"rollback"``
            escalates past itself). The first one is taken at the first step, from the objects
            as they are then (a checkpoint loaded after the guard was built is in it), and again
            whenever the optimizer's parameter groups change (``add_param_group``). Not on a
            ``snapshot_dir`` that already holds snapshots, see below.
        snapshot_dir: write snapshots there (atomic, checksummed) instead of CPU memory. Under
            ``torch.distributed`` each rank writes and reads its own ``-rank<r>`` files. A
            directory that already holds snapshots is left untouched: call
            :meth:`Guard.resume` to continue that run; stepping without it raises.
        keep_snapshots: how many snapshots to keep.
        skip_before: widen a bad window by this many positions before the flagged batches on a
            rollback (PaLM skipped a few hundred batches around a spike).
        skip_after: widen it by this many positions after them.
        norm_type: the norm measured and clipped.
        sync: ``"auto"`` (``"lazy"`` for fused optimizers, else ``"step"``), ``"step"`` (decide
            on the host every step) or ``"lazy"`` (fused optimizers only: no sync on a clean step).
        record_layers: put per-parameter gradient norms in each step row.
        flush_every: steps between record flushes (for the default recorder).
        foreach: torch's foreach flag for norms and clipping.
        compile: run the policy's and the detectors' per-step arithmetic as compiled kernels
            (``torch.compile``, one fused kernel per rule instead of a dozen tiny ones):
            ``None`` on CUDA only (where each tiny kernel is a launch), ``True`` on any device,
            ``False`` never. The decisions are the same, bit for bit; the first guarded step
            of a process compiles (seconds), and a compiler failure falls back to eager.
        keep_buffers: put module buffers (BatchNorm running statistics) back on a skipped step.
        incident_dir: write an incident bundle there for each incident whose action is in
            ``incident_actions`` (``None``: none), replayable with :func:`gradguard.replay`
            (docs/replay.md). Pass the batch to :meth:`Guard.step` so the bundle holds it.
        incident_actions: the actions that write a bundle.
        incident_max: at most this many bundles per run.
        incident_history: the bundle keeps this many earlier step rows.

    Example:
        >>> config = GuardConfig(snapshot_every=100, budgets=Budgets(skip=4))
        >>> guard = Guard(model, optimizer, config=config)
    """

    policy: ClipPolicy | None = None
    detectors: Sequence[Detector] | None = None
    responses: Mapping[str, Any] = field(default_factory=dict)
    default_response: tuple[str, ...] = DEFAULT_LADDER
    budgets: Budgets = field(default_factory=Budgets)
    backoff_factor: float = 0.5
    snapshot_every: int = 0
    snapshot_dir: str | None = None
    keep_snapshots: int = 2
    skip_before: int = 0
    skip_after: int = 0
    norm_type: float = 2.0
    sync: str = "auto"
    record_layers: bool = True
    flush_every: int = 50
    foreach: bool | None = None
    compile: bool | None = None
    keep_buffers: bool = True
    incident_dir: str | None = None
    incident_actions: tuple[str, ...] = ("skip", "rollback", "abort")
    incident_max: int = 20
    incident_history: int = 16

    def __post_init__(self) -> None:
        if self.policy is not None and not isinstance(self.policy, ClipPolicy):
            raise TypeError(f"policy must be a ClipPolicy, got {type(self.policy).__name__}")
        if self.detectors is not None:
            for i, d in enumerate(self.detectors):
                if not isinstance(d, Detector):
                    raise TypeError(f"detectors[{i}] must be a Detector, got {type(d).__name__}")
            if sum(isinstance(d, NonFiniteDetector) for d in self.detectors) > 1:
                raise ValueError("detectors: at most one NonFiniteDetector")
        if not isinstance(self.responses, Mapping):
            raise TypeError("responses must be a mapping of signal name to a tuple of actions")
        self.responses = {str(k): check_ladder(str(k), v) for k, v in self.responses.items()}
        self.default_response = check_ladder("default_response", self.default_response)
        if not isinstance(self.budgets, Budgets):
            raise TypeError(f"budgets must be a Budgets, got {type(self.budgets).__name__}")
        f = _validate.as_float("backoff_factor", self.backoff_factor)
        if not 0.0 < f < 1.0:
            raise ValueError(f"backoff_factor must be in (0, 1), got {f!r}")
        for name in ("snapshot_every", "skip_before", "skip_after"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an int >= 0, got {v!r}")
        for name in ("keep_snapshots", "flush_every", "incident_max", "incident_history"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        self.norm_type = _validate.norm_type(self.norm_type)
        if self.sync not in SYNC_MODES:
            raise ValueError(f"sync must be one of {SYNC_MODES}, got {self.sync!r}")
        for name in ("record_layers", "keep_buffers"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool")
        _validate.foreach_flag(self.foreach)
        check_mode("compile", self.compile)
        if self.incident_dir is not None and not isinstance(self.incident_dir, (str, os.PathLike)):
            raise TypeError("incident_dir must be a path or None")
        self.incident_actions = tuple(self.incident_actions)
        for a in self.incident_actions:
            if a not in ("skip", "backoff", "rollback", "abort"):
                raise ValueError(
                    f"incident_actions: {a!r} is not one of skip, backoff, rollback, abort"
                )


def check_objects(
    model: Any,
    optimizer: Any,
    scheduler: Any,
    scaler: Any,
    config: GuardConfig | None,
    recorder: Any = None,
) -> GuardConfig:
    """Raise ``TypeError``/``ValueError`` unless a guard can call every object it is given.

    Returns:
        The config (``GuardConfig()`` for ``None``).
    """
    from gradguard.records.recorder import Recorder

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    config = GuardConfig() if config is None else config
    if not isinstance(config, GuardConfig):
        raise TypeError(f"config must be a GuardConfig, got {type(config).__name__}")
    if recorder is not None and not isinstance(recorder, Recorder):
        raise TypeError(f"recorder must be a Recorder, got {type(recorder).__name__}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
        )
    if isinstance(optimizer, torch.optim.LBFGS):
        raise TypeError(
            "optimizer: LBFGS re-evaluates the loss through a closure inside step(), which a "
            "guard cannot measure before the update; guard a first-order optimizer instead"
        )
    if scheduler is not None:
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            raise TypeError(
                "scheduler: ReduceLROnPlateau steps on a validation metric (usually once per "
                "epoch); do not pass it to the Guard, call scheduler.step(val_loss) yourself"
            )
        step = getattr(scheduler, "step", None)
        if not callable(step):
            raise TypeError("scheduler must be an LR scheduler (with a step() method) or None")
        required = [
            p
            for p in inspect.signature(step).parameters.values()
            if p.default is inspect.Parameter.empty
            and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        if required:
            raise TypeError(
                f"scheduler: its step() needs arguments ({', '.join(p.name for p in required)}); "
                "the guard calls step() with none: step it yourself"
            )
        needs = [
            why
            for why, on in (
                ("snapshot_every", config.snapshot_every > 0),
                ("incident_dir", config.incident_dir is not None),
                ("sync='lazy'", config.sync == "lazy"),
            )
            if on
        ]
        if needs and not has_state(scheduler):
            raise TypeError(
                f"scheduler: {type(scheduler).__name__} has no state_dict()/load_state_dict(), "
                f"which {', '.join(needs)} needs (the guard saves and restores the scheduler); "
                "add them, or leave those options off"
            )
    if scaler is not None and not callable(getattr(scaler, "unscale_", None)):
        raise TypeError("scaler must be a torch.amp.GradScaler or None")
    if config.sync == "lazy" and not is_fused(optimizer):
        raise ValueError(
            "sync='lazy' needs a fused optimizer (fused=True Adam, AdamW or SGD), which "
            "skips a step on the device; use sync='auto' or 'step'"
        )
    return config


def has_state(obj: Any) -> bool:
    """Whether ``obj`` can be saved and restored (``state_dict`` and ``load_state_dict``)."""
    return callable(getattr(obj, "state_dict", None)) and callable(
        getattr(obj, "load_state_dict", None)
    )


def is_fused(optimizer: torch.optim.Optimizer) -> bool:
    """The optimizer, as its parameter groups are now, steps every group in a fused kernel that
    skips on ``found_inf`` (torch's fused Adam, AdamW and SGD)."""
    # Every group: a non-fused group asserts that found_inf is unset (after a checkpoint
    # that turned 'fused' off, an added group keeps the optimizer's own default).
    groups = optimizer.param_groups
    return (
        bool(getattr(optimizer, "_step_supports_amp_scaling", False))
        and bool(groups)
        and all(g.get("fused", False) for g in groups)
    )


def sync_free(optimizer: Any, scheduler: Any, scaler: Any, sync: str, plain: bool) -> bool:
    """Whether a step goes the sync-free route (the device decides; the host reads the flags
    later), read from the objects as they are now.

    Raises:
        ValueError: ``sync='lazy'`` and the optimizer is not fused (any more).
    """
    fused = is_fused(optimizer)
    if sync == "lazy" and not fused:
        raise ValueError(
            "sync='lazy' needs a fused optimizer, and the optimizer's param groups are not "
            "fused now (a loaded checkpoint sets 'fused' too); use sync='auto'"
        )
    if not fused or sync == "step":
        return False
    if scheduler is not None and not has_state(scheduler):
        return False  # the scheduler cannot be put back: decide on the host first
    # Fused SGD with momentum creates a parameter's momentum buffer uninitialized at its first
    # step and fills it in the kernel: a first step skipped on the device would leave it so.
    # That step is decided on the host.
    for g in optimizer.param_groups:
        if g.get("fused") and g.get("momentum", 0) and isinstance(optimizer, torch.optim.SGD):
            state = optimizer.state
            if any(p.grad is not None and "momentum_buffer" not in state.get(p, {})
                   for p in g["params"]):  # fmt: skip
                return False
    amp = scaler is not None and scaler.is_enabled()
    return plain or (scheduler is None and not amp)


def check_state(state: Any, version: int, detectors: int) -> None:
    """Raise ``TypeError``/``ValueError`` unless ``state`` is a guard's ``state_dict()`` that a
    guard with ``detectors`` detectors reads (the signal layout is the responder's check)."""
    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict, got {type(state).__name__}")
    need = ["version", "step", "position", "policy", "detectors", "keys", "streak_start"]
    need += ["counters", "skip_list", "recorder"]
    missing = [k for k in need if k not in state]
    if missing:
        raise ValueError(f"Guard.load_state_dict: state lacks keys {missing}")
    if int(state["version"]) > version:
        raise ValueError(f"guard state version {state['version']} is newer than supported")
    if len(state["detectors"]) != detectors:
        raise ValueError(
            f"Guard.load_state_dict: the state has {len(state['detectors'])} detectors, this "
            f"guard {detectors}; build it with the same detectors"
        )
