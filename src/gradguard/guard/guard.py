"""Guard: measure -> detect -> decide -> act -> record, once per optimizer step.

The guard wires functional pieces together; each is testable on its own:
:func:`gradguard.core.norms.grad_norms` measures, a :class:`~gradguard.decide.policies.ClipPolicy`
clips (``policy.clip_``), :class:`~gradguard.decide.detect.Detector` objects flag bad steps, a
:class:`~gradguard.guard.response.Responder` owns the flag layout, ladders, budgets and reasons,
:mod:`gradguard.guard.skip` keeps what a skipped step must not change,
:mod:`gradguard.core.snapshot` restores snapshots, and a
:class:`~gradguard.records.recorder.Recorder` keeps numbers on the device.

Plain loop (``guard.step`` replaces ``optimizer.step()``, ``scheduler.step()`` and, under AMP,
``scaler.step()``/``scaler.update()``)::

    guard = gradguard.Guard(model, optimizer, scheduler=scheduler, scaler=scaler)
    for batch in loader:
        loss = compute_loss(model, batch)
        scaler.scale(loss).backward()           # or loss.backward()
        report = guard.step(loss)
        optimizer.zero_grad(set_to_none=True)

A step is a small stage machine (:class:`Stage`, like GradScaler's ``OptState``):
``READY -> ARMED`` (:meth:`Guard.before_optimizer_step`: unscale, measure, detect, agree, clip,
learn, and decide or hand the decision to the device) ``-> READY``
(:meth:`Guard.after_optimizer_step`: undo the arming, settle buffers and the scaler, count the
step, snapshot). A batch computed before a rollback passes through ``DROPPED`` instead of
``ARMED``. Calls out of order raise.

Where the host waits for the device (documented, tested):

* Fused Adam/AdamW/SGD (``fused=True``), the default ``sync="auto"``: **no sync on a clean
  step**. The skip flag goes to the optimizer as ``optimizer.found_inf`` (the tensor AMP's
  GradScaler uses), so a skipped step is skipped inside the fused kernel; module buffers are put
  back with ``torch.where``. The flag bits are copied to pinned host memory and read when the
  next step starts; that read logs the row and runs the rare host-side responses (LR back-off,
  rollback, abort) one step late. The LR scheduler steps at once on the guess that the step was
  applied; a skip found by the read puts the scheduler and every param-group hyperparameter
  back before they are used. On the CPU the bits are host memory already: the step settles at
  its end. ``optimizer.state_dict()``/``model.state_dict()`` settle a pending step (reading it,
  never starting a collective, so one rank may checkpoint alone); :meth:`Guard.settle` does so
  explicitly (call it before saving ``scheduler.state_dict()`` on a GPU).
* Other optimizers (``sync="step"``): one sync per step on the flag vector (a few bytes), to
  decide whether to call ``optimizer.step()`` at all.
* Record flushes (every ``flush_every`` steps, one transfer), snapshots (every
  ``snapshot_every`` steps, a device-to-host copy of the state) and incidents.

AMP: an inf/NaN gradient under an enabled GradScaler is the scaler's business, not a spike: the
step is skipped (reason ``"amp_overflow"``), the scaler lowers its scale, no budget is spent and
no statistic learns from it. A non-finite *loss* is still an incident. A finite step the guard
skips does not count toward the scaler's growth.

Gradient accumulation: call ``guard.step`` once per optimizer step, after the last
micro-batch's backward; it acts on the accumulated gradient.

Frameworks that call ``optimizer.step()`` themselves (Lightning, HF) call
:meth:`Guard.before_optimizer_step` where the gradients are final and
:meth:`Guard.after_optimizer_step` after the step. On a skip the framework's
``optimizer.step()`` becomes a no-op (``found_inf`` for fused optimizers, else the gradients are
set to ``None``, which every torch optimizer skips) and so does its next ``scheduler.step()``.
"""

from __future__ import annotations

import collections
import enum
import inspect
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from gradguard.core import distributed as _distributed
from gradguard.core import validate as _validate
from gradguard.core.norms import grad_norms
from gradguard.core.snapshot import (
    SnapshotError,
    SnapshotStore,
    capture,
    forward_rng_state,
    load_snapshot,
    restore,
)
from gradguard.decide.detect import (
    Detection,
    Detector,
    NonFiniteDetector,
    Signals,
)
from gradguard.decide.policies import ClipPolicy
from gradguard.guard import skip as _skip
from gradguard.guard.defaults import default_detectors, default_policy
from gradguard.guard.incident import IncidentWriter
from gradguard.guard.response import (
    DEFAULT_LADDER,
    Budgets,
    Counters,
    GuardAbort,
    Responder,
    Verdict,
    check_ladder,
)
from gradguard.guard.rollback import SkipList, SkipSampler
from gradguard.records.bundle import BundleSpec
from gradguard.records.recorder import Named, Recorder, _gather

__all__ = ["Guard", "GuardAbort", "GuardConfig", "Stage", "StepReport"]

STATE_VERSION = 2
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
            escalates past itself). A snapshot is also taken when the guard is created (not on a
            ``snapshot_dir`` that already holds snapshots, see below).
        snapshot_dir: write snapshots there (atomic, checksummed) instead of CPU memory. Under
            ``torch.distributed`` each rank writes and reads its own ``-rank<r>`` files. A
            directory that already holds snapshots is left untouched: call
            :meth:`Guard.resume` to continue that run; stepping without it raises.
        keep_snapshots: how many snapshots to keep.
        skip_before, skip_after: widen the skipped window around the flagged batches on a
            rollback (PaLM skipped a few hundred batches around a spike).
        norm_type: the norm measured and clipped.
        sync: ``"auto"`` (``"lazy"`` for fused optimizers, else ``"step"``), ``"step"`` (decide
            on the host every step) or ``"lazy"`` (fused optimizers only: no sync on a clean step).
        record_layers: put per-parameter gradient norms in each step row.
        flush_every: steps between record flushes (for the default recorder).
        foreach: torch's foreach flag for norms and clipping.
        keep_buffers: put module buffers (BatchNorm running statistics) back on a skipped step.
        incident_dir: write an incident bundle there for each incident whose action is in
            ``incident_actions`` (``None``: none), replayable with :func:`gradguard.replay`
            (docs/replay.md). Pass the batch to :meth:`Guard.step` so the bundle holds it.
        incident_actions: the actions that write a bundle.
        incident_max: at most this many bundles per run.
        incident_history: the bundle keeps this many earlier step rows.
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
        if self.incident_dir is not None and not isinstance(self.incident_dir, (str, os.PathLike)):
            raise TypeError("incident_dir must be a path or None")
        self.incident_actions = tuple(self.incident_actions)
        for a in self.incident_actions:
            if a not in ("skip", "backoff", "rollback", "abort"):
                raise ValueError(
                    f"incident_actions: {a!r} is not one of skip, backoff, rollback, abort"
                )


