"""The rules of the clipping policies and detectors, pinned on hand-computed cases.

What each piece promises in its docstring, checked where a small slip would still pass a
statistical test: documented defaults; every argument's range, with the error naming the
argument; the exact boundary of each rule (a z-score equal to its threshold, a norm equal to a
cap, a ratio equal to its limit, a layer exactly at the floor); what ``update`` learns from and
what it ignores (an overflowed total, a finite flag sent as 0/1 integers, statistics whose
dtype is fixed by the first norms); ``load_state_dict``'s checks, including the layouts of
earlier versions; that ``foreach=True`` is passed through to torch (which refuses it on a
device without foreach kernels); and that state and results stay on the device of the norms
and signals, checked on the ``meta`` device, which also proves no value is read on the host.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from gradguard.core.clip import (
    clip_grad_norm_,
    clip_grad_value_,
    clip_grads_with_norm_,
)
from gradguard.core.norms import (
    GradNorms,
    get_total_norm,
    grad_norms,
    tensor_norms,
    total_from_norms,
)
from gradguard.decide.detect import (
    DivergenceDetector,
    NonFiniteDetector,
    RatioSpikeDetector,
    Signals,
    SpikeDetector,
    UpdateRatioDetector,
    VanishingDetector,
    update_ratios,
)
from gradguard.decide.policies import (
    AGCPolicy,
    ClipPolicy,
    EMARatioClip,
    FixedThreshold,
    MedianClip,
    QuantileClip,
    ZScoreClip,
)
from tests import conformance as C

META = torch.device("meta")
CPU = torch.device("cpu")
F32, F64 = torch.float32, torch.float64
INF = math.inf


def norms(values: list[float], dtype: torch.dtype = F32, device: torch.device = CPU) -> GradNorms:
    return C.make_norms(values, dtype, device)


def signals(
    per: list[float],
    loss: float | None = 1.0,
    *,
    names: list[str] | None = None,
    device: torch.device = CPU,
    finite: Tensor | None = None,
    total: float | None = None,
    loss_dtype: torch.dtype = F32,
) -> Signals:
    """Signals with fp32 norms on ``device``; ``total`` overrides the 2-norm of ``per``."""
    per_t = [torch.tensor(v, dtype=F32, device=device) for v in per]
    if total is not None:
        tot = torch.tensor(total, dtype=F32, device=device)
    elif per_t:
        tot = torch.linalg.vector_norm(torch.stack(per_t))
    else:
        tot = torch.zeros((), dtype=F32, device=device)
    return Signals(
        step=0,
        total_norm=tot,
        per_tensor=per_t,
        names=names if names is not None else [f"p{i}" for i in range(len(per))],
        finite=tot.isfinite() if finite is None else finite,
        loss=None if loss is None else torch.tensor(loss, dtype=loss_dtype, device=device),
    )


def with_state(obj: Any, **tensors: Tensor) -> Any:
    """``obj`` after loading its own state_dict with these state tensors."""
    state = obj.state_dict()
    state["state"] = dict(tensors)
    obj.load_state_dict(state)
    return obj


def learn_of(limit: Tensor | list[Tensor], n: GradNorms) -> Tensor | list[Tensor]:
    """What ``update`` learns from when nothing was clipped."""
    return n.total if isinstance(limit, Tensor) else list(n.per_tensor)


def state_of(obj: Any) -> dict[str, Tensor]:
    return obj.state_dict()["state"]


@pytest.fixture
def f64_default() -> Iterator[None]:
    """torch's default dtype set to fp64, as scientific code often does."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(F64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


# --------------------------------------------------------------------------------- defaults


def test_documented_defaults() -> None:
    q = QuantileClip()
    assert (q.quantile, q.history, q.warmup, q.max_norm, q.feed) == (0.9, 1000, 25, None, "raw")
    z = ZScoreClip()
    assert (z.alpha, z.z_thresh, z.warmup, z.mode, z.max_norm, z.eps) == (
        0.97, 2.5, 25, "adaptive", None, 1e-6,
    )  # fmt: skip
    e = EMARatioClip()
    assert (e.ratio, e.beta, e.warmup, e.max_norm) == (1.05, 0.98, 100, 1.0)
    a = AGCPolicy()
    assert (a.clip_factor, a.eps, a.exclude) == (0.01, 1e-3, [])
    s = SpikeDetector()
    assert (s.signal, s.window, s.z, s.warmup, s.log, s.min_std, s.bootstrap) == (
        "loss", 128, 6.0, 64, True, 1e-3, None,
    )  # fmt: skip
    v = VanishingDetector()
    assert (v.floor, v.patience) == (1e-3, 10)
    u = UpdateRatioDetector()
    assert (u.max_ratio, u.include_1d, u.eps, u.names, u.ratios) == (0.1, False, 1e-12, [], None)


