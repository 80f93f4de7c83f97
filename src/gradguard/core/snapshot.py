"""SNAPSHOT: a training run's whole state, captured and restored, in memory or on disk.

A snapshot holds everything needed to continue a run bit for bit from a past step: the model,
the optimizer, the LR scheduler and the AMP scaler states, every RNG state (torch CPU, CUDA when
present, numpy, Python ``random``), the guard's own state and the step / data position. The
guard's rollback (:mod:`gradguard.guard.rollback`) restores one; an incident bundle
(:mod:`gradguard.records.bundle`) is one with an extra entry.

Snapshots live in CPU memory by default (tensors deep-copied to the CPU). On disk
(:class:`SnapshotStore` with ``directory=``) each one is written crash-safely: to a temporary
file in the same directory, flushed and fsynced, renamed over the final name with
``os.replace`` (atomic on POSIX), then the directory is fsynced; the previous good snapshot is
kept until a newer one is complete. Files hold only tensors, dicts, lists, numbers and strings,
so they load with ``torch.load(path, weights_only=True)``; a SHA-256 checksum over the content
turns a truncated or corrupted file into a clear :class:`SnapshotError`, and the store falls
back to the previous snapshot. Under ``torch.distributed`` each rank keeps its own files
(``snapshot-<step>-rank<r>.pt``), and a DTensor (FSDP2 shard) is stored as the rank's local shard
and rebuilt on the live model's device mesh by :func:`restore`.

Example:
    >>> store = SnapshotStore(directory="ckpt", keep=2)
    >>> store.push(capture(model, optimizer, scheduler, step=100, position=100))
    >>> restore(store.latest(), model, optimizer, scheduler)
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import random
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "SnapshotError",
    "SnapshotStore",
    "capture",
    "checksum",
    "forward_rng_state",
    "load_snapshot",
    "restore",
    "rng_state",
    "save_snapshot",
    "set_rng_state",
]

FORMAT = "gradguard.snapshot"
VERSION = 1
log = logging.getLogger(__name__)


class SnapshotError(RuntimeError):
    """A snapshot file is missing, truncated, corrupted or not a gradguard snapshot."""


# --------------------------------------------------------------------------- copying

# A DTensor (FSDP2 shard) is stored as a plain dict holding this rank's local shard: a file must
# load with weights_only=True on any process, and a device mesh cannot be saved. restore()
# rebuilds it with the live model's mesh.
DTENSOR_TAG = "__gradguard_dtensor__"


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed support
        return None
    return DTensor


def _is_dtensor(obj: Any) -> bool:
    cls = _dtensor_type()
    return cls is not None and isinstance(obj, cls)


def to_cpu(obj: Any) -> Any:
    """A deep copy of a state tree with every tensor detached, cloned and moved to the CPU.

    Tuples stay tuples (``weights_only`` loading reads them) and dict keys are kept, so a
    restored object holds the same types it had.
    A DTensor (an FSDP2 shard) becomes ``{"__gradguard_dtensor__": 1, "local": <this rank's
    shard>, "shape": [...], "stride": [...], "placements": ["S(0)", ...]}``; :func:`restore`
    turns it back into a DTensor on the live model's device mesh.
    """
    if _is_dtensor(obj):
        return {
            DTENSOR_TAG: 1,
            "local": obj.to_local().detach().to("cpu", copy=True),
            "shape": [int(n) for n in obj.shape],
            "stride": [int(n) for n in obj.stride()],
            "placements": [str(pl) for pl in obj.placements],
        }
    if isinstance(obj, Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, tuple):  # kept: a restored optimizer's betas are a tuple again
        return tuple(to_cpu(v) for v in obj)
    if isinstance(obj, list):
        return [to_cpu(v) for v in obj]
    return obj


def _parse_placement(text: str) -> Any:
    from torch.distributed.tensor import Partial, Replicate, Shard

    if text == "R":
        return Replicate()
    if text.startswith("S(") and text.endswith(")") and text[2:-1].isdigit():
        return Shard(int(text[2:-1]))
    if text.startswith("P(") and text.endswith(")"):
        return Partial(text[2:-1])
    return None


# Where a stored DTensor shard goes back: (device mesh, device of the local shard, placements).
_Home = tuple[Any, torch.device, Any]


def _home_of(t: Any) -> _Home | None:
    if not _is_dtensor(t):
        return None
    return (t.device_mesh, t.to_local().device, t.placements)


def _from_shard(entry: dict[str, Any], home: _Home | None) -> Tensor:
    if home is None:
        raise SnapshotError(
            "the snapshot holds a DTensor shard (FSDP2) but the live model has no DTensor "
            "there: shard the model as it was when the snapshot was taken"
        )
    from torch.distributed.tensor import DTensor

    mesh, device, live_placements = home
    parsed = [_parse_placement(str(pl)) for pl in entry["placements"]]
    placements = live_placements if any(pl is None for pl in parsed) else parsed
    # A copy: the snapshot's shard must not become the optimizer's state (restored twice).
    local = entry["local"].to(device, copy=True)
    return DTensor.from_local(
        local,
        mesh,
        placements,
        run_check=False,
        shape=torch.Size(int(n) for n in entry["shape"]),
        stride=tuple(int(n) for n in entry["stride"]),
    )


def _rebuild(obj: Any, home: _Home | None, clone: bool) -> Any:
    """Copy of a stored tree with the DTensor shards rebuilt (and, with ``clone``, every tensor
    cloned: optimizer loaders keep tensors that already sit on the right device)."""
    if isinstance(obj, dict):
        if obj.get(DTENSOR_TAG) == 1:
            return _from_shard(obj, home)
        return {k: _rebuild(v, home, clone) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_rebuild(v, home, clone) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_rebuild(v, home, clone) for v in obj)
    if isinstance(obj, Tensor) and clone:
        return obj.clone()
    if clone:
        return copy.deepcopy(obj)
    return obj


def _has_shards(obj: Any) -> bool:
    if isinstance(obj, dict):
        return obj.get(DTENSOR_TAG) == 1 or any(_has_shards(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return any(_has_shards(v) for v in obj)
    return False


# --------------------------------------------------------------------------- RNG


def rng_state() -> dict[str, Any]:
    """Every RNG state as tensors, lists and numbers (loadable with ``weights_only=True``).

    Returns:
        ``{"torch": ByteTensor, "cuda": [ByteTensor per device], "numpy": {...},
        "python": {...}}``.
    """
    np_state: tuple[Any, ...] = np.random.get_state()  # type: ignore[assignment]
    py_version, py_internal, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_initialized() else [],
        "numpy": {
            "kind": str(np_state[0]),
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64).copy()),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {
            "version": int(py_version),
            # Mersenne-Twister words are < 2**32 and fit an int64 tensor exactly.
            "internal": torch.tensor(list(py_internal), dtype=torch.int64),
            "gauss_next": py_gauss,
        },
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(
        (
            n["kind"],
            n["keys"].numpy().astype(np.uint32),
            int(n["pos"]),
            int(n["has_gauss"]),
            float(n["cached_gaussian"]),
        )
    )
    p = state["python"]
    internal = tuple(int(x) for x in p["internal"].tolist())
    random.setstate((int(p["version"]), internal, p["gauss_next"]))


# --------------------------------------------------------------------------- capture / restore


def capture(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any = None,
    scaler: Any = None,
    *,
    step: int,
    position: int,
    guard: dict[str, Any] | None = None,
    buffers: Mapping[str, Tensor] | None = None,
    rng: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A CPU deep copy of everything a run needs to continue from here.

    One device-to-host copy per tensor: this is a host sync, taken every ``snapshot_every``
    steps only.

    Args:
        model, optimizer, scheduler, scaler: the run's objects (``None`` where absent).
        step: the optimizer step this snapshot resumes at.
        position: the data position (index of the next batch to draw).
        guard: the guard's own state (policy, detectors, counters).
        buffers: module buffers by ``model.state_dict()`` key to store instead of the live
            ones (the state before a forward that already moved them).
        rng: RNG states to store instead of the current ones, for the generators they name
            (``{"torch": ..., "cuda": [...]}``: the state before a forward that drew from them).

    Returns:
        A dict of tensors, dicts, lists, numbers and strings.
    """
    model_state = dict(model.state_dict())
    if buffers is not None:
        model_state.update({k: v for k, v in buffers.items() if k in model_state})
    rngs = rng_state()
    if rng is not None:
        rngs.update({k: v for k, v in rng.items() if k in rngs})
    return {
        "format": FORMAT,
        "version": VERSION,
        "step": int(step),
        "position": int(position),
        "model": to_cpu(model_state),
        "optimizer": to_cpu(optimizer.state_dict()),
        "scheduler": to_cpu(scheduler.state_dict()) if scheduler is not None else None,
        "scaler": to_cpu(scaler.state_dict()) if scaler is not None else None,
        "rng": to_cpu(rngs),
        "guard": to_cpu(guard) if guard is not None else None,
    }