class Stage(enum.Enum):
    """Where a guard is in its step (see the module docstring)."""

    READY = "ready"  # between optimizer steps
    ARMED = "armed"  # measured and decided (or handed to the device); the optimizer step is next
    DROPPED = "dropped"  # a batch computed before a rollback: nothing applied, nothing counted
    NEEDS_RESUME = "needs_resume"  # snapshot_dir holds an earlier run: resume() first


class StepReport:
    """What the guard did on one step. Tensors stay on the device; host values are read lazily.

    Attributes:
        step: the guard's step index (optimizer steps the guard has counted).
        position: the data position (batch index) of this step; it differs from ``step``
            after rollbacks (the bad window is skipped) and :meth:`Guard.drop_batch`.
        total_norm: pre-clip total gradient norm (0-dim fp32).
        clipped_norm: post-clip total norm.
        threshold: the policy's threshold (``inf``: no clipping).
        finite: 0-dim bool, all gradients finite.
    """

    def __init__(
        self,
        step: int,
        position: int,
        total_norm: Tensor,
        clipped_norm: Tensor,
        threshold: Tensor,
        finite: Tensor,
        settle: Callable[[], Any],
        verdict: Verdict | None = None,
    ) -> None:
        self.step = step
        self.position = position
        self.total_norm = total_norm
        self.clipped_norm = clipped_norm
        self.threshold = threshold
        self.finite = finite
        self._settle = settle
        self.verdict = verdict

    def _ensure(self) -> Verdict:
        if self.verdict is None:
            self._settle()
        assert self.verdict is not None
        return self.verdict

    @property
    def action(self) -> str:
        """``"step"``, ``"clip"``, ``"log"``, ``"skip"``, ``"backoff"``, ``"rollback"`` or
        ``"abort"`` (reading it may wait for the device: see the module docstring)."""
        return self._ensure().action

    @property
    def reason(self) -> str:
        """Why, in words (empty for a clean step)."""
        return self._ensure().reason

    @property
    def signal(self) -> str:
        """The signal that decided the action (``""`` for a clean step)."""
        return self._ensure().signal

    @property
    def skipped(self) -> bool:
        """True when the step was not applied."""
        return self._ensure().skipped

    def to_dict(self) -> dict[str, Any]:
        """Host values (one transfer): step, position, norms, threshold, finite, action, reason."""
        v = self._ensure()
        vals = torch.stack(
            [
                t.detach().reshape(()).double().cpu()
                for t in (self.total_norm, self.clipped_norm, self.threshold, self.finite)
            ]
        ).tolist()
        return {
            "step": self.step,
            "position": self.position,
            "total_norm": vals[0],
            "clipped_norm": vals[1],
            "threshold": vals[2],
            "finite": bool(vals[3]),
            "action": v.action,
            "reason": v.reason,
            "signal": v.signal,
        }

    def __repr__(self) -> str:
        state = self.verdict.action if self.verdict is not None else "pending"
        reason = self.verdict.reason if self.verdict is not None else ""
        return f"StepReport(step={self.step}, action={state!r}, reason={reason!r})"


@dataclass
class _Step:
    """One guarded step, from measurement until its verdict has been carried out."""

    step: int
    position: int
    flags: Tensor  # Responder.flags layout, agreed across ranks, on the device
    skip: Tensor  # 0-dim bool on the device: the step must not be applied
    host: Tensor  # the flag bits in host memory (a pinned copy in flight on CUDA)
    event: Any
    row: dict[str, Any]
    scores: list[Tensor]
    report: StepReport
    lazy: bool  # the device decides (found_inf); the host reads the bits later
    plain: bool  # inside guard.step: the guard steps the optimizer and the scheduler itself
    amp_overflow: Tensor
    bits: list[bool] | None = None
    undo: _skip.GroupState | None = None  # hyperparameters before a guessed scheduler step
    verdict: Verdict | None = None
    unscaled: bool = False  # this guard unscaled and owes the scaler an update()
    batch: Any = None  # a reference, kept for an incident bundle
    rng: Any = None  # the RNG state before this step's forward (incident bundles only)

    def to_state(self) -> dict[str, Any] | None:
        """A settled step whose verdict is not carried out yet, as plain values (a checkpoint
        taken between the read and the act keeps it for the loaded guard)."""
        if self.bits is None:
            return None
        host = _gather([dict(self.row)])[0]
        scores = torch.stack([t.float() for t in self.scores]).tolist() if self.scores else []
        return {
            "step": self.step,
            "position": self.position,
            "bits": [bool(b) for b in self.bits],
            "scores": [float(x) for x in scores],
            "row": {k: v for k, v in host.items() if k not in ("v", "kind", "step")},
        }

    @classmethod
    def from_state(cls, p: dict[str, Any]) -> _Step:
        """The step :meth:`to_state` described (no tensors on a device: it is acted on only)."""
        return _pending_from_state(cls, p)


def _pending_from_state(cls: type[_Step], p: dict[str, Any]) -> _Step:
    nan, one = torch.full((), math.nan), torch.ones((), dtype=torch.bool)
    step, position = int(p["step"]), int(p["position"])
    return cls(
        step, position, nan, one, nan, None, dict(p["row"]),
        [torch.tensor(float(x)) for x in p["scores"]],
        StepReport(step, position, nan, nan, nan, one, lambda: None),
        lazy=True, plain=True, amp_overflow=torch.zeros((), dtype=torch.bool),
        bits=[bool(b) for b in p["bits"]],
    )  # fmt: skip


