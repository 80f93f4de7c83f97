"""The gloo worker of test_repros' DDP checkpoint case: module level so ``spawn`` can pickle it.

Launched with :func:`tests._dist_scale.launch`, whose timeout turns a hung or mismatched
collective into a failure instead of a stuck suite.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from gradguard.guard.guard import Guard, GuardConfig
from gradguard.guard.response import Budgets
from tests._matrix_util import make_deferred

POSITIONS = 20
BAD = range(10, 14)  # three skips, then a rollback (the default ladder)


def _batch(position: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * position + rank)
    return torch.randn(8, 4, generator=g), torch.randn(8, 2, generator=g)


def _run(rank: int, sync: str, bad: bool, drop: set[int]) -> dict[str, Any]:
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(nn.Linear(4, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, fused=True)  # the docs' recipe: lazy
    guard = Guard(model, opt, config=GuardConfig(snapshot_every=5, budgets=Budgets(skip=3)))
    if sync == "late":
        make_deferred(guard)  # flags read one step late, as on CUDA
    actions: list[str] = []
    for _ in range(3 * POSITIONS):
        i = guard.position
        if i >= POSITIONS:
            break
        if i in drop:
            guard.drop_batch()
            continue
        x, y = _batch(i, rank)
        if bad and i in BAD:
            x[0, 0] = math.nan
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        actions.append(f"{i}:{guard.step(loss).action}")
        opt.zero_grad()
        if rank == 0 and i % 7 == 6:
            model.state_dict()  # a rank-0-only checkpoint, at positions 6 and 13
    guard.flush()
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "opt": opt.state_dict(),
        "actions": actions,
        "windows": [list(w) for w in guard.skip_list.windows],
        "position": guard.position,
    }


def rank0_checkpoints(rank: int, world: int) -> dict[str, Any]:
    """The DDP loop in the sync-free mode as the CPU runs it and as CUDA runs it (flags read a
    step late), and a reference that never saw positions 10-13."""
    out = {sync: _run(rank, sync, bad=True, drop=set()) for sync in ("lazy", "late")}
    out["reference"] = _run(rank, "lazy", bad=False, drop=set(BAD))
    dist.barrier()
    return out
