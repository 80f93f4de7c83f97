"""DECIDE: adaptive clipping thresholds, each a small object with explicit, named state.

A policy turns what :func:`gradguard.norms.grad_norms` measured into a threshold tensor and
learns from the post-clip norm afterwards. The guard calls, once per optimizer step::

    norms = grad_norms(grads)
    limit = policy.threshold(norms)            # pure, on the device, no host sync
    ...clip with limit, then...
    policy.update(norms, clipped, accepted)    # feed the POST-clip norm(s)

Two rules hold for every policy, because their absence is a known failure of the peers:

* **never poisoned**: a NaN/inf norm, or a step the guard did not accept, leaves the statistics
  exactly as they were (ZClip 1.0.0's running mean turns NaN forever after one NaN norm;
  autoclip 0.2.1's ``StandardClip`` is NaN on its second step);
* **never inflated by the spike it clipped**: statistics are updated with the clipped value
  (the quantile policy stores raw norms by default: a quantile is rank-based, so a spike's
  size cannot move it, while clipped values would ratchet it down; see :class:`QuantileClip`).

``threshold`` returns ``+inf`` where a policy does not want to clip (e.g. during warm-up without
a fallback), so the caller's ``min(1, threshold / norm)`` coefficient is exactly 1 there.
Statistics are kept in fp32 (fp64 for fp64 norms) on the device of the first norms seen; the
threshold has the dtype and device of ``norms.total``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from gradguard import _validate
from gradguard.agc import Exclusion, agc_
from gradguard.norms import GradNorms

__all__ = [
    "AGCPolicy",
    "ClipPolicy",
    "EMARatioClip",
    "FixedThreshold",
    "QuantileClip",
    "ZScoreClip",
]


class ClipPolicy(ABC):
    """Base class of every clipping policy.

    Attributes:
        scope: ``"global"``: one threshold for the total norm; ``"tensor"``: one threshold per
            gradient (a list, in ``norms.per_tensor`` order); ``"unit"``: the policy acts itself
            (AGC, see :class:`AGCPolicy`).
    """

    scope: ClassVar[str] = "global"

    @abstractmethod
    def threshold(self, norms: GradNorms) -> Tensor | list[Tensor]:
        """The clipping threshold(s) for this step; pure, on the device; ``+inf``: no clipping."""

    def update(self, norms: GradNorms, clipped: Tensor | list[Tensor], accepted: Tensor) -> None:
        """Learn from this step: ``clipped`` is the post-clip norm (or one per tensor);
        ``accepted`` (0-dim bool) is False for skipped or non-finite steps, which change nothing.
        """
        return None

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue identically (tensors cloned, config as plain values)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        return None


def _scalar_like(value: float, like: Tensor) -> Tensor:
    # torch.full on the device is a fill kernel: no host round trip.
    return torch.full((), value, dtype=like.dtype, device=like.device)


def _check_keys(cls: type, state: dict[str, Any], keys: Iterable[str]) -> None:
    if not isinstance(state, dict):
        raise TypeError(
            f"{cls.__name__}.load_state_dict expects a dict, got {type(state).__name__}"
        )
    missing = [k for k in keys if k not in state]
    if missing:
        raise ValueError(f"{cls.__name__}.load_state_dict: state lacks keys {missing}")


class FixedThreshold(ClipPolicy):
    """A constant threshold for the total norm: what ``clip_grad_norm_(params, max_norm)`` does.

    Args:
        max_norm: finite and ``> 0``.

    Example:
        >>> policy = FixedThreshold(1.0)
        >>> policy.threshold(grad_norms(grads))
        tensor(1.)
    """

    scope: ClassVar[str] = "global"

    def __init__(self, max_norm: float = 1.0) -> None:
        self.max_norm = _validate.threshold("max_norm", max_norm, allow_zero=False)

    def threshold(self, norms: GradNorms) -> Tensor:
        return _scalar_like(self.max_norm, norms.total)

    def state_dict(self) -> dict[str, Any]:
        return {"max_norm": self.max_norm}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_keys(type(self), state, ["max_norm"])
        self.max_norm = _validate.threshold("max_norm", state["max_norm"], allow_zero=False)

    def __repr__(self) -> str:
        return f"FixedThreshold(max_norm={self.max_norm})"


def _stat_dtype(like: Tensor) -> torch.dtype:
    # Running statistics in bf16 would drift after a few hundred EMA steps; fp64 stays fp64.
    return torch.float64 if like.dtype == torch.float64 else torch.float32


def _int(name: str, value: Any, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {value!r}")
    return value


def _fraction(name: str, value: Any, *, closed_low: bool, closed_high: bool) -> float:
    x = _validate.as_float(name, value)
    ok_low = x >= 0 if closed_low else x > 0
    ok_high = x <= 1 if closed_high else x < 1
    if not (math.isfinite(x) and ok_low and ok_high):
        lo, hi = ("[" if closed_low else "("), ("]" if closed_high else ")")
        raise ValueError(f"{name} must be in {lo}0, 1{hi}, got {x!r}")
    return x


def _optional_threshold(name: str, value: Any) -> float | None:
    return None if value is None else _validate.threshold(name, value, allow_zero=False)


def _check_tensor(
    owner: str, name: str, value: Any, shape: tuple[int, ...] | None, integer: bool
) -> Tensor:
    """A state tensor of the right kind (int64 counter or floating statistic) and shape
    (``None``: any 1-D length); a counter must be >= 0 (read once: load time, not per step)."""
    kind = "an int64" if integer else "a floating"
    want = "1-D" if shape is None else f"shape {shape}"
    ok_kind = isinstance(value, Tensor) and (
        value.dtype == torch.int64 if integer else value.dtype.is_floating_point
    )
    if not ok_kind:
        raise TypeError(f"{owner}.load_state_dict: state[{name!r}] must be {kind} tensor")
    ok_shape = value.ndim == 1 if shape is None else tuple(value.shape) == shape
    if not ok_shape:
        raise ValueError(
            f"{owner}.load_state_dict: state[{name!r}] must have {want}, got {tuple(value.shape)}"
        )
    if integer and bool((value < 0).any()):
        raise ValueError(f"{owner}.load_state_dict: state[{name!r}] must be >= 0")
    return value


def _stack(values: list[Tensor], like: Tensor) -> Tensor:
    """0-dim tensors as one 1-D tensor with ``like``'s device and dtype (one kernel when they
    share a device, the usual case)."""
    if not values:
        return like.new_zeros((0,))
    if all(v.device == like.device for v in values):
        return torch.stack(values).reshape(-1).to(like.dtype)
    return torch.stack([v.reshape(()).to(like.device, like.dtype) for v in values])


def _as_bool(accepted: Tensor | bool, device: torch.device) -> Tensor:
    if isinstance(accepted, bool):
        return torch.full((), accepted, dtype=torch.bool, device=device)
    return accepted.to(device=device, dtype=torch.bool).reshape(())


class _StatefulPolicy(ClipPolicy):
    """Shared plumbing: named state tensors created lazily on the norms' device."""

    _config_keys: ClassVar[tuple[str, ...]] = ()

    def __init__(self) -> None:
        self._state: dict[str, Tensor] = {}

    def _fresh_state(self, like: Tensor) -> dict[str, Tensor]:
        raise NotImplementedError

    def _ensure(self, like: Tensor) -> dict[str, Tensor]:
        if not self._state:
            self._state = self._fresh_state(like)
        first = next(iter(self._state.values()))
        if first.device != like.device:
            # A state loaded on the CPU follows the gradients to their device, once.
            self._state = {k: v.to(like.device) for k, v in self._state.items()}
        return self._state

    def state_dict(self) -> dict[str, Any]:
        config = {k: getattr(self, k) for k in self._config_keys}
        return {**config, "state": {k: v.detach().clone() for k, v in self._state.items()}}

    def _state_spec(self) -> dict[str, tuple[tuple[int, ...] | None, bool]]:
        """name -> (shape or None for any 1-D, is an int64 counter)."""
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any]) -> None:
        owner = type(self).__name__
        _check_keys(type(self), state, [*self._config_keys, "state"])
        # Validate everything on a throwaway instance first, so bad input changes nothing.
        checked = type(self)(**{k: state[k] for k in self._config_keys})
        inner = state["state"]
        if not isinstance(inner, dict):
            raise TypeError(f"{owner}.load_state_dict: state['state'] must be a dict")
        spec = checked._state_spec()
        if inner and set(inner) != set(spec):
            raise ValueError(
                f"{owner}.load_state_dict: state['state'] must have keys {sorted(spec)} "
                f"(or be empty), got {sorted(map(str, inner))}"
            )
        tensors = {
            k: _check_tensor(owner, k, inner[k], shape, integer).detach().clone()
            for k, (shape, integer) in spec.items()
            if inner
        }
        checked._check_state(tensors)
        for k in self._config_keys:
            setattr(self, k, getattr(checked, k))
        self._state = tensors

    def _check_state(self, tensors: dict[str, Tensor]) -> None:
        """Cross-checks beyond shapes and kinds (load time only)."""
        return None


