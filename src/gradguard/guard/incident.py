"""INCIDENT writing: one replayable bundle per guard incident (skip, rollback, abort).

The guard calls :meth:`IncidentWriter.write` before a verdict changes any state; the bundle's
format (what it holds, how it is read back) is :mod:`gradguard.records.bundle`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from gradguard.core.snapshot import save_snapshot
from gradguard.records.bundle import DEFAULT_ACTIONS, BundleSpec, dist_rank, make_bundle

__all__ = ["IncidentWriter"]

log = logging.getLogger(__name__)


class IncidentWriter:
    """Writes one bundle per incident, up to ``max_count``, for the configured actions.

    Args:
        directory: where bundles go (``incident-<step>[-rank<r>].pt``; all ranks can share it).
        actions: the actions that write a bundle (default: skip, rollback, abort).
        max_count: bundles this writer writes at most (later incidents are counted in
            ``dropped``, not written).
        max_batch_bytes: a batch larger than this is not stored; the bundle keeps the data
            position and the sampler state instead.
        rank: the rank in file names; ``None``: the global rank under ``torch.distributed``
            with more than one process, else none.

    Example:
        >>> writer = IncidentWriter("incidents", max_count=20)
        >>> if writer.wants(action):
        ...     writer.write(BundleSpec(step=step, position=pos, action=action, ...))
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        actions: Sequence[str] = DEFAULT_ACTIONS,
        *,
        max_count: int = 20,
        max_batch_bytes: int = 64 * 2**20,
        rank: int | None = None,
    ) -> None:
        if not isinstance(directory, (str, os.PathLike)):
            raise TypeError(f"directory must be a path, got {type(directory).__name__}")
        if isinstance(actions, str) or not all(isinstance(a, str) for a in actions):
            raise TypeError(f"actions must be a sequence of action names, got {actions!r}")
        for name, value in (("max_count", max_count), ("max_batch_bytes", max_batch_bytes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 0):
            raise ValueError(f"rank must be an int >= 0 or None, got {rank!r}")
        self.directory = Path(directory)
        self.actions = tuple(actions)
        self.max_count = max_count
        self.max_batch_bytes = max_batch_bytes
        self._rank = rank
        self.written: list[Path] = []
        self.dropped = 0
        self.errors: list[str] = []

    def wants(self, action: str) -> bool:
        """Whether an incident with this action would be written now (host-only, no tensor)."""
        return action in self.actions and len(self.written) < self.max_count

    def path(self, step: int) -> Path:
        """A new file name for an incident at ``step`` (never an existing file's)."""
        r = self._rank if self._rank is not None else dist_rank()
        base = f"incident-{step:09d}" + ("" if r is None else f"-rank{r}")
        path = self.directory / f"{base}.pt"
        n = 1
        while path.exists():
            path = self.directory / f"{base}-{n}.pt"
            n += 1
        return path

    def write(self, spec: BundleSpec) -> Path | None:
        """Write the bundle of one incident; call it before the step changes any state.

        Args:
            spec: what the bundle holds (:class:`~gradguard.records.bundle.BundleSpec`).

        Returns:
            The file written, or ``None``: the action does not write bundles, ``max_count``
            was reached (``dropped`` counts these), or the write failed (``errors`` says why;
            an incident file must never stop training).
        """
        if spec.action not in self.actions:
            return None
        if len(self.written) >= self.max_count:
            self.dropped += 1
            return None
        snap = make_bundle(spec, max_batch_bytes=self.max_batch_bytes)
        target = self.path(spec.step)
        try:
            save_snapshot(target, snap)
        except (OSError, RuntimeError) as e:  # torch's zip writer reports a full disk so
            self.errors.append(f"step {spec.step}: {e}")
            log.warning("gradguard: incident bundle for step %d not written: %s", spec.step, e)
            return None
        self.written.append(target)
        return target

    def state_dict(self) -> dict[str, Any]:
        """The files written and the dropped count (so a resumed run keeps its cap)."""
        return {"written": [str(p) for p in self.written], "dropped": self.dropped}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        written, dropped = state.get("written"), state.get("dropped")
        if not isinstance(written, list) or not all(isinstance(p, str) for p in written):
            raise ValueError("state['written'] must be a list of paths")
        if isinstance(dropped, bool) or not isinstance(dropped, int) or dropped < 0:
            raise ValueError(f"state['dropped'] must be an int >= 0, got {dropped!r}")
        self.written = [Path(p) for p in written]
        self.dropped = dropped
