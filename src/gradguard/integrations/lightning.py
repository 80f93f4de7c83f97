"""PyTorch Lightning: guard every optimizer step of a ``lightning.Trainer`` with one callback.

Wiring, by Lightning hook (Lightning 2.x):

* ``setup``: refuse ``Trainer(gradient_clip_val=...)``: Lightning clips right after
  ``on_before_optimizer_step``, so it would clip a second time, after the guard, with another
  threshold. Set ``gradient_clip_val=None`` and give the guard the threshold instead.
* ``on_train_start`` (optimizers, schedulers and a checkpoint's states are loaded by then): build
  the :class:`~gradguard.guard.guard.Guard` over the module, its optimizer, its LR scheduler and the
  AMP scaler, and load the guard state a checkpoint brought.
* ``on_before_backward``: keep the step's loss (summed over accumulated micro-batches, divided
  by the AMP loss scale) for the loss-spike detector and the records.
* ``on_before_optimizer_step`` (gradients accumulated, AMP-unscaled, not yet clipped):
  ``guard.before_optimizer_step(loss)``; a skipped step turns Lightning's coming
  ``optimizer.step()`` and LR ``scheduler.step()`` into no-ops.
* ``on_train_batch_end`` (after the optimizer and scheduler steps):
  ``guard.after_optimizer_step()``; on logging steps the guard's rows go to every Lightning
  logger (``logger.log_metrics``): pre/post-clip norm, threshold, loss, clip rate, skips and
  per-layer gradient norms.
* ``state_dict``/``load_state_dict``: the guard's state travels in Lightning checkpoints.

Example:
    >>> trainer = lightning.Trainer(callbacks=[GuardCallback()])
    >>> trainer.fit(model, loader)
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from torch import Tensor

from gradguard.guard.guard import Guard, GuardConfig
from gradguard.integrations._metrics import RowBuffer, check_adapter_args, step_metrics
from gradguard.records.recorder import Recorder

__all__ = ["GuardCallback"]


class GuardCallback(pl.Callback):
    """Guard a Lightning run: adaptive clipping, skipped bad steps, metrics in the loggers.

    Args:
        config: the guard's :class:`~gradguard.guard.guard.GuardConfig` (``None``: defaults).
        recorder: where the guard's rows also go (``None``: kept in memory,
            ``callback.guard.records``); the callback adds a sink that feeds the loggers.
        process_group: the ranks that must agree on every decision (``None``: the default
            group under DDP).
        log_layers: log each parameter's gradient norm as ``{prefix}layer/<name>``.
        prefix: metric name prefix.

    Attributes:
        guard: the :class:`~gradguard.guard.guard.Guard`, built when training starts.

    Example:
        >>> cb = GuardCallback(GuardConfig(policy=FixedThreshold(1.0)))
        >>> lightning.Trainer(callbacks=[cb], gradient_clip_val=None).fit(model, loader)
        >>> cb.guard.counters.skips
    """

    def __init__(
        self,
        config: GuardConfig | None = None,
        *,
        recorder: Recorder | None = None,
        process_group: Any = None,
        log_layers: bool = True,
        prefix: str = "guard/",
    ) -> None:
        check_adapter_args(config, recorder, prefix)
        self.config = config
        self.recorder = recorder
        self.process_group = process_group
        self.log_layers = bool(log_layers)
        self.prefix = prefix
        self.guard: Guard | None = None
        self._buffer = RowBuffer()
        self._pending_state: dict[str, Any] | None = None
        self._loss: Tensor | None = None
        self._batch: Any = None  # the batch as Lightning hands it: an incident bundle holds it
        self._stepped = False
        self._steps = 0  # step rows written to the loggers, and how many of them were clipped
        self._clipped = 0

    # ------------------------------------------------------------------ setup

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and trainer.gradient_clip_val:
            raise ValueError(
                f"GuardCallback: Trainer(gradient_clip_val={trainer.gradient_clip_val}) makes "
                "Lightning clip after the guard has clipped, with a second threshold. Set "
                "Trainer(gradient_clip_val=None) and give the guard the threshold, e.g. "
                f"GuardCallback(GuardConfig(policy=FixedThreshold({trainer.gradient_clip_val})))"
            )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if len(trainer.optimizers) != 1:
            raise ValueError(
                f"GuardCallback guards one optimizer, this module has {len(trainer.optimizers)}"
            )
        configs = trainer.lr_scheduler_configs
        scheduler = configs[0].scheduler if len(configs) == 1 else None
        if len(configs) > 1:
            raise ValueError("GuardCallback supports at most one LR scheduler")
        self.guard = Guard(
            pl_module,
            trainer.optimizers[0],
            scheduler=scheduler,
            scaler=getattr(trainer.precision_plugin, "scaler", None),
            config=self.config,
            recorder=self.recorder,
            process_group=self.process_group,
        )
        if self._buffer not in self.guard.recorder.sinks:
            self.guard.recorder.sinks.append(self._buffer)
        if self._pending_state is not None:
            self._load(self._pending_state)
            self._pending_state = None

    # ------------------------------------------------------------------ the step

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch = batch

    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor
    ) -> None:
        loss = loss.detach().float()
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            # Lightning hands the hook the scaled loss; divide by the scale tensor on the device
            # (GradScaler.get_scale() would read it back to the host every step).
            scale = getattr(scaler, "_scale", None)
            loss = loss / (scale.to(loss.device) if scale is not None else scaler.get_scale())
        # Accumulated micro-batches: Lightning divides each loss by their count, so the sum is
        # the step's loss.
        self._loss = loss if self._loss is None else self._loss + loss

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        if self.guard is None:
            return
        self.guard.before_optimizer_step(self._loss, batch=self._batch)
        self._loss = None
        self._stepped = True

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self.guard is None or not self._stepped:
            return  # an accumulating micro-batch: no optimizer step yet
        self._stepped = False
        self.guard.after_optimizer_step()
        every = max(1, int(getattr(trainer, "log_every_n_steps", 1) or 1))
        if trainer.global_step % every == 0:
            self._log(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.guard is not None:
            self._log(trainer)

    def _log(self, trainer: pl.Trainer) -> None:
        """Flush the guard (one transfer) and write its new rows to every logger."""
        assert self.guard is not None
        self.guard.flush()
        rows = [r for r in self._buffer.drain() if r.get("kind") == "step"]
        if not rows or not trainer.loggers:
            return
        c = self.guard.counters
        for i, row in enumerate(rows):
            metrics = step_metrics(row, self.prefix, self.log_layers)
            self._steps += 1
            self._clipped += int(bool(row.get("clipped")))
            if i == len(rows) - 1:
                metrics[f"{self.prefix}clip_rate"] = self._clipped / self._steps
                metrics[f"{self.prefix}skipped"] = float(c.skips)
                metrics[f"{self.prefix}amp_skipped"] = float(c.amp_skips)
                metrics[f"{self.prefix}rollbacks"] = float(c.rollbacks)
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=int(row["step"]))

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """The guard's state plus the clip-rate counts (what a Lightning checkpoint keeps)."""
        if self.guard is None:
            return dict(self._pending_state) if self._pending_state is not None else {}
        return {
            "guard": self.guard.state_dict(),
            "logged_steps": self._steps,
            "logged_clipped": self._clipped,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; before training starts the state waits for the guard."""
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        if not state_dict:
            return
        if "guard" not in state_dict:
            raise ValueError("GuardCallback.load_state_dict: the state lacks the key 'guard'")
        if self.guard is None:
            self._pending_state = dict(state_dict)
        else:
            self._load(state_dict)

    def _load(self, state: dict[str, Any]) -> None:
        assert self.guard is not None
        self.guard.load_state_dict(state["guard"])
        self._buffer.drain()  # rows restored with the state were logged by the earlier run
        self._steps = int(state.get("logged_steps", 0))
        self._clipped = int(state.get("logged_clipped", 0))
