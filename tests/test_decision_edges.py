"""The decision core at its edges, with hand-computed examples: the bootstrap rule of the spike
detector, what ZScoreClip learns (and does not learn) from a step, the replay's culprit rule,
which snapshot a rollback returns to and what the incident bundle of a rollback holds.

Each test pins one rule at the value where a plausible wrong version of it would decide
otherwise (``make mutate`` found these rules unguarded by the module's own tests)."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from gradguard import Budgets, Guard, GuardConfig, load_bundle
from gradguard.core.norms import GradNorms
from gradguard.decide.detect import (
    RatioSpikeDetector,
    Signals,
    SpikeDetector,
    UpdateRatioDetector,
    VanishingDetector,
)
from gradguard.decide.policies import (
    AGCPolicy,
    EMARatioClip,
    FixedThreshold,
    QuantileClip,
    ZScoreClip,
)
from gradguard.guard.incident import IncidentWriter
from gradguard.guard.response import Counters, GuardAbort, Responder, Verdict
from gradguard.guard.rollback import Rollbacks, SkipList, SkipSampler
from gradguard.guard.skip import GroupState, OptimizerKeeper, scaler_unscaled, scaler_update
from gradguard.insight.replay import _suspects

YES, NO = torch.tensor(True), torch.tensor(False)


def signals(loss: float) -> Signals:
    total = torch.tensor(1.0)
    return Signals(0, total, [total], ["w"], total.isfinite(), torch.tensor(loss))


def accept(det: SpikeDetector, *losses: float, accepted: torch.Tensor = YES) -> None:
    for loss in losses:
        s = signals(loss)
        det.check(s)
        det.update(s, accepted)


# ----------------------------------------------------------------- the spike detector's bootstrap


@pytest.mark.parametrize("log", [True, False])
@pytest.mark.parametrize(("loss", "flagged"), [(11.0, True), (9.0, False)])
def test_bootstrap_flags_a_loss_over_ratio_times_the_largest_accepted_one(log, loss, flagged):
    det = SpikeDetector("loss", bootstrap=10.0, log=log)
    accept(det, 1.0, 1.0)
    assert bool(det.check(signals(loss)).flag) is flagged


@pytest.mark.parametrize("log", [True, False])
def test_bootstrap_score_reaches_z_where_the_ratio_is_reached(log):
    det = SpikeDetector("loss", bootstrap=10.0, log=log, z=6.0)
    accept(det, 2.0, 1.0)
    assert float(det.check(signals(20.0)).score) == pytest.approx(6.0, rel=1e-5)
    assert float(det.check(signals(40.0)).score) > 6.0


@pytest.mark.parametrize("log", [True, False])
def test_bootstrap_compares_with_the_largest_accepted_loss_not_a_typical_one(log):
    # Median 3, mean 3, max 5: 45 is 15x the middle of the history but under 10x its top.
    det = SpikeDetector("loss", bootstrap=10.0, log=log)
    accept(det, 1.0, 5.0)
    assert not bool(det.check(signals(45.0)).flag)
    assert bool(det.check(signals(55.0)).flag)


def test_bootstrap_needs_two_accepted_losses():
    det = SpikeDetector("loss", bootstrap=10.0)
    accept(det, 1.0)
    assert not bool(det.check(signals(1e6)).flag)
    accept(det, 1.0, accepted=NO)  # a rejected loss is not history
    assert not bool(det.check(signals(1e6)).flag)
    accept(det, 1.0)
    assert bool(det.check(signals(1e6)).flag)


def test_without_bootstrap_nothing_is_flagged_during_warmup():
    det = SpikeDetector("loss", window=8)  # warm-up: 4 values
    accept(det, 1.0, 1.0, 1.0)
    assert not bool(det.check(signals(1e6)).flag)
    assert float(det.check(signals(1e6)).score) == 0.0
    accept(det, 1.0)
    assert bool(det.check(signals(1e6)).flag)


# ----------------------------------------------------------------- what ZScoreClip learns


def norms(g: float) -> GradNorms:
    t = torch.tensor(g, dtype=torch.float64)
    return GradNorms([t], t, t.isfinite())


def step(policy: ZScoreClip, g: float, accepted: torch.Tensor = YES) -> torch.Tensor:
    n = norms(g)
    limit = policy.threshold(n)
    policy.update(n, torch.minimum(n.total, limit), accepted)
    return limit


def stats(policy: ZScoreClip) -> tuple[int, float, float]:
    st = policy.state_dict()["state"]
    return int(st["count"]), float(st["mean"]), float(st["var"])


def test_zscore_clip_warmup_learns_the_mean_and_population_variance():
    policy = ZScoreClip(warmup=3)
    for g in (1.0, 2.0, 6.0):
        step(policy, g)
    count, mean, var = stats(policy)
    assert count == 3
    assert mean == pytest.approx(3.0, rel=1e-12)
    assert var == pytest.approx(((1 - 3) ** 2 + (2 - 3) ** 2 + (6 - 3) ** 2) / 3, rel=1e-12)


def test_zscore_clip_after_warmup_learns_an_ema_of_the_norm():
    policy = ZScoreClip(warmup=3, alpha=0.9)
    for g in (1.0, 2.0, 3.0):
        step(policy, g)
    _, mean0, var0 = stats(policy)  # 2 and 2/3
    step(policy, 2.5)  # z = 0.61 < 2.5: not clipped, learned as is
    count, mean, var = stats(policy)
    assert count == 4
    assert mean == pytest.approx(0.9 * mean0 + 0.1 * 2.5, rel=1e-12)
    assert var == pytest.approx(0.9 * var0 + 0.1 * (2.5 - mean) ** 2, rel=1e-12)


@pytest.mark.parametrize("mode", ["adaptive", "zscore", "mean"])
def test_zscore_clip_learns_the_threshold_in_force_on_a_clipped_step(mode):
    policy = ZScoreClip(warmup=3, alpha=0.9, mode=mode)
    for g in (1.0, 2.0, 3.0):
        step(policy, g)
    _, mean0, var0 = stats(policy)
    std0 = math.sqrt(var0)
    z = (100.0 - mean0) / (std0 + 1e-6)
    expected = {
        "adaptive": mean0 + 2.5**2 * std0 / z,
        "zscore": mean0 + 2.5 * std0,
        "mean": mean0,
    }[mode]
    limit = float(step(policy, 100.0))
    assert limit == pytest.approx(expected, rel=1e-9)
    assert stats(policy)[1] == pytest.approx(0.9 * mean0 + 0.1 * expected, rel=1e-12)


@pytest.mark.parametrize("warm", [False, True])
def test_zscore_clip_does_not_learn_from_a_rejected_step(warm):
    policy = ZScoreClip(warmup=3)
    for g in (1.0, 2.0, 3.0) if warm else (1.0, 2.0):
        step(policy, g)
    before = stats(policy)
    step(policy, 50.0, accepted=NO)
    assert stats(policy) == before
    step(policy, 2.5)  # the same step accepted is learned: the test above can fail
    assert stats(policy) != before


def test_zscore_clip_does_not_learn_a_nonfinite_norm():
    policy = ZScoreClip(warmup=2, max_norm=10.0)
    step(policy, 1.0)
    before = stats(policy)
    step(policy, math.inf)  # min(inf, max_norm) is finite: the raw norm decides
    assert stats(policy) == before


def test_zscore_clip_threshold_is_max_norm_during_warmup_and_caps_it_after():
    policy = ZScoreClip(warmup=2, max_norm=0.5, mode="zscore")
    assert float(step(policy, 1.0)) == 0.5
    assert float(step(policy, 1.0)) == 0.5
    assert float(step(policy, 1.0)) == 0.5  # mean + z * std = 0.5 + 0: the cap is the same
    assert float(ZScoreClip(warmup=1).threshold(norms(3.0))) == math.inf


# ----------------------------------------------------------------- the replay's culprit rule


def rows(grad_norms: list[float], losses: list[float] | None = None) -> list[dict[str, float]]:
    losses = losses or [1.0] * len(grad_norms)
    return [
        {"row": i, "loss": loss, "grad_norm": g}
        for i, (g, loss) in enumerate(zip(grad_norms, losses))
    ]


def test_a_row_above_the_median_but_under_factor_times_it_is_no_suspect():
    # median 1: row 5 is 3x it (above the median, under factor 10), row 6 is 50x.
    assert _suspects(rows([1, 1, 1, 1, 1, 3, 50]), [], factor=10.0) == [6]
    assert _suspects(rows([1, 1, 1, 1, 1, 3, 9.9]), [], factor=10.0) == []
    assert _suspects(rows([1, 1, 1, 1, 1, 3, 9.9]), [], factor=2.0) == [6, 5]


def test_suspects_by_loss_too_and_nonfinite_rows_first():
    table = rows([1, 1, 1, 1, 20], losses=[1, 1, 40, 1, 1])
    assert _suspects(table, [], factor=10.0) == [2, 4]  # worst first
    assert _suspects(table, [3], factor=10.0) == [3, 2, 4]
    table[0]["grad_norm"] = math.nan
    assert _suspects(table, [], factor=10.0) == [0, 2, 4]


# ----------------------------------------------------------------- rollbacks and their bundles


def _run(
    poisoned: set[int], steps: int, cfg: GuardConfig
) -> tuple[Guard, nn.Module, list[dict[str, torch.Tensor]]]:
    """A guarded SGD run; returns the weights as they were before each step's guard call."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = Guard(model, opt, config=cfg)
    gen = torch.Generator().manual_seed(1)
    before = []
    for i in range(steps):
        x, y = torch.randn(8, 4, generator=gen), torch.randn(8, 1, generator=gen)
        if i in poisoned:
            x = x * math.nan
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        before.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        guard.step(loss, batch=(x, y))
        opt.zero_grad(set_to_none=True)
    return guard, model, before


