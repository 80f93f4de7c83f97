"""Incident bundles: one replayable file per guard incident (skip, rollback, abort).

When the guard acts on a step it writes a bundle (:class:`gradguard.guard.incident.IncidentWriter`)
*before* it changes any state, so the model, optimizer, scheduler and scaler still hold the state
the bad step started from (a skipped step is never applied). The bundle stores that state, the
batch, the RNG states as they were before the step's forward pass, the last K step rows (per-layer
norms included), the guard's configuration, the values the guard recorded for the step (loss,
gradient norm) and the library and torch versions. :func:`gradguard.insight.replay.replay`
re-executes the step from it and says why it went wrong.

A bundle *is* a snapshot (:func:`gradguard.core.snapshot.capture`) with one more entry,
``"incident"``, so it is written and read by the same code: atomically (temporary file, fsync,
``os.replace``), with a SHA-256 checksum over the content, loaded with
``torch.load(weights_only=True)``. It holds only tensors, dicts, lists, numbers and strings:
nothing in it can execute, and :func:`load_bundle` refuses a file that holds a pickled object.
``gradguard.core.snapshot.restore(bundle.snapshot, model, optimizer)`` puts a run back to the start
of the incident step.

Writing costs one snapshot plus one copy of the batch, and only on an incident; on a clean step
the guard keeps a reference to the batch and the RNG state (no copy of the batch). Batches
larger than ``max_batch_bytes`` are not stored: the bundle keeps the data position and, when
the caller gives one, the sampler's state instead.

Megatron-LM's rerun state machine reruns a step in place to tell transient faults from
reproducible ones; a bundle makes that rerun possible after the process is gone.

Example:
    >>> writer = IncidentWriter("incidents", actions=("skip", "rollback", "abort"))
    >>> path = writer.write(BundleSpec(step=812, position=812, action="skip",
    ...     signal="spike:loss", reason="loss 10x its best", batch=(x, y), rng=rng_before,
    ...     model=model, optimizer=opt, recorded={"loss": 23.0, "grad_norm": 4.1e3}))
    >>> load_bundle(path).recorded["grad_norm"]
    4100.0
"""

from __future__ import annotations

import math
import os
import platform
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gradguard.core.snapshot import SnapshotError, capture, load_snapshot, to_cpu
from gradguard.core.version import version

__all__ = [
    "DEFAULT_ACTIONS",
    "Bundle",
    "BundleError",
    "BundleSpec",
    "load_bundle",
    "make_bundle",
    "plain",
    "strip_prefix",
    "unwrap_model",
]

FORMAT = "gradguard.incident"
VERSION = 1
DEFAULT_ACTIONS = ("skip", "rollback", "abort")


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
    """The module inside DDP / DataParallel and ``torch.compile`` wrappers (whose state_dict
    keys carry ``module.`` / ``_orig_mod.``)."""
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    while True:
        inner = getattr(model, "module", None)
        if isinstance(model, wrappers) and isinstance(inner, nn.Module):
            model = inner
            continue
        orig = getattr(model, "_orig_mod", None)  # torch.compile's OptimizedModule
        if isinstance(orig, nn.Module) and orig is not model:
            model = orig
            continue
        return model


# Wrappers whose state_dict keys carry a prefix the wrapped model's do not: DDP's ``module.``
# and ``torch.compile``'s ``_orig_mod.``. A bundle stores plain keys, so a plain factory loads it.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def strip_prefix(key: str) -> str:
    """``key`` without leading wrapper prefixes (``module.``, ``_orig_mod.``, in any order)."""
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix) :], True
    return key


def strip_prefixes(state: Mapping[str, Any]) -> dict[str, Any]:
    """A state dict with every key passed through :func:`strip_prefix`."""
    return {strip_prefix(k): v for k, v in state.items()}


def dist_rank() -> int | None:
    """This process's rank in file names: the global rank with more than one process."""
    rank, world = _dist()
    return rank if world > 1 else None


def _dist() -> tuple[int | None, int]:
    d = torch.distributed
    if d.is_available() and d.is_initialized():
        return int(d.get_rank()), int(d.get_world_size())
    return None, 1


