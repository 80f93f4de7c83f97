"""Distributed test workers (gloo, CPU) and a launcher that turns a hang into a failure.

Workers live at module top level so the ``spawn`` start method can pickle them. Each worker
returns a dict of tensors (and plain values); it travels back to the parent as ``torch.save``
bytes, and the parent loads it with ``weights_only=True``.
"""

from __future__ import annotations

import io
import math
import os
import queue
import random
import socket
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import gradguard

Result = dict[str, Any]
IN, HIDDEN, OUT = 6, 12, 3
PER_RANK = 4  # samples per rank per step


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(
    fn: Callable[..., Result], rank: int, world: int, port: int, q: Any, args: tuple[Any, ...]
) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
        out = fn(rank, world, *args)
        buf = io.BytesIO()
        torch.save(out, buf)
        q.put((rank, True, buf.getvalue()))
    except BaseException:  # the parent reports it; a dead worker must not look like a hang
        q.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def launch(
    fn: Callable[..., Result], world: int, *args: Any, timeout: float = 90.0
) -> list[Result]:
    """Run ``fn(rank, world, *args)`` on ``world`` gloo processes; results in rank order.

    Raises:
        TimeoutError: some rank did not finish within ``timeout`` seconds (a hung collective);
            every process is killed first.
        RuntimeError: a rank raised; its traceback is in the message.
    """
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_entry, args=(fn, r, world, port, q, args), daemon=True)
        for r in range(world)
    ]
    for p in procs:
        p.start()
    results: dict[int, Result] = {}
    errors: list[str] = []
    deadline = time.monotonic() + timeout
    try:
        while len(results) + len(errors) < world:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(
                    f"{fn.__name__} on {world} ranks: only {sorted(results)} finished within "
                    f"{timeout:.0f}s (a collective hung?)"
                )
            try:
                rank, ok, payload = q.get(timeout=min(left, 1.0))
            except queue.Empty:
                if any(p.exitcode not in (None, 0) for p in procs) and q.empty():
                    dead = [(i, p.exitcode) for i, p in enumerate(procs) if p.exitcode]
                    raise RuntimeError(f"{fn.__name__}: rank(s) died: {dead}") from None
                continue
            if ok:
                results[rank] = torch.load(io.BytesIO(payload), weights_only=True)
            else:
                errors.append(f"rank {rank}:\n{payload}")
        if errors:
            raise RuntimeError("\n".join(errors))
    finally:
        for p in procs:
            p.join(timeout=max(0.1, deadline - time.monotonic()))
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    return [results[r] for r in range(world)]


# --- models and data shared by workers and single-process references ----------------------


def make_model(seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, OUT)).to(dtype)


def batch(step: int, rank: int, world: int, dtype: torch.dtype = torch.float64) -> tuple[Any, Any]:
    """Rank ``rank``'s share of global step ``step``: rows ``rank*PER_RANK..`` of the batch."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(world * PER_RANK, IN, generator=g, dtype=dtype) * 3
    y = torch.randn(world * PER_RANK, OUT, generator=g, dtype=dtype)
    sl = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    return x[sl], y[sl]


def full_batch(step: int, world: int, dtype: torch.dtype = torch.float64) -> tuple[Any, Any]:
    xs, ys = zip(*(batch(step, r, world, dtype) for r in range(world)))
    return torch.cat(xs), torch.cat(ys)


def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(model(x), y)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if type(t).__name__ == "DTensor" else t  # type: ignore[attr-defined]


def _wrap(model: nn.Module, kind: str, world: int) -> nn.Module:
    if kind == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    if kind == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for layer in model.children():
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    raise ValueError(kind)


# --- workers --------------------------------------------------------------------------------


def _norms_and_clip(rank: int, world: int, kind: str, max_norm: float, p: float) -> Result:
    """One backward on this rank's share; measure with gradguard, then clip."""
    model = _wrap(make_model(), kind, world)
    x, y = batch(0, rank, world)
    loss_fn(model, x, y).backward()
    grads = [q.grad for q in model.parameters() if q.grad is not None]
    n = gradguard.grad_norms(grads, p)
    total_returned = gradguard.clip_grad_norm_(model.parameters(), max_norm, p)
    return {
        "total": _local(n.total).detach().clone(),
        "per_tensor": [_local(t).detach().clone() for t in n.per_tensor],
        "returned": _local(total_returned).detach().clone(),
        "clipped": [
            _local(q.grad).detach().clone() for q in model.parameters() if q.grad is not None
        ],
        "grad_type": type(grads[0]).__name__,
    }


