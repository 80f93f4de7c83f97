"""The Guard end to end: rollback, resume, the ladder, AMP, frameworks, no host sync, divergence."""

from __future__ import annotations

import copy
import io
import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn

from gradguard.core.snapshot import rng_state, set_rng_state
from gradguard.decide.detect import (
    NonFiniteDetector,
    SpikeDetector,
    UpdateRatioDetector,
    VanishingDetector,
)
from gradguard.decide.policies import (
    AGCPolicy,
    ClipPolicy,
    EMARatioClip,
    FixedThreshold,
    ZScoreClip,
)
from gradguard.guard.guard import Guard, GuardConfig, Stage, StepReport
from gradguard.guard.response import Budgets, GuardAbort
from gradguard.records.recorder import Recorder
from tests import conformance as C
from tests.test_guard_skip import _assert_bitwise

# ----------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # Tiny models: intra-op threads only add contention on a shared CI machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _regression_data(
    n: int, seed: int = 1, batch: int = 16
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(8, 1, generator=g)
    out = []
    for _ in range(n):
        x = torch.randn(batch, 8, generator=g)
        out.append((x, x @ w + 0.1 * torch.randn(batch, 1, generator=g)))
    return out


def _net(dropout: float = 0.05) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Dropout(dropout), nn.Linear(32, 1))


def _eval_loss(model: nn.Module, data: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    model.eval()
    with torch.no_grad():
        x = torch.cat([d[0] for d in data])
        y = torch.cat([d[1] for d in data])
        return float(nn.functional.mse_loss(model(x), y))


# ----------------------------------------------------------------------------- rollback

N_RB, POISON = 100, 60


def _rollback_run(fused: bool, poison: bool, guarded: bool = True, drop: int | None = None):  # type: ignore[no-untyped-def]
    model = _net()
    opt = torch.optim.Adam(model.parameters(), lr=0.05, fused=fused)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=N_RB)
    data = _regression_data(N_RB, batch=128)  # large batches: little run-to-run noise
    if poison:
        x, y = data[POISON]
        data[POISON] = (x * 30, y * 300)  # a corrupted batch: a loss spike of ~1e5x
    cfg = GuardConfig(
        policy=ZScoreClip(),  # pinned: this test is about rollback, not the default policy
        detectors=[SpikeDetector("loss", window=32, z=6.0, warmup=16)],
        responses={"spike:loss": ("rollback", "abort")},
        snapshot_every=10,
    )
    guard = Guard(model, opt, sched, config=cfg)
    checked: list[bool] = []
    pos = 0
    while pos < N_RB:
        if pos == drop:
            pos += 1
            continue
        x, y = data[pos]
        model.train()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        if not guarded:
            opt.step()
            sched.step()
            opt.zero_grad()
            pos += 1
            continue
        report = guard.step(loss)
        opt.zero_grad()
        if report.action == "rollback":
            snap = guard.snapshots.latest()
            assert snap is not None
            model_now = {k: v.clone() for k, v in model.state_dict().items()}
            _assert_bitwise(model_now, snap["model"], "model after rollback")
            _assert_bitwise(opt.state_dict(), snap["optimizer"], "optimizer after rollback")
            assert sched.state_dict() == snap["scheduler"]
            checked.append(True)
        pos = pos + 1 if drop is not None else guard.position
    guard.flush()
    return model, opt, guard, _eval_loss(model, _regression_data(N_RB, batch=128)), checked


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_poisoned_batch_rolls_back_and_is_skipped_on_replay(fused: bool) -> None:
    model, opt, guard, final, checked = _rollback_run(fused, poison=True)
    assert checked == [True]  # exactly one rollback, and the state was the snapshot's, bitwise
    assert guard.counters.rollbacks == 1
    assert guard.should_skip(POISON) and not guard.should_skip(POISON - 1)
    assert guard.skip_list.windows == [(POISON, POISON)]
    events = [r for r in guard.records if r["kind"] == "action"]
    assert [(e["action"], e["signal"], e["restored_step"]) for e in events] == [
        ("rollback", "spike:loss", 60)
    ]
    # The replay equals, bit for bit, a run that never saw the poisoned batch ...
    ref_model, ref_opt, _, _, _ = _rollback_run(fused, poison=False, drop=POISON)
    _assert_bitwise(model.state_dict(), ref_model.state_dict(), "model")
    _assert_bitwise(opt.state_dict(), ref_opt.state_dict(), "optimizer")
    if fused:
        return  # the losses below are the plain run's; fused Adam rounds differently
    # ... ends within 1% of the clean run, while the unguarded poisoned run does not.
    clean = _rollback_run(fused, poison=False)[3]
    unguarded = _rollback_run(fused, poison=True, guarded=False)[3]
    assert abs(final - clean) <= 0.01 * clean
    assert unguarded > 1.5 * clean


