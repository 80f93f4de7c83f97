"""DECIDE: adaptive clipping thresholds, each a small object with explicit, named state.

A policy turns what :func:`gradguard.core.norms.grad_norms` measured into a threshold tensor, clips
with it, and learns from the step afterwards. The guard calls, once per optimizer step::

    norms = grad_norms(grads)
    c = policy.clip_(grads, norms, params)     # in place, on the device, no host sync
    policy.update(norms, c.learn, accepted)    # learn from the POST-clip norm(s)

:meth:`ClipPolicy.clip_` is the one place a policy acts: the base class clips the total norm
(or, for a policy whose :meth:`~ClipPolicy.threshold` is a list, each tensor to its own
threshold) through :mod:`gradguard.core.clip`; :class:`AGCPolicy` overrides it with unit-wise
clipping. ``threshold`` stays public and pure, for callers that clip themselves.

Two rules hold for every policy, because their absence is a known failure of the peers:

* **never poisoned**: a NaN/inf norm, or a step the guard did not accept, leaves the statistics
  exactly as they were (ZClip 1.0.0's running mean turns NaN forever after one NaN norm;
  autoclip 0.2.1's ``StandardClip`` is NaN on its second step);
* **never inflated by the spike it clipped**: statistics are updated with the clipped value
  (the quantile policy stores raw norms by default: a quantile is rank-based, so a spike's
  size cannot move it, while clipped values would ratchet it down; see :class:`QuantileClip`).

``threshold`` returns ``+inf`` where a policy does not want to clip (e.g. during warm-up without
a fallback), so the coefficient ``min(1, threshold / (norm + 1e-6))`` is exactly 1 there.
Statistics are kept in fp32 (fp64 for fp64 norms) on the device of the first norms seen; the
threshold has the dtype and device of ``norms.total``. State follows one pattern
(:class:`gradguard.core.state.Stateful`): config by name, named state tensors under ``"state"``,
and a ``load_state_dict`` that validates on a throwaway instance, so bad input changes nothing.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from gradguard.core import validate as _validate
from gradguard.core.agc import Exclusion, agc_
from gradguard.core.clip import Clipped, clip_each_with_norms_, clip_with_norms_
from gradguard.core.fuse import Kernel
from gradguard.core.norms import GradNorms, grad_norms
from gradguard.core.state import (
    Spec,
    Stateful,
    as_bool,
    as_int,
    fraction,
    optional_threshold,
    scalar_like,
    stack,
    stat_dtype,
)

__all__ = [
    "AGCPolicy",
    "ClipPolicy",
    "EMARatioClip",
    "FixedThreshold",
    "MedianClip",
    "QuantileClip",
    "ZScoreClip",
]

Parameters = nn.Module | Iterable[Tensor]


class ClipPolicy(Stateful, ABC):
    """Base class of every clipping policy: a pure ``threshold``, an in-place ``clip_`` and a
    guarded ``update``.

    A subclass implements :meth:`threshold` (one 0-dim tensor for the total norm, or a list
    with one per gradient) and, when it learns, :meth:`update`; :meth:`clip_` then clips with
    the guard's semantics. State goes through ``_config_keys`` and ``_state_spec()``
    (:class:`gradguard.core.state.Stateful`), which give ``state_dict`` and a validated
    ``load_state_dict``.

    Example:
        >>> class Half(ClipPolicy):
        ...     def threshold(self, norms):
        ...         return norms.total / 2
        >>> c = Half().clip_(grads, grad_norms(grads))   # every step halves the total norm
    """

    @abstractmethod
    def threshold(self, norms: GradNorms) -> Tensor | list[Tensor]:
        """The clipping threshold(s) for this step; pure, on the device; ``+inf``: no clipping.

        Args:
            norms: this step's pre-clip norms.

        Returns:
            A 0-dim tensor (a threshold for the total norm) or a list with one 0-dim tensor
            per gradient (in ``norms.per_tensor`` order), with ``norms.total``'s dtype.
        """

    def update(self, norms: GradNorms, clipped: Tensor | list[Tensor], accepted: Tensor) -> None:
        """Learn from this step (the base class learns nothing).

        Args:
            norms: this step's pre-clip norms (the same as given to :meth:`threshold`).
            clipped: what the policy learns from, ``Clipped.learn``: the post-clip total norm
                (0-dim), or one post-clip norm per gradient for per-tensor policies.
            accepted: 0-dim bool; False for skipped or non-finite steps, which change nothing.
        """
        return None

    def clip_(
        self,
        grads: Sequence[Tensor],
        norms: GradNorms,
        params: Parameters | None = None,
        *,
        norm_type: float = 2.0,
        foreach: bool | None = None,
    ) -> Clipped:
        """Clip ``grads`` in place to this step's threshold; the one way a policy acts.

        The coefficient is :func:`gradguard.core.clip.clip_coefficient`'s
        ``min(threshold / (norm + 1e-6), 1)``: of the total norm when :meth:`threshold` gives
        one tensor (:func:`gradguard.core.clip.clip_with_norms_`), of each gradient's norm when it
        gives a list (:func:`gradguard.core.clip.clip_each_with_norms_`). A non-finite total norm
        leaves every gradient bit-for-bit untouched (the guard skips that step). Nothing is
        read on the host.

        Args:
            grads: the gradients, in the order they were measured in.
            norms: their pre-clip norms, from :func:`gradguard.core.norms.grad_norms`.
            params: the parameters; unused here (AGC needs the weights).
            norm_type: the p the norms were measured with, for the post-clip total.
            foreach: torch's flag for the multiply.

        Returns:
            :class:`~gradguard.core.clip.Clipped`: threshold, whether anything was clipped, the
            post-clip total, and what :meth:`update` learns from.

        Example:
            >>> norms = grad_norms(grads)
            >>> c = FixedThreshold(1.0).clip_(grads, norms)
            >>> policy.update(norms, c.learn, accepted)
        """
        limit = self.threshold(norms)
        if isinstance(limit, Tensor):
            return clip_with_norms_(grads, limit, norms, norm_type=norm_type, foreach=foreach)
        return clip_each_with_norms_(grads, limit, norms, norm_type=norm_type, foreach=foreach)


class FixedThreshold(ClipPolicy):
    """A constant threshold for the total norm: what ``clip_grad_norm_(params, max_norm)`` does.

    ``clip_`` with it gives gradients bit-identical to ``torch.nn.utils.clip_grad_norm_`` for
    fp32 and fp64 (where the total is finite).

    Args:
        max_norm: finite and ``> 0``.

    Raises:
        ValueError: ``max_norm`` out of range.

    Example:
        >>> policy = FixedThreshold(1.0)
        >>> policy.threshold(grad_norms(grads))
        tensor(1.)
    """

    _config_keys = ("max_norm",)

    def __init__(self, max_norm: float = 1.0) -> None:
        super().__init__()
        self.max_norm = _validate.threshold("max_norm", max_norm, allow_zero=False)

    def threshold(self, norms: GradNorms) -> Tensor:
        return scalar_like(self.max_norm, norms.total)

    def __repr__(self) -> str:
        return f"FixedThreshold(max_norm={self.max_norm})"


class QuantileClip(ClipPolicy):
    """Clip the total norm to the p-th quantile of a bounded history of norms (AutoClip).

    Seetharaman, Wichern, Pardo & Le Roux, "AutoClip: Adaptive Gradient Clipping for Source
    Separation Networks" (arXiv 2007.14469). The history is a ring buffer of ``history`` norms on
    the device; empty slots hold NaN and ``torch.nanquantile`` skips them, so the quantile is
    over the valid part without reading the count back to the host.

    What enters the history: ``feed="raw"`` (default, as in the paper) stores the pre-clip norm
    of every accepted finite step. A quantile is rank-based, so a spike moves it by one rank at
    most, whatever its size: it cannot inflate the threshold. ``feed="clipped"`` stores the
    post-clip norm instead; beware that then no stored value exceeds the threshold in force, so
    the threshold can only fall (a ratchet that over-clips when norms grow, e.g. during a
    learning-rate warm-up).

    Warm-up: until ``warmup`` norms are stored the threshold is ``max_norm`` (``None``: no
    clipping, ``+inf``). ``max_norm`` also caps the threshold afterwards.

    Args:
        quantile: p in [0, 1]; AutoClip's experiments favour low percentiles (0.1 = 10th).
        history: ring-buffer length (``>= 1``).
        warmup: stored norms needed before the quantile is used (``1 <= warmup <= history``).
        max_norm: a fixed cap and the warm-up threshold; ``None`` for none.
        feed: ``"raw"`` or ``"clipped"``, see above.

    Raises:
        ValueError: an argument out of range.

    Example:
        >>> policy = QuantileClip(quantile=0.9, history=1000)
        >>> c = policy.clip_(grads, norms); policy.update(norms, c.learn, accepted)
    """

    _config_keys = ("quantile", "history", "warmup", "max_norm", "feed")

    def __init__(
        self,
        quantile: float = 0.9,
        history: int = 1000,
        warmup: int = 25,
        max_norm: float | None = None,
        feed: str = "raw",
    ) -> None:
        super().__init__()
        self.quantile = fraction("quantile", quantile, closed_low=True, closed_high=True)
        self.history = as_int("history", history, 1)
        self.warmup = as_int("warmup", warmup, 1)
        if self.warmup > self.history:
            raise ValueError(f"warmup must be <= history ({self.history}), got {warmup!r}")
        self.max_norm = optional_threshold("max_norm", max_norm)
        if feed not in ("raw", "clipped"):
            raise ValueError(f"feed must be 'raw' or 'clipped', got {feed!r}")
        self.feed = feed

    def _state_spec(self) -> dict[str, Spec]:
        return {"buffer": Spec((self.history,)), "count": Spec((), integer=True)}

    def _fresh_state(self, like: Tensor) -> dict[str, Tensor]:
        dt = stat_dtype(like)
        return {
            "buffer": torch.full((self.history,), math.nan, dtype=dt, device=like.device),
            "count": torch.zeros((), dtype=torch.int64, device=like.device),
        }

    def threshold(self, norms: GradNorms) -> Tensor:
        st = self._ensure(norms.total)
        fallback = math.inf if self.max_norm is None else self.max_norm
        q = torch.nanquantile(st["buffer"], self.quantile)
        limit = torch.where(st["count"] >= self.warmup, q, fallback)
        if self.max_norm is not None:
            limit = limit.clamp(max=self.max_norm)
        return limit.to(norms.total.dtype)

    def update(self, norms: GradNorms, clipped: Tensor | list[Tensor], accepted: Tensor) -> None:
        st = self._ensure(norms.total)
        if not isinstance(clipped, Tensor):
            raise TypeError("QuantileClip is a global policy: clipped must be a 0-dim tensor")
        buf, count = st["buffer"], st["count"]
        value = (norms.total if self.feed == "raw" else clipped).to(buf.device, buf.dtype)
        ok = as_bool(accepted, buf.device) & value.isfinite()
        slot = torch.arange(self.history, device=buf.device) == count % self.history
        st["buffer"] = torch.where(slot & ok, value, buf)
        st["count"] = count + ok.to(torch.int64)

    def __repr__(self) -> str:
        return (
            f"QuantileClip(quantile={self.quantile}, history={self.history}, "
            f"warmup={self.warmup}, max_norm={self.max_norm}, feed={self.feed!r})"
        )


def _median_limit(history: Tensor, count: Tensor, factor: float) -> tuple[Tensor, Tensor]:
    """The median of the stored norms (the lower one of an even count: a selection, exact) and
    ``factor * median``, or ``+inf`` before the first stored norm; in the statistics' dtype."""
    median = history.nanmedian()  # NaN while empty
    return median, torch.where(count > 0, factor * median, math.inf)


