"""RESPOND: the signals, their ladders, budgets, counters and reasons, in one room.

Each signal (``"nonfinite"``, a detector's ``"name:signal"``, ...) has a ladder: the actions to
take when it fires, mildest first. The first rung is the immediate response; a rung whose budget
is spent hands over to the next one:

* ``"log"``: record it and apply the step as usual;
* ``"clip"``: record it; the step is applied (clipped by the policy, as every step is);
* ``"skip"``: do not apply the step (parameters, optimizer moments, weight decay, step counters,
  LR scheduler and module buffers unchanged); budget: ``skip`` steps *in a row*;
* ``"backoff"``: skip, and multiply the learning rate by ``backoff_factor``; budget: ``backoff``
  back-offs in the run;
* ``"rollback"``: restore the last good snapshot and skip the bad window on replay (PaLM);
  budget: ``rollback`` rollbacks in the run; unavailable without a snapshot;
* ``"abort"``: stop with an incident report (:class:`GuardAbort`).

The default, ``("skip", "rollback", "abort")``, reads: skip a bad step; after ``skip`` skips in a
row roll back; after ``rollback`` rollbacks give up. A ladder never goes down in severity, and
``"log"``/``"clip"`` stand alone (they do not escalate).

:class:`Responder` owns all of it, like optax's ``apply_if_finite`` owns skip-and-count: the
layout of the flag vector the guard agrees on across ranks, which slots skip on the device,
the ladders, the budgets and what has been spent, and the words of each verdict. The guard
builds the flags with :meth:`Responder.flags`, hands :meth:`Responder.skip` to the device, and
once the host holds the bits asks :meth:`Responder.decide` what to do, which also counts it.

Example:
    >>> decide(["nonfinite"], {"nonfinite": ("skip", "abort")}, Budgets(skip=2),
    ...        Counters(streak=2), can_rollback=False)
    ('abort', 'nonfinite')
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "ACTIONS",
    "Budgets",
    "Counters",
    "GuardAbort",
    "Responder",
    "Verdict",
    "check_ladder",
    "decide",
]

# Mildest first; "step" is what a clean step reports, not a response a ladder may name.
ACTIONS = ("log", "clip", "skip", "backoff", "rollback", "abort")
SEVERITY = {a: i for i, a in enumerate(("step", *ACTIONS))}
SKIPPING = frozenset({"skip", "backoff", "rollback", "abort"})
DEFAULT_LADDER: tuple[str, ...] = ("skip", "rollback", "abort")
AMP = "amp_overflow"
NONFINITE = "nonfinite"


class GuardAbort(RuntimeError):
    """Training stopped by the guard. ``incident`` holds the report (also in the records)."""

    def __init__(self, message: str, incident: dict[str, Any]) -> None:
        super().__init__(message)
        self.incident = incident


@dataclass
class Budgets:
    """How often a rung may be used before the ladder escalates.

    Attributes:
        skip: skips in a row (consecutive flagged steps) before escalating; 8 by default, so
            that a short window of bad batches (a corrupt shard) is skipped, not fatal.
        backoff: LR back-offs in the whole run before escalating.
        rollback: rollbacks in the whole run before escalating.
    """

    skip: int = 8
    backoff: int = 3
    rollback: int = 2

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"Budgets.{name} must be an int >= 0, got {value!r}")


@dataclass
class Counters:
    """What the ladder has used so far (host ints; part of the guard's state)."""

    streak: int = 0  # consecutive skipped steps (any skipping action) up to now
    skips: int = 0
    backoffs: int = 0
    rollbacks: int = 0
    amp_skips: int = 0

    def state_dict(self) -> dict[str, int]:
        """The counts as plain ints."""
        return asdict(self)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (every key must be present)."""
        values = {key: int(state[key]) for key in asdict(self)}
        for key, value in values.items():
            setattr(self, key, value)


def check_ladder(name: str, ladder: Any) -> tuple[str, ...]:
    """Validate one ladder: known actions, never milder than the rung before, log/clip alone.

    Args:
        name: the signal, for the error message.
        ladder: an action name or a sequence of them.

    Returns:
        The ladder as a tuple.

    Raises:
        TypeError, ValueError: not a valid ladder.
    """
    if isinstance(ladder, str):
        ladder = (ladder,)
    if not isinstance(ladder, Iterable):
        raise TypeError(f"responses[{name!r}] must be a tuple of actions, got {ladder!r}")
    rungs = tuple(ladder)
    if not rungs:
        raise ValueError(f"responses[{name!r}] is empty; give at least one of {ACTIONS}")
    for a in rungs:
        if a not in ACTIONS:
            raise ValueError(f"responses[{name!r}] has unknown action {a!r}; one of {ACTIONS}")
    if any(a in ("log", "clip") for a in rungs) and len(rungs) > 1:
        raise ValueError(f"responses[{name!r}]: 'log' and 'clip' do not escalate; use them alone")
    for a, b in itertools.pairwise(rungs):
        if SEVERITY[b] <= SEVERITY[a]:
            raise ValueError(
                f"responses[{name!r}] must grow in severity ({' < '.join(ACTIONS)}), got {rungs}"
            )
    return rungs


def _rung(ladder: tuple[str, ...], budgets: Budgets, c: Counters, can_rollback: bool) -> str:
    for i, action in enumerate(ladder):
        if i == len(ladder) - 1:
            # The last rung: a rollback without a snapshot (or without budget) cannot happen.
            if action == "rollback" and (not can_rollback or c.rollbacks >= budgets.rollback):
                return "abort"
            return action
        if action == "skip" and c.streak >= budgets.skip:
            continue
        if action == "backoff" and c.backoffs >= budgets.backoff:
            continue
        if action == "rollback" and (not can_rollback or c.rollbacks >= budgets.rollback):
            continue
        return action
    raise AssertionError("unreachable: ladders are never empty")


def decide(
    fired: Iterable[str],
    ladders: Mapping[str, tuple[str, ...]],
    budgets: Budgets,
    counters: Counters,
    can_rollback: bool,
) -> tuple[str, str]:
    """The action for a step on which the signals ``fired`` fired, and the signal behind it.

    Pure: reads the counters, changes nothing. The most severe rung over all fired signals wins.

    Returns:
        ``(action, signal)``; ``("step", "")`` when nothing fired.
    """
    best, why = "step", ""
    for name in fired:
        action = _rung(ladders[name], budgets, counters, can_rollback)
        if SEVERITY[action] > SEVERITY[best]:
            best, why = action, name
    return best, why


@dataclass
class Verdict:
    """What the host decided for one step.

    Attributes:
        action: ``"step"``, ``"clip"``, ``"log"``, ``"skip"``, ``"backoff"``, ``"rollback"`` or
            ``"abort"``.
        signal: the signal behind a response (``""`` for a clean step).
        reason: the verdict in words.
        fired: every signal that fired.
        clipped: the policy clipped this step.
        index: the detector index of ``signal`` (``None`` for built-in signals).
    """

    action: str
    signal: str = ""
    reason: str = ""
    fired: list[str] = field(default_factory=list)
    clipped: bool = False
    index: int | None = None

    @property
    def skipped(self) -> bool:
        """True when the step was not applied."""
        return self.action in SKIPPING


class Responder:
    """The signal layout, ladders, budgets, counters and reasons of one guard.

    The flag vector that the ranks agree on is ``[clipped, amp_overflow, nonfinite, *detectors]``
    (see :attr:`keys`); its bits are the only thing the host needs to decide a step.

    Args:
        detectors: the guard's detectors; each one's signal key is ``name`` or ``name:signal``
            and its default ladder is the detector's ``default_response`` (``None``: the
            guard's ``default_response``).
        responses: ladders by ``"name:signal"``, ``name`` or ``"nonfinite"``.
        default_response: the ladder of a signal with no entry and no detector default.
        budgets: when a rung escalates.
        backoff_factor: the LR multiplier of a back-off (for the reason's words).

    Example:
        >>> r = Responder([SpikeDetector("loss")], {}, DEFAULT_LADDER, Budgets(), 0.5)
        >>> r.keys
        ['amp_overflow', 'nonfinite', 'spike:loss']
    """

    def __init__(
        self,
        detectors: Sequence[Any],
        responses: Mapping[str, tuple[str, ...]],
        default_response: tuple[str, ...],
        budgets: Budgets,
        backoff_factor: float,
    ) -> None:
        self.budgets = budgets
        self.backoff_factor = backoff_factor
        self.counters = Counters()
        self.keys: list[str] = [AMP, NONFINITE]
        self.ladders: dict[str, tuple[str, ...]] = {
            AMP: ("skip",),
            NONFINITE: responses.get(NONFINITE, default_response),
        }
        for d in detectors:
            signal = getattr(d, "signal", None)
            key = f"{d.name}:{signal}" if isinstance(signal, str) else str(d.name)
            while key in self.keys:
                key += "'"
            own = getattr(d, "default_response", None)
            fallback = check_ladder(key, own) if own is not None else default_response
            self.ladders[key] = responses.get(key, responses.get(str(d.name), fallback))
            self.keys.append(key)
        # Slot 0 is "clipped": it never skips.
        self._skip_bits = [0.0] + [
            1.0 if self.ladders[k][0] in SKIPPING else 0.0 for k in self.keys
        ]
        self._skip_mask = torch.tensor(self._skip_bits)
        self._masks: dict[torch.device, Tensor] = {}

    # ------------------------------------------------------------------ device side

    def flags(
        self, clipped: Tensor, amp_overflow: Tensor, nonfinite: Tensor, detected: Sequence[Tensor]
    ) -> Tensor:
        """The step's flag vector (fp32 0/1 on ``clipped``'s device), in :attr:`keys` order."""
        device = clipped.device
        parts = [clipped, amp_overflow, nonfinite, *detected]
        return torch.stack([p.to(device, torch.bool) for p in parts]).to(torch.float32)

    def skip(self, flags: Tensor) -> Tensor:
        """0-dim bool on the device: some fired signal's first rung does not apply the step."""
        mask = self._masks.get(flags.device)
        if mask is None:
            mask = self._masks[flags.device] = self._skip_mask.to(flags.device)
        return (flags * mask).amax() > 0

    # ------------------------------------------------------------------ host side

    @staticmethod
    def skipped_bits(bits: Sequence[bool], mask: Sequence[float]) -> bool:
        """The host twin of :meth:`skip` on bits already read."""
        return any(b and m > 0 for b, m in zip(bits, mask))

    def skips_on_device(self, bits: Sequence[bool]) -> bool:
        """Whether the device skipped a step whose flag bits are ``bits``."""
        return self.skipped_bits(bits, self._skip_bits)

    def decide(self, bits: Sequence[bool], can_rollback: bool) -> Verdict:
        """Decide a step from its flag bits and count what the decision spends.

        Args:
            bits: the agreed flags, read on the host (:meth:`flags` order).
            can_rollback: a snapshot older than the bad streak exists.

        Returns:
            The :class:`Verdict`. The counters already include it (a rollback's, too: the
            guard must then carry it out or abort).
        """
        clipped = bool(bits[0])
        fired = [k for k, b in zip(self.keys, bits[1:]) if b]
        amp = AMP in fired
        incidents = [k for k in fired if k != AMP]
        c = self.counters
        action, signal = decide(incidents, self.ladders, self.budgets, c, can_rollback)
        if action not in SKIPPING:
            if amp:
                action, signal = "skip", AMP
            else:
                action = "clip" if clipped else "step"
        verdict = Verdict(action, signal, "", fired, clipped, self._detector_index(signal))
        # Spend: one place counts what every action uses.
        if signal == AMP:
            c.amp_skips += 1
        elif action in ("skip", "backoff"):
            c.streak += 1
            c.skips += 1
            c.backoffs += action == "backoff"
        elif action == "rollback":
            c.rollbacks += 1
            c.streak = 0
        elif action != "abort":
            c.streak = 0
        verdict.reason = self.reason(verdict)
        return verdict

    def _detector_index(self, signal: str) -> int | None:
        if signal in self.keys[2:]:
            return self.keys.index(signal) - 2
        return None

    def reason(self, v: Verdict) -> str:
        """A verdict in words (empty for a clean step)."""
        if v.signal == AMP:
            return "amp_overflow: the loss scaler found inf/NaN gradients and lowers its scale"
        if v.action not in SKIPPING:
            return f"logged: {', '.join(v.fired)} fired" if v.fired else ""
        c = self.counters
        detail = {
            "skip": "step not applied",
            "backoff": f"step not applied, learning rate x{self.backoff_factor}",
            "rollback": "restored the last good snapshot, bad batches skipped on replay",
            "abort": (
                f"budgets spent (skips in a row {c.streak}, rollbacks {c.rollbacks}, "
                f"back-offs {c.backoffs})"
            ),
        }[v.action]
        return f"{v.signal}: {detail}"

    def state_dict(self) -> dict[str, Any]:
        """The counters and the signal layout (a guard built otherwise cannot load it)."""
        return {"keys": list(self.keys), "counters": self.counters.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s counters after checking the layout matches."""
        self.check_layout(state)
        self.counters.load_state_dict(state["counters"])

    def check_layout(self, state: Mapping[str, Any]) -> None:
        """Raise ``ValueError`` unless ``state`` was saved with this signal layout."""
        if list(state["keys"]) != self.keys:
            raise ValueError(
                f"Guard.load_state_dict: the state was saved with signals {state['keys']}, "
                f"this guard has {self.keys}; build it with the same detectors"
            )