def restore(
    snapshot: dict[str, Any],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any = None,
    scaler: Any = None,
) -> None:
    """Put the model, optimizer, scheduler, scaler and RNGs back to ``snapshot``, bit for bit.

    The snapshot is not modified (the loaders copy what they take), so it can be restored again.
    DTensor shards (FSDP2) are rebuilt on the device mesh of the live model's matching entry (the
    optimizer's on its parameter's mesh): each rank restores its own shard.
    """
    _check_format(snapshot)
    default: _Home | None = None
    for p in model.parameters():
        default = _home_of(p)
        if default is not None:
            break
    model_state = snapshot["model"]
    if _has_shards(model_state):
        live = model.state_dict()
        model_state = {
            k: _rebuild(v, _home_of(live.get(k)) or default, clone=False)
            for k, v in model_state.items()
        }
    model.load_state_dict(model_state)
    # Copies: Optimizer.load_state_dict keeps tensors that already have the right dtype and
    # device, and the optimizer would then update the snapshot's own tensors in place.
    opt_state = snapshot["optimizer"]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    homes = {i: _home_of(p) or default for i, p in enumerate(params)}
    loaded = {k: _rebuild(v, default, clone=True) for k, v in opt_state.items() if k != "state"}
    if "state" in opt_state:
        # Optimizer state is keyed by the parameter's index: its shard lives on that mesh.
        loaded["state"] = {
            k: _rebuild(v, homes.get(k, default), clone=True) for k, v in opt_state["state"].items()
        }
    optimizer.load_state_dict(loaded)
    _keep_state_dtypes(optimizer, params, opt_state.get("state", {}))
    if scheduler is not None and snapshot["scheduler"] is not None:
        scheduler.load_state_dict(_rebuild(snapshot["scheduler"], default, clone=True))
    if scaler is not None and snapshot["scaler"] is not None:
        scaler.load_state_dict(_rebuild(snapshot["scaler"], default, clone=True))
    set_rng_state(snapshot["rng"])


