"""Hugging Face ``transformers.Trainer``: guard each optimizer step before it happens.

Where the guard sits in the Trainer's loop (transformers 5.x, ``Trainer._run_epoch``)::

    training_step (forward, backward) x gradient_accumulation_steps
    if max_grad_norm > 0: accelerator.clip_grad_norm_(...)   # HF clips here
    callbacks.on_pre_optimizer_step      <- guard.before_optimizer_step(loss): measure, decide, clip
    optimizer.step()                     <- a no-op on a skipped step (gradients set to None)
    callbacks.on_optimizer_step          (after the step: too late to guard, see below)
    lr_scheduler.step()                  <- a no-op on a skipped step
    callbacks.on_step_end                <- guard.after_optimizer_step()
    log (every logging_steps)            <- the guard's numbers join the logs

Three interactions with HF, and what this module does about them:

* HF clips *before* ``on_pre_optimizer_step`` when ``max_grad_norm > 0`` (the default is 1.0),
  so the guard would measure already-clipped gradients and its policy would learn from them.
  :class:`GuardCallback` refuses that with a ValueError saying what to do, since
  ``max_grad_norm=1.0`` may be HF's default rather than a choice: ``max_grad_norm=0`` gives the
  guard's own default clip (``MedianClip``: relative to the run's norms, no unit), as
  ``Guard(model, optimizer)`` has; ``take_over_clipping=True`` keeps HF's absolute cap: it sets
  ``args.max_grad_norm = 0`` and, when the config names no policy, clips with
  ``FixedThreshold(max_grad_norm)``, which is HF's clipping done by the guard (a constant in
  gradient units: a summed loss or a wide model has its learning rate cut by it).
* ``on_optimizer_step`` runs after ``optimizer.step()``: a callback that clips or skips there
  does nothing. The guard acts in ``on_pre_optimizer_step``.
* ``logging_nan_inf_filter`` (on by default) replaces a NaN/inf loss in HF's ``loss`` by the
  average of the previous ones. The guard logs the raw loss as ``guard/loss``: a NaN stays NaN.

:class:`GuardedTrainer` (a ``Trainer`` subclass, or :class:`GuardedTrainerMixin` for your own
subclass) adds the callback for you, hands it the exact loss ``training_step`` returns, puts the
guard's numbers into ``Trainer.log`` (so every ``report_to`` integration sees them) and restores
the guard's state from ``train(resume_from_checkpoint=...)``. The plain :class:`GuardCallback`
works with an unmodified ``Trainer``: it reads the loss from the model output, adds its numbers
in ``on_log`` (``trainer.state.log_history`` and the callbacks after it see them) and restores
from ``output_dir/checkpoint-<step>``.

Example:
    >>> trainer = GuardedTrainer(model=model, args=TrainingArguments(..., max_grad_norm=0.0),
    ...                          train_dataset=ds)
    >>> trainer.train()
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from gradguard.decide.policies import FixedThreshold
from gradguard.guard.guard import Guard, GuardConfig
from gradguard.integrations._metrics import RowBuffer, check_adapter_args, window_metrics
from gradguard.records.recorder import Recorder

__all__ = ["STATE_FILE", "GuardCallback", "GuardedTrainer", "GuardedTrainerMixin"]

logger = logging.getLogger(__name__)

STATE_FILE = "gradguard.pt"  # written into each HF checkpoint folder


def _checkpoint_dir(args: TrainingArguments, state: TrainerState) -> str:
    """The folder ``Trainer._save_checkpoint`` writes at this step."""
    return os.path.join(str(args.output_dir), f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")


class GuardCallback(TrainerCallback):
    """A ``TrainerCallback`` that guards every optimizer step of a ``transformers.Trainer``.

    Args:
        config: the guard's :class:`~gradguard.guard.guard.GuardConfig` (``None``: defaults).
        recorder: where the guard's rows also go (``None``: kept in memory,
            ``callback.guard.records``).
        process_group: the ranks that must agree on every decision (``None``: the default
            group when torch.distributed is initialized).
        take_over_clipping: when ``args.max_grad_norm > 0``, set it to 0 and let the guard clip
            (with ``FixedThreshold(max_grad_norm)`` unless the config names a policy) instead of
            raising.
        log_layers: add each parameter's gradient norm to the logs (``guard/layer/<name>``).
        prefix: metric name prefix.

    Attributes:
        guard: the :class:`~gradguard.guard.guard.Guard`, built in ``on_train_begin``.
        resume_from: a checkpoint folder whose ``gradguard.pt`` ``on_train_begin`` loads
            (:class:`GuardedTrainer` sets it from ``train(resume_from_checkpoint=...)``).

    Example:
        >>> trainer = Trainer(model, TrainingArguments(..., max_grad_norm=0.0),
        ...                   train_dataset=ds, callbacks=[GuardCallback()])
    """

    def __init__(
        self,
        config: GuardConfig | None = None,
        *,
        recorder: Recorder | None = None,
        process_group: Any = None,
        take_over_clipping: bool = False,
        log_layers: bool = False,
        prefix: str = "guard/",
    ) -> None:
        check_adapter_args(config, recorder, prefix)
        self.config = config
        self.recorder = recorder
        self.process_group = process_group
        self.take_over_clipping = bool(take_over_clipping)
        self.log_layers = bool(log_layers)
        self.prefix = prefix
        self.guard: Guard | None = None
        self.resume_from: str | None = None
        self._pending_state: dict[str, Any] | None = None
        self._buffer = RowBuffer()
        self._losses: list[Tensor] = []
        self._loss_from_trainer = False  # GuardedTrainer feeds the loss; else a forward hook
        self._summed = False  # the step's loss is the sum (not the mean) of the micro-batches
        self._hook: Any = None
        # The last training micro-batch as the model got it: an incident bundle holds it.
        self.batch: Any = None

    # ------------------------------------------------------------------ setup

    def _check_clipping(self, args: TrainingArguments) -> GuardConfig | None:
        if not args.max_grad_norm or args.max_grad_norm <= 0:
            return self.config
        if not self.take_over_clipping:
            raise ValueError(
                f"TrainingArguments(max_grad_norm={args.max_grad_norm}) makes the Trainer clip "
                "the gradients before on_pre_optimizer_step, so the guard would measure clipped "
                "norms. Set max_grad_norm=0 and let the guard clip: with its defaults (a "
                "threshold relative to the run's own norms, no unit), or with GuardConfig("
                f"policy=FixedThreshold({args.max_grad_norm})) to clip like HF at an absolute "
                "cap; take_over_clipping=True to GuardCallback/GuardedTrainer does the latter"
            )
        config = self.config if self.config is not None else GuardConfig()
        if config.policy is None:
            config = replace(config, policy=FixedThreshold(args.max_grad_norm))
        logger.warning(
            "gradguard takes over clipping: max_grad_norm=%s -> 0; the guard clips with %s",
            args.max_grad_norm,
            type(config.policy).__name__,
        )
        args.max_grad_norm = 0.0
        return config

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: torch.nn.Module | None = None,
        optimizer: Any = None,
        lr_scheduler: Any = None,
        **kwargs: Any,
    ) -> None:
        if model is None or optimizer is None:
            raise ValueError("GuardCallback needs the Trainer's model and optimizer")
        config = self._check_clipping(args)
        # The Trainer's optimizer is accelerate's AcceleratedOptimizer: it holds the fp16 loss
        # scaler and steps the torch optimizer inside through it. The guard works on that inner
        # optimizer, so GradScaler sees one optimizer (unscaled once, by the guard) and a skip
        # (gradients set to None) reaches the real step.
        scaler = getattr(optimizer, "scaler", None)
        inner = getattr(optimizer, "optimizer", optimizer)
        self.guard = Guard(
            model,
            inner if isinstance(inner, torch.optim.Optimizer) else optimizer,
            scheduler=lr_scheduler,
            scaler=scaler,
            config=config,
            recorder=self.recorder,
            process_group=self.process_group,
        )
        if self._buffer not in self.guard.recorder.sinks:
            self.guard.recorder.sinks.append(self._buffer)
        if self._pending_state is not None:
            state_, self._pending_state = self._pending_state, None
            self.load_state_dict(state_)
        self._load_checkpoint(args, state)
        if not self._loss_from_trainer and self._hook is None:
            self._hook = model.register_forward_hook(self._capture_loss, with_kwargs=True)

    def _load_checkpoint(self, args: TrainingArguments, state: TrainerState) -> None:
        folder = self.resume_from
        if folder is None and state.global_step > 0:
            folder = _checkpoint_dir(args, state)
        self.resume_from = None
        if folder is None:
            return
        path = os.path.join(folder, STATE_FILE)
        if not os.path.isfile(path):
            logger.warning("gradguard: no %s in %s; the guard starts afresh", STATE_FILE, folder)
            return
        self.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))

    # ------------------------------------------------------------------ the step

    def _capture_loss(
        self, module: torch.nn.Module, args: Any, kwargs: dict[str, Any], output: Any
    ) -> None:
        if not module.training or not torch.is_grad_enabled():
            return  # evaluation forward passes are not part of the step
        if not self._loss_from_trainer:
            self.batch = kwargs or args
        loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
        if isinstance(loss, Tensor):
            self._losses.append(loss.detach().float().mean())
            # With num_items_in_batch the model divides by the items of the whole accumulated
            # step, so the micro-batch losses add up to the step's loss; else each is a mean.
            self._summed = self._summed or kwargs.get("num_items_in_batch") is not None

    def add_loss(self, loss: Tensor) -> None:
        """Feed one micro-batch's loss as ``Trainer.training_step`` returns it (scaled for
        gradient accumulation, so the losses of a step add up). :class:`GuardedTrainer` calls
        this."""
        self._loss_from_trainer = True
        self._summed = True
        self._losses.append(loss.detach().float().reshape(-1)[0])

    def _step_loss(self) -> Tensor | None:
        if not self._losses:
            return None
        stacked = torch.stack([t.to(self._losses[0].device) for t in self._losses])
        loss = stacked.sum() if self._summed else stacked.mean()
        self._losses, self._summed = [], self._loss_from_trainer
        return loss

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.guard is not None:
            self.guard.before_optimizer_step(self._step_loss(), batch=self.batch)

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        # Not on_optimizer_step: HF steps the LR scheduler after that event, and the guard must
        # keep the scheduler disarmed until then on a skipped step.
        if self.guard is not None:
            self.guard.after_optimizer_step()

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self.guard is not None:
            self.guard.flush()

    # ------------------------------------------------------------------ logs

    def metrics(self) -> dict[str, float]:
        """The guard's numbers for the steps since the last call (one flush of the records):
        raw loss, pre/post-clip norm, threshold, lr, clip and skip rates, skip counts."""
        if self.guard is None:
            return {}
        self.guard.flush()
        out = window_metrics(self._buffer.drain(), self.prefix, self.log_layers)
        if out:
            c = self.guard.counters
            out[f"{self.prefix}skipped"] = c.skips
            out[f"{self.prefix}amp_skipped"] = c.amp_skips
            out[f"{self.prefix}rollbacks"] = c.rollbacks
        return out

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if logs is None or f"{self.prefix}grad_norm" in logs or "loss" not in logs:
            return  # GuardedTrainer.log added them already, or not a training log
        extra = self.metrics()
        logs.update(extra)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)

    # ------------------------------------------------------------------ state

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.guard is None or not args.should_save:
            return
        folder = _checkpoint_dir(args, state)
        if os.path.isdir(folder):
            torch.save(self.state_dict(), os.path.join(folder, STATE_FILE))

    def state_dict(self) -> dict[str, Any]:
        """The guard's state (what ``gradguard.pt`` in a checkpoint holds); ``{}`` before
        training started, or the loaded state still waiting for the guard."""
        if self.guard is None:
            return dict(self._pending_state) if self._pending_state is not None else {}
        return {"guard": self.guard.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; before training starts the state waits for the guard
        (a checkpoint's ``gradguard.pt`` found at ``on_train_begin`` replaces it)."""
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict, got {type(state).__name__}")
        if not state:
            return
        if "guard" not in state:
            raise ValueError("GuardCallback.load_state_dict: the state lacks the key 'guard'")
        if self.guard is None:
            self._pending_state = dict(state)
            return
        self.guard.load_state_dict(state["guard"])
        self._buffer.drain()  # restored rows were logged by the run that saved them


