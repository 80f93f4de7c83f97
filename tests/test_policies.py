"""Clipping policies against slow plain-Python references and against the real peer packages
(zclip 1.0.0, autoclip 0.2.1), including the NaN cases where the peers' statistics break."""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch
from autoclip.torch import QuantileClip as AutoQuantileClip
from autoclip.torch import StandardClip as AutoStandardClip
from hypothesis import given, settings
from hypothesis import strategies as st
from zclip import ZClip

from gradguard.core.agc import agc_
from gradguard.core.clip import Clipped
from gradguard.core.norms import GradNorms, get_total_norm, grad_norms
from gradguard.decide.policies import (
    AGCPolicy,
    EMARatioClip,
    FixedThreshold,
    MedianClip,
    QuantileClip,
    ZScoreClip,
)
from tests import conformance as C

F64 = torch.float64
INF = math.inf


def coef(limit: float, norm: float) -> float:
    """torch's clip coefficient, the one the guard (and simulate_clip) uses."""
    return min(1.0, limit / (norm + 1e-6))


def norms64(values: list[float]) -> GradNorms:
    return C.make_norms(values, F64, torch.device("cpu"))


def drive(policy, totals: list[list[float]]) -> list[list[float]]:  # type: ignore[no-untyped-def]
    """Thresholds (as floats) of ``policy`` over per-tensor norm lists, guard-style."""
    out = []
    for values in totals:
        limit = C.drive_policy(policy, [norms64(values)])[0]
        out.append(limit.reshape(-1).tolist())
    return out


# ------------------------------------------------------------------------ plain references


def ref_quantile(
    totals: list[float], q: float, history: int, warmup: int, max_norm: float | None, feed: str
) -> list[float]:
    hist: list[float] = []
    out = []
    for g in totals:
        if len(hist) >= warmup:
            s = sorted(hist)
            pos = q * (len(s) - 1)
            lo, hi = math.floor(pos), math.ceil(pos)
            t = s[lo] + (s[hi] - s[lo]) * (pos - lo)
        else:
            t = INF if max_norm is None else max_norm
        if max_norm is not None:
            t = min(t, max_norm)
        out.append(t)
        if math.isfinite(g):
            hist = [*hist, g if feed == "raw" else g * coef(t, g)][-history:]
    return out


def ref_zclip(
    totals: list[float],
    alpha: float = 0.97,
    zt: float = 2.5,
    warmup: int = 25,
    mode: str = "adaptive",
    max_norm: float | None = None,
    eps: float = 1e-6,
    learn: str = "threshold",
) -> tuple[list[float], float, float]:
    """ZClip's rule, never fed a NaN. ``learn="threshold"`` (ZClip, the paper, ours) learns
    ``min(g, t)``; ``"post_clip"`` the post-clip norm ``g * coef(t, g)`` (our old rule)."""
    warm: list[float] = []
    mean = var = 0.0
    out = []
    for g in totals:
        if len(warm) < warmup:
            t = INF if max_norm is None else max_norm
        else:
            std = math.sqrt(var)
            z = (g - mean) / (std + eps)
            if mode == "zscore":
                t = mean + zt * std
            elif z > zt:
                t = mean + zt * zt * std / z if mode == "adaptive" else mean
            else:
                t = INF
            if max_norm is not None:
                t = min(t, max_norm)
        out.append(t)
        if not math.isfinite(g):
            continue  # the point: a NaN/inf norm teaches nothing
        c = min(g, t) if learn == "threshold" else g * coef(t, g)
        if len(warm) < warmup:
            warm.append(c)
            if len(warm) == warmup:
                mean = sum(warm) / warmup
                var = sum((x - mean) ** 2 for x in warm) / warmup
        else:
            mean = alpha * mean + (1 - alpha) * c
            var = alpha * var + (1 - alpha) * (c - mean) ** 2
    return out, mean, var


def ref_ema_ratio(
    steps: list[list[float]], ratio: float, beta: float, warmup: int, max_norm: float | None
) -> list[list[float]]:
    n = len(steps[0])
    gamma: list[float | None] = [None] * n
    count = 0
    out = []
    for per in steps:
        total = math.sqrt(sum(v * v for v in per))
        if count < warmup:
            if max_norm is None or not total > max_norm:
                limits = [INF] * n
            else:
                limits = [v * max_norm / total for v in per]
        else:
            limits = [INF if g is None else ratio * g for g in gamma]
        out.append(limits)
        if not math.isfinite(total):
            continue
        for i, (v, t) in enumerate(zip(per, limits)):
            c = v * coef(t, v)
            if not (math.isfinite(c) and c > 0):
                continue
            g = gamma[i]
            if count < warmup:
                gamma[i] = c if g is None else min(g, c)
            else:
                gamma[i] = c if g is None else beta * g + (1 - beta) * c
        count += 1
    return out