def _keep_state_dtypes(
    optimizer: torch.optim.Optimizer, params: list[Any], stored: dict[Any, Any]
) -> None:
    """``Optimizer.load_state_dict`` casts floating state to its parameter's dtype; put back the
    dtype the state had when captured (a model cast after its optimizer was built keeps fp32
    state), so a restored run computes exactly as the captured one did."""
    for i, entry in stored.items():
        if not isinstance(i, int) or not 0 <= i < len(params) or not isinstance(entry, dict):
            continue
        live = optimizer.state.get(params[i], {})
        for key, value in entry.items():
            now = live.get(key)
            if isinstance(value, Tensor) and isinstance(now, Tensor) and now.dtype != value.dtype:
                live[key] = now.to(value.dtype)


def _check_format(snapshot: Any) -> None:
    if not isinstance(snapshot, dict) or snapshot.get("format") != FORMAT:
        raise SnapshotError("not a gradguard snapshot (no 'format': 'gradguard.snapshot' entry)")
    if int(snapshot.get("version", 0)) > VERSION:
        raise SnapshotError(
            f"snapshot version {snapshot['version']} is newer than this gradguard reads "
            f"({VERSION}); upgrade gradguard"
        )


# --------------------------------------------------------------------------- on disk


def _feed(h: Any, obj: Any) -> None:
    # Type-tagged, order-preserving encoding: equal digests mean equal content and structure.
    if _is_dtensor(obj):  # this rank's shard; to_cpu stores DTensors that way too
        obj = obj.to_local()
    if isinstance(obj, Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}".encode())
        for k, v in obj.items():
            h.update(f"K{type(k).__name__}:{k!r}".encode())
            _feed(h, v)
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{len(obj)}".encode())
        for v in obj:
            _feed(h, v)
    else:
        h.update(f"S{type(obj).__name__}:{obj!r}".encode())


def checksum(obj: Any) -> str:
    """SHA-256 hex digest of a state tree (tensor bytes, dtypes, shapes, keys and scalars)."""
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_snapshot(path: str | os.PathLike[str], snapshot: dict[str, Any]) -> Path:
    """Write ``snapshot`` to ``path`` crash-safely, with a checksum.

    A crash at any moment leaves either the old file at ``path`` or the complete new one, never
    a partial file under that name (temporary files are named ``.<name>.tmp-*``).

    Args:
        path: the final file name.
        snapshot: what :func:`capture` returned.

    Returns:
        The path written.

    Example:
        >>> save_snapshot("ckpt/snapshot-000100.pt", capture(model, opt, step=100, position=100))
    """
    _check_format(snapshot)
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "version": VERSION, "sha256": checksum(snapshot), "data": snapshot}
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.tmp-", dir=final.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, final)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _fsync_dir(final.parent)
    return final