def test_skips_in_a_row_escalate_to_rollback_then_abort() -> None:
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    cfg = GuardConfig(
        policy=FixedThreshold(5.0),
        detectors=[],
        budgets=Budgets(skip=2, rollback=1),
        snapshot_every=4,
        skip_before=1,
    )
    guard = Guard(model, opt, config=cfg)
    data = _regression_data(40)
    actions: list[tuple[int, str]] = []
    bad = {9, 10, 11}  # three bad positions in a row: skip, skip, rollback
    with pytest.raises(GuardAbort) as info:
        while guard.position < 40:
            pos = guard.position
            x, y = data[pos]
            loss = nn.functional.mse_loss(model(x), y)
            if pos in bad or pos >= 30:
                loss = loss * math.nan
            loss.backward()
            actions.append((pos, guard.step(loss).action))
            opt.zero_grad()
    assert actions[9:12] == [(9, "skip"), (10, "skip"), (11, "rollback")]
    assert guard.skip_list.windows[0] == (8, 11)  # flagged 9..11 widened by skip_before=1
    assert actions[12][0] == 12 and actions[12][1] == "step"  # replay resumed at position 12
    assert actions[-2:] == [(30, "skip"), (31, "skip")]
    incident = info.value.incident  # position 32: a third skip in a row, no rollback left
    assert incident["position"] == 32 and incident["signal"] == "nonfinite"
    assert incident["rollbacks"] == 1 and "budgets spent" in incident["reason"]
    kinds = [r["kind"] for r in guard.records]
    assert "incident" in kinds


def test_backoff_lowers_the_learning_rate_and_skips() -> None:
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    cfg = GuardConfig(detectors=[], responses={"nonfinite": ("backoff", "abort")})
    guard = Guard(model, opt, sched, config=cfg)
    before = copy.deepcopy(model.state_dict())
    x, y = _regression_data(1)[0]
    loss = nn.functional.mse_loss(model(x), y) * math.inf
    loss.backward()
    used: list[float] = []
    opt.register_step_pre_hook(lambda o, a, k: used.append(o.param_groups[0]["lr"]))
    report = guard.step(loss)
    assert report.action == "backoff" and "learning rate" in report.reason
    assert guard.lr_scale.scale == 0.5 and used == []
    _assert_bitwise(model.state_dict(), before)
    assert sched.last_epoch == 0  # not advanced on the skipped step
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    guard.step()
    assert used == [pytest.approx(0.05)]  # LambdaLR recomputes 0.1; the step still uses 0.05
    # The scheduler keeps its own value; the back-off is applied around each optimizer step.
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)
    assert guard.records[-1]["lr"] == pytest.approx(0.05)


# ----------------------------------------------------------------------------- resume