def close(a: list[float], b: list[float], rel: float = 1e-9) -> bool:
    return all(
        x == y or math.isclose(x, y, rel_tol=rel, abs_tol=1e-12) for x, y in zip(a, b, strict=True)
    )


norm_lists = st.lists(
    st.one_of(
        st.floats(0.05, 20.0),
        st.sampled_from([float("nan"), float("inf"), 500.0, 0.0]),
    ),
    min_size=1,
    max_size=60,
)


# ----------------------------------------------------------------------- against references


@settings(max_examples=30, deadline=None)
@given(
    totals=norm_lists,
    q=st.floats(0.0, 1.0),
    history=st.integers(1, 12),
    warmup=st.integers(1, 12),
    max_norm=st.one_of(st.none(), st.floats(0.5, 10.0)),
    feed=st.sampled_from(["raw", "clipped"]),
)
def test_quantile_matches_reference(
    totals: list[float], q: float, history: int, warmup: int, max_norm: float | None, feed: str
) -> None:
    warmup = min(warmup, history)
    policy = QuantileClip(q, history, warmup, max_norm, feed)
    got = [t[0] for t in drive(policy, [[g] for g in totals])]
    assert close(got, ref_quantile(totals, q, history, warmup, max_norm, feed))


@settings(max_examples=30, deadline=None)
@given(
    totals=norm_lists,
    alpha=st.floats(0.0, 0.99),
    zt=st.floats(0.5, 4.0),
    warmup=st.integers(1, 8),
    mode=st.sampled_from(["adaptive", "zscore", "mean"]),
    max_norm=st.one_of(st.none(), st.floats(0.5, 10.0)),
)
def test_zscore_matches_reference(
    totals: list[float], alpha: float, zt: float, warmup: int, mode: str, max_norm: float | None
) -> None:
    policy = ZScoreClip(alpha, zt, warmup, mode, max_norm)
    got = [t[0] for t in drive(policy, [[g] for g in totals])]
    want, mean, var = ref_zclip(totals, alpha, zt, warmup, mode, max_norm)
    assert close(got, want)
    if len([g for g in totals if math.isfinite(g)]) >= warmup:
        state = policy.state_dict()["state"]
        assert math.isclose(float(state["mean"]), mean, rel_tol=1e-9, abs_tol=1e-12)
        assert math.isclose(float(state["var"]), var, rel_tol=1e-9, abs_tol=1e-12)


@settings(max_examples=30, deadline=None)
@given(
    steps=st.lists(
        st.lists(st.floats(0.0, 20.0), min_size=3, max_size=3).map(
            lambda v: [*v[:2], v[2] * 1e4 if v[2] > 19 else v[2]]
        ),
        min_size=1,
        max_size=40,
    ),
    bad=st.sets(st.integers(0, 39), max_size=4),
    ratio=st.floats(1.0, 2.0),
    beta=st.floats(0.0, 0.99),
    warmup=st.integers(0, 6),
    max_norm=st.one_of(st.none(), st.floats(0.5, 10.0)),
)
def test_ema_ratio_matches_reference(
    steps: list[list[float]],
    bad: set[int],
    ratio: float,
    beta: float,
    warmup: int,
    max_norm: float | None,
) -> None:
    steps = [[float("nan"), *s[1:]] if i in bad else s for i, s in enumerate(steps)]
    policy = EMARatioClip(ratio, beta, warmup, max_norm)
    got = drive(policy, steps)
    want = ref_ema_ratio(steps, ratio, beta, warmup, max_norm)
    for g, w in zip(got, want, strict=True):
        assert close(g, w)


def test_fixed_threshold() -> None:
    policy = FixedThreshold(2.5)
    for values in ([1.0], [100.0, 3.0], [float("nan")]):
        limit = policy.threshold(norms64(values))
        assert limit.dtype == F64 and float(limit) == 2.5


