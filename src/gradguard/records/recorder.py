"""Records: per-step numbers kept on the device and flushed to the host every k steps.

A training loop that calls ``.item()`` every step waits for the accelerator every step. The
:class:`Recorder` instead keeps 0-dim tensors as they are and, every ``flush_every`` steps,
moves them all to the host in one transfer per device, turning them into plain rows (dicts) that
the sinks write (JSONL by default; CSV, TensorBoard and console sinks live in ``sinks``).

Row schema (version ``SCHEMA_VERSION``): every row has ``v`` (schema version), ``kind`` and
``step``. Kinds: ``"step"`` (per-step numbers: ``loss``, ``grad_norm``, ``clipped_norm``,
``threshold``, ``clipped``, ``action``, ``lr``, optional ``layers`` = {name: grad norm}),
``"action"`` (a guard response: ``action``, ``reason``), ``"probe"`` (the probe: ``event`` is
``"layers"`` for per-layer statistics, with the dicts ``layers`` (gradient norm),
``out_grad_norm``, ``act_rms``, ``act_maxabs``, ``dead_frac`` = {layer name: value}, or
``"nonfinite_forward"``/``"nonfinite_backward"`` for a finding: ``module``, ``where``,
``call``, ``tensor``, ``nan``, ``inf``, ``numel``, ``maxabs``, ``rms``, ``inputs_finite``,
``previous``, ``message``, ``inputs`` = {"<label>/<stat>": value}), ``"diagnosis"`` and
``"meta"`` (run metadata). Values are JSON types: numbers, strings, bools, ``None``, and one
level of dicts of numbers. Non-finite floats stay floats (NaN, inf) in memory and are written
as the strings ``"nan"``, ``"inf"``, ``"-inf"`` by text sinks. docs/records.md has the full
table. The sinks, and :func:`~gradguard.records.sinks.read_jsonl` that reads the JSONL sink's file
back, are in :mod:`gradguard.records.sinks`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor

SCHEMA_VERSION = 1

Row = dict[str, Any]


class Sink(Protocol):
    """Where flushed rows go. ``write`` receives host rows in step order."""

    def write(self, rows: list[Row]) -> None:
        """Take one flush's rows (host values, step order); called once per flush."""
        ...

    def close(self) -> None:
        """Release what the sink holds (files, runs); called once, by ``Recorder.close``."""
        ...


class Named(NamedTuple):
    """Many named values of one row entry as one 1-D tensor: ``names[i]`` is ``values[i]``.

    Logging a model's per-layer norms as one stacked tensor costs one kernel per step instead
    of one queued tensor per layer; the flush turns it into the usual ``{name: number}`` dict.
    """

    names: list[str]
    values: Tensor

    def as_dict(self) -> dict[str, Any]:
        """``{name: 0-dim tensor}`` (no host read)."""
        return dict(zip(self.names, self.values.unbind()))


def _number(t: Tensor, x: float) -> Any:
    if t.dtype == torch.bool:
        return bool(x)
    if not t.dtype.is_floating_point:
        return int(x)
    return float(x)


def _gather(pending: list[Row]) -> list[Row]:
    """Replace every tensor in ``pending`` by a Python number, one transfer per device."""
    slots: dict[torch.device, list[tuple[Row | dict[str, Any], str, Any]]] = {}
    for row in pending:
        for key, value in row.items():
            if isinstance(value, (Tensor, Named)):
                device = value.device if isinstance(value, Tensor) else value.values.device
                slots.setdefault(device, []).append((row, key, value))
            elif isinstance(value, dict):
                for sub, v in value.items():
                    if isinstance(v, Tensor):
                        slots.setdefault(v.device, []).append((value, sub, v))
    for items in slots.values():
        parts = [(v.values if isinstance(v, Named) else v).detach() for _, _, v in items]
        flat = torch.cat([t.reshape(-1).double() for t in parts]).cpu().tolist()
        at = 0
        for (holder, key, v), t in zip(items, parts):
            n = t.numel()
            if isinstance(v, Named):
                holder[key] = {name: _number(t, x) for name, x in zip(v.names, flat[at : at + n])}
            else:
                holder[key] = _number(t, flat[at])
            at += n
    return pending


