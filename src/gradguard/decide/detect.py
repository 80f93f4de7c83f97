"""DETECT: on-device flags and scores that say a training step looks wrong.

A detector looks at the :class:`Signals` of one step and returns a :class:`Detection`: a 0-dim
bool ``flag`` and a 0-dim fp32 ``score`` (each detector documents its own: a z-score, a count
of layers, a ratio; the records keep it). ``check`` is pure; ``update`` learns from the step,
but only when the guard accepted it and it was finite, so a spike or a NaN never becomes part
of "normal".

Nothing on the per-step path reads a value back to the host: the guard decides with
``torch.where`` and reads numbers only when it flushes its records. (Helpers meant for reports,
such as :meth:`VanishingDetector.vanishing_layers`, and ``load_state_dict`` checks do read.)

Each detector declares what the guard does when it flags (:attr:`Detector.default_response`)
and keeps its state in the same pattern as the clipping policies
(:class:`gradguard.core.state.Stateful`): config by name, named state tensors under ``"state"``,
created lazily on the signals' device, and a ``load_state_dict`` that validates everything on a
throwaway instance first, so bad input changes nothing.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from gradguard.core import validate as _validate
from gradguard.core.fuse import Kernel
from gradguard.core.norms import tensor_norms
from gradguard.core.state import Spec, Stateful, as_bool, as_int, check_keys, fraction, stack

__all__ = [
    "Detection",
    "Detector",
    "DivergenceDetector",
    "NonFiniteDetector",
    "RatioSpikeDetector",
    "Signals",
    "SpikeDetector",
    "UpdateRatioDetector",
    "VanishingDetector",
    "update_ratios",
]


@dataclass
class Signals:
    """What one step measured, tensors on the device.

    Attributes:
        step: the optimizer step index (host int; the guard counts it).
        total_norm: 0-dim fp32 total gradient norm, before clipping.
        per_tensor: pre-clip norm of each gradient, in ``names`` order.
        names: parameter names (``model.named_parameters()``), same order as ``per_tensor``.
        finite: 0-dim bool, True when every gradient is finite.
        loss: the 0-dim detached loss, or None when the caller has none.
    """

    step: int
    total_norm: Tensor
    per_tensor: list[Tensor]
    names: list[str]
    finite: Tensor
    loss: Tensor | None = None


class Detection(NamedTuple):
    """One detector's verdict: ``flag`` (0-dim bool) and ``score`` (0-dim fp32)."""

    flag: Tensor
    score: Tensor


class Detector(Stateful, ABC):
    """Base class of every detector: a pure ``check`` and a guarded ``update``.

    State goes through ``_config_keys`` and ``_state_spec()``
    (:class:`gradguard.core.state.Stateful`), which give ``state_dict`` and a validated
    ``load_state_dict``.

    Attributes:
        name: the detector's name in records and in the guard's ``responses`` keys.
        default_response: the guard's ladder of actions when this detector flags and the
            user named none for it, e.g. ``("log",)`` to observe only; ``None`` (the default)
            means the guard's default ladder. Detectors whose flag says "look at this" rather
            than "this step is poisoned" (vanishing layers, update ratios) declare
            ``("log",)``.

    Example:
        >>> class LossAbove(Detector):
        ...     name = "loss_above"
        ...     default_response = ("log",)
        ...     def check(self, s):
        ...         flag = s.loss > 10.0
        ...         return Detection(flag, flag.float())
    """

    name: ClassVar[str] = "detector"
    default_response: ClassVar[tuple[str, ...] | None] = None

    @abstractmethod
    def check(self, s: Signals) -> Detection:
        """Judge this step from its signals; pure, on the device.

        Args:
            s: this step's signals.

        Returns:
            :class:`Detection`: a 0-dim bool flag and a 0-dim fp32 score.
        """

    def update(self, s: Signals, accepted: Tensor) -> None:
        """Learn from this step when ``accepted`` (0-dim bool) and its signals are finite.

        Args:
            s: this step's signals (the same as given to :meth:`check`).
            accepted: 0-dim bool; False for skipped or non-finite steps, which change nothing.
        """
        return None


def _loss_finite(s: Signals) -> Tensor:
    if s.loss is None:
        return torch.ones((), dtype=torch.bool, device=s.total_norm.device)
    return s.loss.detach().isfinite().all().to(s.total_norm.device)


class NonFiniteDetector(Detector):
    """Flags a step whose gradients (total norm) or loss contain NaN or inf.

    The score is 1.0 when flagged, else 0.0. Under AMP the guard unscales first, so an inf that
    the loss scaler produced is seen here as what it is: a step to skip, not a spike.

    Example:
        >>> NonFiniteDetector().check(signals).flag
        tensor(False)
    """

    name: ClassVar[str] = "nonfinite"

    def check(self, s: Signals) -> Detection:
        ok = s.finite.to(torch.bool) & s.total_norm.isfinite() & _loss_finite(s)
        flag = ~ok
        return Detection(flag, flag.to(torch.float32))

    def __repr__(self) -> str:
        return "NonFiniteDetector()"


def _legacy(state: Any, keys: tuple[str, ...]) -> Any:
    """The flat layout of gradguard 0.1 (state tensors beside the config, ``None`` before the
    first step) in today's layout (under ``"state"``, empty before the first step)."""
    if not isinstance(state, dict) or "state" in state or not all(k in state for k in keys):
        return state
    inner = {k: state[k] for k in keys}
    rest = {k: v for k, v in state.items() if k not in keys}
    return {**rest, "state": {} if all(v is None for v in inner.values()) else inner}


def _no(device: torch.device) -> Detection:
    return Detection(
        torch.zeros((), dtype=torch.bool, device=device),
        torch.zeros((), dtype=torch.float32, device=device),
    )