def test_update_ratios_default_eps_only_guards_a_zero_weight() -> None:
    # A weight of norm 1e-3 moved by 1e-3: ratio 1 (the default floor 1e-12 is far below).
    r = update_ratios([torch.tensor([1e-3])], [torch.tensor([2e-3])])
    assert r.shape == (1,) and r.dtype == F32
    assert float(r[0]) == pytest.approx(1.0, rel=1e-6)
    # A zero weight: the floor is what is divided by.
    z = update_ratios([torch.zeros(2)], [torch.tensor([3e-12, 4e-12])])
    assert float(z[0]) == pytest.approx(5.0, rel=1e-5)


def test_update_ratios_one_pair_and_none() -> None:
    r = update_ratios([torch.ones(4)], [torch.full((4,), 1.1)])  # the docstring's example
    assert r.shape == (1,) and float(r[0]) == pytest.approx(0.1, rel=1e-5)
    empty = update_ratios([], [])
    assert empty.shape == (0,) and empty.dtype == F32


# ------------------------------------------------------------------------ argument checks

BAD_ARGS: list[tuple[Callable[..., Any], dict[str, Any], type[Exception], str]] = [
    (FixedThreshold, {"max_norm": 0.0}, ValueError, "max_norm"),
    (QuantileClip, {"quantile": 1.5}, ValueError, "quantile"),
    (QuantileClip, {"quantile": -0.1}, ValueError, "quantile"),
    (QuantileClip, {"history": 0}, ValueError, "history"),
    (QuantileClip, {"warmup": 0}, ValueError, "warmup"),
    (QuantileClip, {"max_norm": 0.0}, ValueError, "max_norm"),
    (ZScoreClip, {"alpha": 1.0}, ValueError, "alpha"),
    (ZScoreClip, {"z_thresh": 0.0}, ValueError, "z_thresh"),
    (ZScoreClip, {"warmup": 0}, ValueError, "warmup"),
    (ZScoreClip, {"max_norm": -1.0}, ValueError, "max_norm"),
    (ZScoreClip, {"eps": -1e-6}, ValueError, "eps"),
    (EMARatioClip, {"ratio": 0.0}, ValueError, "ratio"),
    (EMARatioClip, {"beta": 1.0}, ValueError, "beta"),
    (EMARatioClip, {"warmup": -1}, ValueError, "warmup"),
    (EMARatioClip, {"max_norm": 0.0}, ValueError, "max_norm"),
    (AGCPolicy, {"clip_factor": 0.0}, ValueError, "clip_factor"),
    (AGCPolicy, {"eps": 0.0}, ValueError, "eps"),
    (SpikeDetector, {"window": 1}, ValueError, "window"),
    (SpikeDetector, {"z": 0.0}, ValueError, "z"),
    (SpikeDetector, {"warmup": 1}, ValueError, "warmup"),
    (SpikeDetector, {"min_std": -1.0}, ValueError, "min_std"),
    (SpikeDetector, {"bootstrap": 1.0}, ValueError, "bootstrap"),
    (VanishingDetector, {"floor": "low"}, TypeError, "floor"),
    (VanishingDetector, {"floor": 0.0}, ValueError, "floor"),
    (VanishingDetector, {"floor": 1.0}, ValueError, "floor"),
    (VanishingDetector, {"patience": 0}, ValueError, "patience"),
    (UpdateRatioDetector, {"max_ratio": 0.0}, ValueError, "max_ratio"),
    (UpdateRatioDetector, {"eps": 0.0}, ValueError, "eps"),
    (UpdateRatioDetector, {"eps": -1.0}, ValueError, "eps"),
]


@pytest.mark.parametrize(
    ("factory", "kwargs", "error", "name"),
    BAD_ARGS,
    ids=[f"{f.__name__}-{next(iter(kw))}={next(iter(kw.values()))!r}" for f, kw, _, _ in BAD_ARGS],
)
def test_bad_argument_raises_naming_it(
    factory: Callable[..., Any], kwargs: dict[str, Any], error: type[Exception], name: str
) -> None:
    with pytest.raises(error, match=rf"^{name} must "):
        factory(**kwargs)


def test_closed_ends_of_the_ranges_are_accepted() -> None:
    assert QuantileClip(quantile=1.0).quantile == 1.0
    assert QuantileClip(quantile=0.0).quantile == 0.0
    assert ZScoreClip(alpha=0.0, eps=0.0).eps == 0.0
    assert EMARatioClip(beta=0.0, warmup=0, max_norm=None).warmup == 0
    assert SpikeDetector(window=2, min_std=0.0).warmup == 2


# ------------------------------------------------------------------------------ policies


def test_quantile_one_is_the_largest_stored_norm() -> None:
    p = QuantileClip(quantile=1.0, history=4, warmup=1)
    for g in (1.0, 3.0, 2.0):
        n = norms([g])
        p.update(n, n.total, True)
    assert float(p.threshold(norms([1.0]))) == 3.0