def _action(guard: Guard, action: str) -> dict:
    return next(r for r in guard.records if r["kind"] == "action" and r["action"] == action)


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_rollback_returns_to_the_newest_snapshot_from_before_the_streak():
    # Snapshots at steps 0, 2 and 4; the streak begins at 5, and the one due at step 6 falls
    # inside it, so it is not taken: step 4's is the one to return to.
    cfg = GuardConfig(detectors=[], snapshot_every=2, keep_snapshots=3, budgets=Budgets(skip=2))
    guard, model, before = _run({5, 6, 7}, 8, cfg)
    rollback = _action(guard, "rollback")
    assert (rollback["step"], rollback["restored_step"]) == (7, 4)
    assert (rollback["skip_start"], rollback["skip_end"]) == (5, 7)
    assert _same(model.state_dict(), before[4])  # step 4's update is undone, to be replayed
    assert not _same(before[4], before[5])


def test_frequent_snapshots_inside_a_long_streak_still_allow_a_rollback():
    # Every step snapshotted and only two kept: snapshots due inside the streak are not taken,
    # so they cannot push out the one from before it.
    cfg = GuardConfig(detectors=[], snapshot_every=1, budgets=Budgets(skip=3))
    guard, _, _ = _run({5, 6, 7, 8}, 12, cfg)
    rollback = _action(guard, "rollback")
    assert rollback["step"] == 8 and rollback["restored_step"] == 5
    assert guard.counters.rollbacks == 1


