"""RESPOND: the signals, their ladders, budgets, counters and reasons, in one room.

Each signal (``"nonfinite"``, a detector's ``"name:signal"``, ...) has a ladder: the actions to
take when it fires, mildest first. The first rung is the immediate response; a rung whose budget
is spent hands over to the next one:

* ``"log"``: record it and apply the step as usual;
* ``"clip"``: record it; the step is applied (clipped by the policy, as every step is);
* ``"skip"``: do not apply the step (parameters, optimizer moments, weight decay, step counters,
  LR scheduler and module buffers unchanged); budget: ``skip`` steps *in a row*;
* ``"backoff"``: skip, and multiply the learning rate by ``backoff_factor``; budget: ``backoff``
  back-offs in the run (on a ladder's last rung, a spent back-off budget logs instead: the
  learning rate is never cut more than ``backoff`` times);
* ``"rollback"``: restore the last good snapshot and skip the bad window on replay (PaLM);
  budget: ``rollback`` rollbacks in the run; unavailable without a snapshot;
* ``"abort"``: stop with an incident report (:class:`GuardAbort`).

The default, ``("skip", "rollback", "abort")``, reads: skip a bad step; after ``skip`` skips in a
row roll back; after ``rollback`` rollbacks give up. A ladder never goes down in severity, and
``"log"``/``"clip"`` stand alone (they do not escalate).

Each action is one :class:`Response` (its name, whether it applies the step, the budget that
bounds it and how it is carried out); :data:`RESPONSES` lists them mildest first, so adding a
response is one class here. :class:`Responder` owns the rest, like optax's ``apply_if_finite``
owns skip-and-count: the layout of the flag vector the guard agrees on across ranks, which
slots skip on the device, the ladders, the budgets and what has been spent, the words of each
verdict and carrying it out. The guard builds the flags with :meth:`Responder.flags`, hands
:meth:`Responder.skip` to the device, asks :meth:`Responder.decide` once the host holds the bits
(which also counts what the verdict spends) and :meth:`Responder.carry_out` to act on it.

Example:
    >>> decide(["nonfinite"], {"nonfinite": ("skip", "abort")}, Budgets(skip=2),
    ...        Counters(streak=2), can_rollback=False)
    ('abort', 'nonfinite')
"""

from __future__ import annotations

import difflib
import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, NoReturn, Protocol

import torch
from torch import Tensor

from gradguard.core.fuse import Kernel

__all__ = [
    "ACTIONS",
    "RESPONSES",
    "Budgets",
    "Counters",
    "GuardAbort",
    "Responder",
    "Response",
    "Shell",
    "Verdict",
    "check_ladder",
    "decide",
]


# --------------------------------------------------------------------------- the responses


class Shell(Protocol):
    """What a response acts on: the guard, narrowed to the three things responses change."""

    def backoff(self, factor: float) -> None:
        """Multiply the learning rate used from the next optimizer step on by ``factor``."""
        ...

    def roll_back(self, step: Any) -> dict[str, Any]:
        """Restore the last good snapshot before the bad streak; returns the record's entries."""
        ...

    def abort(self, step: Any) -> NoReturn:
        """Stop training with :class:`GuardAbort`, leaving every object usable."""
        ...


class Response:
    """One action a ladder can name: whether the step is applied, what bounds it, what it does.

    Attributes:
        name: the action's name in ladders and records.
        applies: the optimizer step is applied (``"log"``, ``"clip"``).
        budget: the :class:`Budgets` field that bounds this rung (``None``: unbounded).
        when_spent: what a spent budget turns this rung into when it is a ladder's last
            (``None``: it stays itself).
    """

    name: ClassVar[str]
    applies: ClassVar[bool] = False
    budget: ClassVar[str | None] = None
    when_spent: ClassVar[str | None] = None

    def spent(self, budgets: Budgets, c: Counters, can_rollback: bool) -> bool:
        """Whether this rung cannot be used now (its budget is spent)."""
        return False

    def count(self, c: Counters) -> None:
        """Spend what carrying this response out uses (a clean step resets the streak)."""
        c.streak = 0

    def carry_out(self, shell: Shell, step: Any, factor: float) -> dict[str, Any]:
        """Act on the guard; returns entries for the action record (default: nothing to do)."""
        return {}

    def detail(self, factor: float, c: Counters) -> str:
        """What the response did, in words."""
        return ""


