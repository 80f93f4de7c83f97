"""Workers for the crash tests: processes that write snapshots until they are SIGKILLed.

They run under the ``forkserver`` start method with torch preloaded, so a kill-and-restart
cycle costs milliseconds, not an interpreter start. Module top level so forkserver can find them.
"""

from __future__ import annotations

import io
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradguard.core.snapshot import SnapshotStore, capture, load_snapshot, restore, save_snapshot
from gradguard.decide.policies import ZScoreClip
from gradguard.guard.guard import Guard, GuardConfig

SIZE = 192  # two 192x192 layers + AdamW state: about 0.9 MB per snapshot


def filled_run(step: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A model and optimizer whose every value encodes ``step`` (so content can be checked)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(SIZE, SIZE), nn.Linear(SIZE, SIZE))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.ones(1, SIZE)).sum().backward()
    opt.step()
    fill(model, opt, step)
    return model, opt


def fill(model: nn.Module, opt: torch.optim.Optimizer, step: int) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float(step))
        for st in opt.state.values():
            st["exp_avg"].fill_(float(step))
            st["exp_avg_sq"].fill_(float(step) * 2)


def snapshot_matches(snap: dict[str, Any]) -> bool:
    """Whether every tensor of ``snap`` holds the value its step says (no torn content)."""
    step = float(snap["step"])
    ok = all(bool((t == step).all()) for t in snap["model"].values())
    for st in snap["optimizer"]["state"].values():
        ok &= bool((st["exp_avg"] == step).all()) and bool((st["exp_avg_sq"] == 2 * step).all())
    return ok


def write_forever(directory: str, ready: Any, done: Any, started: Any, seconds: Any) -> None:
    """Push snapshots with increasing steps into ``directory`` until killed.

    Resumes after the newest readable snapshot found there. Shared RawValues (no lock a kill
    could leave held): ``done`` is the last step whose ``push`` returned, ``started`` counts
    snapshot files begun (the temp file is created), ``seconds`` is the last push's duration,
    so the parent can aim its kill inside a write.
    """
    torch.set_num_threads(1)
    real_mkstemp = tempfile.mkstemp

    def counting_mkstemp(*args: Any, **kwargs: Any) -> Any:
        started.value += 1
        return real_mkstemp(*args, **kwargs)

    tempfile.mkstemp = counting_mkstemp  # type: ignore[assignment]  # this process only
    store = SnapshotStore(directory, keep=2)
    store.scan()
    latest = store.latest()
    step = int(latest["step"]) + 1 if latest is not None else 0
    model, opt = filled_run(step)
    ready.set()
    while True:
        fill(model, opt, step)
        t0 = time.perf_counter()
        store.push(capture(model, opt, step=step, position=step))
        seconds.value = time.perf_counter() - t0
        done.value = step
        step += 1


# --- resume-from-disk trajectory ----------------------------------------------------------------

STEPS = 16


def _train_objects() -> tuple[nn.Module, torch.optim.Optimizer, Any, Guard]:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Dropout(0.1), nn.Linear(32, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
    guard = Guard(model, opt, sched, config=GuardConfig(policy=ZScoreClip(warmup=3)))
    return model, opt, sched, guard


def _batch(pos: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + pos)
    x = torch.randn(16, 6, generator=g)
    return x, (x[:, :1] * x[:, 1:2]).tanh()


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, guard: Guard, pos: int) -> None:
    x, y = _batch(pos)
    # Dropout draws from torch's global RNG: resuming must restore it to stay on trajectory.
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    guard.step(loss)
    opt.zero_grad(set_to_none=True)


def checkpoint_path(directory: str, step: int) -> Path:
    return Path(directory) / f"ckpt-{step:06d}.pt"


def train_with_checkpoints(directory: str, ready: Any, done: Any, slow: float) -> None:
    """Train ``STEPS`` steps, writing a full checkpoint (guard state included) after each one,
    until killed. ``slow`` seconds of sleep per step spread the kill over the run."""
    torch.set_num_threads(1)
    model, opt, sched, guard = _train_objects()
    ready.set()
    for pos in range(STEPS):
        _train_step(model, opt, guard, pos)
        snap = capture(model, opt, sched, step=pos + 1, position=pos + 1, guard=guard.state_dict())
        save_snapshot(checkpoint_path(directory, pos + 1), snap)
        done.value = pos + 1
        time.sleep(slow)


def resume_and_finish(directory: str) -> bytes:
    """Load the newest readable checkpoint in ``directory`` and train to ``STEPS``; final params."""
    torch.set_num_threads(1)
    model, opt, sched, guard = _train_objects()
    start = 0
    for path in sorted(Path(directory).glob("ckpt-*.pt"), reverse=True):
        snap = load_snapshot(path)
        restore(snap, model, opt, sched)
        guard.load_state_dict(snap["guard"])
        start = int(snap["position"])
        break
    for pos in range(start, STEPS):
        _train_step(model, opt, guard, pos)
    buf = io.BytesIO()
    torch.save({"params": [p.detach() for p in model.parameters()], "start": start}, buf)
    return buf.getvalue()


def uninterrupted() -> bytes:
    torch.set_num_threads(1)
    model, opt, _, guard = _train_objects()
    for pos in range(STEPS):
        _train_step(model, opt, guard, pos)
    buf = io.BytesIO()
    torch.save({"params": [p.detach() for p in model.parameters()], "start": 0}, buf)
    return buf.getvalue()


def call_into(q: Any, fn_name: str, *args: Any) -> None:
    """Run ``fn_name(*args)`` and put its bytes (or the error) on ``q``."""
    try:
        q.put(("ok", globals()[fn_name](*args)))
    except BaseException as e:  # reported by the parent
        q.put(("error", f"{type(e).__name__}: {e}"))


def temp_files(directory: str) -> list[str]:
    return sorted(n for n in os.listdir(directory) if ".tmp-" in n)
