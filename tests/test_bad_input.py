"""Every bad input to the clipping and norm functions gets a clear ValueError/TypeError naming
the argument, and no gradient changes."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import nn

import gradguard as gg
from tests._grads import assert_exact


def _params() -> list[nn.Parameter]:
    a, b = nn.Parameter(torch.ones(3, 2)), nn.Parameter(torch.ones(4))
    a.grad = torch.full((3, 2), 5.0)
    b.grad = torch.arange(4.0) * 7
    return [a, b]


BAD_THRESHOLDS = [-1.0, math.nan, math.inf, -math.inf, "abc", True, None, torch.ones(2)]

# (label, call on a parameter list, exception, words the message must contain)
Case = tuple[str, Callable[[list[nn.Parameter]], object], type[Exception], str]
CASES: list[Case] = []
for bad in BAD_THRESHOLDS:
    err = ValueError if isinstance(bad, float) else TypeError
    CASES += [
        (
            f"clip_grad_norm_ max_norm={bad!r}",
            lambda ps, v=bad: gg.clip_grad_norm_(ps, v),
            err,
            "max_norm",
        ),
        (
            f"clip_grads_with_norm_ max_norm={bad!r}",
            lambda ps, v=bad: gg.clip_grads_with_norm_(ps, v, torch.tensor(1.0)),
            err,
            "max_norm",
        ),
        (
            f"clip_grad_value_ clip_value={bad!r}",
            lambda ps, v=bad: gg.clip_grad_value_(ps, v),
            err,
            "clip_value",
        ),
        (
            f"clip_by_norm_ max_norm={bad!r}",
            lambda ps, v=bad: gg.clip_by_norm_(ps, v),
            err,
            "max_norm",
        ),
        (f"agc_ clip_factor={bad!r}", lambda ps, v=bad: gg.agc_(ps, v), err, "clip_factor"),
        (f"agc_ eps={bad!r}", lambda ps, v=bad: gg.agc_(ps, 0.01, v), err, "eps"),
    ]
for p in [0, -1.0, -math.inf, math.nan, "two"]:
    err = TypeError if isinstance(p, str) else ValueError
    CASES += [
        (
            f"clip_grad_norm_ norm_type={p!r}",
            lambda ps, v=p: gg.clip_grad_norm_(ps, 1.0, v),
            err,
            "norm_type",
        ),
        (
            f"get_total_norm norm_type={p!r}",
            lambda ps, v=p: gg.get_total_norm([q.grad for q in ps], v),
            err,
            "norm_type",
        ),
        (
            f"clip_by_norm_ norm_type={p!r}",
            lambda ps, v=p: gg.clip_by_norm_(ps, 1.0, v),
            err,
            "norm_type",
        ),
    ]
CASES += [
    ("agc_ clip_factor=0", lambda ps: gg.agc_(ps, 0.0), ValueError, "clip_factor"),
    (
        "nonfinite mode",
        lambda ps: gg.clip_grad_norm_(ps, 1.0, nonfinite="ignore"),
        ValueError,
        "nonfinite",
    ),
    ("foreach not bool", lambda ps: gg.clip_grad_norm_(ps, 1.0, foreach=1), TypeError, "foreach"),
    (
        "error_if_nonfinite not bool",
        lambda ps: gg.clip_grad_norm_(ps, 1.0, 2.0, "yes"),
        TypeError,
        "error_if_nonfinite",
    ),
    (
        "total_norm not a tensor",
        lambda ps: gg.clip_grads_with_norm_(ps, 1.0, 2.0),
        TypeError,
        "total_norm",
    ),
    (
        "a module, not its parameters",
        lambda ps: gg.clip_grad_norm_(nn.Linear(2, 2), 1.0),
        TypeError,
        "parameters",
    ),
    ("a number, not parameters", lambda ps: gg.clip_grad_norm_(3.0, 1.0), TypeError, "parameters"),
    (
        "a list with a non-tensor",
        lambda ps: gg.clip_grad_norm_([*ps, "w"], 1.0),
        TypeError,
        "parameters[2]",
    ),
]


@pytest.mark.parametrize("label, call, exc, words", CASES, ids=[c[0] for c in CASES])
def test_bad_argument_is_named_and_changes_nothing(label, call, exc, words):
    params = _params()
    before = [p.grad.clone() for p in params]
    with pytest.raises(exc) as info:
        call(params)
    assert words in str(info.value), str(info.value)
    for p, b in zip(params, before):
        assert_exact(p.grad, b)


def _with(grad: torch.Tensor) -> list[nn.Parameter]:
    params = _params()
    odd = nn.Parameter(torch.zeros(grad.shape, dtype=torch.float32, device=grad.device))
    odd.grad = grad
    return [*params, odd]


def _bad_grad_sets() -> list[tuple[str, list[nn.Parameter], type[Exception], str]]:
    integer = torch.ones(3, dtype=torch.int64)  # torch lets an integer tensor hold a .grad
    integer.grad = torch.ones(3, dtype=torch.int64)
    return [
        ("sparse", _with(torch.ones(2, 3).to_sparse()), TypeError, "layout"),
        ("integer", [*_params(), integer], TypeError, "floating point"),
        ("mixed device types", _with(torch.ones(2, device="meta")), ValueError, "device types"),
    ]


ALL_FUNCTIONS: list[tuple[str, Callable[[list[nn.Parameter]], object]]] = [
    ("clip_grad_norm_", lambda ps: gg.clip_grad_norm_(ps, 1.0)),
    ("clip_grad_norm_ skip", lambda ps: gg.clip_grad_norm_(ps, 1.0, nonfinite="skip")),
    ("clip_grads_with_norm_", lambda ps: gg.clip_grads_with_norm_(ps, 1.0, torch.tensor(9.0))),
    ("clip_grad_value_", lambda ps: gg.clip_grad_value_(ps, 1.0)),
    ("clip_by_norm_", lambda ps: gg.clip_by_norm_(ps, 1.0)),
    ("agc_", lambda ps: gg.agc_(ps, 0.01)),
    ("get_total_norm", lambda ps: gg.get_total_norm([p.grad for p in ps])),
    ("grad_norms", lambda ps: gg.grad_norms([p.grad for p in ps])),
    ("clip_by_global_norm", lambda ps: gg.clip_by_global_norm([p.grad for p in ps], 1.0)),
]


@pytest.mark.parametrize("fn_label, fn", ALL_FUNCTIONS, ids=[f[0] for f in ALL_FUNCTIONS])
@pytest.mark.parametrize("grad_label", ["sparse", "integer", "mixed device types"])
def test_bad_gradients_are_refused_before_anything_changes(fn_label, fn, grad_label):
    (_, params, exc, words) = next(c for c in _bad_grad_sets() if c[0] == grad_label)
    before = [p.grad.clone() for p in params]
    with pytest.raises(exc, match=words):
        fn(params)
    for p, b in zip(params, before):
        if p.grad is not None and p.grad.device.type == "cpu" and p.grad.layout == torch.strided:
            assert_exact(p.grad, b)


def test_an_exhausted_generator_is_refused():
    model = nn.Linear(3, 2)
    model(torch.randn(2, 3)).sum().backward()
    params = model.parameters()
    gg.clip_grad_norm_(params, 1.0)  # consumes the generator
    with pytest.raises(ValueError, match="empty generator"):
        gg.clip_grad_norm_(params, 1.0)
    for fn in (
        lambda g: gg.clip_grad_value_(g, 1.0),
        lambda g: gg.clip_by_norm_(g, 1.0),
        lambda g: gg.get_total_norm(g),
        lambda g: gg.clip_grads_with_norm_(g, 1.0, torch.tensor(1.0)),
    ):
        gen = (p for p in model.parameters())
        list(gen)
        with pytest.raises(ValueError, match="generator"):
            fn(gen)


def test_tf_style_functions_refuse_bad_input():
    t = torch.ones(3)
    with pytest.raises(ValueError, match="clip_value_min"):
        gg.clip_by_value(t, 1.0, -1.0)
    with pytest.raises(ValueError, match="clip_value_min"):
        gg.clip_by_value(t, math.nan, 1.0)
    with pytest.raises(TypeError, match="t must be a tensor"):
        gg.clip_by_value([1.0], 0.0, 1.0)
    for bad in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="clip_norm"):
            gg.clip_by_norm(t, bad)
        with pytest.raises(ValueError, match="clip_norm"):
            gg.clip_by_global_norm([t], bad)
    with pytest.raises(TypeError, match="t_list"):
        gg.clip_by_global_norm(t, 1.0)
    with pytest.raises(TypeError, match=r"t_list\[1\]"):
        gg.clip_by_global_norm([t, 3.0], 1.0)
    with pytest.raises(TypeError, match="use_norm"):
        gg.clip_by_global_norm([t], 1.0, use_norm=torch.ones(2))
    with pytest.raises(TypeError, match="use_norm"):
        gg.clip_by_global_norm([t], 1.0, use_norm="big")
    assert_exact(t, torch.ones(3))


def test_foreach_true_on_a_device_without_foreach_support_raises_like_torch():
    g = torch.ones(3, device="meta")
    with pytest.raises(RuntimeError, match="foreach=True"):
        gg.get_total_norm([g], foreach=True)


# --- found by the hostile fuzz (tests/test_hostile.py) ---------------------------------------


def test_empty_lists_give_empty_results() -> None:
    assert gg.tensor_norms([]) == []
    assert gg.clip_by_norm_([], 1.0) == []


@pytest.mark.parametrize("bad", [None, "abc", [1], 1, 0.0])
def test_get_total_norm_refuses_a_non_bool_error_flag(bad: object) -> None:
    grads = [torch.ones(3)]
    with pytest.raises(TypeError, match="error_if_nonfinite"):
        gg.get_total_norm(grads, 2.0, bad)  # type: ignore[arg-type]


def test_contiguous_grads_refuses_a_sparse_gradient_before_changing_anything() -> None:
    emb = nn.Embedding(10, 3, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    dense = nn.Parameter(torch.ones(3))
    dense.grad = torch.full((3,), 5.0)
    sparse_grad = emb.weight.grad
    with pytest.raises(TypeError, match="layout"):
        gg.ContiguousGrads([dense, emb.weight])
    assert emb.weight.grad is sparse_grad and torch.equal(dense.grad, torch.full((3,), 5.0))


# Finite Python floats beyond fp32: above its largest value, and below its smallest subnormal.
HUGE = [3.5e38, 1e300]
TINY = [2.7e-278, 1e-40]


def _exact_tf(t: torch.Tensor, clip: float, norm: float) -> torch.Tensor:
    """``t * min(clip / norm, 1)`` in fp64 (Python floats cover the range), rounded at the end."""
    scale = 1.0 if norm <= clip else clip / norm
    return (t.double() * scale).to(t.dtype)


@pytest.mark.parametrize("clip", HUGE + TINY + [1e38, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tf_clips_are_right_for_clip_norms_outside_fp32(clip: float, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    ts = [torch.randn(5).to(dtype) * 3, torch.zeros(4, dtype=dtype), torch.randn(2).to(dtype)]
    norm = float(torch.linalg.vector_norm(torch.cat([t.double() for t in ts])))
    out, got_norm = gg.clip_by_global_norm(ts, clip)
    assert float(got_norm) == pytest.approx(norm, rel=1e-6)
    for o, t in zip(out, ts):
        assert o is not None and o.dtype == dtype
        torch.testing.assert_close(o, _exact_tf(t, clip, norm), rtol=1e-5, atol=1e-44)
    for t in ts:  # the zero tensor: 0 / 0 must not appear
        one = float(torch.linalg.vector_norm(t.double()))
        torch.testing.assert_close(
            gg.clip_by_norm(t, clip), _exact_tf(t, clip, one), rtol=1e-5, atol=1e-44
        )


@pytest.mark.parametrize("clip", HUGE)
def test_tf_clips_keep_nonfinite_semantics_for_huge_clip_norms(clip: float) -> None:
    t = torch.tensor([1.0, math.inf])
    out = gg.clip_by_norm(t, clip)  # t * clip / max(inf, clip): finite entries 0, inf NaN
    assert out[0] == 0 and out[1].isnan()
    (g,), norm = gg.clip_by_global_norm([t], clip)
    assert g is not None and bool(g.isnan().all()) and norm.isinf()  # TF: all NaN


@pytest.mark.parametrize("clip_value", HUGE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("foreach", [False, None])
def test_clip_grad_value_above_the_dtype_range_clamps_at_its_largest_value(
    clip_value: float, dtype: torch.dtype, foreach: bool | None
) -> None:
    top = torch.finfo(dtype).max
    p = nn.Parameter(torch.zeros(4, dtype=dtype))
    p.grad = torch.tensor([1.5, -math.inf, math.inf, -2.0], dtype=dtype)
    gg.clip_grad_value_([p], clip_value, foreach=foreach)
    assert p.grad.tolist() == [1.5, -top, top, -2.0]
    p.grad = torch.tensor([1.5, -math.inf, math.inf, -2.0], dtype=dtype)
    gg.clip_grad_value_([p], 1e4, foreach=foreach)  # in range for every dtype: as torch
    bound = float(torch.tensor(1e4, dtype=dtype))
    assert p.grad.tolist() == [1.5, -bound, bound, -2.0]


@pytest.mark.parametrize("max_norm", HUGE)
def test_norm_clips_with_huge_max_norm_leave_finite_gradients_alone(max_norm: float) -> None:
    for clip in (gg.clip_grad_norm_, gg.clip_by_norm_):
        ps = _params()
        before = [p.grad.clone() for p in ps]  # type: ignore[union-attr]
        clip(ps, max_norm)
        assert all(torch.equal(p.grad, b) for p, b in zip(ps, before))  # type: ignore[arg-type]
        ps[0].grad[0, 0] = math.inf  # type: ignore[index]
        clip(ps, max_norm)  # an inf norm: finite entries zeroed, as torch with an in-range bound
        assert ps[1].grad.eq(0).all() if clip is gg.clip_grad_norm_ else True  # type: ignore[union-attr]
        assert ps[0].grad.view(-1)[1:].eq(0).all()  # type: ignore[union-attr]


def _agc_reference(model: nn.Module, lam: float, eps: float) -> list[torch.Tensor]:
    """timm's rule in fp64, where every Python float fits."""
    out = []
    for p in model.parameters():
        w, g = p.detach().double(), p.grad.double()  # type: ignore[union-attr]
        dims = tuple(range(1, w.ndim)) if w.ndim > 1 else None
        wn = torch.linalg.vector_norm(w, dim=dims, keepdim=w.ndim > 1).clamp(min=eps) * lam
        gn = torch.linalg.vector_norm(g, dim=dims, keepdim=w.ndim > 1)
        coef = torch.where(gn < wn, 1.0, wn / gn.clamp(min=1e-6))
        out.append((g * coef).float())
    return out


@pytest.mark.parametrize(
    ("lam", "eps"), [(0.01, 3.5e38), (3.5e38, 1e-3), (1e-39, 1e38), (1e-40, 3e39), (0.01, 1e-3)]
)
def test_agc_is_right_for_values_outside_fp32(lam: float, eps: float) -> None:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    m(torch.randn(5, 4)).pow(2).sum().mul(100).backward()
    want = _agc_reference(m, lam, eps)
    count = gg.agc_(m, clip_factor=lam, eps=eps)
    for p, w in zip(m.parameters(), want):
        torch.testing.assert_close(p.grad, w)
    assert int(count) >= 0