@pytest.mark.parametrize("factory", [QuantileClip, ZScoreClip])
def test_statistics_keep_the_dtype_of_the_first_norms(factory: Callable[[], ClipPolicy]) -> None:
    p = factory()
    n32 = norms([1.0])
    p.update(n32, n32.total, True)
    n64 = norms([1.0 + 2.0**-40], F64)
    p.threshold(n64)
    p.update(n64, n64.total, True)
    assert {v.dtype for k, v in state_of(p).items() if k != "count"} == {F32}


def test_quantile_statistics_keep_their_dtype_whatever_is_learned() -> None:
    p = QuantileClip(feed="clipped", history=2, warmup=1)
    n = norms([2.0])
    p.update(n, torch.tensor(1.0 + 2.0**-40, dtype=F64), True)
    assert state_of(p)["buffer"].dtype == F32
    assert float(state_of(p)["buffer"][0]) == 1.0


def test_zscore_statistics_are_fp64_from_the_first_fp64_norms() -> None:
    p = ZScoreClip()
    p.threshold(norms([1.0], F64))
    assert {k: v.dtype for k, v in state_of(p).items()} == {
        "count": torch.int64, "mean": F64, "var": F64,
    }  # fmt: skip


def zscore_at(mean: float, var: float, **kw: Any) -> ZScoreClip:
    """A ZScoreClip past its warm-up with these statistics."""
    p = ZScoreClip(warmup=1, **kw)
    return with_state(
        p,
        count=torch.tensor(1),
        mean=torch.tensor(mean),
        var=torch.tensor(var),
    )


def test_zscore_equal_to_the_threshold_is_not_an_outlier() -> None:
    # mean 1, std 1, eps 0: a norm of 3 has z = 2 exactly, z_thresh = 2: not clipped.
    assert float(zscore_at(1.0, 1.0, z_thresh=2.0, eps=0.0).threshold(norms([3.0]))) == INF
    # Just above: mu + z_t**2 * sigma / z = 1 + 4 / 2.5.
    above = zscore_at(1.0, 1.0, z_thresh=2.0, eps=0.0).threshold(norms([3.5]))
    assert float(above) == pytest.approx(2.6, rel=1e-6)


def test_zscore_update_uses_the_threshold_of_its_own_norms() -> None:
    """``update`` learns min(g, threshold for g), whether or not ``threshold`` was asked for
    these norms, for other norms, or twice in a row."""
    n = norms([3.5])  # z = 2.5: threshold 2.6
    asked_other = zscore_at(1.0, 1.0, z_thresh=2.0, eps=0.0)
    assert float(asked_other.threshold(norms([5.0]))) == pytest.approx(2.0)  # z = 4
    asked_other.update(n, n.total, True)
    not_asked = zscore_at(1.0, 1.0, z_thresh=2.0, eps=0.0)
    not_asked.update(n, n.total, True)
    asked = zscore_at(1.0, 1.0, z_thresh=2.0, eps=0.0)
    asked.threshold(n)
    asked.update(n, n.total, True)
    want_mean = 0.97 * 1.0 + 0.03 * 2.6
    for p in (asked_other, not_asked, asked):
        assert float(state_of(p)["mean"]) == pytest.approx(want_mean, rel=1e-6)
        assert C.same(state_of(p)["mean"], state_of(asked)["mean"])
        assert C.same(state_of(p)["var"], state_of(asked)["var"])
    # A second update without a threshold in between.
    not_asked.update(n, n.total, True)
    asked.threshold(n)
    asked.update(n, n.total, True)
    assert C.same(state_of(not_asked)["mean"], state_of(asked)["mean"])
    assert int(state_of(not_asked)["count"]) == 3


@pytest.mark.parametrize(
    ("mean", "var"),
    [(math.nan, 1.0), (INF, 1.0), (1.0, math.nan), (1.0, INF), (1.0, -1.0)],
)
def test_zscore_state_with_bad_statistics_is_refused(mean: float, var: float) -> None:
    with pytest.raises(ValueError, match="mean and var"):
        zscore_at(mean, var)


def test_zscore_state_with_zero_variance_loads() -> None:
    p = zscore_at(2.0, 0.0)
    assert float(state_of(p)["var"]) == 0.0
    assert float(p.threshold(norms([2.0]))) == INF  # z = 0


def test_ema_ratio_warmup_clips_only_a_total_above_max_norm() -> None:
    at = EMARatioClip(max_norm=5.0).threshold(norms([3.0, 4.0]))  # total 5, exactly max_norm
    assert [float(t) for t in at] == [INF, INF]
    over = EMARatioClip(max_norm=2.5).threshold(norms([3.0, 4.0]))
    assert [float(t) for t in over] == [1.5, 2.0]


@pytest.mark.parametrize("gamma", [[0.0, 1.0], [1.0, -2.0], [INF, 1.0]])
def test_ema_ratio_state_with_bad_gamma_is_refused(gamma: list[float]) -> None:
    p = EMARatioClip()
    with pytest.raises(ValueError, match="gamma"):
        with_state(p, gamma=torch.tensor(gamma), count=torch.tensor(1))
    assert state_of(p) == {}


