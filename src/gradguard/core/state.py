"""State plumbing shared by the clipping policies and the detectors, in one place.

Every stateful piece keeps two kinds of state, as optax's transforms do:

* **config**: plain Python values given to the constructor (``alpha``, ``window``), saved by
  name and validated on load by building a throwaway instance from them;
* **state tensors**: a small dict of named tensors on the device (a ring buffer, a counter,
  EMA statistics), created lazily from the first tensor seen, so that the object is built
  before the model's device is known, and following that tensor's device afterwards.

:class:`Stateful` turns a class's ``_config_keys`` and ``_state_spec()`` into ``state_dict()``
(``{**config, "state": {name: tensor}}``; config only when the spec is empty) and a
``load_state_dict()`` that validates everything before it changes anything: bad input raises
``TypeError``/``ValueError`` and leaves the object exactly as it was. The checks read tensor
values on the host (a counter must be ``>= 0``): load time only, never per step.

The small argument checks (``as_int``, ``fraction``, ...) live here too, because the policies
and the detectors validate the same kinds of arguments.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from gradguard.core import validate as _validate

__all__ = [
    "Spec",
    "Stateful",
    "as_bool",
    "as_int",
    "check_keys",
    "check_tensor",
    "fraction",
    "optional_threshold",
    "scalar_like",
    "stack",
    "stat_dtype",
]


# ------------------------------------------------------------------------- argument checks


def as_int(name: str, value: Any, lo: int) -> int:
    """``value`` if it is an int ``>= lo`` (not a bool), else ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {value!r}")
    return value


def fraction(name: str, value: Any, *, closed_low: bool, closed_high: bool) -> float:
    """A float in the interval between 0 and 1, each end open or closed as asked."""
    x = _validate.as_float(name, value)
    ok_low = x >= 0 if closed_low else x > 0
    ok_high = x <= 1 if closed_high else x < 1
    if not (math.isfinite(x) and ok_low and ok_high):
        lo, hi = ("[" if closed_low else "("), ("]" if closed_high else ")")
        raise ValueError(f"{name} must be in {lo}0, 1{hi}, got {x!r}")
    return x


def optional_threshold(name: str, value: Any) -> float | None:
    """``None``, or a finite threshold ``> 0``."""
    return None if value is None else _validate.threshold(name, value, allow_zero=False)


# ---------------------------------------------------------------------------- tensor helpers


def scalar_like(value: float, like: Tensor) -> Tensor:
    """A 0-dim tensor holding ``value`` with ``like``'s dtype and device.

    ``torch.full`` on the device is a fill kernel: no host round trip, unlike
    ``torch.tensor(value).to(device)``.
    """
    return torch.full((), value, dtype=like.dtype, device=like.device)


def stat_dtype(like: Tensor) -> torch.dtype:
    """The dtype running statistics are kept in: fp64 for fp64 input, else fp32.

    bf16 statistics would drift after a few hundred EMA steps.
    """
    return torch.float64 if like.dtype == torch.float64 else torch.float32


def stack(values: list[Tensor], like: Tensor) -> Tensor:
    """0-dim tensors as one 1-D tensor with ``like``'s device and dtype.

    One kernel when they share ``like``'s device (the usual case); empty input gives an empty
    tensor.
    """
    if not values:
        return like.new_zeros((0,))
    if all(v.device == like.device for v in values):
        return torch.stack(values).reshape(-1).to(like.dtype)
    return torch.stack([v.reshape(()).to(like.device, like.dtype) for v in values])


def as_bool(accepted: Tensor | bool, device: torch.device) -> Tensor:
    """``accepted`` as a 0-dim bool tensor on ``device`` (a Python bool is filled there)."""
    if isinstance(accepted, bool):
        return torch.full((), accepted, dtype=torch.bool, device=device)
    if accepted.ndim == 0 and accepted.dtype == torch.bool and accepted.device == device:
        return accepted  # the guard's own flag: no op
    return accepted.to(device=device, dtype=torch.bool).reshape(())


# ----------------------------------------------------------------------------- state checks


def check_keys(owner: str, state: Any, keys: Iterable[str]) -> None:
    """``state`` is a dict holding every key in ``keys``, else TypeError/ValueError."""
    if not isinstance(state, dict):
        raise TypeError(f"{owner}.load_state_dict expects a dict, got {type(state).__name__}")
    missing = [k for k in keys if k not in state]
    if missing:
        raise ValueError(f"{owner}.load_state_dict: state lacks keys {missing}")


class Spec(NamedTuple):
    """What one state tensor must look like.

    Attributes:
        shape: the exact shape, or ``None`` for 1-D of any length.
        integer: an int64 counter (must be ``>= 0``) rather than a floating statistic.
        dtype: a floating dtype the loaded tensor is converted to; ``None`` keeps its own
            (statistics stay fp64 when they were saved in fp64).
    """

    shape: tuple[int, ...] | None
    integer: bool = False
    dtype: torch.dtype | None = None


