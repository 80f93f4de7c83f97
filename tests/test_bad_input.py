"""Every bad input of issue 2 gets a clear ValueError/TypeError naming the argument, and no
gradient changes."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import nn

import gradguard as gg
from tests._grads import exact


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
        exact(p.grad, b)


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
            exact(p.grad, b)


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
    exact(t, torch.ones(3))


def test_foreach_true_on_a_device_without_foreach_support_raises_like_torch():
    g = torch.ones(3, device="meta")
    with pytest.raises(RuntimeError, match="foreach=True"):
        gg.get_total_norm([g], foreach=True)