def test_ema_ratio_state_with_unset_gamma_loads() -> None:
    p = with_state(
        EMARatioClip(warmup=0), gamma=torch.tensor([math.nan, 2.0]), count=torch.tensor(0)
    )
    assert [float(t) for t in p.threshold(norms([1.0, 1.0]))] == [INF, pytest.approx(2.1)]


@pytest.mark.parametrize("how", ["name", "module"])
def test_agc_excludes_a_single_name_or_module(how: str) -> None:
    torch.manual_seed(0)
    model = nn.Module()
    model.body = nn.Linear(2, 2)
    model.fc = nn.Linear(2, 2)
    for p in model.parameters():
        p.grad = torch.full_like(p, 100.0)
    policy = AGCPolicy(0.01, exclude="fc" if how == "name" else model.fc)
    assert len(policy.exclude) == 1
    grads = [p.grad for p in model.parameters()]
    c = policy.clip_(grads, grad_norms(grads), model)
    assert bool(c.clipped)
    assert bool((model.fc.weight.grad == 100.0).all()) and bool((model.fc.bias.grad == 100.0).all())
    assert bool((model.body.weight.grad < 100.0).all())


def test_per_tensor_clip_totals_use_the_given_norm_type() -> None:
    grads = [torch.tensor([3.0]), torch.tensor([4.0])]
    n = grad_norms(grads, 1.0)
    c = EMARatioClip(max_norm=None).clip_(grads, n, norm_type=1.0)
    assert float(c.total) == 7.0  # |3| + |4|, not the 2-norm 5
    c2 = EMARatioClip(warmup=0).clip_(grads, n, norm_type=1.0)
    assert float(c2.total) == 7.0


def test_global_clip_checks_the_norm_type() -> None:
    grads = [torch.tensor([3.0, 4.0])]
    with pytest.raises(ValueError, match="norm_type"):
        FixedThreshold(1.0).clip_(grads, grad_norms(grads), norm_type=0.0)


@pytest.mark.parametrize("policy", [FixedThreshold(1.0), EMARatioClip(warmup=0)])
def test_policy_clip_passes_foreach_through(policy: ClipPolicy) -> None:
    # torch refuses foreach=True on a device without foreach kernels; None falls back.
    grads = [torch.ones(3, device=META), torch.ones(2, device=META)]
    n = grad_norms(grads, foreach=False)
    with pytest.raises(RuntimeError, match="foreach=True"):
        policy.clip_(grads, n, foreach=True)
    policy.clip_(grads, n, foreach=None)


# ----------------------------------------------------------------------- load_state_dict


def test_wrong_length_ring_buffers_are_refused() -> None:
    cases: list[tuple[Any, dict[str, Tensor]]] = [
        (QuantileClip(history=4, warmup=1), {"buffer": torch.ones(3), "count": torch.tensor(3)}),
        (MedianClip(window=4), {"history": torch.ones(5), "count": torch.tensor(5)}),
        (
            RatioSpikeDetector(window=4),
            {"history": torch.ones(3), "count": torch.tensor(3), "streak": torch.tensor(0)},
        ),
        (SpikeDetector(window=4), {"buffer": torch.ones(5), "count": torch.tensor(5)}),
    ]
    for obj, tensors in cases:
        with pytest.raises(ValueError, match="shape"):
            with_state(obj, **tensors)


def test_histories_with_a_zero_norm_or_loss_are_refused() -> None:
    with pytest.raises(ValueError, match="history"):
        with_state(MedianClip(window=2), history=torch.tensor([0.0, 1.0]), count=torch.tensor(2))
    with pytest.raises(ValueError, match="history"):
        with_state(MedianClip(window=2), history=torch.tensor([INF, 1.0]), count=torch.tensor(2))
    with pytest.raises(ValueError, match="history"):
        with_state(
            RatioSpikeDetector(window=2),
            history=torch.tensor([1.0, 0.0]), count=torch.tensor(2), streak=torch.tensor(0),
        )  # fmt: skip


def test_loaded_detector_statistics_are_fp32() -> None:
    spike = with_state(
        SpikeDetector(window=2), buffer=torch.tensor([1.0, 2.0], dtype=F64), count=torch.tensor(2)
    )
    assert state_of(spike)["buffer"].dtype == F32
    ratio = with_state(
        RatioSpikeDetector(window=2),
        history=torch.tensor([1.0, 2.0], dtype=F64), count=torch.tensor(2), streak=torch.tensor(0),
    )  # fmt: skip
    assert state_of(ratio)["history"].dtype == F32
    div = DivergenceDetector()
    s = signals([1.0], loss=2.0)
    div.check(s)
    div.update(s, True)
    state = div.state_dict()
    state["state"] = {
        k: v.to(F64) if v.is_floating_point() else v for k, v in state["state"].items()
    }
    fresh = DivergenceDetector()
    fresh.load_state_dict(state)
    assert {v.dtype for v in state_of(fresh).values()} == {F32, torch.int64}


