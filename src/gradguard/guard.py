"""Guard: measure -> detect -> decide -> act -> record, once per optimizer step.

The guard wires the functional pieces together; each stays testable on its own:
:func:`gradguard.norms.grad_norms` measures, a :class:`~gradguard.policies.ClipPolicy` picks the
clipping threshold, :class:`~gradguard.detect.Detector` objects flag bad steps, the response
ladder (:mod:`gradguard.response`) decides, :mod:`gradguard.rollback` restores, and a
:class:`~gradguard.records.Recorder` keeps the numbers on the device until it flushes.

Plain loop (``guard.step`` replaces ``optimizer.step()``, ``scheduler.step()`` and, under AMP,
``scaler.step()``/``scaler.update()``)::

    guard = gradguard.Guard(model, optimizer, scheduler=scheduler, scaler=scaler)
    for batch in loader:
        loss = compute_loss(model, batch)
        scaler.scale(loss).backward()           # or loss.backward()
        report = guard.step(loss)
        optimizer.zero_grad(set_to_none=True)

Per step: (AMP: ``scaler.unscale_(optimizer)`` once, so norms and clipping see true gradients)
-> measure per-tensor and total norms -> every detector's flag, plus the built-in non-finite
check -> one all-reduce (MAX) of the flag vector across ranks -> the policy's threshold and the
clip (a clamped multiply, no branch) -> the statistics learn from the post-clip norm, only on
accepted finite steps -> apply or skip -> record.

Where the host waits for the device (documented, tested):

* Fused Adam/AdamW/SGD (``fused=True``), the default ``sync="auto"``: **no sync on a clean
  step**. The skip flag is handed to the optimizer as ``optimizer.found_inf`` (the tensor AMP's
  GradScaler uses), so a skipped step is skipped inside the fused kernel (moments, weight decay
  and step counter untouched). The flag vector is copied to the host asynchronously and read at
  the start of the next ``step`` (waiting, at most, for the previous step to finish); that read
  logs the row and runs the rare host-side responses (LR back-off, rollback, abort) one step
  late. The LR scheduler steps at once, on the guess that the step was applied; a skip found by
  the read puts its state and the learning rates back before the next optimizer step uses
  them. Reading ``report.action`` early, ``guard.state_dict()``, ``optimizer.state_dict()``,
  ``model.state_dict()`` and snapshot steps settle the pending step at once (one sync).
* Other optimizers (``sync="step"``): one sync per step on the flag vector (a few bytes), to
  decide whether to call ``optimizer.step()`` at all.
* Record flushes (every ``flush_every`` steps, one transfer), snapshots (every
  ``snapshot_every`` steps, a device-to-host copy of the state) and incidents (an event row is
  flushed at once).

AMP: an inf/NaN gradient under an enabled GradScaler is the scaler's business, not a spike: the
step is skipped (action ``"skip"``, reason ``"amp_overflow"``), the scaler lowers its scale, no
budget is spent and no statistic learns from it. A non-finite *loss* is still an incident.

Gradient accumulation: call ``guard.step`` once per optimizer step, after the last
micro-batch's backward; it acts on the accumulated gradient.

Frameworks that call ``optimizer.step()`` themselves (Lightning, HF): call
:meth:`Guard.before_optimizer_step` where the gradients are final (Lightning's
``on_before_optimizer_step``) and :meth:`Guard.after_optimizer_step` after the step. On a skip the
framework's ``optimizer.step()`` becomes a no-op (``found_inf`` for fused optimizers, else the
gradients are set to ``None``, which every torch optimizer skips: no moment, decay or counter
changes) and its next ``scheduler.step()`` a no-op.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from gradguard import _distributed, _validate
from gradguard._foreach import mul_
from gradguard.detect import Detection, Detector, Signals, SpikeDetector
from gradguard.norms import GradNorms, grad_norms, total_from_norms
from gradguard.policies import ClipPolicy, ZScoreClip
from gradguard.records import Recorder
from gradguard.response import (
    SKIPPING,
    Budgets,
    Counters,
    GuardAbort,
    check_ladder,
    decide,
)
from gradguard.rollback import (
    SkipList,
    SkipSampler,
    SnapshotError,
    SnapshotStore,
    capture,
    load_snapshot,
    restore,
)

__all__ = ["Guard", "GuardAbort", "GuardConfig", "StepReport"]

EPS = 1e-6  # torch's clip_grad_norm_ epsilon
STATE_VERSION = 1
DEFAULT_LADDER: tuple[str, ...] = ("skip", "rollback", "abort")
# Observational detectors: worth a record, not a skipped step, unless configured otherwise.
OBSERVE = {"vanishing": ("log",), "update_ratio": ("log",)}
SYNC_MODES = ("auto", "step", "lazy")


@dataclass
class GuardConfig:
    """How a :class:`Guard` measures, decides and responds.

    Attributes:
        policy: the clipping policy (``None``: ZClip, :class:`~gradguard.policies.ZScoreClip`).
        detectors: detectors (``None``: a loss spike and a gradient-norm spike detector,
            OLMo-core's 128-step window at 6 sigma). Non-finite checks are built in.
        responses: ladder per signal, keyed ``"name:signal"`` (``"spike:loss"``), ``name``
            (``"spike"``) or ``"nonfinite"``; e.g. ``{"spike:loss": ("skip", "rollback")}``.
        default_response: the ladder of a signal not in ``responses`` (vanishing and update-ratio
            detectors default to ``("log",)``).
        budgets: when a rung escalates (:class:`~gradguard.response.Budgets`).
        backoff_factor: LR multiplier of a ``"backoff"`` response, in (0, 1).
        snapshot_every: take a snapshot every this many steps (0: never; then ``"rollback"``
            escalates past itself). A snapshot is also taken when the guard is created (not on a
            ``snapshot_dir`` that already holds snapshots, see below).
        snapshot_dir: write snapshots there (atomic, checksummed) instead of CPU memory. Under
            ``torch.distributed`` each rank writes and reads its own ``-rank<r>`` files, so all
            ranks can share it. A directory that already holds snapshots is left untouched:
            call :meth:`Guard.resume` to continue that run; stepping without it raises.
        keep_snapshots: how many snapshots to keep.
        skip_before, skip_after: widen the skipped window around the flagged batches on a
            rollback (PaLM skipped a few hundred batches around a spike).
        norm_type: the norm measured and clipped.
        sync: ``"auto"`` (``"lazy"`` for fused optimizers, else ``"step"``), ``"step"`` (decide
            on the host every step) or ``"lazy"`` (fused optimizers only: no sync on a clean step).
        record_layers: put per-parameter gradient norms in each step row.
        flush_every: steps between record flushes (for the default recorder).
        foreach: torch's foreach flag for norms and clipping.
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

    def __post_init__(self) -> None:
        if self.policy is not None and not isinstance(self.policy, ClipPolicy):
            raise TypeError(f"policy must be a ClipPolicy, got {type(self.policy).__name__}")
        if self.detectors is not None:
            for i, d in enumerate(self.detectors):
                if not isinstance(d, Detector):
                    raise TypeError(f"detectors[{i}] must be a Detector, got {type(d).__name__}")
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
        for name in ("keep_snapshots", "flush_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        self.norm_type = _validate.norm_type(self.norm_type)
        if self.sync not in SYNC_MODES:
            raise ValueError(f"sync must be one of {SYNC_MODES}, got {self.sync!r}")
        if not isinstance(self.record_layers, bool):
            raise TypeError("record_layers must be a bool")
        _validate.foreach_flag(self.foreach)


class _Outcome:
    """The host-side verdict of one step, filled in when the step is resolved."""

    __slots__ = ("action", "reason", "signal")

    def __init__(self) -> None:
        self.action: str | None = None
        self.reason = ""
        self.signal = ""


class StepReport:
    """What the guard did on one step. Tensors stay on the device; host values are read lazily.

    Attributes:
        step: the guard's step index.
        position: the data position (batch index) of this step.
        total_norm: pre-clip total gradient norm (0-dim fp32).
        clipped_norm: post-clip total norm.
        threshold: the policy's threshold (``inf``: no clipping).
        finite: 0-dim bool, all gradients finite.
        action: ``"step"``, ``"clip"``, ``"skip"``, ``"backoff"``, ``"rollback"`` or ``"abort"``
            (reading it may wait for the device: see the module docstring).
        reason: why, in words (empty for a clean step).
    """

    def __init__(
        self,
        step: int,
        position: int,
        total_norm: Tensor,
        clipped_norm: Tensor,
        threshold: Tensor,
        finite: Tensor,
        outcome: _Outcome,
        resolve: Callable[[], Any],
    ) -> None:
        self.step = step
        self.position = position
        self.total_norm = total_norm
        self.clipped_norm = clipped_norm
        self.threshold = threshold
        self.finite = finite
        self._outcome = outcome
        self._resolve = resolve

    def _ensure(self) -> _Outcome:
        if self._outcome.action is None:
            self._resolve()
        return self._outcome

    @property
    def action(self) -> str:
        return str(self._ensure().action)

    @property
    def reason(self) -> str:
        return self._ensure().reason

    @property
    def signal(self) -> str:
        """The signal that decided the action (``""`` for a clean step)."""
        return self._ensure().signal

    @property
    def skipped(self) -> bool:
        """True when the step was not applied."""
        return self.action in SKIPPING

    def to_dict(self) -> dict[str, Any]:
        """Host values (one transfer): step, position, norms, threshold, finite, action, reason."""
        o = self._ensure()
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
            "action": o.action,
            "reason": o.reason,
            "signal": o.signal,
        }

    def __repr__(self) -> str:
        state = self._outcome.action or "pending"
        return f"StepReport(step={self.step}, action={state!r}, reason={self._outcome.reason!r})"


@dataclass
class _Pending:
    """A measured step whose flags the host has not read yet."""

    step: int
    position: int
    flags: Tensor  # [clipped, amp_overflow, nonfinite, *detectors], on the device
    skip: Tensor  # 0-dim bool: the step must not be applied (any skipping rung fired)
    host: Tensor  # the flag bits in host memory (a pinned copy in flight on CUDA)
    event: Any
    row: dict[str, Any]
    scores: list[Tensor]
    outcome: _Outcome
    lazy: bool  # the step was handed to the optimizer with found_inf (or is not applied by us)
    plain: bool  # inside guard.step (the guard steps the scheduler itself)
    undo: tuple[dict[str, Any], list[Any]] | None = None  # scheduler state and LRs before


def _detector_key(d: Detector) -> str:
    signal = getattr(d, "signal", None)
    return f"{d.name}:{signal}" if isinstance(signal, str) else str(d.name)


def _is_fused(optimizer: torch.optim.Optimizer) -> bool:
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False)) and any(
        g.get("fused", False) for g in optimizer.param_groups
    )