def _median_learn(
    history: Tensor, count: Tensor, g: Tensor, accepted: Tensor, median: Tensor, limit: Tensor,
    factor: float,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """The history and count after the norm ``g`` of a step (stored when ``accepted``, finite
    and nonzero)."""
    ok = accepted & g.isfinite() & (g > 0)
    # A norm far above the threshold is an explosion: it stores the median, not the threshold,
    # so a run of them cannot lift the threshold (before the first store the threshold is inf
    # and the norm itself is stored).
    value = torch.where(g > factor * limit, median, torch.minimum(g, limit))
    slot = torch.arange(history.shape[0], device=history.device) == count % history.shape[0]
    return torch.where(slot & ok, value, history), count + ok.to(torch.int64)


# MedianClip's arithmetic, fused when its ``fuse`` mode says so (gradguard.core.fuse).
_MEDIAN_LIMIT = Kernel(_median_limit)
_MEDIAN_LEARN = Kernel(_median_learn)


class MedianClip(ClipPolicy):
    """Clip the total norm to ``factor`` times the median of the run's own recent norms: a
    threshold with no unit, the default policy.

    The threshold is ``factor * median(history)`` over the last ``window`` accepted finite
    norms, each stored as ``min(norm, threshold in force)``; before the first accepted norm it is
    ``+inf`` (step 0 is never clipped: there is nothing to compare it with). Clipping to a
    statistic of the run's own gradient norms is AutoClip's idea (Seetharaman et al., arXiv
    2007.14469, a percentile of all past norms) and ZClip's (Kumar et al., arXiv 2504.02507, an
    EMA z-score); here the statistic is a median over a short window, for three properties:

    * **scale-free**: a median and a product are exact in floating point, and the clip factor is
      :func:`gradguard.core.clip.ratio_coefficient` (no ``1e-6``): multiplying the loss by a
      power of two multiplies every stored norm, threshold and clipped gradient by exactly that
      power. A summed loss, a wide model or a loss in other units clips exactly as the mean
      loss of a narrow one would;
    * **robust**: one outlier moves a median by one rank whatever its size, and what is stored
      is clipped, so an explosion cannot become "normal" faster than ``factor`` per
      ``window / 2`` accepted steps (a sustained rise of more than ``factor ** (2 / window)``
      per step, 9% for the defaults, is clipped; a healthy plateau is adopted at that rate);
    * **never below the healthy norm**: with ``factor > 1`` a stored value is at least the
      median (a clipped step stores the threshold), so clipping cannot drag the threshold down,
      unlike ZClip's learned clipped norms under a cap (a threshold stuck below healthy norms
      of 10-30 cuts SGD's learning rate on every step).

    Skipped or non-finite steps, and zero norms (no gradient), store nothing.

    Args:
        factor: the threshold over the median, ``> 1`` (2: a step twice the run's typical norm
            is clipped back to twice it).
        window: norms the median is taken over (``>= 1``); a short window follows a healthy
            rise in the norm (a CNN's norm grows tenfold in its first hundred steps), a long one
            resists a long explosion.

    Raises:
        ValueError: an argument out of range.

    Example:
        >>> policy = MedianClip()          # factor 2, window 16
        >>> c = policy.clip_(grads, norms); policy.update(norms, c.learn, accepted)
    """

    _config_keys = ("factor", "window")

    _last_limit: tuple[GradNorms, Tensor, Tensor] | None = None  # threshold() for update()

    def __init__(self, factor: float = 2.0, window: int = 16) -> None:
        super().__init__()
        f = _validate.as_float("factor", factor)
        if not (math.isfinite(f) and f > 1.0):
            raise ValueError(f"factor must be a finite number > 1, got {factor!r}")
        self.factor = f
        self.window = as_int("window", window, 1)

    def _state_spec(self) -> dict[str, Spec]:
        return {"history": Spec((self.window,)), "count": Spec((), integer=True)}

    def _check_state(self, tensors: dict[str, Tensor], state: dict[str, Any]) -> dict[str, Any]:
        if tensors:
            h = tensors["history"]
            if bool(((h <= 0) | h.isinf()).any()):
                raise ValueError(
                    "MedianClip.load_state_dict: history must hold norms > 0 (NaN: empty slots)"
                )
        return {}

    def _fresh_state(self, like: Tensor) -> dict[str, Tensor]:
        dt = stat_dtype(like)
        return {
            "history": torch.full((self.window,), math.nan, dtype=dt, device=like.device),
            "count": torch.zeros((), dtype=torch.int64, device=like.device),
        }

    def _limit(self, st: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        return _MEDIAN_LIMIT(self.fuse, st["history"], st["count"], self.factor)

    def threshold(self, norms: GradNorms) -> Tensor:
        st = self._ensure(norms.total)
        median, limit = self._limit(st)
        self._last_limit = (norms, median, limit)  # the guard learns from the same norms next
        return limit.to(norms.total.dtype)

    def clip_(
        self,
        grads: Sequence[Tensor],
        norms: GradNorms,
        params: Parameters | None = None,
        *,
        norm_type: float = 2.0,
        foreach: bool | None = None,
    ) -> Clipped:
        """Clip the total norm with the scale-free factor ``min(threshold / total, 1)``
        (:func:`gradguard.core.clip.ratio_coefficient`); otherwise as :meth:`ClipPolicy.clip_`."""
        limit = self.threshold(norms)
        return clip_with_norms_(
            grads, limit, norms, norm_type=norm_type, foreach=foreach, scale_free=True,
            fuse=self.fuse,
        )  # fmt: skip

    def update(self, norms: GradNorms, clipped: Tensor | list[Tensor], accepted: Tensor) -> None:
        """Store ``min(norm, threshold)`` of an accepted finite step with a nonzero norm;
        ``clipped`` is not used (the threshold in force is the clipped value, exactly)."""
        st = self._ensure(norms.total)
        if not isinstance(clipped, Tensor):
            raise TypeError("MedianClip is a global policy: clipped must be a 0-dim tensor")
        history, count = st["history"], st["count"]
        g = norms.total.to(history.device, history.dtype)
        cached = self._last_limit
        median, limit = (
            (cached[1], cached[2]) if cached is not None and cached[0] is norms else self._limit(st)
        )
        self._last_limit = None
        st["history"], st["count"] = _MEDIAN_LEARN(
            self.fuse, history, count, g, as_bool(accepted, history.device), median, limit,
            self.factor,
        )  # fmt: skip

    def __repr__(self) -> str:
        return f"MedianClip(factor={self.factor}, window={self.window})"


ZCLIP_MODES = ("adaptive", "zscore", "mean")


class ZScoreClip(ClipPolicy):
    """Clip the total norm when its z-score over EMA statistics is an outlier (ZClip).

    Kumar, Owen, Chowdhury & Güra, "ZClip: Adaptive Spike Mitigation for LLM Pre-Training"
    (arXiv 2504.02507), as in the reference package ``zclip`` 1.0.0. With mean ``mu`` and
    standard deviation ``sigma`` (EMA, factor ``alpha``) and ``z = (g - mu) / (sigma + eps)``:

    * ``mode="adaptive"`` (ZClip's default ``zscore`` + ``adaptive_scaling``): when ``z > z_t``
      the threshold is ``mu + z_t**2 * sigma / z``, so larger outliers are clipped harder;
    * ``mode="zscore"`` (the package's ``percentile`` mode): always ``mu + z_t * sigma``;
    * ``mode="mean"`` (the package's ``clip_option="mean"``): ``mu`` when ``z > z_t``.

    What it learns, as ZClip and the paper do: the norm clipped to the threshold in force,
    ``c = min(g, threshold)``, so on a clipped step the threshold itself (not the post-clip
    norm ``threshold * g / (g + 1e-6)``, which drifts from ZClip by ``1e-6 / g`` relative per
    clipped step: 1e-3 at norms of 1e-3). Over the first ``warmup`` accepted finite norms
    ``mu`` is the mean of ``c`` and ``sigma**2`` its population variance (Welford's running
    form: no buffer); afterwards ``mu <- alpha mu + (1 - alpha) c`` and
    ``var <- alpha var + (1 - alpha) (c - mu)**2`` with the new ``mu``.

    Unlike ``zclip`` 1.0.0: a NaN/inf norm or a step the guard did not accept leaves the
    statistics unchanged (one NaN makes the package's mean NaN for the rest of the run); and
    ``max_norm``, part of the threshold in force, also bounds what is learned (the package
    learns its z-rule threshold uncapped by ``max_grad_norm``, and raw norms during warm-up).
    With ``max_norm=None`` (the default) the statistics equal the package's.

    Warm-up: until ``warmup`` accepted finite norms have been seen the threshold is
    ``max_norm`` (``None``: no clipping). ``max_norm`` also caps it afterwards, like the package's
    ``max_grad_norm`` (whose default is 1.0; ours is no cap).

    Args:
        alpha: EMA factor in [0, 1); 0.97 in the paper.
        z_thresh: z_t > 0; 2.5 in the paper.
        warmup: norms used to initialise the statistics (``>= 1``); 25 in the paper.
        mode: ``"adaptive"``, ``"zscore"`` or ``"mean"``.
        max_norm: a fixed cap and the warm-up threshold; ``None`` for none.
        eps: added to sigma in the z-score, ``>= 0``.

    Raises:
        ValueError: an argument out of range.

    Example:
        >>> policy = ZScoreClip()   # alpha=0.97, z_thresh=2.5, warmup=25
        >>> c = policy.clip_(grads, norms); policy.update(norms, c.learn, accepted)
    """

    _config_keys = ("alpha", "z_thresh", "warmup", "mode", "max_norm", "eps")

    _last_limit: tuple[GradNorms, Tensor] | None = None  # threshold() for update() (a cache)

    def __init__(
        self,
        alpha: float = 0.97,
        z_thresh: float = 2.5,
        warmup: int = 25,
        mode: str = "adaptive",
        max_norm: float | None = None,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.alpha = fraction("alpha", alpha, closed_low=True, closed_high=False)
        self.z_thresh = _validate.threshold("z_thresh", z_thresh, allow_zero=False)
        self.warmup = as_int("warmup", warmup, 1)
        if mode not in ZCLIP_MODES:
            raise ValueError(f"mode must be one of {ZCLIP_MODES}, got {mode!r}")
        self.mode = mode
        self.max_norm = optional_threshold("max_norm", max_norm)
        self.eps = _validate.threshold("eps", eps)

    def _state_spec(self) -> dict[str, Spec]:
        return {"count": Spec((), integer=True), "mean": Spec(()), "var": Spec(())}

    def _check_state(self, tensors: dict[str, Tensor], state: dict[str, Any]) -> dict[str, Any]:
        if tensors and not bool(
            tensors["mean"].isfinite() & tensors["var"].isfinite() & (tensors["var"] >= 0)
        ):
            raise ValueError(
                "ZScoreClip.load_state_dict: mean and var must be finite and var >= 0 "
                "(a NaN here would disable clipping for the rest of the run)"
            )
        return {}

    def _fresh_state(self, like: Tensor) -> dict[str, Tensor]:
        dt, dev = stat_dtype(like), like.device
        return {
            "count": torch.zeros((), dtype=torch.int64, device=dev),
            "mean": torch.zeros((), dtype=dt, device=dev),
            "var": torch.zeros((), dtype=dt, device=dev),
        }

    def zscore(self, norms: GradNorms) -> Tensor:
        """The z-score of this step's total norm (0 during warm-up); pure, on the device."""
        st = self._ensure(norms.total)
        g = norms.total.to(st["mean"].dtype)
        z = (g - st["mean"]) / (st["var"].sqrt() + self.eps)
        return torch.where(st["count"] >= self.warmup, z, 0.0)

    def _limit(self, g: Tensor, st: dict[str, Tensor]) -> Tensor:
        """The threshold in force for the norm ``g``, in the statistics' dtype."""
        mean, count = st["mean"], st["count"]
        std = st["var"].sqrt()
        if self.mode == "zscore":
            limit = mean + self.z_thresh * std
        else:
            z = (g - mean) / (std + self.eps)
            # z > z_t > 0 wherever this branch is kept, so the division is safe.
            outlier = mean + self.z_thresh**2 * std / z if self.mode == "adaptive" else mean
            limit = torch.where(z > self.z_thresh, outlier, math.inf)
        fallback = math.inf if self.max_norm is None else self.max_norm
        limit = torch.where(count >= self.warmup, limit, fallback)
        if self.max_norm is not None:
            limit = limit.clamp(max=self.max_norm)
        return limit

    def threshold(self, norms: GradNorms) -> Tensor:
        st = self._ensure(norms.total)
        limit = self._limit(norms.total.to(st["mean"].dtype), st)
        # The guard asks for the threshold, then learns from the same norms: keep it for update.
        self._last_limit = (norms, limit)
        return limit.to(norms.total.dtype)

    def update(self, norms: GradNorms, clipped: Tensor | list[Tensor], accepted: Tensor) -> None:
        """Learn ``min(g, threshold)`` (class docstring); ``clipped`` is not used, since the
        post-clip norm carries the ``1e-6`` of the clip coefficient."""
        st = self._ensure(norms.total)
        if not isinstance(clipped, Tensor):
            raise TypeError("ZScoreClip is a global policy: clipped must be a 0-dim tensor")
        count, mean, var = st["count"], st["mean"], st["var"]
        g = norms.total.to(mean.device, mean.dtype)
        # The statistics have not changed since threshold(): this is the threshold in force.
        cached = self._last_limit
        limit = cached[1] if cached is not None and cached[0] is norms else self._limit(g, st)
        self._last_limit = None
        c = torch.minimum(g, limit)
        # g, not c: an inf norm is finite after min() with a finite threshold.
        ok = as_bool(accepted, mean.device) & g.isfinite()
        # One update rule with weight w: during warm-up w = 1/k is Welford's running mean and
        # population variance of the first k norms (what ZClip computes from its buffer); then
        # w = 1 - alpha is ZClip's EMA, var <- alpha var + (1 - alpha)(c - new mean)^2. A step
        # that is not ok gets w = 0 and c = mean, which leaves both bit-for-bit unchanged.
        c = torch.where(ok, c, mean)
        in_warmup = count < self.warmup
        w = torch.where(in_warmup, (count + 1).to(mean.dtype).reciprocal(), 1.0 - self.alpha)
        w = torch.where(ok, w, 0.0)
        keep = 1.0 - w  # ZClip's own form, alpha * old + (1 - alpha) * new, for its rounding
        new_mean = keep * mean + w * c
        ref = torch.where(in_warmup, mean, new_mean)
        st["var"] = keep * var + w * (c - ref) * (c - new_mean)
        st["mean"] = new_mean
        st["count"] = count + ok.to(torch.int64)

    def __repr__(self) -> str:
        return (
            f"ZScoreClip(alpha={self.alpha}, z_thresh={self.z_thresh}, warmup={self.warmup}, "
            f"mode={self.mode!r}, max_norm={self.max_norm}, eps={self.eps})"
        )


class EMARatioClip(ClipPolicy):
    """Per-tensor clipping to ``ratio`` times an EMA of each tensor's own clipped norm (AdaGC).

    Wang et al., "AdaGC: Improving Training Stability for Large Language Model Pretraining"
    (arXiv 2502.11034). Each gradient ``i`` keeps ``gamma_i``; after warm-up its threshold is
    ``ratio * gamma_i`` and ``gamma_i <- beta gamma_i + (1 - beta) c_i`` with ``c_i`` its
    post-clip norm. During the first ``warmup`` accepted steps AdaGC clips globally to
    ``max_norm`` (its ``lambda_abs``; expressed here per tensor as
    ``norm_i * max_norm / total`` when ``total > max_norm``, which scales every tensor by the
    same factor) and sets ``gamma_i`` to the smallest clipped norm seen.

    Non-finite, zero (unused or frozen tensors: a zero ``gamma_i`` would pin that tensor's
    threshold at 0 for good) and unaccepted norms are ignored. A tensor with no ``gamma`` yet
    is not clipped after warm-up. The number of gradients must stay the same between calls.
    :meth:`clip_` clips each gradient to its own threshold
    (:func:`gradguard.core.clip.clip_each_with_norms_`) and ``Clipped.learn`` is the list of
    post-clip norms.

    Args:
        ratio: lambda_rel ``> 0`` (1.05 in the paper).
        beta: EMA factor in [0, 1) (0.98 in the paper).
        warmup: accepted steps of global clipping (``>= 0``; the paper uses about 100).
        max_norm: lambda_abs, the warm-up global threshold (1.0 in the paper); ``None``: no
            clipping during warm-up.

    Raises:
        ValueError: an argument out of range, or (at a step) a changed number of gradients.

    Example:
        >>> policy = EMARatioClip(ratio=1.05, beta=0.98, warmup=100)
        >>> limits = policy.threshold(grad_norms(grads))   # list, one per gradient
        >>> c = policy.clip_(grads, norms); policy.update(norms, c.learn, accepted)
    """

    _config_keys = ("ratio", "beta", "warmup", "max_norm")

    def __init__(
        self,
        ratio: float = 1.05,
        beta: float = 0.98,
        warmup: int = 100,
        max_norm: float | None = 1.0,
    ) -> None:
        super().__init__()
        self.ratio = _validate.threshold("ratio", ratio, allow_zero=False)
        self.beta = fraction("beta", beta, closed_low=True, closed_high=False)
        self.warmup = as_int("warmup", warmup, 0)
        self.max_norm = optional_threshold("max_norm", max_norm)
        self._n = 0  # gradients the next fresh state is sized for

    def _state_spec(self) -> dict[str, Spec]:
        return {"gamma": Spec(None), "count": Spec((), integer=True)}

    def _check_state(self, tensors: dict[str, Tensor], state: dict[str, Any]) -> dict[str, Any]:
        if tensors and bool((tensors["gamma"] <= 0).any() | tensors["gamma"].isinf().any()):
            raise ValueError(
                "EMARatioClip.load_state_dict: gamma must be finite and > 0, or NaN (unset)"
            )
        return {}

    def _fresh_state(self, like: Tensor) -> dict[str, Tensor]:
        return {
            "gamma": torch.full((self._n,), math.nan, dtype=stat_dtype(like), device=like.device),
            "count": torch.zeros((), dtype=torch.int64, device=like.device),
        }

    def _ensure_n(self, norms: GradNorms) -> dict[str, Tensor]:
        n = self._n = len(norms.per_tensor)
        st = self._ensure(norms.total)
        if st["gamma"].numel() != n:
            raise ValueError(
                f"EMARatioClip was fitted to {st['gamma'].numel()} gradients, got {n}; "
                "keep the same parameters with gradients at every step"
            )
        return st

    def threshold(self, norms: GradNorms) -> list[Tensor]:
        st = self._ensure_n(norms)
        gamma, count = st["gamma"], st["count"]
        per = stack(norms.per_tensor, gamma)
        total = norms.total.to(gamma.device, gamma.dtype)
        if self.max_norm is None:
            warm = torch.full_like(per, math.inf)
        else:
            warm = torch.where(total > self.max_norm, per * self.max_norm / total, math.inf)
        ema = torch.where(gamma.isnan(), math.inf, self.ratio * gamma)
        limits = torch.where(count < self.warmup, warm, ema).to(norms.total.dtype)
        return list(limits.unbind(0))

    def update(self, norms: GradNorms, clipped: Tensor | list[Tensor], accepted: Tensor) -> None:
        st = self._ensure_n(norms)
        if isinstance(clipped, Tensor) or len(clipped) != len(norms.per_tensor):
            raise TypeError(
                "EMARatioClip is a per-tensor policy: clipped must be a list with one norm "
                "per gradient"
            )
        gamma, count = st["gamma"], st["count"]
        c = stack(clipped, gamma)
        acc = as_bool(accepted, gamma.device) & norms.total.to(gamma.device).isfinite()
        ok = acc & c.isfinite() & (c > 0)
        in_warmup = count < self.warmup
        warm_gamma = torch.fmin(gamma, c)  # fmin: a NaN (unset) gamma takes c
        ema_gamma = torch.where(gamma.isnan(), c, self.beta * gamma + (1 - self.beta) * c)
        st["gamma"] = torch.where(ok, torch.where(in_warmup, warm_gamma, ema_gamma), gamma)
        st["count"] = count + acc.to(torch.int64)

    def __repr__(self) -> str:
        return (
            f"EMARatioClip(ratio={self.ratio}, beta={self.beta}, warmup={self.warmup}, "
            f"max_norm={self.max_norm})"
        )


class AGCPolicy(ClipPolicy):
    """Unit-wise adaptive gradient clipping as a policy (NFNets, arXiv 2102.06171).

    Brock, De, Smith & Simonyan, "High-Performance Large-Scale Image Recognition Without
    Normalization". AGC needs the weights, not just the gradient norms, so :meth:`clip_`
    clips ``params`` with :func:`gradguard.core.agc.agc_` and then measures the result.
    :meth:`threshold` is ``+inf``, so that a global clip on top of it changes nothing. AGC has
    no statistics and no warm-up.

    Unlike the threshold policies, a step with non-finite gradients is not left untouched:
    :func:`~gradguard.core.agc.agc_` still scales every unit it can (a NaN unit stays NaN, an inf
    unit turns NaN). The guard skips such a step, so the update never sees them.

    Args:
        clip_factor: lambda ``> 0`` (0.01 for large batches in the paper).
        eps: floor on a unit's weight norm, ``> 0`` (1e-3).
        exclude: module names, modules or parameters left unclipped (the classifier, in NFNets);
            not part of ``state_dict`` (modules do not serialize), pass them again on resume.
            Module names need ``params`` to be the model.

    Raises:
        ValueError: an argument out of range.

    Example:
        >>> policy = AGCPolicy(0.01, exclude=["fc"])
        >>> c = policy.clip_(grads, grad_norms(grads), model)
        >>> c.clipped     # did any unit get scaled down
        tensor(True)
    """

    _config_keys = ("clip_factor", "eps")

    def __init__(
        self, clip_factor: float = 0.01, eps: float = 1e-3, exclude: Iterable[Exclusion] = ()
    ) -> None:
        super().__init__()
        self.clip_factor = _validate.threshold("clip_factor", clip_factor, allow_zero=False)
        self.eps = _validate.threshold("eps", eps, allow_zero=False)
        self.exclude = (
            list(exclude) if not isinstance(exclude, (str, nn.Module, Tensor)) else [exclude]
        )

    @torch.no_grad()
    def clip_(
        self,
        grads: Sequence[Tensor],
        norms: GradNorms,
        params: Parameters | None = None,
        *,
        norm_type: float = 2.0,
        foreach: bool | None = None,
    ) -> Clipped:
        """Clip ``params``' gradients unit-wise in place, then measure them again.

        Args:
            grads: all the gradients (measured again after clipping for ``Clipped.total``).
            norms: their pre-clip norms (for the device of the results).
            params: the parameters whose gradients AGC clips (a module, so that ``exclude``
                can name submodules, or tensors).
            norm_type: the p for the post-clip total.
            foreach: torch's flag.

        Returns:
            :class:`~gradguard.core.clip.Clipped` with threshold ``+inf``, ``clipped`` True when
            any unit was scaled down, and the post-clip total (also ``learn``).

        Raises:
            TypeError: ``params`` missing.
        """
        if params is None:
            raise TypeError("AGCPolicy.clip_ needs params: AGC clips relative to the weights")
        count = agc_(params, self.clip_factor, self.eps, exclude=self.exclude, foreach=foreach)
        device = norms.total.device
        total = grad_norms(grads, norm_type, foreach=foreach).total.to(device)
        return Clipped(
            threshold=torch.full((), math.inf, dtype=torch.float32, device=device),
            clipped=(count > 0).to(device),
            total=total.float(),
            learn=total,
        )

    def threshold(self, norms: GradNorms) -> Tensor:
        return scalar_like(math.inf, norms.total)

    def __repr__(self) -> str:
        return f"AGCPolicy(clip_factor={self.clip_factor}, eps={self.eps})"