class Log(Response):
    """Record the signal and apply the step as usual."""

    name = "log"
    applies = True


class Clip(Response):
    """Record the signal; the step is applied (clipped by the policy, as every step is)."""

    name = "clip"
    applies = True


class Skip(Response):
    """Do not apply the step; budget: ``skip`` skips in a row before the ladder escalates."""

    name = "skip"
    budget = "skip"

    def spent(self, budgets: Budgets, c: Counters, can_rollback: bool) -> bool:
        return c.streak >= budgets.skip

    def count(self, c: Counters) -> None:
        c.streak += 1
        c.skips += 1

    def detail(self, factor: float, c: Counters) -> str:
        return "step not applied"


class Backoff(Skip):
    """Skip, and multiply the learning rate by ``backoff_factor`` from now on; budget:
    ``backoff`` back-offs in the run (spent on a last rung: log, the LR is not cut again)."""

    name = "backoff"
    budget = "backoff"
    when_spent = "log"

    def spent(self, budgets: Budgets, c: Counters, can_rollback: bool) -> bool:
        return c.backoffs >= budgets.backoff

    def count(self, c: Counters) -> None:
        super().count(c)
        c.backoffs += 1

    def carry_out(self, shell: Shell, step: Any, factor: float) -> dict[str, Any]:
        shell.backoff(factor)
        return {}

    def detail(self, factor: float, c: Counters) -> str:
        return f"step not applied, learning rate x{factor}"


class Rollback(Response):
    """Restore the last good snapshot and skip the bad window on replay (PaLM); budget:
    ``rollback`` rollbacks in the run; unavailable without a snapshot older than the streak."""

    name = "rollback"
    budget = "rollback"
    when_spent = "abort"

    def spent(self, budgets: Budgets, c: Counters, can_rollback: bool) -> bool:
        return not can_rollback or c.rollbacks >= budgets.rollback

    def count(self, c: Counters) -> None:
        c.rollbacks += 1
        c.streak = 0

    def carry_out(self, shell: Shell, step: Any, factor: float) -> dict[str, Any]:
        return shell.roll_back(step)

    def detail(self, factor: float, c: Counters) -> str:
        return "restored the last good snapshot, bad batches skipped on replay"


class Abort(Response):
    """Stop with an incident report (:class:`GuardAbort`)."""

    name = "abort"

    def count(self, c: Counters) -> None:
        return None  # the counts stay as they were when the budgets ran out

    def carry_out(self, shell: Shell, step: Any, factor: float) -> dict[str, Any]:
        shell.abort(step)

    def detail(self, factor: float, c: Counters) -> str:
        return (
            f"budgets spent (skips in a row {c.streak}, rollbacks {c.rollbacks}, "
            f"back-offs {c.backoffs})"
        )


class _Step(Response):
    """A clean step: nothing fired."""

    name = "step"
    applies = True


# Mildest first: the order is the severity a ladder must grow in.
RESPONSES: dict[str, Response] = {r.name: r for r in (Log(), Clip(), Skip(), Backoff(),
                                                     Rollback(), Abort())}  # fmt: skip
ACTIONS = tuple(RESPONSES)
_ALL = {"step": _Step(), **RESPONSES}
SEVERITY = {a: i for i, a in enumerate(_ALL)}
SKIPPING = frozenset(a for a, r in RESPONSES.items() if not r.applies)
DEFAULT_LADDER: tuple[str, ...] = ("skip", "rollback", "abort")
AMP = "amp_overflow"
NONFINITE = "nonfinite"


