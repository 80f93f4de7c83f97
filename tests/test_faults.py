"""Fault injection: NaN/inf gradients and losses, poisoned batches and exceptions in the loss.

The oracle is a clean run that never saw the bad batches: after a guarded run with faults at
random steps, parameters, optimizer state and the policy's statistics must equal the clean
run's bitwise (CPU), every skipped step must leave the parameters untouched, and the guard's
state must still round-trip. Faults are drawn by hypothesis (which steps, which kind).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from torch import nn

from gradguard.decide.detect import SpikeDetector
from gradguard.decide.policies import ZScoreClip
from gradguard.guard.guard import Guard, GuardConfig
from gradguard.guard.response import Budgets, GuardAbort
from tests._dist_scale import tally

STEPS = 24
FAULTS = (
    "nan_grad",
    "inf_grad",
    "nan_loss",
    "inf_loss",
    "raise_forward",
    "raise_backward",
    "spike",
)
SKIPPED = {"nan_grad", "inf_grad", "nan_loss", "inf_loss", "spike"}  # the guard must skip these
OPTIMIZERS = ("adamw", "adamw_fused", "sgd_momentum")


class UserError(RuntimeError):
    """What a user's loss function raises (a bad sample, an OOM, a data bug)."""


def make(opt_kind: str) -> tuple[nn.Sequential, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 1))
    if opt_kind == "adamw":
        opt: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), 1e-2, weight_decay=0.1)
    elif opt_kind == "adamw_fused":
        opt = torch.optim.AdamW(model.parameters(), 1e-2, weight_decay=0.1, fused=True)
    else:
        opt = torch.optim.SGD(model.parameters(), 1e-2, momentum=0.9, weight_decay=0.1)
    return model, opt


def data(pos: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(pos)
    x = torch.randn(8, 5, generator=g)
    return x, x.sum(1, keepdim=True).sin()


def config(rollback: bool) -> GuardConfig:
    # A spike detector on the gradient norm that is awake after 6 steps; z=6 as in OLMo-core.
    detectors = [SpikeDetector("grad_norm", window=32, z=6.0, warmup=6)]
    if rollback:
        return GuardConfig(
            policy=ZScoreClip(warmup=4),
            detectors=detectors,
            responses={"nonfinite": ("rollback",), "spike": ("rollback",)},
            snapshot_every=4,
            keep_snapshots=3,
            budgets=Budgets(skip=3, rollback=100),  # the fuzz must not run out of rollbacks
        )
    return GuardConfig(
        policy=ZScoreClip(warmup=4),
        detectors=detectors,
        responses={"nonfinite": ("skip",), "spike": ("skip",)},
    )


def _drop_batch(guard: Guard) -> None:
    """Tell the guard a batch was dropped without a step (there is no public call for it yet:
    reported), keeping its data position in step with the loop's and honouring the skip list."""
    guard.position = guard.skip_list.next_allowed(guard.position + 1)


def _raise(grad: torch.Tensor) -> None:
    raise UserError("bad backward")


def _poison_grads(model: nn.Module, value: float) -> None:
    g = next(iter(model.parameters())).grad
    assert g is not None
    g.view(-1)[3] = value


def train(
    opt_kind: str,
    faults: dict[int, str],
    rollback: bool,
    never_seen: set[int] = frozenset(),  # type: ignore[assignment]
) -> dict[str, Any]:
    """Run ``STEPS`` data positions through a guarded loop, injecting ``faults[position]``.

    ``never_seen`` positions are left out of the loop entirely: the clean reference.
    """
    model, opt = make(opt_kind)
    guard = Guard(model, opt, config=config(rollback))
    seen_actions: dict[int, list[str]] = {}
    unchanged_on_skip = True
    visits = 0
    while guard.position < STEPS and visits < 4 * STEPS:
        visits += 1
        pos = guard.position
        if pos in never_seen:
            _drop_batch(guard)  # the reference loop's sampler simply never yields it
            continue
        x, y = data(pos)
        fault = faults.get(pos, "")
        if fault:
            tally("fault", fault)
        try:
            if fault == "raise_forward":
                raise UserError("bad sample")
            if fault == "spike":
                y = y * 1e4  # a poisoned batch: huge targets, finite but huge gradients
            hidden = model[1](model[0](x))
            if fault == "raise_backward":
                # Raises halfway through backward: the last layer's gradient is already written.
                hidden.register_hook(_raise)
            loss = nn.functional.mse_loss(model[2](hidden), y)
            loss.backward()
        except UserError:
            opt.zero_grad(set_to_none=True)  # what a user's except-block does
            _drop_batch(guard)
            seen_actions.setdefault(pos, []).append("user_error")
            continue
        if fault in ("nan_grad", "inf_grad"):
            _poison_grads(model, math.nan if fault == "nan_grad" else math.inf)
        elif fault in ("nan_loss", "inf_loss"):
            loss = loss.detach() + (math.nan if fault == "nan_loss" else math.inf)
        before = [p.detach().clone() for p in model.parameters()]
        report = guard.step(loss)
        opt.zero_grad(set_to_none=True)
        action = report.action
        seen_actions.setdefault(pos, []).append(action)
        if action == "skip":
            unchanged_on_skip &= all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    guard.flush()
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "opt": opt.state_dict(),
        "policy": guard.policy.state_dict(),
        "detectors": [d.state_dict() for d in guard.detectors],
        "actions": seen_actions,
        "unchanged_on_skip": unchanged_on_skip,
        "guard": guard,
        "rollback": rollback,
        "opt_obj": opt,
        "model": model,
    }


