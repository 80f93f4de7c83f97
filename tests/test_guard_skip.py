"""Skip means skip: a guarded run with NaN/inf gradients injected at random steps ends bit for bit
where a run that never saw those batches ends (parameters, optimizer state, LR scheduler)."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn

from gradguard.guard.guard import Guard, GuardConfig
from gradguard.guard.response import Budgets

N_STEPS = 24


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _data(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(6, 4, generator=g), torch.randn(6, 2, generator=g)) for _ in range(n)]


OPTIMIZERS: dict[str, Any] = {
    "adam": lambda p: torch.optim.Adam(p, lr=0.02, weight_decay=0.01),
    "adam-fused": lambda p: torch.optim.Adam(p, lr=0.02, weight_decay=0.01, fused=True),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.02, weight_decay=0.1),
    "adamw-fused": lambda p: torch.optim.AdamW(p, lr=0.02, weight_decay=0.1, fused=True),
    "adamw-foreach": lambda p: torch.optim.AdamW(p, lr=0.02, weight_decay=0.1, foreach=True),
    "sgd-momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=0.01),
    "sgd-fused": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, fused=True),
}


def _run(
    opt_name: str, poison: dict[int, float], drop: set[int], config: GuardConfig | None = None
) -> tuple[nn.Module, torch.optim.Optimizer, Any, Guard]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 2))
    opt = OPTIMIZERS[opt_name](model.parameters())
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.7)
    guard = Guard(model, opt, sched, config=config)
    for i, (x, y) in enumerate(_data(N_STEPS)):
        if i in drop:
            continue
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        if i in poison:
            # One poisoned entry: torch's clip would spread it over every gradient.
            grad = model[2].weight.grad
            assert grad is not None
            grad[0, 1] = poison[i]
        guard.step(loss)
        opt.zero_grad(set_to_none=True)
    guard.flush()
    return model, opt, sched, guard


def _assert_bitwise(a: Any, b: Any, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert a.dtype == b.dtype and a.shape == b.shape, where
        # Bytes, not values: NaN == NaN here, and -0.0 != 0.0.
        bytes_a = a.detach().contiguous().reshape(-1).view(torch.uint8)
        bytes_b = b.detach().contiguous().reshape(-1).view(torch.uint8)
        assert torch.equal(bytes_a, bytes_b), f"{where} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_bitwise(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_bitwise(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), f"{where}: {a!r} != {b!r}"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_injected_nonfinite_gradients_leave_no_trace(opt_name: str) -> None:
    rng = random.Random(opt_name)
    steps = sorted(rng.sample(range(2, N_STEPS), 5))
    poison = {s: rng.choice([math.nan, math.inf, -math.inf]) for s in steps}
    config = GuardConfig(budgets=Budgets(skip=10))
    m1, o1, s1, g1 = _run(opt_name, poison, set(), config)
    m2, o2, s2, g2 = _run(opt_name, {}, set(poison), GuardConfig(budgets=Budgets(skip=10)))
    _assert_bitwise(m1.state_dict(), m2.state_dict(), "model")
    _assert_bitwise(o1.state_dict(), o2.state_dict(), "optimizer")
    _assert_bitwise(s1.state_dict(), s2.state_dict(), "scheduler")
    assert s1.last_epoch == N_STEPS - len(poison)
    _assert_bitwise(g1.policy.state_dict(), g2.policy.state_dict(), "policy")
    actions = [r["action"] for r in g1.records if r["kind"] == "step"]
    assert [i for i, a in enumerate(actions) if a == "skip"] == steps
    assert g1.counters.skips == len(poison)
    events = [r for r in g1.records if r["kind"] == "action"]
    assert [e["step"] for e in events] == steps
    assert all(e["signal"] == "nonfinite" and e["reason"] for e in events)
    # The run did train: the reference moved away from its initialization.
    torch.manual_seed(0)
    init = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 2))
    assert not torch.equal(init[0].weight, m2[0].weight)


def test_fused_optimizers_skip_on_the_device() -> None:
    _, opt, _, guard = _run("adamw-fused", {3: math.nan}, set())
    assert guard.lazy
    assert not hasattr(opt, "found_inf")  # handed over for the step only


def test_zeroing_is_not_skipping() -> None:
    """The difference the guard exists for: Adam with zeroed gradients still moves."""
    torch.manual_seed(0)
    p = nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=0.1, weight_decay=0.1)
    p.grad = torch.ones(3)
    opt.step()
    before = p.detach().clone()
    p.grad = torch.zeros(3)
    opt.step()
    assert not torch.equal(before, p.detach())