def check_tensor(owner: str, name: str, value: Any, spec: Spec) -> Tensor:
    """``value`` as a detached copy if it is a tensor of ``spec``'s kind and shape.

    Raises:
        TypeError: not a tensor, or not int64 (counter) / floating (statistic).
        ValueError: wrong shape, or a negative counter (read on the host: load time only).
    """
    kind = "an int64" if spec.integer else "a floating"
    ok_kind = isinstance(value, Tensor) and (
        value.dtype == torch.int64 if spec.integer else value.dtype.is_floating_point
    )
    if not ok_kind:
        raise TypeError(f"{owner}.load_state_dict: state[{name!r}] must be {kind} tensor")
    ok_shape = value.ndim == 1 if spec.shape is None else tuple(value.shape) == spec.shape
    if not ok_shape:
        want = "1-D" if spec.shape is None else f"shape {spec.shape}"
        raise ValueError(
            f"{owner}.load_state_dict: state[{name!r}] must have {want}, got {tuple(value.shape)}"
        )
    if spec.integer and bool((value < 0).any()):
        raise ValueError(f"{owner}.load_state_dict: state[{name!r}] must be >= 0")
    out = value.detach().clone()
    return out if spec.dtype is None else out.to(spec.dtype)


# ---------------------------------------------------------------------------------- Stateful


class Stateful:
    """Named config plus named, lazily created state tensors, with a validated load.

    A subclass declares

    * ``_config_keys``: constructor arguments saved by name (the instance attribute of the
      same name holds each);
    * ``_state_spec()``: name -> :class:`Spec` of each state tensor (may depend on config);
    * ``_fresh_state(like)``: the initial tensors, on ``like``'s device;
    * optionally ``_check_state(tensors, state)``: cross-checks at load time, returning host
      attributes to restore beside the tensors (the vanishing detector's layer names).

    and then uses :meth:`_ensure` on the hot path. ``state_dict()`` is
    ``{**config, "state": {name: clone}}`` (config only when the spec is empty); the state
    dict is empty until the first step created the tensors.

    Example:
        >>> class Counter(Stateful):
        ...     def _state_spec(self):
        ...         return {"count": Spec((), integer=True)}
        ...     def _fresh_state(self, like):
        ...         return {"count": torch.zeros((), dtype=torch.int64, device=like.device)}
    """

    _config_keys: ClassVar[tuple[str, ...]] = ()

    # Whether the per-step arithmetic runs as compiled kernels (gradguard.core.fuse.Mode): a
    # run-time choice of the one who runs it (a Guard sets its config's ``compile``), not part
    # of the config or the state: the decisions are the same either way, bit for bit.
    fuse: bool | None = False

    def __init__(self) -> None:
        self._state: dict[str, Tensor] = {}

    # -- hooks

    def _state_spec(self) -> dict[str, Spec]:
        """name -> :class:`Spec` of each state tensor; ``{}``: config only."""
        return {}

    def _fresh_state(self, like: Tensor) -> dict[str, Tensor]:
        """The initial state tensors, on ``like``'s device."""
        raise NotImplementedError(f"{type(self).__name__} does not create state tensors")

    def _check_state(self, tensors: dict[str, Tensor], state: dict[str, Any]) -> dict[str, Any]:
        """Cross-checks beyond shapes and kinds, at load time, on the throwaway instance.

        Args:
            tensors: the checked state tensors (empty: none saved yet).
            state: the whole dict being loaded.

        Returns:
            Instance attributes to set beside the tensors (default none).
        """
        return {}

    def _extra_state(self) -> dict[str, Any]:
        """Host values saved beside config and tensors (default none)."""
        return {}

    # -- hot path

    def _ensure(self, like: Tensor) -> dict[str, Tensor]:
        """The state tensors, created on ``like``'s device the first time.

        A state loaded on the CPU follows the gradients to their device, once.
        """
        state = self.__dict__.get("_state")
        if not state:
            state = self._state = self._fresh_state(like)
        first = next(iter(state.values()))
        if first.device != like.device:
            state = self._state = {k: v.to(like.device) for k, v in state.items()}
        return state

    # -- checkpointing

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue identically: config as plain values, tensors cloned.

        Returns:
            ``{**config, **extra, "state": {name: tensor}}``; no ``"state"`` key for classes
            without state tensors.
        """
        out: dict[str, Any] = {k: getattr(self, k) for k in self._config_keys}
        out.update(self._extra_state())
        if self._state_spec():
            tensors = self.__dict__.get("_state") or {}
            out["state"] = {k: v.detach().clone() for k, v in tensors.items()}
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned; bad input raises and changes nothing.

        Raises:
            TypeError: ``state`` or one of its entries has the wrong type.
            ValueError: a key is missing, a config value is out of range, or a tensor has the
                wrong shape or value.
        """
        owner = type(self).__name__
        has_state = bool(self._state_spec())
        check_keys(owner, state, [*self._config_keys, *(["state"] if has_state else [])])
        # Validate on a throwaway instance first, so that bad input changes nothing here. Without
        # config there is nothing to rebuild (and a subclass may need constructor arguments).
        checked = (
            type(self)(**{k: state[k] for k in self._config_keys})  # type: ignore[call-arg]
            if self._config_keys
            else self
        )
        tensors: dict[str, Tensor] = {}
        if has_state:
            inner = state["state"]
            if not isinstance(inner, dict):
                raise TypeError(f"{owner}.load_state_dict: state['state'] must be a dict")
            spec = checked._state_spec()
            if inner and set(inner) != set(spec):
                raise ValueError(
                    f"{owner}.load_state_dict: state['state'] must have keys {sorted(spec)} "
                    f"(or be empty), got {sorted(map(str, inner))}"
                )
            if inner:
                tensors = {k: check_tensor(owner, k, inner[k], s) for k, s in spec.items()}
        extra = checked._check_state(tensors, state)
        for k in self._config_keys:
            setattr(self, k, getattr(checked, k))
        for k, v in extra.items():
            setattr(self, k, v)
        self._state = tensors