class GuardAbort(RuntimeError):
    """Training stopped by the guard. ``incident`` holds the report (also in the records).

    The model, optimizer, scheduler and scaler stay usable: a caller that catches it may lower
    the learning rate, change the data and go on stepping the same guard.
    """

    def __init__(self, message: str, incident: dict[str, Any]) -> None:
        super().__init__(message)
        self.incident = incident

    @classmethod
    def of(
        cls, step: Any, where: str, c: Counters, windows: Sequence[tuple[int, int]]
    ) -> GuardAbort:
        """The abort of a pending step: what fired, the state the run is left in (``where``),
        the budgets spent and the bad windows."""
        v = step.verdict
        incident = {
            "step": step.step,
            "position": step.position,
            "signal": v.signal if v else "",
            "reason": v.reason if v else "",
            "state": where,
            "skips_in_a_row": c.streak,
            "skips": c.skips,
            "rollbacks": c.rollbacks,
            "backoffs": c.backoffs,
            "skipped_windows": [list(w) for w in windows],
        }
        return cls(
            f"gradguard aborted training at step {step.step} (position {step.position}): "
            f"{incident['reason']}; {where}",
            incident,
        )

    def row(self) -> dict[str, Any]:
        """The incident as a flat ``"incident"`` record row (no step, no window list)."""
        return {k: v for k, v in self.incident.items() if k not in ("step", "skipped_windows")}


@dataclass
class Budgets:
    """How often a rung may be used before the ladder escalates.

    Attributes:
        skip: skips in a row (consecutive flagged steps) before escalating; 8 by default, so
            that a short window of bad batches (a corrupt shard) is skipped, not fatal.
        backoff: LR back-offs in the whole run: the one bound on how often the learning rate
            is cut (a spent budget escalates, or, on a ladder's last rung, logs).
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
        if not _ALL[action].spent(budgets, c, can_rollback):
            return action
        if i == len(ladder) - 1:
            # The last rung is spent: a rollback cannot happen (abort), a back-off is not
            # repeated beyond its budget (log), a skip stays a skip (there is nothing above).
            return _ALL[action].when_spent or action
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


def _flags(
    clipped: Tensor, grads_ok: Tensor, loss_ok: Tensor, bad: Tensor | None, amp: bool,
    detected: list[Tensor],
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """:meth:`Responder.flags`' arithmetic: ``[clipped, amp_overflow, nonfinite, *detected]``."""
    if bad is None:
        bad = ~(grads_ok & loss_ok)
    # Under AMP, non-finite gradients are the loss scale's overflow, not an incident.
    amp_overflow = ~grads_ok if amp else torch.zeros_like(grads_ok)
    nonfinite = (~loss_ok | (bad & grads_ok)) if amp else bad
    quiet = ~amp_overflow  # a loss-scale overflow is no spike
    parts = [clipped, amp_overflow, nonfinite, *(d.to(torch.bool) & quiet for d in detected)]
    return torch.stack([p.to(torch.bool) for p in parts]).to(torch.float32), amp_overflow


def _skip(flags: Tensor, mask: Tensor, grads_ok: Tensor, loss_ok: Tensor) -> tuple[Tensor, Tensor]:
    """:meth:`Responder.skip`'s arithmetic."""
    skip = (flags * mask).amax() > 0
    return skip, ~skip & grads_ok & loss_ok


