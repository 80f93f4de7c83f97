"""Incident bundles: one replayable file per guard incident (skip, rollback, abort).

When the guard acts on a step it calls :meth:`IncidentWriter.write` *before* it changes any
state, so the model, optimizer, scheduler and scaler still hold the state the bad step started
from (a skipped step is never applied). The bundle stores that state, the batch, the RNG states
as they were before the step's forward pass, the last K step rows (per-layer norms included),
the guard's configuration, the values the guard recorded for the step (loss, gradient norm) and
the library and torch versions. :func:`gradguard.replay.replay` re-executes the step from it
and says why it went wrong.

A bundle *is* a snapshot (:func:`gradguard.rollback.capture`) with one more entry,
``"incident"``, so it is written and read by the same code: atomically (temporary file, fsync,
``os.replace``), with a SHA-256 checksum over the content, loaded with
``torch.load(weights_only=True)``. It holds only tensors, dicts, lists, numbers and strings:
nothing in it can execute, and :func:`load_bundle` refuses a file that holds a pickled object.
``gradguard.rollback.restore(bundle.snapshot, model, optimizer)`` puts a run back to the start
of the incident step.

Writing costs one snapshot plus one copy of the batch, and only on an incident; on a clean step
the guard keeps a reference to the batch and the RNG state (no copy of the batch). Batches
larger than ``max_batch_bytes`` are not stored: the bundle keeps the data position and, when
the caller gives one, the sampler's state instead.

Megatron-LM's rerun state machine reruns a step in place to tell transient faults from
reproducible ones; a bundle makes that rerun possible after the process is gone.

Example:
    >>> writer = IncidentWriter("incidents", actions=("skip", "rollback", "abort"))
    >>> path = writer.write(step=812, position=812, action="skip", signal="spike:grad_norm",
    ...                     reason="grad norm 4.1e3 > 6 sigma", batch=(x, y), rng=rng_before,
    ...                     model=model, optimizer=opt, recorded={"loss": 2.3, "grad_norm": 4.1e3})
    >>> load_bundle(path).recorded["grad_norm"]
    4100.0
"""

from __future__ import annotations

import logging
import math
import os
import platform
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gradguard.rollback import (
    SnapshotError,
    capture,
    load_snapshot,
    save_snapshot,
    to_cpu,
)

__all__ = [
    "DEFAULT_ACTIONS",
    "Bundle",
    "BundleError",
    "IncidentWriter",
    "forward_rng_state",
    "load_bundle",
    "make_bundle",
    "plain",
    "unwrap_model",
]

FORMAT = "gradguard.incident"
VERSION = 1
DEFAULT_ACTIONS = ("skip", "rollback", "abort")
log = logging.getLogger(__name__)


class BundleError(SnapshotError):
    """An incident bundle is missing, truncated, altered, holds a pickled object, or is not one."""


# --------------------------------------------------------------------------- plain values