def _nan(like: Tensor) -> Tensor:
    return torch.full((), math.nan, dtype=torch.float32, device=like.device)


class Guard:
    """Keep a training run safe: clip adaptively, skip or roll back bad steps, record it all.

    Args:
        model: the module being trained (its named parameters name the records' layers).
        optimizer: its optimizer. Fused Adam/AdamW/SGD skip on the device with no host sync.
        scheduler: an LR scheduler the guard advances only on applied steps.
        scaler: a ``torch.amp.GradScaler``: the guard unscales before measuring and steps
            through it.
        config: :class:`GuardConfig` (``None``: defaults).
        recorder: where rows go (``None``: a :class:`~gradguard.records.Recorder` kept in
            memory, ``guard.records``).
        process_group: the group whose ranks must agree (``None``: the default group when
            torch.distributed is initialized).

    Example:
        >>> guard = Guard(model, optimizer, scheduler)
        >>> loss.backward(); report = guard.step(loss); optimizer.zero_grad()
        >>> report.action
        'step'
    """

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
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        if scheduler is not None and not callable(getattr(scheduler, "step", None)):
            raise TypeError("scheduler must be an LR scheduler (with a step() method) or None")
        if scaler is not None and not callable(getattr(scaler, "unscale_", None)):
            raise TypeError("scaler must be a torch.amp.GradScaler or None")
        if config is None:
            config = GuardConfig()
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
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.scaler = scaler
        self.config = config
        self.process_group = process_group
        self.recorder = (
            recorder if recorder is not None else Recorder(flush_every=config.flush_every)
        )
        self.policy: ClipPolicy = config.policy if config.policy is not None else ZScoreClip()
        detectors = (
            list(config.detectors)
            if config.detectors is not None
            else [SpikeDetector("loss"), SpikeDetector("grad_norm")]
        )
        # Non-finite checks are built in (and AMP-aware), so a NonFiniteDetector is redundant.
        self.detectors = [d for d in detectors if d.name != "nonfinite"]
        self.keys = ["amp_overflow", "nonfinite"]
        for d in self.detectors:
            key = _detector_key(d)
            while key in self.keys:
                key += "'"
            self.keys.append(key)
        self.ladders = {"amp_overflow": ("skip",)}
        names = ["nonfinite"] + [str(d.name) for d in self.detectors]
        for key, name in zip(self.keys[1:], names):
            self.ladders[key] = config.responses.get(
                key, config.responses.get(name, OBSERVE.get(name, config.default_response))
            )
        self._skip_mask = torch.tensor(
            [0.0] + [1.0 if self.ladders[k][0] in SKIPPING else 0.0 for k in self.keys]
        )
        self.lazy = self.fused and config.sync in ("auto", "lazy")
        self.skip_list = SkipList()
        self.snapshots = SnapshotStore(config.snapshot_dir, config.keep_snapshots)
        self.counters = Counters()
        self.step_count = 0
        self.position = 0
        self.streak_start = 0
        self._pending: _Pending | None = None
        self._discard = False
        self._set_found_inf = False
        self._scheduler_patched = False
        self._scaler_unscaled = False  # this guard unscaled and owes the scaler an update()
        self._ratios_armed = False
        self._last_outcome: _Outcome | None = None
        if self.lazy:
            # A checkpoint must not catch a step whose flags the host has not read yet.
            optimizer.register_state_dict_pre_hook(lambda _opt: self._resolve_quietly())
            hook = getattr(model, "register_state_dict_pre_hook", None)
            if callable(hook):
                hook(lambda *_: self._resolve_quietly())
        # Snapshots of an earlier run in snapshot_dir: the initial snapshot would overwrite its
        # step 0 and a later resume() could mix the two runs. Keep them until resume() (or
        # load_state_dict()) continues that run; a fresh first step raises instead.
        self._earlier_run = (
            [f for _, f in self.snapshots.on_disk()] if config.snapshot_every else []
        )
        if config.snapshot_every and not self._earlier_run:
            self.snapshot()

    # ------------------------------------------------------------------ public helpers

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

        For a batch whose loss raised, or one the loop chose not to use: the guard's position
        (and the positions of later snapshots) stays in step with the data. Returns the new
        position (bad windows are skipped as usual).
        """
        self.position = self.skip_list.next_allowed(self.position + 1)
        return self.position

    def skip_sampler(self, sampler: Any, per_step: int = 1) -> SkipSampler:
        """Wrap a (batch) sampler so that it leaves out the batches :meth:`should_skip` names."""
        return SkipSampler(sampler, self.should_skip, per_step=per_step)

    def snapshot(self) -> None:
        """Take a snapshot now (resolving the pending step first: one host sync)."""
        self._resolve()
        self.snapshots.push(
            capture(
                self.model,
                self.optimizer,
                self.scheduler,
                self.scaler,
                step=self.step_count,
                position=self.position,
                # Rollback uses the core only; resume() also takes the counters and skip list.
                guard={
                    **self._core_state(),
                    "streak_start": self.streak_start,
                    "counters": self.counters.state_dict(),
                    "skip_list": self.skip_list.state_dict(),
                },
            )
        )

    def resume(self, snapshot: dict[str, Any] | str | os.PathLike[str] | None = None) -> int:
        """Continue a run that stopped (a crash, a kill): restore everything from a snapshot.

        Model, optimizer, scheduler, scaler, RNGs and the guard (policy, detectors, counters,
        skip list, step and data position) go back to the snapshot, bit for bit.

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
        self._pending = None
        self._earlier_run = []
        if snapshot is None:
            self.snapshots.scan()
            snap = self._agreed_snapshot(None)
            if snap is None:
                raise SnapshotError(
                    f"no readable snapshot in {self.config.snapshot_dir!r} "
                    f"({'; '.join(self.snapshots.errors) or 'none written'})"
                )
        elif isinstance(snapshot, dict):
            snap = snapshot
        else:
            snap = load_snapshot(snapshot)
        restore(snap, self.model, self.optimizer, self.scheduler, self.scaler)
        g = snap["guard"]
        self.policy.load_state_dict(copy.deepcopy(g["policy"]))
        for d, st in zip(self.detectors, g["detectors"]):
            d.load_state_dict(copy.deepcopy(st))
        if "counters" in g:
            self.counters.load_state_dict(g["counters"])
            self.skip_list.load_state_dict(g["skip_list"])
            self.streak_start = int(g["streak_start"])
        self.step_count = int(snap["step"])
        self.position = self.skip_list.next_allowed(int(snap["position"]))
        if self.config.snapshot_every and not self.snapshots.has():
            self.snapshot()  # something to roll back to before the next scheduled snapshot
        return self.position

    # ------------------------------------------------------------------ the step

    def step(self, loss: Tensor | float | None = None) -> StepReport:
        """Guard one optimizer step: replaces ``optimizer.step()`` and ``scheduler.step()``.

        Call it once per optimizer step, after the (last micro-batch's) backward.

        Args:
            loss: this step's loss (detached here; used by the loss detectors and the records).

        Returns:
            A :class:`StepReport`.

        Raises:
            GuardAbort: the ladder reached ``"abort"`` (the incident is in the records).
        """
        report = self._before(loss, plain=True)
        if not self._discard:
            self._apply()
        self.after_optimizer_step()
        return report

    def before_optimizer_step(self, loss: Tensor | float | None = None) -> StepReport:
        """For frameworks that call ``optimizer.step()`` themselves: everything up to the step.

        Unscales (AMP), measures, detects, decides and clips. When the step must not be applied
        the framework's next ``optimizer.step()`` and ``scheduler.step()`` become no-ops. Pair
        it with :meth:`after_optimizer_step`.
        """
        return self._before(loss, plain=False)

    def after_optimizer_step(self) -> None:
        """Undo the no-op arming, count the step, and take a snapshot when one is due."""
        if self._set_found_inf:
            for attr in ("found_inf", "grad_scale"):
                if hasattr(self.optimizer, attr):
                    delattr(self.optimizer, attr)
            self._set_found_inf = False
        self._disarm_scheduler()
        self._scaler_update()
        if self._ratios_armed and not self._discard:
            for d in self.detectors:
                if callable(getattr(d, "after", None)):
                    d.after(self.model)  # type: ignore[attr-defined]
        self._ratios_armed = False
        if self._discard:
            self._discard = False
            return
        self.step_count += 1
        self.position = self.skip_list.next_allowed(self.position + 1)
        every = self.config.snapshot_every
        if every and self.step_count % every == 0:
            self._resolve()
            if not self._discard:
                self.snapshot()
            self._discard = False

    def flush(self) -> list[dict[str, Any]]:
        """Resolve the pending step and flush the records; returns the flushed rows."""
        self._resolve()
        return self.recorder.flush()

    # ------------------------------------------------------------------ measure, detect, clip

    def _before(self, loss: Tensor | float | None, plain: bool) -> StepReport:
        if self._earlier_run:
            raise ValueError(
                f"snapshot_dir {self.config.snapshot_dir!r} holds snapshots of an earlier run "
                f"({', '.join(f.name for f in self._earlier_run[-3:])}); call guard.resume() "
                "to continue it, or give this run an empty snapshot_dir (or delete the files)"
            )
        self._disarm_scheduler()
        previous = self._resolve()
        if previous is not None and previous.action == "rollback":
            return self._discarded_report(plain)
        self._discard = False
        if self.scaler is not None and self.scaler.is_enabled() and not self._unscaled_already():
            self.scaler.unscale_(self.optimizer)
            # A framework steps and updates the scaler itself; the plain loop leaves it to us.
            self._scaler_unscaled = plain
        with torch.no_grad():
            pending, report = self._measure(loss, plain)
        self._pending = pending
        for d in self.detectors:
            if callable(getattr(d, "before", None)):
                d.before(self.model)  # type: ignore[attr-defined]
                self._ratios_armed = True
        if pending.lazy:
            if not plain:
                self._hand_flag_to_optimizer(pending)
        else:
            self._resolve()
            if not plain and self._pending_action_skips(report):
                self._noop_framework_step()
        return report

    def _unscaled_already(self) -> bool:
        # Lightning unscales before its on_before_optimizer_step hook; unscaling twice raises.
        states = getattr(self.scaler, "_per_optimizer_states", {})
        stage = (
            states.get(id(self.optimizer), {}).get("stage")
            if id(self.optimizer) in states
            else None
        )
        return getattr(stage, "name", "") == "UNSCALED"

    def _measure(self, loss: Tensor | float | None, plain: bool) -> tuple[_Pending, StepReport]:
        cfg = self.config
        named = [(n, p) for n, p in self.model.named_parameters() if p.grad is not None]
        names = [n for n, _ in named]
        grads = [p.grad for _, p in named if p.grad is not None]
        norms = grad_norms(grads, cfg.norm_type, foreach=cfg.foreach)
        device = grads[0].device if grads else torch.device("cpu")
        total = norms.total.float()
        if isinstance(loss, Tensor):
            loss_t: Tensor | None = loss.detach().reshape(-1)[0].float()
        elif loss is None:
            loss_t = None
        else:
            loss_t = torch.tensor(float(loss), device=device)
        grads_ok = norms.finite
        loss_ok = loss_t.isfinite() if loss_t is not None else torch.ones((), dtype=torch.bool)
        loss_ok = loss_ok.to(device)
        amp = self.scaler is not None and self.scaler.is_enabled()
        if amp:
            amp_overflow, nonfinite = ~grads_ok, ~loss_ok
        else:
            amp_overflow, nonfinite = torch.zeros_like(grads_ok), ~(grads_ok & loss_ok)
        signals = Signals(self.step_count, total, norms.per_tensor, names, grads_ok, loss_t)
        detections: list[Detection] = [d.check(signals) for d in self.detectors]
        # A loss-scale overflow is no spike: mask the detectors on such a step.
        quiet = ~amp_overflow
        threshold, coef_min, clipped_total, clipped = self._clip(norms, grads, named)
        flags = torch.stack(
            [
                coef_min < 1.0,
                amp_overflow,
                nonfinite,
                *[(det.flag.to(device) & quiet) for det in detections],
            ]
        ).to(torch.float32)
        _distributed.agree_(flags, self.process_group)
        skip = (flags * self._skip_mask.to(device)).amax() > 0
        accepted = ~skip & grads_ok & loss_ok
        self.policy.update(norms, clipped, accepted)
        for d in self.detectors:
            d.update(signals, accepted)
        lazy = self.lazy and (plain or (self.scheduler is None and not amp))
        host, event = self._stage(flags)
        row: dict[str, Any] = {
            "loss": loss_t,
            "grad_norm": total,
            "clipped_norm": clipped_total,
            "threshold": threshold,
            "clipped": flags[0] > 0,
            "lr": self.optimizer.param_groups[0]["lr"],
        }
        if cfg.record_layers and names:
            row["layers"] = dict(zip(names, norms.per_tensor))
        outcome = _Outcome()
        pending = _Pending(
            step=self.step_count,
            position=self.position,
            flags=flags,
            skip=skip,
            host=host,
            event=event,
            row=row,
            scores=[det.score for det in detections],
            outcome=outcome,
            lazy=lazy,
            plain=plain,
        )
        report = StepReport(
            self.step_count,
            self.position,
            total,
            clipped_total,
            threshold,
            grads_ok,
            outcome,
            self._resolve,
        )
        return pending, report

    def _clip(
        self, norms: GradNorms, grads: list[Tensor], named: Sequence[tuple[str, Tensor]]
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | list[Tensor]]:
        """Clip in place by the policy; returns (threshold, min coefficient, post-clip total,
        what the policy learns from). Non-finite norms give a coefficient of 1 (nothing to save:
        the step is skipped)."""
        total = norms.total.float()
        scope = self.policy.scope
        if scope == "unit":
            count = self.policy.clip_([p for _, p in named])  # type: ignore[attr-defined]
            after = grad_norms(grads, self.config.norm_type, foreach=self.config.foreach)
            clipped_total = after.total.float()
            coef_min = torch.where(count > 0, 0.0, 1.0).to(total.device)
            threshold = torch.full_like(total, math.inf)
            return threshold, coef_min, clipped_total, clipped_total
        limit = self.policy.threshold(norms)
        if scope == "tensor":
            assert isinstance(limit, list)
            coefs = [
                torch.where(n.isfinite(), (t / (n + EPS)).clamp(max=1.0), 1.0)
                for t, n in zip(limit, norms.per_tensor)
            ]
            for g, c in zip(grads, coefs):
                g.mul_(c.to(g.dtype))
            post = [n * c for n, c in zip(norms.per_tensor, coefs)]
            clipped_total = total_from_norms(post, self.config.norm_type, total.device).float()
            coef_min = torch.stack(coefs).amin() if coefs else torch.ones_like(total)
            threshold = total_from_norms(list(limit), self.config.norm_type, total.device).float()
            return threshold, coef_min, clipped_total, post
        assert isinstance(limit, Tensor)
        coef = torch.where(norms.finite, (limit / (total + EPS)).clamp(max=1.0), 1.0)
        if grads:
            mul_(grads, coef, self.config.foreach)
        clipped_total = total * coef
        return limit.float(), coef, clipped_total, clipped_total

    def _stage(self, flags: Tensor) -> tuple[Tensor, Any]:
        """Start moving the flag bits to host memory without waiting for them.

        On CUDA: a non-blocking copy into pinned memory and an event; on the CPU the bits are
        in host memory already. Other devices pay a synchronous copy here.
        """
        bits = (flags > 0).to(torch.uint8)
        if bits.device.type == "cuda":
            host = torch.empty(bits.shape, dtype=torch.uint8, pin_memory=True)
            host.copy_(bits, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            return host, event
        return bits.to("cpu"), None

    # ------------------------------------------------------------------ act

    def _hand_flag_to_optimizer(self, pending: _Pending) -> None:
        skip = pending.skip
        device = self.optimizer.param_groups[0]["params"][0].device
        self.optimizer.found_inf = skip.to(device, torch.float32)  # type: ignore[attr-defined]
        self._set_found_inf = True

    def _pending_action_skips(self, report: StepReport) -> bool:
        return report._outcome.action in SKIPPING

    def _apply(self) -> None:
        """The plain loop's optimizer, scheduler and scaler steps."""
        pending = self._pending
        if pending is not None and pending.lazy:
            # Fused optimizer: the skip happens inside the kernel. The scheduler steps now, on
            # the guess that the step was applied; when the host reads the flags (next step)
            # and finds a skip, it puts the scheduler and the LRs back before they are used.
            self._hand_flag_to_optimizer(pending)
            self.optimizer.step()
            if self.scheduler is not None:
                lrs = [g["lr"] for g in self.optimizer.param_groups]
                pending.undo = (copy.deepcopy(self.scheduler.state_dict()), lrs)
                self.scheduler.step()
            return
        outcome = self._last_outcome
        if outcome is not None and outcome.action not in SKIPPING:
            if self._scaler_unscaled:
                self.scaler.step(self.optimizer)
            else:
                self.optimizer.step()
            if self.scheduler is not None:
                self.scheduler.step()

    def _scaler_update(self) -> None:
        if self._scaler_unscaled:
            self._scaler_unscaled = False
            self.scaler.update()

    def _noop_framework_step(self) -> None:
        """Make the framework's coming optimizer.step() and scheduler.step() do nothing."""
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                p.grad = None
        if self.scheduler is not None and not self._scheduler_patched:
            self.scheduler.step = lambda *a, **k: None
            self._scheduler_patched = True

    def _disarm_scheduler(self) -> None:
        if self._scheduler_patched:
            del self.scheduler.step  # the instance attribute; the class method shows again
            self._scheduler_patched = False

    def _discarded_report(self, plain: bool) -> StepReport:
        """The report of a step whose batch arrived before a rollback: it is not applied."""
        self._discard = True
        if not plain:
            self._noop_framework_step()
        like = torch.zeros(())
        outcome = _Outcome()
        outcome.action = "rollback"
        outcome.reason = "rolled back to a snapshot; this batch was computed before it, dropped"
        outcome.signal = self._last_outcome.signal if self._last_outcome else ""
        return StepReport(
            self.step_count,
            self.position,
            _nan(like),
            _nan(like),
            _nan(like),
            torch.ones((), dtype=torch.bool),
            outcome,
            lambda: None,
        )

    # ------------------------------------------------------------------ decide (host)

    def _read(self, p: _Pending) -> list[bool]:
        if p.event is not None:
            # Waits for the step that produced the flags (one step behind in lazy mode), not for
            # the work queued since; no synchronizing copy is issued.
            p.event.synchronize()
        # The bytes are in host memory: reading the storage does not touch the device.
        return [b != 0 for b in p.host.untyped_storage().tolist()[: p.host.numel()]]

    def _resolve_quietly(self) -> None:
        self._resolve()

    def _resolve(self) -> _Outcome | None:
        """Read the pending step's flags and carry out the decision. Returns its outcome."""
        p = self._pending
        if p is None:
            return None
        self._pending = None
        vals = self._read(p)
        clipped = vals[0]
        fired = [k for k, v in zip(self.keys, vals[1:]) if v]
        amp = "amp_overflow" in fired
        incidents = [k for k in fired if k != "amp_overflow"]
        if incidents and self.counters.streak == 0:
            self.streak_start = p.position
        can_rollback = self.snapshots.has(self.streak_start)
        action, signal = decide(
            incidents, self.ladders, self.config.budgets, self.counters, can_rollback
        )
        if action in ("log", "clip") or action == "step":
            if amp:
                action, signal = "skip", "amp_overflow"
            else:
                action = "clip" if clipped else "step"
        o = p.outcome
        o.action, o.signal = action, signal
        o.reason = self._reason(action, signal, fired)
        self._last_outcome = o
        p.row["action"] = action
        self.recorder.log(p.step, **p.row)
        self._act(p, action, signal, amp, fired)
        return o

    def _reason(self, action: str, signal: str, fired: list[str]) -> str:
        if signal == "amp_overflow":
            return "amp_overflow: the loss scaler found inf/NaN gradients and lowers its scale"
        if action not in SKIPPING:
            return f"logged: {', '.join(fired)} fired" if fired else ""
        c = self.counters
        detail = {
            "skip": "step not applied",
            "backoff": f"step not applied, learning rate x{self.config.backoff_factor}",
            "rollback": "restored the last good snapshot, bad batches skipped on replay",
            "abort": (
                f"budgets spent (skips in a row {c.streak}, rollbacks {c.rollbacks}, "
                f"back-offs {c.backoffs})"
            ),
        }[action]
        return f"{signal}: {detail}"

    def _act(self, p: _Pending, action: str, signal: str, amp: bool, fired: list[str]) -> None:
        c = self.counters
        if action not in SKIPPING:
            c.streak = 0
            if fired:
                self.recorder.event(
                    p.step, "action", action="log", reason=self._last_reason(), signal=fired[0]
                )
            return
        if p.undo is not None:  # the scheduler stepped on a guess; this step was not applied
            sched_state, lrs = p.undo
            self.scheduler.load_state_dict(sched_state)
            for group, lr in zip(self.optimizer.param_groups, lrs):
                group["lr"] = lr
        if signal == "amp_overflow":
            c.amp_skips += 1
            return
        extra: dict[str, Any] = {}
        if action == "skip":
            c.streak += 1
            c.skips += 1
        elif action == "backoff":
            c.streak += 1
            c.skips += 1
            c.backoffs += 1
            self._backoff()
        elif action == "rollback":
            extra = self._rollback(p)
        self.recorder.event(
            p.step,
            "action",
            action=action,
            reason=p.outcome.reason,
            signal=signal,
            score=self._score(p, signal),
            position=p.position,
            **extra,
        )
        if action == "abort":
            self._abort(p, signal)

    def _last_reason(self) -> str:
        return self._last_outcome.reason if self._last_outcome else ""

    def _score(self, p: _Pending, signal: str) -> Any:
        idx = self.keys.index(signal) - 2 if signal in self.keys else -1
        if 0 <= idx < len(p.scores):
            return p.scores[idx]
        return 1.0

    def _backoff(self) -> None:
        f = self.config.backoff_factor
        for group in self.optimizer.param_groups:
            for key in ("lr", "initial_lr"):
                if key in group:
                    v = group[key]
                    group[key] = v.mul_(f) if isinstance(v, Tensor) else v * f
        if self.scheduler is not None and hasattr(self.scheduler, "base_lrs"):
            self.scheduler.base_lrs = [b * f for b in self.scheduler.base_lrs]

    def _agreed_snapshot(self, max_position: int | None) -> dict[str, Any] | None:
        """The newest snapshot every rank can read: the same step on all ranks, or ``None``."""
        snap = self.snapshots.latest(max_position=max_position)
        if self.snapshots.directory is None or _distributed.world_size(self.process_group) <= 1:
            return snap
        # A disk file may be unreadable on one rank only; restoring different steps would split
        # the replicas. Agree on the newest step all ranks hold (steps only go down: it ends).
        device = next((p.device for p in self.model.parameters()), torch.device("cpu"))
        while True:
            mine = float(snap["step"]) if snap is not None else -1.0
            ends = torch.tensor([mine, -mine], dtype=torch.float64, device=device)
            hi, neg_lo = _distributed.agree_(ends, self.process_group).tolist()
            if hi == -neg_lo:
                return snap
            if -neg_lo < 0:
                return None
            snap = self.snapshots.latest(max_position=max_position, max_step=int(-neg_lo))

    def _rollback(self, p: _Pending) -> dict[str, Any]:
        snap = self._agreed_snapshot(self.streak_start)
        if snap is None:  # a disk snapshot turned out unreadable and none is left
            self._abort(p, "rollback")
        assert snap is not None
        # The scaler consumed this step's unscale_ record before its state is replaced.
        self._scaler_update()
        restore(snap, self.model, self.optimizer, self.scheduler, self.scaler)
        core = snap["guard"]
        # Copies: the snapshot may be restored again by a later rollback.
        self.policy.load_state_dict(copy.deepcopy(core["policy"]))
        for d, st in zip(self.detectors, core["detectors"]):
            d.load_state_dict(copy.deepcopy(st))
        start = max(0, self.streak_start - self.config.skip_before)
        self.skip_list.add(start, p.position + self.config.skip_after)
        self.counters.rollbacks += 1
        self.counters.streak = 0
        self.step_count = int(snap["step"])
        self.position = self.skip_list.next_allowed(int(snap["position"]))
        self._discard = True
        return {
            "restored_step": self.step_count,
            "skip_start": start,
            "skip_end": p.position + self.config.skip_after,
            "resume_position": self.position,
        }

    def _abort(self, p: _Pending, signal: str) -> None:
        c = self.counters
        incident = {
            "step": p.step,
            "position": p.position,
            "signal": signal,
            "reason": p.outcome.reason,
            "skips_in_a_row": c.streak,
            "skips": c.skips,
            "rollbacks": c.rollbacks,
            "backoffs": c.backoffs,
            "skipped_windows": [list(w) for w in self.skip_list.windows],
        }
        flat = {k: v for k, v in incident.items() if k not in ("step", "skipped_windows")}
        self.recorder.event(p.step, "incident", **flat)
        raise GuardAbort(
            f"gradguard aborted training at step {p.step} (position {p.position}): "
            f"{p.outcome.reason}",
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

    def state_dict(self) -> dict[str, Any]:
        """Everything to continue identically: policy, detectors, counters, skip list, records.

        Resolves the pending step first (one host sync).
        """
        self._resolve()
        return {
            "version": STATE_VERSION,
            **self._core_state(),
            "keys": list(self.keys),
            "streak_start": self.streak_start,
            "counters": self.counters.state_dict(),
            "skip_list": self.skip_list.state_dict(),
            "recorder": self.recorder.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output. Load the model, optimizer and scheduler first:
        with ``snapshot_every``, a snapshot of the loaded state replaces the in-memory ones."""
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict, got {type(state).__name__}")
        need = ["version", "step", "position", "policy", "detectors", "keys", "streak_start"]
        need += ["counters", "skip_list", "recorder"]
        missing = [k for k in need if k not in state]
        if missing:
            raise ValueError(f"Guard.load_state_dict: state lacks keys {missing}")
        if int(state["version"]) > STATE_VERSION:
            raise ValueError(f"guard state version {state['version']} is newer than supported")
        if list(state["keys"]) != self.keys:
            raise ValueError(
                f"Guard.load_state_dict: the state was saved with signals {state['keys']}, "
                f"this guard has {self.keys}; build it with the same detectors"
            )
        if len(state["detectors"]) != len(self.detectors):
            raise ValueError("Guard.load_state_dict: detector count differs")
        self._pending = None
        self._earlier_run = []
        self.policy.load_state_dict(state["policy"])
        for d, st in zip(self.detectors, state["detectors"]):
            d.load_state_dict(st)
        self.step_count = int(state["step"])
        self.position = int(state["position"])
        self.streak_start = int(state["streak_start"])
        self.counters.load_state_dict(state["counters"])
        self.skip_list.load_state_dict(state["skip_list"])
        self.recorder.load_state_dict(state["recorder"])
        if self.config.snapshot_every:
            self.snapshots.clear()
            self.snapshot()
