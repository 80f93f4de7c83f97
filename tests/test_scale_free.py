"""The defaults have no unit: a loss in other units gives the same steps, bit for bit.

A user whose loss is summed instead of averaged, whose model is wide, or who multiplies the loss
by a constant, trains the same problem with gradients c times larger. Nothing in
``Guard(model, optimizer)`` may then act differently: multiplying the loss by c (a power of two,
so every product is exact in floating point) and dividing SGD's learning rate by c must give the
same action at every step and, for SGD, the same weights, bit for bit. Adam's step ignores the
gradient's scale up to its ``eps`` (a constant in gradient units): with the same learning rate
the actions match, and with ``eps`` scaled by c the weights match too.

Each run passes through every kind of step the defaults take: plain steps, a skipped corrupt
batch, a skipped NaN batch, then clips and back-offs once the learning rate is raised mid-run
(tenfold for SGD, a hundredfold for Adam).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gradguard import Guard
from gradguard.core.clip import clip_coefficient, ratio_coefficient
from gradguard.core.norms import grad_norms
from gradguard.decide.detect import DivergenceDetector, RatioSpikeDetector, Signals
from gradguard.decide.policies import MedianClip

SCALES = (2.0**-10, 1.0, 2.0**10)
STEPS = 60
CORRUPT, NAN_AT, HOT = 12, 25, 40  # a corrupt batch, a NaN batch, the LR raised from here
RAISE = {"sgd": 10.0, "adam": 100.0, "adamw": 100.0}


def _run(optimizer: str, c: float, *, scaled_eps: bool = False):
    """The guarded run with the loss times ``c``: (actions, weights after every step)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
    params = list(model.parameters())
    if optimizer == "sgd":
        base = 0.1
        opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=base / c, momentum=0.9)
    else:
        base = 1e-2
        cls = torch.optim.Adam if optimizer == "adam" else torch.optim.AdamW
        opt = cls(params, lr=base, eps=1e-8 * c if scaled_eps else 1e-8)
    guard = Guard(model, opt)
    g = torch.Generator().manual_seed(1)
    w = torch.randn(8, 1, generator=g)
    actions, weights = [], []
    for i in range(STEPS):
        if i == HOT:
            for group in opt.param_groups:
                group["lr"] = group["lr"] * RAISE[optimizer]
        x = torch.randn(16, 8, generator=g)
        y = torch.sin(x @ w)
        if i == CORRUPT:
            y = y * 1e3
        if i == NAN_AT:
            x[0, 0] = math.nan
        loss = nn.functional.mse_loss(model(x), y) * c
        loss.backward()
        actions.append(guard.step(loss).action)
        opt.zero_grad(set_to_none=True)
        weights.append([p.detach().clone() for p in params])
    return actions, weights


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_a_loss_in_other_units_takes_the_same_steps(optimizer: str) -> None:
    # SGD with lr / c; Adam and AdamW with eps * c (their only constant in gradient units):
    # the same actions and the same weights after every step, bit for bit.
    runs = {c: _run(optimizer, c, scaled_eps=True) for c in SCALES}
    actions, weights = runs[1.0]
    assert {"step", "clip", "skip", "backoff"} <= set(actions), actions  # every response
    assert actions[CORRUPT] == "skip" and actions[NAN_AT] == "skip"
    for c, (got_actions, got_weights) in runs.items():
        assert got_actions == actions, (c, _diff(got_actions, actions))
        for step, (got, want) in enumerate(zip(got_weights, weights)):
            assert all(torch.equal(a, b) for a, b in zip(got, want)), (c, step)


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_adam_with_its_own_eps_takes_the_same_actions_in_other_units(optimizer: str) -> None:
    # eps = 1e-8 whatever the units: the weights differ in their last bits from the first step
    # (eps is 2**10 times larger against gradients 2**10 times smaller), the decisions do not.
    actions, _ = _run(optimizer, 1.0)
    assert {"step", "clip", "skip", "backoff"} <= set(actions), actions
    for c in (SCALES[0], SCALES[2]):
        got, _ = _run(optimizer, c)
        assert got == actions, (c, _diff(got, actions))


def _diff(a: list[str], b: list[str]) -> list[tuple[int, str, str]]:
    return [(i, x, y) for i, (x, y) in enumerate(zip(a, b)) if x != y]


def _norms(values: list[float], c: float):
    grads = [torch.tensor([v * c]) for v in values]
    return grads, grad_norms(grads)


def test_the_default_policy_and_detectors_are_exactly_equivariant() -> None:
    """The pieces alone, on a hand-made sequence with an explosion, a zero norm and a NaN."""
    norms = [1.0, 3.0, 0.7, 1e6, 0.0, 1.2, math.nan, 40.0, 1.1, 0.9]
    losses = [2.0, 2.1, 1.9, 50.0, 1.8, 30.0, math.nan, 35.0, 1.7, 1.6]
    runs = []
    for c in SCALES:
        policy, spike, div = MedianClip(), RatioSpikeDetector(), DivergenceDetector(warmup=2)
        out = []
        for v, loss in zip(norms, losses):
            grads, n = _norms([v], c)
            clipped = policy.clip_(grads, n)
            s = Signals(0, n.total, n.per_tensor, ["w"], n.finite, torch.tensor(loss * c))
            flags = [spike.check(s), div.check(s)]
            ok = n.finite & ~flags[0].flag & ~flags[1].flag
            policy.update(n, clipped.learn, ok)
            spike.update(s, ok)
            div.update(s, ok)
            out.append(
                (
                    grads[0] / c,
                    clipped.threshold / c,
                    [(f.flag, f.score) for f in flags],
                )
            )
        runs.append(out)
    for other in runs:
        for (g, t, f), (g0, t0, f0) in zip(other, runs[1]):
            assert torch.equal(g, g0) or (g.isnan().all() and g0.isnan().all())
            assert torch.equal(t, t0)
            assert all(torch.equal(a, b) for pair, pair0 in zip(f, f0) for a, b in zip(pair, pair0))


def test_ratio_coefficient_is_exact_where_torchs_is_not() -> None:
    total, limit = torch.tensor(3.0e-3), torch.tensor(1.0e-3)
    for c in SCALES:
        assert torch.equal(ratio_coefficient(limit * c, total * c), ratio_coefficient(limit, total))
    # torch's min(max_norm / (norm + 1e-6), 1) moves with the units: 1e-6 is a gradient norm.
    small = clip_coefficient(limit * SCALES[0], total * SCALES[0], "skip")
    assert not torch.equal(small, clip_coefficient(limit, total, "skip"))