def assert_same_tree(a: Any, b: Any, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype, where
        assert torch.equal(a.nan_to_num(1234.5), b.nan_to_num(1234.5)), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same_tree(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tree(x, y, f"{where}[{i}]")
    else:
        assert a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b)), where


FAULT_PLANS = st.dictionaries(
    st.integers(min_value=8, max_value=STEPS - 1), st.sampled_from(FAULTS), min_size=1, max_size=4
)
# No shrinking: a failing plan is already small, and shrinking re-runs whole trainings.
FUZZ = settings(
    max_examples=8,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
)


@pytest.mark.parametrize("opt_kind", OPTIMIZERS)
@FUZZ
@given(faults=FAULT_PLANS)
def test_skipped_faults_leave_the_run_equal_to_one_that_never_saw_them(
    opt_kind: str, faults: dict[int, str]
) -> None:
    run = train(opt_kind, faults, rollback=False)
    clean = train(opt_kind, {}, rollback=False, never_seen=set(faults))
    for pos, fault in faults.items():
        first = run["actions"][pos][0]
        if fault in SKIPPED:
            assert first == "skip", f"{fault} at {pos}: {run['actions'][pos]}"
        else:
            assert first == "user_error"
    assert run["unchanged_on_skip"]
    assert_same_tree(run["params"], clean["params"], "params")
    assert_same_tree(run["opt"], clean["opt"], "optimizer")
    assert_same_tree(run["policy"], clean["policy"], "policy")
    assert_same_tree(run["detectors"], clean["detectors"], "detectors")
    assert all(bool(p.isfinite().all()) for p in run["params"])
    _state_round_trips(run)


@pytest.mark.parametrize("opt_kind", ["adamw", "adamw_fused"])
@FUZZ
@given(faults=FAULT_PLANS)
@example(faults={8: "nan_grad", 10: "nan_grad"})  # two incidents, one snapshot interval
def test_rolled_back_faults_replay_to_the_clean_run(opt_kind: str, faults: dict[int, str]) -> None:
    """Rollback to the last snapshot, replay, skip the bad batch: bitwise the clean run."""
    run = train(opt_kind, faults, rollback=True)
    clean = train(opt_kind, {}, rollback=True, never_seen=set(faults))
    guard = run["guard"]
    assert guard.counters.rollbacks == sum(f in SKIPPED for f in faults.values())
    for pos, fault in faults.items():
        if fault in SKIPPED:
            assert guard.should_skip(pos)
            assert "rollback" in run["actions"][pos]
    assert_same_tree(run["params"], clean["params"], "params")
    assert_same_tree(run["opt"], clean["opt"], "optimizer")
    assert all(bool(p.isfinite().all()) for p in run["params"])
    _state_round_trips(run)


def _state_round_trips(run: dict[str, Any]) -> None:
    guard: Guard = run["guard"]
    state = guard.state_dict()
    model, opt = make("adamw")
    other = Guard(model, opt, config=config(run["rollback"]))  # fresh policy and detectors
    other.load_state_dict(state)
    assert_same_tree(other.state_dict(), guard.state_dict(), "guard state")