def _sharded_group_norm(rank: int, world: int, p: float) -> torch.Tensor:
    """Each rank holds a slice of one flat gradient as a plain tensor: ``group=`` reduces it."""
    g = torch.Generator().manual_seed(7)
    flat = torch.randn(world * 5, generator=g, dtype=torch.float64)
    mine = flat[rank * 5 : (rank + 1) * 5].clone()
    return gradguard.grad_norms([mine], p, group=dist.group.WORLD).total


def parity(rank: int, world: int, cases: list[tuple[str, float]], max_norm: float) -> Result:
    """All parity measurements of one world size in one launch (process start-up is the cost).

    ``cases``: (``"ddp"`` | ``"fsdp"`` | ``"group"``, norm type).
    """
    out: Result = {}
    for kind, p in cases:
        key = f"{kind}-{p}"
        try:
            if kind == "group":
                out[key] = {"total": _sharded_group_norm(rank, world, p)}
            else:
                out[key] = _norms_and_clip(rank, world, kind, max_norm, p)
        except Exception as e:
            out[key] = {"error": f"{type(e).__name__}: {e}"}
            # The other ranks may be stuck in (or broken by) the failed collective: stop here.
            break
    return out


def _poison_grad(model: nn.Module) -> None:
    """Put a NaN into this rank's (local shard of the) first gradient, after DDP's all-reduce."""
    for q in model.parameters():
        g = q.grad
        if g is None:
            continue
        local = g.to_local() if type(g).__name__ == "DTensor" else g  # type: ignore[attr-defined]
        if local.numel():
            local.view(-1)[0] = float("nan")
            return


def _full_params(model: nn.Module) -> list[torch.Tensor]:
    return [_local(q).detach().clone() for q in model.parameters()]


def _guarded_run(
    rank: int,
    world: int,
    kind: str,
    steps: int,
    bad: dict[int, tuple[int, str]],
    rollback: bool,
    snapshot_dir: str | None = None,
) -> Result:
    """A guarded AdamW run; ``bad[position] = (rank, "loss" | "grad")`` poisons one rank.

    A NaN *loss* is added as a constant (gradients stay finite, so DDP's all-reduce cannot
    spread it); a NaN *gradient* is written after the all-reduce. Either way only the guard's
    agreement can make the other ranks skip.
    """
    from gradguard.guard.guard import Guard, GuardConfig

    model = _wrap(make_model(), kind, world)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    cfg = (
        GuardConfig(
            snapshot_every=2, responses={"nonfinite": ("rollback",)}, snapshot_dir=snapshot_dir
        )
        if rollback
        else GuardConfig(responses={"nonfinite": ("skip",)})
    )
    guard = Guard(model, opt, config=cfg, process_group=dist.group.WORLD)
    log: dict[str, list[Any]] = {k: [] for k in ("position", "action", "step", "params")}
    for _ in range(steps):
        pos = guard.position
        x, y = batch(pos, rank, world)
        loss = loss_fn(model, x, y)
        loss.backward()
        who, what = bad.get(pos, (-1, ""))
        if rank == who:
            tally("dist_fault", kind, what, world)
        if rank == who and what == "loss":
            loss = loss.detach() + float("nan")
        elif rank == who and what == "grad":
            _poison_grad(model)
        report = guard.step(loss)
        opt.zero_grad(set_to_none=True)
        log["position"].append(pos)
        log["action"].append(report.action)
        log["step"].append(guard.step_count)
        log["params"].append(_full_params(model))
    return {
        **log,
        "opt_steps": _opt_steps(opt),
        "finite": all(bool(torch.isfinite(t).all()) for t in log["params"][-1]),
    }


def guard_scenarios(
    rank: int, world: int, kinds: list[str], disk: str, only: set[str] | None = None
) -> Result:
    """Skip on a NaN loss / NaN gradient on one rank, and a rollback (snapshots in memory, and
    on disk in one directory shared by all ranks, as a user would configure it), per wrapper."""
    out: Result = {}
    for kind in kinds:
        rng = random.Random(f"gradguard-{world}-{kind}")
        for name, bad, rollback, steps, snapdir in (
            # Random steps and ranks, seeded alike on every rank (string seeds are stable).
            ("skip-loss", {rng.randint(1, 3): (rng.randrange(world), "loss")}, False, 4, None),
            ("skip-grad", {rng.randint(1, 3): (rng.randrange(world), "grad")}, False, 4, None),
            ("rollback", {5: (rng.randrange(world), "grad")}, True, 8, None),
            ("rollback-disk", {5: (rng.randrange(world), "grad")}, True, 8, f"{disk}/{kind}"),
        ):
            key = f"{kind}-{name}"
            if only is not None and key not in only:
                continue
            try:
                out[key] = _guarded_run(rank, world, kind, steps, bad, rollback, snapdir)
                ((pos, (who, _)),) = bad.items()
                out[key]["bad"] = [pos, who]
            except Exception as e:
                out[key] = {"error": f"{type(e).__name__}: {e}"}
                return out
    return out


