"""Worker side of tests/test_sharded_norms.py: gloo ranks measuring sharded gradients.

Workers live at module top level so the spawn start method can pickle them. Every rank builds
the same full tensors from a seed, keeps its shard (a DTensor with ``Shard(0)``, or a plain
chunk for ``group=``), measures with gradguard and reports plain numbers back.
"""

from __future__ import annotations

import math
import os
import queue
import socket
import traceback
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

SHAPES = [(6, 5), (8,), (4, 3, 2), (10, 7)]  # first dims divisible by 2: even shards
NORM_TYPES = [1.0, 2.0, 3.0, math.inf]


# Fewer rows than ranks: with Shard(0) over 2 ranks, rank 1's shard of the first is empty
# (FSDP2 shards the same way), where torch's inf-norm raises.
UNEVEN_SHAPES = [(1,), (3, 2), (1, 4)]


def full_tensors(seed: int = 0, shapes: list[tuple[int, ...]] = SHAPES) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float64) * 3 for s in shapes]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _measure(rank: int, world: int) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    import gradguard as gg

    out: dict[str, Any] = {}
    full = full_tensors()
    mesh = init_device_mesh("cpu", (world,))
    dtensors = [distribute_tensor(t, mesh, [Shard(0)]) for t in full]
    local = [t.chunk(world, dim=0)[rank].contiguous() for t in full]
    for p in NORM_TYPES:
        norms = gg.grad_norms(dtensors, p)
        out[f"dtensor-{p}-total"] = float(norms.total)
        out[f"dtensor-{p}-per"] = [float(n) for n in norms.per_tensor]
        out[f"dtensor-{p}-plain"] = type(norms.total).__name__ == "Tensor"
        out[f"dtensor-{p}-get_total_norm"] = float(gg.get_total_norm(dtensors, p))
        out[f"group-{p}-total"] = float(gg.grad_norms(local, p, group=dist.group.WORLD).total)
        out[f"local-{p}-total"] = float(gg.grad_norms(local, p).total)
    # clip_grad_norm_ on DTensor parameters (FSDP2's layout) scales shards by the full norm.
    params = []
    for t in full:
        param = torch.nn.Parameter(distribute_tensor(torch.zeros_like(t), mesh, [Shard(0)]))
        param.grad = distribute_tensor(t.clone(), mesh, [Shard(0)])
        params.append(param)
    total = gg.clip_grad_norm_(params, 1.0)
    out["clip-total"] = float(total.full_tensor() if hasattr(total, "full_tensor") else total)
    # Plain lists: tensors in a queue live in shared memory that dies with this process.
    out["clip-grads"] = [p.grad.full_tensor().tolist() for p in params]  # type: ignore[union-attr]
    uneven = full_tensors(1, UNEVEN_SHAPES)
    sharded = [distribute_tensor(t, mesh, [Shard(0)]) for t in uneven]
    out["uneven-empty-shard"] = [d.to_local().numel() == 0 for d in sharded]
    for p in NORM_TYPES:
        norms = gg.grad_norms(sharded, p)
        out[f"uneven-{p}-total"] = float(norms.total)
        out[f"uneven-{p}-per"] = [float(n) for n in norms.per_tensor]
        out[f"uneven-{p}-plain"] = type(norms.total).__name__ == "Tensor"
    uneven_params = []
    for t in uneven:
        param = torch.nn.Parameter(distribute_tensor(torch.zeros_like(t), mesh, [Shard(0)]))
        param.grad = distribute_tensor(t.clone(), mesh, [Shard(0)])
        uneven_params.append(param)
    out["uneven-clip-total"] = float(gg.clip_grad_norm_(uneven_params, 1.0, math.inf))
    out["uneven-clip-grads"] = [p.grad.full_tensor().tolist() for p in uneven_params]  # type: ignore[union-attr]
    bad = [t.clone() for t in local]
    if rank == 1:
        bad[0].view(-1)[0] = math.nan  # one rank's NaN must reach every rank's flag
    out["group-nan-finite"] = bool(gg.grad_norms(bad, 2.0, group=dist.group.WORLD).finite)
    return out


def _entry(rank: int, world: int, port: int, q: Any) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world)
    )
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        q.put((rank, True, _measure(rank, world)))
    except Exception:
        q.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def launch(world: int = 2, timeout: float = 120.0) -> list[dict[str, Any]]:
    """Run :func:`_measure` on ``world`` gloo processes; results in rank order.

    Raises:
        TimeoutError: a rank did not answer in ``timeout`` seconds (every process is killed).
        RuntimeError: a rank raised; its traceback is in the message.
    """
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_entry, args=(r, world, port, q), daemon=True) for r in range(world)
    ]
    for proc in procs:
        proc.start()
    results: dict[int, dict[str, Any]] = {}
    errors: list[str] = []
    try:
        for _ in range(world):
            try:
                rank, ok, payload = q.get(timeout=timeout)
            except queue.Empty as e:  # a hung collective
                raise TimeoutError(f"a rank did not finish within {timeout:.0f}s") from e
            if ok:
                results[rank] = payload
            else:
                errors.append(f"rank {rank}:\n{payload}")
        if errors:
            raise RuntimeError("\n".join(errors))
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
    return [results[r] for r in range(world)]