def test_agc_policy_equals_agc_and_never_clips_globally() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    model(torch.randn(5, 6)).pow(2).sum().mul(100).backward()
    twin = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    twin.load_state_dict(model.state_dict())
    for p, q in zip(model.parameters(), twin.parameters()):
        q.grad = p.grad.clone()  # type: ignore[union-attr]
    policy = AGCPolicy(0.01, exclude=["2"])
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    c = policy.clip_(grads, grad_norms(grads), model)
    count = agc_(twin, 0.01, exclude=["2"])
    assert bool(c.clipped) and int(count) > 0
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p.grad, q.grad)  # type: ignore[arg-type]
    assert float(policy.threshold(grad_norms(grads))) == INF


# ------------------------------------------------------------------ against the real ZClip


def _spiky_sequence(n: int = 90, seed: int = 0) -> list[float]:
    g = torch.Generator().manual_seed(seed)
    seq = (1.0 + 0.1 * torch.randn(n, generator=g, dtype=F64)).abs().tolist()
    for i, v in {40: 50.0, 41: 8.0, 60: 30.0, 75: 400.0}.items():
        if i < n:
            seq[i] = v
    return seq


def _zclip_model() -> tuple[torch.nn.Module, torch.nn.Parameter]:
    # One scalar parameter: its gradient norm is exactly the value we put in it.
    p = torch.nn.Parameter(torch.zeros(1, dtype=F64))
    m = torch.nn.Module()
    m.p = p
    return m, p


def _real_zclip_run(seq: list[float], **kw: object) -> tuple[list[float], list[float], ZClip]:
    """The real package's threshold (read before each step) and post-clip norm per step."""
    m, p = _zclip_model()
    zc = ZClip(max_grad_norm=None, **kw)  # type: ignore[arg-type]
    thresholds, clipped = [], []
    for g in seq:
        t = zc._compute_clip_val(g) if zc.initialized else None
        thresholds.append(INF if t is None else t)
        p.grad = torch.tensor([g], dtype=F64)
        zc.step(m)
        clipped.append(abs(p.grad.item()))
    return thresholds, clipped, zc


ZCLIP_MODES = [
    ("adaptive", {"mode": "zscore", "clip_option": "adaptive_scaling"}),
    ("zscore", {"mode": "percentile"}),
    ("mean", {"mode": "zscore", "clip_option": "mean"}),
]


def _ours_through_clip(policy: ZScoreClip, seq: list[float]) -> tuple[list[float], list[float]]:
    """Thresholds and post-clip norms of ``policy`` run the guard's way, on a real gradient:
    ``clip_`` in place, then ``update`` with what it returned."""
    p = torch.nn.Parameter(torch.zeros(1, dtype=F64))
    thresholds, clipped = [], []
    for g in seq:
        p.grad = torch.tensor([g], dtype=F64)
        norms = grad_norms([p.grad])
        limit = float(policy.threshold(norms))
        c = policy.clip_([p.grad], norms, [p])
        policy.update(norms, c.learn, torch.tensor(True))
        thresholds.append(limit)
        clipped.append(abs(p.grad.item()))
    return thresholds, clipped


@pytest.mark.parametrize("scale", [1.0, 1e-3, 1e-4])
@pytest.mark.parametrize(("ours", "theirs"), ZCLIP_MODES, ids=[m[0] for m in ZCLIP_MODES])
def test_zscore_equals_real_zclip_on_a_clean_spiky_sequence(
    ours: str, theirs: dict, scale: float
) -> None:
    # Norms of order 1e-3 and 1e-4 are where learning the post-clip norm drifted from ZClip
    # (1.5e-4 and 1.5e-3 relative): torch's coefficient shrinks it by 1e-6 / g.
    seq = [v * scale for v in _spiky_sequence()]
    want_t, want_c, zc = _real_zclip_run(seq, **theirs)
    policy = ZScoreClip(mode=ours)  # the paper's defaults: 0.97, 2.5, 25
    got_t, got_c = _ours_through_clip(policy, seq)
    # The package reports a threshold only where it binds (norm above it); so do we here.
    got_t = [t if g > t else INF for g, t in zip(seq, got_t)]
    assert close(got_t, want_t, rel=1e-12)
    assert close(got_c, want_c, rel=1e-12)
    assert sum(t < INF for t in want_t) >= 3 or ours == "zscore"  # the spikes were clipped
    state = policy.state_dict()["state"]
    assert math.isclose(float(state["mean"]), zc.mean, rel_tol=1e-12)
    assert math.isclose(float(state["var"]), zc.var, rel_tol=1e-12)