class GuardedTrainerMixin:
    """Mix into a ``transformers.Trainer`` subclass to guard it (see :class:`GuardedTrainer`).

    Adds a :class:`GuardCallback` (or uses the one in ``callbacks``), feeds it the exact loss of
    ``training_step``, puts its numbers into ``Trainer.log`` and restores its state on
    ``train(resume_from_checkpoint=...)``.

    Args:
        guard_config: the :class:`~gradguard.guard.guard.GuardConfig` of the added callback.
        take_over_clipping: see :class:`GuardCallback`.
        *args, **kwargs: the ``Trainer``'s own.
    """

    def __init__(
        self,
        *args: Any,
        guard_config: GuardConfig | None = None,
        take_over_clipping: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        callbacks = self.callback_handler.callbacks  # type: ignore[attr-defined]
        found = [cb for cb in callbacks if isinstance(cb, GuardCallback)]
        if found:
            self.guard_callback = found[0]
            callbacks.remove(self.guard_callback)
        else:
            self.guard_callback = GuardCallback(guard_config, take_over_clipping=take_over_clipping)
        # First in line: its on_step_end disarms the guard's scheduler no-op before any other
        # callback looks at (or saves) the scheduler.
        callbacks.insert(0, self.guard_callback)
        self.guard_callback._loss_from_trainer = self.guard_callback._summed = True

    @property
    def guard(self) -> Guard:
        """The :class:`~gradguard.guard.guard.Guard` (built when training starts)."""
        if self.guard_callback.guard is None:
            raise RuntimeError("the guard is built when training starts (trainer.train())")
        return self.guard_callback.guard

    def training_step(self, *args: Any, **kwargs: Any) -> Tensor:
        loss: Tensor = super().training_step(*args, **kwargs)  # type: ignore[misc]
        self.guard_callback.add_loss(loss)
        self.guard_callback.batch = args[1] if len(args) > 1 else kwargs.get("inputs")
        return loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs:
            logs.update(self.guard_callback.metrics())
        super().log(logs, *args, **kwargs)  # type: ignore[misc]

    def train(
        self,
        resume_from_checkpoint: str | bool | None = None,
        trial: Any = None,
        ignore_keys_for_eval: list[str] | None = None,
    ) -> Any:
        folder = resume_from_checkpoint
        if folder is True:
            folder = get_last_checkpoint(self.args.output_dir)  # type: ignore[attr-defined]
        if isinstance(folder, str):
            self.guard_callback.resume_from = folder
        return super().train(  # type: ignore[misc]
            resume_from_checkpoint=resume_from_checkpoint,
            trial=trial,
            ignore_keys_for_eval=ignore_keys_for_eval,
        )


class GuardedTrainer(GuardedTrainerMixin, Trainer):
    """A ``transformers.Trainer`` whose every optimizer step is guarded.

    Example:
        >>> args = TrainingArguments("out", max_grad_norm=0.0, logging_steps=10)
        >>> trainer = GuardedTrainer(model=model, args=args, train_dataset=ds,
        ...                          guard_config=GuardConfig(policy=FixedThreshold(1.0)))
        >>> trainer.train()
        >>> trainer.guard.counters.skips
    """
