"""agc_ against a slow plain-Python reference and against timm-style code (written here)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import gradguard as gg
from gradguard.core import agc as agc_module
from tests._grads import assert_exact


def reference_agc(params: list[Tensor], clip_factor: float, eps: float) -> tuple[list, int]:
    """NFNets' rule unit by unit in plain Python floats (float64): the slow, obvious version."""
    out, clipped = [], 0
    for p in params:
        assert p.grad is not None
        w = p.detach().double()
        g = p.grad.detach().double().clone()
        units = [(w.reshape(-1), g.reshape(-1))] if p.ndim <= 1 else list(zip(w, g))
        for w_unit, g_unit in units:
            w_norm = math.sqrt(sum(x * x for x in w_unit.reshape(-1).tolist()))
            g_norm = math.sqrt(sum(x * x for x in g_unit.reshape(-1).tolist()))
            bound = clip_factor * max(w_norm, eps)
            if g_norm > bound:
                g_unit.mul_(bound / g_norm)  # g_unit is a view into g
                clipped += 1
        out.append(g)
    return out, clipped


def timm_adaptive_clip_grad(params, clip_factor=0.01, eps=1e-3, norm_type=2.0):
    """timm.utils.agc.adaptive_clip_grad, as published."""

    def unitwise_norm(x):
        if x.ndim <= 1:
            return x.norm(norm_type)
        return x.norm(norm_type, dim=tuple(range(1, x.ndim)), keepdim=True)

    for p in params:
        if p.grad is None:
            continue
        p_data = p.detach()
        g_data = p.grad.detach()
        max_norm = unitwise_norm(p_data).clamp_(min=eps).mul_(clip_factor)
        grad_norm = unitwise_norm(g_data)
        clipped_grad = g_data * (max_norm / grad_norm.clamp(min=1e-6))
        new_grads = torch.where(grad_norm < max_norm, g_data, clipped_grad)
        p.grad.detach().copy_(new_grads)


class Net(nn.Module):
    """Conv weights, Linear weights, biases, a norm gain, and a classifier head."""

    def __init__(self, wide: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, wide, 3)
        self.norm = nn.GroupNorm(2, wide)
        self.big = nn.Linear(wide * 4, 2100)  # over agc.SMALL values: the per-tensor path
        self.fc = nn.Linear(2100, 5)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.norm(self.conv(x)))
        h = nn.functional.adaptive_avg_pool2d(h, 2).flatten(1)
        return self.fc(torch.relu(self.big(h)))


def _twins(seed: int, grad_scale: float = 50.0, dtype: torch.dtype = torch.float32):
    torch.manual_seed(seed)
    a = Net().to(dtype)
    b = Net().to(dtype)
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, 3, 6, 6, dtype=dtype)
    for m in (a, b):
        (m(x).sum() * grad_scale).backward()
    return a, b


@pytest.mark.parametrize("foreach", [None, False])
@pytest.mark.parametrize("seed", [0, 1])
def test_agc_matches_timm_bit_for_bit(seed, foreach):
    ours, theirs = _twins(seed)
    assert ours.big.weight.numel() > agc_module.SMALL  # both paths are exercised
    count = gg.agc_(ours, 0.01, foreach=foreach)
    timm_adaptive_clip_grad(list(theirs.parameters()), 0.01)
    for p, q in zip(ours.parameters(), theirs.parameters()):
        assert p.grad is not None and q.grad is not None
        assert_exact(p.grad, q.grad)
    assert count.dtype == torch.int64 and count.dim() == 0 and count.item() > 0


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    shapes=st.lists(
        st.sampled_from([(3,), (4, 5), (6, 2, 3, 3), (2, 7, 4), (1, 9), (70000,), (300, 230)]),
        min_size=1,
        max_size=6,
    ),
    clip_factor=st.sampled_from([0.001, 0.01, 0.1, 1.0]),
    eps=st.sampled_from([1e-3, 1e-1]),
    zero_weights=st.booleans(),
)
def test_agc_matches_slow_reference(seed, shapes, clip_factor, eps, zero_weights):
    gen = torch.Generator().manual_seed(seed)
    params = []
    for s in shapes:
        w = torch.zeros(s) if zero_weights else torch.randn(s, generator=gen)
        p = nn.Parameter(w)
        p.grad = torch.randn(s, generator=gen) * torch.rand((), generator=gen) * 3
        params.append(p)
    expected, expected_count = reference_agc(params, clip_factor, eps)
    count = gg.agc_(params, clip_factor, eps)
    for p, e in zip(params, expected):
        assert p.grad is not None
        torch.testing.assert_close(p.grad.double(), e, rtol=2e-5, atol=1e-9)
    # A unit right at its bound can fall either side of it in fp32 vs float64.
    assert abs(count.item() - expected_count) <= 1