def _to_host(flags: Tensor) -> tuple[Tensor, Any]:
    """Start moving the flag bits to host memory without waiting for them (CUDA: a pinned
    non-blocking copy and an event; the CPU: host memory already)."""
    bits = (flags > 0).to(torch.uint8)
    if bits.device.type == "cuda":
        host = torch.empty(bits.shape, dtype=torch.uint8, pin_memory=True)
        host.copy_(bits, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return host, event
    return bits.to("cpu"), None


def _read_bits(host: Tensor, event: Any) -> list[bool]:
    if event is not None:
        # Waits for the step that produced the flags, not for the work queued since.
        event.synchronize()
    # The bytes are in host memory: reading the storage does not touch the device.
    return [b != 0 for b in host.untyped_storage().tolist()[: host.numel()]]


def _is_fused(optimizer: torch.optim.Optimizer) -> bool:
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False)) and any(
        g.get("fused", False) for g in optimizer.param_groups
    )


def _check_objects(optimizer: Any, scheduler: Any, scaler: Any) -> None:
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
    if scaler is not None and not callable(getattr(scaler, "unscale_", None)):
        raise TypeError("scaler must be a torch.amp.GradScaler or None")


def _dense_view(p: Tensor) -> Tensor:
    """The gradient as a dense tensor to measure and clip in place: a sparse gradient
    (``nn.Embedding(sparse=True)``) is coalesced and its values (a view) stand for it."""
    g = p.grad
    assert g is not None
    if g.layout is torch.sparse_coo:
        if not g.is_coalesced():
            p.grad = g = g.coalesce()
        return g.values()
    return g


def _loss_tensor(loss: Tensor | float | None, device: torch.device) -> Tensor | None:
    if loss is None:
        return None
    if isinstance(loss, Tensor):
        if loss.numel() != 1:
            raise ValueError(
                f"loss must be a single value (a 0-dim tensor or a float), got shape "
                f"{tuple(loss.shape)}: reduce a per-sample loss first (loss.mean())"
            )
        return loss.detach().reshape(()).float()
    if isinstance(loss, bool) or not isinstance(loss, (int, float)):
        raise TypeError(f"loss must be a Tensor, a float or None, got {type(loss).__name__}")
    return torch.tensor(float(loss), device=device)


