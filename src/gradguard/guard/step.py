"""STEP: one guarded step as a record with one explicit phase, and the report a user reads.

A guarded step is a transaction. :class:`PendingStep` holds everything the guard knows about
the step it is in (its flags on the device, the verdict once the host has it, what must be
undone if anything raises) and :class:`Phase` says how far it got::

    ARMED  --optimizer step (or not)-->  APPLIED  --settled on the host-->  done
                                         APPLIED  --sync-free: bits in flight-->  UNREAD
    UNREAD --bits read-->  READ  --verdict carried out-->  done

Until the phase passes ``APPLIED`` nothing outside the step record has learned from it: the
policy and the detectors learn, the counters count and the records log only when the step is
settled, so a step that raises on the way is forgotten whole (see
:meth:`gradguard.guard.guard.Guard.step`).

:class:`Stage` is the guard's side of the same story for its callers (like GradScaler's
``OptState``): which call may come next.
"""

from __future__ import annotations

import ctypes
import enum
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from gradguard.decide.detect import Signals
from gradguard.guard.response import AMP, Counters, Verdict
from gradguard.guard.skip import GroupState
from gradguard.records.recorder import Named, Recorder
from gradguard.records.recorder import _gather as gather

__all__ = ["PendingStep", "Phase", "Stage", "StepReport"]


class Stage(enum.Enum):
    """Which call a guard expects next (see :class:`gradguard.guard.guard.Guard`).

    Example:
        >>> guard.before_optimizer_step(loss); guard.stage
        <Stage.ARMED: 'armed'>
    """

    READY = "ready"  # between optimizer steps
    ARMED = "armed"  # measured and decided (or handed to the device); the optimizer step is next
    DROPPED = "dropped"  # a batch computed before a rollback: nothing applied, nothing counted
    NEEDS_RESUME = "needs_resume"  # snapshot_dir holds an earlier run: resume() first


