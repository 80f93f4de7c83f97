"""Detectors: planted faults are found (and named), warm-up is respected, scores match plain
references and hand computations."""

from __future__ import annotations

import itertools
import math
import statistics

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from gradguard.decide.detect import (
    Detection,
    Detector,
    DivergenceDetector,
    NonFiniteDetector,
    RatioSpikeDetector,
    Signals,
    SpikeDetector,
    UpdateRatioDetector,
    VanishingDetector,
    others_median,
    update_ratios,
)
from tests import conformance as C

NAMES = ["embed.weight", "layers.0.weight", "layers.1.weight", "head.weight"]


def sig(
    loss: float | None = 1.0,
    per: list[float] | None = None,
    step: int = 0,
    names: list[str] | None = None,
) -> Signals:
    per_t = [torch.tensor(v) for v in (per if per is not None else [1.0, 1.0])]
    total = torch.linalg.vector_norm(torch.stack(per_t))
    return Signals(
        step=step,
        total_norm=total,
        per_tensor=per_t,
        names=names if names is not None else [f"p{i}" for i in range(len(per_t))],
        finite=total.isfinite(),
        loss=None if loss is None else torch.tensor(loss),
    )


# -------------------------------------------------------------------------------- non-finite


@pytest.mark.parametrize(
    ("loss", "per", "flagged"),
    [
        (1.0, [1.0, 2.0], False),
        (float("nan"), [1.0, 2.0], True),
        (float("inf"), [1.0, 2.0], True),
        (1.0, [float("nan"), 2.0], True),
        (1.0, [1.0, float("-inf")], True),
        (None, [1.0, 2.0], False),
        (None, [1e30, 1e30], True),  # the total overflows fp32: no clip coefficient exists
    ],
)
def test_nonfinite_detector(loss: float | None, per: list[float], flagged: bool) -> None:
    s = sig(loss, per)
    if per == [1e30, 1e30]:
        s.finite = torch.tensor(True)  # per-tensor finite, total not: still flagged
    d = NonFiniteDetector().check(s)
    assert bool(d.flag) is flagged and float(d.score) == float(flagged)


# ------------------------------------------------------------------------------------- spike


def ref_spike(
    values: list[float],
    window: int,
    z: float,
    warmup: int,
    log: bool,
    min_std: float,
    taken: list[bool] | None = None,
) -> list[tuple[bool, float, float]]:
    """One-sided z-score over the last ``window`` accepted finite values (flagged = rejected).

    Returns ``(flag, score, tol)`` per step. The detector works in fp32: ``x - mean`` carries an
    error of a few ulps of ``max(|x|, |mean|)``, which the std floor divides (on a flat history
    of 50.0 in log space that is 2.4e-4 with ``min_std=1e-3``), so ``tol`` bounds the score's
    error. A score within ``tol`` of ``z`` is a tie the oracle cannot call: there it follows the
    detector's own flag (``taken``), so that the two histories stay the same.
    """
    hist: list[float] = []
    out = []
    eps32 = float(torch.finfo(torch.float32).eps)
    for i, v in enumerate(values):
        x = (math.log(v) if v > 0 else math.nan) if log else v
        tol = 0.0
        if len(hist) >= warmup and math.isfinite(x):
            mean = statistics.fmean(hist)
            std = statistics.stdev(hist)
            floor = max(std, min_std, torch.finfo(torch.float32).tiny)
            score = (x - mean) / floor
            tol = 16 * eps32 * max(abs(x), abs(mean), 1.0) / floor + 1e-4 * abs(score)
            score = float(torch.tensor(score, dtype=torch.float32))  # overflows as fp32 does
        else:
            score = 0.0
        flag = score > z
        if taken is not None and abs(score - z) <= tol:
            flag = taken[i]
        out.append((flag, score, tol))
        if math.isfinite(x) and not flag:
            hist = [*hist, x][-window:]
    return out