def test_a_rollback_bundle_holds_the_state_the_streak_left_and_the_step_that_rolled_back(
    tmp_path: Path,
):
    cfg = GuardConfig(
        detectors=[],
        snapshot_every=4,
        budgets=Budgets(skip=1),
        incident_dir=str(tmp_path),
    )
    guard, model, before = _run({6, 7}, 8, cfg)
    rollback = _action(guard, "rollback")
    bundle = load_bundle(rollback["bundle"])
    assert (bundle.step, bundle.position, bundle.action) == (7, 7, "rollback")
    assert bundle.signal == "nonfinite"
    # Before the rollback: the weights step 7 started from (step 6 was skipped), not the
    # snapshot of step 4 that the rollback restored.
    assert _same(bundle.snapshot["model"], before[7])
    assert _same(model.state_dict(), before[4])
    assert not _same(before[7], before[4])
    assert math.isnan(bundle.recorded["loss"])
    skip = load_bundle(_action(guard, "skip")["bundle"])
    assert (skip.step, skip.action) == (6, "skip")


# ----------------------------------------------------------------- the response ladder's budgets


def _ladder(**budgets: int) -> Responder:
    return Responder([], {}, ("skip", "rollback", "abort"), Budgets(**budgets), 0.5)


def _bad_step(r: Responder, can_rollback: bool = True) -> str:
    return r.decide([False, False, True], can_rollback).action  # bits: clipped, amp, nonfinite


