"""A guarded step is all or nothing, and what it restores is read from the objects as they are.

Each test is an ordinary training program a user writes: a checkpoint loaded after the guard
was built, a model cast after it, a backbone unfrozen mid-run, an out-of-memory error inside
the optimizer step, a caught abort under a GradScaler, optimizers from outside torch.optim on a
framework's path, a typo in the guard's configuration, an incident bundle of a BatchNorm model.
Each compares against the run that never saw the bad batch, bitwise, where there is one.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import gradguard
from gradguard import Budgets, Guard, GuardAbort, GuardConfig, Stage, load_bundle
from gradguard.decide.policies import FixedThreshold

Batch = tuple[Tensor, Tensor]


def _batches(n: int, seed: int = 1, rows: int = 16) -> list[Batch]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(rows, 4, generator=g), torch.randn(rows, 1, generator=g)) for _ in range(n)
    ]


def _poison(b: Batch) -> Batch:
    x = b[0].clone()
    x[0, 0] = math.nan
    return x, b[1]


def _bn_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))


def _loss(model: nn.Module, b: Batch) -> Tensor:
    return nn.functional.mse_loss(model(b[0]), b[1])


def _equal_states(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _plain_step(model: nn.Module, opt: torch.optim.Optimizer, b: Batch) -> None:
    _loss(model, b).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


# Policies and detectors that never act on the clean batches: the twin needs no clip.
QUIET = GuardConfig(policy=FixedThreshold(1e30), detectors=[])


# -------------------------------------------------------------------- read, don't remember


def test_a_rollback_after_loading_a_checkpoint_returns_to_the_loaded_weights() -> None:
    pretrained = _mlp(seed=1)
    with torch.no_grad():
        for p in pretrained.parameters():
            p.fill_(0.5)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cfg = GuardConfig(
        policy=FixedThreshold(1e30), detectors=[], snapshot_every=100, budgets=Budgets(skip=1)
    )
    guard = Guard(model, opt, config=cfg)
    model.load_state_dict(pretrained.state_dict())  # loaded after the guard was built
    data = _batches(4)
    for b in (_poison(data[0]), _poison(data[1])):  # a streak at the very start: roll back
        _loss(model, b).backward()
        guard.step(_loss(model, b).detach())
        opt.zero_grad(set_to_none=True)
    assert guard.counters.rollbacks == 1
    assert _equal_states(model.state_dict(), pretrained.state_dict())


def test_a_skip_right_after_loading_a_checkpoint_keeps_its_batchnorm_statistics() -> None:
    source = _bn_net()
    opt0 = torch.optim.SGD(source.parameters(), lr=0.1)
    for b in _batches(5, seed=3):
        _plain_step(source, opt0, b)
    checkpoint = copy.deepcopy(source.state_dict())
    model = _bn_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = Guard(model, opt, config=QUIET)
    model.load_state_dict(checkpoint)  # resume after building the guard
    bad = _poison(_batches(1, seed=9)[0])
    loss = _loss(model, bad)
    loss.backward()
    assert guard.step(loss).skipped
    assert _equal_states(model.state_dict(), checkpoint)


def _bn_double_run(see_bad: bool) -> nn.Module:
    model = _bn_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = Guard(model, opt, config=QUIET)
    model.double()  # cast after the guard
    data = [(x.double(), y.double()) for x, y in _batches(6)]
    for i, b in enumerate(data):
        if i == 4:
            if not see_bad:
                continue
            b = _poison(b)
        loss = _loss(model, b)
        loss.backward()
        guard.step(loss)
        opt.zero_grad(set_to_none=True)
    return model


def test_a_model_cast_to_double_after_the_guard_skips_without_rounding_its_buffers() -> None:
    assert _equal_states(_bn_double_run(True).state_dict(), _bn_double_run(False).state_dict())


def test_a_fused_optimizer_resumed_from_a_non_fused_checkpoint_takes_the_plain_route() -> None:
    old = nn.Linear(4, 2)
    old_opt = torch.optim.AdamW(old.parameters(), lr=1e-2)
    _plain_step(old, old_opt, (torch.randn(3, 4), torch.randn(3, 2)))
    model = nn.Linear(4, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    guard = Guard(model, opt)
    assert guard.lazy
    model.load_state_dict(old.state_dict())
    opt.load_state_dict(old_opt.state_dict())  # brings back fused=None
    assert not guard.lazy
    for _ in range(3):
        loss = _loss(model, (torch.randn(3, 4), torch.randn(3, 2)))
        loss.backward()
        assert guard.step(loss).action in ("step", "clip")
        opt.zero_grad(set_to_none=True)
    assert guard.stage is Stage.READY and int(opt.state[model.weight]["step"]) == 4


def test_a_guard_told_to_stay_sync_free_refuses_an_optimizer_that_no_longer_is() -> None:
    model = nn.Linear(4, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    guard = Guard(model, opt, config=GuardConfig(sync="lazy"))
    for group in opt.param_groups:
        group["fused"] = None
    loss = _loss(model, (torch.randn(3, 4), torch.randn(3, 2)))
    loss.backward()
    with pytest.raises(ValueError, match="not fused now"):
        guard.step(loss)
    assert guard.stage is Stage.READY and guard.step_count == 0 and opt.state == {}


def test_unfreezing_a_backbone_with_add_param_group_then_a_rollback() -> None:
    torch.manual_seed(0)
    backbone, head = nn.Linear(4, 8), nn.Linear(8, 1)
    model = nn.Sequential(backbone, nn.ReLU(), head)
    for p in backbone.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-2)
    cfg = GuardConfig(snapshot_every=4, budgets=Budgets(skip=1), detectors=[])
    guard = Guard(model, opt, config=cfg)
    data = _batches(12)
    at_unfreeze: dict[str, Any] = {}
    for i, b in enumerate(data):
        if i == 9:
            for p in backbone.parameters():
                p.requires_grad_(True)
            opt.add_param_group({"params": list(backbone.parameters()), "lr": 1e-3})
            at_unfreeze = {
                "model": copy.deepcopy(model.state_dict()),
                "opt": copy.deepcopy(opt.state_dict()),
            }
        if i in (10, 11):
            b = _poison(b)
        loss = _loss(model, b)
        loss.backward()
        guard.step(loss)
        opt.zero_grad(set_to_none=True)
    assert guard.counters.rollbacks == 1 and guard.stage is Stage.READY
    assert _equal_states(model.state_dict(), at_unfreeze["model"])
    assert len(opt.param_groups) == 2
    assert str(opt.state_dict()) == str(at_unfreeze["opt"])
    loss = _loss(model, data[0])  # and the run goes on
    loss.backward()
    assert not guard.step(loss).skipped


# ---------------------------------------------------------------------- all or nothing


class _FlakyAdamW(torch.optim.AdamW):
    """An AdamW whose first ``fail`` steps raise, as a CUDA out-of-memory error does."""

    def __init__(self, params: Any, fail: int = 1, **kw: Any) -> None:
        super().__init__(params, **kw)
        self.fail = fail

    def step(self, closure: Any = None) -> Any:
        if self.fail > 0:
            self.fail -= 1
            raise torch.OutOfMemoryError("simulated: CUDA out of memory")
        return super().step(closure)


def _oom_run(fail: int, fused: bool) -> tuple[nn.Module, Guard]:
    model = _bn_net()
    opt = _FlakyAdamW(model.parameters(), fail=fail, lr=1e-2, fused=fused)
    guard = Guard(model, opt)
    data = _batches(6)
    i = 0
    while i < len(data):
        loss = _loss(model, data[i])
        loss.backward()
        try:
            guard.step(loss)
        except torch.OutOfMemoryError:
            assert guard.stage is Stage.READY
            opt.zero_grad(set_to_none=True)
            continue  # the user retries the same batch
        opt.zero_grad(set_to_none=True)
        i += 1
    return model, guard


@pytest.mark.parametrize("fused", [False, True])
def test_an_out_of_memory_error_in_the_optimizer_step_is_forgotten_whole(fused: bool) -> None:
    flaky, g1 = _oom_run(fail=2, fused=fused)
    clean, g2 = _oom_run(fail=0, fused=fused)
    assert _equal_states(flaky.state_dict(), clean.state_dict())  # buffers too: BatchNorm
    assert str(g1.policy.state_dict()) == str(g2.policy.state_dict())
    assert [str(d.state_dict()) for d in g1.detectors] == [
        str(d.state_dict()) for d in g2.detectors
    ]
    assert g1.step_count == g2.step_count == 6
    assert [r["loss"] for r in g1.records if r["kind"] == "step"] == [
        r["loss"] for r in g2.records if r["kind"] == "step"
    ]


def test_a_scheduler_that_raises_after_the_optimizer_stepped_leaves_the_step_counted() -> None:
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    class Broken(torch.optim.lr_scheduler.StepLR):
        broken = False

        def step(self, epoch: Any = None) -> None:
            if self.broken:
                raise RuntimeError("scheduler bug")
            super().step(epoch)

    sched = Broken(opt, step_size=1)
    sched.broken = True
    guard = Guard(model, opt, scheduler=sched)
    before = copy.deepcopy(model.state_dict())
    loss = _loss(model, _batches(1)[0])
    loss.backward()
    with pytest.raises(RuntimeError, match="scheduler bug") as info:
        guard.step(loss)
    assert "the optimizer step was applied" in "".join(info.value.__notes__)
    assert guard.stage is Stage.READY and guard.step_count == 1
    assert not _equal_states(model.state_dict(), before)


def test_a_framework_step_that_raised_is_abandoned_by_the_next_one() -> None:
    from gradguard import ZScoreClip

    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = Guard(model, opt, config=GuardConfig(policy=ZScoreClip(), detectors=[]))
    loss = _loss(model, _batches(1)[0])
    loss.backward()
    guard.before_optimizer_step(loss)  # the framework's optimizer.step() then raises
    opt.zero_grad(set_to_none=True)
    loss = _loss(model, _batches(1)[0])
    loss.backward()
    guard.before_optimizer_step(loss)
    opt.step()
    guard.after_optimizer_step()
    assert guard.step_count == 1 and guard.stage is Stage.READY
    assert int(guard.policy.state_dict()["state"]["count"]) == 1  # learned once, not twice


def test_catching_a_guard_abort_under_a_grad_scaler_and_going_on() -> None:
    model = nn.Linear(4, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=16.0)
    guard = Guard(model, opt, scaler=scaler, config=GuardConfig(budgets=Budgets(skip=1)))
    aborted = applied = 0
    for i in range(6):
        loss = model(torch.randn(8, 4)).pow(2).mean()
        if i in (1, 2):
            loss = loss * float("nan")
        scaler.scale(loss).backward()
        try:
            applied += not guard.step(loss).skipped
        except GuardAbort:
            aborted += 1
            for group in opt.param_groups:
                group["lr"] *= 0.1  # the user lowers the LR and goes on
        opt.zero_grad(set_to_none=True)
    assert aborted == 1 and applied == 4 and guard.stage is Stage.READY


def test_a_scheduler_with_only_step_is_refused_where_it_must_be_saved() -> None:
    class Warmup:
        def __init__(self, opt: torch.optim.Optimizer) -> None:
            self.opt, self.t = opt, 0

        def step(self) -> None:
            self.t += 1
            for g in self.opt.param_groups:
                g["lr"] = 1e-2 * min(1.0, self.t / 10)

    model = nn.Linear(4, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    sched = Warmup(opt)
    with pytest.raises(TypeError, match="no state_dict"):
        Guard(model, opt, scheduler=sched, config=GuardConfig(snapshot_every=5))
    guard = Guard(model, opt, scheduler=sched)  # without snapshots it is decided on the host
    assert not guard.lazy
    for _ in range(3):
        loss = _loss(model, (torch.randn(8, 4), torch.randn(8, 2)))
        loss.backward()
        guard.step(loss)
        opt.zero_grad(set_to_none=True)
    assert sched.t == 3 and guard.step_count == 3


@pytest.mark.parametrize(
    "loss", [torch.tensor(1), torch.tensor(True), torch.tensor(1 + 0j), True, 1j]
)
def test_an_integer_bool_or_complex_loss_is_refused(loss: Any) -> None:
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = Guard(model, opt)
    _loss(model, _batches(1)[0]).backward()
    with pytest.raises(TypeError, match="loss"):
        guard.step(loss)
    assert guard.stage is Stage.READY and guard.step_count == 0


# ------------------------------------------------------------------- a skip is a skip


def _pytorch_optimizers() -> list[tuple[str, Callable[[Any], torch.optim.Optimizer]]]:
    po = pytest.importorskip("pytorch_optimizer")
    return [
        ("Lion", lambda p: po.Lion(p, lr=1e-3)),
        ("Adan", lambda p: po.Adan(p, lr=1e-3)),
        ("Prodigy", lambda p: po.Prodigy(p, lr=1.0)),
        ("ScheduleFreeAdamW", lambda p: po.ScheduleFreeAdamW(p, lr=1e-2, warmup_steps=3)),
    ]


def _framework_run(make: Callable[[Any], torch.optim.Optimizer], see_bad: bool, plain: bool):
    model = _mlp()
    opt = make(model.parameters())
    guard = Guard(model, opt, config=QUIET)
    for i, b in enumerate(_batches(6)):
        if i == 3:
            if not see_bad:
                continue
            b = _poison(b)
        loss = _loss(model, b)
        loss.backward()
        if plain:
            guard.step(loss)
        else:
            guard.before_optimizer_step(loss)
            opt.step()  # what the framework does
            guard.after_optimizer_step()
        opt.zero_grad(set_to_none=True)
    return model, opt


@pytest.mark.parametrize("plain", [False, True], ids=["framework", "plain"])
@pytest.mark.parametrize("index", range(4), ids=["Lion", "Adan", "Prodigy", "ScheduleFreeAdamW"])
def test_a_skip_is_a_skip_for_optimizers_outside_torch(index: int, plain: bool) -> None:
    _, make = _pytorch_optimizers()[index]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the library's own deprecation notes
        (m1, o1), (m2, o2) = _framework_run(make, True, plain), _framework_run(make, False, plain)
    assert _equal_states(m1.state_dict(), m2.state_dict())
    assert str(o1.state_dict()) == str(o2.state_dict())


# ----------------------------------------------------------------- no silent misconfiguration


def test_a_misspelled_responses_key_is_refused_with_a_suggestion() -> None:
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="did you mean 'nonfinite'"):
        Guard(model, opt, config=GuardConfig(responses={"non_finite": ("abort",)}))
    with pytest.raises(ValueError, match="did you mean 'spike:loss'"):
        Guard(model, opt, config=GuardConfig(responses={"spike:los": ("skip",)}))
    guard = Guard(model, opt, config=GuardConfig(responses={"nonfinite": ("abort",)}))
    loss = model(torch.randn(4, 3)).pow(2).mean() * float("nan")
    loss.backward()
    with pytest.raises(GuardAbort):
        guard.step(loss)


@pytest.mark.parametrize("budget", [1, 3, 5])
def test_back_offs_are_bounded_by_the_back_off_budget(budget: int) -> None:
    w = nn.Parameter(torch.randn(4))
    model = nn.Module()
    model.w = w
    opt = torch.optim.SGD([w], lr=0.1)
    guard = Guard(model, opt, config=GuardConfig(budgets=Budgets(backoff=budget)))
    backoffs = 0
    for step in range(400):
        loss = (w * 0).sum() + 1e-3 * (w**2).sum() + 1.03**step  # a loss that keeps rising
        loss.backward()
        backoffs += guard.step(loss).action == "backoff"
        opt.zero_grad()
    assert backoffs == guard.counters.backoffs == budget
    assert guard.lr_scale.scale == 0.5**budget


# ------------------------------------------------------------------- incidents and replay


def test_an_incident_bundle_holds_batchnorm_statistics_from_before_the_bad_forward(
    tmp_path: Path,
) -> None:
    def make() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 1)
        )

    for fused in (False, True):
        out = tmp_path / f"fused-{fused}"
        model = make()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=fused)
        guard = Guard(model, opt, config=GuardConfig(incident_dir=str(out)))
        for step in range(21):
            g = torch.Generator().manual_seed(step)
            x, y = torch.randn(16, 4, generator=g), torch.randn(16, 1, generator=g) * 0.1
            if step == 20:
                x[11, 0] = float("nan")
            before = copy.deepcopy(model.state_dict())
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            report = guard.step(loss, batch=(x, y))
            opt.zero_grad()
        assert report.skipped
        bundle = load_bundle(out / "incident-000000020.pt")
        for key in ("1.running_mean", "1.running_var", "1.num_batches_tracked"):
            assert torch.equal(bundle.snapshot["model"][key], before[key]), key
        result = gradguard.replay(bundle, make)
        assert result.kind == "data" and result.culprits == [11], result.summary


class _DictNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 1)

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        return self.b(torch.relu(self.a(batch["x"])))


def _dict_loss(out: Tensor, batch: dict[str, Tensor]) -> Tensor:
    return nn.functional.mse_loss(out, batch["y"])


def test_replay_of_a_model_whose_forward_takes_the_batch_dict(tmp_path: Path) -> None:
    model = _DictNet()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    guard = Guard(model, opt, config=GuardConfig(incident_dir=str(tmp_path)))
    for step in range(21):
        g = torch.Generator().manual_seed(step)
        batch = {"x": torch.randn(16, 4, generator=g), "y": torch.randn(16, 1, generator=g) * 0.1}
        if step == 20:
            batch["x"][11] *= 1e4
        loss = _dict_loss(model(batch), batch)
        loss.backward()
        report = guard.step(loss, batch=batch)
        opt.zero_grad()
    assert report.skipped
    path = tmp_path / "incident-000000020.pt"
    given = gradguard.replay(path, _DictNet, _dict_loss, call=lambda m, b: m(b))
    found = gradguard.replay(path, _DictNet, _dict_loss)  # tried as model(batch) on its own
    assert given.kind == found.kind == "data" and given.culprits == found.culprits == [11]


def test_replay_of_a_bundle_from_a_compiled_model_with_a_plain_factory(tmp_path: Path) -> None:
    def make() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = torch.compile(make(), backend="eager")
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        guard = Guard(model, opt, config=GuardConfig(incident_dir=str(tmp_path)))
        for step in range(21):
            g = torch.Generator().manual_seed(step)
            x, y = torch.randn(16, 4, generator=g), torch.randn(16, 1, generator=g) * 0.1
            if step == 20:
                x[11] *= 1e4
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            guard.step(loss, batch=(x, y))
            opt.zero_grad()
    path = tmp_path / "incident-000000020.pt"
    assert list(load_bundle(path).snapshot["model"])[:2] == ["0.weight", "0.bias"]
    result = gradguard.replay(path, make)
    assert result.kind == "data" and result.culprits == [11]


def test_a_rollback_record_names_its_incident_bundle(tmp_path: Path) -> None:
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cfg = GuardConfig(
        detectors=[], snapshot_every=2, budgets=Budgets(skip=1), incident_dir=str(tmp_path)
    )
    guard = Guard(model, opt, config=cfg)
    data = _batches(8)
    for i, b in enumerate(data):
        if i in (4, 5):
            b = _poison(b)
        loss = _loss(model, b)
        loss.backward()
        guard.step(loss, batch=b)
        opt.zero_grad(set_to_none=True)
    actions = {r["action"]: r for r in guard.records if r["kind"] == "action"}
    assert "rollback" in actions and "bundle" in actions["rollback"]
    assert Path(actions["rollback"]["bundle"]).exists()
    assert "restored_step" in actions["rollback"]


# --------------------------------------------------------------------------- resuming


def _resume_run(guard_first: bool) -> nn.Module:
    model = _bn_net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    cfg = GuardConfig(snapshot_every=3, budgets=Budgets(skip=1))
    data = _batches(12)
    # The first half of the run, then its checkpoint.
    guard = Guard(model, opt, scheduler=sched, config=cfg)
    for b in data[:6]:
        loss = _loss(model, b)
        loss.backward()
        guard.step(loss)
        opt.zero_grad(set_to_none=True)
    ckpt = copy.deepcopy(
        {
            "m": model.state_dict(),
            "o": opt.state_dict(),
            "s": sched.state_dict(),
            "g": guard.state_dict(),
        }
    )
    # A new process: build, then load in the order the script says.
    model = _bn_net(seed=5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    if guard_first:  # the guard built and loaded first, then the model and the rest
        guard = Guard(model, opt, scheduler=sched, config=cfg)
        guard.load_state_dict(ckpt["g"])
    model.load_state_dict(ckpt["m"])
    opt.load_state_dict(ckpt["o"])
    sched.load_state_dict(ckpt["s"])
    if not guard_first:
        guard = Guard(model, opt, scheduler=sched, config=cfg)
        guard.load_state_dict(ckpt["g"])
    for i, b in enumerate(data[6:]):
        if i in (1, 2):  # a streak that rolls back to the resumed state
            b = _poison(b)
        loss = _loss(model, b)
        loss.backward()
        guard.step(loss)
        opt.zero_grad(set_to_none=True)
    assert guard.counters.rollbacks == 1
    return model


def test_a_resumed_run_is_the_same_whether_the_guard_was_built_before_or_after_the_load() -> None:
    a, b = _resume_run(guard_first=True), _resume_run(guard_first=False)
    assert _equal_states(a.state_dict(), b.state_dict())
