"""Shared builders for the measure/clip tests: seeded gradient sets, twins, exact comparison."""

from __future__ import annotations

import math

import torch
from hypothesis import strategies as st
from torch import Tensor, nn

NORM_TYPES = [0.5, 1.0, 2.0, 3.0, math.inf]
EXACT_DTYPES = [torch.float32, torch.float64]


def assert_exact(actual: Tensor, expected: Tensor) -> None:
    """Bit-for-bit equal (same dtype; NaN where NaN)."""
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)


@st.composite
def grad_specs(
    draw: st.DrawFn,
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float64),
    max_tensors: int = 5,
    nonfinite: bool = True,
) -> dict:
    """A recipe for a list of parameters: shapes, dtypes, values, missing grads, a poison."""
    n = draw(st.integers(1, max_tensors))
    shapes = [tuple(draw(st.lists(st.integers(0, 6), max_size=3))) for _ in range(n)]
    return {
        "shapes": shapes,
        "dtypes": [draw(st.sampled_from(dtypes)) for _ in range(n)],
        "has_grad": [draw(st.booleans()) or i == 0 for i in range(n)],
        "seed": draw(st.integers(0, 2**31 - 1)),
        "scale": draw(st.sampled_from([1e-4, 1.0, 1e4])),
        "poison": draw(st.sampled_from([None, math.nan, math.inf, -math.inf]))
        if nonfinite
        else None,
    }


def build(spec: dict) -> list[nn.Parameter]:
    """Parameters with gradients as ``spec`` says (deterministic: build twice for twins)."""
    gen = torch.Generator().manual_seed(spec["seed"])
    params = []
    for shape, dtype, has in zip(spec["shapes"], spec["dtypes"], spec["has_grad"]):
        p = nn.Parameter(torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype))
        if has:
            g = torch.randn(shape, generator=gen, dtype=torch.float64) * spec["scale"]
            p.grad = g.to(dtype)
        params.append(p)
    poison = spec["poison"]
    if poison is not None:
        targets = [p for p in params if p.grad is not None and p.grad.numel() > 0]
        if targets:
            g = targets[spec["seed"] % len(targets)].grad
            assert g is not None
            g.view(-1)[spec["seed"] % g.numel()] = poison
    return params


def grads(params: list[nn.Parameter]) -> list[Tensor | None]:
    return [None if p.grad is None else p.grad.clone() for p in params]


def assert_same_grads(params: list[nn.Parameter], expected: list[Tensor | None]) -> None:
    assert len(params) == len(expected)
    for p, e in zip(params, expected):
        if e is None:
            assert p.grad is None
        else:
            assert p.grad is not None
            assert_exact(p.grad, e)


def torch_can(spec: dict, norm_type: float) -> bool:
    """torch raises for the inf-norm of an empty gradient (gradguard gives 0): skip those."""
    empty = any(has and 0 in shape for shape, has in zip(spec["shapes"], spec["has_grad"]))
    return not (math.isinf(norm_type) and empty)