class Phase(enum.Enum):
    """How far one guarded step got (see the module docstring)."""

    ARMED = "armed"  # measured; the optimizer step is next
    APPLIED = "applied"  # the optimizer stepped (or, on a skip, did not): settling is next
    UNREAD = "unread"  # sync-free: applied on the device, the flag bits not read yet
    READ = "read"  # the bits are read; the verdict is not carried out yet


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

    Args:
        step, position, total_norm, clipped_norm, threshold, finite: as the attributes.
        settle: reads the step's flags and decides it, when a host value is asked for.
        verdict: the verdict, when it is known already.

    Example:
        >>> report = guard.step(loss)
        >>> report.action, float(report.total_norm)
        ('step', 0.84)
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

    @classmethod
    def dropped(cls, step: int, position: int) -> StepReport:
        """The report of a batch computed before a rollback: it is not applied.

        Args:
            step, position: the guard's step and data position when the batch came.

        Returns:
            A settled report whose action is ``"rollback"``.
        """
        v = Verdict(
            "rollback", reason="rolled back to a snapshot; this batch was computed before it"
        )
        nan, one = torch.full((), math.nan), torch.ones((), dtype=torch.bool)
        return cls(step, position, nan, nan, nan, one, lambda: v, v)

    def _ensure(self) -> Verdict:
        if self.verdict is None:
            self._settle()
        if self.verdict is None:
            raise RuntimeError("this step was abandoned (an exception inside it): no verdict")
        return self.verdict

    @property
    def action(self) -> str:
        """``"step"``, ``"clip"``, ``"log"``, ``"skip"``, ``"backoff"``, ``"rollback"`` or
        ``"abort"`` (reading it may wait for the device: see the guard's docstring)."""
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
        """Host values (one transfer): step, position, norms, threshold, finite, action, reason.

        Returns:
            A dict of plain Python values.
        """
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
class PendingStep:
    """One guarded step, from measurement until its verdict has been carried out."""

    step: int
    position: int
    flags: Tensor  # Responder.flags layout, agreed across ranks, on the device
    skip: Tensor  # 0-dim bool on the device: the step must not be applied
    accepted: Tensor  # 0-dim bool on the device: applied and finite (what the policy learns)
    host: Tensor  # the flag bits in host memory (a pinned copy in flight on CUDA)
    event: Any
    row: dict[str, Any]
    scores: list[Tensor]
    report: StepReport
    lazy: bool  # the device decides (found_inf); the host reads the bits later
    plain: bool  # inside guard.step: the guard steps the optimizer and the scheduler itself
    amp_overflow: Tensor
    signals: Signals | None = None  # what the policy and detectors learn from when settled
    learn: Any = None  # what the policy learns from (Clipped.learn)
    phase: Phase = Phase.ARMED
    bits: list[bool] | None = None
    verdict: Verdict | None = None
    undo: GroupState | None = None  # hyperparameters before a guessed scheduler step
    unscaled: bool = False  # this guard unscaled and owes the scaler an update()
    batch: Any = None  # a reference, kept for an incident bundle
    # What the host-side decision changed, to put back if the step is abandoned.
    saved_counters: Counters | None = None
    saved_scale: float = 1.0
    saved_streak_start: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # the action record's extra entries

    def record(self, recorder: Recorder) -> None:
        """Log this step's row and, for a response, its action row (flushed at once)."""
        v = self.verdict
        assert v is not None
        self.row["action"] = v.action
        recorder.log(self.step, **self.row)
        if not v.skipped:
            if v.fired:
                recorder.event(
                    self.step, "action", action="log", reason=v.reason, signal=v.fired[0]
                )
            return
        if v.signal != AMP:
            i = v.index
            score = self.scores[i] if i is not None and i < len(self.scores) else 1.0
            recorder.event(
                self.step, "action", action=v.action, reason=v.reason, signal=v.signal,
                score=score, position=self.position, **self.extra,
            )  # fmt: skip

    def to_state(self) -> dict[str, Any] | None:
        """A read step whose verdict is not carried out yet, as plain values (a checkpoint
        taken between the read and the act keeps it for the loaded guard)."""
        if self.bits is None:
            return None
        host = gather([dict(self.row)])[0]
        scores = torch.stack([t.float() for t in self.scores]).tolist() if self.scores else []
        return {
            "step": self.step,
            "position": self.position,
            "bits": [bool(b) for b in self.bits],
            "scores": [float(x) for x in scores],
            "row": {k: v for k, v in host.items() if k not in ("v", "kind", "step")},
        }

    @classmethod
    def from_state(cls, p: dict[str, Any], settle: Callable[[], Any]) -> PendingStep:
        """The step :meth:`to_state` described (no tensors on a device: it is acted on only)."""
        nan, one = torch.full((), math.nan), torch.ones((), dtype=torch.bool)
        step, position = int(p["step"]), int(p["position"])
        return cls(
            step, position, nan, one, ~one, nan, None, dict(p["row"]),
            [torch.tensor(float(x)) for x in p["scores"]],
            StepReport(step, position, nan, nan, nan, one, settle),
            lazy=True, plain=True, amp_overflow=~one, phase=Phase.READ,
            bits=[bool(b) for b in p["bits"]],
        )  # fmt: skip


def to_host(flags: Tensor) -> tuple[Tensor, Any]:
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


def read_bits(host: Tensor, event: Any) -> list[bool]:
    """The flag bits as host bools (waits for the step that produced them, not for later work)."""
    if event is not None:
        event.synchronize()
    # The bytes are in host memory (uint8, contiguous): read them as bytes, with no device op
    # and no aten call (Tensor.tolist() would dispatch ops per element).
    return [b != 0 for b in ctypes.string_at(host.data_ptr(), host.numel())]


def plain_row(row: dict[str, Any]) -> dict[str, Any]:
    """A step row with its stacked per-layer norms as ``{name: tensor}`` (for a bundle)."""
    return {k: v.as_dict() if isinstance(v, Named) else v for k, v in row.items()}