def load_snapshot(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load and verify a snapshot written by :func:`save_snapshot` (``weights_only=True``).

    Raises:
        SnapshotError: the file is missing, truncated, corrupted (checksum mismatch) or not a
            gradguard snapshot.
    """
    p = Path(path)
    try:
        payload = torch.load(p, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise SnapshotError(f"snapshot {p} does not exist") from None
    except Exception as e:  # torch raises several types for a damaged zip archive
        raise SnapshotError(
            f"snapshot {p} cannot be read (truncated or corrupted file): {e}"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT or "data" not in payload:
        raise SnapshotError(f"{p} is not a gradguard snapshot")
    data = payload["data"]
    _check_format(data)
    if checksum(data) != payload.get("sha256"):
        raise SnapshotError(f"snapshot {p} is corrupted: its checksum does not match its content")
    return data  # type: ignore[no-any-return]


_NAME = re.compile(r"snapshot-(\d+)(?:-rank(\d+))?\.pt")


def _process_rank() -> int | None:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return int(dist.get_rank())
    return None


class SnapshotStore:
    """The last ``keep`` snapshots, in CPU memory or, with ``directory``, on disk.

    On disk, snapshot files are ``snapshot-<step>.pt``; older ones are deleted only after a
    newer one is complete, and :meth:`latest` skips unreadable files (logging why, and keeping
    the reasons in ``errors``) and falls back to the previous one. Under ``torch.distributed``
    with more than one process every rank holds its own state (FSDP2 shards, RNG states), so
    its files are ``snapshot-<step>-rank<r>.pt`` and a store reads only its own rank's files:
    all ranks can share one directory.

    Args:
        directory: where to write snapshots; ``None`` keeps them in memory.
        keep: how many snapshots to keep (>= 1; 2 or more lets a rollback reach behind an
            incident that began just before the newest one).
        rank: the rank in the file names; ``None``: the global rank when ``torch.distributed``
            is initialized with a world size > 1, else no rank in the names.

    Example:
        >>> store = SnapshotStore(keep=2)
        >>> store.push(capture(model, opt, step=0, position=0))
        >>> store.latest(max_position=10)["step"]
        0
    """

    def __init__(
        self,
        directory: str | os.PathLike[str] | None = None,
        keep: int = 2,
        *,
        rank: int | None = None,
    ) -> None:
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep must be an int >= 1, got {keep!r}")
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 0):
            raise ValueError(f"rank must be an int >= 0 or None, got {rank!r}")
        if directory is not None and not isinstance(directory, (str, os.PathLike)):
            raise TypeError(f"directory must be a path or None, got {type(directory).__name__}")
        self.directory = Path(directory) if directory is not None else None
        self.keep = keep
        self.rank = rank if rank is not None else _process_rank()
        self.errors: list[str] = []
        self._memory: list[dict[str, Any]] = []
        # (step, position, path) of the files this store wrote or found, oldest first.
        self._files: list[tuple[int, int, Path]] = []

    def scan(self) -> int:
        """Adopt the snapshot files already in ``directory`` (to resume a run that stopped).

        A store starts empty so that files of an unrelated earlier run are never restored by
        accident. Returns the number of files found.
        """
        found = [(step, -1, f) for step, f in self.on_disk()]  # positions unknown until loaded
        known = {f[2] for f in self._files}
        self._files = sorted([*self._files, *(f for f in found if f[2] not in known)])
        return len(found)

    def path(self, step: int) -> Path:
        """The file name of this rank's snapshot of ``step`` (on-disk stores only)."""
        if self.directory is None:
            raise ValueError("path: this store keeps its snapshots in memory (directory=None)")
        suffix = "" if self.rank is None else f"-rank{self.rank}"
        return self.directory / f"snapshot-{step:09d}{suffix}.pt"

    def on_disk(self) -> list[tuple[int, Path]]:
        """``(step, path)`` of this rank's snapshot files in ``directory``, oldest first.

        Other ranks' files (and, in a single process, every rank's) are left out.
        """
        if self.directory is None or not self.directory.is_dir():
            return []
        found = []
        for f in self.directory.glob("snapshot-*.pt"):
            m = _NAME.fullmatch(f.name)
            if m is None:
                continue
            rank = int(m.group(2)) if m.group(2) is not None else None
            if rank == self.rank:
                found.append((int(m.group(1)), f))
        return sorted(found)

    def has(self, max_position: int | None = None) -> bool:
        """Whether a snapshot at data position ``<= max_position`` may exist (no file is read)."""
        if self.directory is None:
            positions = [int(s["position"]) for s in self._memory]
        else:
            positions = [pos for _, pos, _ in self._files]
        return any(max_position is None or pos <= max_position for pos in positions)

    def oldest(self) -> int | None:
        """The data position of the oldest kept snapshot (``None``: none kept; no file read)."""
        if self.directory is None:
            positions = [int(s["position"]) for s in self._memory]
        else:
            positions = [pos for _, pos, _ in self._files]
        return min(positions, default=None)

    def __len__(self) -> int:
        return len(self._memory) if self.directory is None else len(self._files)

    def push(self, snapshot: dict[str, Any]) -> None:
        """Keep ``snapshot`` (write it, on disk) and drop the oldest beyond ``keep``."""
        _check_format(snapshot)
        if self.directory is None:
            self._memory.append(snapshot)
            del self._memory[: -self.keep]
            return
        step = int(snapshot["step"])
        path = save_snapshot(self.path(step), snapshot)
        self._files = [f for f in self._files if f[2] != path]
        self._files.append((step, int(snapshot["position"]), path))
        for _, _, old in self._files[: -self.keep]:
            old.unlink(missing_ok=True)
        del self._files[: -self.keep]

    def latest(
        self, max_position: int | None = None, *, max_step: int | None = None
    ) -> dict[str, Any] | None:
        """The newest readable snapshot whose data position is ``<= max_position`` (any if None)
        and whose step is ``<= max_step`` (any if None).

        Returns ``None`` when there is none.
        """
        if self.directory is None:
            for snap in reversed(self._memory):
                if max_step is not None and int(snap["step"]) > max_step:
                    continue
                if max_position is None or int(snap["position"]) <= max_position:
                    return snap
            return None
        for step, pos, path in reversed(self._files):
            if max_position is not None and 0 <= max_position < pos:
                continue
            if max_step is not None and step > max_step:
                continue
            try:
                snap = load_snapshot(path)
            except SnapshotError as e:
                self.errors.append(str(e))
                log.warning("gradguard: %s; falling back to the previous snapshot", e)
                continue
            if max_position is None or int(snap["position"]) <= max_position:
                return snap
        return None

    def agreed(
        self, max_position: int | None, group: Any = None, device: Any = "cpu"
    ) -> dict[str, Any] | None:
        """The newest snapshot (data position ``<= max_position``) every rank can read: the
        same step on all ranks of ``group``, or ``None``.

        In memory, or on a single process, that is :meth:`latest`. A disk file may be
        unreadable on one rank only, and restoring different steps would split the replicas:
        the ranks agree (all-reduce) on the newest step all of them hold. Steps only go down,
        so the agreement ends.
        """
        from gradguard.core import distributed as _distributed

        snap = self.latest(max_position=max_position)
        if self.directory is None or _distributed.world_size(group) <= 1:
            return snap
        while True:
            mine = float(snap["step"]) if snap is not None else -1.0
            ends = torch.tensor([mine, -mine], dtype=torch.float64, device=device)
            hi, neg_lo = _distributed.agree_(ends, group).tolist()
            if hi == -neg_lo:
                return snap
            if -neg_lo < 0:
                return None
            snap = self.latest(max_position=max_position, max_step=int(-neg_lo))

    def clear(self) -> None:
        """Forget every snapshot (files on disk are left in place)."""
        self._memory.clear()
        self._files.clear()


def forward_rng_state() -> dict[str, Any]:
    """The RNG states a forward pass draws from (dropout): torch's CPU and CUDA generators.

    What the guard keeps at the end of every step for the next step's bundle: a few
    microseconds on a CPU, where :func:`gradguard.core.snapshot.rng_state` (numpy and Python
    ``random`` too) takes 100-200. Pass :func:`~gradguard.core.snapshot.rng_state` instead when the
    forward pass draws from numpy or ``random``; replay restores whichever was stored.
    """
    cuda = list(torch.cuda.get_rng_state_all()) if torch.cuda.is_initialized() else []
    return {"torch": torch.get_rng_state(), "cuda": cuda}
