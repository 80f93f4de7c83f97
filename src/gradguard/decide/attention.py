"""DETECT for transformers: early warnings from attention logits, output log Z and Adam's lag.

Each detector reads a value that telemetry measured during the forward pass (attention-logit
growth, output-logit divergence) or the optimizer's state (preconditioner lag, arXiv
2506.04805), and flags like a :class:`~gradguard.decide.detect.SpikeDetector`. They read the
telemetry through the small :class:`TransformerSignals` protocol
(:class:`gradguard.insight.telemetry.AttentionTelemetry` is one), so deciding never imports the
probes that measure.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor

from gradguard.core import validate as _validate
from gradguard.core.state import as_bool
from gradguard.decide.detect import Detection, Detector, Signals, SpikeDetector

__all__ = [
    "AttentionLogitDetector",
    "LogZDetector",
    "PreconditionerLagDetector",
    "TransformerSignals",
    "preconditioner_lag",
]


class TransformerSignals(Protocol):
    """What the transformer detectors read: this step's max attention logit and output log Z."""

    logz_max: Tensor | None

    def max_logit(self) -> Tensor | None:
        """The largest attention logit of the last forward (0-dim), or ``None``."""
        ...


def preconditioner_lag(
    optimizer: torch.optim.Optimizer, factor: float = 25.0, min_step: int = 10
) -> Tensor:
    """Fraction of coordinates with ``g^2 > factor * v_hat``: gradients far above Adam's ``v``.

    ``v_hat = v / (1 - beta2^t)`` is the bias-corrected second moment of the steps so far (before
    this step). When ``v`` has decayed during calm steps, a sudden large gradient gives an update
    of up to ``lr * sqrt(factor)`` per coordinate instead of ``lr``: the "preconditioner lag" of
    arXiv 2506.04805. With a steady gradient distribution the fraction is about
    ``P(|z| > sqrt(factor))`` (6e-7 at the default 25, five sigma).

    Call it after ``backward`` and before ``optimizer.step()``. Parameters without an Adam
    state (``exp_avg_sq`` and ``step``) yet, or fewer than ``min_step`` steps into it (``v`` is
    then the square of one or two gradients, and a fresh draw is often 5 of them), count as
    not lagging; a fresh optimizer gives 0.

    Args:
        optimizer: an Adam-family optimizer (``Adam``, ``AdamW``, ``NAdam``, ``RAdam``...).
        factor: the ``g^2 / v_hat`` ratio that counts as lagging (``> 0``).
        min_step: Adam steps a parameter must have taken before it counts (``>= 0``).

    Returns:
        0-dim fp32 on the parameters' device (0 when no parameter qualifies).
    """
    factor = _validate.threshold("factor", factor, allow_zero=False)
    lagging: list[Tensor] = []
    total = 0
    device: torch.device | None = None
    for group in optimizer.param_groups:
        betas = group.get("betas")
        beta2 = float(betas[1]) if isinstance(betas, (tuple, list)) else 0.999
        eps2 = float(group.get("eps", 1e-8)) ** 2
        for p in group["params"]:
            st = optimizer.state.get(p, {})
            v, step = st.get("exp_avg_sq"), st.get("step")
            if p.grad is None or v is None or step is None:
                continue
            g = p.grad.detach()
            device = g.device
            total += g.numel()
            if not isinstance(step, Tensor) or step.device.type == "cpu":
                # torch's Adam keeps ``step`` on the CPU unless capturable/fused: reading it is
                # no device sync, and a host scalar lets one fused pass do the comparison.
                t = float(step)
                if t < min_step:
                    continue
                scale = (1.0 - beta2**t) / factor  # g^2 > factor * v_hat  <=>  v - g^2 * scale < 0
                d = torch.addcmul(v.detach().float(), g.float(), g.float(), value=-scale)
                lagging.append(torch.count_nonzero(d < -eps2 * scale))
            else:  # the step count lives on the device: stay there
                tt = step.to(device, torch.float32)
                v_hat = v.detach().float() / (1.0 - beta2**tt).clamp(min=1e-30)
                hit = g.float().square() > factor * v_hat + eps2
                lagging.append(torch.count_nonzero(hit & (tt >= min_step)))
    if not lagging:
        return torch.zeros((), dtype=torch.float32, device=device)
    return torch.stack(lagging).sum().float() / total