class Recorder:
    """A device-side buffer of rows, flushed to the host (and the sinks) every ``flush_every``.

    Args:
        sinks: objects with ``write(rows)`` and ``close()``.
        flush_every: flush when rows of this many distinct steps are queued (>= 1); a step's
            several rows (the guard's, the probe's) count once.
        keep: keep flushed rows in ``self.rows`` (reports read them); ``False`` for long runs
            that only stream to sinks.

    Example:
        >>> rec = Recorder(flush_every=100)
        >>> rec.log(step, loss=loss.detach(), grad_norm=total)   # no host sync
        >>> rec.flush()[-1]["loss"]
    """

    def __init__(self, sinks: Iterable[Sink] = (), flush_every: int = 50, keep: bool = True):
        if isinstance(flush_every, bool) or not isinstance(flush_every, int) or flush_every < 1:
            raise ValueError(f"flush_every must be an int >= 1, got {flush_every!r}")
        self.sinks = list(sinks)
        self.flush_every = flush_every
        self.keep = keep
        self.rows: list[Row] = []
        self._pending: list[Row] = []
        self._pending_steps: set[int] = set()

    def log(self, step: int, kind: str = "step", **values: Any) -> None:
        """Queue one row; tensors stay on the device until the next flush.

        Args:
            step: the optimizer step the row belongs to.
            kind: the row's kind (``"step"``, ``"action"``, ``"probe"``, ...; see the module).
            **values: the row's values: 0-dim tensors on any device, numbers, strings, bools,
                ``None``, or one level of dicts of these (copied, so later changes to the
                caller's dict do not reach the row).

        Example:
            >>> rec.log(12, loss=loss.detach(), layers={"fc1": norm})
        """
        row: Row = {"v": SCHEMA_VERSION, "kind": kind, "step": int(step)}
        for key, value in values.items():
            row[key] = dict(value) if isinstance(value, dict) else value
        self._pending.append(row)
        self._pending_steps.add(row["step"])
        if len(self._pending_steps) >= self.flush_every:
            self.flush()

    def event(self, step: int, kind: str, **values: Any) -> None:
        """Queue a row and flush now: for rare events (actions, incidents) worth seeing at once.

        Args:
            step: the optimizer step the row belongs to.
            kind: the row's kind, e.g. ``"action"``.
            **values: as for :meth:`log`.

        Example:
            >>> rec.event(12, "action", action="skip", reason="nonfinite")
        """
        self.log(step, kind, **values)
        self.flush()

    def flush(self) -> list[Row]:
        """Move queued rows to the host, hand them to every sink and return them.

        Returns:
            The rows just flushed, as host values (``[]`` when nothing was queued).
        """
        if not self._pending:
            return []
        rows = _gather(self._pending)
        self._pending = []
        self._pending_steps = set()
        if self.keep:
            self.rows.extend(rows)
        for sink in self.sinks:
            sink.write(rows)
        return rows

    def close(self) -> None:
        """Flush, then close every sink."""
        self.flush()
        for sink in self.sinks:
            sink.close()

    def state_dict(self) -> dict[str, Any]:
        """Flushed rows and settings (pending rows are flushed first so nothing is lost).

        Returns:
            ``{"flush_every": int, "keep": bool, "rows": list}``.
        """
        self.flush()
        return {"flush_every": self.flush_every, "keep": self.keep, "rows": list(self.rows)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`; a malformed state raises and changes nothing.

        Args:
            state: a dict from :meth:`state_dict`.

        Raises:
            ValueError: keys are missing or ``flush_every`` is not an int >= 1.
            TypeError: ``keep`` is not a bool or ``rows`` not a list of dicts.
        """
        if not isinstance(state, dict) or not {"flush_every", "keep", "rows"} <= state.keys():
            raise ValueError("state must be a dict with the keys flush_every, keep and rows")
        flush_every, keep, rows = state["flush_every"], state["keep"], state["rows"]
        if isinstance(flush_every, bool) or not isinstance(flush_every, int) or flush_every < 1:
            raise ValueError(f"state['flush_every'] must be an int >= 1, got {flush_every!r}")
        if not isinstance(keep, bool):
            raise TypeError(f"state['keep'] must be a bool, got {type(keep).__name__}")
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise TypeError("state['rows'] must be a list of dicts")
        self.flush_every = flush_every
        self.keep = keep
        self.rows = list(rows)
        self._pending = []
        self._pending_steps = set()