@settings(max_examples=30, deadline=None)
@given(
    values=st.lists(
        st.one_of(st.floats(0.5, 2.0), st.sampled_from([50.0, float("nan"), float("inf")])),
        min_size=1,
        max_size=50,
    ),
    window=st.integers(2, 10),
    z=st.floats(0.5, 6.0),
    log=st.booleans(),
    min_std=st.sampled_from([1e-3, 0.05]),
)
# Found by a random run: fp32 rounding of a flat log-history over the 1e-3 floor is 2.4e-4.
@example(values=[50.0] * 4, window=3, z=0.5, log=True, min_std=1e-3)
def test_spike_matches_reference(
    values: list[float], window: int, z: float, log: bool, min_std: float
) -> None:
    # A floor well above fp32 rounding: on a flat history the fp32 std is a few ulps, not 0.
    warmup = max(2, window // 2)
    det = SpikeDetector("loss", window=window, z=z, log=log, min_std=min_std)
    seq = [sig(v, step=i) for i, v in enumerate(values)]
    got = C.drive_detector(det, seq)
    want = ref_spike(values, window, z, warmup, log, min_std, [bool(d.flag) for d in got])
    for i, (d, (flag, score, tol)) in enumerate(zip(got, want, strict=True)):
        assert bool(d.flag) == flag, i
        if math.isinf(score):
            assert float(d.score) == score, i
        else:
            assert abs(float(d.score) - score) <= tol + 1e-6, i


def test_spike_flags_a_planted_loss_spike_and_not_in_warmup() -> None:
    seq = C.signal_sequence(200, loss_spikes={10: 30.0, 150: 30.0}, seed=3)
    got = C.drive_detector(SpikeDetector("loss"), seq)  # OLMo-core: 128 steps, 6 sigma
    flagged = [i for i, d in enumerate(got) if bool(d.flag)]
    assert flagged == [150]  # step 10 is in the warm-up (64 values)
    assert float(got[150].score) > 6.0


def test_spike_on_grad_norm_and_one_sidedness() -> None:
    seq = C.signal_sequence(120, norm_spikes={90: 40.0, 100: 1e-3}, seed=4)
    got = C.drive_detector(SpikeDetector("grad_norm", window=64, z=6.0), seq)
    assert [i for i, d in enumerate(got) if bool(d.flag)] == [90]
    assert float(got[100].score) < -6.0  # a collapse is scored but is not a spike


def test_a_skipped_spike_does_not_become_normal() -> None:
    # Two equal spikes in a row: the first is flagged and not accepted, so the second is too.
    seq = C.signal_sequence(100, loss_spikes={80: 30.0, 81: 30.0}, seed=5)
    got = C.drive_detector(SpikeDetector("loss", window=64), seq)
    assert bool(got[80].flag) and bool(got[81].flag)


def test_spike_refuses_a_per_sample_loss() -> None:
    s = sig(1.0)
    s.loss = torch.ones(4)
    with pytest.raises(ValueError, match="single value"):
        SpikeDetector("loss").check(s)


def test_spike_without_the_signal_never_flags() -> None:
    det = SpikeDetector("loss", window=4, warmup=2)
    for i in range(6):
        s = sig(None, step=i)
        assert not bool(det.check(s).flag)
        det.update(s, torch.tensor(True))
    assert det.state_dict()["state"] == {}  # nothing measured, nothing created


# --------------------------------------------------------------------------------- vanishing


@settings(max_examples=40, deadline=None)
@given(values=st.lists(st.floats(0.0, 100.0), min_size=2, max_size=12))
def test_others_median_matches_brute_force(values: list[float]) -> None:
    got = others_median(torch.tensor(values, dtype=torch.float64)).tolist()
    for i, g in enumerate(got):
        rest = sorted(values[:i] + values[i + 1 :])
        assert g == rest[(len(rest) - 1) // 2]


def test_vanishing_layer_is_found_by_name_after_patience() -> None:
    det = VanishingDetector(floor=1e-3, patience=5)
    seq = C.signal_sequence(12, names=NAMES, tiny={"layers.0.weight": 1e-5})
    got = C.drive_detector(det, seq)
    assert [bool(d.flag) for d in got[:4]] == [False] * 4  # not yet patience steps
    # From the fifth step on it is flagged; the guard would not accept those steps, so the run
    # stays at 4 and the flag persists.
    assert all(bool(d.flag) for d in got[4:])
    assert det.vanishing_layers(seq[-1]) == ["layers.0.weight"]
    assert float(got[-1].score) == 1.0


def test_a_recovering_layer_resets_its_run() -> None:
    det = VanishingDetector(floor=1e-2, patience=3)
    low, ok = [1e-5, 1.0, 1.0], [1.0, 1.0, 1.0]
    for per in (low, low, ok, low, low):
        s = sig(1.0, per)
        assert not bool(det.check(s).flag)
        det.update(s, torch.tensor(True))
    assert bool(det.check(sig(1.0, low)).flag)


def test_vanishing_state_follows_names_when_parameters_change() -> None:
    det = VanishingDetector(floor=1e-2, patience=3)
    for _ in range(2):
        det.update(sig(1.0, [1e-5, 1.0, 1.0], names=["a", "b", "c"]), torch.tensor(True))
    # "b" has no gradient this step: "a" keeps its run of 2 and reaches patience now.
    s = sig(1.0, [1e-5, 1.0, 1.0], names=["a", "c", "d"])
    assert det.vanishing_layers(s) == ["a"]


def test_vanishing_needs_two_layers() -> None:
    det = VanishingDetector(patience=1)
    assert not bool(det.check(sig(1.0, [1e-9])).flag)


# ------------------------------------------------------------------------------ update ratio


def test_update_ratio_equals_hand_computation_for_sgd() -> None:
    torch.manual_seed(0)
    first, last = torch.nn.Linear(5, 7), torch.nn.Linear(7, 2)
    model = torch.nn.Sequential(first, torch.nn.Tanh(), last)
    model(torch.randn(4, 5)).square().sum().backward()
    lr = 0.05
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    w0, w2 = first.weight.detach().clone(), last.weight.detach().clone()
    det = UpdateRatioDetector(max_ratio=0.1)
    det.before(model)
    opt.step()
    ratios = det.after(model).tolist()
    # Plain SGD: delta W = -lr * grad, so the ratio is lr * ||grad|| / ||W_before||.
    want = [
        lr * first.weight.grad.norm().item() / w0.norm().item(),  # type: ignore[union-attr]
        lr * last.weight.grad.norm().item() / w2.norm().item(),  # type: ignore[union-attr]
    ]
    assert det.names == ["0.weight", "2.weight"]  # 1-D parameters left out by default
    assert ratios == pytest.approx(want, rel=1e-5)
    d = det.check(sig())
    assert bool(d.flag) is (max(want) > 0.1)
    assert float(d.score) == pytest.approx(max(want), rel=1e-5)


def test_update_ratio_flags_a_wild_step_and_a_nan_one() -> None:
    w = torch.ones(3, 3)
    det = UpdateRatioDetector(max_ratio=0.1)
    det.before([w])
    w.mul_(1.05)
    assert float(det.after([w])[0]) == pytest.approx(0.05)
    assert not bool(det.check(sig()).flag)
    det.before([w])
    w.mul_(2.0)
    assert bool(det.check(sig()).flag) is False  # judged only after after()
    det.after([w])
    assert bool(det.check(sig()).flag)
    det.before([w])
    w[0, 0] = float("nan")
    det.after([w])
    d = det.check(sig())
    assert bool(d.flag) and float(d.score) == math.inf


def test_update_ratios_function_and_1d_parameters() -> None:
    b = [torch.tensor([3.0, 4.0]), torch.zeros(2)]
    a = [torch.tensor([3.0, 4.5]), torch.tensor([0.0, 1e-3])]
    r = update_ratios(b, a, eps=1e-3)
    assert r.tolist() == pytest.approx([0.1, 1.0])
    det = UpdateRatioDetector(include_1d=True)
    det.before(b)
    assert det.names == ["0", "1"]


def test_update_ratio_after_needs_a_matching_before() -> None:
    det = UpdateRatioDetector()
    with pytest.raises(RuntimeError, match="matching before"):
        det.after([torch.ones(2, 2)])
    assert not bool(det.check(sig()).flag)  # nothing measured yet
    w = torch.ones(2, 2)
    det.before([w])
    det.after([w])
    with pytest.raises(RuntimeError, match="matching before"):
        det.after([w])  # after() consumed the snapshot


def test_update_ratio_hot_path_has_no_host_sync() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    model(torch.randn(2, 4)).sum().backward()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    det = UpdateRatioDetector()
    with C.no_host_sync():
        det.before(model)
        opt.step()
        det.after(model)
        det.check(sig())


# --------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: SpikeDetector("accuracy"), "signal"),
        (lambda: SpikeDetector(window=1), "window"),
        (lambda: SpikeDetector(window=8, warmup=9), "warmup"),
        (lambda: SpikeDetector(z=0), "z"),
        (lambda: SpikeDetector(log=1), "log"),  # type: ignore[arg-type]
        (lambda: SpikeDetector(min_std=-1.0), "min_std"),
        (lambda: SpikeDetector(bootstrap=1.0), "bootstrap"),
        (lambda: SpikeDetector(bootstrap=math.inf), "bootstrap"),
        (lambda: DivergenceDetector(ratio=0.9), "ratio"),
        (lambda: DivergenceDetector(beta=1.0), "beta"),
        (lambda: DivergenceDetector(warmup=0), "warmup"),
        (lambda: DivergenceDetector(cooldown=-1), "cooldown"),
        (lambda: DivergenceDetector(clip=1.0), "clip"),
        (lambda: VanishingDetector(floor=1.0), "floor"),
        (lambda: VanishingDetector(patience=0), "patience"),
        (lambda: UpdateRatioDetector(max_ratio=0), "max_ratio"),
        (lambda: UpdateRatioDetector(include_1d="yes"), "include_1d"),  # type: ignore[arg-type]
    ],
)
def test_bad_arguments_are_named(make, match: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def test_bad_state_changes_nothing() -> None:
    det = SpikeDetector(window=4, warmup=2)
    for i in range(3):
        det.update(sig(1.0 + i, step=i), torch.tensor(True))
    before = det.state_dict()
    with pytest.raises(ValueError, match="shape"):
        det.load_state_dict({**before, "state": {**before["state"], "buffer": torch.zeros(5)}})
    with pytest.raises(ValueError, match="window"):
        det.load_state_dict({**before, "window": 1})
    after = det.state_dict()
    assert C.same(after["state"]["buffer"], before["state"]["buffer"]) and after["window"] == 4
    van = VanishingDetector()
    with pytest.raises(ValueError, match="lacks keys"):
        van.load_state_dict({"floor": 0.1})
    with pytest.raises(ValueError, match="one entry per name"):
        van.load_state_dict(
            {
                "floor": 0.1,
                "patience": 2,
                "names": ["a"],
                "state": {"run": torch.zeros(2, dtype=torch.int64)},
            }
        )


def test_state_of_gradguard_0_1_still_loads() -> None:
    """The flat layout (tensors beside the config, None before the first step) loads into
    today's layout (tensors under "state") and continues identically."""
    seq = C.signal_sequence(30, loss_spikes={25: 20.0})
    spike = SpikeDetector(window=8, warmup=3)
    van = VanishingDetector(floor=0.5, patience=2)
    for det in (spike, van):
        C.drive_detector(det, seq[:20])
    flat_spike = {
        **{k: v for k, v in spike.state_dict().items() if k != "state"},
        **spike.state_dict()["state"],
    }
    flat_van = {"floor": 0.5, "patience": 2, "names": van.state_dict()["names"]}
    flat_van["run"] = van.state_dict()["state"]["run"]
    for det, flat, fresh in (
        (spike, flat_spike, SpikeDetector(window=8, warmup=3)),
        (van, flat_van, VanishingDetector(floor=0.5, patience=2)),
    ):
        fresh.load_state_dict(flat)
        a, b = C.drive_detector(det, seq[20:]), C.drive_detector(fresh, seq[20:])
        assert all(C.same(x.score, y.score) and C.same(x.flag, y.flag) for x, y in zip(a, b))
    empty = {**flat_spike, "buffer": None, "count": None}
    fresh_spike = SpikeDetector(window=8, warmup=3)
    fresh_spike.load_state_dict(empty)
    assert fresh_spike.state_dict()["state"] == {}


def test_detectors_declare_their_default_response() -> None:
    assert NonFiniteDetector.default_response is None  # the guard's default ladder
    assert SpikeDetector.default_response is None
    assert DivergenceDetector.default_response == ("backoff",)
    assert VanishingDetector.default_response == ("log",)
    assert UpdateRatioDetector.default_response == ("log",)


def test_a_user_detector_without_declared_state_keeps_working() -> None:
    class Above(Detector):  # constructor arguments, no _config_keys, no super().__init__()
        def __init__(self, limit: float) -> None:
            self.limit = limit

        def check(self, s: Signals) -> Detection:
            flag = s.total_norm > self.limit
            return Detection(flag, flag.float())

    det = Above(3.0)
    assert det.state_dict() == {}
    det.load_state_dict({})
    with pytest.raises(TypeError, match="expects a dict"):
        det.load_state_dict("garbage")  # type: ignore[arg-type]
    assert det.limit == 3.0 and bool(det.check(sig(per=[4.0, 0.0])).flag)


# ------------------------------------------------------------------- spike: bootstrap rule


def _drive_values(det: Detector, values: list[float], signal: str = "loss") -> list[Detection]:
    if signal == "loss":
        seq = [sig(v, step=i) for i, v in enumerate(values)]
    else:
        seq = [sig(1.0, per=[v, 0.0], step=i) for i, v in enumerate(values)]
    return C.drive_detector(det, seq)


def ref_bootstrap(values: list[float], ratio: float, warmup: int) -> list[bool]:
    """Before the warm-up: flag a value above ``ratio`` x the largest accepted one, from two
    accepted values on (plain Python, log space as the detector)."""
    hist: list[float] = []
    out = []
    for v in values:
        flag = 2 <= len(hist) < warmup and math.log(v) - max(hist) > math.log(ratio)
        out.append(flag)
        if not flag and len(hist) < warmup:
            hist.append(math.log(v))
    return out


@settings(max_examples=30, deadline=None)
@given(values=st.lists(st.floats(0.1, 100.0), min_size=1, max_size=20))
def test_bootstrap_matches_reference_in_warmup(values: list[float]) -> None:
    got = _drive_values(SpikeDetector("loss", window=64, warmup=32, bootstrap=10.0), values)
    want = ref_bootstrap(values, 10.0, 32)
    # Values within fp32 rounding of the 10x boundary are ties the oracle cannot call.
    for i, (d, w) in enumerate(zip(got, want)):
        if abs(float(d.score) - 6.0) > 1e-4:
            assert bool(d.flag) == w, i


def test_bootstrap_skips_a_corrupt_third_step_which_never_becomes_normal() -> None:
    # S4's fault: a corrupt batch at step 2 (loss x1e6). The plain detector warms up for 64
    # values and lets it through; the bootstrap flags it, and the one after it too.
    values = [0.55, 0.6, 5e5, 6e5, 0.5, 0.52]
    plain = _drive_values(SpikeDetector("loss"), values)
    boot = _drive_values(SpikeDetector("loss", bootstrap=10.0), values)
    assert not any(bool(d.flag) for d in plain)
    assert [bool(d.flag) for d in boot] == [False, False, True, True, False, False]
    assert float(boot[2].score) > 6.0 and float(boot[4].score) < 6.0


def test_bootstrap_lets_a_falling_or_slowly_rising_loss_through() -> None:
    falling = [4.6 * 0.97**i for i in range(40)]
    rising = [1.0 * 1.1**i for i in range(20)]  # 10x over 24 steps: the median keeps up
    for values in (falling, rising):
        got = _drive_values(SpikeDetector("loss", bootstrap=10.0), values)
        assert not any(bool(d.flag) for d in got)


def test_bootstrap_linear_and_on_the_grad_norm() -> None:
    values = [1.0, 1.2, 0.9, 11.0, 130.0, 200.0]  # 11 < 10 x 1.2, then 130 > 10 x 11
    got = _drive_values(
        SpikeDetector("grad_norm", bootstrap=10.0, log=False), values, signal="grad_norm"
    )
    assert [bool(d.flag) for d in got] == [False, False, False, False, True, True]


def test_after_warmup_the_bootstrap_changes_nothing() -> None:
    seq = C.signal_sequence(120, loss_spikes={90: 30.0}, seed=6)
    plain = C.drive_detector(SpikeDetector("loss", window=32), seq)
    boot = C.drive_detector(SpikeDetector("loss", window=32, bootstrap=10.0), seq)
    for i in range(16, 120):  # the warm-up is 16 values; nothing is flagged before
        assert C.same(plain[i].flag, boot[i].flag) and C.same(plain[i].score, boot[i].score), i
    assert [i for i, d in enumerate(boot) if bool(d.flag)] == [90]


def test_spike_state_saved_before_bootstrap_existed_loads() -> None:
    det = SpikeDetector(window=8, warmup=3)
    C.drive_detector(det, C.signal_sequence(10))
    old = {k: v for k, v in det.state_dict().items() if k != "bootstrap"}
    fresh = SpikeDetector(window=8, warmup=3, bootstrap=5.0)
    fresh.load_state_dict(old)
    assert fresh.bootstrap is None and C.same(
        fresh.state_dict()["state"]["buffer"], old["state"]["buffer"]
    )


# -------------------------------------------------------------------------------- divergence


def ref_divergence(
    losses: list[float],
    ratio: float,
    beta: float,
    warmup: int,
    cooldown: int,
    clip: float,
    noise: float,
    memory: float,
) -> list[tuple[bool, float]]:
    """The detector in plain Python (fp64): flags on the history before the step; the average
    and the variance of the differences learn accepted (= not flagged) finite values clipped to
    ``clip`` x the average; the best is a minimum that forgets a fraction ``1 - memory`` a step.
    In log space without the detector's anchor: that shifts every value by the same amount and
    changes no flag or score (beyond rounding)."""
    ema = best = last = dmean = dvar = 0.0
    count = wait = fires = 0
    out = []
    for v in losses:
        x = math.log(v) if v > 0 else math.nan
        ok = math.isfinite(x)
        margin = max(math.log(ratio), noise * math.sqrt(dvar / 2 * (1 - beta) / (1 + beta)))
        ready = count >= warmup and wait == 0
        flag = ok and ready and ema - best > margin
        out.append((flag, math.exp(ema - best) if count else 1.0))
        if flag:
            best, wait, fires = ema, cooldown, fires + 1
            continue
        if ok:
            wait = max(wait - 1, 0)
            if count == 0:
                ema = best = last = x
            else:
                x_in = min(x, ema + math.log(clip))
                d = x_in - last
                w = 1.0 if count == 1 else 1 - beta  # EMA mean and variance of the differences
                dvar = (1 - w) * (dvar + w * (d - dmean) ** 2)
                dmean += w * (d - dmean)
                # The plain mean during the warm-up, then the EMA; the best follows the
                # average until the warm-up ends.
                ema += (1 / (count + 1) if count < warmup else 1 - beta) * (x_in - ema)
                if count < warmup:
                    best = ema
                else:
                    best = ema if ema < best else best + (1 - memory) * (ema - best)
                last = x_in
            count += 1
    return out


def _diverging(n: int, start: int, growth: float, seed: int = 0) -> list[float]:
    g = torch.Generator().manual_seed(seed)
    noise = torch.exp(0.1 * torch.randn(n, generator=g, dtype=torch.float64)).tolist()
    return [3.0 * 0.99**i * (growth ** max(0, i - start)) * e for i, e in enumerate(noise)]


@pytest.mark.parametrize("growth", [1.0, 1.05, 1.3])
def test_divergence_matches_reference(growth: float) -> None:
    losses = _diverging(150, 40, growth)
    losses[60] = math.nan
    kw = dict(ratio=1.2, beta=0.9, warmup=10, cooldown=10, clip=2.0, noise=6.0)
    kw["memory"] = 0.98
    got = C.drive_detector(DivergenceDetector(**kw), [sig(v, step=i) for i, v in enumerate(losses)])  # type: ignore[arg-type]
    want = ref_divergence(losses, **kw)  # type: ignore[arg-type]
    for i, (d, (flag, score)) in enumerate(zip(got, want)):
        assert bool(d.flag) == flag, i
        assert float(d.score) == pytest.approx(score, rel=1e-4), i
    flags = [i for i, (f, _) in enumerate(want) if f]
    if growth == 1.0:
        assert flags == []  # a healthy noisy run: never
    else:
        assert flags and flags[0] > 40
        assert all(b - a > 10 for a, b in itertools.pairwise(flags))  # the cool-down


def test_divergence_ignores_one_huge_accepted_loss() -> None:
    losses = [3.0 * 0.99**i for i in range(60)]
    losses[30] = 3e6  # a corrupt batch no spike detector caught: it enters clipped to 2x
    det = DivergenceDetector()
    got = C.drive_detector(det, [sig(v, step=i) for i, v in enumerate(losses)])
    assert not any(bool(d.flag) for d in got)
    assert max(float(d.score) for d in got) < 1.1


def test_divergence_warmup_and_cooldown_and_no_limit_of_its_own() -> None:
    # How many back-offs a run takes is the guard's Budgets.backoff: the detector keeps asking.
    losses = [2.0**i for i in range(60)]  # doubling every step
    det = DivergenceDetector(warmup=10, cooldown=3)
    got = C.drive_detector(det, [sig(v, step=i) for i, v in enumerate(losses)])
    flags = [i for i, d in enumerate(got) if bool(d.flag)]
    assert len(flags) > 6 and flags[0] >= 10
    assert all(b - a > 3 for a, b in itertools.pairwise(flags))  # one per cool-down
    assert int(det.state_dict()["state"]["fires"]) == len(flags)
    with pytest.raises(TypeError):
        DivergenceDetector(limit=4)  # type: ignore[call-arg]


def test_divergence_loads_a_state_saved_with_a_limit_and_no_anchor() -> None:
    # Saved by a development version: log(loss) statistics, a limit of its own. log(loss / 1)
    # is the same thing: the statistics carry over with the anchor 1.
    old = {k: v for k, v in DivergenceDetector().state_dict().items()}
    old["limit"] = 6
    old["state"] = {
        "ema": torch.tensor(1.1), "best": torch.tensor(1.0), "last": torch.tensor(1.2),
        "dmean": torch.tensor(0.0), "dvar": torch.tensor(0.01),
        "count": torch.tensor(50), "wait": torch.tensor(2), "fires": torch.tensor(1),
    }  # fmt: skip
    det = DivergenceDetector()
    det.load_state_dict(old)
    state = det.state_dict()
    assert "limit" not in state and int(state["state"]["count"]) == 50
    assert float(state["state"]["anchor"]) == 1.0
    assert float(state["state"]["ema"]) == pytest.approx(1.1)
    # the score is the old statistics' exp(ema - best), as before the load
    d = det.check(sig(4.0))
    assert float(d.score) == pytest.approx(math.exp(0.1), rel=1e-5)


def test_divergence_without_a_loss_never_flags() -> None:
    det = DivergenceDetector(warmup=1)
    for i in range(5):
        assert not bool(det.check(sig(None, step=i)).flag)
        det.update(sig(None, step=i), torch.tensor(True))
    assert det.state_dict()["state"] == {}


def test_divergence_asks_for_a_backoff_and_refuses_bad_state() -> None:
    assert DivergenceDetector.default_response == ("backoff",)
    det = DivergenceDetector()
    C.drive_detector(det, [sig(3.0, step=i) for i in range(3)])
    good = det.state_dict()
    with pytest.raises(ValueError, match="finite"):
        det.load_state_dict({**good, "state": {**good["state"], "ema": torch.tensor(math.nan)}})
    assert C.same(det.state_dict()["state"]["ema"], good["state"]["ema"])


# ----------------------------------------------------------------------------- ratio spike


def ref_ratio_spike(
    values: list[float], ratio: float, window: int, patience: int
) -> list[tuple[bool, float]]:
    """The detector in plain Python: flag ``x > ratio * max(history)`` from two stored values
    on, at most ``patience`` steps in a row; accepted finite positive values are stored as
    ``min(x, ratio * max)``; a non-finite step leaves the streak alone."""
    hist: list[float] = []
    streak = 0
    out = []
    for x in values:
        top = max(hist[-window:]) if hist else -math.inf
        finite = math.isfinite(x)
        above = len(hist) >= 2 and finite and top > 0 and x > ratio * top
        flag = above and streak < patience
        score = x / top if len(hist) >= 2 and top > 0 and finite else 0.0
        out.append((flag, score))
        if finite:
            streak = streak + 1 if above else 0
        if not flag and finite and x > 0:
            hist.append(ratio * top if above else x)
    return out


@settings(max_examples=40, deadline=None)
@given(
    values=st.lists(
        st.one_of(st.floats(0.01, 1e4), st.sampled_from([math.nan, math.inf, 0.0, -1.0])),
        min_size=1,
        max_size=40,
    ),
    patience=st.integers(1, 3),
)
def test_ratio_spike_matches_reference(values: list[float], patience: int) -> None:
    got = _drive_values(RatioSpikeDetector(ratio=10.0, window=8, patience=patience), values)
    want = ref_ratio_spike(values, 10.0, 8, patience)
    for i, (d, (flag, score)) in enumerate(zip(got, want)):
        # Values within fp32 rounding of the 10x boundary are ties the oracle cannot call.
        if abs(float(d.score) - 10.0) > 1e-4:
            assert bool(d.flag) == flag, (i, values)
        assert float(d.score) == pytest.approx(score, rel=1e-5), i


def test_ratio_spike_skips_a_corrupt_third_step_and_never_learns_it() -> None:
    # A corrupt batch at step 2 (targets x1e3: the loss x1e6) and one late.
    values = [0.55, 0.6, 5e5, 0.5, 0.52, *([0.5] * 40), 4e5, 0.49]
    got = [bool(d.flag) for d in _drive_values(RatioSpikeDetector(), values)]
    assert [i for i, f in enumerate(got) if f] == [2, 45]


def test_ratio_spike_lets_a_persistent_jump_through_after_one_skip() -> None:
    # A skip leaves the weights as they are: when the next batch jumps as high, the model's
    # state (not the batch) is to blame, and skipping again would only spend the budget.
    values = [0.7, 0.6, 0.55, 230.0, 250.0, 240.0, 200.0, 150.0, 90.0]
    det = RatioSpikeDetector()
    got = [bool(d.flag) for d in _drive_values(det, values)]
    assert got == [False, False, False, True, False, False, False, False, False]
    # The history adopted the new level at most 10x per step: 7.0 (10 x 0.7), then 70 (10 x 7).
    hist = det.state_dict()["state"]["history"]
    assert float(hist[3]) == pytest.approx(7.0) and float(hist[4]) == pytest.approx(70.0)


def test_ratio_spike_lets_a_noisy_falling_or_slowly_rising_loss_through() -> None:
    g = torch.Generator().manual_seed(0)
    # The mean of 2 squared errors (chi-square, 2 degrees of freedom): tenfold swings are common.
    noisy = (torch.randn(3000, 2, generator=g) ** 2).mean(1).clamp(min=1e-6).tolist()
    falling = [4.6 * 0.97**i for i in range(100)]
    rising = [1.0 * 1.1**i for i in range(60)]
    for values in (noisy, falling, rising):
        got = _drive_values(RatioSpikeDetector(), values)
        assert not any(bool(d.flag) for d in got)


def test_ratio_spike_ignores_losses_it_cannot_divide_by() -> None:
    det = RatioSpikeDetector()
    got = _drive_values(det, [-1.0, 0.0, -5.0, 1.0, 2.0, 100.0])
    assert [bool(d.flag) for d in got] == [False] * 5 + [True]  # two positive values stored
    assert int(det.state_dict()["state"]["count"]) == 2
    with pytest.raises(ValueError, match="history"):
        det.load_state_dict(
            {
                **det.state_dict(),
                "state": {**det.state_dict()["state"], "history": -torch.ones(128)},
            }
        )