def _versions() -> dict[str, str]:
    return {
        "gradguard": version(),
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
            ``gradguard.core.snapshot.restore(bundle.snapshot, model, optimizer)`` resumes the step.
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


@dataclass
class BundleSpec:
    """Everything one incident bundle holds: the live objects, the batch and what the guard saw.

    Attributes:
        step, position: the incident's optimizer step and its batch's data position.
        action, signal, reason: what the guard does and why.
        batch: the batch the step ran on (a reference; copied to the CPU when written).
        rng: the RNG states as they were before this step's forward:
            :func:`gradguard.core.snapshot.forward_rng_state` (cheap) or
            :func:`gradguard.core.snapshot.rng_state`.
        model, optimizer, scheduler, scaler: still in the state the step started from.
        buffers: the model's buffers as they were before this step's forward (``{name:
            tensor}``, ``model.state_dict()`` keys), stored instead of the live ones: a forward
            in training mode has already moved BatchNorm's running statistics (``None``: the
            live buffers).
        history: the last K step rows (per-layer norms under ``"layers"``); 0-dim tensors in
            them are read back to numbers when written.
        config: the guard's configuration as a dict (objects are stored as their repr).
        recorded: what the guard measured on this step, e.g. ``{"loss": 2.3,
            "grad_norm": 4.1e3}`` (floats or 0-dim tensors).
        sampler: the sampler's state, stored when the batch is over the size cap.
        amp_dtype: the autocast dtype of the forward pass, if any (a scaler implies fp16).

    Example:
        >>> spec = BundleSpec(step=812, position=812, action="skip", signal="spike:loss",
        ...                   reason="loss 10x", batch=(x, y), rng=forward_rng_state(),
        ...                   model=model, optimizer=opt)
        >>> snap = make_bundle(spec)
    """

    step: int
    position: int
    action: str
    signal: str
    reason: str
    batch: Any
    rng: Mapping[str, Any]
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any = None
    scaler: Any = None
    buffers: Mapping[str, Tensor] | None = None
    history: Iterable[Mapping[str, Any]] = ()
    config: Mapping[str, Any] | None = None
    recorded: Mapping[str, Any] | None = None
    sampler: Any = None
    amp_dtype: torch.dtype | str | None = None


def make_bundle(spec: BundleSpec, max_batch_bytes: float = math.inf) -> dict[str, Any]:
    """The bundle of ``spec`` as a snapshot dict (what an incident writer saves).

    Args:
        spec: what the bundle holds.
        max_batch_bytes: a batch larger than this is not stored (the position and the sampler
            state are).

    Returns:
        A snapshot (:func:`gradguard.core.snapshot.capture`) with an ``"incident"`` entry.
    """
    inner = unwrap_model(spec.model)
    optimizer, scaler, batch = spec.optimizer, spec.scaler, spec.batch
    # The state of the RNGs before this step's forward pass, not now (dropout already drew):
    # the generators spec.rng names (torch's, CUDA's) replace the current ones, the others
    # (numpy, Python) are kept, so restore() finds every generator it sets.
    snap = capture(
        inner, optimizer, spec.scheduler, scaler, step=spec.step, position=spec.position,
        rng=to_cpu(dict(spec.rng)),
    )  # fmt: skip
    snap["model"] = strip_prefixes(snap["model"])
    if spec.buffers is not None:
        before = strip_prefixes(to_cpu(dict(spec.buffers)))
        snap["model"].update({k: v for k, v in before.items() if k in snap["model"]})
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
    amp_dtype = spec.amp_dtype
    if amp_dtype is None and scaler is not None and getattr(scaler, "is_enabled", lambda: False)():
        amp_dtype = torch.float16  # a GradScaler means fp16 autocast
    device = next((p.device.type for p in inner.parameters()), "cpu")
    snap["incident"] = {
        "format": FORMAT,
        "version": VERSION,
        "action": str(spec.action),
        "signal": str(spec.signal),
        "reason": str(spec.reason),
        "recorded": {str(k): _as_float(v) for k, v in (spec.recorded or {}).items()},
        "batch_kind": kind,
        "batch": stored,
        "batch_bytes": size,
        "batch_note": note,
        "sampler": plain(spec.sampler, lossy=True) if kind != "tensors" else None,
        "history": [plain(_host(dict(r)), lossy=True) for r in spec.history],
        "config": plain(dict(spec.config or {}), lossy=True),
        "versions": _versions(),
        "rank": rank,
        "world_size": world,
        "training": bool(inner.training),
        "device": device,
        "optimizer_class": f"{type(optimizer).__module__}.{type(optimizer).__qualname__}",
        "param_names": [strip_prefix(n) for n in _param_names(inner, optimizer)],
        "amp_dtype": str(amp_dtype).replace("torch.", "") if amp_dtype is not None else None,
    }
    return snap
