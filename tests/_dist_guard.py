"""Distributed guard workers (gloo, CPU): every rank must reach the same decision.

Module-level functions so the ``spawn`` start method can pickle them; launched with
:func:`tests._dist_scale.launch` (timeouts turn a hung collective into a failure).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from gradguard.decide.policies import FixedThreshold
from gradguard.guard.guard import Guard, GuardConfig
from tests._dist_scale import _wrap, batch, loss_fn, make_model


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if type(t).__name__ == "DTensor" else t  # type: ignore[attr-defined]


def _poison_local_grad(model: nn.Module) -> None:
    # After backward, so DDP has already averaged: only this rank's gradient is NaN.
    for q in model.parameters():
        g = q.grad
        if g is None:
            continue
        local = g.to_local() if type(g).__name__ == "DTensor" else g  # type: ignore[attr-defined]
        if local.numel():
            local.view(-1)[0] = math.nan
            return


def _run(rank: int, world: int, kind: str, rollback: bool) -> dict[str, Any]:
    model = _wrap(make_model(), kind, world)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    responses = {"nonfinite": ("rollback", "abort")} if rollback else {}
    cfg = GuardConfig(
        policy=FixedThreshold(1.0), detectors=[], responses=responses, snapshot_every=2
    )
    guard = Guard(model, opt, config=cfg)
    actions = []
    while guard.position < 8:
        pos = guard.position
        x, y = batch(pos, rank, world)
        loss = loss_fn(model, x, y)
        loss.backward()
        if pos == 3 and rank == 1:
            _poison_local_grad(model)  # a NaN gradient on one rank only
        if pos == 5 and rank == 0:
            loss = loss * math.nan  # a NaN loss on the other rank only
        actions.append(f"{pos}:{guard.step(loss).action}")
        opt.zero_grad()
    return {
        "actions": actions,
        "params": [_local(p).detach().clone() for p in model.parameters()],
        "skips": [list(w) for w in guard.skip_list.windows],
    }


def guard_agreement(rank: int, world: int) -> dict[str, Any]:
    """DDP and FSDP2 runs with one-rank NaNs, skipping and rolling back."""
    return {
        f"{kind}-{'rollback' if rb else 'skip'}": _run(rank, world, kind, rb)
        for kind in ("ddp", "fsdp")
        for rb in (False, True)
    }