def _resume_run(fused: bool, split: int | None, n: int = 30) -> dict[str, Any]:
    data = _regression_data(n, seed=3)

    def build() -> tuple[nn.Module, torch.optim.Optimizer, Any, Guard]:
        model = _net()
        opt = torch.optim.AdamW(model.parameters(), lr=0.01, fused=fused)
        sched = torch.optim.lr_scheduler.StepLR(opt, 5, 0.8)
        cfg = GuardConfig(policy=ZScoreClip(warmup=5), snapshot_every=7)
        return model, opt, sched, Guard(model, opt, sched, config=cfg)

    model, opt, sched, guard = build()
    for i in range(n):
        if i == split:
            buf = io.BytesIO()
            torch.save(
                {
                    "model": model.state_dict(),
                    "opt": opt.state_dict(),
                    "sched": sched.state_dict(),
                    "guard": guard.state_dict(),
                    "rng": rng_state(),
                },
                buf,
            )
            buf.seek(0)
            ckpt = torch.load(buf, weights_only=True)
            torch.manual_seed(1234)  # a new process: everything fresh
            model, opt, sched, guard = build()
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["opt"])
            sched.load_state_dict(ckpt["sched"])
            guard.load_state_dict(ckpt["guard"])
            set_rng_state(ckpt["rng"])
        x, y = data[i]
        model.train()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        if i in (4, 17):
            loss = loss * math.nan  # two incidents, on both sides of the split
        guard.step(loss)
        opt.zero_grad()
    state = guard.state_dict()
    return {"model": model.state_dict(), "opt": opt.state_dict(), "guard": state}


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_resuming_from_state_dicts_gives_the_same_trajectory(fused: bool) -> None:
    straight = _resume_run(fused, None)
    resumed = _resume_run(fused, 12)
    _assert_bitwise(resumed["model"], straight["model"], "model")
    _assert_bitwise(resumed["opt"], straight["opt"], "optimizer")
    _assert_bitwise(resumed["guard"], straight["guard"], "guard")
    rows = straight["guard"]["recorder"]["rows"]
    assert [r["step"] for r in rows if r["kind"] == "action"] == [4, 17]


def test_state_dict_roundtrips_through_weights_only_load() -> None:
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = Guard(model, opt, config=GuardConfig(policy=ZScoreClip(warmup=3)))
    for x, y in _regression_data(6):
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        guard.step(loss)
        opt.zero_grad()
    guard.skip_list.add(2, 3)
    state = guard.state_dict()
    other = Guard(
        _net(),
        torch.optim.SGD(_net().parameters(), lr=0.01),
        config=GuardConfig(policy=ZScoreClip(warmup=3)),
    )
    other.load_state_dict(C.roundtrip_bytes(state))
    _assert_bitwise(other.state_dict(), state, "guard")
    assert other.should_skip(3) and other.step_count == 6
    with pytest.raises(ValueError, match="lacks keys"):
        other.load_state_dict({"version": 1})
    assert other.step_count == 6  # unchanged by the failed load
    wrong = Guard(
        _net(), torch.optim.SGD(_net().parameters(), lr=0.01), config=GuardConfig(detectors=[])
    )
    with pytest.raises(ValueError, match="same detectors"):
        wrong.load_state_dict(state)


# ----------------------------------------------------------------------------- AMP


def test_amp_overflow_is_the_scalers_business() -> None:
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127, growth_interval=1000)
    policy = ZScoreClip(warmup=2)
    guard = Guard(model, opt, scaler=scaler, config=GuardConfig(policy=policy))
    actions = []
    for x, y in _regression_data(16):
        loss = 1000 * nn.functional.mse_loss(model(x), y)
        scaler.scale(loss).backward()  # 2**127 x gradients ~1e3 overflow fp32 to inf
        report = guard.step(loss)
        actions.append((report.action, report.signal))
        opt.zero_grad()
    skipped = [a for a in actions if a[0] == "skip"]
    applied = [a for a in actions if a[0] in ("step", "clip")]
    assert actions[0] == ("skip", "amp_overflow") and applied
    assert len(skipped) + len(applied) == len(actions)
    assert all(sig == "amp_overflow" for _, sig in skipped)
    assert guard.counters.amp_skips == len(skipped) and guard.counters.skips == 0
    assert scaler.get_scale() < 2.0**127
    # No statistic learned from an overflowed step; no incident was recorded.
    assert int(policy.state_dict()["state"]["count"]) == len(applied)
    assert not [r for r in guard.records if r["kind"] == "action"]