def test_divergence_state_before_the_first_accepted_loss_loads() -> None:
    det = DivergenceDetector()
    s = signals([1.0], loss=math.nan)  # creates the state, accepts nothing: anchor 0
    det.check(s)
    det.update(s, True)
    assert float(state_of(det)["anchor"]) == 0.0
    again = DivergenceDetector()
    again.load_state_dict(det.state_dict())
    assert float(state_of(again)["anchor"]) == 0.0


def test_divergence_legacy_state_without_a_step_loads_empty() -> None:
    det = DivergenceDetector()
    det.load_state_dict({**DivergenceDetector().state_dict(), "limit": 1.2, "state": {}})
    assert state_of(det) == {}


@pytest.mark.parametrize(
    "factory", [SpikeDetector, VanishingDetector, DivergenceDetector, QuantileClip]
)
def test_load_state_dict_of_a_non_dict_says_so(factory: Callable[[], Any]) -> None:
    for bad in (5, None):
        with pytest.raises(TypeError, match="expects a dict"):
            factory().load_state_dict(bad)


def test_vanishing_state_checks_name_the_detector() -> None:
    det = VanishingDetector()
    with pytest.raises(ValueError, match=r"^VanishingDetector\.load_state_dict: .*names"):
        det.load_state_dict({"floor": 1e-3, "patience": 10, "state": {}})
    for names in (["a", 3], "ab"):
        with pytest.raises(TypeError, match=r"^VanishingDetector\.load_state_dict: names"):
            det.load_state_dict(
                {
                    "floor": 1e-3,
                    "patience": 10,
                    "names": names,
                    "state": {"run": torch.zeros(2, dtype=torch.int64)},
                }
            )
    assert det.state_dict() == VanishingDetector().state_dict()  # nothing changed


# -------------------------------------------------------------------------------- spikes


def spike_primed(**kw: Any) -> SpikeDetector:
    """log=False, a flat history of two 5s, std floored at 1: the z-score is x - 5."""
    det = SpikeDetector(window=2, warmup=2, log=False, min_std=1.0, **kw)
    for _ in range(2):
        s = signals([1.0], loss=5.0)
        det.update(s, True)
    return det


def test_spike_score_equal_to_z_is_not_flagged() -> None:
    det = spike_primed(z=6.0)
    at = det.check(signals([1.0], loss=11.0))
    assert float(at.score) == 6.0 and not bool(at.flag)
    above = det.check(signals([1.0], loss=11.5))
    assert bool(above.flag)


def test_spike_history_ignores_a_step_whose_total_overflowed() -> None:
    det = SpikeDetector(window=4, warmup=2)
    # Every gradient finite, the total overflowed: not a "normal" step.
    s = signals([1e30, 1e30], loss=1.0, finite=torch.tensor(True), total=INF)
    det.update(s, True)
    assert int(state_of(det)["count"]) == 0
    # And the reverse: a finite total with non-finite gradients (another rank's NaN).
    det.update(signals([1.0], loss=1.0, finite=torch.tensor(False)), True)
    assert int(state_of(det)["count"]) == 0


def test_spike_fp64_loss_is_judged_and_stored_in_fp32() -> None:
    det = SpikeDetector(window=4, warmup=2, log=False)
    for v in (1.0, 1.0 + 2.0**-40, 2.0):
        s = signals([1.0], loss=v, loss_dtype=F64)
        d = det.check(s)
        det.update(s, True)
    assert d.score.dtype == F32
    assert state_of(det)["buffer"].dtype == F32
    assert state_of(det)["buffer"][:2].tolist() == [1.0, 1.0]


def test_integer_finite_flag_is_read_as_a_bool() -> None:
    """A finite flag of 0/1 integers (all-reduced flags are: NCCL has no bool) means the same."""
    one, zero = torch.tensor(1), torch.tensor(0)
    ok = NonFiniteDetector().check(signals([1.0, 2.0], finite=one))
    assert not bool(ok.flag) and float(ok.score) == 0.0
    bad = NonFiniteDetector().check(signals([1.0, 2.0], finite=zero))
    assert bool(bad.flag) and float(bad.score) == 1.0

    spike = SpikeDetector(window=4, warmup=2)
    spike.update(signals([1.0], loss=2.0, finite=one), True)
    spike.update(signals([1.0], loss=2.0, finite=zero), True)
    assert int(state_of(spike)["count"]) == 1

    van = VanishingDetector(floor=0.1, patience=2)
    s = signals([0.0, 1.0, 1.0], finite=one)
    assert van.low_mask(s).dtype == torch.bool
    van.update(s, True)
    assert state_of(van)["run"].tolist() == [1, 0, 0]
    assert van.vanishing_layers(s) == ["p0"]
    van.update(signals([0.0, 1.0, 1.0], finite=zero), True)
    assert state_of(van)["run"].tolist() == [1, 0, 0]  # a non-finite step changes nothing


