"""clip.py against torch.nn.utils as the oracle, plus the guarded non-finite modes."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

import gradguard as gg
from gradguard.core.clip import clip_each_with_norms_, clip_with_norms_
from gradguard.core.foreach import mul_each_
from gradguard.core.norms import total_from_norms
from tests import conformance as C
from tests._grads import (
    NORM_TYPES,
    assert_exact,
    assert_same_grads,
    build,
    grad_specs,
    grads,
    torch_can,
)

FOREACH = st.sampled_from([None, True, False])


@settings(max_examples=50, deadline=None)
@given(
    spec=grad_specs(),
    norm_type=st.sampled_from(NORM_TYPES),
    max_norm=st.floats(0.0, 10.0),
    foreach=FOREACH,
)
def test_clip_grad_norm_is_torch_bit_for_bit(spec, norm_type, max_norm, foreach):
    assume(torch_can(spec, norm_type))
    ours, theirs = build(spec), build(spec)
    expected = nn.utils.clip_grad_norm_(theirs, max_norm, norm_type, foreach=foreach)
    total = gg.clip_grad_norm_(ours, max_norm, norm_type, foreach=foreach)
    assert_exact(total, expected)
    assert_same_grads(ours, grads(theirs))


@settings(max_examples=40, deadline=None)
@given(spec=grad_specs(), norm_type=st.sampled_from(NORM_TYPES), foreach=FOREACH)
def test_get_total_norm_and_clip_grads_with_norm_are_torch(spec, norm_type, foreach):
    assume(torch_can(spec, norm_type))
    ours, theirs = build(spec), build(spec)
    t_grads = [p.grad for p in theirs if p.grad is not None]
    o_grads = [p.grad for p in ours if p.grad is not None]
    expected = nn.utils.get_total_norm(t_grads, norm_type, foreach=foreach)
    total = gg.get_total_norm(o_grads, norm_type, foreach=foreach)
    assert_exact(total, expected)
    nn.utils.clip_grads_with_norm_(theirs, 0.5, expected, foreach=foreach)
    gg.clip_grads_with_norm_(ours, 0.5, total, foreach=foreach)
    assert_same_grads(ours, grads(theirs))


@settings(max_examples=40, deadline=None)
@given(spec=grad_specs(), clip_value=st.floats(0.0, 3.0), foreach=FOREACH)
def test_clip_grad_value_is_torch(spec, clip_value, foreach):
    ours, theirs = build(spec), build(spec)
    nn.utils.clip_grad_value_(theirs, clip_value, foreach=foreach)
    gg.clip_grad_value_(ours, clip_value, foreach=foreach)
    assert_same_grads(ours, grads(theirs))


@pytest.mark.parametrize("poison", [math.nan, math.inf])
def test_error_if_nonfinite_raises_like_torch_and_changes_nothing(poison):
    spec = {
        "shapes": [(3, 4), (5,)],
        "dtypes": [torch.float32] * 2,
        "has_grad": [True, True],
        "seed": 3,
        "scale": 1.0,
        "poison": poison,
    }
    ours, theirs = build(spec), build(spec)
    before = grads(ours)
    with pytest.raises(RuntimeError, match="non-finite") as torch_err:
        nn.utils.clip_grad_norm_(theirs, 1.0, error_if_nonfinite=True)
    with pytest.raises(RuntimeError, match="non-finite") as our_err:
        gg.clip_grad_norm_(ours, 1.0, error_if_nonfinite=True)
    assert str(our_err.value) == str(torch_err.value)
    assert_same_grads(ours, before)
    with pytest.raises(RuntimeError, match="non-finite"):
        gg.get_total_norm([p.grad for p in ours], error_if_nonfinite=True)
    with pytest.raises(RuntimeError, match="non-finite"):
        gg.clip_grad_norm_(ours, 1.0, nonfinite="error")
    assert_same_grads(ours, before)


def _poisoned(poison: float) -> list[nn.Parameter]:
    a = nn.Parameter(torch.zeros(4))
    b = nn.Parameter(torch.zeros(2, 3))
    a.grad = torch.tensor([1.0, -2.0, 3.0, 0.5])
    b.grad = torch.tensor([[poison, 1.0, 2.0], [0.0, -1.0, 4.0]])
    return [a, b]


def test_nan_norm_makes_every_gradient_nan_like_torch():
    ours, theirs = _poisoned(math.nan), _poisoned(math.nan)
    total = gg.clip_grad_norm_(ours, 1.0)
    nn.utils.clip_grad_norm_(theirs, 1.0)
    assert total.isnan()
    for p in ours:
        assert p.grad is not None and p.grad.isnan().all()
    assert_same_grads(ours, grads(theirs))


def test_inf_norm_zeroes_finite_entries_and_turns_inf_into_nan_like_torch():
    ours, theirs = _poisoned(math.inf), _poisoned(math.inf)
    total = gg.clip_grad_norm_(ours, 1.0)
    nn.utils.clip_grad_norm_(theirs, 1.0)
    assert total.isinf()
    a, b = (p.grad for p in ours)
    assert a is not None and b is not None
    assert (a == 0).all()
    assert b[0, 0].isnan() and (b.view(-1)[1:] == 0).all()
    assert_same_grads(ours, grads(theirs))


@settings(max_examples=40, deadline=None)
@given(spec=grad_specs(), norm_type=st.sampled_from(NORM_TYPES), max_norm=st.floats(0.0, 5.0))
def test_skip_leaves_gradients_bit_for_bit_when_nonfinite(spec, norm_type, max_norm):
    assume(torch_can(spec, norm_type))
    ours, theirs = build(spec), build(spec)
    before = grads(ours)
    total = gg.clip_grad_norm_(ours, max_norm, norm_type, nonfinite="skip")
    expected = nn.utils.clip_grad_norm_(theirs, max_norm, norm_type)
    assert_exact(total, expected)
    flag = ~total.isfinite()
    assert isinstance(flag, torch.Tensor) and flag.dtype == torch.bool and flag.dim() == 0
    if flag:
        assert_same_grads(ours, before)
    else:  # a finite step is clipped exactly as torch does
        assert_same_grads(ours, grads(theirs))


@settings(max_examples=40, deadline=None)
@given(spec=grad_specs(), norm_type=st.sampled_from(NORM_TYPES), max_norm=st.floats(0.0, 5.0))
def test_zero_mode_zeroes_every_gradient_when_nonfinite(spec, norm_type, max_norm):
    assume(torch_can(spec, norm_type))
    ours, theirs = build(spec), build(spec)
    total = gg.clip_grad_norm_(ours, max_norm, norm_type, nonfinite="zero")
    nn.utils.clip_grad_norm_(theirs, max_norm, norm_type)
    if total.isfinite():
        assert_same_grads(ours, grads(theirs))
    else:
        for p in ours:
            if p.grad is not None:
                assert_exact(p.grad, torch.zeros_like(p.grad))


@pytest.mark.parametrize("mode", ["skip", "zero", "propagate"])
def test_clip_grads_with_norm_guarded_modes(mode):
    ours = _poisoned(math.nan)
    before = grads(ours)
    total = gg.get_total_norm([p.grad for p in ours])
    gg.clip_grads_with_norm_(ours, 1.0, total, nonfinite=mode)
    if mode == "skip":
        assert_same_grads(ours, before)
    elif mode == "zero":
        for p in ours:
            assert p.grad is not None and (p.grad == 0).all()
    else:
        for p in ours:
            assert p.grad is not None and p.grad.isnan().all()
    with pytest.raises(RuntimeError, match="non-finite"):
        gg.clip_grads_with_norm_(
            _poisoned(math.inf), 1.0, torch.tensor(math.inf), nonfinite="error"
        )


def test_clip_coefficient_modes():
    total = torch.tensor([3.0, math.inf, math.nan, 0.5])
    plain = gg.clip_coefficient(1.0, total, "propagate")
    assert_exact(plain, torch.clamp(1.0 / (total + 1e-6), max=1.0))
    assert_exact(
        gg.clip_coefficient(1.0, total, "skip"), torch.tensor([plain[0].item(), 1.0, 1.0, 1.0])
    )
    assert_exact(
        gg.clip_coefficient(1.0, total, "zero"), torch.tensor([plain[0].item(), 0.0, 0.0, 1.0])
    )
    # A tensor threshold (an adaptive policy's) works without reading it on the host.
    assert_exact(gg.clip_coefficient(torch.tensor(1.0), total[:1], "skip"), plain[:1])


def test_parameters_without_grads_are_skipped_and_empty_input_gives_zero():
    a, b = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(2))
    b.grad = torch.full((2,), 3.0)
    total = gg.clip_grad_norm_([a, b], 1.0)
    assert_exact(total, nn.utils.get_total_norm([torch.full((2,), 3.0)]))
    assert a.grad is None
    for empty in ([], [nn.Parameter(torch.ones(2))]):
        assert_exact(gg.clip_grad_norm_(empty, 1.0), nn.utils.clip_grad_norm_(empty, 1.0))
        assert_exact(gg.get_total_norm([]), nn.utils.get_total_norm([]))
    gg.clip_grads_with_norm_([a], 1.0, torch.tensor(2.0))
    gg.clip_grad_value_([a], 1.0)
    assert a.grad is None


def test_single_tensor_and_generator_inputs_like_torch():
    model, twin = nn.Linear(4, 3), nn.Linear(4, 3)
    twin.load_state_dict(model.state_dict())
    x = torch.randn(5, 4)
    model(x).pow(2).sum().backward()
    twin(x).pow(2).sum().backward()
    assert_exact(
        gg.clip_grad_norm_(model.parameters(), 0.1),
        nn.utils.clip_grad_norm_(twin.parameters(), 0.1),
    )
    assert_same_grads(list(model.parameters()), grads(list(twin.parameters())))
    assert_exact(
        gg.clip_grad_norm_(model.weight, 0.01), nn.utils.clip_grad_norm_(twin.weight, 0.01)
    )
    assert_same_grads([model.weight], grads([twin.weight]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_clip_uses_an_fp32_norm(dtype):
    gen = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.zeros(n, dtype=dtype)) for n in (300, 7, 1000)]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(dtype)
    ref = [p.grad.double() for p in params if p.grad is not None]
    true_norm = torch.linalg.vector_norm(torch.cat(ref))
    total = gg.clip_grad_norm_(params, 1.0)
    assert total.dtype == torch.float32
    assert abs(total.double() - true_norm) / true_norm < 1e-5
    coef = 1.0 / (total.double() + 1e-6)
    for p, r in zip(params, ref):
        assert p.grad is not None and p.grad.dtype == dtype
        torch.testing.assert_close(p.grad.double(), r * coef, rtol=1e-2, atol=1e-3)


@settings(max_examples=40, deadline=None)
@given(
    spec=grad_specs(nonfinite=False),
    norm_type=st.sampled_from(NORM_TYPES),
    max_norm=st.floats(0.0, 5.0),
    foreach=FOREACH,
)
def test_clip_by_norm_clips_each_gradient_on_its_own(spec, norm_type, max_norm, foreach):
    params = build(spec)
    before = grads(params)
    norms = gg.clip_by_norm_(params, max_norm, norm_type, foreach=foreach)
    present = [g for g in before if g is not None]
    assert len(norms) == len(present)
    after = [p.grad for p in params if p.grad is not None]
    for g0, g1, n in zip(present, after, norms):
        # The norm of an empty tensor is 0 for every p (torch refuses p=inf there).
        expected_norm = torch.linalg.vector_norm(g0, norm_type if g0.numel() else 2.0)
        assert_exact(n, expected_norm)
        coef = torch.clamp(max_norm / (expected_norm + 1e-6), max=1.0)
        assert_exact(g1, g0 * coef)
        assert torch.linalg.vector_norm(g1, 2.0 if g1.numel() == 0 else norm_type) <= (
            max_norm * (1 + 1e-5) + 1e-12
        )


@pytest.mark.parametrize("foreach", [None, False])
def test_inf_norm_of_an_empty_gradient_is_zero_where_torch_raises(foreach):
    p, q = nn.Parameter(torch.zeros(0)), nn.Parameter(torch.zeros(2))
    p.grad, q.grad = torch.zeros(0), torch.tensor([-3.0, 1.0])
    with pytest.raises(RuntimeError):
        nn.utils.get_total_norm([p.grad, q.grad], math.inf, foreach=True)
    assert_exact(gg.get_total_norm([p.grad, q.grad], math.inf, foreach=foreach), torch.tensor(3.0))
    assert_exact(gg.clip_grad_norm_([p], 1.0, math.inf, foreach=foreach), torch.tensor(0.0))


def test_a_tensor_threshold_is_used_without_reading_it():
    spec = {
        "shapes": [(3, 4), (5,)],
        "dtypes": [torch.float32] * 2,
        "has_grad": [True, True],
        "seed": 11,
        "scale": 1.0,
        "poison": None,
    }
    ours, theirs = build(spec), build(spec)
    total = gg.clip_grad_norm_(ours, torch.tensor(0.5))
    expected = nn.utils.clip_grad_norm_(theirs, 0.5)
    assert_exact(total, expected)
    assert_same_grads(ours, grads(theirs))
    gg.clip_grads_with_norm_(ours, torch.tensor([0.25]), total)
    nn.utils.clip_grads_with_norm_(theirs, 0.25, expected)
    assert_same_grads(ours, grads(theirs))


# --- guarded clipping with norms already measured (what ClipPolicy.clip_ calls) -------------


def _present(params):
    return [p.grad for p in params if p.grad is not None]


@settings(max_examples=40, deadline=None)
@given(
    spec=grad_specs(dtypes=(torch.float32,), nonfinite=False),
    norm_type=st.sampled_from(NORM_TYPES),
    max_norm=st.floats(0.0, 5.0),
    foreach=FOREACH,
)
def test_clip_with_norms_is_torch_clip_grad_norm_bit_for_bit(spec, norm_type, max_norm, foreach):
    assume(torch_can(spec, norm_type))
    ours, theirs = build(spec), build(spec)
    norms = gg.grad_norms(_present(ours), norm_type)
    expected = nn.utils.clip_grad_norm_(theirs, max_norm, norm_type, foreach=foreach)
    threshold = torch.tensor(max_norm)  # a policy's threshold: the fp32 value torch uses too
    c = clip_with_norms_(_present(ours), threshold, norms, norm_type=norm_type, foreach=foreach)
    assert_same_grads(ours, grads(theirs))
    assert_exact(c.threshold, threshold)
    coef = torch.clamp(max_norm / (expected + 1e-6), max=1.0)
    assert_exact(c.clipped, coef < 1.0)
    assert_exact(c.total, expected * coef)
    after = nn.utils.get_total_norm(_present(theirs), norm_type) if _present(theirs) else None
    if after is not None:
        torch.testing.assert_close(c.total, after, rtol=1e-5, atol=1e-30)


def _slow_each_(gs: list[torch.Tensor], limits: list[float], norms: list[torch.Tensor]) -> bool:
    """The plain per-tensor loop: torch's rule with a float bound, one tensor at a time;
    True when some factor was below 1."""
    below = False
    for g, t, n in zip(gs, limits, norms):
        coef = torch.clamp(t / (n + 1e-6), max=1.0)
        g.mul_(coef.to(g.dtype))
        below |= bool(coef < 1.0)
    return below


@settings(max_examples=40, deadline=None)
@given(
    spec=grad_specs(dtypes=(torch.float32, torch.float64, torch.bfloat16), nonfinite=False),
    norm_type=st.sampled_from(NORM_TYPES),
    limits=st.lists(st.sampled_from([0.0, 1e-3, 0.5, 2.0, math.inf]), min_size=5, max_size=5),
    foreach=FOREACH,
)
def test_clip_each_with_norms_equals_the_per_tensor_loop(spec, norm_type, limits, foreach):
    assume(torch_can(spec, norm_type))
    ours, theirs = build(spec), build(spec)
    g_ours, g_theirs = _present(ours), _present(theirs)
    norms = gg.grad_norms(g_ours, norm_type)
    limits = limits[: len(g_ours)]
    like = norms.total
    thresholds = [torch.tensor(t, dtype=like.dtype) for t in limits]
    c = clip_each_with_norms_(g_ours, thresholds, norms, norm_type=norm_type, foreach=foreach)
    below = _slow_each_(g_theirs, limits, [n.to(like.dtype) for n in norms.per_tensor])
    assert_same_grads(ours, grads(theirs))
    assert isinstance(c.learn, list) and len(c.learn) == len(g_ours)
    for n, g in zip(c.learn, g_ours):
        measured = gg.tensor_norms([g], norm_type)[0].to(n.dtype)
        torch.testing.assert_close(
            n, measured, rtol=1e-2 if g.dtype == torch.bfloat16 else 1e-5, atol=0
        )
    want_threshold = total_from_norms(thresholds, norm_type, like.device).float()
    assert_exact(c.threshold, want_threshold)
    assert bool(c.clipped) == below
    after = total_from_norms(c.learn, norm_type, like.device).float()
    assert_exact(c.total, after)


@settings(max_examples=30, deadline=None)
@given(spec=grad_specs(), norm_type=st.sampled_from(NORM_TYPES))
def test_guarded_clips_leave_a_nonfinite_step_untouched(spec, norm_type):
    assume(torch_can(spec, norm_type))
    for each in (False, True):
        params = build(spec)
        before = grads(params)
        gs = _present(params)
        norms = gg.grad_norms(gs, norm_type)
        zero = torch.zeros((), dtype=norms.total.dtype)
        if each:
            c = clip_each_with_norms_(gs, [zero] * len(gs), norms, norm_type=norm_type)
        else:
            c = clip_with_norms_(gs, zero, norms, norm_type=norm_type)
        if not bool(norms.finite):
            assert_same_grads(params, before)
            assert not bool(c.clipped)


def test_guarded_clips_never_read_the_device():
    gen = torch.Generator().manual_seed(0)
    gs = [torch.randn(s, generator=gen) * 10 for s in ((4, 3), (7,), (2, 2))]
    norms = gg.grad_norms(gs)
    with C.no_host_sync():
        a = clip_with_norms_(gs, torch.tensor(1.0), norms)
        b = clip_each_with_norms_(gs, [torch.tensor(0.5)] * 3, gg.grad_norms(gs))
    assert bool(a.clipped) and bool(b.clipped)


def test_guarded_clips_check_their_arguments():
    gs = [torch.ones(3), torch.ones(2)]
    norms = gg.grad_norms(gs)
    with pytest.raises(ValueError, match="one threshold and one norm per gradient"):
        clip_each_with_norms_(gs, [torch.tensor(1.0)], norms)
    with pytest.raises(ValueError, match="norm_type"):
        clip_with_norms_(gs, 1.0, norms, norm_type=-1.0)
    empty = gg.grad_norms([])
    c = clip_each_with_norms_([], [], empty)
    assert c.learn == [] and float(c.total) == 0.0 and not bool(c.clipped)
    c = clip_with_norms_([], 1.0, empty)  # a number threshold works too
    assert float(c.total) == 0.0 and float(c.threshold) == 1.0


@pytest.mark.parametrize("foreach", [None, True, False])
def test_mul_each_equals_a_loop_across_devices_and_dtypes(foreach):
    gen = torch.Generator().manual_seed(1)
    dtypes = [torch.float32, torch.float64, torch.bfloat16, torch.float32, torch.float64]
    ts = [torch.randn(i + 1, 3, generator=gen).to(dt) for i, dt in enumerate(dtypes)]
    factors = torch.tensor([0.5, 2.0, 0.125, 3.0, 1.0 / 3.0])
    for form in (factors, list(factors.unbind(0))):
        ours, ref = [t.clone() for t in ts], [t.clone() for t in ts]
        mul_each_(ours, form, foreach)
        for r, f in zip(ref, factors):
            r.mul_(f.to(r.dtype))
        for a, b in zip(ours, ref):
            assert_exact(a, b)
    with pytest.raises(ValueError, match="one factor per tensor"):
        mul_each_(ts, factors[:2])