def everything(
    rank: int,
    world: int,
    cases: list[tuple[str, float]],
    max_norm: float,
    kinds: list[str],
    disk: str,
) -> Result:
    """:func:`parity` and :func:`guard_scenarios` in one launch (start-up is the cost)."""
    # A case that fails may break the group for every later case: the ones known to fail in
    # this version (FSDP2 disk snapshots, FSDP2 inf-norm with an empty shard) go last.
    late = {"fsdp-rollback-disk"}
    out: Result = {}
    steps = [
        lambda: guard_scenarios(
            rank,
            world,
            kinds,
            disk,
            {
                f"{k}-{n}"
                for k in kinds
                for n in ("skip-loss", "skip-grad", "rollback", "rollback-disk")
            }
            - late,
        ),
        lambda: parity(rank, world, [c for c in cases if c != ("fsdp", math.inf)], max_norm),
        lambda: guard_scenarios(rank, world, kinds, disk, late),
        lambda: parity(rank, world, [c for c in cases if c == ("fsdp", math.inf)], max_norm),
    ]
    for i, part in enumerate(steps):
        out.update(part())
        # The disk-snapshot failure is raised alike on every rank before any collective, so
        # the group survives it; any other failure stops the launch.
        if i != 2 and any("error" in v for v in out.values()):
            break
    return out


def _opt_steps(opt: torch.optim.Optimizer) -> list[float]:
    out = []
    for st in opt.state.values():
        s = st.get("step")
        if s is not None:
            out.append(float(_local(s)) if isinstance(s, torch.Tensor) else float(s))
    return out


def hang_one_rank(rank: int, world: int) -> Result:
    """Rank 0 waits in a collective that rank 1 never joins (the launcher must time out)."""
    if rank == 0:
        dist.barrier()
    else:
        time.sleep(60)
    return {}


# --- cost of the guard's agreement (docs/distributed.md, scripts/reliability.py) -------------


def agreement_cost(rank: int, world: int, kind: str, iters: int) -> Result:
    """Bytes and seconds the guard adds per step on gloo: its flag all-reduce (and, under
    FSDP2, the norm's full_tensor() reduction), measured by counting and timing."""
    from torch.distributed.tensor.debug import CommDebugMode

    from gradguard.core import distributed as _distributed
    from gradguard.guard.guard import Guard, GuardConfig

    model = _wrap(make_model(dtype=torch.float32), kind, world)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    guard = Guard(model, opt, config=GuardConfig(), process_group=dist.group.WORLD)
    sent: list[int] = []
    real = _distributed.dist.all_reduce

    def counting(t: torch.Tensor, *a: Any, **k: Any) -> Any:
        sent.append(t.numel() * t.element_size())
        return real(t, *a, **k)

    def one_step(pos: int) -> None:
        x, y = batch(pos, rank, world, torch.float32)
        loss = loss_fn(model, x, y)
        loss.backward()
        guard.step(loss)
        opt.zero_grad(set_to_none=True)

    for pos in range(5):
        one_step(pos)
    _distributed.dist.all_reduce = counting  # type: ignore[assignment]
    try:
        with CommDebugMode() as comm:
            one_step(5)
    finally:
        _distributed.dist.all_reduce = real  # type: ignore[assignment]
    dtensor_collectives = int(comm.get_total_counts())
    flags = torch.zeros(len(guard.keys))
    for _ in range(20):
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(iters):
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    flag_s = (time.perf_counter() - t0) / iters
    dist.barrier()
    t0 = time.perf_counter()
    for pos in range(iters):
        one_step(6 + pos)
    step_s = (time.perf_counter() - t0) / iters
    return {
        "flag_bytes": sum(sent),
        "flag_calls": len(sent),
        "dtensor_collectives": dtensor_collectives,
        "flag_allreduce_s": flag_s,
        "guarded_step_s": step_s,
    }


def tally(name: str, *values: Any) -> None:
    """Append a count to the file named by GRADGUARD_RELIABILITY_OUT (scripts/reliability.py
    sums them into docs/reliability.md); a no-op otherwise."""
    out = os.environ.get("GRADGUARD_RELIABILITY_OUT")
    if out:
        with open(out, "a", encoding="utf-8") as f:
            f.write(" ".join(str(v) for v in (name, *values)) + "\n")
