"""Records: per-step numbers kept on the device and flushed to the host every k steps.

A training loop that calls ``.item()`` every step waits for the accelerator every step. The
:class:`Recorder` instead keeps 0-dim tensors as they are and, every ``flush_every`` steps,
moves them all to the host in one transfer per device, turning them into plain rows (dicts) that
the sinks write (JSONL by default; CSV, TensorBoard and console sinks live in ``sinks``). In
memory it keeps a bounded window of recent steps and the rare rows (actions, incidents,
findings), so its size does not grow with the run; the sinks have every row.

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

from collections import deque
from collections.abc import Iterable
from itertools import chain
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


def _to_host(scalars: dict[torch.dtype, list[Tensor]], vectors: list[Tensor]) -> list[Any]:
    """All values of one device as one host list: a few kernels and one copy, whatever the count.

    0-dim tensors are stacked per dtype (one op each, where a per-value cast would be one op per
    value); 1-D tensors join the final ``cat`` as they are, its type promotion widening them
    exactly (a floating part of the cat is float64, or every part is floating).
    """
    parts = [torch.stack(ts).double() for ts in scalars.values()]
    parts += [v if v.dtype.is_floating_point else v.double() for v in vectors]
    flat = parts[0] if len(parts) == 1 else torch.cat(parts)
    return flat.cpu().tolist()  # type: ignore[no-any-return]


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
    with torch.no_grad():  # rows may hold tensors that require grad: no graph, no detach op
        for items in slots.values():
            scalars: dict[torch.dtype, list[Tensor]] = {}
            vectors: list[Tensor] = []
            for _, _, v in items:
                t = v.values if isinstance(v, Named) else v
                if t.dim() == 0:
                    scalars.setdefault(t.dtype, []).append(t)
                else:
                    vectors.append(t if t.dim() == 1 else t.reshape(-1))
            flat = _to_host(scalars, vectors)
            # where each value landed: the scalar groups first (in dtype order), then vectors
            at_scalar: dict[torch.dtype, int] = {}
            at = 0
            for dtype, ts in scalars.items():
                at_scalar[dtype] = at
                at += len(ts)
            for holder, key, v in items:
                t = v.values if isinstance(v, Named) else v
                if t.dim() == 0:
                    holder[key] = _number(t, flat[at_scalar[t.dtype]])
                    at_scalar[t.dtype] += 1
                    continue
                n = t.numel()
                if isinstance(v, Named):
                    values = flat[at : at + n]
                    holder[key] = {name: _number(t, x) for name, x in zip(v.names, values)}
                else:
                    holder[key] = _number(t, flat[at])
                at += n
    return pending


# The default in-memory window: the rows of the last WINDOW steps. Reports and incident bundles
# need the recent past; the whole run is in the sinks. A step row with 20 per-layer norms is
# about 2-4 KiB of Python objects, so the window costs about 2-4 MiB at most for such a model.
WINDOW = 1000
# Rare rows (actions, incidents, probe findings, diagnosis, meta) that leave the window: the
# first MAX_EVENTS are kept, so ``rows`` still lists the start of a long run's trouble.
MAX_EVENTS = 1000
# Kinds written on every step (or every k steps): never rare.
PERIODIC_KINDS = frozenset({"step", "transformer"})


def is_event(row: Row) -> bool:
    """Whether ``row`` is a rare row (an action, incident, finding, diagnosis or meta row).

    Step rows, transformer telemetry and the probe's periodic per-layer statistics
    (``event="layers"``) are periodic; every other kind is rare.
    """
    kind = row.get("kind")
    if kind in PERIODIC_KINDS:
        return False
    return not (kind == "probe" and row.get("event") == "layers")


def _check_count(name: str, value: Any, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        more = " or None" if allow_none else ""
        raise ValueError(f"{name} must be an int >= 0{more}, got {value!r}")


class Recorder:
    """A device-side buffer of rows, flushed to the host (and the sinks) every ``flush_every``.

    Memory stays flat over any run length: the recorder keeps only the rows of the last
    ``window`` steps, plus the first ``max_events`` rare rows (see :func:`is_event`) that left
    the window; every row goes to the sinks, which hold the whole run (``JsonlSink`` for reports).

    Args:
        sinks: objects with ``write(rows)`` and ``close()``.
        flush_every: flush when rows of this many distinct steps are queued (>= 1); a step's
            several rows (the guard's, the probe's) count once.
        keep: keep flushed rows in memory (``rows``); ``False`` keeps none (stream only).
        window: keep the rows of this many most recent steps (>= 0; ``None``: every row, the
            memory then grows with the run). A step is a run of consecutive rows with the
            same ``step``.
        max_events: keep at most this many rare rows older than the window (>= 0); later ones
            are counted in ``dropped_events`` (the sinks still have them).

    Example:
        >>> rec = Recorder(flush_every=100, window=5000)
        >>> rec.log(step, loss=loss.detach(), grad_norm=total)   # no host sync
        >>> rec.flush()[-1]["loss"]
    """

    def __init__(
        self,
        sinks: Iterable[Sink] = (),
        flush_every: int = 50,
        keep: bool = True,
        window: int | None = WINDOW,
        max_events: int = MAX_EVENTS,
    ):
        if isinstance(flush_every, bool) or not isinstance(flush_every, int) or flush_every < 1:
            raise ValueError(f"flush_every must be an int >= 1, got {flush_every!r}")
        if not isinstance(keep, bool):
            raise TypeError(f"keep must be a bool, got {type(keep).__name__}")
        _check_count("window", window, allow_none=True)
        _check_count("max_events", max_events)
        self.sinks = list(sinks)
        self.flush_every = flush_every
        self.keep = keep
        self.window = window
        self.max_events = max_events
        self.dropped_events = 0
        self._events: list[Row] = []  # rare rows that left the window, oldest first
        self._recent: deque[list[Row]] = deque()  # the window: one list of rows per step
        self._pending: list[Row] = []
        self._pending_steps: set[int] = set()

    @property
    def rows(self) -> list[Row]:
        """The rows kept in memory, in flush order: rare rows older than the window, then the
        window's rows. A run shorter than ``window`` steps sees every flushed row."""
        return [*self._events, *chain.from_iterable(self._recent)]

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
            self._remember(rows)
        for sink in self.sinks:
            sink.write(rows)
        return rows

    def _remember(self, rows: list[Row]) -> None:
        """Add flushed rows to the window, then move what leaves it to the rare rows or drop it."""
        recent = self._recent
        for row in rows:
            if recent and recent[-1][0].get("step") == row.get("step"):
                recent[-1].append(row)
            else:
                recent.append([row])
        if self.window is None:
            return
        while len(recent) > self.window:
            for row in recent.popleft():
                if not is_event(row):
                    continue
                if len(self._events) < self.max_events:
                    self._events.append(row)
                else:
                    self.dropped_events += 1

    def close(self) -> None:
        """Flush, then close every sink."""
        self.flush()
        for sink in self.sinks:
            sink.close()

    def state_dict(self) -> dict[str, Any]:
        """The kept rows and settings (pending rows are flushed first so nothing is lost).

        Returns:
            ``{"flush_every", "keep", "window", "max_events", "rows", "evicted",
            "dropped_events"}``: ``rows`` is :attr:`rows`, whose first ``evicted`` rows are
            the rare rows older than the window.
        """
        self.flush()
        return {
            "flush_every": self.flush_every,
            "keep": self.keep,
            "window": self.window,
            "max_events": self.max_events,
            "rows": self.rows,
            "evicted": len(self._events),
            "dropped_events": self.dropped_events,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`; a malformed state raises and changes nothing.

        The older format ``{"flush_every", "keep", "rows"}`` (every row of the run) loads too:
        its rows pass through this recorder's window as if they had just been flushed.

        Args:
            state: a dict from :meth:`state_dict`.

        Raises:
            ValueError: keys are missing, ``flush_every`` is not an int >= 1, ``window``,
                ``max_events``, ``evicted`` or ``dropped_events`` is not an int >= 0 (or
                ``evicted`` exceeds the rows).
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
        window = state.get("window", self.window)
        max_events = state.get("max_events", self.max_events)
        evicted = state.get("evicted", 0)
        dropped = state.get("dropped_events", 0)
        _check_count("state['window']", window, allow_none=True)
        _check_count("state['max_events']", max_events)
        _check_count("state['evicted']", evicted)
        _check_count("state['dropped_events']", dropped)
        if evicted > len(rows):
            raise ValueError(f"state['evicted'] ({evicted}) exceeds the {len(rows)} rows")
        self.flush_every = flush_every
        self.keep = keep
        self.window = window
        self.max_events = max_events
        self._events = []
        self._recent = deque()
        self.dropped_events = dropped
        for row in rows[:evicted]:
            if len(self._events) < max_events:
                self._events.append(dict(row))
            else:
                self.dropped_events += 1
        self._remember([dict(r) for r in rows[evicted:]])
        self._pending = []
        self._pending_steps = set()