# ----------------------------------------------------------------------------- vanishing


def test_vanishing_works_from_two_gradients() -> None:
    det = VanishingDetector(floor=0.1, patience=1)
    s = signals([0.0, 1.0])
    assert det.low_mask(s).tolist() == [True, False]
    assert det.vanishing_layers(s) == ["p0"]
    assert VanishingDetector(floor=0.1, patience=1).low_mask(signals([0.0])).tolist() == [False]


def test_vanishing_floor_is_strict() -> None:
    det = VanishingDetector(floor=0.5, patience=1)
    # 0.5 is exactly floor x the others' median (1): not below it.
    assert det.low_mask(signals([0.5, 1.0, 1.0])).tolist() == [False, False, False]
    assert det.low_mask(signals([0.4999, 1.0, 1.0])).tolist() == [True, False, False]
    # All zero: nothing is below anything.
    assert det.low_mask(signals([0.0, 0.0, 0.0])).tolist() == [False, False, False]


def test_vanishing_runs_follow_the_names() -> None:
    det = VanishingDetector(floor=0.1, patience=2)
    det.update(signals([0.0, 1.0, 1.0], names=["a", "b", "c"]), True)
    # Reordered: "a" is low for the second step in a row wherever it stands.
    s = signals([1.0, 1.0, 0.0], names=["c", "b", "a"])
    assert det.vanishing_layers(s) == ["a"]
    det.update(s, True)
    assert state_of(det)["run"].tolist() == [0, 0, 2]


def test_vanishing_new_layer_starts_its_run_at_zero() -> None:
    det = VanishingDetector(floor=0.1, patience=2)
    det.update(signals([1.0, 0.0, 1.0], names=["a", "b", "c"]), True)
    assert state_of(det)["run"].tolist() == [0, 1, 0]
    # "d" is new (and low): its first low step, not its second.
    s = signals([1.0, 1.0, 0.0], names=["a", "c", "d"])
    assert det.vanishing_layers(s) == []
    det.update(s, True)
    assert state_of(det)["run"].tolist() == [0, 0, 1]


def test_vanishing_after_a_step_without_gradients() -> None:
    det = VanishingDetector(floor=0.1, patience=1)
    det.update(signals([], names=[]), True)
    assert state_of(det)["run"].shape == (0,)
    s = signals([0.0, 1.0], names=["a", "b"])
    assert det.vanishing_layers(s) == ["a"]
    det.update(s, True)
    run = state_of(det)["run"]
    assert run.dtype == torch.int64 and run.tolist() == [1, 0]


def test_vanishing_run_of_a_single_layer_carries_over() -> None:
    det = VanishingDetector(floor=0.1, patience=4)
    det.load_state_dict(
        {"floor": 0.1, "patience": 4, "names": ["a"], "state": {"run": torch.tensor([3])}}
    )
    s = signals([0.0, 1.0], names=["a", "b"])
    assert det.vanishing_layers(s) == ["a"]


# ------------------------------------------------------------------------- update ratios


def test_update_ratio_equal_to_the_limit_is_not_flagged() -> None:
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(4.0)
    det = UpdateRatioDetector(max_ratio=0.25)
    det.before(model)
    with torch.no_grad():
        model.weight.fill_(5.0)  # ratio 1/4
    assert det.after(model).tolist() == [0.25]
    d = det.check(signals([1.0]))
    assert not bool(d.flag) and float(d.score) == 0.25
    det.before(model)
    with torch.no_grad():
        model.weight.fill_(6.5)  # ratio 1.5/5 = 0.3
    det.after(model)
    assert bool(det.check(signals([1.0])).flag)


def test_update_ratio_after_needs_a_before() -> None:
    biases_only = nn.Module()
    biases_only.b = nn.Parameter(torch.ones(3))  # 1-D: not watched by default
    det = UpdateRatioDetector()
    with pytest.raises(RuntimeError, match="before"):
        det.after(biases_only)
    det.before(biases_only)
    assert det.after(biases_only).shape == (0,)
    model = nn.Linear(2, 2)
    with pytest.raises(RuntimeError, match="before"):
        det.after(model)
    det.before(model)
    assert det.after(model).tolist() == [0.0]
    with pytest.raises(RuntimeError, match="before"):
        det.after(model)  # the snapshot is spent


def test_update_ratio_check_before_any_after() -> None:
    d = UpdateRatioDetector().check(signals([1.0]))
    assert not bool(d.flag)
    assert isinstance(d.score, Tensor) and d.score.dtype == F32 and float(d.score) == 0.0


# ------------------------------------------------------------------------------ clipping