class _SignalSpike(SpikeDetector):
    """A :class:`~gradguard.decide.detect.SpikeDetector` over a telemetry value instead of loss or
    gradient norm: flags when the value exceeds ``limit``, when its log jumps ``z`` sigma above
    its accepted history, or (with ``growth``) when it is above ``floor`` and ``growth`` times
    its value ``growth_steps`` accepted steps before (read from the same history)."""

    default_response: ClassVar[tuple[str, ...] | None] = ("log",)
    _config_keys = (  # type: ignore[assignment]
        "limit", "window", "z", "warmup", "min_std", "growth", "growth_steps", "floor",
    )  # fmt: skip

    def __init__(
        self,
        source: Any = None,
        limit: float = math.inf,
        window: int = 128,
        z: float = 6.0,
        warmup: int | None = None,
        min_std: float = 1e-2,
        growth: float | None = None,
        growth_steps: int = 3,
        floor: float = 0.0,
    ) -> None:
        super().__init__("loss", window=window, z=z, warmup=warmup, log=True, min_std=min_std)
        # The spike machinery needs a signal name; the guard keys a detector by name:signal
        # when it has one, and this one's signal is its own, so it goes by its name alone.
        del self.signal
        self.source = source
        self.limit = _validate.as_float("limit", limit)
        if not self.limit > 0:
            raise ValueError(f"limit must be > 0, got {limit!r}")
        if growth is not None:
            growth = _validate.as_float("growth", growth)
            if not growth > 1.0:
                raise ValueError(f"growth must be > 1 (or None), got {growth!r}")
        self.growth = growth
        if (
            isinstance(growth_steps, bool)
            or not isinstance(growth_steps, int)
            or not 1 <= growth_steps < self.window
        ):
            raise ValueError(f"growth_steps must be an int in [1, window), got {growth_steps!r}")
        self.growth_steps = growth_steps
        self.floor = _validate.threshold("floor", floor)

    def _grew(self, x: Tensor) -> Tensor:
        """Above ``floor`` and ``growth`` x the stored value ``growth_steps`` back; pure."""
        if self.growth is None:
            return torch.zeros((), dtype=torch.bool, device=x.device)
        st = self._ensure(x)
        buf, count = st["buffer"], st["count"]
        back = buf[(count - self.growth_steps) % self.window]
        floor = math.log(self.floor) if self.floor > 0 else -math.inf
        jump = (x - back > math.log(self.growth)) & (x > floor)
        return jump & (count >= self.growth_steps) & x.isfinite()

    def _raw(self, s: Signals) -> Tensor | None:
        raise NotImplementedError

    def _value(self, s: Signals) -> Tensor | None:
        raw = self._raw(s)
        if raw is None:
            return None
        return raw.detach().reshape(()).float().clamp(min=1e-12).log().to(s.total_norm.device)

    def check(self, s: Signals) -> Detection:
        x = self._value(s)
        if x is None:
            return Detection(
                torch.zeros((), dtype=torch.bool, device=s.total_norm.device),
                torch.zeros((), dtype=torch.float32, device=s.total_norm.device),
            )
        z = self.score(s)
        over = x > math.log(self.limit) if math.isfinite(self.limit) else torch.zeros_like(z > 0)
        flag = (z > self.z) | over | self._grew(x)
        return Detection(flag, torch.where(over, torch.full_like(z, math.inf), z))

    def update(self, s: Signals, accepted: Tensor) -> None:
        x = self._value(s)
        if x is None:
            return
        ok = as_bool(accepted, x.device)
        if math.isfinite(self.limit):
            ok = ok & (x <= math.log(self.limit))  # a value over the limit never becomes normal
        super().update(s, ok)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(limit={self.limit}, window={self.window}, z={self.z}, "
            f"growth={self.growth}, growth_steps={self.growth_steps}, floor={self.floor})"
        )


class AttentionLogitDetector(_SignalSpike):
    """Early warning of attention-logit growth: the max attention logit (all layers and heads)
    above ``limit``, tripling (``growth``) within ``growth_steps`` steps from above ``floor``, or
    its log ``z`` sigma above its recent history.

    Reads :class:`~gradguard.insight.telemetry.AttentionTelemetry` (give it as ``telemetry``); the
    guard calls ``check`` after the backward, when the telemetry holds this step's forward.
    Attention entropy collapses once logits reach a few tens (Dehghani et al. 2023; Wortsman et al.
    2023); Kimi K2 caps them at 100 (QK-clip). It warns, so :attr:`default_response` is
    ``("log",)``; pair it with :class:`gradguard.insight.transformer_remedies.QKClip` to act.

    Args:
        telemetry: what to read (a :class:`~gradguard.insight.telemetry.AttentionTelemetry`;
            ``None`` only to load a state).
        limit: flag above this max logit (``> 0``; ``inf``: z-score only).
        window, z, warmup, min_std: as :class:`~gradguard.decide.detect.SpikeDetector`, on
            ``log(max logit)``.
        growth: flag when the max logit is this many times its value ``growth_steps``
            accepted steps before (``> 1``; ``None``: off). The defaults (3x within 3 steps,
            above 5) warned 2-7 steps earlier than the limit alone on the lab's diverging runs
            and never in its 10,800 clean steps (docs/transformer.md).
        growth_steps: how far back ``growth`` compares (``1 <= growth_steps < window``).
        floor: ``growth`` counts only above this max logit (``>= 0``): early training moves
            small logits by large factors.

    Example:
        >>> det = AttentionLogitDetector(tel, limit=50.0)
        >>> guard = Guard(model, opt, config=GuardConfig(detectors=[det, ...]))
    """

    name: ClassVar[str] = "attn_logit"

    def __init__(
        self,
        telemetry: TransformerSignals | None = None,
        limit: float = 50.0,
        window: int = 128,
        z: float = 6.0,
        warmup: int | None = None,
        min_std: float = 1e-2,
        growth: float | None = 3.0,
        growth_steps: int = 3,
        floor: float = 5.0,
    ) -> None:
        super().__init__(telemetry, limit, window, z, warmup, min_std, growth, growth_steps, floor)

    def _raw(self, s: Signals) -> Tensor | None:
        return None if self.source is None else self.source.max_logit()


