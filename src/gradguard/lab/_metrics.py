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
RECOVER_AHEAD = 5  # recovery compares the mean of this many steps ahead with the baseline


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
    *,
    window: int = SPIKE_WINDOW,
    ahead: int = RECOVER_AHEAD,
) -> int | None:
    """Steps after a fault window until the loss is back at its pre-fault level.

    Baseline: mean and standard deviation of the last ``window`` finite losses before the first
    step that saw the fault (the loss at step 0 if the fault came first). Recovered: the first
    step ``t`` after the last step that saw a fault batch whose mean loss over ``t .. t+ahead-1``
    (finite values; any non-finite one fails the step) is at most ``baseline + std``.

    Returns:
        ``t - (last fault step + 1)`` (0: the very next step was already fine), or ``None``
        when the run never recovered (or never reached the fault).

    Example:
        >>> recovery_steps([3, 2, 9, 9, 4, 2, 2, 2, 2, 2], list(range(10)), (2, 2))
        1
    """
    first, last = fault
    hits = [i for i, p in enumerate(positions) if first <= p <= last]
    if not hits:
        return None
    before = [x for x in losses[: hits[0]] if math.isfinite(x)][-window:]
    if not before:
        before = [losses[0]] if math.isfinite(losses[0]) else []
    if not before:
        return None
    level = statistics.fmean(before) + statistics.pstdev(before)
    end = hits[-1] + 1
    for t in range(end, len(losses)):
        ahead_vals = losses[t : t + ahead]
        if any(first <= p <= last for p in positions[t : t + ahead]):
            continue  # a replayed fault ahead (after a rollback): not recovered yet
        if all(math.isfinite(x) for x in ahead_vals) and statistics.fmean(ahead_vals) <= level:
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
