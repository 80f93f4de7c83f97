"""Weights & Biases, offline, for the tests: an environment that stays on the machine, and a
reader for the run file it writes (W&B ships no reader of its own any more).

An offline run is a folder ``wandb/offline-run-<time>-<id>/`` whose ``run-<id>.wandb`` file
is a LevelDB-style log of protobuf ``Record`` messages (W&B's ``wandb_internal.proto``).
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path
from typing import Any

import pytest


def offline_env(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    """W&B fully offline, everything under ``folder`` (no login, no network, no home config).

    W&B reads its environment once per process, when it first sets up; an earlier test's
    setup would keep that test's folder. Tearing it down makes the next ``wandb.init`` (the
    test's, or a framework's) read this environment.
    """
    import wandb

    wandb.teardown()
    for key, value in {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_DIR": str(folder),
        "WANDB_CONFIG_DIR": str(folder / "wandb-config"),
        "WANDB_CACHE_DIR": str(folder / "wandb-cache"),
        "WANDB_DATA_DIR": str(folder / "wandb-data"),
        "WANDB_DISABLE_GIT": "true",
        "WANDB_CONSOLE": "off",
        "DO_NOT_TRACK": "true",
    }.items():
        monkeypatch.setenv(key, value)


# ---- reading an offline W&B run: the .wandb file is a LevelDB-style log of protobuf records ----

_BLOCK = 32768  # the log's block size; a record header never straddles a block
_HEADER = struct.Struct("<IHB")  # crc32, length, type (1 full, 2 first, 3 middle, 4 last)


def wandb_records(path: Path) -> list[Any]:
    """Every protobuf ``Record`` in an offline run's ``run-<id>.wandb`` file."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", "not a W&B run file"
    pos, out, parts = 7, [], b""  # 7: ident ":W&B", magic (2 bytes), version (1 byte)
    while pos + _HEADER.size <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER.size:  # zero padding at the end of a block
            pos += left
            continue
        _, length, kind = _HEADER.unpack_from(data, pos)
        if kind == 0:  # padding up to the end of the block
            pos += left
            continue
        start = pos + _HEADER.size
        parts += data[start : start + length]
        pos = start + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(parts)
            out.append(record)
            parts = b""
    return out


def finished_records(run_dir: Path) -> list[Any]:
    """The run's records once W&B has written all of them.

    ``run.finish()`` returns before W&B's service process has written the last records to the
    file; the run is complete when its ``exit`` record is there. The deadline is a hang guard.
    """
    (file,) = run_dir.glob("run-*.wandb")
    deadline = time.monotonic() + 120
    while True:
        records = wandb_records(file)
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            return records
        assert time.monotonic() < deadline, f"{file} never got its exit record"
        time.sleep(0.05)


def wandb_history(run_dir: Path) -> list[dict[str, Any]]:
    """The history rows (``run.log`` calls) of an offline run folder, values decoded."""
    rows = []
    for record in finished_records(run_dir):
        if record.WhichOneof("record_type") == "history":
            rows.append(
                {
                    (item.key or "/".join(item.nested_key)): json.loads(item.value_json)
                    for item in record.history.item
                    if not (item.key or "/".join(item.nested_key)).startswith("_")
                }
            )
    return rows


def run_dirs(folder: Path) -> list[Path]:
    """The offline run folders under ``folder`` (any depth), oldest first."""
    return sorted(folder.rglob("offline-run-*"), key=lambda p: p.name)