SPIKE_SIGNALS = ("loss", "grad_norm")


class SpikeDetector(Detector):
    """Flags a step whose loss or gradient norm jumps above its recent history (one-sided z-score).

    The history is a ring buffer on the device of the last ``window`` values of accepted,
    finite steps (a spike the guard skipped never becomes "normal"); the score is
    ``(x - mean) / std`` with the unbiased std, and the step is flagged when the score exceeds
    ``z``. Only upward jumps count: a falling loss is good news. Values are taken in log space
    by default, so a spike is a multiplicative jump whatever the loss's scale (a non-positive
    loss has no log: it is ignored, use ``log=False`` for such losses).

    This is OLMo-core's skip-step rule (window 128, 6 sigma, inactive until half the window is
    filled) with two changes: log space, and only accepted values enter the history.

    Warm-up: no z-score flag until ``warmup`` values are stored (default
    ``max(2, window // 2)``). With ``bootstrap`` (a ratio ``r > 1``) the detector works from its
    third step on: before the warm-up ends a value more than ``r`` times the largest stored one
    is flagged (``x - max > log(r)`` in log space, ``x > r * max`` with ``log=False``), since a
    z-score over a few values means nothing but a tenfold jump above everything seen so far is
    never normal. The largest, not the median: a tiny batch's loss can vary tenfold from step to
    step (the mean of two squared errors does, one step in eleven), rarely tenfold above all the
    earlier ones. The bootstrap score is scaled so that it crosses ``z`` exactly where the rule
    flags: ``z * (x - max) / log(r)`` (``z * x / (r * max)`` with ``log=False``).

    State: ``buffer`` (fp32, ``window`` values, NaN where empty) and ``count`` (values stored
    so far), created on the signal's device at the first step.

    Args:
        signal: ``"loss"`` or ``"grad_norm"`` (the pre-clip total norm).
        window: history length (``>= 2``).
        z: flag when the score exceeds this (``> 0``).
        warmup: stored values needed before flagging (``2 <= warmup <= window``).
        log: compare ``log(x)`` (default) or ``x``.
        min_std: floor on the std (``>= 0``), so a flat history does not turn a rounding
            error into a huge score; in log space the default 1e-3 means a jump must be at
            least ``z`` x 0.1 % to be flagged. With ``log=False`` it is in the signal's units.
        bootstrap: flag a value above this many times the largest stored one before the
            warm-up ends (from 2 stored values on); ``None`` (the default): no flag in
            warm-up. The guard's default loss detector uses 10.

    Raises:
        ValueError: an argument out of range.
        TypeError: ``log`` not a bool.

    Example:
        >>> det = SpikeDetector("loss", window=128, z=6.0)
        >>> flag, score = det.check(signals); det.update(signals, accepted)
    """

    name: ClassVar[str] = "spike"
    _config_keys = ("signal", "window", "z", "warmup", "log", "min_std", "bootstrap")

    def __init__(
        self,
        signal: str = "loss",
        window: int = 128,
        z: float = 6.0,
        warmup: int | None = None,
        log: bool = True,
        min_std: float = 1e-3,
        bootstrap: float | None = None,
    ) -> None:
        super().__init__()
        if signal not in SPIKE_SIGNALS:
            raise ValueError(f"signal must be one of {SPIKE_SIGNALS}, got {signal!r}")
        self.signal = signal
        self.window = as_int("window", window, 2)
        self.z = _validate.threshold("z", z, allow_zero=False)
        self.warmup = as_int("warmup", max(2, window // 2) if warmup is None else warmup, 2)
        if self.warmup > self.window:
            raise ValueError(f"warmup must be <= window ({self.window}), got {warmup!r}")
        if not isinstance(log, bool):
            raise TypeError(f"log must be a bool, got {type(log).__name__}")
        self.log = log
        self.min_std = _validate.threshold("min_std", min_std)
        self.bootstrap = None if bootstrap is None else _ratio("bootstrap", bootstrap)

    def _state_spec(self) -> dict[str, Spec]:
        return {
            "buffer": Spec((self.window,), dtype=torch.float32),
            "count": Spec((), integer=True),
        }

    def _fresh_state(self, like: Tensor) -> dict[str, Tensor]:
        return {
            "buffer": torch.full((self.window,), math.nan, dtype=torch.float32, device=like.device),
            "count": torch.zeros((), dtype=torch.int64, device=like.device),
        }

    def _value(self, s: Signals) -> Tensor | None:
        raw = s.loss if self.signal == "loss" else s.total_norm
        if raw is None:
            return None
        if raw.numel() != 1:
            raise ValueError(
                f"Signals.{'loss' if self.signal == 'loss' else 'total_norm'} must be a single "
                f"value, got shape {tuple(raw.shape)} (reduce a per-sample loss first)"
            )
        x = raw.detach().reshape(()).to(torch.float32)
        return x.log() if self.log else x

    def score(self, s: Signals) -> Tensor:
        """The one-sided z-score of this step (0 in warm-up or without the signal); pure."""
        x = self._value(s)
        if x is None:
            return torch.zeros((), dtype=torch.float32, device=s.total_norm.device)
        st = self._ensure(x)
        buf, count = st["buffer"], st["count"]
        valid = ~buf.isnan()
        n = valid.sum().to(torch.float32)
        mean = torch.where(valid, buf, 0.0).sum() / n.clamp(min=1)
        var = torch.where(valid, (buf - mean) ** 2, 0.0).sum() / (n - 1).clamp(min=1)
        floor = max(self.min_std, torch.finfo(torch.float32).tiny)
        z = (x - mean) / var.sqrt().clamp(min=floor)
        warm = count >= self.warmup
        if self.bootstrap is not None:
            top = torch.where(valid, buf, -math.inf).amax()
            if self.log:
                early = self.z * (x - top) / math.log(self.bootstrap)
            else:
                early = self.z * x / (self.bootstrap * top).clamp(min=floor)
            z = torch.where(warm, z, torch.where(count >= 2, early, 0.0))
            warm = warm | (count >= 2)
        # A non-finite value is the NonFiniteDetector's business, not a spike.
        return torch.where(warm & x.isfinite(), z, 0.0)

    def check(self, s: Signals) -> Detection:
        z = self.score(s)
        return Detection(z > self.z, z)

    def update(self, s: Signals, accepted: Tensor) -> None:
        x = self._value(s)
        if x is None:
            return
        st = self._ensure(x)
        buf, count = st["buffer"], st["count"]
        # The whole step must be finite: a finite loss with NaN gradients is not "normal".
        step_ok = s.finite.to(x.device, torch.bool) & s.total_norm.to(x.device).isfinite()
        ok = as_bool(accepted, x.device) & x.isfinite() & step_ok & _loss_finite(s).to(x.device)
        slot = torch.arange(self.window, device=x.device) == count % self.window
        st["buffer"] = torch.where(slot & ok, x, buf)
        st["count"] = count + ok.to(torch.int64)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = _legacy(state, ("buffer", "count"))
        if isinstance(state, dict) and "bootstrap" not in state:
            state = {**state, "bootstrap": None}  # saved before bootstrap existed
        super().load_state_dict(state)

    def __repr__(self) -> str:
        return (
            f"SpikeDetector(signal={self.signal!r}, window={self.window}, z={self.z}, "
            f"warmup={self.warmup}, log={self.log}, bootstrap={self.bootstrap})"
        )


def _loss(s: Signals) -> Tensor | None:
    """The step's loss as a 0-dim fp32 tensor on the norms' device (``None`` without one)."""
    if s.loss is None:
        return None
    if s.loss.numel() != 1:
        raise ValueError(
            f"Signals.loss must be a single value, got shape {tuple(s.loss.shape)} "
            "(reduce a per-sample loss first)"
        )
    loss, device = s.loss, s.total_norm.device
    if loss.ndim == 0 and loss.dtype == torch.float32 and loss.device == device:
        return loss.detach() if loss.requires_grad else loss  # the guard's own: no op
    return loss.detach().reshape(()).to(device, torch.float32)


def _ratio_check(
    x: Tensor, history: Tensor, count: Tensor, streak: Tensor, ratio: float, patience: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:class:`RatioSpikeDetector`'s rule: whether ``x`` is above ``ratio`` times the largest
    stored value (from two stored on), that largest, the flag (the first ``patience`` steps in a
    row above) and the score ``x / largest``."""
    top = torch.where(history.isnan(), -math.inf, history).amax()
    ready = (count >= 2) & x.isfinite() & (top > 0)
    above = ready & (x > ratio * top)
    return above, top, above & (streak < patience), torch.where(ready, x / top, 0.0)


def _ratio_learn(
    x: Tensor, grads_finite: Tensor, total_norm: Tensor, accepted: Tensor, above: Tensor,
    top: Tensor, history: Tensor, count: Tensor, streak: Tensor, ratio: float,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """:class:`RatioSpikeDetector`'s history, count and streak after a step with loss ``x``."""
    finite = x.isfinite() & grads_finite & total_norm.isfinite()  # the whole step
    ok = accepted & finite & (x > 0)
    value = torch.where(above, ratio * top, x)  # min(x, ratio * max), without a NaN
    slot = torch.arange(history.shape[0], device=x.device) == count % history.shape[0]
    # A non-finite step is no evidence either way: the streak waits for the next finite one.
    return (
        torch.where(slot & ok, value, history),
        count + ok.to(torch.int64),
        torch.where(finite, torch.where(above, streak + 1, 0), streak),
    )


_RATIO_CHECK = Kernel(_ratio_check)
_RATIO_LEARN = Kernel(_ratio_learn)


class RatioSpikeDetector(Detector):
    """Flags a loss more than ``ratio`` times every loss accepted in the last ``window`` steps,
    from the third step on: a corrupt batch.

    The rule is a ratio of stored raw values, ``x > ratio * max(history)``, so it has no unit and
    no noise estimate to learn: it works from two accepted losses on (a z-score over two values
    means nothing, but a tenfold jump above everything seen recently is never normal) and it
    skips the same steps whatever the loss's scale (multiplying the loss by a power of two
    changes no bit of the decision). The largest, not the mean: a tiny batch's loss varies
    tenfold from step to step (the mean of two squared errors does, one step in eleven), rarely
    tenfold above all of its recent neighbours. It is OLMo-core's skip-step idea (skip a loss far
    out of its recent range) in ratio form, with only accepted steps in the history; unlike
    :class:`SpikeDetector` it needs no warm-up.

    A jump that the next step repeats is not a batch's fault but the model's state (a skip
    leaves the weights where they are, so every later batch jumps too, until the budget aborts
    the run): only the first ``patience`` steps in a row above the bar are flagged, the next ones
    are let through (clipped by the policy) and the history adopts them, at most ``ratio`` times
    its maximum per step. Each accepted value is stored as ``min(x, ratio * max)``.

    Only a positive loss takes part (a ratio needs one); a non-finite one is the
    :class:`NonFiniteDetector`'s business. The score is ``x / max(history)`` (0 before two
    values are stored).

    State: ``history`` (fp32, ``window`` values, NaN where empty), ``count`` (values stored so
    far) and ``streak`` (steps in a row above the bar).

    Args:
        ratio: flag a loss above this many times the recent maximum (``> 1``).
        window: accepted losses the maximum is taken over (``>= 2``).
        patience: steps in a row above the bar that are flagged (``>= 1``).

    Raises:
        ValueError: an argument out of range.

    Example:
        >>> det = RatioSpikeDetector()     # ratio 10, window 128, patience 1
        >>> flag, score = det.check(signals); det.update(signals, accepted)
    """

    name: ClassVar[str] = "spike"
    signal: ClassVar[str] = "loss"
    _config_keys = ("ratio", "window", "patience")
    _last: tuple[Signals, Tensor, Tensor, Tensor] | None = None  # check()'s, for update()

    def __init__(self, ratio: float = 10.0, window: int = 128, patience: int = 1) -> None:
        super().__init__()
        self.ratio = _ratio("ratio", ratio)
        self.window = as_int("window", window, 2)
        self.patience = as_int("patience", patience, 1)

    def _state_spec(self) -> dict[str, Spec]:
        return {
            "history": Spec((self.window,), dtype=torch.float32),
            "count": Spec((), integer=True),
            "streak": Spec((), integer=True),
        }

    def _check_state(self, tensors: dict[str, Tensor], state: dict[str, Any]) -> dict[str, Any]:
        if tensors and bool(((tensors["history"] <= 0) | tensors["history"].isinf()).any()):
            raise ValueError(
                "RatioSpikeDetector.load_state_dict: history must hold losses > 0 (NaN: empty)"
            )
        return {}

    def _fresh_state(self, like: Tensor) -> dict[str, Tensor]:
        return {
            "history": torch.full(
                (self.window,), math.nan, dtype=torch.float32, device=like.device
            ),
            "count": torch.zeros((), dtype=torch.int64, device=like.device),
            "streak": torch.zeros((), dtype=torch.int64, device=like.device),
        }

    def _rule(self, x: Tensor, st: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``_ratio_check`` on the state, compiled or not as ``fuse`` says."""
        return _RATIO_CHECK(self.fuse, x, st["history"], st["count"], st["streak"], self.ratio,
                            self.patience)  # fmt: skip

    def check(self, s: Signals) -> Detection:
        x = _loss(s)
        if x is None:
            return _no(s.total_norm.device)
        above, top, flag, score = self._rule(x, self._ensure(x))
        self._last = (s, x, above, top)
        return Detection(flag, score)

    def update(self, s: Signals, accepted: Tensor) -> None:
        cached, self._last = self._last, None
        if cached is not None and cached[0] is s:  # check() saw these signals: reuse its rule
            x, above, top = cached[1:]
        else:
            loss = _loss(s)
            if loss is None:
                return
            x = loss
            above, top = self._rule(x, self._ensure(x))[:2]
        st = self._ensure(x)
        st["history"], st["count"], st["streak"] = _RATIO_LEARN(
            self.fuse, x, s.finite.to(x.device), s.total_norm.to(x.device),
            as_bool(accepted, x.device), above, top, st["history"], st["count"], st["streak"],
            self.ratio,
        )  # fmt: skip

    def __repr__(self) -> str:
        return (
            f"RatioSpikeDetector(ratio={self.ratio}, window={self.window}, "
            f"patience={self.patience})"
        )


_DIVERGENCE_STATS = ("ema", "best", "last", "dmean", "dvar")


_DIVERGENCE_STATE = ("anchor", *_DIVERGENCE_STATS, "count", "wait", "fires")


def _divergence_ratio(loss: Tensor, anchor: Tensor) -> Tensor:
    """``loss / anchor``, 1 before the anchor is set (its log is taken eagerly)."""
    return torch.where(anchor > 0, loss / torch.where(anchor > 0, anchor, 1.0), 1.0)


def _divergence_flag(
    x: Tensor, loss: Tensor, grads_finite: Tensor, total_norm: Tensor, ema: Tensor,
    best: Tensor, dvar: Tensor, count: Tensor, wait: Tensor, warmup: int, beta: float,
    noise: float, log_ratio: float,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """:class:`DivergenceDetector`'s flag, the average's rise over its best (0 before the first
    accepted loss), and whether the step takes part (a positive loss, the whole step finite)."""
    ok = x.isfinite() & loss.isfinite() & grads_finite & total_norm.isfinite() & (loss > 0)
    ready = (count >= warmup) & (wait == 0)
    # The EMA's own deviation: a difference of two independent values has twice the variance
    # of one, and an EMA averages about (1 + beta) / (1 - beta) of them.
    spread = (dvar * (0.5 * (1.0 - beta) / (1.0 + beta))).sqrt()
    margin = (noise * spread).clamp(min=log_ratio)
    gap = ema - best
    # The score is exp(gap) (taken eagerly), 1 before the first accepted loss.
    return ready & ok & (gap > margin), torch.where(count > 0, gap, 0.0), ok


def _divergence_learn(
    x: Tensor, ok: Tensor, loss: Tensor, accepted: Tensor, fired: Tensor,
    anchor: Tensor, ema: Tensor, best: Tensor, last: Tensor, dmean: Tensor, dvar: Tensor,
    count: Tensor, wait: Tensor, fires: Tensor,
    beta: float, warmup: int, cooldown: int, log_clip: float, memory: float,
) -> tuple[Tensor, ...]:  # fmt: skip
    """:class:`DivergenceDetector`'s state (``_DIVERGENCE_STATE`` order) after a step whose
    ``log(loss / anchor)`` is ``x``."""
    learn = accepted & ok
    first = count == 0
    # The first accepted loss is the anchor: log(loss / anchor) is 0 there.
    new_anchor = torch.where(learn & first, loss, anchor)
    x = torch.where(first, 0.0, x)
    x_in = torch.where(first, x, torch.minimum(x, ema + log_clip))
    x_in = torch.where(learn, x_in, ema)  # NaN never reaches the arithmetic's result
    # During warm-up the average is the plain mean of the values so far (as ZClip warms up):
    # an EMA started at the first value would keep a lucky first loss for many steps.
    w_ema = torch.where(count < warmup, (count + 1).to(torch.float32).reciprocal(), 1.0 - beta)
    new_ema = ema + w_ema * (x_in - ema)
    d = x_in - last
    w = torch.where(count == 1, 1.0, 1.0 - beta)  # the first difference sets the mean
    new_dmean = dmean + w * (d - dmean)
    new_dvar = (1.0 - w) * (dvar + w * (d - dmean) * (d - dmean))
    leaky = torch.where(new_ema < best, new_ema, best + (1.0 - memory) * (new_ema - best))
    # The best is the lowest settled average: it follows the average through the warm-up.
    new_best = torch.where(count < warmup, new_ema, leaky)
    keep = ~learn | first
    return (
        new_anchor,
        torch.where(learn, new_ema, ema),
        # A flag re-baselines: the next back-off needs a further rise.
        torch.where(fired, ema, torch.where(learn, new_best, best)),
        torch.where(learn, x_in, last),
        torch.where(keep, dmean, new_dmean),
        torch.where(keep, dvar, new_dvar),
        count + learn.to(torch.int64),
        torch.where(fired, cooldown, torch.where(ok, (wait - 1).clamp(min=0), wait)),
        fires + fired.to(torch.int64),
    )


_DIVERGENCE_RATIO = Kernel(_divergence_ratio)
_DIVERGENCE_FLAG = Kernel(_divergence_flag)
_DIVERGENCE_LEARN = Kernel(_divergence_learn)


class DivergenceDetector(Detector):
    """Flags a run whose smoothed loss has risen well above the best it reached: divergence.

    A spike is one bad step; divergence is the model getting worse step after step (a learning
    rate too high for this model, an RNN whose gradients grow), which no single step shows and
    which clipping cannot undo for Adam, whose step size ignores the gradient's scale. The
    detector keeps an exponential moving average ``m`` of the log loss over accepted steps, its
    noise ``s`` (the EMA's own standard deviation, estimated from the variance of the step-to-step
    differences, which a steady trend does not inflate) and a best value ``b``: the lowest ``m``
    reached, which forgets slowly (``b`` moves a fraction ``1 - memory`` of the way up to ``m``
    each step, so one lucky low stretch of a noisy loss does not set the bar for good). It flags
    when ``m - b > max(log(ratio), noise * s)``: the loss is ``ratio`` times above its best, and
    by more than its noise explains. Its default response is ``("backoff",)``: skip the step and
    halve the learning rate (Wortsman et al. 2023, arXiv 2309.14322: loss divergence is the
    symptom of a too-high LR in small transformers; lowering the LR is the remedy). How many
    back-offs a run may take is the guard's ``Budgets.backoff``, not the detector's.

    No unit: the log is taken of the loss divided by an ``anchor``, the first loss the detector
    accepted, stored as it was. A ratio of two stored raw values does not change, bit for bit,
    when the loss is multiplied by a power of two, so neither does any statistic or decision
    (``log(c * loss)`` would shift every value by ``log(c)``, and shifted sums round
    differently). The log keeps what a geometric mean gives: a tiny batch's occasional
    tenfold-high loss moves the average by a factor, not by an amount.

    After a flag it re-baselines (the best becomes the current average) and waits ``cooldown``
    finite steps, so each further rise is one more back-off, at most one per cool-down.

    One outlier moves the average little: each accepted value enters clipped to ``clip`` times
    the average, and skipped or non-finite steps never enter. The flag is decided from the
    history before this step, and only on a finite step.

    Warm-up: no flag until ``warmup`` accepted values are in the average, which is their plain
    mean until then (an EMA started at the first value would keep a lucky first loss for many
    steps), and the best follows it: the bar is set by a settled average. A loss that is not
    positive has no log and is ignored.

    State: ``anchor`` (the first accepted loss, fp32, 0 before it), ``ema``, ``best``, ``last``
    (the last accepted value), ``dmean`` and ``dvar`` (EMA mean and variance of the
    differences), all of ``log(loss / anchor)``; ``count`` (accepted values), ``wait`` (cool-down
    steps left) and ``fires`` (flags so far, for the records).

    Args:
        ratio: flag when the average loss is above this many times its best (``> 1``).
        beta: the average's factor in [0, 1): about ``1 / (1 - beta)`` steps of memory.
        warmup: accepted values before the first flag (``>= 1``).
        cooldown: finite steps without a flag after one (``>= 0``).
        clip: an accepted value enters the average at most this many times above it (``> 1``).
        noise: the rise must also exceed this many noise deviations ``s`` (``>= 0``). 10, not
            6: ``s`` is itself estimated from about 20 noisy differences, and a tiny batch's
            log loss is skewed, so a 6-sigma rise happens on healthy runs (an SGD regression on
            batches of 4 backs off within 500 steps, one seed in eight); measured, 10 raises
            no false alarm there, on the clean benchmark suite, nor in 36 noisy runs.
        memory: how slowly the best forgets, in (0, 1]; 1: the plain minimum.

    Raises:
        ValueError: an argument out of range.

    Example:
        >>> det = DivergenceDetector(ratio=1.2)
        >>> flag, score = det.check(signals); det.update(signals, accepted)
    """

    name: ClassVar[str] = "divergence"
    _last: tuple[Signals, tuple[Tensor, ...]] | None = None  # check()'s, for update()
    default_response: ClassVar[tuple[str, ...] | None] = ("backoff",)
    signal: ClassVar[str] = "loss"
    _config_keys = ("ratio", "beta", "warmup", "cooldown", "clip", "noise", "memory")

    def __init__(
        self,
        ratio: float = 1.2,
        beta: float = 0.9,
        warmup: int = 10,
        cooldown: int = 10,
        clip: float = 2.0,
        noise: float = 10.0,
        memory: float = 0.98,
    ) -> None:
        super().__init__()
        self.ratio = _ratio("ratio", ratio)
        self.beta = fraction("beta", beta, closed_low=True, closed_high=False)
        self.warmup = as_int("warmup", warmup, 1)
        self.cooldown = as_int("cooldown", cooldown, 0)
        self.clip = _ratio("clip", clip)
        self.noise = _validate.threshold("noise", noise)
        self.memory = fraction("memory", memory, closed_low=False, closed_high=True)

    def _state_spec(self) -> dict[str, Spec]:
        return {
            "anchor": Spec((), dtype=torch.float32),
            **{k: Spec((), dtype=torch.float32) for k in _DIVERGENCE_STATS},
            "count": Spec((), integer=True),
            "wait": Spec((), integer=True),
            "fires": Spec((), integer=True),
        }

    def _fresh_state(self, like: Tensor) -> dict[str, Tensor]:
        def zero(dtype: torch.dtype) -> Tensor:
            return torch.zeros((), dtype=dtype, device=like.device)

        return {
            "anchor": zero(torch.float32),
            **{k: zero(torch.float32) for k in _DIVERGENCE_STATS},
            "count": zero(torch.int64),
            "wait": zero(torch.int64),
            "fires": zero(torch.int64),
        }

    def _check_state(self, tensors: dict[str, Tensor], state: dict[str, Any]) -> dict[str, Any]:
        if tensors and not bool(
            torch.stack([tensors[k] for k in ("anchor", *_DIVERGENCE_STATS)]).isfinite().all()
            & (tensors["dvar"] >= 0)
            & (tensors["anchor"] >= 0)
        ):
            raise ValueError(
                "DivergenceDetector.load_state_dict: the statistics must be finite, dvar and "
                "anchor >= 0"
            )
        return {}

    def _measure(self, s: Signals) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor] | None:
        """The loss, ``x = log(loss / anchor)`` (0 for the first loss), whether the step takes
        part, the flag and the average's rise over its best; ``None`` without a loss."""
        loss = _loss(s)
        if loss is None:
            return None
        st = self._ensure(loss)
        # log outside the kernels: compiled, it may differ from eager in the last bit.
        x = _DIVERGENCE_RATIO(self.fuse, loss, st["anchor"]).log()
        flag, gap, ok = _DIVERGENCE_FLAG(
            self.fuse, x, loss, s.finite.to(x.device), s.total_norm.to(x.device), st["ema"],
            st["best"], st["dvar"], st["count"], st["wait"], self.warmup, self.beta, self.noise,
            math.log(self.ratio),
        )  # fmt: skip
        return loss, x, ok, flag, gap

    def check(self, s: Signals) -> Detection:
        m = self._measure(s)
        if m is None:
            return _no(s.total_norm.device)
        self._last = (s, m)  # update() on the same signals reuses it
        return Detection(m[3], m[4].exp())  # exp outside the kernels, as log

    def update(self, s: Signals, accepted: Tensor) -> None:
        cached, self._last = self._last, None
        m = cached[1] if cached is not None and cached[0] is s else self._measure(s)
        if m is None:
            return
        loss, x, ok, fired, _ = m
        st = self._ensure(loss)
        new = _DIVERGENCE_LEARN(
            self.fuse, x, ok, loss, as_bool(accepted, x.device), fired,
            *(st[k] for k in _DIVERGENCE_STATE),
            self.beta, self.warmup, self.cooldown, math.log(self.clip), self.memory,
        )  # fmt: skip
        st.update(zip(_DIVERGENCE_STATE, new, strict=True))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`. A state saved before the anchor existed (development
        versions before 0.2, with a ``limit`` of the detector's own) kept ``log(loss)``: it loads
        with the anchor 1, which is the same thing, and without the limit."""
        if isinstance(state, dict) and "limit" in state:
            state = {k: v for k, v in state.items() if k != "limit"}
            old = state.get("state")
            if isinstance(old, dict) and old and "anchor" not in old:
                state = {**state, "state": {**old, "anchor": torch.ones(())}}
        super().load_state_dict(state)

    def __repr__(self) -> str:
        return (
            f"DivergenceDetector(ratio={self.ratio}, beta={self.beta}, warmup={self.warmup}, "
            f"cooldown={self.cooldown}, clip={self.clip}, noise={self.noise}, "
            f"memory={self.memory})"
        )


def _ratio(name: str, value: Any) -> float:
    r = _validate.as_float(name, value)
    if not (math.isfinite(r) and r > 1.0):
        raise ValueError(f"{name} must be a finite number > 1, got {value!r}")
    return r


def others_median(values: Tensor) -> Tensor:
    """For each element, the (lower) median of all the other elements; 1-D in, 1-D out.

    Needs at least two elements. Computed from one sort: removing the element of rank r shifts
    the median of the rest by one rank when r is at or below it.
    """
    n = values.numel()
    ordered, order = values.sort()
    rank = torch.empty_like(order)
    rank[order] = torch.arange(n, device=values.device)
    m = (n - 2) // 2  # the lower median's index among n - 1 others
    return torch.where(rank > m, ordered[m], ordered[min(m + 1, n - 1)])


class VanishingDetector(Detector):
    """Flags layers whose gradient norm stays below ``floor`` times the median of the others.

    A layer is *low* on a step when its norm is under ``floor`` x the median norm of the other
    layers (so one dead layer among healthy ones stands out whatever the overall scale), and
    *vanishing* when it has been low for ``patience`` accepted steps in a row, this one included.
    ``check`` flags when any layer is vanishing; the score is how many are. :meth:`layer_mask`
    gives the per-layer mask on the device and :meth:`vanishing_layers` its names (a host read,
    for reports).

    Warm-up: none beyond ``patience``. Needs at least two gradients; with one it never flags.
    State is per layer name, so parameters may come and go between steps: ``run`` (int64, the
    current low streak of each layer) under ``"state"``, and ``names`` beside it.

    Its flag asks for a look, not a skip: :attr:`default_response` is ``("log",)``.

    Args:
        floor: ratio to the others' median, in (0, 1).
        patience: consecutive low accepted steps before flagging (``>= 1``).

    Raises:
        ValueError: an argument out of range.

    Example:
        >>> det = VanishingDetector(floor=1e-3, patience=10)
        >>> det.vanishing_layers(signals)
        ['layers.0.weight']
    """

    name: ClassVar[str] = "vanishing"
    default_response: ClassVar[tuple[str, ...] | None] = ("log",)
    _config_keys = ("floor", "patience")

    def __init__(self, floor: float = 1e-3, patience: int = 10) -> None:
        super().__init__()
        f = _validate.as_float("floor", floor)
        if not (0 < f < 1):
            raise ValueError(f"floor must be in (0, 1), got {f!r}")
        self.floor = f
        self.patience = as_int("patience", patience, 1)
        self._names: list[str] = []

    def _state_spec(self) -> dict[str, Spec]:
        return {"run": Spec(None, integer=True)}

    def _extra_state(self) -> dict[str, Any]:
        return {"names": list(self._names)}

    def _check_state(self, tensors: dict[str, Tensor], state: dict[str, Any]) -> dict[str, Any]:
        owner = type(self).__name__
        check_keys(owner, state, ["names"])
        names = state["names"]
        if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
            raise TypeError(f"{owner}.load_state_dict: names must be a list of str")
        n_run = tensors["run"].numel() if tensors else None
        if n_run is None and names:
            raise ValueError(f"{owner}.load_state_dict: names without a run")
        if n_run is not None and n_run != len(names):
            raise ValueError(
                f"{owner}.load_state_dict: state['run'] must have one entry per name "
                f"({len(names)}), got {n_run}"
            )
        return {"_names": list(names)}

    def low_mask(self, s: Signals) -> Tensor:
        """Per-layer bool: below the floor on this step (all False if not finite); pure."""
        device = s.total_norm.device
        if len(s.per_tensor) < 2:
            return torch.zeros((len(s.per_tensor),), dtype=torch.bool, device=device)
        v = stack(s.per_tensor, s.total_norm.to(torch.float32))
        return (v < self.floor * others_median(v)) & s.finite.to(device, torch.bool)

    def _aligned_run(self, names: list[str], device: torch.device) -> Tensor:
        n = len(names)
        if not self._state:
            return torch.zeros((n,), dtype=torch.int64, device=device)
        run = self._state["run"].to(device)
        if names == self._names:
            return run
        if run.numel() == 0 or n == 0:
            return torch.zeros((n,), dtype=torch.int64, device=device)
        # Names changed (a parameter without a gradient this step): carry runs over by name.
        where = {name: i for i, name in enumerate(self._names)}
        src = torch.tensor([where.get(name, -1) for name in names], dtype=torch.int64)
        src = src.to(device, non_blocking=True)  # host -> device: no wait for the device
        return torch.where(src >= 0, run[src.clamp(min=0)], 0)

    def layer_mask(self, s: Signals) -> Tensor:
        """Per-layer bool, in ``s.names`` order: vanishing on this step; pure, on the device."""
        low = self.low_mask(s)
        run = self._aligned_run(list(s.names), low.device)
        return low & (run + 1 >= self.patience)

    def vanishing_layers(self, s: Signals) -> list[str]:
        """Names of the vanishing layers (reads the mask back to the host: not per step)."""
        mask = self.layer_mask(s).cpu().tolist()
        return [name for name, m in zip(s.names, mask) if m]

    def check(self, s: Signals) -> Detection:
        mask = self.layer_mask(s)
        return Detection(mask.any(), mask.sum().to(torch.float32))

    def update(self, s: Signals, accepted: Tensor) -> None:
        if len(s.names) != len(s.per_tensor):
            raise ValueError(
                f"Signals has {len(s.names)} names for {len(s.per_tensor)} norms; they must match"
            )
        low = self.low_mask(s)
        run = self._aligned_run(list(s.names), low.device)
        ok = as_bool(accepted, low.device) & s.finite.to(low.device, torch.bool)
        self._state = {"run": torch.where(ok, torch.where(low, run + 1, 0), run)}
        self._names = list(s.names)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(_legacy(state, ("run",)))

    def __repr__(self) -> str:
        return f"VanishingDetector(floor={self.floor}, patience={self.patience})"


def update_ratios(before: list[Tensor], after: list[Tensor], eps: float = 1e-12) -> Tensor:
    """``||after_i - before_i|| / max(||before_i||, eps)`` for each pair, as one fp32 vector.

    Args:
        before: weights before the optimizer step (copies).
        after: the same weights after it.
        eps: floor on the weight norm (``> 0``).

    Returns:
        1-D fp32 tensor of ratios on the first tensor's device (empty for empty input).

    Example:
        >>> update_ratios([torch.ones(4)], [torch.full((4,), 1.1)])
        tensor([0.1000])
    """
    if len(before) != len(after):
        raise ValueError(f"before has {len(before)} tensors, after has {len(after)}")
    if not before:
        return torch.zeros((0,), dtype=torch.float32)
    device = before[0].device
    d = _norms32(torch._foreach_sub(after, before), device)
    return d / _norms32(before, device).clamp(min=eps)


def _norms32(tensors: Sequence[Tensor], device: torch.device) -> Tensor:
    """The 2-norm of each tensor (measured by :func:`gradguard.core.norms.tensor_norms`, fp32
    accumulation for fp16/bf16), as one fp32 vector on ``device``."""
    return stack(tensor_norms(list(tensors)), torch.empty((0,), dtype=torch.float32, device=device))


class UpdateRatioDetector(Detector):
    """Per-layer update-to-weight ratio ``||W_after - W_before|| / ||W_before||``, and a flag.

    Healthy training changes a weight matrix by roughly 1e-3 of its norm per step; a ratio near
    or above ``max_ratio`` means the step moved the weights wildly (too high a learning rate, a
    poisoned batch) even if the gradients looked fine after clipping. The ratio needs the
    weights from both sides of the optimizer step, so the API has two halves around it::

        det.before(model)       # copy the weights (buffers allocated once, one foreach copy)
        optimizer.step()
        det.after(model)        # ratios on the device; check() judges them

    ``check`` judges the ratios of the most recent ``after`` (the step just taken: it can call
    for a rollback, not prevent the step); before any ``after`` it never flags. Non-finite
    ratios are flagged. The score is the largest ratio.

    Cost: memory for one copy of the watched weights (about 0.5 GB for GPT-2 small in fp32,
    allocated once), and per step four passes over them (copy, in-place subtract, two norms),
    no temporaries: on the CPU about a quarter of a foreach AdamW step. Watch only every k-th
    step, or leave 1-D parameters out (the default), when that matters.

    It flags a step already taken, so :attr:`default_response` is ``("log",)``: name a
    ladder with ``"rollback"`` in the guard's ``responses`` to act on it.

    Args:
        max_ratio: flag above this (``> 0``).
        include_1d: also watch biases and norm gains (small or zero norms make their ratios
            large and noisy, so they are left out by default).
        eps: floor on the weight norm (``> 0``).

    Raises:
        ValueError: an argument out of range.
        TypeError: ``include_1d`` not a bool.

    Example:
        >>> det = UpdateRatioDetector(max_ratio=0.1)
        >>> det.before(model); opt.step(); ratios = det.after(model)
    """

    name: ClassVar[str] = "update_ratio"
    default_response: ClassVar[tuple[str, ...] | None] = ("log",)
    _config_keys = ("max_ratio", "include_1d", "eps")

    def __init__(self, max_ratio: float = 0.1, include_1d: bool = False, eps: float = 1e-12):
        super().__init__()
        self.max_ratio = _validate.threshold("max_ratio", max_ratio, allow_zero=False)
        if not isinstance(include_1d, bool):
            raise TypeError(f"include_1d must be a bool, got {type(include_1d).__name__}")
        self.include_1d = include_1d
        self.eps = _validate.threshold("eps", eps, allow_zero=False)
        self.names: list[str] = []
        self.ratios: Tensor | None = None
        self._copies: list[Tensor] = []
        self._copies_spent = True  # after() consumes the snapshot; before() renews it

    def _watched(self, params: nn.Module | Iterable[Tensor]) -> tuple[list[str], list[Tensor]]:
        pairs: list[tuple[str, Tensor]]
        if isinstance(params, nn.Module):
            pairs = list(params.named_parameters())
        else:
            pairs = [(str(i), p) for i, p in enumerate(_validate.materialize(params))]
        kept = [(n, p) for n, p in pairs if self.include_1d or p.ndim >= 2]
        return [n for n, _ in kept], [p.detach() for _, p in kept]

    @torch.no_grad()
    def before(self, params: nn.Module | Iterable[Tensor]) -> None:
        """Snapshot the watched weights (a module, or tensors named by position)."""
        names, weights = self._watched(params)
        same = len(self._copies) == len(weights) and all(
            c.shape == w.shape and c.dtype == w.dtype and c.device == w.device
            for c, w in zip(self._copies, weights)
        )
        if not same:
            self._copies = [torch.empty_like(w) for w in weights]
        if weights:
            torch._foreach_copy_(self._copies, weights)
        self.names = names
        self._copies_spent = False

    @torch.no_grad()
    def after(self, params: nn.Module | Iterable[Tensor]) -> Tensor:
        """The ratios since :meth:`before`, per watched layer (in :attr:`names` order)."""
        names, weights = self._watched(params)
        if names != self.names or len(weights) != len(self._copies) or self._copies_spent:
            raise RuntimeError(
                "UpdateRatioDetector.after() needs a matching before() on the same parameters"
            )
        if not weights:
            self.ratios = torch.zeros((0,), dtype=torch.float32)
            return self.ratios
        # In place on the copies (the next before() overwrites them anyway): no temporaries.
        device = weights[0].device
        w = _norms32(self._copies, device)
        torch._foreach_sub_(self._copies, weights)
        d = _norms32(self._copies, device)
        self._copies_spent = True
        self.ratios = d / w.clamp(min=self.eps)
        return self.ratios

    def check(self, s: Signals) -> Detection:
        device = s.total_norm.device
        if self.ratios is None or self.ratios.numel() == 0:
            return _no(device)
        r = self.ratios.to(device)
        bad = (r > self.max_ratio) | ~r.isfinite()
        worst = torch.where(r.isnan(), math.inf, r).max()
        return Detection(bad.any(), worst)

    # state_dict holds the config only: the weight copies are per-step scratch, not state
    # (a resumed run calls before() again).

    def __repr__(self) -> str:
        return f"UpdateRatioDetector(max_ratio={self.max_ratio}, include_1d={self.include_1d})"