# ----------------------------------------------------------------------------- frameworks


@pytest.mark.parametrize(
    ("fused", "with_sched"),
    [(False, True), (True, True), (True, False)],
    ids=["plain", "fused", "fused-on-device"],
)
def test_framework_hooks_skip_the_frameworks_own_step(fused: bool, with_sched: bool) -> None:
    def run(poison: set[int], drop: set[int]) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
        model = _net(dropout=0.0)  # a dropped batch draws no dropout mask: keep RNG out of it
        opt = torch.optim.AdamW(model.parameters(), lr=0.01, fused=fused)
        sched = torch.optim.lr_scheduler.StepLR(opt, 3, 0.5)
        cfg = GuardConfig(budgets=Budgets(skip=5))
        guard = Guard(model, opt, sched if with_sched else None, config=cfg)
        for i, (x, y) in enumerate(_regression_data(12)):
            if i in drop:
                continue
            model.train()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            if i in poison:
                model[0].weight.grad[1, 1] = math.nan  # type: ignore[index]
            report = guard.before_optimizer_step(loss)  # what a framework hook calls
            opt.step()  # ... and what the framework then does itself
            if with_sched:
                sched.step()
            guard.after_optimizer_step()
            assert report.skipped == (i in poison)
            opt.zero_grad()
        return model, opt, sched

    m1, o1, s1 = run({3, 7}, set())
    m2, o2, s2 = run(set(), {3, 7})
    _assert_bitwise(m1.state_dict(), m2.state_dict(), "model")
    _assert_bitwise(o1.state_dict(), o2.state_dict(), "optimizer")
    assert s1.state_dict() == s2.state_dict()
    assert "step" not in vars(s1)  # the one-shot no-op was removed again
    assert not hasattr(o1, "found_inf")


def test_gradient_accumulation_acts_once_on_the_accumulated_gradient() -> None:
    def run(poison: bool, drop: bool) -> nn.Module:
        model = _net(dropout=0.0)
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        guard = Guard(model, opt, config=GuardConfig(policy=FixedThreshold(0.5)))
        data = _regression_data(12)
        for step in range(6):
            if drop and step == 2:
                continue
            for micro in range(2):
                x, y = data[2 * step + micro]
                (nn.functional.mse_loss(model(x), y) / 2).backward()
                if poison and step == 2 and micro == 0:
                    model[3].weight.grad[0, 0] = math.inf  # type: ignore[index]
            report = guard.step()
            assert report.skipped == (poison and step == 2)
            opt.zero_grad()
        return model

    _assert_bitwise(run(True, False).state_dict(), run(False, True).state_dict())


# ----------------------------------------------------------------------------- conformance


def test_guarded_step_with_a_fused_optimizer_has_no_host_sync() -> None:
    model = _net()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, fused=True)
    sched = torch.optim.lr_scheduler.StepLR(opt, 2, 0.9)
    guard = Guard(model, opt, sched, recorder=Recorder(flush_every=1000))
    assert guard.lazy
    data = _regression_data(12)
    for x, y in data[:4]:
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        guard.step(loss)
        opt.zero_grad()
    with C.no_host_sync():
        for x, y in data[4:]:
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            guard.step(loss)
            opt.zero_grad()
    assert sched.last_epoch == 12  # stepped at once, on the guess the step was applied
    rows = guard.flush()  # reads the last step's flags
    assert rows[-1]["step"] == 11
    assert {r["action"] for r in guard.records if r["kind"] == "step"} <= {"step", "clip"}


def test_the_no_sync_check_would_catch_a_per_step_read() -> None:
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = Guard(model, opt, recorder=Recorder(flush_every=1))  # flushes every step
    x, y = _regression_data(1)[0]
    nn.functional.mse_loss(model(x), y).backward()
    with pytest.raises(C.HostSyncError), C.no_host_sync():
        guard.step()