def test_the_rollback_budget_counts_every_rollback_of_the_run():
    r = _ladder(skip=1, rollback=2)
    seen = [_bad_step(r) for _ in range(6)]
    assert seen == ["skip", "rollback", "skip", "rollback", "skip", "abort"]
    assert (r.counters.rollbacks, r.counters.streak) == (2, 1)


def test_a_rollback_starts_a_new_streak_and_needs_a_snapshot():
    r = _ladder(skip=2, rollback=5)
    assert [_bad_step(r) for _ in range(3)] == ["skip", "skip", "rollback"]
    assert r.counters.streak == 0
    assert [_bad_step(r) for _ in range(2)] == ["skip", "skip"]
    assert _bad_step(r, can_rollback=False) == "abort"


def test_a_logged_signal_does_not_skip_on_the_device():
    r = Responder([SpikeDetector("loss")], {"spike": ("log",)}, ("skip",), Budgets(), 0.5)
    assert r.keys == ["amp_overflow", "nonfinite", "spike:loss"]
    assert not r.skips_on_device([False, False, False, True])
    assert r.skips_on_device([False, False, True, False])
    assert not Responder.skipped_bits([True, False], [0.0, 1.0])


def test_an_abort_reports_the_budgets_spent_and_the_windows():
    c = Counters(streak=3, skips=7, backoffs=1, rollbacks=2)
    verdict = Verdict("abort", "nonfinite", "nonfinite: budgets spent")
    pending = SimpleNamespace(step=12, position=15, verdict=verdict)
    err = GuardAbort.of(pending, "restored", c, [(4, 6), (9, 11)])
    assert err.incident == {
        "step": 12,
        "position": 15,
        "signal": "nonfinite",
        "reason": "nonfinite: budgets spent",
        "state": "restored",
        "skips_in_a_row": 3,
        "skips": 7,
        "rollbacks": 2,
        "backoffs": 1,
        "skipped_windows": [[4, 6], [9, 11]],
    }
    assert "step 12 (position 15)" in str(err) and "restored" in str(err)
    assert "step" not in err.row() and "skipped_windows" not in err.row()
    assert err.row()["position"] == 15
    bare = GuardAbort.of(SimpleNamespace(step=1, position=1, verdict=None), "x", c, [])
    assert (bare.incident["signal"], bare.incident["reason"]) == ("", "")


# ----------------------------------------------------------------- bad windows and snapshots


def test_skip_windows_merge_when_they_touch_and_stay_apart_otherwise():
    s = SkipList()
    s.add(0, 2)
    s.add(3, 5)  # adjacent: one window
    s.add(7, 8)  # a gap of one position: two windows
    assert s.windows == [(0, 5), (7, 8)]
    assert [s.next_allowed(p) for p in (0, 5, 6, 7)] == [6, 6, 6, 9]


def test_a_bad_window_is_widened_by_skip_before_and_skip_after():
    rb = Rollbacks(skip_before=2, skip_after=1)
    rb.streak_start = 5
    assert rb.window(7) == (3, 8)
    rb.streak_start = 1
    assert rb.window(2) == (0, 3)  # never before position 0
    assert rb.skip_list.windows == [(0, 8)]
    state = rb.state_dict()
    back = Rollbacks()
    back.load_state_dict(state)
    assert (back.streak_start, back.skip_list.windows) == (1, [(0, 8)])


@pytest.mark.parametrize(
    "kwargs",
    [{"per_step": 0}, {"per_step": True}, {"start": -1}, {"start": True}, {"start": 1.0}],
)
def test_a_skip_sampler_refuses_a_bad_count(kwargs):
    with pytest.raises(ValueError):
        SkipSampler(range(4), lambda p: False, **kwargs)