class QuantileClip(_StatefulPolicy):
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

    Example:
        >>> policy = QuantileClip(quantile=0.9, history=1000)
        >>> limit = policy.threshold(norms); ...; policy.update(norms, clipped, accepted)
    """

    scope: ClassVar[str] = "global"
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
        self.quantile = _fraction("quantile", quantile, closed_low=True, closed_high=True)
        self.history = _int("history", history, 1)
        self.warmup = _int("warmup", warmup, 1)
        if self.warmup > self.history:
            raise ValueError(f"warmup must be <= history ({self.history}), got {warmup!r}")
        self.max_norm = _optional_threshold("max_norm", max_norm)
        if feed not in ("raw", "clipped"):
            raise ValueError(f"feed must be 'raw' or 'clipped', got {feed!r}")
        self.feed = feed

    def _state_spec(self) -> dict[str, tuple[tuple[int, ...] | None, bool]]:
        return {"buffer": ((self.history,), False), "count": ((), True)}

    def _fresh_state(self, like: Tensor) -> dict[str, Tensor]:
        dt = _stat_dtype(like)
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
        ok = _as_bool(accepted, buf.device) & value.isfinite()
        slot = torch.arange(self.history, device=buf.device) == count % self.history
        st["buffer"] = torch.where(slot & ok, value, buf)
        st["count"] = count + ok.to(torch.int64)

    def __repr__(self) -> str:
        return (
            f"QuantileClip(quantile={self.quantile}, history={self.history}, "
            f"warmup={self.warmup}, max_norm={self.max_norm}, feed={self.feed!r})"
        )


ZCLIP_MODES = ("adaptive", "zscore", "mean")


class ZScoreClip(_StatefulPolicy):
    """Clip the total norm when its z-score over EMA statistics is an outlier (ZClip).

    Kumar, Owen, Chowdhury & Güra, "ZClip: Adaptive Spike Mitigation for LLM Pre-Training"
    (arXiv 2504.02507), as in the reference package ``zclip`` 1.0.0. With mean ``mu`` and
    standard deviation ``sigma`` (EMA, factor ``alpha``) and ``z = (g - mu) / (sigma + eps)``:

    * ``mode="adaptive"`` (ZClip's default ``zscore`` + ``adaptive_scaling``): when ``z > z_t``
      the threshold is ``mu + z_t**2 * sigma / z``, so larger outliers are clipped harder;
    * ``mode="zscore"`` (the package's ``percentile`` mode): always ``mu + z_t * sigma``;
    * ``mode="mean"`` (the package's ``clip_option="mean"``): ``mu`` when ``z > z_t``.

    Statistics: over the first ``warmup`` accepted finite norms ``mu`` is their mean and
    ``sigma**2`` their population variance (Welford's running form: no buffer), and afterwards
    ``mu <- alpha mu + (1 - alpha) c``, ``var <- alpha var + (1 - alpha) (c - mu)**2`` with the
    new ``mu``, where ``c`` is the post-clip norm. Unlike ``zclip`` 1.0.0, a NaN/inf norm or a
    step the guard did not accept leaves them unchanged (one NaN makes the package's mean NaN for
    the rest of the run), and the warm-up uses post-clip norms.

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

    Example:
        >>> policy = ZScoreClip()   # alpha=0.97, z_thresh=2.5, warmup=25
        >>> limit = policy.threshold(norms)
    """

    scope: ClassVar[str] = "global"
    _config_keys = ("alpha", "z_thresh", "warmup", "mode", "max_norm", "eps")

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
        self.alpha = _fraction("alpha", alpha, closed_low=True, closed_high=False)
        self.z_thresh = _validate.threshold("z_thresh", z_thresh, allow_zero=False)
        self.warmup = _int("warmup", warmup, 1)
        if mode not in ZCLIP_MODES:
            raise ValueError(f"mode must be one of {ZCLIP_MODES}, got {mode!r}")
        self.mode = mode
        self.max_norm = _optional_threshold("max_norm", max_norm)
        self.eps = _validate.threshold("eps", eps)

    def _state_spec(self) -> dict[str, tuple[tuple[int, ...] | None, bool]]:
        return {"count": ((), True), "mean": ((), False), "var": ((), False)}

    def _check_state(self, tensors: dict[str, Tensor]) -> None:
        if tensors and not bool(
            tensors["mean"].isfinite() & tensors["var"].isfinite() & (tensors["var"] >= 0)
        ):
            raise ValueError(
                "ZScoreClip.load_state_dict: mean and var must be finite and var >= 0 "
                "(a NaN here would disable clipping for the rest of the run)"
            )

    def _fresh_state(self, like: Tensor) -> dict[str, Tensor]:
        dt, dev = _stat_dtype(like), like.device
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

    def threshold(self, norms: GradNorms) -> Tensor:
        st = self._ensure(norms.total)
        mean, count = st["mean"], st["count"]
        std = st["var"].sqrt()
        if self.mode == "zscore":
            limit = mean + self.z_thresh * std
        else:
            z = (norms.total.to(mean.dtype) - mean) / (std + self.eps)
            # z > z_t > 0 wherever this branch is kept, so the division is safe.
            outlier = mean + self.z_thresh**2 * std / z if self.mode == "adaptive" else mean
            limit = torch.where(z > self.z_thresh, outlier, math.inf)
        fallback = math.inf if self.max_norm is None else self.max_norm
        limit = torch.where(count >= self.warmup, limit, fallback)
        if self.max_norm is not None:
            limit = limit.clamp(max=self.max_norm)
        return limit.to(norms.total.dtype)

    def update(self, norms: GradNorms, clipped: Tensor | list[Tensor], accepted: Tensor) -> None:
        st = self._ensure(norms.total)
        if not isinstance(clipped, Tensor):
            raise TypeError("ZScoreClip is a global policy: clipped must be a 0-dim tensor")
        count, mean, var = st["count"], st["mean"], st["var"]
        c = clipped.to(mean.device, mean.dtype)
        ok = _as_bool(accepted, mean.device) & c.isfinite()
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


class EMARatioClip(_StatefulPolicy):
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

    Args:
        ratio: lambda_rel ``> 0`` (1.05 in the paper).
        beta: EMA factor in [0, 1) (0.98 in the paper).
        warmup: accepted steps of global clipping (``>= 0``; the paper uses about 100).
        max_norm: lambda_abs, the warm-up global threshold (1.0 in the paper); ``None``: no
            clipping during warm-up.

    Returns:
        ``threshold`` gives one 0-dim tensor per gradient, in ``norms.per_tensor`` order.

    Example:
        >>> policy = EMARatioClip(ratio=1.05, beta=0.98, warmup=100)
        >>> limits = policy.threshold(grad_norms(grads))   # list, one per gradient
    """

    scope: ClassVar[str] = "tensor"
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
        self.beta = _fraction("beta", beta, closed_low=True, closed_high=False)
        self.warmup = _int("warmup", warmup, 0)
        self.max_norm = _optional_threshold("max_norm", max_norm)

    def _state_spec(self) -> dict[str, tuple[tuple[int, ...] | None, bool]]:
        return {"gamma": (None, False), "count": ((), True)}

    def _check_state(self, tensors: dict[str, Tensor]) -> None:
        if tensors and bool((tensors["gamma"] <= 0).any() | tensors["gamma"].isinf().any()):
            raise ValueError(
                "EMARatioClip.load_state_dict: gamma must be finite and > 0, or NaN (unset)"
            )

    def _fresh_state(self, like: Tensor) -> dict[str, Tensor]:
        raise AssertionError("EMARatioClip sizes its state from the number of gradients")

    def _ensure_n(self, norms: GradNorms) -> dict[str, Tensor]:
        n = len(norms.per_tensor)
        like = norms.total
        if not self._state:
            dt = _stat_dtype(like)
            self._state = {
                "gamma": torch.full((n,), math.nan, dtype=dt, device=like.device),
                "count": torch.zeros((), dtype=torch.int64, device=like.device),
            }
        st = self._ensure(like)
        if st["gamma"].numel() != n:
            raise ValueError(
                f"EMARatioClip was fitted to {st['gamma'].numel()} gradients, got {n}; "
                "keep the same parameters with gradients at every step"
            )
        return st

    def threshold(self, norms: GradNorms) -> list[Tensor]:
        st = self._ensure_n(norms)
        gamma, count = st["gamma"], st["count"]
        per = _stack(norms.per_tensor, gamma)
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
        c = _stack(clipped, gamma)
        acc = _as_bool(accepted, gamma.device) & norms.total.to(gamma.device).isfinite()
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

    AGC needs the weights, not just the gradient norms, so it acts itself: the guard calls
    :meth:`clip_` (a wrapper over :func:`gradguard.agc.agc_`). :meth:`threshold` is ``+inf`` so
    that a global clip on top of it changes nothing. AGC has no statistics and no warm-up.

    Args:
        clip_factor: lambda ``> 0`` (0.01 for large batches in the paper).
        eps: floor on a unit's weight norm, ``> 0`` (1e-3).
        exclude: module names, modules or parameters left unclipped (the classifier, in NFNets);
            not part of ``state_dict`` (modules do not serialize), pass them again on resume.

    Example:
        >>> policy = AGCPolicy(0.01, exclude=["fc"])
        >>> policy.clip_(model)    # number of clipped units, 0-dim tensor
    """

    scope: ClassVar[str] = "unit"

    def __init__(
        self, clip_factor: float = 0.01, eps: float = 1e-3, exclude: Iterable[Exclusion] = ()
    ) -> None:
        self.clip_factor = _validate.threshold("clip_factor", clip_factor, allow_zero=False)
        self.eps = _validate.threshold("eps", eps, allow_zero=False)
        self.exclude = (
            list(exclude) if not isinstance(exclude, (str, nn.Module, Tensor)) else [exclude]
        )

    def clip_(self, parameters: nn.Module | Iterable[Tensor]) -> Tensor:
        """Clip ``parameters``' gradients unit-wise in place; returns the clipped-unit count."""
        return agc_(parameters, self.clip_factor, self.eps, exclude=self.exclude)

    def threshold(self, norms: GradNorms) -> Tensor:
        return _scalar_like(math.inf, norms.total)

    def state_dict(self) -> dict[str, Any]:
        return {"clip_factor": self.clip_factor, "eps": self.eps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_keys(type(self), state, ["clip_factor", "eps"])
        cf = _validate.threshold("clip_factor", state["clip_factor"], allow_zero=False)
        self.eps = _validate.threshold("eps", state["eps"], allow_zero=False)
        self.clip_factor = cf

    def __repr__(self) -> str:
        return f"AGCPolicy(clip_factor={self.clip_factor}, eps={self.eps})"