class LogZDetector(_SignalSpike):
    """Early warning of output-logit divergence: ``|log Z|`` (max over positions) above
    ``limit``, or its log ``z`` sigma above its recent history (PaLM, Chowdhery et al. 2022).

    Args:
        telemetry: what measures the output logits (an
            :class:`~gradguard.insight.telemetry.AttentionTelemetry`).
        limit: flag above this ``|log Z|`` (``> 0``).
        window, z, warmup, min_std: as :class:`~gradguard.decide.detect.SpikeDetector`, on
            ``log |log Z|``.
        growth, growth_steps, floor: as :class:`AttentionLogitDetector` (off by default).
    """

    name: ClassVar[str] = "logz"

    def __init__(
        self,
        telemetry: TransformerSignals | None = None,
        limit: float = 50.0,
        window: int = 128,
        z: float = 6.0,
        warmup: int | None = None,
        min_std: float = 1e-2,
        growth: float | None = None,
        growth_steps: int = 3,
        floor: float = 0.0,
    ) -> None:
        super().__init__(telemetry, limit, window, z, warmup, min_std, growth, growth_steps, floor)

    def _raw(self, s: Signals) -> Tensor | None:
        if self.source is None or self.source.logz_max is None:
            return None
        return self.source.logz_max.abs()


class PreconditionerLagDetector(Detector):
    """Flags a step where more than ``max_fraction`` of the coordinates have ``g^2`` above
    ``factor`` times Adam's bias-corrected second moment (:func:`preconditioner_lag`).

    The step has not been taken when the guard checks: a skip or clip prevents the huge update.
    The score is the fraction. :attr:`default_response` is ``("log",)``.

    Args:
        optimizer: the Adam-family optimizer (``None`` only to load a state).
        factor: the ``g^2 / v_hat`` ratio that counts as lagging (``> 0``).
        max_fraction: flag above this fraction of coordinates (in ``[0, 1)``). Sparse
            gradients (embedding rows of rare tokens, whose ``v`` decays between their
            appearances) make a few percent lag on healthy steps; on the lab's char-GPT no
            clean step reached 10 % (docs/transformer.md).
        min_step: Adam steps before a parameter counts (see :func:`preconditioner_lag`).
        every: measure on every ``every``-th check only (a pass over gradients and ``v``:
            about 1 s per step for GPT-2 small on one CPU thread, under a millisecond on a
            GPU); the other checks never flag.
    """

    name: ClassVar[str] = "adam_lag"
    default_response: ClassVar[tuple[str, ...] | None] = ("log",)
    _config_keys = ("factor", "max_fraction", "min_step", "every")

    def __init__(
        self,
        optimizer: torch.optim.Optimizer | None = None,
        factor: float = 25.0,
        max_fraction: float = 0.1,
        min_step: int = 10,
        every: int = 1,
    ) -> None:
        super().__init__()
        self.optimizer = optimizer
        self.factor = _validate.threshold("factor", factor, allow_zero=False)
        f = _validate.as_float("max_fraction", max_fraction)
        if not 0.0 <= f < 1.0:
            raise ValueError(f"max_fraction must be in [0, 1), got {max_fraction!r}")
        self.max_fraction = f
        if isinstance(min_step, bool) or not isinstance(min_step, int) or min_step < 0:
            raise ValueError(f"min_step must be an int >= 0, got {min_step!r}")
        self.min_step = min_step
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an int >= 1, got {every!r}")
        self.every = every
        self._checks = 0

    def check(self, s: Signals) -> Detection:
        device = s.total_norm.device
        due = self._checks % self.every == 0
        self._checks += 1
        if self.optimizer is None or not due:
            z = torch.zeros((), dtype=torch.float32, device=device)
            return Detection(z > 0, z)
        frac = preconditioner_lag(self.optimizer, self.factor, self.min_step).to(device)
        return Detection(frac > self.max_fraction, frac)

    def __repr__(self) -> str:
        return (
            f"PreconditionerLagDetector(factor={self.factor}, max_fraction={self.max_fraction}, "
            f"every={self.every})"
        )