@pytest.mark.parametrize("scale", [1e-3, 1e-4])
def test_learning_the_post_clip_norm_would_drift_from_zclip_at_small_norms(scale: float) -> None:
    """The regression the test above guards: the old rule is measurably off at these scales."""
    seq = [v * scale for v in _spiky_sequence()]
    _, _, zc = _real_zclip_run(seq)
    _, old_mean, _ = ref_zclip(seq, learn="post_clip")
    _, new_mean, _ = ref_zclip(seq)
    assert abs(old_mean - zc.mean) / zc.mean > 1e-5
    assert math.isclose(new_mean, zc.mean, rel_tol=1e-12)


def test_real_zclip_is_poisoned_by_one_nan_and_ours_is_not() -> None:
    seq = _spiky_sequence()
    seq[30] = float("nan")
    thresholds, clipped, zc = _real_zclip_run(seq)
    # The package: one NaN norm makes its running mean NaN for good, so the 50x and 400x
    # spikes after it pass through unclipped.
    assert math.isnan(zc.mean) and math.isnan(zc.var)
    assert clipped[40] == 50.0 and clipped[75] == 400.0
    assert all(t == INF for t in thresholds[31:])
    # Ours: statistics finite and equal to the reference that ignores the NaN; spikes clipped.
    policy = ZScoreClip()
    got = [t[0] for t in drive(policy, [[g] for g in seq])]
    want, mean, _ = ref_zclip(seq)
    assert close(got, want)
    state = policy.state_dict()["state"]
    assert math.isfinite(float(state["mean"])) and math.isclose(float(state["mean"]), mean)
    assert got[40] < 2.0 and got[75] < 2.0


def test_zscore_statistics_are_not_inflated_by_the_spike_they_clip() -> None:
    seq = _spiky_sequence()
    policy = ZScoreClip()
    drive(policy, [[g] for g in seq[:40]])
    before = float(policy.state_dict()["state"]["mean"])
    limit = drive(policy, [[1e6]])[0][0]  # a million-fold spike
    after = float(policy.state_dict()["state"]["mean"])
    assert limit < 2.0
    # The mean moved by (1 - alpha) of the clipped value, not of the spike.
    assert after - before <= 0.03 * limit + 1e-9


# --------------------------------------------------------- clip_: the one in-place apply

CLIP_POLICIES = {
    "fixed": lambda: FixedThreshold(0.7),
    "quantile": lambda: QuantileClip(quantile=0.5, history=16, warmup=5),
    "zclip": lambda: ZScoreClip(warmup=5),
    "zclip-capped": lambda: ZScoreClip(warmup=5, mode="zscore", max_norm=2.0),
    "ema-ratio": lambda: EMARatioClip(warmup=5, max_norm=2.0),
    "agc": lambda: AGCPolicy(0.02),
}
SHAPES = [(6, 5), (5,), (3, 6), (1,)]


def _model_steps(steps: int, seed: int = 0) -> list[list[torch.Tensor]]:
    """Per step, fp32 gradients for SHAPES: log-normal scale around 1, spikes at 12 and 17."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for step in range(steps):
        scale = math.exp(0.2 * float(torch.randn((), generator=g)))
        scale *= {12: 40.0, 17: 300.0}.get(step, 1.0)
        out.append([torch.randn(s, generator=g) * scale for s in SHAPES])
    return out


def _params(grads: list[torch.Tensor]) -> list[torch.nn.Parameter]:
    ps = []
    for i, gr in enumerate(grads):
        p = torch.nn.Parameter(torch.full(gr.shape, 0.5 + 0.1 * i))
        p.grad = gr.clone()
        ps.append(p)
    return ps


def _reference_clip_(policy, params, norms: GradNorms) -> None:  # type: ignore[no-untyped-def]
    """The slow reference for one step, on twin gradients: torch's own clip for a global
    threshold, a per-tensor loop of torch's rule for a list, timm-equal agc_ for AGC."""
    grads = [p.grad for p in params]
    if isinstance(policy, AGCPolicy):
        agc_(params, policy.clip_factor, policy.eps)
        return
    limit = policy.threshold(norms)
    if isinstance(limit, torch.Tensor):
        torch.nn.utils.clip_grads_with_norm_(params, limit, norms.total)
        return
    for gr, t, n in zip(grads, limit, norms.per_tensor):
        gr.mul_(torch.clamp(float(t) / (n + 1e-6), max=1.0))  # torch's rule with a float bound


