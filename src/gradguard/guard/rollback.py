"""ROLLBACK bookkeeping: the snapshots a rollback returns to, the bad windows of data positions it
skips, and a sampler that leaves them out.

A rollback (PaLM, Chowdhery et al. 2022, section 5.1: restart about 100 steps before a spike and
skip 200-500 batches) restores a snapshot (:mod:`gradguard.core.snapshot`) and then must not feed
the same batches again: :class:`SkipList` holds the windows and :class:`SkipSampler` replays a
data loader from the snapshot's position without them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sized
from typing import Any

import torch
from torch import Tensor

from gradguard.core.snapshot import SnapshotStore

__all__ = ["Rollbacks", "SkipList", "SkipSampler"]


class SkipList:
    """Closed windows ``[start, end]`` of data positions to skip on replay.

    Example:
        >>> skips = SkipList(); skips.add(120, 130)
        >>> skips.contains(125), skips.contains(131)
        (True, False)
    """

    def __init__(self) -> None:
        self.windows: list[tuple[int, int]] = []

    def add(self, start: int, end: int) -> None:
        """Skip positions ``start..end`` (inclusive); overlapping windows are merged."""
        for name, v in (("start", start), ("end", end)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an int >= 0, got {v!r}")
        if end < start:
            raise ValueError(f"end must be >= start, got start={start}, end={end}")
        merged: list[tuple[int, int]] = []
        for a, b in sorted([*self.windows, (start, end)]):
            if merged and a <= merged[-1][1] + 1:
                merged[-1] = (merged[-1][0], max(merged[-1][1], b))
            else:
                merged.append((a, b))
        self.windows = merged

    def contains(self, position: int) -> bool:
        return any(a <= position <= b for a, b in self.windows)

    def next_allowed(self, position: int) -> int:
        """The first position ``>= position`` that is not skipped."""
        for a, b in self.windows:
            if a <= position <= b:
                position = b + 1
        return position

    def __len__(self) -> int:
        return sum(b - a + 1 for a, b in self.windows)

    def state_dict(self) -> dict[str, Any]:
        return {"windows": [[a, b] for a, b in self.windows]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        windows = [(int(a), int(b)) for a, b in state["windows"]]
        self.windows = []
        for a, b in windows:
            self.add(a, b)


class SkipSampler(torch.utils.data.Sampler[Any]):
    """Wrap a (batch) sampler and leave out the items at skipped positions.

    Positions count the wrapped sampler's items across epochs, starting at ``start``; with
    gradient accumulation, ``per_step`` items make one position (one optimizer step). Pass a
    batch sampler (``DataLoader(ds, batch_sampler=guard.skip_sampler(BatchSampler(...)))``) so
    that one item is one batch.

    With ``position`` (what :meth:`gradguard.guard.guard.Guard.skip_sampler` passes: the guard's
    data position) the sampler is *position-driven*: each item it yields is the one at the position
    the guard expects next, read when the DataLoader asks for it. After a rollback the guard's
    position goes back to the snapshot's and the sampler replays from there, leaving out the bad
    window: the same batches as the position-driven loop of docs/guard.md. Each epoch's order is
    drawn once, when the epoch starts, and kept while it is replayed. A DataLoader with worker
    processes asks for items ahead of the guard's decisions, so there the replay is exact only
    with ``num_workers=0``. With ``drop`` too, an item (a batch's index list) that a rollback
    put in a bad window is also left out when a later epoch brings it again: the sampler calls
    ``drop()`` (the guard's :meth:`~gradguard.guard.guard.Guard.drop_batch`) instead of yielding it.

    Args:
        sampler: any iterable of indices or of index lists.
        should_skip: ``position -> bool`` (a guard's
            :meth:`~gradguard.guard.guard.Guard.should_skip`).
        per_step: items per optimizer step (>= 1).
        start: the position of the first item.
        position: ``() -> int``, the position whose items come next (``None``: count items).
        drop: ``() -> int``, moves the position past an item left out (position-driven only).
        version: ``() -> Any``, changes when a bad window is added (the guard's skip list), so
            the items of a new window are remembered even when the guard lands on the next item.
        jumps: ``() -> Any``, changes when the guard's position jumps (a rollback, a resume):
            only then (and at an epoch's first item) does the sampler follow the position; in
            between it hands out the next items in order, so a DataLoader's worker processes,
            which ask for items ahead of the guard's steps, get each item once.
        horizon: ``() -> int | None``, the oldest position a rollback can go back to (the
            oldest snapshot's): the orders of the epochs since then are kept, so a rollback
            more than an epoch back replays that epoch's order (``None``: the last two epochs).

    Example:
        >>> loader = DataLoader(ds, batch_sampler=guard.skip_sampler(BatchSampler(s, 32, False)))
    """

    def __init__(
        self,
        sampler: Any,
        should_skip: Callable[[int], bool],
        per_step: int = 1,
        start: int = 0,
        position: Callable[[], int] | None = None,
        drop: Callable[[], int] | None = None,
        version: Callable[[], Any] | None = None,
        horizon: Callable[[], int | None] | None = None,
        jumps: Callable[[], Any] | None = None,
    ) -> None:
        if not callable(should_skip):
            raise TypeError("should_skip must be callable")
        if isinstance(per_step, bool) or not isinstance(per_step, int) or per_step < 1:
            raise ValueError(f"per_step must be an int >= 1, got {per_step!r}")
        if isinstance(start, bool) or not isinstance(start, int) or start < 0:
            raise ValueError(f"start must be an int >= 0, got {start!r}")
        for name, fn in (
            ("position", position),
            ("drop", drop),
            ("horizon", horizon),
            ("jumps", jumps),
        ):
            if fn is not None and not callable(fn):
                raise TypeError(f"{name} must be callable or None")
        self.sampler = sampler
        self.should_skip = should_skip
        self.per_step = per_step
        self.position = position
        self.drop = drop
        self.version = version
        self.horizon = horizon
        self.jumps = jumps
        self.bad: set[Any] = set()  # keys of items found in bad windows
        self.count = start * per_step  # items enumerated so far, skipped ones included
        # Position-driven mode: the epochs drawn so far, as (first position, items), newest last.
        self._epochs: list[tuple[int, list[Any]]] = []

    def __iter__(self) -> Iterator[Any]:
        if self.position is not None:
            yield from self._driven()
            return
        for item in self.sampler:
            position = self.count // self.per_step
            self.count += 1
            if not self.should_skip(position):
                yield item

    def _driven(self) -> Iterator[Any]:
        assert self.position is not None
        cursor, sub = divmod(self.count, self.per_step)
        items = list(self.sampler)
        self._epochs = [*self._kept_epochs(), (cursor, items)]
        end = cursor + -(-len(items) // self.per_step)
        seen: int | None = None  # the guard's position when the last item was handed out
        known = self.version() if self.version is not None else None
        jumps = self.jumps() if self.jumps is not None else None
        while True:
            now = self.position()
            new = self.version() if self.version is not None else None
            jumped = self.jumps() if self.jumps is not None else None
            # Follow the guard's position at the epoch's first item and after a rollback or a
            # resume; between those, a position behind the cursor is a DataLoader's workers
            # asking ahead, not a jump. Without a jump counter every move is a jump.
            moved = now not in (seen, cursor) and (
                self.jumps is None or seen is None or jumped != jumps
            )
            jumps = jumped
            if self.drop is not None and (moved or new != known):
                self._remember_bad(max(cursor, now))  # a rollback added a bad window
            known = new
            if moved:
                # The guard moved elsewhere than the next item: a rollback (or a resume).
                cursor, sub = now, 0
            while self.should_skip(cursor):
                cursor, sub = cursor + 1, 0
            if cursor >= end:
                self.count = end * self.per_step
                return
            epoch_start, epoch_items = next(
                ((a, it) for a, it in reversed(self._epochs) if a <= cursor), self._epochs[0]
            )
            index = (cursor - epoch_start) * self.per_step + sub
            if index >= len(epoch_items):
                self.count = end * self.per_step
                return
            item = epoch_items[index]
            if self.drop is not None and sub == 0 and _key(item) in self.bad:
                self.drop()  # seen in a bad window in an earlier epoch
                cursor += 1
                seen = self.position()
                continue
            sub += 1
            if sub == self.per_step:
                cursor, sub = cursor + 1, 0
            self.count = cursor * self.per_step + sub
            seen = self.position()
            yield item

    def _kept_epochs(self) -> list[tuple[int, list[Any]]]:
        """The epochs a rollback may still go back into: from the one holding the horizon on
        (the previous one without a horizon, or before the first snapshot)."""
        oldest = self.horizon() if self.horizon is not None else None
        if oldest is None:
            return self._epochs[-1:]
        first = max((i for i, (a, _) in enumerate(self._epochs) if a <= oldest), default=0)
        return self._epochs[first:]

    def _remember_bad(self, upto: int) -> None:
        """Remember the items of every skipped position up to ``upto`` in the kept epochs."""
        for start, items in self._epochs:
            for pos in range(start, min(upto + 1, start + -(-len(items) // self.per_step))):
                if self.should_skip(pos):
                    first = (pos - start) * self.per_step
                    self.bad.update(_key(i) for i in items[first : first + self.per_step])

    def __len__(self) -> int:
        if not isinstance(self.sampler, Sized):
            raise TypeError("the wrapped sampler has no len()")
        return len(self.sampler)

    def state_dict(self) -> dict[str, Any]:
        """The item count and ``per_step`` (the epoch's order is drawn again on resume)."""
        return {"count": self.count, "per_step": self.per_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.count = int(state["count"])
        self.per_step = int(state["per_step"])


def _key(item: Any) -> Any:
    """A hashable identity of a sampler item (an index or a list of indices)."""
    if isinstance(item, Tensor):
        return tuple(item.reshape(-1).tolist())
    if isinstance(item, (list, tuple)):
        return tuple(_key(i) if isinstance(i, (list, tuple, Tensor)) else i for i in item)
    return item


class Rollbacks:
    """Where a rollback returns to and what it leaves out: the snapshots, the bad windows, and
    the position where the current streak of flagged steps began.

    Snapshots are taken from the objects as they are when one is due (read, don't remember):
    the first at the first step (a checkpoint loaded after the guard was built is in it), a new
    one whenever the optimizer's parameters change (``add_param_group``, a cast to another
    dtype or device: an older snapshot no longer fits) or a checkpoint is loaded into the model
    or the optimizer (:attr:`stale`: an older snapshot is of another trajectory), then every
    ``every`` steps.

    Args:
        every: steps between snapshots (0: none).
        directory, keep: the :class:`~gradguard.core.snapshot.SnapshotStore`'s.
        skip_before, skip_after: widen a bad window by this many positions on either side.

    Example:
        >>> rb = Rollbacks(every=100)
        >>> rb.due(optimizer, streak=0, step=0, position=0)   # the first step: (0, 0)
        (0, 0)
    """

    def __init__(
        self,
        every: int = 0,
        directory: Any = None,
        keep: int = 2,
        skip_before: int = 0,
        skip_after: int = 0,
    ) -> None:
        self.every = every
        self.store = SnapshotStore(directory, keep)
        self.skip_list = SkipList()
        self.streak_start = 0
        self.skip_before, self.skip_after = skip_before, skip_after
        self.due_at: tuple[int, int] | None = None  # what the next snapshot stands for
        self.stale = False  # a checkpoint was loaded into the model or optimizer since
        self._structure: tuple[Any, ...] | None = None

    def due(
        self, optimizer: torch.optim.Optimizer, streak: int, step: int, position: int
    ) -> tuple[int, int] | None:
        """The ``(step, position)`` a snapshot taken now stands for, or ``None`` when none is
        due now (called at the start of each step)."""
        structure = _structure(optimizer)
        changed = self.stale or (self._structure is not None and structure != self._structure)
        self._structure, self.stale = structure, False
        if not self.every or (self.store.has() and not changed):
            return None
        if changed:
            self.store.clear()
        label = self.due_at or self.label(streak, step, position)
        self.due_at = None
        return label

    def label(self, streak: int, step: int, position: int) -> tuple[int, int]:
        """The ``(step, position)`` a snapshot taken now stands for. Inside a streak of skipped
        steps nothing was applied since it began: the state now is the state at its start, and
        a snapshot taken now is one a rollback of that streak may return to."""
        return (step - streak, self.streak_start) if streak else (step, position)

    def seen(self, optimizer: torch.optim.Optimizer) -> None:
        """The snapshots fit the objects as they are now (after a resume)."""
        self._structure, self.stale = _structure(optimizer), False

    def window(self, position: int) -> tuple[int, int]:
        """Add the bad window from the streak's start to ``position`` (widened); returns it."""
        start = max(0, self.streak_start - self.skip_before)
        end = position + self.skip_after
        self.skip_list.add(start, end)
        return start, end

    def state_dict(self) -> dict[str, Any]:
        """The bad windows and the streak's start (the snapshots are the store's business)."""
        return {"skip_list": self.skip_list.state_dict(), "streak_start": self.streak_start}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s windows and streak start."""
        self.skip_list.load_state_dict(state["skip_list"])
        self.streak_start = int(state["streak_start"])


def _structure(optimizer: torch.optim.Optimizer) -> tuple[Any, ...]:
    """The optimizer's parameters as a snapshot must fit them: which, in which groups, and
    their dtypes and devices (``model.double()`` keeps the parameter objects)."""
    return tuple(
        tuple((id(p), p.dtype, p.device) for p in g["params"]) for g in optimizer.param_groups
    )
