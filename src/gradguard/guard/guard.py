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
from collections.abc import Callable
from typing import Any, NoReturn

import torch
from torch import Tensor, nn

from gradguard.core.snapshot import (
    SnapshotError,
    SnapshotStore,
    capture,
    forward_rng_state,
    load_snapshot,
    restore,
)
from gradguard.decide.detect import NonFiniteDetector
from gradguard.decide.policies import ClipPolicy
from gradguard.guard import skip as _skip
from gradguard.guard.config import (
    GuardConfig,
    check_objects,
    check_state,
    has_state,
    is_fused,
    sync_free,
)
from gradguard.guard.defaults import default_detectors, default_policy
from gradguard.guard.incident import IncidentWriter
from gradguard.guard.measure import measure
from gradguard.guard.response import AMP, Counters, GuardAbort, Responder, Verdict
from gradguard.guard.rollback import Rollbacks, SkipList, SkipSampler
from gradguard.guard.step import (
    PendingStep,
    Phase,
    Stage,
    StepReport,
    plain_row,
    read_bits,
    to_host,
)
from gradguard.records.bundle import BundleSpec
from gradguard.records.recorder import Named, Recorder

__all__ = ["Guard", "GuardAbort", "GuardConfig", "Stage", "StepReport"]

STATE_VERSION = 2


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
    """``optimizer.state_dict()``/``model.state_dict()`` settle a pending step first; a
    ``load_state_dict()`` into either (``loaded``) makes the guard's snapshots stale. A weak
    reference, and a copied or pickled object carries no tie to this guard."""

    def __init__(self, guard: Guard, loaded: bool = False) -> None:
        import weakref

        self._ref = weakref.ref(guard)
        self._loaded = loaded

    def __call__(self, *args: Any) -> None:
        guard = self._ref()
        if guard is None:
            return
        if self._loaded:
            guard.rollbacks.stale = True
        else:
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
        config = check_objects(model, optimizer, scheduler, scaler, config, recorder)
        self.model, self.optimizer = model, optimizer
        self.scheduler, self.scaler = scheduler, scaler
        self.config, self.process_group = config, process_group
        self.recorder = Recorder(flush_every=config.flush_every) if recorder is None else recorder
        self.policy: ClipPolicy = config.policy if config.policy is not None else default_policy()
        detectors = list(config.detectors) if config.detectors is not None else default_detectors()
        nonfinite = [d for d in detectors if isinstance(d, NonFiniteDetector)]
        self.nonfinite_rule: NonFiniteDetector | None = nonfinite[0] if nonfinite else None
        self.detectors = [d for d in detectors if not isinstance(d, NonFiniteDetector)]
        for decider in (self.policy, *detectors):  # their arithmetic, compiled or eager
            decider.fuse = config.compile
        c = config
        self.responder = Responder(
            self.detectors, c.responses, c.default_response, c.budgets, c.backoff_factor
        )
        self.responder.fuse = c.compile
        self.rollbacks = Rollbacks(
            c.snapshot_every, c.snapshot_dir, c.keep_snapshots, c.skip_before, c.skip_after
        )
        self.incidents = (
            IncidentWriter(c.incident_dir, c.incident_actions, max_count=c.incident_max)
            if c.incident_dir is not None
            else None
        )
        wants_rng = self.incidents is not None or config.snapshot_every > 0
        self.buffers = _skip.BufferKeeper(model, buffers=config.keep_buffers, rng=wants_rng)
        self.lr_scale = _skip.LRScale()
        self.step_count, self.position, self.stage = 0, 0, Stage.READY
        self._jumps = 0  # rollbacks, resumes and state loads: the position moved elsewhere
        self._pending: PendingStep | None = None
        self._disarm: list[Callable[[], None]] = []  # undone after the optimizer step
        self._step_hooks: list[Callable[[StepReport], None]] = []
        self._hook_states: list[Any] = []  # what step hooks keep (an EMA): in snapshots
        self._post_hooks: list[Callable[[StepReport, Tensor], None]] = []
        self._names: dict[int, str] = {}
        self._history: collections.deque[dict[str, Any]] = collections.deque(
            maxlen=config.incident_history
        )
        # A checkpoint must not catch a step whose flags the host has not read yet. Settling
        # only reads and undoes a scheduler guess: no collective, so one rank may save alone.
        # A checkpoint loaded into either makes the snapshots of another trajectory.
        for obj in (optimizer, model):
            obj.register_state_dict_pre_hook(_Settle(self))
            obj.register_load_state_dict_post_hook(_Settle(self, loaded=True))
        if scheduler is not None and has_state(scheduler):
            _skip.settle_on_read(scheduler, self.settle)
        # Snapshots of an earlier run in snapshot_dir: keep them until resume() (or
        # load_state_dict()) continues that run; a fresh first step raises instead.
        self._earlier_run = [f for _, f in self.snapshots.on_disk()] if c.snapshot_every else []
        self.stage = Stage.NEEDS_RESUME if self._earlier_run else Stage.READY

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
    def snapshots(self) -> SnapshotStore:
        """The snapshots a rollback returns to."""
        return self.rollbacks.store

    @property
    def skip_list(self) -> SkipList:
        """The bad windows of data positions that rollbacks found."""
        return self.rollbacks.skip_list

    @property
    def fused(self) -> bool:
        """The optimizer, as its parameter groups are now, skips a step inside a fused kernel."""
        return is_fused(self.optimizer)

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
        (gradient accumulation). Exact with ``num_workers=0``; with worker processes, which ask
        for batches ahead, each batch comes once, and after a rollback the batches already
        fetched arrive first (see docs/guard.md).

        Returns:
            The wrapping sampler.
        """
        return SkipSampler(
            sampler,
            self.should_skip,
            per_step=per_step,
            position=lambda: self.position,
            drop=self.drop_batch,
            version=lambda: len(self.skip_list),  # positions skipped: grows as windows merge
            horizon=lambda: self.snapshots.oldest(),
            jumps=lambda: self._jumps,
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
        self.rollbacks.seen(self.optimizer)
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
            if s.verdict is not None:
                guard_skip: Tensor | bool = s.verdict.skipped and s.verdict.signal != AMP
            else:
                guard_skip = s.skip & ((s.flags[2] > 0) | ~s.amp_overflow)
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
        # Not inside a streak of skips: nothing was applied since it began, and a snapshot
        # taken now would push out the one from before it that a rollback returns to.
        if due and not self._finish_pending() and not self.counters.streak:
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
                    self._noop_framework_step(amp_overflow=s.verdict.signal == AMP)
                else:
                    self.lr_scale.apply(self.optimizer)
            return s.report
        except GuardAbort:
            raise
        except BaseException:
            self._abandon(s, restore_buffers=plain)
            raise

    def _lazy(self, plain: bool) -> bool:
        return sync_free(self.optimizer, self.scheduler, self.scaler, self.config.sync, plain)

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

    def _measure(
        self, loss_t: Tensor | None, live: list[tuple[int, Tensor]], plain: bool, lazy: bool
    ) -> PendingStep:
        cfg = self.config
        amp = self.scaler is not None and self.scaler.is_enabled()
        unscaled = amp and (plain or not _skip.scaler_unscaled(self.scaler, self.optimizer))
        if unscaled:
            self.scaler.unscale_(self.optimizer)
        names = [self._name(i, p) for i, p in live]
        m = measure(
            [_dense_view(p) for _, p in live], names, loss_t, step=self.step_count, amp=amp,
            policy=self.policy, detectors=self.detectors, nonfinite_rule=self.nonfinite_rule,
            responder=self.responder, model=self.model, norm_type=cfg.norm_type,
            foreach=cfg.foreach, process_group=self.process_group,
        )  # fmt: skip
        host, event = self._to_host(m.flags)
        total, clip = m.signals.total_norm, m.clip
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
            per = m.norms.per_tensor
            same = all(n.device == per[0].device for n in per)
            # One stacked tensor per step instead of one queued tensor per layer.
            row["layers"] = Named(names, torch.stack(per)) if same else dict(zip(names, per))
        report = StepReport(
            self.step_count, self.position, total, clip.total, clip.threshold,
            m.signals.finite, self.settle,
        )  # fmt: skip
        s = PendingStep(
            self.step_count, self.position, m.flags, m.skip, m.accepted, host, event, row,
            m.scores, report, lazy, plain, m.amp_overflow, signals=m.signals,
            learn=(m.norms, clip.learn), unscaled=unscaled and plain,
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
        rb = self.rollbacks
        s.saved_scale, s.saved_streak_start = self.lr_scale.scale, rb.streak_start
        if any(s.bits[2:]) and self.counters.streak == 0:
            rb.streak_start = s.position
        v = self.responder.decide(s.bits, rb.store.has(rb.streak_start))
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

    def _noop_framework_step(self, amp_overflow: bool = False) -> None:
        """Make the framework's coming optimizer.step() and scheduler.step() do nothing, and
        put back what its scaler.step()/update() change for a step the guard skipped."""
        params = self._params()
        if not _skip.skips_without_grads(self.optimizer):
            # It may move without gradients (a step counter, schedule-free weights): put it back.
            keeper = _skip.OptimizerKeeper(self.optimizer, params)
            self._disarm.append(lambda: self._own_load(keeper.restore, self.optimizer))
        _skip.drop_grads(params)
        if self.scheduler is not None:
            self._disarm.append(_skip.noop_scheduler_step(self.scheduler))
        scaler = self.scaler
        if scaler is not None and scaler.is_enabled() and not amp_overflow:
            # The framework's scaler.update() would count an incident as an overflow (lower the
            # scale) or as a good step (growth): the scaler's business only on its own overflow.
            kept = scaler.state_dict()
            self._disarm.append(lambda: scaler.load_state_dict(kept))

    def _dropped(self, plain: bool) -> StepReport:
        """The report of a batch computed before a rollback: it is not applied."""
        self.stage = Stage.DROPPED
        if not plain:
            self._noop_framework_step()
        return StepReport.dropped(self.step_count, self.position)

    def _release_scaler(self, s: PendingStep) -> None:
        """A step that ends without its scaler update (abandoned, aborted): its unscale_
        record, this guard's or the framework's, must not outlive it, or the next unscale_()
        raises. The scale and its growth stay as they were."""
        scaler = self.scaler
        if s.unscaled or (
            scaler is not None
            and scaler.is_enabled()
            and _skip.scaler_unscaled(scaler, self.optimizer)
        ):
            _skip.scaler_update(scaler, True, sync=True)
        s.unscaled = False

    def _own_load(self, load: Callable[..., Any], *args: Any) -> None:
        """A load the guard does itself: the snapshots still fit (not a user's checkpoint)."""
        stale = self.rollbacks.stale
        load(*args)
        self.rollbacks.stale = stale

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
                self.lr_scale.scale = s.saved_scale
                self.rollbacks.streak_start = s.saved_streak_start
            self._release_scaler(s)
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
            path = self.incidents.write(self._bundle_spec(s, v))
            if path is not None:
                s.extra["bundle"] = str(path)
        s.extra.update(self.responder.carry_out(v, self, s))
        if v.action == "rollback":
            s.record(self.recorder)

    def _conclude(self, s: PendingStep) -> None:
        """A settled step: its records (a rollback's are written when it happens) and hooks."""
        v = s.verdict
        assert v is not None
        if v.action != "rollback":
            s.record(self.recorder)
        if not v.skipped:
            for hook in list(self._step_hooks):
                hook(s.report)

    def _bundle_spec(self, s: PendingStep, v: Verdict) -> BundleSpec:
        """What the incident bundle of ``s`` holds: written before its verdict changes any
        state, with the buffers and RNG state from before the step's forward."""
        amp = self.scaler is not None and self.scaler.is_enabled()
        return BundleSpec(
            step=s.step, position=s.position, action=v.action, signal=v.signal, reason=v.reason,
            batch=s.batch, rng=self.buffers.rng or forward_rng_state(), model=self.model,
            optimizer=self.optimizer, scheduler=self.scheduler, scaler=self.scaler,
            buffers=self.buffers.before_forward(), history=[plain_row(r) for r in self._history],
            config={k: getattr(self.config, k) for k in self.config.__dataclass_fields__},
            recorded={"loss": s.row["loss"], "grad_norm": s.row["grad_norm"]},
            amp_dtype=torch.float16 if amp else None,
        )  # fmt: skip

    # ------------------------------------------------------------------ the shell's responses

    def backoff(self, factor: float) -> None:
        """Multiply the learning rate of the optimizer steps from now on by ``factor``."""
        self.lr_scale.backoff(factor)

    def roll_back(self, s: PendingStep) -> dict[str, Any]:
        """Restore the newest snapshot from before the bad streak, skip the window on replay."""
        snap = self._agreed(self.rollbacks.streak_start)
        if snap is None:  # a disk snapshot turned out unreadable and none is left
            self.abort(s)
        if s.unscaled and s is self._pending:
            # The scaler consumed this step's unscale_ record before its state is replaced.
            self.scaler.update()
            s.unscaled = False
        self._undo_arming()
        self._restore(snap, full=False)
        start, end = self.rollbacks.window(s.position)
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
        self._undo_arming()
        self._release_scaler(s)
        snap = self._agreed(self.rollbacks.streak_start) if self.snapshots.has() else None
        if snap is not None:
            self._restore(snap, full=False)
            where = f"model and optimizer restored to the snapshot of step {self.step_count}"
        else:
            if self.config.keep_buffers:
                self.buffers.settle_(True)  # the aborted batch's forward changed them
            finite = all(bool(p.isfinite().all()) for p in self._params())
            where = (
                f"model and optimizer hold the state before the streak began (position "
                f"{self.rollbacks.streak_start}): the flagged steps were not applied"
                + ("" if finite else "; the weights were already non-finite then")
            )
        error = GuardAbort.of(s, where, self.counters, self.skip_list.windows)
        s.record(self.recorder)
        self.recorder.event(s.step, "incident", **error.row())
        self._pending = None
        self.stage = Stage.READY
        raise error

    # ------------------------------------------------------------------ snapshots

    def _take_due_snapshot(self) -> None:
        """At the start of a step: the first snapshot, or a new one when the optimizer's
        parameter groups changed (an older snapshot no longer fits the optimizer)."""
        at = self.rollbacks.due(
            self.optimizer, self.counters.streak, self.step_count, self.position
        )
        if at is not None:
            self._push_snapshot(*at)

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
            self.rollbacks.load_state_dict(g)
            self.lr_scale.scale = float(g.get("lr_scale", 1.0))
        self.step_count = int(snap["step"])
        self.position = self.skip_list.next_allowed(int(snap["position"]))
        self._jumps += 1  # a skip sampler follows the position now (rollback.SkipSampler)
        self.buffers.keep_()
        self.responder.refresh()
        self.rollbacks.stale = False  # the guard's own load: the snapshots still fit

    # ------------------------------------------------------------------ state

    def _snapshot_state(self) -> dict[str, Any]:
        return {
            "step": self.step_count,
            "position": self.position,
            "policy": self.policy.state_dict(),
            "detectors": [d.state_dict() for d in self.detectors],
            **self.rollbacks.state_dict(),
            "counters": self.counters.state_dict(),
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
        check_state(state, STATE_VERSION, len(self.detectors))
        self.responder.load_state_dict(state)
        self._pending = None
        self._earlier_run = []
        self.stage = Stage.READY
        self.policy.load_state_dict(state["policy"])
        for d, st in zip(self.detectors, state["detectors"]):
            d.load_state_dict(st)
        self.step_count = int(state["step"])
        self.position = int(state["position"])
        self._jumps += 1
        self.rollbacks.load_state_dict(state)
        self.lr_scale.scale = float(state.get("lr_scale", 1.0))
        self.recorder.load_state_dict(state["recorder"])
        self.buffers.fresh = False
        self.snapshots.clear()
        pending = state.get("pending")
        self.rollbacks.due_at = None
        if not self.counters.streak and pending is not None and any(pending["bits"][2:]):
            self.rollbacks.due_at = (int(pending["step"]), int(pending["position"]))  # a streak
        if pending is not None:
            self._pending = PendingStep.from_state(pending, self._finish_pending)
