"""RESPOND: the response ladder and its budgets, decided on the host from flags already read.

Each signal (a detector's name, ``"nonfinite"``, ...) has a ladder: the actions to take when it
fires, mildest first. The first rung is the immediate response; a rung whose budget is spent
hands over to the next one:

* ``"log"``: record it and apply the step as usual;
* ``"clip"``: record it; the step is applied (clipped by the policy, as every step is);
* ``"skip"``: do not apply the step (parameters, optimizer moments, weight decay, step counters
  and LR scheduler unchanged); budget: ``skip`` steps *in a row*;
* ``"backoff"``: skip, and multiply the learning rate by ``backoff_factor``; budget: ``backoff``
  back-offs in the run;
* ``"rollback"``: restore the last good snapshot and skip the bad window on replay (PaLM);
  budget: ``rollback`` rollbacks in the run; unavailable without a snapshot;
* ``"abort"``: stop with an incident report (:class:`GuardAbort`).

The default, ``("skip", "rollback", "abort")``, reads: skip a bad step; after ``skip`` skips in a
row roll back; after ``rollback`` rollbacks give up. A ladder never goes down in severity, and
``"log"``/``"clip"`` stand alone (they do not escalate).

Example:
    >>> decide(["nonfinite"], {"nonfinite": ("skip", "abort")}, Budgets(skip=2),
    ...        Counters(streak=2), can_rollback=False)
    ('abort', 'nonfinite')
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["ACTIONS", "Budgets", "Counters", "GuardAbort", "check_ladder", "decide"]

# Mildest first; "step" is what a clean step reports, not a response a ladder may name.
ACTIONS = ("log", "clip", "skip", "backoff", "rollback", "abort")
SEVERITY = {a: i for i, a in enumerate(("step", *ACTIONS))}
SKIPPING = frozenset({"skip", "backoff", "rollback", "abort"})


class GuardAbort(RuntimeError):
    """Training stopped by the guard. ``incident`` holds the report (also in the records)."""

    def __init__(self, message: str, incident: dict[str, Any]) -> None:
        super().__init__(message)
        self.incident = incident


@dataclass
class Budgets:
    """How often a rung may be used before the ladder escalates.

    Attributes:
        skip: skips in a row (consecutive flagged steps) before escalating.
        backoff: LR back-offs in the whole run before escalating.
        rollback: rollbacks in the whole run before escalating.
    """

    skip: int = 3
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
        return asdict(self)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for key in asdict(self):
            setattr(self, key, int(state[key]))


def check_ladder(name: str, ladder: Any) -> tuple[str, ...]:
    """Validate one ladder: known actions, never milder than the rung before, log/clip alone."""
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