@pytest.mark.parametrize("name", CLIP_POLICIES)
def test_clip_of_every_policy_equals_the_reference_bit_for_bit(name: str) -> None:
    policy, twin = CLIP_POLICIES[name](), CLIP_POLICIES[name]()
    any_clipped = False
    for step, grads in enumerate(_model_steps(24)):
        ours, theirs = _params(grads), _params(grads)
        norms = grad_norms([p.grad for p in ours])
        _reference_clip_(twin, theirs, grad_norms([p.grad for p in theirs]))
        c = policy.clip_([p.grad for p in ours], norms, ours)
        assert isinstance(c, Clipped)
        for p, q in zip(ours, theirs):
            assert torch.equal(p.grad, q.grad), f"{name}: step {step}"  # type: ignore[arg-type]
        # The report: post-clip total as measured, threshold, and the clipped flag.
        after = get_total_norm([p.grad for p in ours])
        torch.testing.assert_close(c.total, after, rtol=1e-6, atol=0)
        assert c.threshold.dtype == c.total.dtype == torch.float32 and c.clipped.dtype == torch.bool
        moved = any(not torch.equal(p.grad, g) for p, g in zip(ours, grads))  # type: ignore[arg-type]
        assert bool(c.clipped) == moved, f"{name}: step {step}"
        any_clipped |= moved
        if isinstance(c.learn, list):
            for n, p in zip(c.learn, ours):
                torch.testing.assert_close(n, torch.linalg.vector_norm(p.grad), rtol=1e-6, atol=0)
        # Both learn the same thing, so that each step compares one clip on one threshold.
        policy.update(norms, c.learn, torch.tensor(True))
        twin.update(grad_norms(grads), c.learn, torch.tensor(True))
    assert any_clipped, f"{name}: the sequence never clipped"


def test_fixed_threshold_clip_is_torch_clip_grad_norm() -> None:
    for max_norm in (0.3, 1.0, 50.0):
        grads = _model_steps(1, seed=3)[0]
        ours, theirs = _params(grads), _params(grads)
        want = torch.nn.utils.clip_grad_norm_(theirs, max_norm)
        c = FixedThreshold(max_norm).clip_([p.grad for p in ours], grad_norms(grads), ours)
        for p, q in zip(ours, theirs):
            assert torch.equal(p.grad, q.grad)  # type: ignore[arg-type]
        assert bool(c.clipped) == bool(want > max_norm + 1e-6)
        assert float(c.threshold) == pytest.approx(max_norm)


@pytest.mark.parametrize("poison", [math.nan, math.inf])
@pytest.mark.parametrize("name", [n for n in CLIP_POLICIES if n != "agc"])
def test_a_nonfinite_norm_leaves_every_gradient_untouched(name: str, poison: float) -> None:
    policy = CLIP_POLICIES[name]()
    for grads in _model_steps(8):  # past every warm-up's start: thresholds are finite
        norms = grad_norms(grads)
        c = policy.clip_(grads, norms, _params(grads))
        policy.update(norms, c.learn, norms.finite)
    grads = [g * 1e3 for g in _model_steps(1, seed=5)[0]]  # would be clipped if finite
    grads[1][2] = poison
    before = [g.clone() for g in grads]
    norms = grad_norms(grads)
    c = policy.clip_(grads, norms, _params(grads))
    for g, b in zip(grads, before):
        assert C.same(g, b)
    assert not bool(c.clipped) and not bool(c.total.isfinite())


@pytest.mark.parametrize("name", CLIP_POLICIES)
def test_clip_and_update_never_read_the_device(name: str) -> None:
    policy = CLIP_POLICIES[name]()
    steps = _model_steps(20)
    params = [_params(g) for g in steps]
    results = []
    with C.no_host_sync():  # any .item()/.tolist()/bool() on a tensor raises in here
        for grads, ps in zip(steps, params):
            norms = grad_norms(grads)
            c = policy.clip_(grads, norms, ps)
            policy.update(norms, c.learn, norms.finite)
            results.append(c.total)
    assert len(results) == 20 and all(bool(t.isfinite()) for t in results)