def test_many_small_tensors_span_several_chunks_and_keep_their_values():
    gen = torch.Generator().manual_seed(0)
    n = agc_module.chunk_size() // 1000 + 20  # more values than one chunk holds
    params = [nn.Parameter(torch.randn(10, 100, generator=gen)) for _ in range(n)]
    for p in params:
        p.grad = torch.randn(10, 100, generator=gen)
    twins = [nn.Parameter(p.detach().clone()) for p in params]
    for t, p in zip(twins, params):
        t.grad = p.grad.clone()  # type: ignore[union-attr]
    count = gg.agc_(params, 0.5)
    timm_adaptive_clip_grad(twins, 0.5)
    for p, t in zip(params, twins):
        assert_exact(p.grad, t.grad)  # type: ignore[arg-type]
    assert 0 < count.item() <= 10 * n


def test_non_contiguous_gradient_takes_the_per_tensor_path():
    w = nn.Parameter(torch.randn(6, 4))
    w.grad = torch.randn(4, 6).t()  # a transposed view
    assert not w.grad.is_contiguous()
    expected, _ = reference_agc([w], 0.01, 1e-3)
    gg.agc_([w], 0.01)
    torch.testing.assert_close(w.grad.double(), expected[0], rtol=1e-5, atol=1e-9)


def test_exclude_by_name_module_and_parameter():
    a, b = _twins(3)
    fc_before = (a.fc.weight.grad.clone(), a.fc.bias.grad.clone())  # type: ignore[union-attr]
    gg.agc_(a, 0.01, exclude=["fc"])
    assert_exact(a.fc.weight.grad, fc_before[0])  # type: ignore[arg-type]
    assert_exact(a.fc.bias.grad, fc_before[1])  # type: ignore[arg-type]
    assert not torch.equal(a.conv.weight.grad, b.conv.weight.grad)  # type: ignore[arg-type]
    timm_adaptive_clip_grad([p for n, p in b.named_parameters() if not n.startswith("fc.")])
    for p, q in zip(a.parameters(), b.parameters()):
        assert_exact(p.grad, q.grad)  # type: ignore[arg-type]

    c, _ = _twins(3)
    before = c.conv.weight.grad.clone()  # type: ignore[union-attr]
    gg.agc_(c, 0.01, exclude=[c.conv])
    assert_exact(c.conv.weight.grad, before)  # type: ignore[arg-type]
    d, _ = _twins(3)
    before = d.big.bias.grad.clone()  # type: ignore[union-attr]
    gg.agc_(list(d.parameters()), 0.01, exclude=[d.big.bias])
    assert_exact(d.big.bias.grad, before)  # type: ignore[arg-type]
    assert [p is d.big.bias for p in gg.agc_parameters(d, exclude=d.big.bias)].count(True) == 0
    assert len(gg.agc_parameters(d, exclude="fc")) == len(list(d.parameters())) - 2


def test_exclude_errors_name_the_argument():
    net = Net()
    with pytest.raises(ValueError, match="exclude"):
        gg.agc_parameters(net, exclude=["nope"])
    with pytest.raises(TypeError, match="exclude"):
        gg.agc_parameters(list(net.parameters()), exclude=["fc"])
    with pytest.raises(TypeError, match=r"exclude\[0\]"):
        gg.agc_parameters(net, exclude=[3])  # type: ignore[list-item]


def test_mixed_dtypes_and_missing_grads():
    a = nn.Parameter(torch.randn(4, 3, dtype=torch.float64))
    b = nn.Parameter(torch.randn(5))
    c = nn.Parameter(torch.randn(2, 2))  # no grad
    a.grad = torch.randn(4, 3, dtype=torch.float64) * 10
    b.grad = torch.randn(5) * 10
    ta, tb = nn.Parameter(a.detach().clone()), nn.Parameter(b.detach().clone())
    ta.grad, tb.grad = a.grad.clone(), b.grad.clone()
    gg.agc_([a, b, c], 0.01)
    timm_adaptive_clip_grad([ta, tb], 0.01)
    assert_exact(a.grad, ta.grad)
    assert_exact(b.grad, tb.grad)
    assert c.grad is None
    assert gg.agc_([c], 0.01).item() == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_units_are_measured_in_fp32(dtype):
    a, _ = _twins(5, grad_scale=1.0, dtype=dtype)
    params = list(a.parameters())
    expected, _ = reference_agc(params, 0.01, 1e-3)
    gg.agc_(params, 0.01)
    for p, e in zip(params, expected):
        assert p.grad is not None and p.grad.dtype == dtype
        torch.testing.assert_close(p.grad.double(), e, rtol=2e-2, atol=1e-4)


def test_many_biases_of_one_length_take_the_rows_path_and_match_timm():
    gen = torch.Generator().manual_seed(4)
    n = agc_module.MIN_ROWS_BUCKET + 2
    shapes = [(10,)] * n + [(7,), (3, 10), (3, 10)]  # a 1-D bucket, a lone bias, a 2-D bucket
    ours = [nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    theirs = [nn.Parameter(p.detach().clone()) for p in ours]
    for p, q in zip(ours, theirs):
        p.grad = torch.randn(p.shape, generator=gen) * 5
        q.grad = p.grad.clone()
    _, expected = reference_agc(ours, 0.05, 1e-3)
    count = gg.agc_(ours, 0.05)
    timm_adaptive_clip_grad(theirs, 0.05)
    for p, q in zip(ours, theirs):
        assert_exact(p.grad, q.grad)  # type: ignore[arg-type]
    assert count.item() == expected > 0
