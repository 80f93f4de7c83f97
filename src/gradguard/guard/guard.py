"""Guard: measure -> detect -> decide -> act -> record, once per optimizer step.

The guard wires functional pieces together; each is testable on its own:
:func:`gradguard.core.norms.grad_norms` measures, a :class:`~gradguard.decide.policies.ClipPolicy`
clips, :class:`~gradguard.decide.detect.Detector` objects flag bad steps, a
:class:`~gradguard.guard.response.Responder` decides and carries the response out,
:mod:`gradguard.guard.skip` keeps what a skipped step must not change, snapshots
(:mod:`gradguard.core.snapshot`) roll back, and a :class:`~gradguard.records.recorder.Recorder`
keeps the numbers on the device.

Plain loop (``guard.step`` replaces ``optimizer.step()``, ``scheduler.step()`` and, under AMP,
``scaler.step()``/``scaler.update()``)::

    guard = gradguard.Guard(model, optimizer, scheduler=scheduler, scaler=scaler)
    for batch in loader:
        loss = compute_loss(model, batch)
        scaler.scale(loss).backward()           # or loss.backward()
        report = guard.step(loss)
        optimizer.zero_grad(set_to_none=True)

**A step is a transaction.** Its record (:class:`~gradguard.guard.step.PendingStep`) carries one
:class:`~gradguard.guard.step.Phase`; nothing outside it learns from the step (policy, detectors,
counters, records) until it is settled. Anything that raises on the way (``optimizer.step()``
out of memory, a scheduler, a hook) leaves the guard ``READY`` as if the step had not been
taken, puts the module buffers back as they were before the step's forward, and re-raises. A
scheduler that raises after the optimizer stepped leaves the step applied and counted (the
error says so). :class:`~gradguard.guard.response.GuardAbort` leaves every object usable.

**Read, don't remember.** What a skip or a rollback restores is read from the objects at the
moment it is needed: module buffers and the RNG state just before each step's forward (a
forward pre-hook), the first snapshot at the first step (a checkpoint loaded after the guard was
built is in it, and a new one is taken when the optimizer's parameter groups change), the
sync-free route from the optimizer's groups at every step (a checkpoint may turn ``fused`` off).

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
``optimizer.step()`` becomes a no-op (``found_inf`` for fused optimizers; torch's other
optimizers find no gradients; any other optimizer is put back after its step) and so does its
next ``scheduler.step()``. A framework step that raised and never reached
:meth:`Guard.after_optimizer_step` is abandoned by the next :meth:`Guard.before_optimizer_step`.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import math
from collections.abc import Callable
from typing import Any, NoReturn

import torch
from torch import Tensor, nn

from gradguard.core import distributed as _distributed
from gradguard.core.norms import grad_norms
from gradguard.core.snapshot import (
    SnapshotError,
    SnapshotStore,
    capture,
    forward_rng_state,
    load_snapshot,
    restore,
)
from gradguard.decide.detect import NonFiniteDetector, Signals
from gradguard.decide.policies import ClipPolicy
from gradguard.guard import skip as _skip
from gradguard.guard.config import GuardConfig, check_objects, has_state
from gradguard.guard.defaults import default_detectors, default_policy
from gradguard.guard.incident import IncidentWriter
from gradguard.guard.response import AMP, Counters, GuardAbort, Responder, Verdict
from gradguard.guard.rollback import SkipList, SkipSampler
from gradguard.guard.step import PendingStep, Phase, Stage, StepReport, read_bits, to_host
from gradguard.records.bundle import BundleSpec
from gradguard.records.recorder import Named, Recorder

__all__ = ["Guard", "GuardAbort", "GuardConfig", "Stage", "StepReport"]

STATE_VERSION = 2


def _is_fused(optimizer: torch.optim.Optimizer) -> bool:
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False)) and any(
        g.get("fused", False) for g in optimizer.param_groups
    )


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
        if not loss.is_floating_point():
            raise TypeError(
                f"loss must be a floating-point value, got a {loss.dtype} tensor (an integer, "
                "bool or complex loss has no gradient to guard)"
            )
        if loss.numel() != 1:
            raise ValueError(
                f"loss must be a single value (a 0-dim tensor or a float), got shape "
                f"{tuple(loss.shape)}: reduce a per-sample loss first (loss.mean())"
            )
        return loss.detach().reshape(()).float()
    if isinstance(loss, bool) or not isinstance(loss, (int, float)):
        raise TypeError(f"loss must be a Tensor, a float or None, got {type(loss).__name__}")
    return torch.tensor(float(loss), device=device)


class _Settle:
    """``optimizer.state_dict()``/``model.state_dict()`` settle a pending step first. A weak
    reference, and a copied or pickled object carries no tie to this guard."""

    def __init__(self, guard: Guard) -> None:
        import weakref

        self._ref = weakref.ref(guard)

    def __call__(self, *args: Any) -> None:
        guard = self._ref()
        if guard is not None:
            guard.settle()

    def __reduce__(self) -> tuple[Any, ...]:
        return (_skip._NoHook, ())

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        return _skip._NoHook()


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
        recorder: where rows go (``None``: a :class:`~gradguard.records.recorder.Recorder`,
            ``guard.records``).
        process_group: the group whose ranks must agree (``None``: the default group when
            torch.distributed is initialized).

    Raises:
        TypeError, ValueError: an object of the wrong kind, LBFGS, ReduceLROnPlateau, a
            ``responses`` key that names no signal, a scheduler that cannot be saved when
            snapshots or incidents need it.

    Example:
        >>> guard = Guard(model, optimizer, scheduler)
        >>> loss.backward(); report = guard.step(loss); optimizer.zero_grad()
        >>> report.action
        'step'
    """

    # The device-to-host move of the flag bits (a seam: tests make the CPU read them late).
    _to_host = staticmethod(to_host)

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
        config = GuardConfig() if config is None else config
        if not isinstance(config, GuardConfig):
            raise TypeError(f"config must be a GuardConfig, got {type(config).__name__}")
        check_objects(optimizer, scheduler, scaler, config)
        if recorder is not None and not isinstance(recorder, Recorder):
            raise TypeError(f"recorder must be a Recorder, got {type(recorder).__name__}")
        if config.sync == "lazy" and not _is_fused(optimizer):
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
        self.skip_list = SkipList()
        self.snapshots = SnapshotStore(config.snapshot_dir, config.keep_snapshots)
        self.incidents = (
            IncidentWriter(
                config.incident_dir, config.incident_actions, max_count=config.incident_max
            )
            if config.incident_dir is not None
            else None
        )
        wants_rng = self.incidents is not None or config.snapshot_every > 0
        self.buffers = _skip.BufferKeeper(model, buffers=config.keep_buffers, rng=wants_rng)
        self.lr_scale = _skip.LRScale()
        self.step_count = 0
        self.position = 0
        self.streak_start = 0
        self.stage = Stage.READY
        self._pending: PendingStep | None = None
        self._disarm: list[Callable[[], None]] = []  # undone after the optimizer step
        self._step_hooks: list[Callable[[StepReport], None]] = []
        self._hook_states: list[Any] = []  # what step hooks keep (an EMA): in snapshots
        self._post_hooks: list[Callable[[StepReport, Tensor], None]] = []
        self._names: dict[int, str] = {}
        self._history: collections.deque[dict[str, Any]] = collections.deque(
            maxlen=config.incident_history
        )
        # The optimizer's parameter structure the snapshots were taken with, and the (step,
        # position) the next snapshot stands for when it is not simply now.
        self._structure: tuple[Any, ...] | None = None
        self._snapshot_at: tuple[int, int] | None = None
        # A checkpoint must not catch a step whose flags the host has not read yet. Settling
        # only reads and undoes a scheduler guess: no collective, so one rank may save alone.
        optimizer.register_state_dict_pre_hook(_Settle(self))
        hook = getattr(model, "register_state_dict_pre_hook", None)
        if callable(hook):
            hook(_Settle(self))
        if scheduler is not None and has_state(scheduler):
            _skip.settle_on_read(scheduler, self.settle)
        # Snapshots of an earlier run in snapshot_dir: keep them until resume() (or
        # load_state_dict()) continues that run; a fresh first step raises instead.
        self._earlier_run = (
            [f for _, f in self.snapshots.on_disk()] if config.snapshot_every else []
        )
        if self._earlier_run:
            self.stage = Stage.NEEDS_RESUME

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
    def fused(self) -> bool:
        """The optimizer, as its parameter groups are now, skips a step inside a fused kernel."""
        return _is_fused(self.optimizer)

    @property
    def lazy(self) -> bool:
        """The next guarded step is decided on the device (no host sync on a clean step)."""
        return self._lazy(plain=True)

    @property
    def records(self) -> list[dict[str, Any]]:
        """The rows kept so far (settles the pending step and flushes first: a host sync)."""
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

        Returns:
            The wrapping sampler.
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
        if state is not None and not has_state(state):
            raise TypeError("state must have state_dict() and load_state_dict(), or be None")
        self._step_hooks.append(hook)
        if state is not None:
            self._hook_states.append(state)

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
        self._pending = None
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
        self._structure = self._signature()
        return self.position

    # ------------------------------------------------------------------ the step

    def step(self, loss: Tensor | float | None = None, batch: Any = None) -> StepReport:
        """Guard one optimizer step: replaces ``optimizer.step()`` and ``scheduler.step()``.

        Call it once per optimizer step, after the (last micro-batch's) backward. All or
        nothing: if anything inside raises, the guard and the module buffers are as they were
        before this step's forward, nothing has learned from it, and the exception propagates.

        Args:
            loss: this step's loss, a single floating value (detached here; used by the loss
                detectors and the records).
            batch: this step's batch (a reference, never copied on a clean step): an incident
                bundle holds it (``config.incident_dir``).

        Returns:
            A :class:`StepReport`.

        Raises:
            GuardAbort: the ladder reached ``"abort"`` (the incident is in the records).
            ValueError, TypeError: a loss that is not a single floating value, or no parameter
                with a gradient (nothing changes).
        """
        report = self._before(loss, plain=True, batch=batch)
        s = self._pending
        try:
            if self.stage is Stage.ARMED:
                self._apply()
        except BaseException as e:
            if s is not None and s.phase is Phase.APPLIED:
                e.add_note("gradguard: the optimizer step was applied and counted")
                self.after_optimizer_step()
            else:
                self._abandon(s, restore_buffers=True)
            raise
        self.after_optimizer_step()
        return report

    def before_optimizer_step(
        self, loss: Tensor | float | None = None, batch: Any = None
    ) -> StepReport:
        """For frameworks that call ``optimizer.step()`` themselves: everything up to the step.

        Unscales (AMP), measures, detects, decides and clips. When the step must not be applied
        the framework's next ``optimizer.step()`` and ``scheduler.step()`` become no-ops. Pair
        it with :meth:`after_optimizer_step`; a step that never reached it (the framework's
        ``optimizer.step()`` raised) is abandoned here: nothing learned from it.

        Returns:
            A :class:`StepReport`.
        """
        if self.stage in (Stage.ARMED, Stage.DROPPED):
            self._abandon(self._pending if self.stage is Stage.ARMED else None)
        return self._before(loss, plain=False, batch=batch)

    def after_optimizer_step(self) -> None:
        """Undo the arming, settle buffers and scaler, learn, count the step, snapshot when due.

        Raises:
            RuntimeError: no :meth:`before_optimizer_step` (or :meth:`step`) came first.
        """
        if self.stage not in (Stage.ARMED, Stage.DROPPED):
            raise RuntimeError(
                f"after_optimizer_step() in stage {self.stage.value!r}: call "
                "before_optimizer_step() (or use guard.step()) first"
            )
        self._undo_arming()
        s = self._pending
        if self.stage is Stage.DROPPED or s is None:
            self.stage, self._pending = Stage.READY, None
            self.buffers.fresh = False
            return
        skipped: Tensor | bool = s.skip if s.verdict is None else s.verdict.skipped
        if s.unscaled:
            # The scaler's own overflow lowers its scale; any other skip leaves the scaler alone.
            nonfinite = s.flags[2] > 0
            guard_skip = (
                skipped if isinstance(skipped, bool) else skipped & (nonfinite | ~s.amp_overflow)
            )
            if isinstance(guard_skip, bool) and s.verdict is not None:
                guard_skip = guard_skip and s.verdict.signal != AMP
            _skip.scaler_update(self.scaler, guard_skip, sync=s.verdict is not None)
            s.unscaled = False
        if self.config.keep_buffers:
            self.buffers.settle_(skipped)
        else:
            self.buffers.fresh = False
        self._learn(s)
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
            s.phase = Phase.UNREAD
            # On the CPU the bits are host memory already: reading them costs nothing. A report
            # read during the step has waited for them already.
            if s.verdict is not None or (s.event is None and s.host.device.type == "cpu"):
                rolled_back = self._finish_pending()
        else:
            self._pending = None
            self._conclude(s)
        every = self.config.snapshot_every
        due = every and not rolled_back and self.step_count % every == 0
        if due and not self._finish_pending():
            self.snapshot()

    def settle(self) -> None:
        """Read a pending (sync-free) step's flags and undo a wrong scheduler guess.

        Local to this process: never starts a collective, so one rank may call it alone (a
        checkpoint on rank 0). The verdict's actions run at the next guard call.
        """
        s = self._pending
        if s is None or s.phase is not Phase.UNREAD:
            return
        s.bits = read_bits(s.host, s.event)
        if s.undo is not None and self.responder.skips_on_device(s.bits):
            s.undo.restore(self.optimizer, self.scheduler)
        s.phase = Phase.READ

    def flush(self) -> list[dict[str, Any]]:
        """Settle and act on the pending step, flush the records.

        Returns:
            The rows flushed.
        """
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
                f"step in stage {self.stage.value!r}: call after_optimizer_step() after each "
                "optimizer step"
            )
        params = self._params()
        live = [(i, p) for i, p in enumerate(params) if p.grad is not None]
        device = live[0][1].device if live else torch.device("cpu")
        loss_t = _loss_tensor(loss, device)  # bad input raises before anything changes
        if not live:
            raise ValueError(
                "no parameter the optimizer updates has a gradient: call loss.backward() (or "
                "scaler.scale(loss).backward()) before guard.step(); nothing was changed"
            )
        lazy = self._lazy(plain)  # a sync='lazy' guard whose optimizer is no longer fused raises
        self._take_due_snapshot()
        if self._finish_pending():
            return self._dropped(plain)
        s = None
        try:
            s = self._measure(loss_t, live, plain, lazy)
            if self.incidents is not None:
                s.batch = batch
                self._history.append(s.row)
            self._pending, self.stage = s, Stage.ARMED
            for d in self.detectors:
                before = getattr(d, "before", None)
                if callable(before) and callable(getattr(d, "after", None)):
                    before(self.model)
            if s.lazy:
                if not plain:
                    _skip.arm_found_inf(self.optimizer, s.skip)
                    self._disarm.append(lambda: _skip.disarm_found_inf(self.optimizer))
                    self.lr_scale.apply(self.optimizer)
                return s.report
            s.bits = read_bits(s.host, s.event)
            self._decide(s)
            self._act(s)  # a rollback sets DROPPED; an abort raises
            if self.stage is Stage.DROPPED:
                if not plain:
                    self._noop_framework_step()
                return s.report
            assert s.verdict is not None
            if not plain:
                if s.verdict.skipped:
                    self._noop_framework_step()
                else:
                    self.lr_scale.apply(self.optimizer)
            return s.report
        except GuardAbort:
            raise
        except BaseException:
            self._abandon(s, restore_buffers=plain)
            raise

    def _lazy(self, plain: bool) -> bool:
        """Whether this step goes the sync-free route, read from the objects as they are now."""
        fused = _is_fused(self.optimizer)
        if self.config.sync == "lazy" and not fused:
            raise ValueError(
                "sync='lazy' needs a fused optimizer, and the optimizer's param groups are not "
                "fused now (a loaded checkpoint sets 'fused' too); use sync='auto'"
            )
        if not fused or self.config.sync == "step":
            return False
        if self.scheduler is not None and not has_state(self.scheduler):
            return False  # the scheduler cannot be put back: decide on the host first
        amp = self.scaler is not None and self.scaler.is_enabled()
        return plain or (self.scheduler is None and not amp)

    def _params(self) -> list[Tensor]:
        seen: set[int] = set()
        out = []
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        return out

    def _signature(self) -> tuple[Any, ...]:
        return tuple(tuple(id(p) for p in g["params"]) for g in self.optimizer.param_groups)

    def _name(self, i: int, p: Tensor) -> str:
        name = self._names.get(id(p))
        if name is None:
            self._names = {id(q): n for n, q in self.model.named_parameters()}
            name = self._names.setdefault(id(p), f"optimizer.param.{i}")
        return name

    def _measure(
        self, loss_t: Tensor | None, live: list[tuple[int, Tensor]], plain: bool, lazy: bool
    ) -> PendingStep:
        cfg = self.config
        amp = self.scaler is not None and self.scaler.is_enabled()
        unscaled = amp and (plain or not _skip.scaler_unscaled(self.scaler, self.optimizer))
        if unscaled:
            self.scaler.unscale_(self.optimizer)
        with torch.no_grad():
            grads = [_dense_view(p) for _, p in live]
            names = [self._name(i, p) for i, p in live]
            norms = grad_norms(grads, cfg.norm_type, foreach=cfg.foreach)
            device = grads[0].device
            total = norms.total.float()
            grads_ok = norms.finite
            loss_ok = (
                loss_t.isfinite().to(device)
                if loss_t is not None
                else torch.ones((), dtype=torch.bool, device=device)
            )
            signals = Signals(self.step_count, total, norms.per_tensor, names, grads_ok, loss_t)
            if self.nonfinite_rule is not None:
                bad = self.nonfinite_rule.check(signals).flag.to(device)
            else:
                bad = ~(grads_ok & loss_ok)
            # Under AMP, non-finite gradients are the loss scale's overflow, not an incident.
            amp_overflow = ~grads_ok if amp else torch.zeros_like(grads_ok)
            nonfinite = (~loss_ok | (bad & grads_ok)) if amp else bad
            detections = [d.check(signals) for d in self.detectors]
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
        s = PendingStep(
            self.step_count, self.position, flags, skip, accepted, host, event, row,
            [d.score for d in detections], report, lazy, plain, amp_overflow,
            signals=signals, learn=(norms, clip.learn), unscaled=unscaled and plain,
        )  # fmt: skip
        report._settle = lambda: self._settle_report(s)
        return s

    def _learn(self, s: PendingStep) -> None:
        """The policy and the detectors learn from a step that is being settled (never from a
        step abandoned on the way: learning is the last thing a step does to them)."""
        if s.signals is None:
            return
        norms, learn = s.learn
        with torch.no_grad():
            self.policy.update(norms, learn, s.accepted)
            for d in self.detectors:
                d.update(s.signals, s.accepted)
        s.signals = s.learn = None

    def _settle_report(self, s: PendingStep) -> None:
        """A report's host values were asked for: settle (and act, outside a step) now."""
        if s is self._pending and s.phase is Phase.ARMED:
            # Read during its own step (sync-free mode): decide now, act after the step.
            s.bits = read_bits(s.host, s.event)
            self._decide(s)
            return
        self.settle()
        if self.stage is Stage.READY:
            self._finish_pending()

    def _decide(self, s: PendingStep) -> Verdict:
        assert s.bits is not None
        s.saved_counters = dataclasses.replace(self.counters)
        s.saved_scale, s.saved_streak_start = self.lr_scale.scale, self.streak_start
        if any(s.bits[2:]) and self.counters.streak == 0:
            self.streak_start = s.position
        v = self.responder.decide(s.bits, self.snapshots.has(self.streak_start))
        s.verdict = s.report.verdict = v
        return v

    # ------------------------------------------------------------------ act

    def _apply(self) -> None:
        """The plain loop's optimizer, scheduler and scaler steps."""
        s = self._pending
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
            s.phase = Phase.APPLIED
            if self.scheduler is not None:
                s.undo = _skip.GroupState(self.optimizer, self.scheduler)
                self.scheduler.step()
            return
        assert s.verdict is not None
        if not s.verdict.skipped:
            self.lr_scale.apply(self.optimizer)
            try:
                self.optimizer.step()
            finally:
                self.lr_scale.restore()
        s.phase = Phase.APPLIED
        if not s.verdict.skipped and self.scheduler is not None:
            self.scheduler.step()

    def _noop_framework_step(self) -> None:
        """Make the framework's coming optimizer.step() and scheduler.step() do nothing."""
        params = self._params()
        if not _skip.skips_without_grads(self.optimizer):
            # It may move without gradients (a step counter, schedule-free weights): put it back.
            keeper = _skip.OptimizerKeeper(self.optimizer, params)
            self._disarm.append(lambda: keeper.restore(self.optimizer))
        _skip.drop_grads(params)
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
        one = torch.ones((), dtype=torch.bool)
        return StepReport(
            self.step_count, self.position, nan, nan, nan, one, lambda: verdict, verdict
        )

    def _undo_arming(self) -> None:
        for undo in self._disarm:
            undo()
        self._disarm.clear()
        self.lr_scale.restore()

    def _abandon(self, s: PendingStep | None, restore_buffers: bool = False) -> None:
        """Forget a step that raised before it was settled: the guard as it was before it."""
        self._undo_arming()
        if s is not None:
            if s.saved_counters is not None:
                self.counters.load_state_dict(s.saved_counters.state_dict())
                self.lr_scale.scale, self.streak_start = s.saved_scale, s.saved_streak_start
            if s.unscaled:  # the scaler's unscale_ record must not outlive the step
                _skip.scaler_update(self.scaler, True, sync=True)
            if self._history and self._history[-1] is s.row:
                self._history.pop()
        if restore_buffers and self.config.keep_buffers:
            self.buffers.restore_()
        if self._pending is s:
            self._pending = None
        self.stage = Stage.READY

    def _finish_pending(self) -> bool:
        """Settle and carry out the pending sync-free step's verdict; True when it rolled back."""
        self.settle()
        s = self._pending
        if s is None or s.phase is not Phase.READ:
            return False
        self._pending = None
        if s.verdict is None:
            self._decide(s)
        self._act(s)
        self._conclude(s)
        return s.verdict is not None and s.verdict.action == "rollback"

    def _act(self, s: PendingStep) -> None:
        """Write the incident bundle, then carry the verdict out (back-off, rollback, abort)."""
        v = s.verdict
        assert v is not None
        if self.incidents is not None and v.action in self.incidents.actions:
            path = self._write_incident(s, v)
            if path is not None:
                s.extra["bundle"] = str(path)
        s.extra.update(self.responder.carry_out(v, self, s))
        if v.action == "rollback":
            self._record(s)

    def _conclude(self, s: PendingStep) -> None:
        """A settled step: its records (a rollback's are written when it happens) and hooks."""
        v = s.verdict
        assert v is not None
        if v.action != "rollback":
            self._record(s)
        if not v.skipped:
            for hook in list(self._step_hooks):
                hook(s.report)

    def _record(self, s: PendingStep) -> None:
        v = s.verdict
        assert v is not None
        s.row["action"] = v.action
        self.recorder.log(s.step, **s.row)
        if not v.skipped:
            if v.fired:
                self.recorder.event(
                    s.step, "action", action="log", reason=v.reason, signal=v.fired[0]
                )
            return
        if v.signal != AMP:
            score = s.scores[v.index] if v.index is not None and v.index < len(s.scores) else 1.0
            self.recorder.event(
                s.step, "action", action=v.action, reason=v.reason, signal=v.signal,
                score=score, position=s.position, **{k: x for k, x in s.extra.items()},
            )  # fmt: skip

    def _write_incident(self, s: PendingStep, v: Verdict) -> Any:
        """An incident bundle of ``s``, written before its verdict changes any state, with the
        buffers and RNG state from before the step's forward."""
        assert self.incidents is not None
        cfg = {k: getattr(self.config, k) for k in self.config.__dataclass_fields__}
        amp = self.scaler is not None and self.scaler.is_enabled()
        return self.incidents.write(
            BundleSpec(
                step=s.step, position=s.position, action=v.action, signal=v.signal,
                reason=v.reason, batch=s.batch,
                rng=self.buffers.rng if self.buffers.rng is not None else forward_rng_state(),
                model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                scaler=self.scaler, buffers=self.buffers.before_forward(),
                history=[
                    {k: x.as_dict() if isinstance(x, Named) else x for k, x in row.items()}
                    for row in self._history
                ],
                config=cfg,
                recorded={"loss": s.row["loss"], "grad_norm": s.row["grad_norm"]},
                amp_dtype=torch.float16 if amp else None,
            )
        )  # fmt: skip

    # ------------------------------------------------------------------ the shell's responses

    def backoff(self, factor: float) -> None:
        """Multiply the learning rate of the optimizer steps from now on by ``factor``."""
        self.lr_scale.backoff(factor)

    def roll_back(self, s: PendingStep) -> dict[str, Any]:
        """Restore the newest snapshot from before the bad streak, skip the window on replay."""
        snap = self._agreed(self.streak_start)
        if snap is None:  # a disk snapshot turned out unreadable and none is left
            self.abort(s)
        if s.unscaled and s is self._pending:
            # The scaler consumed this step's unscale_ record before its state is replaced.
            self.scaler.update()
            s.unscaled = False
        self._undo_arming()
        self._restore(snap, full=False)
        start = max(0, self.streak_start - self.config.skip_before)
        end = s.position + self.config.skip_after
        self.skip_list.add(start, end)
        self.position = self.skip_list.next_allowed(self.position)
        if self._pending is s:
            self._pending = None
        self.stage = Stage.DROPPED if self.stage is not Stage.READY else Stage.READY
        return {
            "restored_step": self.step_count,
            "skip_start": start,
            "skip_end": end,
            "resume_position": self.position,
        }

    def abort(self, s: PendingStep) -> NoReturn:
        """Stop training: restore the last snapshot (or leave the pre-streak state), record the
        incident, leave every object usable, raise :class:`GuardAbort`."""
        c = self.counters
        self._undo_arming()
        if s.unscaled:
            _skip.scaler_update(self.scaler, True, sync=True)
            s.unscaled = False
        snap = self._agreed(self.streak_start) if self.snapshots.has() else None
        if snap is not None:
            self._restore(snap, full=False)
            where = f"model and optimizer restored to the snapshot of step {self.step_count}"
        else:
            if self.config.keep_buffers:
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
        self._record(s)
        flat = {k: v for k, v in incident.items() if k not in ("step", "skipped_windows")}
        self.recorder.event(s.step, "incident", **flat)
        self._pending = None
        self.stage = Stage.READY
        raise GuardAbort(
            f"gradguard aborted training at step {s.step} (position {s.position}): "
            f"{incident['reason']}; {where}",
            incident,
        )

    # ------------------------------------------------------------------ snapshots

    def _take_due_snapshot(self) -> None:
        """At the start of a step: the first snapshot, or a new one when the optimizer's
        parameter groups changed (an older snapshot no longer fits the optimizer)."""
        structure = self._signature()
        changed = self._structure is not None and structure != self._structure
        self._structure = structure
        if not self.config.snapshot_every or (self.snapshots.has() and not changed):
            return
        if changed:
            self.snapshots.clear()
        c = self.counters
        # Inside a streak of skips nothing was applied since it began: the state now is the
        # state at its start, and a rollback must be able to go back there.
        label = (self.step_count - c.streak, self.streak_start) if c.streak else None
        self._push_snapshot(*(self._snapshot_at or label or (self.step_count, self.position)))
        self._snapshot_at = None

    def _push_snapshot(self, step: int, position: int) -> None:
        guard = {**self._snapshot_state(), "step": step, "position": position}
        guard["hook_states"] = [h.state_dict() for h in self._hook_states]
        mid_step = self.buffers.fresh  # between a forward and its step: the pre-forward state
        self.snapshots.push(
            capture(
                self.model, self.optimizer, self.scheduler, self.scaler,
                step=step, position=position, guard=guard,
                buffers=self.buffers.before_forward() if mid_step else None,
                rng=self.buffers.rng if mid_step else None,
            )
        )  # fmt: skip

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
        self.policy.load_state_dict(copy.deepcopy(g["policy"]))
        for d, st in zip(self.detectors, g["detectors"]):
            d.load_state_dict(copy.deepcopy(st))
        for h, st in zip(self._hook_states, g.get("hook_states", [])):
            h.load_state_dict(copy.deepcopy(st))
        if full and "counters" in g:
            self.counters.load_state_dict(g["counters"])
            self.skip_list.load_state_dict(g["skip_list"])
            self.streak_start = int(g["streak_start"])
            self.lr_scale.scale = float(g.get("lr_scale", 1.0))
        self.step_count = int(snap["step"])
        self.position = self.skip_list.next_allowed(int(snap["position"]))
        self.buffers.keep_()
        self.responder.refresh()

    # ------------------------------------------------------------------ state

    def _snapshot_state(self) -> dict[str, Any]:
        return {
            "step": self.step_count,
            "position": self.position,
            "policy": self.policy.state_dict(),
            "detectors": [d.state_dict() for d in self.detectors],
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

        Returns:
            A dict of plain values and tensors.
        """
        self.settle()
        s = self._pending
        return {
            "version": STATE_VERSION,
            **self._snapshot_state(),
            "keys": list(self.keys),
            "recorder": self.recorder.state_dict(),
            "pending": s.to_state() if s is not None and s.phase is Phase.READ else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output, before or after the model, optimizer and
        scheduler are loaded: with ``snapshot_every``, the snapshot a rollback returns to is
        taken at the next step, from the objects as they are then.

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
        self._pending = None
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
        self.buffers.fresh = False
        self.snapshots.clear()
        pending = state.get("pending")
        self._snapshot_at = None
        if not self.counters.streak and pending is not None and any(pending["bits"][2:]):
            self._snapshot_at = (int(pending["step"]), int(pending["position"]))  # its streak
        if pending is not None:
            self._pending = PendingStep.from_state(pending, self._finish_pending)