def test_a_non_finite_loss_is_an_incident_with_a_report() -> None:
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = Guard(model, opt, config=GuardConfig(detectors=[NonFiniteDetector()]))
    assert guard.keys == ["amp_overflow", "nonfinite"]  # built in, not doubled
    x, y = _regression_data(1)[0]
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    report = guard.step(loss * math.nan)
    assert isinstance(report, StepReport)
    d = report.to_dict()
    assert d["action"] == "skip" and d["signal"] == "nonfinite" and d["finite"] is True
    assert d["step"] == 0 and d["reason"].startswith("nonfinite")


# ----------------------------------------------------------------------------- divergence


def _deep_mlp_run(guarded: bool) -> tuple[float, float]:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i in range(12):
        lin = nn.Linear(32 if i else 8, 32)
        nn.init.normal_(lin.weight, std=1.6 / math.sqrt(lin.in_features))  # gain > sqrt(2)
        nn.init.zeros_(lin.bias)
        layers += [lin, nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    guard = Guard(model, opt, config=GuardConfig(policy=ZScoreClip(max_norm=1.0)))
    g = torch.Generator().manual_seed(1)
    w = torch.randn(8, 1, generator=g)
    for _ in range(200):
        x = torch.randn(32, 8, generator=g)
        loss = nn.functional.mse_loss(model(x), x @ w / 3)
        loss.backward()
        guard.step(loss) if guarded else opt.step()
        opt.zero_grad()
    x = torch.randn(512, 8, generator=g)
    y = x @ w / 3
    with torch.no_grad():
        return float(nn.functional.mse_loss(model(x), y)), float(y.var())


STEPS_RNN = 150


class _TanhRNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.RNN(2, 32, nonlinearity="tanh", batch_first=True)
        self.out = nn.Linear(32, 1)
        with torch.no_grad():  # spectral radius ~1: the edge where gradients explode
            self.rnn.weight_hh_l0.normal_(0.0, 1.0 / math.sqrt(32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.rnn(x)[0][:, -1])  # type: ignore[no-any-return]


def _rnn_run(guarded: bool) -> tuple[float, float]:
    torch.manual_seed(0)
    model = _TanhRNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = Guard(model, opt, config=GuardConfig(policy=ZScoreClip(max_norm=1.0)))
    g = torch.Generator().manual_seed(2)

    def batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        v = torch.rand(n, 20, generator=g)
        first = torch.randint(0, 10, (n,), generator=g)
        second = torch.randint(10, 20, (n,), generator=g)
        marks = torch.zeros(n, 20).scatter_(1, torch.stack([first, second], 1), 1.0)
        return torch.stack([v, marks], -1), v[:, -2:].sum(1, keepdim=True)

    for _ in range(STEPS_RNN):
        x, y = batch(32)
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        guard.step(loss) if guarded else opt.step()
        opt.zero_grad()
    x, y = batch(512)
    with torch.no_grad():
        return float(nn.functional.mse_loss(model(x), y)), float(y.var())


@pytest.mark.parametrize("run", [_deep_mlp_run, _rnn_run], ids=["deep-mlp", "tanh-rnn"])
def test_models_that_diverge_unguarded_train_guarded(run: Any) -> None:
    unguarded, _ = run(False)
    guarded, variance = run(True)
    assert not math.isfinite(unguarded)
    assert math.isfinite(guarded) and guarded < 0.5 * variance  # well below predicting the mean


# ----------------------------------------------------------------------------- bad input


def test_bad_arguments_are_refused_clearly() -> None:
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with pytest.raises(TypeError, match="model"):
        Guard(opt, opt)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="optimizer"):
        Guard(model, model)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="fused"):
        Guard(model, opt, config=GuardConfig(sync="lazy"))
    for kwargs, match in [
        ({"backoff_factor": 1.5}, "backoff_factor"),
        ({"snapshot_every": -1}, "snapshot_every"),
        ({"sync": "sometimes"}, "sync"),
        ({"responses": {"spike": ("rollback", "skip")}}, "severity"),
        ({"responses": {"spike": ("explode",)}}, "unknown action"),
        ({"responses": {"spike": ("log", "skip")}}, "do not escalate"),
        ({"norm_type": 0}, "norm_type"),
        ({"policy": "zclip"}, "ClipPolicy"),
    ]:
        with pytest.raises((TypeError, ValueError), match=match):
            GuardConfig(**kwargs)
    with pytest.raises(ValueError, match=r"Budgets\.skip"):
        Budgets(skip=-1)


