"""DETECT: on-device flags and scores that say a training step looks wrong.

A detector looks at the :class:`Signals` of one step and returns a :class:`Detection`: a 0-dim
bool ``flag`` and a 0-dim fp32 ``score`` (each detector documents its own: a z-score, a count
of layers, a ratio; the records keep it). ``check`` is pure; ``update`` learns from the step,
but only when the guard accepted it and it was finite, so a spike or a NaN never becomes part
of "normal".

Nothing on the per-step path reads a value back to the host: the guard decides with
``torch.where`` and reads numbers only when it flushes its records. (Helpers meant for reports,
such as :meth:`VanishingDetector.vanishing_layers`, and ``load_state_dict`` checks do read.)
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from gradguard import _validate
from gradguard._foreach import group_by_device_dtype, use_foreach

__all__ = [
    "Detection",
    "Detector",
    "NonFiniteDetector",
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


class Detector(ABC):
    """Base class of every detector: a pure ``check`` and a guarded ``update``."""

    name: ClassVar[str] = "detector"

    @abstractmethod
    def check(self, s: Signals) -> Detection:
        """Judge this step from its signals; pure, on the device."""

    def update(self, s: Signals, accepted: Tensor) -> None:
        """Learn from this step when ``accepted`` (0-dim bool) and its signals are finite."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue identically."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
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