class Guard:
    """Keep a training run safe: clip adaptively, skip or roll back bad steps, record it all.

    Args:
        model: the module being trained (its named parameters name the records' layers and
            its buffers are kept on a skip).
        optimizer: its optimizer. Every parameter it updates is measured, clipped and skipped,
            also ones the model does not own. Fused Adam/AdamW/SGD skip with no host sync.
        scheduler: an LR scheduler the guard advances only on applied steps.
        scaler: a ``torch.amp.GradScaler``: the guard unscales before measuring.
        config: :class:`GuardConfig` (``None``: defaults).
        recorder: where rows go (``None``: a :class:`~gradguard.records.recorder.Recorder` kept in
            memory, ``guard.records``).
        process_group: the group whose ranks must agree (``None``: the default group when
            torch.distributed is initialized).

    Raises:
        TypeError: an object of the wrong kind, LBFGS, ReduceLROnPlateau.

    Example:
        >>> guard = Guard(model, optimizer, scheduler)
        >>> loss.backward(); report = guard.step(loss); optimizer.zero_grad()
        >>> report.action
        'step'
    """

    # The device-to-host move of the flag bits (a seam: tests make the CPU read them late).
    _to_host = staticmethod(_to_host)

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any = None,
        scaler: Any = None,
        config: GuardConfig | None = None,
        recorder: Recorder | None = None,
        process_group: Any = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        _check_objects(optimizer, scheduler, scaler)
        config = GuardConfig() if config is None else config
        if not isinstance(config, GuardConfig):
            raise TypeError(f"config must be a GuardConfig, got {type(config).__name__}")
        if recorder is not None and not isinstance(recorder, Recorder):
            raise TypeError(f"recorder must be a Recorder, got {type(recorder).__name__}")
        self.fused = _is_fused(optimizer)
        if config.sync == "lazy" and not self.fused:
            raise ValueError(
                "sync='lazy' needs a fused optimizer (fused=True Adam, AdamW or SGD), which "
                "skips a step on the device; use sync='auto' or 'step'"
            )
        self.model, self.optimizer, self.scheduler, self.scaler = (
            model,
            optimizer,
            scheduler,
            scaler,
        )
        self.config = config
        self.process_group = process_group
        self.recorder = (
            recorder if recorder is not None else Recorder(flush_every=config.flush_every)
        )
        self.policy: ClipPolicy = config.policy if config.policy is not None else default_policy()
        detectors = list(config.detectors) if config.detectors is not None else default_detectors()
        nonfinite = [d for d in detectors if isinstance(d, NonFiniteDetector)]
        self.nonfinite_rule: NonFiniteDetector | None = nonfinite[0] if nonfinite else None
        self.detectors = [d for d in detectors if not isinstance(d, NonFiniteDetector)]
        self.responder = Responder(
            self.detectors,
            config.responses,
            config.default_response,
            config.budgets,
            config.backoff_factor,
        )
        self.lazy = self.fused and config.sync in ("auto", "lazy")
        self.skip_list = SkipList()
        self.snapshots = SnapshotStore(config.snapshot_dir, config.keep_snapshots)
        self.buffers = _skip.BufferKeeper(model) if config.keep_buffers else None
        self.lr_scale = _skip.LRScale()
        self.step_count = 0
        self.position = 0
        self.streak_start = 0
        self.stage = Stage.READY
        self._current: _Step | None = None  # armed, between before and after
        self._unread: _Step | None = None  # lazy: applied on the device, bits not read yet
        self._unacted: _Step | None = None  # bits read (settled), verdict not carried out yet
        self._step_hooks: list[Callable[[StepReport], None]] = []
        self._disarm: list[Callable[[], None]] = []  # undone after the optimizer step
        self._hook_states: list[Any] = []  # what step hooks keep (an EMA): in snapshots
        self._post_hooks: list[Callable[[StepReport, Tensor], None]] = []
        self._names: dict[int, str] = {}
        self.incidents = (
            IncidentWriter(
                config.incident_dir, config.incident_actions, max_count=config.incident_max
            )
            if config.incident_dir is not None
            else None
        )
        self._history: collections.deque[dict[str, Any]] = collections.deque(
            maxlen=config.incident_history
        )
        self._rng = forward_rng_state() if self.incidents is not None else None
        if self.lazy:
            # A checkpoint must not catch a step whose flags the host has not read yet. Settling
            # only reads and undoes a scheduler guess: no collective, so one rank may save alone.
            optimizer.register_state_dict_pre_hook(lambda _opt: self.settle())
            hook = getattr(model, "register_state_dict_pre_hook", None)
            if callable(hook):
                hook(lambda *_: self.settle())
            if scheduler is not None:
                _skip.settle_on_read(scheduler, self.settle)
        # Snapshots of an earlier run in snapshot_dir: keep them until resume() (or
        # load_state_dict()) continues that run; a fresh first step raises instead.
        self._earlier_run = (
            [f for _, f in self.snapshots.on_disk()] if config.snapshot_every else []
        )
        if self._earlier_run:
            self.stage = Stage.NEEDS_RESUME
        elif config.snapshot_every:
            self.snapshot()

    # ------------------------------------------------------------------ public helpers

    @property
    def counters(self) -> Counters:
        """What the ladder has spent (skips, back-offs, rollbacks, AMP skips, current streak)."""
        return self.responder.counters

    @property
    def keys(self) -> list[str]:
        """The signals, in flag order: ``amp_overflow``, ``nonfinite``, then the detectors'."""
        return self.responder.keys

    @property
    def ladders(self) -> dict[str, tuple[str, ...]]:
        """The ladder of each signal."""
        return self.responder.ladders

    @property
    def records(self) -> list[dict[str, Any]]:
        """Every row so far (settles the pending step and flushes first: a host sync)."""
        self.flush()
        return self.recorder.rows

    def should_skip(self, batch_index: int) -> bool:
        """True when ``batch_index`` lies in a bad window found by a rollback (skip it)."""
        return self.skip_list.contains(batch_index)

    def drop_batch(self) -> int:
        """Move the data position past a batch the loop dropped without a step.

        Returns:
            The new position (bad windows are skipped as usual).
        """
        self.position = self.skip_list.next_allowed(self.position + 1)
        return self.position

    def skip_sampler(self, sampler: Any, per_step: int = 1) -> SkipSampler:
        """Wrap a (batch) sampler so that it yields the batch of :attr:`position`, every time.

        After a rollback it replays from the snapshot's position and leaves out the bad window,
        exactly like the position-driven loop. ``per_step`` items make one optimizer step
        (gradient accumulation). Exact with ``num_workers=0``; with worker processes the
        DataLoader asks for batches ahead of the guard's decisions (see docs/guard.md).
        """
        return SkipSampler(
            sampler,
            self.should_skip,
            per_step=per_step,
            position=lambda: self.position,
            drop=self.drop_batch,
            version=lambda: len(self.skip_list.windows),
        )

    def register_step_hook(
        self, hook: Callable[[StepReport], None], state: Any = None
    ) -> Callable[[], None]:
        """Call ``hook(report)`` once for every applied step, with the weights of that step.

        For an EMA of the weights (``torch.optim.swa_utils.AveragedModel``) that must never see
        a skipped step: ``guard.register_step_hook(lambda r: ema.update_parameters(model))``.
        In the sync-free (fused) mode the hook runs when the step's flags are read, at the start
        of the next step, before that step changes the weights.

        Args:
            hook: ``hook(report)``, called once per applied step.
            state: what the hook keeps (``ema``: anything with ``state_dict``/
                ``load_state_dict``). Snapshots hold it and a rollback restores it, so steps a
                rollback undid leave no trace in it either.

        Returns:
            A function that removes the hook.
        """
        if not callable(hook):
            raise TypeError("hook must be callable")
        if state is not None and not callable(getattr(state, "load_state_dict", None)):
            raise TypeError("state must have state_dict() and load_state_dict(), or be None")
        self._step_hooks.append(hook)
        if state is not None:
            self._hook_states.append(state)
            if self.config.snapshot_every and self.step_count == 0 and not self._earlier_run:
                self.snapshots.clear()  # the first snapshot holds the hook's state too
                self._push_snapshot(0, self.position)

        def remove() -> None:
            if hook in self._step_hooks:
                self._step_hooks.remove(hook)
            if state is not None and state in self._hook_states:
                self._hook_states.remove(state)

        return remove

    def register_post_step_hook(
        self, hook: Callable[[StepReport, Tensor], None]
    ) -> Callable[[], None]:
        """Call ``hook(report, applied)`` right after every optimizer step, applied or not.

        ``applied`` is a 0-dim bool tensor on the device (no host read in the sync-free mode):
        a hook that changes the weights, such as QK-clip
        (:class:`gradguard.insight.transformer_remedies.QKClip`, Kimi K2's MuonClip, arXiv
        2507.20534), uses it with ``torch.where`` and so leaves a skipped step as it was. It runs
        before a due snapshot, in every sync mode, and not for a batch dropped by a rollback.

        Returns:
            A function that removes the hook.

        Example:
            >>> guard.register_post_step_hook(QKClip(telemetry, tau=100.0))
        """
        if not callable(hook):
            raise TypeError("hook must be callable")
        self._post_hooks.append(hook)
        return lambda: self._post_hooks.remove(hook) if hook in self._post_hooks else None

    def snapshot(self) -> None:
        """Take a snapshot now (settling the pending step first: one host sync)."""
        self._finish_pending()
        self._push_snapshot(self.step_count, self.position)

    def _push_snapshot(self, step: int, position: int) -> None:
        guard = {**self._snapshot_state(), "step": step, "position": position}
        guard["hook_states"] = [h.state_dict() for h in self._hook_states]
        self.snapshots.push(
            capture(
                self.model,
                self.optimizer,
                self.scheduler,
                self.scaler,
                step=step,
                position=position,
                guard=guard,
            )
        )

    def resume(self, snapshot: dict[str, Any] | str | Any = None) -> int:
        """Continue a run that stopped (a crash, a kill): restore everything from a snapshot.

        Model, optimizer, scheduler, scaler, RNGs and the guard (policy, detectors, counters,
        skip list, back-off, step and data position) go back to the snapshot, bit for bit.

        Args:
            snapshot: a snapshot dict, a snapshot file, or ``None``: the newest readable file in
                ``config.snapshot_dir`` (unreadable ones are skipped; see ``snapshots.errors``).

        Returns:
            The data position to continue at (``guard.position``).

        Raises:
            SnapshotError: no readable snapshot.

        Example:
            >>> guard = Guard(model, opt, config=GuardConfig(snapshot_every=100, snapshot_dir="ck"))
            >>> start = guard.resume()      # after a crash
        """
        self._forget_pending()
        if snapshot is None:
            self.snapshots.scan()
            snap = self._agreed(None)
            if snap is None:
                raise SnapshotError(
                    f"no readable snapshot in {self.config.snapshot_dir!r} "
                    f"({'; '.join(self.snapshots.errors) or 'none written'})"
                )
        elif isinstance(snapshot, dict):
            snap = snapshot
        else:
            snap = load_snapshot(snapshot)
        self._restore(snap, full=True)
        self._earlier_run = []
        self.stage = Stage.READY
        if self.config.snapshot_every and not self.snapshots.has():
            self.snapshot()  # something to roll back to before the next scheduled snapshot
        return self.position

    # ------------------------------------------------------------------ the step

    def step(self, loss: Tensor | float | None = None, batch: Any = None) -> StepReport:
        """Guard one optimizer step: replaces ``optimizer.step()`` and ``scheduler.step()``.

        Call it once per optimizer step, after the (last micro-batch's) backward.

        Args:
            loss: this step's loss, a single value (detached here; used by the loss detectors
                and the records).
            batch: this step's batch (a reference, never copied on a clean step): an incident
                bundle holds it (``config.incident_dir``).

        Returns:
            A :class:`StepReport`.

        Raises:
            GuardAbort: the ladder reached ``"abort"`` (the incident is in the records).
            ValueError: a loss that is not a single value (nothing changes).
        """
        report = self._before(loss, plain=True, batch=batch)
        if self.stage is Stage.ARMED:
            self._apply()
        self.after_optimizer_step()
        return report

    def before_optimizer_step(
        self, loss: Tensor | float | None = None, batch: Any = None
    ) -> StepReport:
        """For frameworks that call ``optimizer.step()`` themselves: everything up to the step.

        Unscales (AMP), measures, detects, decides and clips. When the step must not be applied
        the framework's next ``optimizer.step()`` and ``scheduler.step()`` become no-ops. Pair
        it with :meth:`after_optimizer_step`.

        Raises:
            RuntimeError: called twice without :meth:`after_optimizer_step` in between.
        """
        return self._before(loss, plain=False, batch=batch)

    def after_optimizer_step(self) -> None:
        """Undo the arming, settle buffers and scaler, count the step, snapshot when due.

        Raises:
            RuntimeError: no :meth:`before_optimizer_step` (or :meth:`step`) came first.
        """
        if self.stage not in (Stage.ARMED, Stage.DROPPED):
            raise RuntimeError(
                f"after_optimizer_step() in stage {self.stage.value!r}: call "
                "before_optimizer_step() (or use guard.step()) first"
            )
        s, self._current = self._current, None
        if self.incidents is not None:
            self._rng = forward_rng_state()  # the next forward starts from here
        for undo in self._disarm:
            undo()
        self._disarm.clear()
        self.lr_scale.restore()
        if self.stage is Stage.DROPPED or s is None:
            self.stage = Stage.READY
            return
        skipped: Tensor | bool = s.skip if s.verdict is None else s.verdict.skipped
        if s.unscaled:
            # The scaler's own overflow lowers its scale; any other skip leaves the scaler alone.
            nonfinite = s.flags[2] > 0
            guard_skip = (
                skipped if isinstance(skipped, bool) else skipped & (nonfinite | ~s.amp_overflow)
            )
            if isinstance(guard_skip, bool) and s.verdict is not None:
                guard_skip = guard_skip and s.verdict.signal != "amp_overflow"
            _skip.scaler_update(self.scaler, guard_skip, sync=s.verdict is not None)
        if self.buffers is not None:
            self.buffers.settle_(skipped)
        for d in self.detectors:
            after = getattr(d, "after", None)
            if callable(after) and callable(getattr(d, "before", None)):
                after(self.model)
        if self._post_hooks:
            applied = ~s.skip if s.verdict is None else torch.tensor(not s.verdict.skipped)
            for post in list(self._post_hooks):
                post(s.report, applied)
        self.stage = Stage.READY
        self.step_count += 1
        self.position = self.skip_list.next_allowed(self.position + 1)
        rolled_back = False
        if s.lazy:
            self._unread = s
            # On the CPU the bits are host memory already: reading them costs nothing. A report
            # read during the step has waited for them already.
            if s.verdict is not None or (s.event is None and s.host.device.type == "cpu"):
                rolled_back = self._finish_pending()
        elif s.verdict is not None and not s.verdict.skipped:
            self._run_hooks(s)
        every = self.config.snapshot_every
        due = every and not rolled_back and self.step_count % every == 0
        if due and not self._finish_pending():
            self.snapshot()

    def settle(self) -> None:
        """Read a pending (sync-free) step's flags and undo a wrong scheduler guess.

        Local to this process: never starts a collective, so one rank may call it alone (a
        checkpoint on rank 0). The verdict's actions run at the next guard call.
        """
        s = self._unread
        if s is None:
            return
        self._unread = None
        s.bits = _read_bits(s.host, s.event)
        if s.undo is not None and self.responder.skips_on_device(s.bits):
            s.undo.restore(self.optimizer, self.scheduler)
        self._unacted = s

    def flush(self) -> list[dict[str, Any]]:
        """Settle and act on the pending step, flush the records; returns the flushed rows."""
        self._finish_pending()
        return self.recorder.flush()

    # ------------------------------------------------------------------ measure .. decide

    def _before(self, loss: Tensor | float | None, plain: bool, batch: Any = None) -> StepReport:
        if self.stage is Stage.NEEDS_RESUME:
            raise ValueError(
                f"snapshot_dir {self.config.snapshot_dir!r} holds snapshots of an earlier run "
                f"({', '.join(f.name for f in self._earlier_run[-3:])}); call guard.resume() "
                "to continue it, or give this run an empty snapshot_dir (or delete the files)"
            )
        if self.stage is not Stage.READY:
            raise RuntimeError(
                f"before_optimizer_step() in stage {self.stage.value!r}: call "
                "after_optimizer_step() after each optimizer step"
            )
        params = self._params()
        device = params[0].device if params else torch.device("cpu")
        loss_t = _loss_tensor(loss, device)  # bad input raises before anything changes
        rolled_back = self._finish_pending()
        if rolled_back:
            return self._dropped(plain)
        s = self._measure(loss_t, params, plain)
        if self.incidents is not None:
            s.batch, s.rng = batch, self._rng
            self._history.append(s.row)
        self._current = s
        self.stage = Stage.ARMED
        for d in self.detectors:
            before = getattr(d, "before", None)
            if callable(before) and callable(getattr(d, "after", None)):
                before(self.model)
        if s.lazy:
            if not plain:
                _skip.arm_found_inf(self.optimizer, s.skip)
                self._disarm.append(lambda: _skip.disarm_found_inf(self.optimizer))
        else:
            s.bits = _read_bits(s.host, s.event)
            self._act(s)
            if s.verdict is not None and s.verdict.skipped and not plain:
                self._noop_framework_step()
            if self.stage is Stage.DROPPED:  # the verdict rolled back: nothing to apply
                return s.report
        if not plain and (s.lazy or not (s.verdict and s.verdict.skipped)):
            self.lr_scale.apply(self.optimizer)
        return s.report

    def _params(self) -> list[Tensor]:
        seen: set[int] = set()
        out = []
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        return out

    def _name(self, i: int, p: Tensor) -> str:
        name = self._names.get(id(p))
        if name is None:
            self._names = {id(q): n for n, q in self.model.named_parameters()}
            name = self._names.setdefault(id(p), f"optimizer.param.{i}")
        return name

    def _measure(self, loss_t: Tensor | None, params: list[Tensor], plain: bool) -> _Step:
        cfg = self.config
        if self.scaler is not None and self.scaler.is_enabled():
            unscaled = plain or not _skip.scaler_unscaled(self.scaler, self.optimizer)
            if unscaled:
                self.scaler.unscale_(self.optimizer)
        else:
            unscaled = False
        with torch.no_grad():
            live = [(i, p) for i, p in enumerate(params) if p.grad is not None]
            grads = [_dense_view(p) for _, p in live]
            names = [self._name(i, p) for i, p in live]
            norms = grad_norms(grads, cfg.norm_type, foreach=cfg.foreach)
            device = grads[0].device if grads else torch.device("cpu")
            total = norms.total.float()
            grads_ok = norms.finite
            loss_ok = (
                loss_t.isfinite().to(device)
                if loss_t is not None
                else torch.ones((), dtype=torch.bool, device=device)
            )
            amp = self.scaler is not None and self.scaler.is_enabled()
            signals = Signals(self.step_count, total, norms.per_tensor, names, grads_ok, loss_t)
            if self.nonfinite_rule is not None:
                bad = self.nonfinite_rule.check(signals).flag.to(device)
            else:
                bad = ~(grads_ok & loss_ok)
            # Under AMP, non-finite gradients are the loss scale's overflow, not an incident.
            amp_overflow = ~grads_ok if amp else torch.zeros_like(grads_ok)
            nonfinite = (~loss_ok | (bad & grads_ok)) if amp else bad
            detections: list[Detection] = [d.check(signals) for d in self.detectors]
            # The model as params: AGC clips relative to its weights and excludes by module name.
            clip = self.policy.clip_(
                grads, norms, self.model, norm_type=cfg.norm_type, foreach=cfg.foreach
            )
            quiet = ~amp_overflow  # a loss-scale overflow is no spike
            flags = self.responder.flags(
                clip.clipped,
                amp_overflow,
                nonfinite,
                [d.flag.to(device) & quiet for d in detections],
            )
            _distributed.agree_(flags, self.process_group)
            skip = self.responder.skip(flags)
            accepted = ~skip & grads_ok & loss_ok
            self.policy.update(norms, clip.learn, accepted)
            for d in self.detectors:
                d.update(signals, accepted)
        lazy = self.lazy and (plain or (self.scheduler is None and not amp))
        host, event = self._to_host(flags)
        lr = self.optimizer.param_groups[0].get("lr") if self.optimizer.param_groups else None
        row: dict[str, Any] = {
            "loss": loss_t,
            "grad_norm": total,
            "clipped_norm": clip.total,
            "threshold": clip.threshold,
            "clipped": clip.clipped,
            "lr": self.lr_scale.effective(lr.detach().clone() if isinstance(lr, Tensor) else lr),
        }
        if cfg.record_layers and names:
            per = norms.per_tensor
            same = all(n.device == per[0].device for n in per)
            # One stacked tensor per step instead of one queued tensor per layer.
            row["layers"] = Named(names, torch.stack(per)) if same else dict(zip(names, per))
        report = StepReport(
            self.step_count, self.position, total, clip.total, clip.threshold, grads_ok, self.settle
        )
        s = _Step(
            self.step_count,
            self.position,
            flags,
            skip,
            host,
            event,
            row,
            [d.score for d in detections],
            report,
            lazy,
            plain,
            amp_overflow,
            unscaled=unscaled and plain,
        )
        report._settle = lambda: self._settle_report(s)
        return s

    def _settle_report(self, s: _Step) -> None:
        """A report's host values were asked for: settle (and act, outside a step) now."""
        if s is self._current:
            # Read during its own step (sync-free mode): decide now, act after the step.
            s.bits = _read_bits(s.host, s.event)
            self._decide(s)
            return
        self.settle()
        if self.stage is Stage.READY:
            self._finish_pending()

    # ------------------------------------------------------------------ act

    def _apply(self) -> None:
        """The plain loop's optimizer, scheduler and scaler steps."""
        s = self._current
        assert s is not None
        if s.lazy:
            # Fused optimizer: the skip happens inside the kernel. The scheduler steps now, on
            # the guess that the step was applied; settle() puts it back if it was not.
            _skip.arm_found_inf(self.optimizer, s.skip)
            self.lr_scale.apply(self.optimizer)
            try:
                self.optimizer.step()
            finally:
                _skip.disarm_found_inf(self.optimizer)
                self.lr_scale.restore()
            if self.scheduler is not None:
                s.undo = _skip.GroupState(self.optimizer, self.scheduler)
                self.scheduler.step()
            self._unread = s
            return
        if s.verdict is not None and not s.verdict.skipped:
            self.lr_scale.apply(self.optimizer)
            try:
                self.optimizer.step()
            finally:
                self.lr_scale.restore()
            if self.scheduler is not None:
                self.scheduler.step()

    def _noop_framework_step(self) -> None:
        """Make the framework's coming optimizer.step() and scheduler.step() do nothing."""
        _skip.drop_grads(self._params())
        if self.scheduler is not None:
            self._disarm.append(_skip.noop_scheduler_step(self.scheduler))

    def _dropped(self, plain: bool) -> StepReport:
        """The report of a batch computed before a rollback: it is not applied."""
        self.stage = Stage.DROPPED
        if not plain:
            self._noop_framework_step()
        nan = torch.full((), math.nan)
        verdict = Verdict(
            "rollback", reason="rolled back to a snapshot; this batch was computed before it"
        )
        return StepReport(
            self.step_count,
            self.position,
            nan,
            nan,
            nan,
            torch.ones((), dtype=torch.bool),
            lambda: verdict,
            verdict,
        )

    def _forget_pending(self) -> None:
        self._unread = self._unacted = self._current = None

    def _finish_pending(self) -> bool:
        """Settle and carry out the pending step's verdict; True when it rolled back."""
        self.settle()
        s, self._unacted = self._unacted, None
        if s is None:
            return False
        self._act(s)
        if s.verdict is not None and not s.verdict.skipped:
            self._run_hooks(s)
        return s.verdict is not None and s.verdict.action == "rollback"

    def _act(self, s: _Step) -> None:
        """Decide from the bits, record, and carry out back-off, rollback or abort."""
        v = s.verdict if s.verdict is not None else self._decide(s)
        s.row["action"] = v.action
        self.recorder.log(s.step, **s.row)
        if not v.skipped:
            if v.fired:
                self.recorder.event(
                    s.step, "action", action="log", reason=v.reason, signal=v.fired[0]
                )
            return
        extra: dict[str, Any] = {}
        if self.incidents is not None and v.action in self.incidents.actions:
            path = self._write_incident(s, v)
            if path is not None:
                extra["bundle"] = str(path)
        if v.action == "backoff":
            self.lr_scale.backoff(self.config.backoff_factor)
        elif v.action == "rollback":
            extra = self._rollback(s)
        if v.signal != "amp_overflow":
            score = s.scores[v.index] if v.index is not None and v.index < len(s.scores) else 1.0
            self.recorder.event(
                s.step,
                "action",
                action=v.action,
                reason=v.reason,
                signal=v.signal,
                score=score,
                position=s.position,
                **extra,
            )
        if v.action == "abort":
            self._abort(s)

    def _decide(self, s: _Step) -> Verdict:
        assert s.bits is not None
        if any(s.bits[2:]) and self.counters.streak == 0:
            self.streak_start = s.position
        v = self.responder.decide(s.bits, self.snapshots.has(self.streak_start))
        s.verdict = s.report.verdict = v
        return v

    def _write_incident(self, s: _Step, v: Verdict) -> Any:
        """An incident bundle of ``s``, written before its verdict changes any state."""
        assert self.incidents is not None
        cfg = {k: getattr(self.config, k) for k in self.config.__dataclass_fields__}
        amp = self.scaler is not None and self.scaler.is_enabled()
        return self.incidents.write(
            BundleSpec(
                step=s.step,
                position=s.position,
                action=v.action,
                signal=v.signal,
                reason=v.reason,
                batch=s.batch,
                rng=s.rng if s.rng is not None else forward_rng_state(),
                model=self.model,
                optimizer=self.optimizer,
                scheduler=self.scheduler,
                scaler=self.scaler,
                history=[
                    {k: v.as_dict() if isinstance(v, Named) else v for k, v in row.items()}
                    for row in self._history
                ],
                config=cfg,
                recorded={"loss": s.row["loss"], "grad_norm": s.row["grad_norm"]},
                amp_dtype=torch.float16 if amp else None,
            )
        )

    def _run_hooks(self, s: _Step) -> None:
        for hook in list(self._step_hooks):
            hook(s.report)

    def _agreed(self, max_position: int | None) -> dict[str, Any] | None:
        device = next((p.device for p in self.model.parameters()), torch.device("cpu"))
        return self.snapshots.agreed(max_position, self.process_group, device)

    def _restore(self, snap: dict[str, Any], full: bool) -> None:
        """Put model, optimizer, scheduler, scaler, RNGs and the guard back to ``snap``.

        ``full`` (resume): also counters, skip list and back-off. A rollback keeps those: what
        was learnt about the bad window and the back-off must survive it.
        """
        restore(snap, self.model, self.optimizer, self.scheduler, self.scaler)
        g = snap["guard"]
        self.policy.load_state_dict(_clone(g["policy"]))
        for d, st in zip(self.detectors, g["detectors"]):
            d.load_state_dict(_clone(st))
        for h, st in zip(self._hook_states, g.get("hook_states", [])):
            h.load_state_dict(_clone(st))
        if full and "counters" in g:
            self.counters.load_state_dict(g["counters"])
            self.skip_list.load_state_dict(g["skip_list"])
            self.streak_start = int(g["streak_start"])
            self.lr_scale.scale = float(g.get("lr_scale", 1.0))
        self.step_count = int(snap["step"])
        self.position = self.skip_list.next_allowed(int(snap["position"]))
        if self.buffers is not None:
            self.buffers.keep_()

    def _rollback(self, s: _Step) -> dict[str, Any]:
        snap = self._agreed(self.streak_start)
        if snap is None:  # a disk snapshot turned out unreadable and none is left
            self._abort(s)
        assert snap is not None
        if s.unscaled and s is self._current:
            # The scaler consumed this step's unscale_ record before its state is replaced.
            self.scaler.update()
            s.unscaled = False
        self._restore(snap, full=False)
        start = max(0, self.streak_start - self.config.skip_before)
        end = s.position + self.config.skip_after
        self.skip_list.add(start, end)
        self.position = self.skip_list.next_allowed(self.position)
        self._current = None
        self.stage = Stage.DROPPED if self.stage is not Stage.READY else Stage.READY
        return {
            "restored_step": self.step_count,
            "skip_start": start,
            "skip_end": end,
            "resume_position": self.position,
        }

    def _abort(self, s: _Step) -> None:
        c = self.counters
        snap = self._agreed(self.streak_start) if self.snapshots.has() else None
        if snap is not None:
            self._restore(snap, full=False)
            where = f"model and optimizer restored to the snapshot of step {self.step_count}"
        else:
            if self.buffers is not None:
                self.buffers.settle_(True)  # the aborted batch's forward changed them
            finite = all(bool(p.isfinite().all()) for p in self._params())
            where = (
                f"model and optimizer hold the state before the streak began (position "
                f"{self.streak_start}): the flagged steps were not applied"
                + ("" if finite else "; the weights were already non-finite then")
            )
        incident = {
            "step": s.step,
            "position": s.position,
            "signal": s.verdict.signal if s.verdict else "",
            "reason": s.verdict.reason if s.verdict else "",
            "state": where,
            "skips_in_a_row": c.streak,
            "skips": c.skips,
            "rollbacks": c.rollbacks,
            "backoffs": c.backoffs,
            "skipped_windows": [list(w) for w in self.skip_list.windows],
        }
        flat = {k: v for k, v in incident.items() if k not in ("step", "skipped_windows")}
        self.recorder.event(s.step, "incident", **flat)
        self._forget_pending()
        self.stage = Stage.READY
        raise GuardAbort(
            f"gradguard aborted training at step {s.step} (position {s.position}): "
            f"{incident['reason']}; {where}",
            incident,
        )

    # ------------------------------------------------------------------ state

    def _core_state(self) -> dict[str, Any]:
        return {
            "step": self.step_count,
            "position": self.position,
            "policy": self.policy.state_dict(),
            "detectors": [d.state_dict() for d in self.detectors],
        }

    def _snapshot_state(self) -> dict[str, Any]:
        return {
            **self._core_state(),
            "streak_start": self.streak_start,
            "counters": self.counters.state_dict(),
            "skip_list": self.skip_list.state_dict(),
            "lr_scale": self.lr_scale.scale,
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything to continue identically: policy, detectors, counters, skip list, back-off,
        records, and a step whose verdict is not carried out yet.

        Settles the pending step (one host sync) but does not act on it: a checkpoint that
        saved the model first must not find the guard past a rollback the model is not. The
        loaded guard carries the verdict out at its next step, as this one would have.
        """
        self.settle()
        return {
            "version": STATE_VERSION,
            **self._snapshot_state(),
            "keys": list(self.keys),
            "recorder": self.recorder.state_dict(),
            "pending": self._unacted.to_state() if self._unacted is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output. Load the model, optimizer and scheduler first:
        with ``snapshot_every``, a snapshot of the loaded state replaces the in-memory ones.

        Raises:
            TypeError, ValueError: not a state of a guard built like this one (nothing changes).
        """
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict, got {type(state).__name__}")
        need = ["version", "step", "position", "policy", "detectors", "keys", "streak_start"]
        need += ["counters", "skip_list", "recorder"]
        missing = [k for k in need if k not in state]
        if missing:
            raise ValueError(f"Guard.load_state_dict: state lacks keys {missing}")
        if int(state["version"]) > STATE_VERSION:
            raise ValueError(f"guard state version {state['version']} is newer than supported")
        self.responder.check_layout(state)
        if len(state["detectors"]) != len(self.detectors):
            raise ValueError("Guard.load_state_dict: detector count differs")
        self.responder.load_state_dict(state)
        self._forget_pending()
        self._earlier_run = []
        self.stage = Stage.READY
        self.policy.load_state_dict(state["policy"])
        for d, st in zip(self.detectors, state["detectors"]):
            d.load_state_dict(st)
        self.step_count = int(state["step"])
        self.position = int(state["position"])
        self.streak_start = int(state["streak_start"])
        self.skip_list.load_state_dict(state["skip_list"])
        self.lr_scale.scale = float(state.get("lr_scale", 1.0))
        self.recorder.load_state_dict(state["recorder"])
        if self.buffers is not None:
            self.buffers.keep_()
        if self.config.snapshot_every:
            self.snapshots.clear()
            # Inside a streak of skips nothing was applied since it began: the loaded state is
            # the state at its start, and a rollback must be able to go back there.
            streak, pending = self.counters.streak, state.get("pending")
            at = (self.step_count - streak, self.streak_start) if streak else None
            if not streak and pending is not None and any(pending["bits"][2:]):
                at = (int(pending["step"]), int(pending["position"]))  # a streak it begins
            self._push_snapshot(*(at or (self.step_count, self.position)))
        if state.get("pending") is not None:
            self._unacted = _Step.from_state(state["pending"])
            self._unacted.report._settle = self._finish_pending


def _clone(state: Any) -> Any:
    """A copy of a stored state (a snapshot may be restored again by a later rollback)."""
    import copy

    return copy.deepcopy(state)
