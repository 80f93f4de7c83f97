"""MEASURE: one guarded step's numbers, on the device: norms, signals, detections, clip, flags.

The first half of a guarded step, as one function over explicit inputs: the gradients' norms
(:func:`gradguard.core.norms.grad_norms`), the detectors' checks, the policy's clip (in place)
and the flag vector the ranks agree on, with the device-side skip decision
(:meth:`gradguard.guard.response.Responder.skip`). Nothing here reads a value on the host and
nothing learns: the policy and the detectors learn from :class:`Measured` when the step is
settled.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from gradguard.core import distributed as _distributed
from gradguard.core.clip import Clipped
from gradguard.core.norms import GradNorms, grad_norms
from gradguard.decide.detect import Detector, NonFiniteDetector, Signals
from gradguard.decide.policies import ClipPolicy
from gradguard.guard.response import Responder

__all__ = ["Measured", "measure"]


@dataclass
class Measured:
    """What :func:`measure` found (tensors on the gradients' device).

    Attributes:
        signals: what the detectors saw (and learn from when the step is settled).
        norms: the pre-clip norms (what the policy learns from, with ``clip.learn``).
        clip: the policy's clip: threshold, whether it clipped, the post-clip total.
        flags: the agreed flag vector (:attr:`Responder.keys` order, ``clipped`` first).
        skip: 0-dim bool: the step must not be applied.
        accepted: 0-dim bool: applied and finite.
        amp_overflow: 0-dim bool: the loss scaler's own overflow.
        scores: each detector's score.
    """

    signals: Signals
    norms: GradNorms
    clip: Clipped
    flags: Tensor
    skip: Tensor
    accepted: Tensor
    amp_overflow: Tensor
    scores: list[Tensor]


@torch.no_grad()
def measure(
    grads: Sequence[Tensor],
    names: list[str],
    loss: Tensor | None,
    *,
    step: int,
    amp: bool,
    policy: ClipPolicy,
    detectors: Sequence[Detector],
    nonfinite_rule: NonFiniteDetector | None,
    responder: Responder,
    model: nn.Module,
    norm_type: float = 2.0,
    foreach: bool | None = None,
    process_group: Any = None,
) -> Measured:
    """Measure, check, clip and flag one step's gradients (in place, no host read).

    Args:
        grads: the gradients (dense views), in the optimizer's parameter order.
        names: their parameter names.
        loss: the step's detached 0-dim loss, or ``None``.
        step: the guard's step index (for the signals).
        amp: an enabled GradScaler unscaled these gradients: non-finite ones are its overflow.
        policy, detectors, nonfinite_rule, responder: the guard's deciders.
        model: what AGC clips relative to (its weights, its module names).
        norm_type, foreach: as the guard's config.
        process_group: the ranks that must agree on the flags.

    Returns:
        :class:`Measured`.
    """
    norms = grad_norms(grads, norm_type, foreach=foreach)
    device = grads[0].device
    total = norms.total.float()
    grads_ok = norms.finite
    loss_ok = (
        loss.isfinite().to(device)
        if loss is not None
        else torch.ones((), dtype=torch.bool, device=device)
    )
    signals = Signals(step, total, norms.per_tensor, names, grads_ok, loss)
    bad = None if nonfinite_rule is None else nonfinite_rule.check(signals).flag.to(device)
    detections = [d.check(signals) for d in detectors]
    clip = policy.clip_(grads, norms, model, norm_type=norm_type, foreach=foreach)
    detected = [d.flag.to(device) for d in detections]
    flags, amp_overflow = responder.flags(clip.clipped, grads_ok, loss_ok, bad, amp, detected)
    _distributed.agree_(flags, process_group)
    skip, accepted = responder.skip(flags, grads_ok, loss_ok)
    return Measured(
        signals, norms, clip, flags, skip, accepted, amp_overflow, [d.score for d in detections]
    )