def test_clip_to_a_bound_above_the_dtype_range() -> None:
    a = torch.zeros(3, requires_grad=True)
    a.grad = torch.tensor([3.0, -4.0, 0.0]) * 2.0**60
    total = clip_grad_norm_([a], 1e39)  # above fp32's largest finite number: never clips
    assert a.grad.tolist() == [3 * 2.0**60, -4 * 2.0**60, 0.0] and float(total) == 5 * 2.0**60
    b = torch.zeros(3, requires_grad=True)
    b.grad = torch.tensor([INF, -2.0, 0.0])
    clip_grad_norm_([b], 1e39)  # an inf norm: factor 0, as torch (inf * 0 is NaN)
    assert math.isnan(b.grad[0]) and b.grad[1:].tolist() == [0.0, 0.0]


@pytest.mark.parametrize("foreach", [None, False])
def test_clip_value_above_the_fp16_range(foreach: bool | None) -> None:
    p = torch.zeros(4, dtype=torch.float16, requires_grad=True)
    p.grad = torch.tensor([1.0, -3.0, INF, -INF], dtype=torch.float16)
    clip_grad_value_([p], 1e5, foreach=foreach)  # 1e5 is beyond fp16: acts as its largest
    assert p.grad.tolist() == [1.0, -3.0, 65504.0, -65504.0]


def test_nonfinite_errors() -> None:
    p = torch.zeros(2, requires_grad=True)
    p.grad = torch.tensor([1.0, math.nan])
    with pytest.raises(RuntimeError, match="non-finite"):
        clip_grad_norm_([p], 1.0, error_if_nonfinite=True)
    with pytest.raises(RuntimeError, match="non-finite"):
        clip_grads_with_norm_([p], 1.0, torch.tensor(math.nan), nonfinite="error")
    with pytest.raises(RuntimeError, match="non-finite"):
        get_total_norm([p.grad], error_if_nonfinite=True)
    assert p.grad[0] == 1.0  # nothing scaled
    q = torch.zeros(2, requires_grad=True)
    q.grad = torch.tensor([3.0, 4.0])
    assert float(get_total_norm([q.grad], error_if_nonfinite=True)) == 5.0
    assert float(clip_grad_norm_([q], 1.0, error_if_nonfinite=True)) == 5.0  # a finite norm clips
    clip_grads_with_norm_([q], 0.5, torch.tensor(1.0), nonfinite="error")
    assert q.grad.tolist() == pytest.approx([0.3, 0.4], rel=1e-5)


def test_torch_style_clips_pass_foreach_through() -> None:
    g = torch.ones(3, device=META)
    with pytest.raises(RuntimeError, match="foreach=True"):
        get_total_norm([g], foreach=True)
    with pytest.raises(RuntimeError, match="foreach=True"):
        tensor_norms([g], foreach=True)
    assert tensor_norms([g])[0].device == META
    p = torch.zeros(3, device=META, requires_grad=True)
    p.grad = torch.ones(3, device=META)
    with pytest.raises(RuntimeError, match="foreach=True"):
        clip_grads_with_norm_([p], 1.0, torch.ones((), device=META), foreach=True)
    clip_grads_with_norm_([p], 1.0, torch.ones((), device=META), foreach=None)
    assert get_total_norm([g]).device == META


def test_total_from_norms_lives_on_the_given_device() -> None:
    assert total_from_norms([], 2.0, META).device == META
    t = total_from_norms([torch.tensor(3.0), torch.tensor(4.0)], 2.0, META)
    assert t.device == META
    assert float(total_from_norms([torch.tensor(3.0), torch.tensor(4.0)], 2.0, CPU)) == 5.0


# ------------------------------------------------------- device: everything stays on meta


@pytest.mark.parametrize(
    "factory",
    [
        lambda: QuantileClip(warmup=1, history=3),
        lambda: ZScoreClip(warmup=1),
        lambda: EMARatioClip(warmup=1),
        lambda: MedianClip(window=3),
    ],
)
def test_policy_state_and_results_follow_the_norms_device(
    factory: Callable[[], ClipPolicy],
) -> None:
    p = factory()
    for accepted in (True, torch.tensor(True, device=META), False):
        grads = [torch.ones(3, device=META), torch.ones(2, device=META)]
        n = grad_norms(grads)
        limit = p.threshold(n)
        limits = limit if isinstance(limit, list) else [limit]
        assert {t.device for t in limits} == {META}
        assert {v.device for v in state_of(p).values()} == {META}  # from the first step on
        c = p.clip_(grads, n)
        assert {c.threshold.device, c.clipped.device, c.total.device} == {META}
        p.update(n, c.learn, accepted)
        assert {v.device for v in state_of(p).values()} == {META}


def meta_signals(
    per: list[float], loss: float | None = 1.0, names: list[str] | None = None
) -> Signals:
    return signals(per, loss, names=names, device=META)


def assert_on_meta(det: Any, *detections: Any) -> None:
    for d in detections:
        assert d.flag.device == META and d.score.device == META
        assert d.flag.dtype == torch.bool and d.score.dtype == F32
    assert {v.device for v in det.state_dict().get("state", {}).values()} <= {META}