def test_should_skip_and_the_sampler_follow_the_skip_list() -> None:
    model = _net()
    guard = Guard(model, torch.optim.SGD(model.parameters(), lr=0.01))
    guard.skip_list.add(1, 2)
    assert [guard.should_skip(i) for i in range(4)] == [False, True, True, False]
    assert guard.drop_batch() == 3 and guard.step_count == 0  # 1 and 2 are skipped anyway
    batches = torch.utils.data.BatchSampler(range(10), batch_size=2, drop_last=False)
    # Position-driven: it starts where the guard is (3), and without steps it moves on itself.
    assert list(guard.skip_sampler(batches)) == [[6, 7], [8, 9]]
    fresh = Guard(model, torch.optim.SGD(model.parameters(), lr=0.01))
    fresh.skip_list.add(1, 2)
    assert list(fresh.skip_sampler(batches)) == [[0, 1], [6, 7], [8, 9]]


def test_resume_from_disk_snapshots_continues_the_same_trajectory(tmp_path: Any) -> None:
    data = _regression_data(16, seed=5)

    def build() -> tuple[nn.Module, torch.optim.Optimizer, Guard]:
        model = _net()
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        cfg = GuardConfig(snapshot_every=5, snapshot_dir=str(tmp_path), detectors=[])
        return model, opt, Guard(model, opt, config=cfg)

    def train(model: nn.Module, opt: torch.optim.Optimizer, guard: Guard, stop: int) -> None:
        while guard.position < stop:
            x, y = data[guard.position]
            model.train()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            guard.step(loss)
            opt.zero_grad()

    model, opt, guard = build()
    train(model, opt, guard, 16)
    straight = copy.deepcopy(model.state_dict())
    # Another run in the same directory "crashes" at position 12; the newest file is then
    # damaged too, so the resume falls back to the one before it.
    for f in tmp_path.iterdir():
        f.unlink()
    model, opt, guard = build()
    train(model, opt, guard, 12)
    newest = max(tmp_path.glob("snapshot-*.pt"))
    newest.write_bytes(newest.read_bytes()[:-50])
    model, opt, guard = build()  # a new process
    start = guard.resume()
    assert start == 5 and guard.snapshots.errors  # snapshot of step 10 unreadable -> step 5
    train(model, opt, guard, 16)
    _assert_bitwise(model.state_dict(), straight, "model")


@pytest.mark.parametrize(
    "policy",
    [FixedThreshold(0.5), ZScoreClip(warmup=2), EMARatioClip(), AGCPolicy(0.01)],
    ids=lambda p: type(p).__name__,
)
def test_every_policy_scope_clips_and_skips(policy: ClipPolicy) -> None:
    model = _net(dropout=0.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    guard = Guard(model, opt, config=GuardConfig(policy=policy, detectors=[]))
    for i, (x, y) in enumerate(_regression_data(6)):
        loss = 50 * nn.functional.mse_loss(model(x), y)  # big gradients: something clips
        loss.backward()
        if i == 4:
            model[3].weight.grad[0, 0] = math.nan  # type: ignore[index]
        report = guard.step(loss)
        d = report.to_dict()
        assert d["clipped_norm"] <= d["total_norm"] * (1 + 1e-6) or not d["finite"]
        assert report.skipped == (i == 4)
        opt.zero_grad()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert "clip" in {r["action"] for r in guard.records if r["kind"] == "step"}


def test_a_step_after_a_forgotten_backward_raises_and_changes_nothing() -> None:
    model = _net()
    sched_opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.StepLR(sched_opt, step_size=1, gamma=0.5)
    guard = Guard(model, sched_opt, scheduler=sched)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="no parameter the optimizer updates has a gradient"):
        guard.step(torch.tensor(1.0))
    assert guard.stage is Stage.READY and guard.step_count == 0 and sched.last_epoch == 0
    assert guard.policy.state_dict() == Guard(_net(), sched_opt).policy.state_dict()
    _assert_bitwise(model.state_dict(), before)