def test_agc_clip_equals_agc_and_needs_the_weights() -> None:
    grads = [g * 50 for g in _model_steps(1)[0]]
    ours, theirs = _params(grads), _params(grads)
    c = AGCPolicy(0.01).clip_([p.grad for p in ours], grad_norms(grads), ours)
    count = agc_(theirs, 0.01)
    assert int(count) > 0 and bool(c.clipped) and float(c.threshold) == INF
    for p, q in zip(ours, theirs):
        assert torch.equal(p.grad, q.grad)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="params"):
        AGCPolicy().clip_(grads, grad_norms(grads))


# --------------------------------------------------------------- against the real autoclip


def _scalar_param() -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.zeros(1, dtype=F64))


def test_quantile_equals_real_autoclip_on_a_clean_sequence() -> None:
    seq = _spiky_sequence(60)
    p = _scalar_param()
    auto = AutoQuantileClip([p], quantile=0.9, history_length=20, global_threshold=True)
    policy = QuantileClip(quantile=0.9, history=20, warmup=1)  # AutoClip has no warm-up
    for g in seq:
        p.grad = torch.tensor([g], dtype=F64)
        auto.step()
        n = norms64([g])
        _, c = C.simulate_clip(policy, n)
        policy.update(n, c, torch.tensor(True))
        assert math.isclose(abs(p.grad.item()), float(c), rel_tol=1e-12)  # type: ignore[arg-type]


def test_real_autoclip_quantile_turns_gradients_nan_after_one_nan_and_ours_does_not() -> None:
    seq = _spiky_sequence(40)
    seq[10] = float("nan")
    p = _scalar_param()
    auto = AutoQuantileClip([p], quantile=0.9, history_length=20, global_threshold=True)
    theirs = []
    for g in seq:
        p.grad = torch.tensor([g], dtype=F64)
        auto.step()
        theirs.append(p.grad.item())
    # Every finite gradient after the NaN is destroyed while the NaN sits in the history.
    assert all(math.isnan(x) for x in theirs[11:30])
    policy = QuantileClip(quantile=0.9, history=20, warmup=1)
    got = [t[0] for t in drive(policy, [[g] for g in seq])]
    assert not any(math.isnan(t) for t in got)
    assert close(got, ref_quantile(seq, 0.9, 20, 1, None, "raw"))


@pytest.mark.filterwarnings("ignore:std\\(\\). degrees of freedom is <= 0:UserWarning")
def test_real_autoclip_standard_clip_is_nan_on_its_second_step() -> None:
    p = _scalar_param()
    auto = AutoStandardClip([p], deviations=2.0, history_length=10, global_threshold=True)
    out = []
    for g in (1.0, 1.1, 0.9):
        p.grad = torch.tensor([g], dtype=F64)
        auto.step()
        out.append(p.grad.item())
    assert out[0] == 1.0 and math.isnan(out[1])
    # Ours on the same norms: a threshold that is never NaN, from the first step on.
    for policy in (QuantileClip(warmup=1), ZScoreClip(warmup=1)):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got = drive(policy, [[1.0], [1.1], [0.9]])
        assert not any(math.isnan(t[0]) for t in got)


# ------------------------------------------------------------------- behaviour we chose


def test_quantile_fed_clipped_values_ratchets_down_and_raw_follows_growth() -> None:
    growing = [1.0 + 0.05 * i for i in range(200)]  # norms grow, e.g. during an LR warm-up
    raw = drive(QuantileClip(0.9, history=50, warmup=10), [[g] for g in growing])
    clipped = drive(QuantileClip(0.9, 50, 10, feed="clipped"), [[g] for g in growing])
    assert raw[-1][0] > 8.0  # follows the 90th percentile of the recent norms
    assert clipped[-1][0] <= clipped[10][0] + 1e-12  # never rose after warm-up


def test_quantile_threshold_moves_one_rank_whatever_the_spike() -> None:
    base = [1.0 + 0.01 * i for i in range(30)]
    a = drive(QuantileClip(0.5, 100, 5), [[g] for g in [*base, 10.0, 1.1]])
    b = drive(QuantileClip(0.5, 100, 5), [[g] for g in [*base, 1e9, 1.1]])
    assert a[-1] == b[-1]


def test_warmup_behaviour_is_explicit() -> None:
    seq = [[1.0], [1.2], [50.0], [0.9]]
    assert all(t[0] == INF for t in drive(ZScoreClip(warmup=4), seq))
    assert all(t[0] == 2.0 for t in drive(ZScoreClip(warmup=4, max_norm=2.0), seq))
    assert all(t[0] == INF for t in drive(QuantileClip(warmup=4, history=8), seq))
    assert all(t[0] == 3.0 for t in drive(QuantileClip(warmup=4, history=8, max_norm=3), seq))