@pytest.mark.parametrize("signal", ["loss", "grad_norm"])
def test_spike_state_and_results_follow_the_signals_device(signal: str) -> None:
    det = SpikeDetector(signal, window=3, warmup=2, bootstrap=10.0)
    for accepted in (True, torch.tensor(True, device=META), True, False):
        s = meta_signals([1.0, 2.0])
        d = det.check(s)
        assert_on_meta(det, d)  # the state too, from the first check on
        det.update(s, accepted)
        assert_on_meta(det)
    assert set(state_of(det)) == {"buffer", "count"}
    none = SpikeDetector().check(meta_signals([1.0], loss=None))
    assert none.score.device == META and none.flag.device == META


def test_detections_without_a_signal_are_on_the_signals_device() -> None:
    s = meta_signals([1.0, 2.0], loss=None)
    for det in (
        RatioSpikeDetector(),
        DivergenceDetector(),
        UpdateRatioDetector(),
        NonFiniteDetector(),
    ):
        assert_on_meta(det, det.check(s))


def test_vanishing_state_and_results_follow_the_signals_device() -> None:
    det = VanishingDetector(floor=0.1, patience=2)
    steps = [
        ([0.5], ["a"]),  # one gradient: never low
        ([0.0, 1.0, 1.0], ["a", "b", "c"]),  # fresh run
        ([0.0, 1.0, 1.0], ["a", "b", "c"]),  # same names
        ([1.0, 0.0, 1.0], ["c", "a", "d"]),  # names changed: carried by name
        ([], []),
        ([0.0, 1.0], ["a", "b"]),  # after an empty run
    ]
    for per, names in steps:
        s = meta_signals(per, names=names)
        d = det.check(s)
        assert det.low_mask(s).device == META and det.layer_mask(s).device == META
        det.update(s, True)
        assert_on_meta(det, d)
    fresh = VanishingDetector()
    assert_on_meta(fresh, fresh.check(meta_signals([0.5], names=["a"])))
    # A state loaded on the CPU follows the signals.
    loaded = VanishingDetector(floor=0.1, patience=2)
    loaded.load_state_dict(
        {
            "floor": 0.1,
            "patience": 2,
            "names": ["a", "b", "c"],
            "state": {"run": torch.tensor([1, 0, 0])},
        }
    )
    s = meta_signals([0.0, 1.0, 1.0], names=["a", "b", "c"])
    assert_on_meta(VanishingDetector(), loaded.check(s))
    loaded.update(s, True)
    assert_on_meta(loaded)


def test_update_ratios_follow_the_weights_device() -> None:
    before = [torch.ones(3, device=META), torch.ones(2, 2, device=META)]
    after = [torch.ones(3, device=META), torch.ones(2, 2, device=META)]
    r = update_ratios(before, after)
    assert r.device == META and r.shape == (2,) and r.dtype == F32
    model = nn.Linear(3, 3).to(META)
    det = UpdateRatioDetector()
    det.before(model)
    assert det.after(model).device == META
    assert_on_meta(det, det.check(meta_signals([1.0])))
    # Ratios measured on the CPU are judged on the signals' device.
    cpu_model = nn.Linear(3, 3)
    det.before(cpu_model)
    det.after(cpu_model)
    assert_on_meta(det, det.check(meta_signals([1.0])))


# ------------------------------------------------------ dtype: fp32 scores whatever torch's default


@pytest.mark.usefixtures("f64_default")
def test_scores_without_a_signal_are_fp32_under_an_fp64_default() -> None:
    s = signals([1.0, 2.0], loss=None)
    for det in (SpikeDetector(), RatioSpikeDetector(), DivergenceDetector(), UpdateRatioDetector()):
        assert det.check(s).score.dtype == F32
    assert update_ratios([], []).dtype == F32
    r = update_ratios([torch.ones(3, dtype=F32)], [torch.full((3,), 2.0, dtype=F32)])
    assert r.dtype == F32 and r.tolist() == [1.0]


def test_loss_detectors_keep_fp32_statistics_under_an_fp64_default_dtype() -> None:
    # Their state is fp32 by spec (a load_state_dict round trip converts it there): a run under
    # torch.set_default_dtype(torch.float64) must not start it in fp64.
    from gradguard.decide.detect import RatioSpikeDetector, SpikeDetector

    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        f32 = torch.float32
        s = Signals(0, torch.tensor(1.0, dtype=f32), [torch.tensor(1.0, dtype=f32)] * 2,
                    ["a", "b"], torch.tensor(True), torch.tensor(1.0, dtype=f32))  # fmt: skip
        for d in (SpikeDetector(window=4, warmup=2), RatioSpikeDetector(window=4)):
            for _ in range(3):
                d.check(s)
                d.update(s, torch.tensor(True))
            assert d.check(s).score.dtype == f32
            assert all(t.dtype in (f32, torch.int64) for t in d.state_dict()["state"].values())
    finally:
        torch.set_default_dtype(before)