def test_observing_detectors_log_without_skipping() -> None:
    model = _net(dropout=0.0)
    opt = torch.optim.SGD(model.parameters(), lr=5.0)  # huge steps: update/weight ratio fires
    dets = [UpdateRatioDetector(max_ratio=0.01), VanishingDetector(floor=1e-3, patience=2)]
    guard = Guard(model, opt, config=GuardConfig(detectors=dets))
    assert guard.ladders["update_ratio"] == ("log",) and guard.ladders["vanishing"] == ("log",)
    for x, y in _regression_data(4):
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        assert not guard.step(loss).skipped
        opt.zero_grad()
    logged = [r for r in guard.records if r["kind"] == "action"]
    assert logged and all(r["action"] == "log" for r in logged)
    assert "update_ratio" in logged[0]["signal"]


# ----------------------------------------------------------------------------- sparse


def _sparse_run(nan_at: int | None, drop: int | None) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Linear(4, 1))
    opt = torch.optim.SparseAdam(list(model[0].parameters()), lr=0.05)
    dense = torch.optim.Adam(model[1].parameters(), lr=0.05)
    guard = Guard(model, opt, config=GuardConfig(policy=FixedThreshold(0.05)))
    g = torch.Generator().manual_seed(1)
    for i in range(8):
        x = torch.randint(0, 10, (8,), generator=g)
        if i == drop:
            continue
        loss = model(x).pow(2).mean() * 100
        loss.backward()
        if i == nan_at:
            model[0].weight.grad = model[0].weight.grad * math.nan  # type: ignore[operator]
        report = guard.step(loss)
        if not report.skipped:
            dense.step()
        opt.zero_grad()
        dense.zero_grad()
    return model


def test_sparse_gradients_are_clipped_and_skipped() -> None:
    a, b = _sparse_run(nan_at=3, drop=None), _sparse_run(nan_at=None, drop=3)
    _assert_bitwise(a.state_dict(), b.state_dict())
    # Clipping a sparse gradient equals clipping its dense twin by the same total norm.
    emb = nn.Embedding(10, 4, sparse=True)
    emb(torch.tensor([1, 1, 2])).sum().mul(100).backward()
    twin = emb.weight.grad.to_dense()  # type: ignore[union-attr]
    guard = Guard(
        emb,
        torch.optim.SparseAdam(list(emb.parameters())),
        config=GuardConfig(policy=FixedThreshold(1.0), detectors=[]),
    )
    guard.before_optimizer_step()
    holder = nn.Parameter(torch.zeros_like(twin))
    holder.grad = twin
    torch.nn.utils.clip_grad_norm_([holder], 1.0)
    # The same numbers up to the order of the norm's sum (the values hold no zero rows).
    torch.testing.assert_close(emb.weight.grad.to_dense(), twin, rtol=1e-6, atol=0)  # type: ignore[union-attr]


@pytest.mark.parametrize("fused", [False, True], ids=["sync", "sync-free"])
def test_post_step_hook_sees_every_step_with_a_device_flag(fused: bool) -> None:
    model = _net()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, fused=fused)
    guard = Guard(model, opt, config=GuardConfig(detectors=[]))
    seen: list[Any] = []
    remove = guard.register_post_step_hook(lambda r, applied: seen.append(applied))
    for i, (x, y) in enumerate(_regression_data(4)):
        loss = nn.functional.mse_loss(model(x), y) * (math.nan if i == 2 else 1.0)
        loss.backward()
        guard.step(loss)
        opt.zero_grad()
    assert all(isinstance(a, torch.Tensor) and a.dtype == torch.bool for a in seen)
    assert [bool(a) for a in seen] == [True, True, False, True]
    remove()
    nn.functional.mse_loss(model(x), y).backward()
    guard.step()
    assert len(seen) == 4