def test_an_exception_inside_guard_step_leaves_the_run_untouched() -> None:
    """A detector that raises mid-step (a bug, an interrupt): nothing applied, state kept."""

    class Exploding(SpikeDetector):
        armed = False

        def check(self, s: Any) -> Any:
            if self.armed:
                raise UserError("detector crashed")
            return super().check(s)

    boom = Exploding("loss", window=8, warmup=2)
    model, opt = make("adamw")
    guard = Guard(model, opt, config=GuardConfig(detectors=[boom], policy=ZScoreClip(warmup=2)))
    for pos in range(4):
        x, y = data(pos)
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        guard.step(loss)
        opt.zero_grad()
    params = [p.detach().clone() for p in model.parameters()]
    opt_state = opt.state_dict()
    policy = guard.policy.state_dict()
    step = guard.step_count
    boom.armed = True
    x, y = data(4)
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    with pytest.raises(UserError):
        guard.step(loss)
    assert guard.step_count == step
    assert_same_tree([p.detach() for p in model.parameters()], params, "params")
    assert_same_tree(opt.state_dict(), opt_state, "optimizer")
    assert_same_tree(guard.policy.state_dict(), policy, "policy")
    # And the run goes on normally once the bug is gone.
    boom.armed = False
    opt.zero_grad()
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    assert guard.step(loss).action in ("step", "clip")


def _plan(fault: str) -> Callable[[], dict[int, str]]:
    return lambda: {12: fault}


ONE_FAULT: list[tuple[str, Callable[[], dict[int, str]]]] = [(f, _plan(f)) for f in FAULTS]


@pytest.mark.parametrize(("fault", "plan"), ONE_FAULT, ids=[f for f, _ in ONE_FAULT])
def test_each_fault_kind_once(fault: str, plan: Callable[[], dict[int, str]]) -> None:
    """Every fault kind on its own, so a failure names the kind (the fuzz mixes them)."""
    run = train("adamw", plan(), rollback=False)
    clean = train("adamw", {}, rollback=False, never_seen={12})
    assert run["actions"][12][0] == ("skip" if fault in SKIPPED else "user_error")
    assert_same_tree(run["params"], clean["params"], "params")
    assert_same_tree(run["opt"], clean["opt"], "optimizer")


def test_two_rollbacks_to_one_snapshot_restore_it_bitwise() -> None:
    """Two incidents within one snapshot interval: the second rollback must find the snapshot
    as it was taken (an optimizer that aliases the stored tensors would have updated it)."""
    model, opt = make("adamw")
    guard = Guard(model, opt, config=config(rollback=True))
    taken: list[torch.Tensor] | None = None
    restored: list[list[torch.Tensor]] = []
    pos_bad = {9, 10}
    while guard.position < 12:
        pos = guard.position
        x, y = data(pos)
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        if pos in pos_bad:
            _poison_grads(model, math.nan)
        report = guard.step(loss)
        opt.zero_grad(set_to_none=True)
        if guard.step_count == 8 and taken is None:
            taken = [t.clone() for t in opt.state_dict()["state"][0].values()]
        if report.action == "rollback":
            restored.append([t.clone() for t in opt.state_dict()["state"][0].values()])
    assert taken is not None and len(restored) == 2
    for i, state in enumerate(restored):
        for a, b in zip(state, taken):
            assert torch.equal(a, b), f"rollback {i + 1} restored a changed snapshot"


def test_abort_raises_guard_abort_and_applies_nothing() -> None:
    model, opt = make("adamw")
    cfg = GuardConfig(
        detectors=[],
        responses={"nonfinite": ("skip", "abort")},
        budgets=Budgets(skip=1),
    )
    guard = Guard(model, opt, config=cfg)
    actions = []
    for pos in range(4):
        x, y = data(pos)
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        if pos >= 2:
            _poison_grads(model, math.nan)
        before = [p.detach().clone() for p in model.parameters()]
        opt_before = opt.state_dict()
        try:
            actions.append(guard.step(loss).action)
        except GuardAbort as e:
            actions.append("abort")
            assert e.incident["position"] == pos and e.incident["signal"] == "nonfinite"
            assert_same_tree([p.detach() for p in model.parameters()], before, "params")
            assert_same_tree(opt.state_dict(), opt_before, "optimizer")
            break
        opt.zero_grad(set_to_none=True)
    assert actions == ["step", "step", "skip", "abort"] or actions[-2:] == ["skip", "abort"]
    incidents = [r for r in guard.records if r["kind"] == "incident"]
    assert len(incidents) == 1 and incidents[0]["step"] == 3
