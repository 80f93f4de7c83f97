"""The stability benchmark's metrics, as pure functions over a run's loss curve.

Steps that consumed an injected fault batch are left out of every curve metric: their loss is the
data's, identical for every method, not the method's doing.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

SPIKE_K = 3.0  # a spike: loss above the rolling mean by this many rolling standard deviations
SPIKE_WINDOW = 20  # the rolling window (valid steps before the one scored)
SPIKE_MIN = 10  # scoring starts once this many valid steps are in the window
RECOVER_AHEAD = 5  # recovery compares the mean loss over this many steps with the clean twin's
RECOVER_TOL = 0.1  # ... and calls it recovered within 10% of it


def spike_score(
    losses: Sequence[float],
    excluded: Sequence[bool] | None = None,
    *,
    k: float = SPIKE_K,
    window: int = SPIKE_WINDOW,
    min_window: int = SPIKE_MIN,
) -> float:
    """Fraction of the (non-excluded) steps that spiked.

    A step spikes when its loss is non-finite (at any step), or is above ``mean + k * std`` of
    the previous ``window`` finite, non-excluded losses once ``min_window`` of them exist.

    Returns:
        In [0, 1]; 0.0 for an empty curve.

    Example:
        >>> spike_score([1.0] * 10 + [1.0, 5.0] + [1.0] * 8, window=10, min_window=10)
        0.05
    """
    excluded = excluded or [False] * len(losses)
    history: list[float] = []
    scored = spikes = 0
    for x, skip in zip(losses, excluded):
        if skip:
            continue
        scored += 1
        if not math.isfinite(x):
            spikes += 1
            continue
        if len(history) >= min_window:
            recent = history[-window:]
            spikes += x > statistics.fmean(recent) + k * statistics.pstdev(recent)
        history.append(x)
    return spikes / scored if scored else 0.0


def recovery_steps(
    losses: Sequence[float],
    positions: Sequence[int],
    fault: tuple[int, int],
    reference: Sequence[float],
    *,
    ahead: int = RECOVER_AHEAD,
    tolerance: float = RECOVER_TOL,
) -> int | None:
    """Steps after a fault until the loss is back with the run that never saw it.

    ``reference`` is the clean twin: the same method, seed and batches with the faults left out.
    Recovered: the first step ``t`` after the last step that consumed a fault batch whose mean
    loss over ``t .. t+ahead-1`` is finite and at most ``(1 + tolerance)`` times the twin's over
    the same steps (no fault batch replayed among them). A method that skipped the fault is back
    at once; one whose statistics or moments the fault poisoned stays above its twin.

    Returns:
        ``t - (last fault step + 1)`` (0: the very next steps were already back), or ``None``
        when the run never recovered (or never reached the fault).

    Example:
        >>> twin = [3, 2, 2, 2, 2, 2, 2, 2]
        >>> recovery_steps([3, 2, 9, 9, 4, 2, 2, 2], list(range(8)), (2, 2), twin)
        2
    """
    first, last = fault
    hits = [i for i, p in enumerate(positions) if first <= p <= last]
    if not hits:
        return None
    end = hits[-1] + 1
    for t in range(end, min(len(losses), len(reference))):
        if any(first <= p <= last for p in positions[t : t + ahead]):
            continue  # a replayed fault ahead (after a rollback): not recovered yet
        n = min(ahead, len(losses) - t, len(reference) - t)
        mine, ref = losses[t : t + n], reference[t : t + n]
        if not all(math.isfinite(x) for x in (*mine, *ref)):
            continue
        if statistics.fmean(mine) <= (1.0 + tolerance) * statistics.fmean(ref):
            return t - end
    return None


def lr_sensitivity(finals: Sequence[float], initials: Sequence[float]) -> float:
    """Wortsman et al. 2023 (arXiv 2309.14322): mean over LRs of ``min(final, initial)``.

    A non-finite final loss counts as the initial loss (the run learned nothing).

    Example:
        >>> lr_sensitivity([2.0, math.nan, 5.0], [4.0, 4.0, 4.0])
        3.3333333333333335
    """
    vals = [min(f, i) if math.isfinite(f) else i for f, i in zip(finals, initials)]
    return statistics.fmean(vals)


def median(values: Sequence[float]) -> float:
    """Median with ``nan`` read as ``inf`` (a diverged run ranks last); ``nan`` when empty."""
    vals = [math.inf if math.isnan(v) else v for v in values]
    return statistics.median(vals) if vals else math.nan


def spread(values: Sequence[float]) -> float:
    """Seed spread: max - min of the finite values (0 with fewer than two)."""
    vals = [v for v in values if math.isfinite(v)]
    return max(vals) - min(vals) if len(vals) > 1 else 0.0