def _host(obj: Any) -> Any:
    """A step row with its 0-dim tensors read back as Python numbers (the guard may hand over
    rows that are still on the device; on an incident the host sync is fine)."""
    if isinstance(obj, Tensor) and obj.dim() == 0:
        return obj.item()
    if isinstance(obj, Mapping):
        return {k: _host(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_host(v) for v in obj]
    return obj


def plain(obj: Any, *, lossy: bool = False) -> Any:
    """``obj`` as tensors (CPU copies), dicts, lists, numbers, strings and ``None`` only.

    What :func:`torch.load` with ``weights_only=True`` reads back and nothing can execute.

    Args:
        obj: a batch, a config, a row of records.
        lossy: write any other object as its ``repr`` (configs hold policy objects); without
            it such an object raises ``TypeError``.
    """
    if isinstance(obj, Tensor):
        return to_cpu(obj)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                if not lossy:
                    raise TypeError(f"key {k!r} of type {type(k).__name__} is not storable")
                k = repr(k)
            out[k] = plain(v, lossy=lossy)
        return out
    if isinstance(obj, (list, tuple)):
        return [plain(v, lossy=lossy) for v in obj]
    if isinstance(obj, torch.dtype):
        return str(obj)
    if lossy:
        return repr(obj)
    raise TypeError(f"a {type(obj).__name__} is not storable in a bundle (tensors, dicts, lists)")


def _nbytes(obj: Any) -> int:
    if isinstance(obj, Tensor):
        return int(obj.numel() * obj.element_size())
    if isinstance(obj, Mapping):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside a DDP / DataParallel wrapper (its state_dict has no ``module.``)."""
    inner = getattr(model, "module", None)
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    return inner if isinstance(model, wrappers) and isinstance(inner, nn.Module) else model


def _dist() -> tuple[int | None, int]:
    d = torch.distributed
    if d.is_available() and d.is_initialized():
        return int(d.get_rank()), int(d.get_world_size())
    return None, 1


def _versions() -> dict[str, str]:
    from gradguard import __version__

    return {
        "gradguard": str(__version__),
        "torch": str(torch.__version__),
        "python": platform.python_version(),
    }


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [names.get(id(p), "") for g in optimizer.param_groups for p in g["params"]]


def _as_float(v: Any) -> float | None:
    if v is None:
        return None
    if isinstance(v, Tensor):
        return float(v.detach().double().cpu())
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def forward_rng_state() -> dict[str, Any]:
    """The RNG states a forward pass draws from (dropout): torch's CPU and CUDA generators.

    What the guard keeps at the end of every step for the next step's bundle: a few
    microseconds on a CPU, where :func:`gradguard.rollback.rng_state` (numpy and Python
    ``random`` too) takes 100-200. Pass :func:`~gradguard.rollback.rng_state` instead when the
    forward pass draws from numpy or ``random``; replay restores whichever was stored.
    """
    cuda = list(torch.cuda.get_rng_state_all()) if torch.cuda.is_initialized() else []
    return {"torch": torch.get_rng_state(), "cuda": cuda}


# --------------------------------------------------------------------------- the bundle


@dataclass(frozen=True)
class Bundle:
    """A loaded incident bundle (see :func:`load_bundle`).

    Attributes:
        path: the file it came from (``None`` when built in memory).
        step, position: the optimizer step of the incident and the data position of its batch.
        action, signal, reason: what the guard did and why (``"skip"``, ``"spike:grad_norm"``,
            free text).
        recorded: the values the guard measured on the step, e.g. ``{"loss": ..., "grad_norm":
            ...}`` (floats; NaN and inf kept).
        batch: the batch as stored (tuples become lists), or ``None`` above the size cap.
        sampler: the sampler's state when the batch was not stored (else ``None``).
        history: the last K step rows before the incident (``"layers"``: per-layer norms).
        config: the guard's configuration as plain values.
        meta: everything else of the incident entry (versions, rank, world size, training
            mode, optimizer class, parameter names in optimizer order, AMP dtype, batch bytes).
        snapshot: the raw snapshot (model, optimizer, scheduler, scaler, RNG states):
            ``gradguard.rollback.restore(bundle.snapshot, model, optimizer)`` resumes the step.
    """

    path: Path | None
    step: int
    position: int
    action: str
    signal: str
    reason: str
    recorded: dict[str, float | None]
    batch: Any
    sampler: Any
    history: list[dict[str, Any]]
    config: dict[str, Any]
    meta: dict[str, Any]
    snapshot: dict[str, Any]

    @property
    def has_batch(self) -> bool:
        return self.meta.get("batch_kind") == "tensors"

    @property
    def world_size(self) -> int:
        return int(self.meta.get("world_size", 1))


def _from_snapshot(data: dict[str, Any], path: Path | None) -> Bundle:
    where = f"{path}" if path is not None else "bundle"
    inc = data.get("incident")
    if not isinstance(inc, dict) or inc.get("format") != FORMAT:
        raise BundleError(f"{where} is a gradguard snapshot but not an incident bundle")
    if int(inc.get("version", 0)) > VERSION:
        raise BundleError(
            f"{where} has incident version {inc['version']}, newer than this gradguard reads "
            f"({VERSION}); upgrade gradguard"
        )
    required = {"action": str, "signal": str, "reason": str, "recorded": dict, "history": list}
    for key, kind in required.items():
        if not isinstance(inc.get(key), kind):
            raise BundleError(
                f"{where}: entry 'incident.{key}' is missing or not a {kind.__name__}"
            )
    if not isinstance(data.get("model"), dict):
        raise BundleError(f"{where}: no model state")
    meta = {
        k: v
        for k, v in inc.items()
        if k not in ("action", "signal", "reason", "recorded", "history", "batch", "sampler")
    }
    return Bundle(
        path=path,
        step=int(data["step"]),
        position=int(data["position"]),
        action=inc["action"],
        signal=inc["signal"],
        reason=inc["reason"],
        recorded={str(k): _as_float(v) for k, v in inc["recorded"].items()},
        batch=inc.get("batch"),
        sampler=inc.get("sampler"),
        history=list(inc["history"]),
        config=dict(inc.get("config") or {}),
        meta=meta,
        snapshot=data,
    )


def load_bundle(path: str | os.PathLike[str]) -> Bundle:
    """Load and verify an incident bundle (``weights_only=True``, checksum checked).

    Raises:
        BundleError: the file is missing, truncated, altered (checksum mismatch), holds a
            pickled Python object (refused), or is not an incident bundle.

    Example:
        >>> b = load_bundle("incidents/incident-000000812.pt")
        >>> b.action, b.signal, b.recorded
        ('skip', 'spike:grad_norm', {'loss': 2.31, 'grad_norm': 4100.0})
    """
    p = Path(path)
    try:
        data = load_snapshot(p)
    except SnapshotError as e:
        text = str(e)
        if "Weights only load failed" in text or "Unsupported global" in text:
            raise BundleError(
                f"{p} holds a pickled Python object and was refused: a bundle holds only "
                "tensors, dicts, lists, numbers and strings (weights_only=True)"
            ) from None
        raise BundleError(text.replace("snapshot", "bundle", 1)) from None
    return _from_snapshot(data, p)


def make_bundle(
    *,
    step: int,
    position: int,
    action: str,
    signal: str,
    reason: str,
    batch: Any,
    rng: Mapping[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any = None,
    scaler: Any = None,
    history: Iterable[Mapping[str, Any]] = (),
    config: Mapping[str, Any] | None = None,
    recorded: Mapping[str, Any] | None = None,
    sampler: Any = None,
    amp_dtype: torch.dtype | str | None = None,
    max_batch_bytes: float = math.inf,
) -> dict[str, Any]:
    """The bundle as a snapshot dict (what :meth:`IncidentWriter.write` saves).

    Arguments as in :meth:`IncidentWriter.write`.
    """
    inner = unwrap_model(model)
    snap = capture(inner, optimizer, scheduler, scaler, step=step, position=position)
    # The state of the RNGs before this step's forward pass, not now (dropout already drew).
    snap["rng"] = to_cpu(dict(rng))
    rank, world = _dist()
    size = _nbytes(batch)
    stored: Any = None
    kind = "position"
    note = ""
    if batch is not None and size <= max_batch_bytes:
        try:
            stored = plain(batch)
            kind = "tensors"
        except TypeError as e:
            note = f"batch not stored: {e}"
    elif batch is not None:
        note = f"batch not stored: {size} bytes > max_batch_bytes={max_batch_bytes:g}"
    if amp_dtype is None and scaler is not None and getattr(scaler, "is_enabled", lambda: False)():
        amp_dtype = torch.float16  # a GradScaler means fp16 autocast
    device = next((p.device.type for p in inner.parameters()), "cpu")
    snap["incident"] = {
        "format": FORMAT,
        "version": VERSION,
        "action": str(action),
        "signal": str(signal),
        "reason": str(reason),
        "recorded": {str(k): _as_float(v) for k, v in (recorded or {}).items()},
        "batch_kind": kind,
        "batch": stored,
        "batch_bytes": size,
        "batch_note": note,
        "sampler": plain(sampler, lossy=True) if kind != "tensors" else None,
        "history": [plain(_host(dict(r)), lossy=True) for r in history],
        "config": plain(dict(config or {}), lossy=True),
        "versions": _versions(),
        "rank": rank,
        "world_size": world,
        "training": bool(inner.training),
        "device": device,
        "optimizer_class": f"{type(optimizer).__module__}.{type(optimizer).__qualname__}",
        "param_names": _param_names(inner, optimizer),
        "amp_dtype": str(amp_dtype).replace("torch.", "") if amp_dtype is not None else None,
    }
    return snap


# --------------------------------------------------------------------------- the writer


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
        ...     writer.write(step=step, position=pos, action=action, ...)
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
        r = self._rank
        if r is None:
            rank, world = _dist()
            r = rank if world > 1 else None
        base = f"incident-{step:09d}" + ("" if r is None else f"-rank{r}")
        path = self.directory / f"{base}.pt"
        n = 1
        while path.exists():
            path = self.directory / f"{base}-{n}.pt"
            n += 1
        return path

    def write(
        self,
        *,
        step: int,
        position: int,
        action: str,
        signal: str,
        reason: str,
        batch: Any,
        rng: Mapping[str, Any],
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any = None,
        scaler: Any = None,
        history: Iterable[Mapping[str, Any]] = (),
        config: Mapping[str, Any] | None = None,
        recorded: Mapping[str, Any] | None = None,
        sampler: Any = None,
        amp_dtype: torch.dtype | str | None = None,
    ) -> Path | None:
        """Write the bundle of one incident; call it before the step changes any state.

        Args:
            step, position: the incident's optimizer step and its batch's data position.
            action, signal, reason: what the guard does and why.
            batch: the batch the step ran on (a reference; copied to the CPU here).
            rng: the RNG states as they were before this step's forward:
                :func:`forward_rng_state` (cheap) or :func:`gradguard.rollback.rng_state`.
            model, optimizer, scheduler, scaler: still in the state the step started from.
            history: the last K step rows (per-layer norms under ``"layers"``); 0-dim tensors
                in them are read back to numbers here.
            config: the guard's configuration as a dict (objects are stored as their repr).
            recorded: what the guard measured on this step, e.g. ``{"loss": 2.3,
                "grad_norm": 4.1e3}`` (floats or 0-dim tensors).
            sampler: the sampler's state, stored when the batch is over the size cap.
            amp_dtype: the autocast dtype of the forward pass, if any (a scaler implies fp16).

        Returns:
            The file written, or ``None``: the action does not write bundles, ``max_count``
            was reached (``dropped`` counts these), or the write failed (``errors`` says why;
            an incident file must never stop training).
        """
        if action not in self.actions:
            return None
        if len(self.written) >= self.max_count:
            self.dropped += 1
            return None
        snap = make_bundle(
            step=step,
            position=position,
            action=action,
            signal=signal,
            reason=reason,
            batch=batch,
            rng=rng,
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            scaler=scaler,
            history=history,
            config=config,
            recorded=recorded,
            sampler=sampler,
            amp_dtype=amp_dtype,
            max_batch_bytes=self.max_batch_bytes,
        )
        target = self.path(step)
        try:
            save_snapshot(target, snap)
        except (OSError, RuntimeError) as e:  # torch's zip writer reports a full disk so
            self.errors.append(f"step {step}: {e}")
            log.warning("gradguard: incident bundle for step %d not written: %s", step, e)
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
