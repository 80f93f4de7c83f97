"""norms.py: per-tensor norms, the total, the finiteness flag, fp32 accumulation."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

import gradguard as gg
from gradguard.core.norms import total_from_norms
from tests._grads import NORM_TYPES, assert_exact, build, grad_specs, torch_can


@settings(max_examples=50, deadline=None)
@given(
    spec=grad_specs(),
    norm_type=st.sampled_from(NORM_TYPES),
    foreach=st.sampled_from([None, True, False]),
)
def test_grad_norms_match_torch_per_tensor_and_total(spec, norm_type, foreach):
    assume(torch_can(spec, norm_type))
    tensors = [p.grad for p in build(spec) if p.grad is not None]
    norms = gg.grad_norms(tensors, norm_type, foreach=foreach)
    assert len(norms.per_tensor) == len(tensors)
    for t, n in zip(tensors, norms.per_tensor):  # input order, even across dtype groups
        assert_exact(n, torch.linalg.vector_norm(t, norm_type))
    assert_exact(norms.total, nn.utils.get_total_norm(tensors, norm_type, foreach=foreach))
    assert_exact(norms.finite, norms.total.isfinite())
    assert norms.finite.dtype == torch.bool and norms.finite.dim() == 0
    for a, b in zip(gg.tensor_norms(tensors, norm_type, foreach), norms.per_tensor, strict=True):
        assert_exact(a, b)


def test_finite_flag_is_false_for_nan_inf_and_overflow():
    ok = [torch.ones(3), torch.ones(2, 2)]
    assert gg.grad_norms(ok).finite
    for poison in (math.nan, math.inf, -math.inf):
        bad = [torch.ones(3), torch.tensor([1.0, poison])]
        norms = gg.grad_norms(bad)
        assert not norms.finite and not norms.total.isfinite()
    # Each entry is finite but the sum of squares overflows fp32: no coefficient is meaningful.
    assert not gg.grad_norms([torch.full((4,), 3e38)]).finite


def test_mixed_dtypes_keep_input_order():
    a = torch.tensor([3.0, 4.0], dtype=torch.float64)
    b = torch.tensor([1.0], dtype=torch.float32)
    c = torch.tensor([0.0, 2.0], dtype=torch.bfloat16)
    d = torch.tensor([6.0, 8.0], dtype=torch.float32)
    norms = gg.grad_norms([a, b, c, d])
    assert [n.item() for n in norms.per_tensor] == [5.0, 1.0, 2.0, 10.0]
    assert [n.dtype for n in norms.per_tensor] == [
        torch.float64,
        torch.float32,
        torch.float32,  # bf16 measured in fp32
        torch.float32,
    ]
    assert norms.total.item() == pytest.approx(math.sqrt(25 + 1 + 4 + 100))
    # The same tensor twice counts twice, as in torch.
    assert_exact(gg.get_total_norm([d, d]), nn.utils.get_total_norm([d, d]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("seed", range(4))
def test_low_precision_total_is_closer_to_fp64_than_torch(dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    tensors = [
        (torch.randn(n, generator=gen) * s).to(dtype)
        for n, s in zip((4096, 777, 31, 2048, 5000), (1.0, 30.0, 0.01, 3.0, 0.3))
    ]
    reference = nn.utils.get_total_norm([t.double() for t in tensors])
    theirs = nn.utils.get_total_norm(tensors)
    ours = gg.get_total_norm(tensors)
    assert theirs.dtype == dtype and ours.dtype == torch.float32
    our_error = abs(ours.double() - reference).item()
    their_error = abs(theirs.double() - reference).item()
    assert our_error < their_error
    assert our_error / reference.item() < 1e-5
    for t, n in zip(tensors, gg.grad_norms(tensors).per_tensor):
        assert n.dtype == torch.float32
        assert n.item() == pytest.approx(torch.linalg.vector_norm(t.double()).item(), rel=1e-5)


def test_empty_input_gives_zero_like_torch():
    assert_exact(gg.get_total_norm([]), nn.utils.get_total_norm([]))
    norms = gg.grad_norms([])
    assert norms.per_tensor == [] and norms.total.item() == 0.0 and norms.finite
    assert_exact(total_from_norms([], 2.0, torch.device("cpu")), torch.tensor(0.0))


def test_single_tensor_and_string_inf():
    t = torch.tensor([[-7.0, 2.0], [1.0, 0.5]])
    assert_exact(gg.get_total_norm(t, "inf"), nn.utils.get_total_norm(t, "inf"))
    assert_exact(gg.grad_norms(t, math.inf).total, torch.tensor(7.0))


def test_total_from_norms_combines_like_one_vector():
    parts = [torch.randn(5), torch.randn(3, 2), torch.randn(7)]
    flat = torch.cat([p.reshape(-1) for p in parts])
    for p in NORM_TYPES:
        norms = gg.tensor_norms(parts, p)
        got = total_from_norms(norms, p, torch.device("cpu"))
        torch.testing.assert_close(got, torch.linalg.vector_norm(flat, p), rtol=1e-6, atol=0)


def test_measuring_changes_nothing_and_keeps_no_graph():
    x = torch.randn(4, requires_grad=True)
    y = x * 2
    norms = gg.grad_norms([y.detach()])
    assert not norms.total.requires_grad
    before = y.detach().clone()
    gg.grad_norms([y.detach()], 1.0)
    assert_exact(y.detach(), before)
