"""ContiguousGrads: views that survive backward, re-attach, and clip like the per-tensor path."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import gradguard as gg
from tests._grads import assert_exact


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3), nn.LayerNorm(3))


def _backward(model: nn.Module, seed: int = 1, scale: float = 1.0) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 5, generator=gen)
    (model(x).pow(2).sum() * scale).backward()


def test_grads_are_views_that_survive_backward():
    model, twin = _model(), _model()
    grads = gg.ContiguousGrads(model.parameters())
    assert grads.is_attached()
    assert len(grads.buffers) == 1
    (flat,) = grads.buffers.values()
    assert flat.numel() == sum(p.numel() for p in model.parameters())
    for _ in range(2):  # accumulation across two backward passes stays in the buffer
        _backward(model)
        _backward(twin)
    assert grads.is_attached()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert p.grad is not None and q.grad is not None
        assert p.grad.data_ptr() >= flat.data_ptr()
        assert_exact(p.grad, q.grad)
    assert_exact(grads.flat()[0], torch.cat([q.grad.reshape(-1) for q in twin.parameters()]))


def test_clip_over_the_buffer_equals_the_per_tensor_result():
    model, twin = _model(), _model()
    grads = gg.ContiguousGrads(model.parameters())
    _backward(model, scale=10.0)
    _backward(twin, scale=10.0)
    for p in (1.0, 2.0, math.inf):
        total = gg.clip_grad_norm_(grads, 0.5, p)
        expected = nn.utils.clip_grad_norm_(twin.parameters(), 0.5, p)
        torch.testing.assert_close(total, expected, rtol=1e-6, atol=0)
        for a, b in zip(model.parameters(), twin.parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-8)


def test_reattaches_after_set_to_none_and_replaced_grads():
    model, twin = _model(), _model()
    grads = gg.ContiguousGrads(model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _backward(model)
    opt.zero_grad(set_to_none=True)  # the usual default breaks the views
    assert not grads.is_attached()
    _backward(model, seed=2)
    _backward(twin, seed=2)
    total = gg.clip_grad_norm_(grads, 1e9)  # re-attaches, copying the new grads in
    assert grads.is_attached()
    expected = nn.utils.get_total_norm([p.grad for p in twin.parameters()])
    torch.testing.assert_close(total, expected, rtol=1e-6, atol=0)
    first = next(model.parameters())
    first.grad = torch.full_like(first, 2.0)  # replaced by hand
    grads.attach()
    assert_exact(first.grad, torch.full_like(first, 2.0))
    assert grads.is_attached()
    grads.zero_grad()
    assert grads.is_attached()
    assert all((b == 0).all() for b in grads.buffers.values())


def test_training_with_the_buffer_follows_the_plain_trajectory():
    model, twin = _model(), _model()
    grads = gg.ContiguousGrads(model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    opt2 = torch.optim.AdamW(twin.parameters(), lr=0.05)
    for step in range(3):
        _backward(model, seed=step, scale=5.0)
        _backward(twin, seed=step, scale=5.0)
        gg.clip_grad_norm_(grads, 1.0)
        nn.utils.clip_grad_norm_(twin.parameters(), 1.0)
        opt.step()
        opt2.step()
        grads.zero_grad()
        opt2.zero_grad()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["skip", "zero", "error"])
def test_guarded_modes_on_the_buffer(mode):
    model = _model()
    grads = gg.ContiguousGrads(model.parameters())
    _backward(model)
    next(model.parameters()).grad.view(-1)[0] = math.nan  # type: ignore[union-attr]
    before = [b.clone() for b in grads.buffers.values()]
    if mode == "error":
        with pytest.raises(RuntimeError, match="non-finite"):
            gg.clip_grad_norm_(grads, 1.0, nonfinite="error")
        for b, b0 in zip(grads.buffers.values(), before):
            assert_exact(b, b0)
        return
    total = gg.clip_grad_norm_(grads, 1.0, nonfinite=mode)
    assert total.isnan()
    for b, b0 in zip(grads.buffers.values(), before):
        assert_exact(b, b0 if mode == "skip" else torch.zeros_like(b0))


def test_mixed_dtypes_get_one_buffer_each_and_a_joint_norm():
    a = nn.Parameter(torch.randn(3, dtype=torch.float64))
    b = nn.Parameter(torch.randn(4))
    c = nn.Parameter(torch.randn(2, dtype=torch.bfloat16))
    frozen = nn.Parameter(torch.randn(5), requires_grad=False)
    grads = gg.ContiguousGrads([a, b, c, frozen])
    assert len(grads.buffers) == 3 and frozen.grad is None
    a.grad.copy_(torch.tensor([3.0, 0.0, 0.0], dtype=torch.float64))  # type: ignore[union-attr]
    b.grad.copy_(torch.tensor([0.0, 4.0, 0.0, 0.0]))  # type: ignore[union-attr]
    c.grad.copy_(torch.tensor([0.0, 12.0], dtype=torch.bfloat16))  # type: ignore[union-attr]
    assert grads.total_norm(2.0).item() == pytest.approx(13.0)
    assert grads.total_norm(math.inf).item() == pytest.approx(12.0)
    gg.clip_grad_norm_(grads, 6.5)
    assert gg.get_total_norm([a.grad, b.grad, c.grad]).item() == pytest.approx(6.5, rel=1e-2)


def test_state_dict_round_trip_and_bad_state():
    model = _model()
    grads = gg.ContiguousGrads(model.parameters())
    _backward(model)
    state = grads.state_dict()
    saved = [b.clone() for b in grads.buffers.values()]
    grads.zero_grad()
    _backward(model, seed=7)
    grads.load_state_dict(state)
    assert grads.is_attached()
    for b, s in zip(grads.buffers.values(), saved):
        assert_exact(b, s)
    other = gg.ContiguousGrads(_model().parameters())
    other.load_state_dict(grads.state_dict())
    for b, s in zip(other.buffers.values(), saved):
        assert_exact(b, s)
    for bad in ({}, {"buffers": []}, {"buffers": [torch.zeros(3)]}, {"buffers": ["x"]}):
        with pytest.raises(ValueError, match="buffers"):
            grads.load_state_dict(bad)
        for b, s in zip(grads.buffers.values(), saved):
            assert_exact(b, s)


def test_needs_a_parameter_that_requires_grad():
    with pytest.raises(ValueError, match="requires grad"):
        gg.ContiguousGrads([nn.Parameter(torch.ones(2), requires_grad=False)])
    with pytest.raises(TypeError, match="parameters"):
        gg.ContiguousGrads(nn.Linear(2, 2))  # type: ignore[arg-type]
