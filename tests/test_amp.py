"""The guard under torch.amp in a plain loop: fp16 + GradScaler and bf16 autocast, on the CPU."""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from gradguard.guard.guard import Guard


@pytest.fixture(autouse=True)
def one_thread() -> Any:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def setup(scaler: torch.amp.GradScaler | None = None) -> tuple[torch.nn.Module, Any, Any, Guard]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.99)
    return model, opt, sched, Guard(model, opt, scheduler=sched, scaler=scaler)


def batch(step: int, poison: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    x = torch.randn(16, 8, generator=g)
    y = x[:, :1] * 2.0 + 0.1 * torch.randn(16, 1, generator=g)
    if poison:
        x[0, 0] = float("nan")
    return x, y


def state(model: torch.nn.Module, opt: Any, sched: Any) -> Any:
    return copy.deepcopy((model.state_dict(), opt.state_dict(), sched.state_dict()))


def same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return bool(a == b)


def fp16_step(model: Any, scaler: Any, guard: Guard, step: int, poison: bool = False) -> Any:
    x, y = batch(step, poison)
    with torch.autocast("cpu", dtype=torch.float16):
        loss = torch.nn.functional.mse_loss(model(x), y)
    scaler.scale(loss).backward()
    return loss


def test_fp16_measures_unscaled_gradients() -> None:
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    model, _, _, guard = setup(scaler)
    fp16_step(model, scaler, guard, 0)
    scale = scaler.get_scale()
    expected = torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(p.grad.double() / scale) for p in model.parameters()])
    )
    report = guard.step()
    assert report.action in ("step", "clip")
    assert report.total_norm.item() == pytest.approx(expected.item(), rel=1e-6)
    assert report.total_norm.item() < 100  # a scaled norm would be ~1024x larger


def test_fp16_loss_scale_overflow_is_not_a_spike() -> None:
    # 2**20 makes the fp16 backward overflow for the first few steps, as AMP runs do at start
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**20)
    model, opt, sched, guard = setup(scaler)
    actions, losses = [], []
    for step in range(40):
        loss = fp16_step(model, scaler, guard, step)
        report = guard.step(loss)
        actions.append((report.action, report.signal))
        losses.append(loss.item())
        opt.zero_grad(set_to_none=True)
    overflow = [i for i, a in enumerate(actions) if a == ("skip", "amp_overflow")]
    assert len(overflow) >= 2 and overflow[0] == 0
    assert guard.counters.amp_skips == len(overflow)
    assert guard.counters.skips == 0  # no budget spent, no incident
    assert all(r["kind"] != "action" for r in guard.records)  # nothing reported as a spike
    assert scaler.get_scale() < 2.0**20
    # the scheduler advanced only on applied steps
    assert sched.last_epoch == 40 - len(overflow)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert sum(losses[-5:]) < sum(losses[len(overflow) : len(overflow) + 5])


def test_fp16_nan_batch_is_an_incident_and_changes_nothing() -> None:
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    model, opt, sched, guard = setup(scaler)
    for step in range(6):
        poison = step == 4
        before = state(model, opt, sched) if poison else None
        loss = fp16_step(model, scaler, guard, step, poison)
        report = guard.step(loss)
        opt.zero_grad(set_to_none=True)
        if poison:
            assert report.action == "skip" and report.signal == "nonfinite"
            assert same(before, state(model, opt, sched))
    assert guard.counters.skips == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_bf16_autocast_nan_batch_is_skipped() -> None:
    model, opt, sched, guard = setup()
    for step in range(8):
        poison = step == 5
        before = state(model, opt, sched)
        x, y = batch(step, poison)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        assert out.dtype == torch.bfloat16
        loss = torch.nn.functional.mse_loss(out.float(), y)
        loss.backward()
        report = guard.step(loss)
        opt.zero_grad(set_to_none=True)
        assert report.total_norm.dtype == torch.float32
        assert report.skipped == poison
        assert same(before, state(model, opt, sched)) == poison
    assert guard.counters.skips == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


def _code_block(doc: str, name: str) -> str:
    text = (Path(__file__).parent.parent / "docs" / doc).read_text(encoding="utf-8")
    m = re.search(rf"<!-- example: {name} -->\s*```python\n(.*?)```", text, re.S)
    assert m, f"no example {name!r} in docs/{doc}"
    return m.group(1)


@pytest.mark.parametrize("name", ["fp16", "bf16"])
def test_docs_recipe_runs(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    scope: dict[str, Any] = {"__name__": "__docs__"}
    exec(compile(_code_block("amp.md", name), "amp.md", "exec"), scope)
    guard = scope["guard"]
    assert guard.counters.skips == 1  # the poisoned batch
    assert all(torch.isfinite(p).all() for p in scope["model"].parameters())
    assert math.isfinite(scope["loss"].item())
    assert "skipped" in capsys.readouterr().out