@pytest.mark.parametrize("name", ["position", "drop"])
def test_a_skip_sampler_refuses_a_hook_that_is_not_callable(name):
    with pytest.raises(TypeError):
        SkipSampler(range(4), lambda p: False, **{name: 3})
    SkipSampler(range(4), lambda p: False, **{name: lambda: 0})


def test_a_skip_sampler_counts_from_its_start_and_has_the_samplers_length():
    s = SkipSampler(range(8), lambda p: p in (2, 3), per_step=2, start=1)
    assert s.count == 2
    assert list(s) == [0, 1, 6, 7]  # items in pairs at positions 1, 2, 3, 4; 2 and 3 skipped
    assert len(s) == 8
    with pytest.raises(TypeError):
        len(SkipSampler(iter(range(3)), lambda p: False))
    back = SkipSampler(range(8), lambda p: False)
    back.load_state_dict(s.state_dict())
    assert (back.count, back.per_step) == (s.count, 2)


# ----------------------------------------------------------------- incident writer state


def test_an_incident_writer_state_round_trips_and_refuses_bad_counts(tmp_path: Path):
    w = IncidentWriter(tmp_path)
    w.load_state_dict({"written": [str(tmp_path / "a.pt")], "dropped": 0})
    assert (w.written, w.dropped) == ([tmp_path / "a.pt"], 0)
    assert w.state_dict() == {"written": [str(tmp_path / "a.pt")], "dropped": 0}
    for bad in (
        {"written": "a.pt", "dropped": 0},
        {"written": [1], "dropped": 0},
        {"written": [], "dropped": -1},
        {"written": [], "dropped": True},
        {"written": [], "dropped": 1.0},
    ):
        with pytest.raises(ValueError):
            w.load_state_dict(bad)
    assert (w.written, w.dropped) == ([tmp_path / "a.pt"], 0)


# ----------------------------------------------------------------- what a skip puts back


def test_an_optimizer_keeper_puts_back_state_the_step_changed_in_place():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    for _ in range(2):
        model(torch.randn(4, 3)).sum().backward()
        opt.step()
    keeper = OptimizerKeeper(opt, list(model.parameters()))
    before = {k: v.clone() for k, v in opt.state[model.weight].items()}
    weights = model.weight.detach().clone()
    model(torch.randn(4, 3)).sum().backward()
    opt.step()  # Adam updates exp_avg and exp_avg_sq in place
    keeper.restore(opt)
    assert all(torch.equal(opt.state[model.weight][k], v) for k, v in before.items())
    assert torch.equal(model.weight, weights)


def test_group_state_leaves_the_scheduler_alone_when_none_is_given():
    model = nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    kept = GroupState(opt, sched)
    opt.step()
    sched.step()
    kept.restore(opt, None)  # the hyperparameters only
    assert opt.param_groups[0]["lr"] == 1.0 and sched.last_epoch == 1
    kept.restore(opt, sched)
    assert sched.last_epoch == 0


def _scaled_step() -> tuple[torch.amp.GradScaler, torch.optim.Optimizer]:
    model = nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0, growth_interval=1)
    scaler.scale(model(torch.ones(1, 2)).sum()).backward()
    scaler.unscale_(opt)
    return scaler, opt


@pytest.mark.parametrize("on_device", [False, True])
@pytest.mark.parametrize("skipped", [False, True])
def test_a_skipped_step_does_not_grow_the_loss_scale(on_device, skipped):
    scaler, _ = _scaled_step()
    flag = torch.tensor(skipped) if on_device else skipped
    scaler_update(scaler, flag, sync=not on_device)
    # growth_interval 1: one finite step the guard applied doubles the scale.
    assert scaler.get_scale() == (256.0 if skipped else 512.0)
    assert int(scaler._growth_tracker) == 0
    with pytest.raises(ValueError):
        scaler_update(_scaled_step()[0], torch.tensor(True), sync=True)


# ----------------------------------------------------------------- documented defaults and ranges