def test_ema_ratio_warmup_is_global_clipping() -> None:
    torch.manual_seed(0)
    grads = [torch.randn(5, 3) * s for s in (1.0, 4.0, 0.2)]
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    ref = [p.grad for p in params]
    policy = EMARatioClip(warmup=3, max_norm=1.0)
    norms = grad_norms(grads)
    limits = policy.threshold(norms)
    assert isinstance(limits, list) and len(limits) == 3
    for g, n, t in zip(grads, norms.per_tensor, limits):
        g.mul_((t / (n + 1e-6)).clamp(max=1.0))
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7)


def test_ema_ratio_clips_each_tensor_to_its_own_history() -> None:
    policy = EMARatioClip(ratio=1.05, beta=0.9, warmup=2, max_norm=None)
    steps = [[1.0, 10.0]] * 6 + [[1.0, 200.0]]
    limits = drive(policy, steps)
    assert limits[-1][0] == pytest.approx(1.05) and limits[-1][1] == pytest.approx(10.5)


def test_ema_ratio_ignores_zero_norms_and_refuses_a_changed_tensor_count() -> None:
    policy = EMARatioClip(warmup=1, max_norm=None)
    limits = drive(policy, [[0.0, 1.0], [0.0, 1.0], [3.0, 1.0]])
    assert limits[-1][0] == INF  # a zero norm never set gamma (it would freeze the tensor)
    with pytest.raises(ValueError, match="fitted to 2 gradients"):
        policy.threshold(norms64([1.0, 1.0, 1.0]))


