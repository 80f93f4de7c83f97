"""The defaults' arithmetic compiled is the defaults' arithmetic, bit for bit.

``GuardConfig(compile=...)`` runs the policy's and the detectors' per-step rules as compiled
kernels (gradguard.core.fuse). Compiling may reorder nothing that changes a result: every kernel
is compared, compiled against eager, on inputs with NaN, infinities, subnormals and ties, and a
guarded run that clips, skips a corrupt batch and a NaN batch and backs off takes the same
actions with the same weights and the same guard state either way. A compiler that fails leaves
the eager function in charge, with nothing lost.

Compiling is slow (seconds per kernel on a loaded CPU): the kernels are compiled once, in the
first test that needs them, and the module stays small.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import Tensor, nn

from gradguard import Guard, GuardConfig
from gradguard.core import clip, fuse
from gradguard.core.fuse import Kernel, check_mode, compiles
from gradguard.decide import detect, policies
from gradguard.guard import response

F32 = torch.float32
TINY = torch.finfo(F32).tiny / 4  # a subnormal


def _same(a: object, b: object) -> None:
    """Equal bit for bit (NaN where NaN), tensor by tensor, dtype and all."""
    if isinstance(a, Tensor):
        assert isinstance(b, Tensor) and a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a.view(-1).nan_to_num(7.0), b.view(-1).nan_to_num(7.0)), (a, b)
        assert torch.equal(a.isnan(), b.isnan()), (a, b)
        return
    assert isinstance(a, tuple) and isinstance(b, tuple) and len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        _same(x, y)


def _check_compiled_is_eager(kernel: Kernel, *args: object) -> None:
    eager = kernel(False, *args)
    compiled = kernel(True, *args)
    assert kernel.failed is None and kernel.compiled, kernel.failed
    _same(compiled, eager)


def _t(*values: float) -> Tensor:
    return torch.tensor(values, dtype=F32)


def _s(value: float, dtype: torch.dtype = F32) -> Tensor:
    return torch.tensor(value, dtype=dtype)


HISTORIES = [
    _t(*[math.nan] * 16),  # empty
    _t(3.0, *[math.nan] * 15),
    _t(1.0, 2.0, 2.0, 3.0, *[math.nan] * 12),  # a tie at the median
    _t(*[TINY * (i + 1) for i in range(16)]),  # subnormal norms
    torch.linspace(0.5, 1e30, 16),
]
NORMS = [0.0, TINY, 1.0, 2.5, 7.0, 1e38, math.inf, math.nan]


def test_median_clip_kernels() -> None:
    for history in HISTORIES:
        for count in (0, 3, 16, 17):
            c = _s(count, torch.int64)
            _check_compiled_is_eager(policies._MEDIAN_LIMIT, history, c, 2.0)
            median, limit = policies._median_limit(history, c, 2.0)
            for g in NORMS:
                for accepted in (True, False):
                    _check_compiled_is_eager(
                        policies._MEDIAN_LEARN, history, c, _s(g), torch.tensor(accepted),
                        median, limit, 2.0,
                    )  # fmt: skip
    h64 = torch.linspace(0.5, 9.0, 16, dtype=torch.float64)  # fp64 statistics for fp64 grads
    _check_compiled_is_eager(policies._MEDIAN_LIMIT, h64, _s(16, torch.int64), 2.0)


LOSSES = [TINY, 0.5, 5.0, 50.0, 1e6, math.inf, math.nan, 0.0, -1.0]


def test_ratio_spike_kernels() -> None:
    histories = [
        _t(*[math.nan] * 8),
        _t(1.0, *[math.nan] * 7),
        _t(1.0, 4.0, 4.0, *[math.nan] * 5),  # a tie at the maximum
        _t(*[TINY] * 8),
    ]
    for history in histories:
        for count in (0, 1, 3, 9):
            c = _s(count, torch.int64)
            for streak in (0, 1):
                st = _s(streak, torch.int64)
                for x in LOSSES:
                    _check_compiled_is_eager(detect._RATIO_CHECK, _s(x), history, c, st, 10.0, 1)
                    above, top, _, _ = detect._ratio_check(_s(x), history, c, st, 10.0, 1)
                    for grads_finite, norm, accepted in (
                        (True, 1.0, True), (True, 1.0, False), (False, math.nan, True),
                        (True, math.inf, True),
                    ):  # fmt: skip
                        _check_compiled_is_eager(
                            detect._RATIO_LEARN, _s(x), torch.tensor(grads_finite), _s(norm),
                            torch.tensor(accepted), above, top, history, c, st, 10.0,
                        )  # fmt: skip


def test_divergence_kernels() -> None:
    det = detect.DivergenceDetector()
    consts = (det.beta, det.warmup, det.cooldown, math.log(det.clip), det.memory)
    states = [
        (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0, 0, 0),
        (1.0, 0.3, 0.1, 0.25, 0.01, 0.002, 1, 0, 0),
        (2.0, 1.5, 0.2, 1.4, -0.01, 0.04, 12, 0, 1),
        (2.0, 0.2, 0.2, 0.2, 0.0, TINY, 40, 3, 2),  # a tie: average at its best
    ]
    for anchor, ema, best, last, dmean, dvar, count, wait, fires in states:
        tensors = (
            *(_s(v) for v in (anchor, ema, best, last, dmean, dvar)),
            *(_s(v, torch.int64) for v in (count, wait, fires)),
        )
        for loss, anchor in ((1.5, 0.0), (1.5, 2.0), (TINY, 3.0), (math.inf, 1.0), (-1.0, 1.0)):
            _check_compiled_is_eager(detect._DIVERGENCE_RATIO, _s(loss), _s(anchor))
        for x, loss in ((0.0, 1.0), (TINY, 1.0), (0.4, 2.0), (3.0, 9.0), (-2.0, 0.1),
                        (math.inf, math.inf), (math.nan, math.nan), (0.0, -1.0)):  # fmt: skip
            for grads_finite, norm in ((True, 1.0), (False, math.nan), (True, math.inf)):
                args = (_s(x), _s(loss), torch.tensor(grads_finite), _s(norm))
                _check_compiled_is_eager(
                    detect._DIVERGENCE_FLAG, *args, tensors[1], tensors[2], tensors[5],
                    tensors[6], tensors[7], det.warmup, det.beta, det.noise, math.log(det.ratio),
                )  # fmt: skip
                _, _, okt = detect._divergence_flag(
                    *args, tensors[1], tensors[2], tensors[5], tensors[6], tensors[7],
                    det.warmup, det.beta, det.noise, math.log(det.ratio),
                )  # fmt: skip
                for accepted, fired in ((True, False), (False, False), (True, True)):
                    _check_compiled_is_eager(
                        detect._DIVERGENCE_LEARN, _s(x), okt, _s(loss), torch.tensor(accepted),
                        torch.tensor(fired), *tensors, *consts,
                    )  # fmt: skip


def test_scale_free_clip_kernel() -> None:
    for limit in (math.inf, 2.0, TINY, 1e30):
        for total in NORMS:
            t = _s(total)
            _check_compiled_is_eager(clip._RATIO_CLIP, _s(limit), t, t.isfinite())


def test_flag_vector_and_skip_kernels() -> None:
    # Fresh tensors for every argument, as in a guarded step (compiled code is specialized on
    # which arguments are the same tensor, too).
    def b(v: bool) -> Tensor:
        return torch.tensor(v)

    mask = _t(0.0, 1.0, 1.0, 1.0, 0.0)  # clipped never skips; the last detector only logs
    for clipped, grads_ok, loss_ok in itertools.product((False, True), repeat=3):
        for bad in (None, False, True):
            for amp in (False, True):
                for detected in ((False, True), (True, True)):
                    args = (b(clipped), b(grads_ok), b(loss_ok), None if bad is None else b(bad))
                    _check_compiled_is_eager(response._FLAGS, *args, amp, [b(d) for d in detected])
                    flags, _ = response._flags(*args, amp, [b(d) for d in detected])
                    _check_compiled_is_eager(response._SKIP, flags, mask, b(grads_ok), b(loss_ok))


# -- a guarded run, compiled and eager ----------------------------------------------------------


def _run(compile: bool) -> tuple[list[str], list[Tensor], dict]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    guard = Guard(model, opt, config=GuardConfig(compile=compile))
    g = torch.Generator().manual_seed(1)
    w = torch.randn(8, 1, generator=g)
    actions = []
    for i in range(50):
        if i == 30:  # too high a learning rate from here: clips and a back-off
            opt.param_groups[0]["lr"] = 1.0
        x = torch.randn(16, 8, generator=g)
        y = torch.sin(x @ w) * (1e3 if i == 8 else 1.0)  # a corrupt batch
        if i == 15:
            x[0, 0] = math.nan
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        actions.append(guard.step(loss).action)
        opt.zero_grad(set_to_none=True)
    return actions, [p.detach().clone() for p in model.parameters()], guard.state_dict()


def _same_state(a: object, b: object) -> None:
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        for k in a:
            _same_state(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _same_state(x, y)
    elif isinstance(a, Tensor):
        _same(a, b)
    else:
        assert a == b or (a != a and b != b), (a, b)  # NaN floats are equal here


def test_a_compiled_guard_takes_the_eager_guards_steps_bit_for_bit() -> None:
    eager_actions, eager_weights, eager_state = _run(compile=False)
    actions, weights, state = _run(compile=True)
    kernels = [
        policies._MEDIAN_LIMIT, policies._MEDIAN_LEARN, clip._RATIO_CLIP, detect._RATIO_CHECK,
        detect._RATIO_LEARN, detect._DIVERGENCE_RATIO, detect._DIVERGENCE_FLAG,
        detect._DIVERGENCE_LEARN, response._FLAGS, response._SKIP,
    ]  # fmt: skip
    assert all(k.compiled for k in kernels), [k.name for k in kernels if not k.compiled]
    assert {"step", "clip", "skip", "backoff"} <= set(eager_actions), eager_actions
    assert actions == eager_actions
    for got, want in zip(weights, eager_weights, strict=True):
        assert torch.equal(got, want)
    _same_state(state, eager_state)


# -- modes and the fallback ----------------------------------------------------------------------


def test_modes() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert compiles(True, cpu) and compiles(None, cuda) and compiles(True, cuda)
    assert not compiles(None, cpu) and not compiles(False, cuda)
    for bad in ("yes", 1, 0.0):
        with pytest.raises(TypeError, match="compile must be True"):
            GuardConfig(compile=bad)  # type: ignore[arg-type]
    assert check_mode("compile", None) is None
    guard = Guard(nn.Linear(2, 1), torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=0.1))
    assert guard.config.compile is None  # default: compile on CUDA only
    assert all(d.fuse is None for d in (guard.policy, *guard.detectors, guard.responder))


def test_a_compiler_failure_falls_back_to_eager(monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    def broken(*args: object, **kwargs: object) -> object:
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(fuse.torch, "compile", broken)
    k = Kernel(lambda x, c: torch.where(x > c, c, x))
    x = _t(1.0, 3.0)
    with caplog.at_level("WARNING", logger="gradguard.core.fuse"):
        assert torch.equal(k(True, x, 2.0), _t(1.0, 2.0))
        assert torch.equal(k(True, x, 2.0), _t(1.0, 2.0))  # eager from now on, logged once
    assert k.failed == "RuntimeError: no C++ compiler" and not k.compiled
    assert sum("runs eagerly" in r.message for r in caplog.records) == 1
    assert torch.equal(x, _t(1.0, 3.0))  # the arguments are untouched