# The flag vector and the skip decision, fused when the responder's ``fuse`` mode says so.
_FLAGS = Kernel(_flags)
_SKIP = Kernel(_skip)


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
        names: set[str] = set()
        for d in detectors:
            signal = getattr(d, "signal", None)
            key = f"{d.name}:{signal}" if isinstance(signal, str) else str(d.name)
            while key in self.keys:
                key += "'"
            own = getattr(d, "default_response", None)
            fallback = check_ladder(key, own) if own is not None else default_response
            self.ladders[key] = responses.get(key, responses.get(str(d.name), fallback))
            self.keys.append(key)
            names.add(str(d.name))
        _check_keys(responses, {NONFINITE, *self.keys[2:], *names})
        # Slot 0 is "clipped": it never skips.
        self._skip_bits = [0.0] + [
            1.0 if self.ladders[k][0] in SKIPPING else 0.0 for k in self.keys
        ]
        self._skip_mask = torch.tensor(self._skip_bits)
        self._masks: dict[torch.device, Tensor] = {}
        self.fuse: bool | None = False  # the device side compiled (gradguard.core.fuse)

    # ------------------------------------------------------------------ device side

    def flags(
        self, clipped: Tensor, grads_ok: Tensor, loss_ok: Tensor, bad: Tensor | None, amp: bool,
        detected: Sequence[Tensor],
    ) -> tuple[Tensor, Tensor]:  # fmt: skip
        """The step's flag vector (fp32 0/1 on ``clipped``'s device, :attr:`keys` order) and the
        loss scaler's own overflow.

        Args:
            clipped: the policy clipped the gradients.
            grads_ok, loss_ok: every gradient, the loss, is finite.
            bad: a :class:`~gradguard.decide.detect.NonFiniteDetector`'s flag, or ``None`` for
                the built-in rule (a non-finite gradient or loss).
            amp: an enabled GradScaler unscaled the gradients: non-finite ones are its overflow,
                not an incident, and no spike either.
            detected: the detectors' flags, in :attr:`keys` order, on ``clipped``'s device.
        """
        return _FLAGS(self.fuse, clipped, grads_ok, loss_ok, bad, amp, list(detected))

    def skip(self, flags: Tensor, grads_ok: Tensor, loss_ok: Tensor) -> tuple[Tensor, Tensor]:
        """0-dim bools on the device: the step must not be applied (some fired signal's first
        rung does not apply it), and it is accepted (applied and finite)."""
        mask = self._masks.get(flags.device)
        if mask is None:
            mask = self._masks[flags.device] = self._skip_mask.to(flags.device)
        return _SKIP(self.fuse, flags, mask, grads_ok, loss_ok)

    # ------------------------------------------------------------------ host side

    def refresh(self) -> None:
        """Recompute which slots skip on the device from the rung each signal is on now (a
        spent back-off budget turns a back-off ladder's last rung into a log)."""
        bits = [0.0] + [
            1.0 if _rung(self.ladders[k], self.budgets, self.counters, True) in SKIPPING else 0.0
            for k in self.keys
        ]
        if bits != self._skip_bits:
            self._skip_bits = bits
            self._skip_mask = torch.tensor(bits)
            self._masks = {}

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
        # Spend: the response counts what it uses; the scaler's own overflow spends no budget.
        if signal == AMP:
            c.amp_skips += 1
        else:
            _ALL[action].count(c)
        verdict.reason = self.reason(verdict)
        self.refresh()
        return verdict

    def carry_out(self, verdict: Verdict, shell: Shell, step: Any) -> dict[str, Any]:
        """Carry a decided verdict out on the guard (back-off, rollback, abort; nothing for
        the others) and return the action record's extra entries."""
        return _ALL[verdict.action].carry_out(shell, step, self.backoff_factor)

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
        return f"{v.signal}: {_ALL[v.action].detail(self.backoff_factor, self.counters)}"

    def state_dict(self) -> dict[str, Any]:
        """The counters and the signal layout (a guard built otherwise cannot load it)."""
        return {"keys": list(self.keys), "counters": self.counters.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s counters after checking the layout matches."""
        self.check_layout(state)
        self.counters.load_state_dict(state["counters"])
        self.refresh()

    def check_layout(self, state: Mapping[str, Any]) -> None:
        """Raise ``ValueError`` unless ``state`` was saved with this signal layout."""
        if list(state["keys"]) != self.keys:
            raise ValueError(
                f"Guard.load_state_dict: the state was saved with signals {state['keys']}, "
                f"this guard has {self.keys}; build it with the same detectors"
            )


def _check_keys(responses: Mapping[str, Any], known: set[str]) -> None:
    """Every ``responses`` key names a signal this guard has (a typo must not silently leave
    the default ladder in force)."""
    for key in responses:
        if key in known:
            continue
        close = difflib.get_close_matches(str(key), sorted(known), n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"responses: {key!r} names no signal of this guard (its signals: "
            f"{', '.join(sorted(known))}){hint}"
        )
