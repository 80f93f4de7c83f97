"""Corner cases of real training loops the guard must keep its promises in: BatchNorm buffers, a
parameter only the optimizer holds, a checkpoint saved on rank 0 alone under DDP, schedulers
that set momentum or a tensor LR, setups it refuses, the LR back-off, the skip sampler,
attention models, the step hook, aborts, sparse gradients and resuming mid-streak.

Each test asserts what the guard must do; where the promise is bit for bit, the
guarded run is compared with a run that never saw the bad batch. The sync-free (fused) mode is
tested as the CPU runs it (``lazy``: flags read at the end of the step) and as CUDA runs it
(``late``: flags read at the next step; see ``tests/_matrix_util.make_deferred``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler as S
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler, TensorDataset

import gradguard
from gradguard.decide.detect import SpikeDetector
from gradguard.guard.guard import Guard, GuardAbort, GuardConfig
from gradguard.guard.response import Budgets
from tests._matrix_util import UsedHyperparameters, assert_same, make_deferred


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _data(n: int, inputs: int = 4, outputs: int = 2, seed: int = 1) -> list[Any]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(8, inputs, generator=g), torch.randn(8, outputs, generator=g))
        for _ in range(n)
    ]


def _poisoned(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    x[0, 0] = math.nan
    return x


def _guard(model: nn.Module, opt: Any, sched: Any, sync: str, **kw: Any) -> Guard:
    """A guard in ``sync`` mode: "step" (host decides), "lazy" (CPU sync-free), "late" (CUDA's
    timing: the flags are read at the next step)."""
    config = kw.pop("config", None) or GuardConfig()
    config.sync = "step" if sync == "step" else "lazy"
    guard = Guard(model, opt, sched, config=config, **kw)
    return make_deferred(guard) if sync == "late" else guard


def _bn_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))


SYNC_OPT: dict[str, Callable[[Any], torch.optim.Optimizer]] = {
    "step": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    "lazy": lambda p: torch.optim.AdamW(p, lr=0.01, fused=True),
    "late": lambda p: torch.optim.AdamW(p, lr=0.01, fused=True),
}


# --- module buffers ---------------------------------------------------------------------------


@pytest.mark.parametrize("sync", ["step", "lazy", "late"])
def test_skipped_batch_leaves_batchnorm_buffers(sync: str) -> None:
    data = _data(12)

    def run(nan_at: int | None, drop: int | None) -> tuple[nn.Module, Any, list[str]]:
        m = _bn_model()
        opt = SYNC_OPT[sync](m.parameters())
        guard = _guard(m, opt, None, sync)
        actions = []
        for i, (x, y) in enumerate(data):
            if i == drop:
                continue
            loss = nn.functional.mse_loss(m(_poisoned(x) if i == nan_at else x), y)
            loss.backward()
            actions.append(guard.step(loss).action)
            opt.zero_grad()
        guard.flush()
        return m, opt, actions

    a, opt_a, actions = run(nan_at=5, drop=None)
    b, opt_b, _ = run(nan_at=None, drop=5)
    assert actions[5] == "skip"
    assert_same(a.state_dict(), b.state_dict(), "model")  # running stats and batch counter
    assert_same(opt_a.state_dict(), opt_b.state_dict(), "optimizer")
    a.eval()
    b.eval()
    x = torch.randn(2, 4)
    with torch.no_grad():
        assert torch.isfinite(a(x)).all()
        assert_same(a(x), b(x), "eval output")


# --- a parameter only the optimizer holds -----------------------------------------------------


@pytest.mark.parametrize("sync", ["step", "lazy", "late"])
def test_nan_grad_on_a_parameter_outside_the_model_is_skipped(sync: str) -> None:
    data = _data(5)

    def run(poison: bool, drop: int | None) -> tuple[nn.Module, nn.Parameter, list[str]]:
        torch.manual_seed(0)
        model = nn.Linear(4, 2)
        log_temp = nn.Parameter(torch.zeros(()))  # owned by the loss, not by the model
        opt = torch.optim.AdamW([*model.parameters(), log_temp], lr=0.01, fused=sync != "step")
        guard = _guard(model, opt, None, sync)
        actions = []
        for i, (x, y) in enumerate(data):
            if i == drop:
                continue
            loss = nn.functional.mse_loss(model(x) * log_temp.exp(), y)
            loss.backward()
            if poison and i == 2:
                assert log_temp.grad is not None
                log_temp.grad.fill_(math.nan)  # only this parameter's gradient
            actions.append(guard.step(loss).action)
            opt.zero_grad()
        guard.flush()
        return model, log_temp, actions

    m1, t1, actions = run(poison=True, drop=None)
    m2, t2, _ = run(poison=False, drop=2)
    assert actions[2] == "skip"
    assert torch.isfinite(t1)
    assert_same(t1, t2, "log_temp")
    assert_same(m1.state_dict(), m2.state_dict(), "model")


# --- DDP, a rank-0-only model.state_dict() ----------------------------------------------------


def test_rank0_only_state_dict_starts_no_collective_under_ddp() -> None:
    from tests import _dist_scale as ds
    from tests import _matrix_dist as md

    # A collective one rank starts alone hangs or mismatches: the launcher's timeout fails it.
    ranks = ds.launch(md.rank0_checkpoints, 2, timeout=180.0)
    for sync in ("lazy", "late"):
        r0, r1 = ranks[0][sync], ranks[1][sync]
        assert r0["position"] == r1["position"] == md.POSITIONS
        assert r0["windows"] == r1["windows"] == [[10, 13]], r0["actions"]
        assert r0["actions"] == r1["actions"]
        assert_same(r0["params"], r1["params"], f"{sync}: rank 0 vs rank 1")
        # And the run equals one that never saw the bad positions.
        assert_same(r0["params"], ranks[0]["reference"]["params"], f"{sync} vs reference")
        assert_same(r0["opt"], ranks[0]["reference"]["opt"], f"{sync} optimizer vs reference")


# --- the sync-free mode undoes a scheduler's guess --------------------------------------------


@pytest.mark.parametrize("sync", ["lazy", "late"])
@pytest.mark.parametrize("sched_name", ["onecycle", "cyclic"])
def test_cycled_momentum_and_betas_are_restored_after_a_lazy_skip(
    sync: str, sched_name: str
) -> None:
    data = _data(6)

    def run(nan_at: int | None, drop: int | None) -> tuple[nn.Module, Any, list[Any]]:
        torch.manual_seed(0)
        m = nn.Linear(4, 2)
        opt = torch.optim.AdamW(m.parameters(), lr=0.01, fused=True)
        sched: Any = (
            S.OneCycleLR(opt, max_lr=0.01, total_steps=20)  # cycles betas[0]
            if sched_name == "onecycle"
            else S.CyclicLR(opt, base_lr=0.001, max_lr=0.01, step_size_up=2)
        )
        guard = _guard(m, opt, sched, sync)
        used = UsedHyperparameters(opt, lambda: guard.step_count)
        for i, (x, y) in enumerate(data):
            if i == drop:
                continue
            loss = nn.functional.mse_loss(m(_poisoned(x) if i == nan_at else x), y)
            loss.backward()
            guard.step(loss)
            opt.zero_grad()
        guard.flush()
        return m, sched, used.applied

    a, sa, ua = run(nan_at=3, drop=None)
    b, sb, ub = run(nan_at=None, drop=3)
    assert [(g[0]["lr"], g[0]["betas"]) for g in ua] == [(g[0]["lr"], g[0]["betas"]) for g in ub]
    assert_same(ua, ub, "hyperparameters used")
    assert_same(a.state_dict(), b.state_dict(), "model")
    assert_same(sa.state_dict(), sb.state_dict(), "scheduler")


@pytest.mark.parametrize("sync", ["lazy", "late"])
def test_tensor_lr_is_restored_by_value_after_a_lazy_skip(sync: str) -> None:
    data = _data(6)

    def run(nan_at: int | None, drop: int | None) -> tuple[nn.Module, Any, list[float]]:
        torch.manual_seed(0)
        m = nn.Linear(4, 2)
        lr = torch.tensor(0.01)
        opt = torch.optim.Adam(m.parameters(), lr=lr, fused=True)
        sched = S.StepLR(opt, step_size=1, gamma=0.5)
        guard = _guard(m, opt, sched, sync)
        used = UsedHyperparameters(opt, lambda: guard.step_count)
        for i, (x, y) in enumerate(data):
            if i == drop:
                continue
            loss = nn.functional.mse_loss(m(_poisoned(x) if i == nan_at else x), y)
            loss.backward()
            guard.step(loss)
            opt.zero_grad()
        guard.flush()
        assert opt.param_groups[0]["lr"] is lr  # the fused kernel's tensor, still the same one
        return m, opt, [float(g[0]["lr"]) for g in used.applied]

    a, oa, ua = run(nan_at=2, drop=None)
    b, ob, ub = run(nan_at=None, drop=2)
    assert ua == ub
    assert ua == [ua[0] * 0.5**k for k in range(5)]  # StepLR halving from step 0 on
    assert_same(a.state_dict(), b.state_dict(), "model")
    assert_same(oa.state_dict(), ob.state_dict(), "optimizer")


@pytest.mark.parametrize("sync", ["lazy", "late"])
def test_scheduler_saved_first_between_steps_is_the_settled_state(sync: str) -> None:
    data = _data(4)

    def run(nan_at: int | None, drop: int | None, save_first: bool) -> dict[str, Any]:
        torch.manual_seed(0)
        m = nn.Linear(4, 2)
        opt = torch.optim.AdamW(m.parameters(), lr=0.01, fused=True)
        sched = S.StepLR(opt, step_size=1, gamma=0.5)
        guard = _guard(m, opt, sched, sync)
        for i, (x, y) in enumerate(data):
            if i == drop:
                continue
            loss = nn.functional.mse_loss(m(_poisoned(x) if i == nan_at else x), y)
            loss.backward()
            guard.step(loss)
            opt.zero_grad()
        if not save_first:
            guard.settle()
        # A checkpoint that saves the scheduler first, between two steps.
        return {
            "sched": sched.state_dict(),
            "last_lr": sched.get_last_lr(),
            "group_lr": opt.param_groups[0]["lr"],
            "model": m.state_dict(),
            "opt": opt.state_dict(),
        }

    saved = run(nan_at=3, drop=None, save_first=True)
    settled = run(nan_at=3, drop=None, save_first=False)
    never = run(nan_at=None, drop=3, save_first=True)
    assert saved["sched"]["last_epoch"] == 3
    assert_same(saved, settled, "saved first vs settled")
    assert_same(saved, never, "saved first vs never saw the batch")


# --- refused at construction, or before anything changes --------------------------------------


def _frozen(m: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    return {
        "model": {k: v.clone() for k, v in m.state_dict().items()},
        "opt": opt.state_dict(),
        "pre_hooks": len(opt._optimizer_step_pre_hooks),
        "sd_hooks": len(opt._optimizer_state_dict_pre_hooks),
    }


def test_reduce_lr_on_plateau_is_refused_at_construction() -> None:
    torch.manual_seed(0)
    m = nn.Linear(4, 2)
    opt = torch.optim.AdamW(m.parameters(), lr=0.01)
    sched = S.ReduceLROnPlateau(opt)
    before = _frozen(m, opt)
    with pytest.raises(TypeError, match="ReduceLROnPlateau"):
        Guard(m, opt, sched)
    nn.functional.mse_loss(m(torch.randn(8, 4)), torch.randn(8, 2)).backward()
    assert_same(_frozen(m, opt), before, "after the refusal")
    assert sched.state_dict()["last_epoch"] == 0


def test_a_non_scalar_loss_raises_before_anything_changes() -> None:
    m = _bn_model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    guard = Guard(m, opt)
    x, y = _data(1)[0]
    loss = nn.functional.mse_loss(m(x), y)
    loss.backward()
    grads = [p.grad.clone() for p in m.parameters() if p.grad is not None]
    before = _frozen(m, opt)
    policy = guard.policy.state_dict()
    with pytest.raises(ValueError, match="single value"):
        guard.step(torch.stack([loss, loss * math.nan]))
    assert_same(_frozen(m, opt), before, "after the refusal")
    assert_same([p.grad for p in m.parameters()], grads, "gradients")
    assert_same(guard.policy.state_dict(), policy, "policy")
    assert (guard.step_count, guard.position, guard.records) == (0, 0, [])
    assert guard.step(loss).action in ("step", "clip")  # the guard still works


def test_lbfgs_is_refused_at_construction() -> None:
    m = nn.Linear(4, 2)
    opt = torch.optim.LBFGS(m.parameters())
    before = _frozen(m, opt)
    with pytest.raises(TypeError, match="LBFGS"):
        Guard(m, opt)
    assert_same(_frozen(m, opt), before, "after the refusal")


def _scaler_run(sync: str, spike: int | None, drop: int | None, nan: bool = False) -> Any:
    torch.manual_seed(0)
    m = nn.Linear(4, 2)
    opt = torch.optim.SGD(m.parameters(), lr=0.1, fused=sync != "step")
    sc = torch.amp.GradScaler("cpu", init_scale=256.0, growth_interval=4)
    cfg = GuardConfig(detectors=[SpikeDetector("loss", window=8, warmup=4)])
    guard = _guard(m, opt, None, sync, scaler=sc, config=cfg)
    actions = []
    for i, (x, y) in enumerate(_data(10)):
        if i == drop:
            continue
        if i == spike:
            x, y = (_poisoned(x), y) if nan else (x, y * 30)
        with torch.autocast("cpu", dtype=torch.float16):
            loss = nn.functional.mse_loss(m(x).float(), y)
        sc.scale(loss).backward()
        actions.append(guard.step(loss).action)
        opt.zero_grad()
    guard.flush()
    return sc.state_dict(), m.state_dict(), actions


@pytest.mark.parametrize("sync", ["step", "lazy", "late"])
def test_a_guard_skipped_finite_spike_does_not_grow_the_scaler(sync: str) -> None:
    sa, ma, actions = _scaler_run(sync, spike=8, drop=None)
    sb, mb, _ = _scaler_run(sync, spike=None, drop=8)
    assert actions[8] == "skip"
    assert_same(sa, sb, "scaler")
    assert_same(ma, mb, "model")


@pytest.mark.parametrize("sync", ["step", "lazy", "late"])
def test_nan_batch_under_fp16_leaves_the_scaler_as_the_run_that_never_saw_it(sync: str) -> None:
    """A NaN batch (a non-finite loss) is the guard's incident, not a loss-scale overflow: in
    every sync mode the scaler ends as in the run without that batch (found by test_matrix)."""
    sa, ma, actions = _scaler_run(sync, spike=6, drop=None, nan=True)
    sb, mb, _ = _scaler_run(sync, spike=None, drop=6)
    assert actions[6] == "skip"
    assert_same(sa, sb, "scaler")
    assert_same(ma, mb, "model")


# --- the LR back-off ----------------------------------------------------------------------------


BACKOFF_SCHEDULERS: dict[str, Callable[[Any], Any]] = {
    "steplr": lambda o: S.StepLR(o, 3, 0.7),
    "onecycle": lambda o: S.OneCycleLR(o, 0.01, total_steps=20),
    "cyclic": lambda o: S.CyclicLR(o, 0.001, 0.01, step_size_up=3),
    "sequential": lambda o: S.SequentialLR(
        o, [S.LinearLR(o, 0.1, 1.0, 3), S.ExponentialLR(o, 0.9)], [3]
    ),
}


@pytest.mark.parametrize("sync", ["step", "lazy", "late"])
@pytest.mark.parametrize("sched_name", list(BACKOFF_SCHEDULERS))
def test_backoff_halves_the_lr_the_optimizer_uses(sync: str, sched_name: str) -> None:
    data = _data(10)

    def run(nan_at: int | None, drop: int | None) -> tuple[list[float], list[float], Guard]:
        torch.manual_seed(0)
        m = nn.Linear(4, 2)
        opt = torch.optim.AdamW(m.parameters(), lr=0.01, fused=sync != "step")
        cfg = GuardConfig(responses={"nonfinite": ("backoff", "abort")})
        guard = _guard(m, opt, BACKOFF_SCHEDULERS[sched_name](opt), sync, config=cfg)
        used = UsedHyperparameters(opt, lambda: guard.step_count)
        between = []
        for i, (x, y) in enumerate(data):
            if i == drop:
                continue
            loss = nn.functional.mse_loss(m(_poisoned(x) if i == nan_at else x), y)
            loss.backward()
            guard.step(loss)
            opt.zero_grad()
            guard.settle()
            between.append(opt.param_groups[0]["lr"])
        guard.flush()
        return [g[0]["lr"] for g in used.applied], between, guard

    used, between, guard = run(nan_at=2, drop=None)
    clean, clean_between, _ = run(nan_at=None, drop=2)
    assert guard.counters.backoffs == 1 and guard.lr_scale.scale == 0.5
    assert used[:2] == clean[:2]
    assert used[2:] == [lr * 0.5 for lr in clean[2:]]  # x0.5 is exact in binary
    # Between steps the param groups show the scheduler's own value.
    assert between[:2] + between[3:] == clean_between


@pytest.mark.parametrize("sync", ["step", "lazy", "late"])
def test_backoff_survives_a_rollback(sync: str) -> None:
    """Back-off, back-off, then a rollback; the replay uses the backed-off LR."""
    torch.manual_seed(0)
    m = nn.Linear(4, 1)
    opt = torch.optim.SGD(m.parameters(), lr=0.1, fused=sync != "step")
    cfg = GuardConfig(
        detectors=[SpikeDetector("loss", window=8, warmup=4)],
        responses={"spike:loss": ("backoff", "rollback", "abort")},
        budgets=Budgets(backoff=2, rollback=1),
        snapshot_every=5,
    )
    guard = _guard(m, opt, None, sync, config=cfg)
    used = UsedHyperparameters(opt, lambda: guard.step_count)
    g = torch.Generator().manual_seed(0)
    data = []
    for i in range(24):
        x = torch.randn(32, 4, generator=g)
        y = x.sum(1, keepdim=True) + 0.1 * torch.randn(32, 1, generator=g)
        data.append((x, y * 1e3 if 12 <= i <= 14 else y))  # three spikes in a row
    while guard.position < len(data):
        x, y = data[guard.position]
        loss = nn.functional.mse_loss(m(x), y)
        loss.backward()
        guard.step(loss)
        opt.zero_grad(set_to_none=True)
    guard.flush()
    assert (guard.counters.backoffs, guard.counters.rollbacks) == (2, 1)
    assert guard.skip_list.windows == [(12, 14)]
    assert guard.lr_scale.scale == 0.25
    lrs = [grp[0]["lr"] for grp in used.applied]
    # Snapshot at step 10: steps 0-9 at 0.1, the replay (positions 10, 11, 15, ...) at 0.025.
    assert lrs == [0.1] * 10 + [0.1 * 0.25] * (len(data) - 3 - 10)
    assert opt.param_groups[0]["lr"] == 0.1  # no scheduler: the group keeps its own value


# --- the documented DataLoader pattern ----------------------------------------------------------


@pytest.mark.parametrize("sync", ["step", "lazy", "late"])
def test_skip_sampler_replays_like_the_position_driven_loop(sync: str) -> None:
    g = torch.Generator().manual_seed(0)
    X, Y = torch.randn(160, 4, generator=g), torch.randn(160, 2, generator=g)
    for b in (9, 10, 11, 12):
        X[8 * b, 0] = math.nan

    def make() -> tuple[nn.Module, torch.optim.Optimizer, Guard]:
        torch.manual_seed(0)
        m = nn.Linear(4, 2)
        opt = torch.optim.AdamW(m.parameters(), lr=0.01, fused=sync != "step")
        return (
            m,
            opt,
            _guard(
                m, opt, None, sync, config=GuardConfig(snapshot_every=4, budgets=Budgets(skip=3))
            ),
        )

    m, opt, guard = make()
    sampler = guard.skip_sampler(BatchSampler(SequentialSampler(range(160)), 8, False))
    for x, y in DataLoader(TensorDataset(X, Y), batch_sampler=sampler):
        nn.functional.mse_loss(m(x), y).backward()
        guard.step()
        opt.zero_grad()
    guard.flush()
    assert guard.counters.rollbacks == 1
    windows = guard.skip_list.windows
    assert windows == [(9, 12)] and guard.position == 20

    def replay(drop: set[int]) -> tuple[nn.Module, torch.optim.Optimizer]:
        m, opt, guard = make()
        while guard.position < 20:
            i = guard.position
            if i in drop:
                guard.drop_batch()
                continue
            nn.functional.mse_loss(m(X[8 * i : 8 * i + 8]), Y[8 * i : 8 * i + 8]).backward()
            guard.step()
            opt.zero_grad()
        guard.flush()
        return m, opt

    for name, drop in (
        ("replay", set()),
        ("never saw", {p for a, b in windows for p in range(a, b + 1)}),
    ):
        m2, opt2 = replay(drop)
        assert_same(m.state_dict(), m2.state_dict(), f"DataLoader vs {name}")
        assert_same(opt.state_dict(), opt2.state_dict(), f"DataLoader vs {name}: optimizer")


@pytest.mark.parametrize("snapshot_every", [8, 10])
def test_skip_sampler_second_epoch_leaves_the_bad_window_out_by_identity(
    snapshot_every: int,
) -> None:
    """The documented DataLoader pattern, 40 batches. With ``snapshot_every=10`` the snapshot
    sits at the first bad position (20), so the rollback lands where the sampler was going anyway
    (24)."""
    n_batches = 40
    g = torch.Generator().manual_seed(0)
    X = torch.randn(32 * n_batches, 8, generator=g)
    Y = X.sum(1, keepdim=True)
    X[32 * 20 : 32 * 25, 0] = math.nan  # batches 20..24: 3 skips, a rollback, a skip
    idx = torch.arange(32 * n_batches).float().unsqueeze(1)
    ds = TensorDataset(X, Y, idx)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    guard = Guard(
        model, optimizer, config=GuardConfig(snapshot_every=snapshot_every, budgets=Budgets(skip=3))
    )
    # Verbatim from docs/guard.md.
    loader = DataLoader(
        ds, batch_sampler=guard.skip_sampler(BatchSampler(SequentialSampler(ds), 32, False))
    )
    seen = []
    for epoch in range(2):
        for x, y, i in loader:
            pos_before = guard.position
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            rep = guard.step(loss)
            optimizer.zero_grad(set_to_none=True)
            seen.append((epoch, int(i[0].item()) // 32, pos_before, rep.action))
    assert guard.counters.rollbacks == 1
    assert guard.skip_list.windows == [(20, 23)]
    bad = set(range(20, 24))
    # Epoch 2 never brings the batches of the bad window back; 24 was skipped, not windowed.
    assert [b for e, b, _, _ in seen if e == 1 and b in bad] == []
    assert [(e, b) for e, b, _, a in seen if a == "skip"] == [
        (0, 20),
        (0, 21),
        (0, 22),
        (0, 24),
        (1, 24),
    ]
    # Positions stay in step with the data: batch b of epoch e is at position b + 40 e.
    assert [(e, b, p) for e, b, p, _ in seen if b + n_batches * e != p] == []
    assert guard.position == 2 * n_batches


# --- diagnose on attention ----------------------------------------------------------------------


def test_diagnose_works_on_a_transformer_encoder_layer() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.TransformerEncoderLayer(32, 4, 64, batch_first=True), nn.Linear(32, 1))
    x = torch.randn(4, 10, 32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    d = gradguard.diagnose(model, x)
    assert d.verdict in ("healthy", "exploding", "vanishing")
    assert d.summary().splitlines()[0].startswith("verdict:")
    assert any(r.error is None for r in d.remedies)
    for r in d.remedies:
        if r.error is not None:
            assert r.error and r.error in d.summary()
    # The user's model is untouched by the remedies tried on copies.
    assert isinstance(model.get_submodule("0.self_attn.out_proj"), nn.Linear)
    assert_same(model.state_dict(), before, "the user's model")
    assert gradguard.diagnose(model, x, remedies=False).summary().startswith("verdict:")


# --- EMA through the step hook ----------------------------------------------------------------


@pytest.mark.parametrize("sync", ["step", "lazy", "late"])
def test_ema_through_the_step_hook_equals_the_never_seen_runs_ema(sync: str) -> None:
    data = _data(10)

    def run(nan_at: set[int], drop: set[int]) -> tuple[Any, nn.Module]:
        m = _bn_model()
        opt = SYNC_OPT[sync](m.parameters())
        ema = torch.optim.swa_utils.AveragedModel(
            m, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.9)
        )
        guard = _guard(m, opt, None, sync)
        guard.register_step_hook(lambda r: ema.update_parameters(m))
        for i, (x, y) in enumerate(data):
            if i in drop:
                continue
            loss = nn.functional.mse_loss(m(_poisoned(x) if i in nan_at else x), y)
            loss.backward()
            guard.step(loss)
            opt.zero_grad()
        guard.flush()
        return ema, m

    ema_a, a = run({3, 7}, set())
    ema_b, b = run(set(), {3, 7})
    assert int(ema_a.n_averaged) == 8
    assert_same(ema_a.state_dict(), ema_b.state_dict(), "ema")
    assert_same(a.state_dict(), b.state_dict(), "model")


@pytest.mark.parametrize("sync", ["step", "lazy", "late"])
def test_ema_through_the_step_hook_forgets_rolled_back_steps(sync: str) -> None:
    """A rollback un-applies the steps since the snapshot; an EMA fed by the step hook must not
    keep them (twice, after the replay): it equals the EMA of the run that never saw the batch."""
    data = _data(10)

    def run(nan_at: set[int], drop: set[int]) -> tuple[Any, nn.Module]:
        m = _bn_model()
        opt = SYNC_OPT[sync](m.parameters())
        ema = torch.optim.swa_utils.AveragedModel(
            m, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.9)
        )
        cfg = GuardConfig(snapshot_every=3, responses={"nonfinite": ("rollback", "abort")})
        guard = _guard(m, opt, None, sync, config=cfg)
        guard.register_step_hook(lambda r: ema.update_parameters(m), state=ema)
        while guard.position < len(data):
            i = guard.position
            if i in drop:
                guard.drop_batch()
                continue
            x, y = data[i]
            loss = nn.functional.mse_loss(m(_poisoned(x) if i in nan_at else x), y)
            loss.backward()
            guard.step(loss)
            opt.zero_grad()
        guard.flush()
        return ema, m

    ema_a, a = run({5}, set())
    ema_b, b = run(set(), {5})
    assert_same(a.state_dict(), b.state_dict(), "model")
    assert int(ema_a.n_averaged) == int(ema_b.n_averaged) == 9
    assert_same(ema_a.state_dict(), ema_b.state_dict(), "ema")


# --- GuardAbort leaves the last good state ------------------------------------------------------


def _abort_run(sync: str, config: GuardConfig, bad: set[int], stop: int, drop: set[int]) -> Any:
    m = _bn_model()
    opt = SYNC_OPT[sync](m.parameters())
    guard = _guard(m, opt, None, sync, config=config)
    data = _data(stop)
    err: GuardAbort | None = None
    for _ in range(3 * stop):
        pos = guard.position
        if pos >= stop:
            break
        if pos in drop:
            guard.drop_batch()
            continue
        x, y = data[pos]
        loss = nn.functional.mse_loss(m(_poisoned(x) if pos in bad else x), y)
        loss.backward()
        try:
            guard.step(loss)
        except GuardAbort as e:
            err = e
            break
        opt.zero_grad()
    if err is None:
        guard.flush()
    return m, opt, err


@pytest.mark.parametrize("sync", ["step", "lazy", "late"])
def test_abort_without_snapshots_leaves_the_state_before_the_streak(sync: str) -> None:
    def cfg() -> GuardConfig:
        return GuardConfig(responses={"nonfinite": ("skip", "abort")}, budgets=Budgets(skip=2))

    m, opt, err = _abort_run(sync, cfg(), bad={5, 6, 7}, stop=12, drop=set())
    assert err is not None
    assert "before the streak began (position 5)" in str(err)
    assert "non-finite" not in str(err)
    m2, opt2, err2 = _abort_run(sync, cfg(), bad=set(), stop=5, drop=set())
    assert err2 is None
    assert all(torch.isfinite(t).all() for t in m.state_dict().values())
    assert_same(m.state_dict(), m2.state_dict(), "model")
    assert_same(opt.state_dict(), opt2.state_dict(), "optimizer")


@pytest.mark.parametrize("sync", ["step", "lazy", "late"])
def test_abort_with_snapshots_leaves_the_last_snapshot(sync: str) -> None:
    def cfg() -> GuardConfig:
        return GuardConfig(
            snapshot_every=3,
            responses={"nonfinite": ("rollback", "abort")},
            budgets=Budgets(rollback=1),
        )

    # NaN at 7: roll back to the snapshot of step 6 and replay 6, 8, 9 (a snapshot at step 9);
    # NaN at 10: no rollback left, abort, restored to the snapshot of step 9.
    m, opt, err = _abort_run(sync, cfg(), bad={7, 10}, stop=14, drop=set())
    assert err is not None
    assert "restored to the snapshot of step 9" in str(err), str(err)
    m2, opt2, err2 = _abort_run(sync, cfg(), bad=set(), stop=10, drop={7})
    assert err2 is None
    assert all(torch.isfinite(t).all() for t in m.state_dict().values())
    assert_same(m.state_dict(), m2.state_dict(), "model")
    assert_same(opt.state_dict(), opt2.state_dict(), "optimizer")


# --- sparse gradients -------------------------------------------------------------------------


def test_sparse_adam_with_a_sparse_embedding_can_be_guarded() -> None:
    """SparseAdam on a sparse Embedding: a NaN batch is skipped like any other, bit for bit."""
    gen = torch.Generator().manual_seed(1)
    data = [
        (torch.randint(0, 10, (8,), generator=gen), torch.randn(8, 2, generator=gen))
        for _ in range(6)
    ]

    def run(nan_at: int | None, drop: int | None) -> tuple[nn.Module, Any, list[str]]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Linear(4, 2))
        model[1].requires_grad_(False)
        opt = torch.optim.SparseAdam(list(model[0].parameters()), lr=0.01)
        guard = Guard(model, opt)
        actions = []
        for i, (idx, y) in enumerate(data):
            if i == drop:
                continue
            out = model(idx)
            loss = nn.functional.mse_loss(out * math.nan if i == nan_at else out, y)
            loss.backward()
            actions.append(guard.step(loss).action)
            opt.zero_grad()
        guard.flush()
        return model, opt, actions

    a, oa, actions = run(nan_at=3, drop=None)
    b, ob, _ = run(nan_at=None, drop=3)
    assert actions[3] == "skip"
    assert_same(a.state_dict(), b.state_dict(), "model")
    assert_same(oa.state_dict(), ob.state_dict(), "optimizer")


# --- resuming from a checkpoint taken anywhere --------------------------------------------------


@pytest.mark.parametrize("sync", ["step", "lazy", "late"])
@pytest.mark.parametrize("cut", [5, 6, 7, 9])
def test_resume_from_a_checkpoint_taken_inside_a_streak_equals_the_uninterrupted_run(
    sync: str, cut: int
) -> None:
    """NaN batches at 5-8 (three skips, then a rollback to the snapshot of position 4); the run
    is checkpointed (model, optimizer, scheduler, then guard) at position ``cut``: before the
    streak, inside it, or just after the rollback's batch (the sync-free mode has not acted on
    it yet). A run resumed from it ends where the uninterrupted run ends."""
    data = _data(12)

    def build() -> tuple[nn.Module, Any, Any, Guard]:
        m = _bn_model()
        opt = torch.optim.AdamW(m.parameters(), lr=0.01, fused=sync != "step")
        sched = S.OneCycleLR(opt, 0.01, total_steps=20)
        cfg = GuardConfig(
            snapshot_every=4,
            responses={"nonfinite": ("skip", "rollback", "abort")},
            budgets=Budgets(skip=3),
        )
        return m, opt, sched, _guard(m, opt, sched, sync, config=cfg)

    def train(m: nn.Module, opt: Any, guard: Guard, upto: int) -> None:
        while guard.position < upto:
            i = guard.position
            x, y = data[i]
            loss = nn.functional.mse_loss(m(_poisoned(x) if 5 <= i <= 8 else x), y)
            loss.backward()
            guard.step(loss)
            opt.zero_grad()

    def state(m: nn.Module, opt: Any, sched: Any) -> dict[str, Any]:
        return {"model": m.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}

    m, opt, sched, guard = build()
    train(m, opt, guard, len(data))
    guard.flush()
    assert guard.skip_list.windows == [(5, 8)]
    uninterrupted = state(m, opt, sched)

    m, opt, sched, guard = build()
    train(m, opt, guard, cut)
    ckpt = copy.deepcopy(state(m, opt, sched))  # saved in this order, each at once
    ckpt["guard"] = copy.deepcopy(guard.state_dict())
    m, opt, sched, guard = build()
    m.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    sched.load_state_dict(ckpt["sched"])
    guard.load_state_dict(ckpt["guard"])
    train(m, opt, guard, len(data))
    guard.flush()
    assert guard.skip_list.windows == [(5, 8)]
    assert_same(state(m, opt, sched), uninterrupted, "resumed vs uninterrupted")