def _int(name: str, value: Any, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {value!r}")
    return value


def _check_keys(obj: object, state: Any, keys: Iterable[str]) -> None:
    name = type(obj).__name__
    if not isinstance(state, dict):
        raise TypeError(f"{name}.load_state_dict expects a dict, got {type(state).__name__}")
    missing = [k for k in keys if k not in state]
    if missing:
        raise ValueError(f"{name}.load_state_dict: state lacks keys {missing}")


def _check_tensor(
    obj: object, name: str, value: Any, shape: tuple[int, ...], integer: bool
) -> Tensor:
    """A state tensor of the right kind and shape; counters >= 0 (read at load time only)."""
    owner = type(obj).__name__
    kind = "an int64" if integer else "a floating"
    if not isinstance(value, Tensor) or not (
        value.dtype == torch.int64 if integer else value.dtype.is_floating_point
    ):
        raise TypeError(f"{owner}.load_state_dict: {name} must be {kind} tensor")
    if tuple(value.shape) != shape:
        raise ValueError(
            f"{owner}.load_state_dict: {name} must have shape {shape}, got {tuple(value.shape)}"
        )
    if integer and bool((value < 0).any()):
        raise ValueError(f"{owner}.load_state_dict: {name} must be >= 0")
    return value


def _as_bool(accepted: Tensor | bool, device: torch.device) -> Tensor:
    if isinstance(accepted, bool):
        return torch.full((), accepted, dtype=torch.bool, device=device)
    return accepted.to(device=device, dtype=torch.bool).reshape(())


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

    Warm-up: no flag until ``warmup`` values are stored (default ``max(2, window // 2)``).

    Args:
        signal: ``"loss"`` or ``"grad_norm"`` (the pre-clip total norm).
        window: history length (``>= 2``).
        z: flag when the score exceeds this (``> 0``).
        warmup: stored values needed before flagging (``2 <= warmup <= window``).
        log: compare ``log(x)`` (default) or ``x``.
        min_std: floor on the std (``>= 0``), so a flat history does not turn a rounding
            error into a huge score; in log space the default 1e-3 means a jump must be at
            least ``z`` x 0.1 % to be flagged. With ``log=False`` it is in the signal's units.

    Example:
        >>> det = SpikeDetector("loss", window=128, z=6.0)
        >>> flag, score = det.check(signals); det.update(signals, accepted)
    """

    name: ClassVar[str] = "spike"

    def __init__(
        self,
        signal: str = "loss",
        window: int = 128,
        z: float = 6.0,
        warmup: int | None = None,
        log: bool = True,
        min_std: float = 1e-3,
    ) -> None:
        if signal not in SPIKE_SIGNALS:
            raise ValueError(f"signal must be one of {SPIKE_SIGNALS}, got {signal!r}")
        self.signal = signal
        self.window = _int("window", window, 2)
        self.z = _validate.threshold("z", z, allow_zero=False)
        self.warmup = _int("warmup", max(2, window // 2) if warmup is None else warmup, 2)
        if self.warmup > self.window:
            raise ValueError(f"warmup must be <= window ({self.window}), got {warmup!r}")
        if not isinstance(log, bool):
            raise TypeError(f"log must be a bool, got {type(log).__name__}")
        self.log = log
        self.min_std = _validate.threshold("min_std", min_std)
        self._buffer: Tensor | None = None
        self._count: Tensor | None = None

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

    def _state(self, device: torch.device) -> tuple[Tensor, Tensor]:
        if self._buffer is None or self._count is None:
            self._buffer = torch.full((self.window,), math.nan, device=device)
            self._count = torch.zeros((), dtype=torch.int64, device=device)
        if self._buffer.device != device:
            self._buffer, self._count = self._buffer.to(device), self._count.to(device)
        return self._buffer, self._count

    def score(self, s: Signals) -> Tensor:
        """The one-sided z-score of this step (0 in warm-up or without the signal); pure."""
        x = self._value(s)
        if x is None:
            return torch.zeros((), dtype=torch.float32, device=s.total_norm.device)
        buf, count = self._state(x.device)
        valid = ~buf.isnan()
        n = valid.sum().to(torch.float32)
        mean = torch.where(valid, buf, 0.0).sum() / n.clamp(min=1)
        var = torch.where(valid, (buf - mean) ** 2, 0.0).sum() / (n - 1).clamp(min=1)
        floor = max(self.min_std, torch.finfo(torch.float32).tiny)
        z = (x - mean) / var.sqrt().clamp(min=floor)
        # A non-finite value is the NonFiniteDetector's business, not a spike.
        return torch.where((count >= self.warmup) & x.isfinite(), z, 0.0)

    def check(self, s: Signals) -> Detection:
        z = self.score(s)
        return Detection(z > self.z, z)

    def update(self, s: Signals, accepted: Tensor) -> None:
        x = self._value(s)
        if x is None:
            return
        buf, count = self._state(x.device)
        # The whole step must be finite: a finite loss with NaN gradients is not "normal".
        step_ok = s.finite.to(x.device, torch.bool) & s.total_norm.to(x.device).isfinite()
        ok = _as_bool(accepted, x.device) & x.isfinite() & step_ok & _loss_finite(s).to(x.device)
        slot = torch.arange(self.window, device=x.device) == count % self.window
        self._buffer = torch.where(slot & ok, x, buf)
        self._count = count + ok.to(torch.int64)

    def state_dict(self) -> dict[str, Any]:
        return {
            "signal": self.signal,
            "window": self.window,
            "z": self.z,
            "warmup": self.warmup,
            "log": self.log,
            "min_std": self.min_std,
            "buffer": None if self._buffer is None else self._buffer.clone(),
            "count": None if self._count is None else self._count.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        keys = ["signal", "window", "z", "warmup", "log", "min_std", "buffer", "count"]
        _check_keys(self, state, keys)
        checked = SpikeDetector(*(state[k] for k in keys[:6]))
        buf, count = state["buffer"], state["count"]
        if (buf is None) != (count is None):
            raise ValueError("SpikeDetector.load_state_dict: buffer and count are both set or None")
        if buf is not None:
            buf = _check_tensor(self, "buffer", buf, (checked.window,), integer=False)
            count = _check_tensor(self, "count", count, (), integer=True)
        self.__dict__.update(checked.__dict__)
        self._buffer = None if buf is None else buf.detach().to(torch.float32).clone()
        self._count = None if count is None else count.detach().clone()

    def __repr__(self) -> str:
        return (
            f"SpikeDetector(signal={self.signal!r}, window={self.window}, z={self.z}, "
            f"warmup={self.warmup}, log={self.log})"
        )


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
    State is per layer name, so parameters may come and go between steps.

    Args:
        floor: ratio to the others' median, in (0, 1).
        patience: consecutive low accepted steps before flagging (``>= 1``).

    Example:
        >>> det = VanishingDetector(floor=1e-3, patience=10)
        >>> det.vanishing_layers(signals)
        ['layers.0.weight']
    """

    name: ClassVar[str] = "vanishing"

    def __init__(self, floor: float = 1e-3, patience: int = 10) -> None:
        f = _validate.as_float("floor", floor)
        if not (0 < f < 1):
            raise ValueError(f"floor must be in (0, 1), got {f!r}")
        self.floor = f
        self.patience = _int("patience", patience, 1)
        self._names: list[str] = []
        self._run: Tensor | None = None

    def low_mask(self, s: Signals) -> Tensor:
        """Per-layer bool: below the floor on this step (all False if not finite); pure."""
        device = s.total_norm.device
        if len(s.per_tensor) < 2:
            return torch.zeros((len(s.per_tensor),), dtype=torch.bool, device=device)
        if all(n.device == device for n in s.per_tensor):
            v = torch.stack(s.per_tensor).reshape(-1).to(torch.float32)
        else:
            v = torch.stack([n.reshape(()).to(device, torch.float32) for n in s.per_tensor])
        return (v < self.floor * others_median(v)) & s.finite.to(device, torch.bool)

    def _aligned_run(self, names: list[str], device: torch.device) -> Tensor:
        n = len(names)
        if self._run is None:
            return torch.zeros((n,), dtype=torch.int64, device=device)
        run = self._run.to(device)
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
        ok = _as_bool(accepted, low.device) & s.finite.to(low.device, torch.bool)
        self._run = torch.where(ok, torch.where(low, run + 1, 0), run)
        self._names = list(s.names)

    def state_dict(self) -> dict[str, Any]:
        return {
            "floor": self.floor,
            "patience": self.patience,
            "names": list(self._names),
            "run": None if self._run is None else self._run.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_keys(self, state, ["floor", "patience", "names", "run"])
        checked = VanishingDetector(state["floor"], state["patience"])
        names, run = state["names"], state["run"]
        if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
            raise TypeError("VanishingDetector.load_state_dict: names must be a list of str")
        if run is not None:
            run = _check_tensor(self, "run (one entry per name)", run, (len(names),), True)
        elif names:
            raise ValueError("VanishingDetector.load_state_dict: names without a run")
        self.floor, self.patience = checked.floor, checked.patience
        self._names = list(names)
        self._run = None if run is None else run.detach().clone()

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
    deltas = torch._foreach_sub(after, before)
    d = torch.stack([n.to(device, torch.float32) for n in _norms(deltas)])
    w = torch.stack([n.to(device, torch.float32) for n in _norms(before)])
    return d / w.clamp(min=eps)


def _norms(tensors: Sequence[Tensor]) -> list[Tensor]:
    # fp32 accumulation, as in gradguard.norms; duplicates cannot occur (distinct weights).
    index = {id(t): i for i, t in enumerate(tensors)}
    slots: list[Tensor | None] = [None] * len(tensors)
    for (device, _), group in group_by_device_dtype(tensors).items():
        if use_foreach(group, device, None):
            norms = torch._foreach_norm(group, 2, dtype=torch.float32)
        else:
            norms = tuple(torch.linalg.vector_norm(t, dtype=torch.float32) for t in group)
        for t, n in zip(group, norms):
            slots[index[id(t)]] = n
    return [n for n in slots if n is not None]


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

    Args:
        max_ratio: flag above this (``> 0``).
        include_1d: also watch biases and norm gains (small or zero norms make their ratios
            large and noisy, so they are left out by default).
        eps: floor on the weight norm (``> 0``).

    Example:
        >>> det = UpdateRatioDetector(max_ratio=0.1)
        >>> det.before(model); opt.step(); ratios = det.after(model)
    """

    name: ClassVar[str] = "update_ratio"

    def __init__(self, max_ratio: float = 0.1, include_1d: bool = False, eps: float = 1e-12):
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
        w = torch.stack([n.to(device) for n in _norms(self._copies)])
        torch._foreach_sub_(self._copies, weights)
        d = torch.stack([n.to(device) for n in _norms(self._copies)])
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

    def state_dict(self) -> dict[str, Any]:
        # The weight copies are per-step scratch, not state: a resumed run calls before() again.
        return {"max_ratio": self.max_ratio, "include_1d": self.include_1d, "eps": self.eps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_keys(self, state, ["max_ratio", "include_1d", "eps"])
        checked = UpdateRatioDetector(state["max_ratio"], state["include_1d"], state["eps"])
        self.max_ratio, self.include_1d, self.eps = (
            checked.max_ratio,
            checked.include_1d,
            checked.eps,
        )

    def __repr__(self) -> str:
        return f"UpdateRatioDetector(max_ratio={self.max_ratio}, include_1d={self.include_1d})"