DOCUMENTED_DEFAULTS = [
    (FixedThreshold, {"max_norm": 1.0}),
    (QuantileClip, {"quantile": 0.9, "history": 1000, "warmup": 25, "max_norm": None}),
    (ZScoreClip, {"alpha": 0.97, "z_thresh": 2.5, "warmup": 25, "mode": "adaptive"}),
    (ZScoreClip, {"max_norm": None, "eps": 1e-6}),
    (EMARatioClip, {"ratio": 1.05, "beta": 0.98, "warmup": 100, "max_norm": 1.0}),
    (AGCPolicy, {"clip_factor": 0.01, "eps": 1e-3}),
    (SpikeDetector, {"signal": "loss", "window": 128, "z": 6.0, "warmup": 64, "log": True}),
    (SpikeDetector, {"min_std": 1e-3, "bootstrap": None}),
    (RatioSpikeDetector, {"ratio": 10.0, "window": 128, "patience": 1}),
    (VanishingDetector, {"floor": 1e-3, "patience": 10}),
    (UpdateRatioDetector, {"max_ratio": 0.1, "include_1d": False, "eps": 1e-12}),
]


@pytest.mark.parametrize(("cls", "expected"), DOCUMENTED_DEFAULTS)
def test_policies_and_detectors_default_to_what_their_docstrings_say(cls, expected):
    config = cls().state_dict()
    assert {k: config[k] for k in expected} == expected


@pytest.mark.parametrize(
    ("make", "ok"),
    [
        (lambda: EMARatioClip(beta=1.0), False),  # the EMA would never move
        (lambda: EMARatioClip(beta=0.0), True),
        (lambda: EMARatioClip(ratio=0.0), False),
        (lambda: ZScoreClip(alpha=1.0), False),
        (lambda: ZScoreClip(alpha=0.0), True),
        (lambda: ZScoreClip(z_thresh=0.0), False),
        (lambda: AGCPolicy(eps=0.0), False),  # a zero-norm weight would freeze
        (lambda: AGCPolicy(clip_factor=0.0), False),
    ],
)
def test_policy_arguments_at_the_edge_of_their_range(make, ok):
    if ok:
        make()
    else:
        with pytest.raises(ValueError):
            make()


def _ema_step(policy: EMARatioClip, per: list[float], accepted: torch.Tensor) -> None:
    grads = [torch.tensor(v) for v in per]
    n = GradNorms(grads, torch.linalg.vector_norm(torch.stack(grads)), YES)
    limits = policy.threshold(n)
    policy.update(n, [torch.minimum(g, lim) for g, lim in zip(grads, limits)], accepted)


def test_ema_ratio_clip_does_not_learn_from_a_rejected_step():
    policy = EMARatioClip(warmup=0, max_norm=None)
    for _ in range(2):
        _ema_step(policy, [1.0, 2.0], YES)
    before = {k: v.clone() for k, v in policy.state_dict()["state"].items()}
    assert before["gamma"].isfinite().all() and int(before["count"]) == 2
    _ema_step(policy, [1.5, 3.0], NO)
    after = policy.state_dict()["state"]
    assert all(torch.equal(before[k], after[k]) for k in before)
    _ema_step(policy, [1.5, 3.0], YES)
    after = policy.state_dict()["state"]
    assert int(after["count"]) == 3 and not torch.equal(before["gamma"], after["gamma"])


def test_scaler_unscaled_tells_whether_this_step_was_unscaled_already():
    scaler, opt = _scaled_step()
    assert scaler_unscaled(scaler, opt)
    assert not scaler_unscaled(scaler, torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=0.1))
    scaler.update()
    assert not scaler_unscaled(scaler, opt)
    assert not scaler_unscaled(torch.amp.GradScaler("cpu"), opt)


def test_quantile_clip_does_not_learn_from_a_rejected_step():
    policy = QuantileClip(warmup=1, history=4)
    for g, accepted in ((1.0, YES), (2.0, YES), (50.0, NO)):
        n = norms(g)
        policy.update(n, torch.minimum(n.total, policy.threshold(n)), accepted)
    st = policy.state_dict()["state"]
    assert int(st["count"]) == 2
    assert sorted(v for v in st["buffer"].tolist() if not math.isnan(v)) == [1.0, 2.0]