# ------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: FixedThreshold(0), "max_norm"),
        (lambda: FixedThreshold(float("nan")), "max_norm"),
        (lambda: QuantileClip(quantile=1.5), "quantile"),
        (lambda: QuantileClip(history=0), "history"),
        (lambda: QuantileClip(history=4, warmup=5), "warmup"),
        (lambda: QuantileClip(feed="pre"), "feed"),
        (lambda: QuantileClip(max_norm=-1.0), "max_norm"),
        (lambda: ZScoreClip(alpha=1.0), "alpha"),
        (lambda: ZScoreClip(z_thresh=0), "z_thresh"),
        (lambda: ZScoreClip(warmup=0), "warmup"),
        (lambda: ZScoreClip(mode="percentile"), "mode"),
        (lambda: EMARatioClip(ratio=0), "ratio"),
        (lambda: EMARatioClip(beta=-0.1), "beta"),
        (lambda: EMARatioClip(warmup=-1), "warmup"),
        (lambda: AGCPolicy(clip_factor=0), "clip_factor"),
        (lambda: AGCPolicy(eps=float("inf")), "eps"),
    ],
)
def test_bad_arguments_are_named(make, match: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def test_bad_state_changes_nothing() -> None:
    policy = ZScoreClip(warmup=2)
    drive(policy, [[1.0], [2.0], [1.5]])
    before = policy.state_dict()
    bad = {**before, "alpha": 2.0}
    with pytest.raises(ValueError, match="alpha"):
        policy.load_state_dict(bad)
    with pytest.raises(ValueError, match="lacks keys"):
        policy.load_state_dict({"alpha": 0.9})
    after = policy.state_dict()
    assert after["alpha"] == before["alpha"]
    assert all(C.same(after["state"][k], before["state"][k]) for k in before["state"])


def test_global_policies_refuse_a_list_of_clipped_norms() -> None:
    n = norms64([1.0, 2.0])
    for policy in (QuantileClip(), ZScoreClip()):
        with pytest.raises(TypeError, match="global policy"):
            policy.update(n, list(n.per_tensor), torch.tensor(True))
    with pytest.raises(TypeError, match="per-tensor"):
        EMARatioClip().update(n, n.total, torch.tensor(True))


def test_zscore_is_zero_in_warmup_then_the_standard_score() -> None:
    policy = ZScoreClip(warmup=3)
    seq = [1.0, 2.0, 3.0]
    for i, g in enumerate(seq):
        assert float(policy.zscore(norms64([10.0]))) == 0.0, i
        drive(policy, [[g]])
    mean = sum(seq) / 3
    std = math.sqrt(sum((x - mean) ** 2 for x in seq) / 3)
    want = (10.0 - mean) / (std + 1e-6)
    assert float(policy.zscore(norms64([10.0]))) == pytest.approx(want, rel=1e-12)


# ------------------------------------------------------------------------------ median clip


def ref_median_clip(values: list[float], factor: float, window: int) -> list[float]:
    """MedianClip in plain Python: the threshold is ``factor`` x the lower median of the last
    ``window`` stored values (``inf`` before the first); an accepted finite nonzero norm is
    stored as ``min(norm, threshold)``, or as the median when it is above ``factor`` x the
    threshold (an explosion)."""
    stored: list[float] = []
    out = []
    for v in values:
        recent = sorted(stored[-window:])
        median = recent[(len(recent) - 1) // 2] if recent else math.nan
        limit = factor * median if recent else math.inf
        out.append(limit)
        if math.isfinite(v) and v > 0:
            stored.append(median if v > factor * limit else min(v, limit))
    return out


@settings(max_examples=40, deadline=None)
@given(
    values=st.lists(
        st.one_of(st.floats(1e-3, 1e3), st.sampled_from([math.nan, math.inf, 0.0])),
        min_size=1,
        max_size=40,
    ),
    factor=st.sampled_from([1.5, 2.0, 3.0]),
    window=st.integers(1, 9),
)
def test_median_clip_matches_reference(values: list[float], factor: float, window: int) -> None:
    policy = MedianClip(factor=factor, window=window)
    got = C.drive_policy(
        policy, [C.make_norms([v], torch.float32, torch.device("cpu")) for v in values]
    )
    want = ref_median_clip(
        [float(torch.tensor(v, dtype=torch.float32)) for v in values], factor, window
    )
    for i, (t, w) in enumerate(zip(got, want)):
        assert float(t) == pytest.approx(w, rel=1e-6), i


def test_median_clip_clips_with_the_exact_ratio_and_never_at_step_0() -> None:
    policy = MedianClip()
    first = [torch.tensor([3.0, 4.0])]  # norm 5: nothing to compare it with, not clipped
    c = policy.clip_(first, grad_norms(first))
    assert not bool(c.clipped) and torch.equal(first[0], torch.tensor([3.0, 4.0]))
    policy.update(grad_norms([torch.tensor([3.0, 4.0])]), c.learn, torch.tensor(True))
    big = [torch.tensor([300.0, 400.0])]  # norm 500: clipped to 2 x 5, by 10 / 500 exactly
    c = policy.clip_(big, grad_norms([torch.tensor([300.0, 400.0])]))
    assert bool(c.clipped) and float(c.threshold) == 10.0
    assert torch.equal(big[0], torch.tensor([300.0, 400.0]) * (torch.tensor(10.0) / 500.0))


def test_median_clip_follows_a_healthy_rise_and_clips_an_explosion() -> None:
    def clipped_steps(norms: list[float]) -> list[int]:
        policy = MedianClip()
        seq = [C.make_norms([v], torch.float32, torch.device("cpu")) for v in norms]
        limits = C.drive_policy(policy, seq)
        return [i for i, (v, t) in enumerate(zip(norms, limits)) if v > float(t)]

    # A CNN's healthy norm grows tenfold over its first ~50 steps (5% a step): never clipped.
    assert clipped_steps([0.5 * 1.05**i for i in range(120)]) == []
    # A norm 100x its run's typical one is clipped at once, whatever the units.
    assert clipped_steps([1.0] * 20 + [100.0] + [1.0] * 5) == [20]
    # An explosion (40% a step) is clipped at every step it lasts: the threshold can only rise
    # by the factor (2) per half window (8 accepted steps), 9% a step.
    assert clipped_steps([1.0] * 16 + [1.4**i for i in range(1, 30)]) == list(range(18, 45))


def test_median_clip_is_never_dragged_below_the_healthy_norm() -> None:
    # Every step above the threshold (a plateau twice the old level, then 3x): each stored
    # value is the threshold itself, so the threshold never falls and adopts the plateau.
    policy = MedianClip()
    seq = [C.make_norms([v], torch.float32, torch.device("cpu")) for v in [1.0] * 16 + [3.0] * 40]
    limits = [float(t) for t in C.drive_policy(policy, seq)][1:]  # inf at step 0
    assert all(b >= a for a, b in itertools.pairwise(limits))
    assert limits[-1] == 6.0  # twice the new level: the plateau is normal now
