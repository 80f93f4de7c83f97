"""The conformance matrix: every torch.optim optimizer (plain, foreach, fused) x LR schedulers
(momentum- and beta-cycling ones included) x sync mode x precision x response, each guarded run
compared bit for bit with a run that never saw the bad batch.

A case trains a Linear-BatchNorm1d-ReLU-Linear model for 14 data positions, batch 8, with a
NaN batch. The response is a skip (``nonfinite: skip``), a rollback to a snapshot
(``nonfinite: rollback``, ``snapshot_every=k``), or ``skip-rollback``: two NaN batches in a row
under ``("skip", "rollback")`` with a skip budget of one and ``skip_after=1``, so the rollback
leaves out a window of three positions, one of them a good batch. Both runs are driven by
``guard.position`` as docs/guard.md shows; the reference drops, with ``guard.drop_batch()``,
exactly the positions the guarded run left out (the NaN batch for a skip,
``guard.skip_list.windows`` for a rollback). Equal at the end: parameters, buffers, optimizer
state, scheduler state, GradScaler state, and the hyperparameters (learning rates, momentum,
betas, ...) of every applied optimizer step.

The sync modes: ``step`` (the host decides every step), ``lazy`` (fused optimizers: the device
skips with ``found_inf``; on the CPU the flags are read at the end of the same step) and
``late`` (lazy, with the flags read at the next step as on CUDA, so the scheduler's guess must
be undone: see ``tests/_matrix_util.make_deferred``).

The full product has about 2,500 cases; :data:`CASES` takes each optimizer variant with a skip
and with one of the two rollbacks (94 cases, and a few named ones) and deals the schedulers and
precisions over them from a seeded shuffle, so every axis value appears and the whole file runs
in well under a minute on one core.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

from gradguard.guard.guard import Guard, GuardConfig
from gradguard.guard.response import Budgets
from tests._matrix_util import UsedHyperparameters, assert_same, make_deferred

N_POSITIONS = 14
BATCH = 8
optim = torch.optim
ALL3 = ("plain", "foreach", "fused")
NO_FUSED = ("plain", "foreach")
S = torch.optim.lr_scheduler


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- the axes ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    """An optimizer with its settings, and the implementations torch offers for it."""

    make: Callable[..., torch.optim.Optimizer]
    kwargs: dict[str, Any]
    impls: tuple[str, ...]  # "plain" (for-loop), "foreach", "fused"
    cycles_momentum: bool  # has a momentum or betas a scheduler can cycle
    matrix_only: bool = False  # Muon: 2-D parameters only


FAMILIES: dict[str, Family] = {
    "sgd": Family(optim.SGD, {"lr": 0.05}, ALL3, True),
    "sgd-momentum": Family(
        optim.SGD,
        {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.01},
        ALL3,
        True,
    ),
    "sgd-nesterov": Family(optim.SGD, {"lr": 0.05, "momentum": 0.9, "nesterov": True}, ALL3, True),
    "adam": Family(optim.Adam, {"lr": 0.01, "weight_decay": 0.01}, ALL3, True),
    "adamw": Family(optim.AdamW, {"lr": 0.01, "weight_decay": 0.1}, ALL3, True),
    # A tensor LR: the fused kernel reads the tensor, so a restore must copy into it.
    "adamw-tensor-lr": Family(
        optim.AdamW, {"lr": torch.tensor(0.01), "weight_decay": 0.1}, ("fused",), True
    ),
    "adamax": Family(optim.Adamax, {"lr": 0.01}, NO_FUSED, True),
    "nadam": Family(optim.NAdam, {"lr": 0.01}, NO_FUSED, True),
    "radam": Family(optim.RAdam, {"lr": 0.01}, NO_FUSED, True),
    "adagrad": Family(optim.Adagrad, {"lr": 0.05}, ALL3, False),
    "adadelta": Family(optim.Adadelta, {"lr": 1.0}, NO_FUSED, False),
    "rmsprop": Family(optim.RMSprop, {"lr": 0.01, "momentum": 0.5}, NO_FUSED, True),
    "rprop": Family(optim.Rprop, {"lr": 0.01}, NO_FUSED, False),
    "asgd": Family(optim.ASGD, {"lr": 0.05, "t0": 3}, NO_FUSED, False),
}
if hasattr(optim, "Adafactor"):
    FAMILIES["adafactor"] = Family(optim.Adafactor, {"lr": 0.01}, NO_FUSED, False)
if hasattr(optim, "Muon"):
    FAMILIES["muon"] = Family(optim.Muon, {"lr": 0.02}, ("plain",), True, matrix_only=True)
# SparseAdam takes sparse gradients only: it cannot train this model (see test_repros).

SCHEDULERS = ("none", "steplr", "onecycle", "cyclic", "sequential", "cosine-restarts")
PRECISIONS = ("fp32", "bf16", "fp16")
RESPONSES = ("skip", "rollback", "skip-rollback")


def _scheduler(name: str, opt: torch.optim.Optimizer, family: Family) -> Any:
    lr = float(family.kwargs["lr"])
    if name == "none":
        return None
    if name == "steplr":
        return S.StepLR(opt, step_size=3, gamma=0.5)
    if name == "onecycle":
        # Cycles momentum (SGD, RMSprop, Muon) or betas[0] (the Adam family) against the LR.
        return S.OneCycleLR(
            opt, max_lr=lr, total_steps=20, pct_start=0.3, cycle_momentum=family.cycles_momentum
        )
    if name == "cyclic":
        return S.CyclicLR(
            opt, base_lr=lr / 10, max_lr=lr, step_size_up=3, cycle_momentum=family.cycles_momentum
        )
    if name == "sequential":
        return S.SequentialLR(
            opt,
            [S.LinearLR(opt, start_factor=0.2, total_iters=3), S.ExponentialLR(opt, gamma=0.8)],
            milestones=[3],
        )
    if name == "cosine-restarts":
        return S.CosineAnnealingWarmRestarts(opt, T_0=3, T_mult=2, eta_min=lr / 20)
    raise ValueError(name)


@dataclass(frozen=True)
class Case:
    family: str
    impl: str
    sync: str  # "step", "lazy", "late"
    scheduler: str
    precision: str
    response: str
    bad: int  # the NaN batch's data position
    snapshot_every: int  # rollback only

    @property
    def id(self) -> str:
        impl = "" if self.impl == "plain" else f"-{self.impl}"
        sync = "" if self.sync == "step" else f"-{self.sync}"
        return f"{self.family}{impl}{sync}-{self.scheduler}-{self.precision}-{self.response}"


def _variants() -> list[tuple[str, str, str]]:
    out = []
    for name, fam in FAMILIES.items():
        for impl in fam.impls:
            syncs = ("step", "lazy", "late") if impl == "fused" else ("step",)
            out += [(name, impl, sync) for sync in syncs]
    return out


def _cases() -> list[Case]:
    """Each optimizer variant with both responses; schedulers x precisions dealt from a seeded
    shuffle (each of the 18 pairs appears about five times); a few named cases on top."""
    rng = random.Random(0)
    pairs: list[tuple[str, str]] = []
    combos = list(itertools.product(SCHEDULERS, PRECISIONS))
    keys = [(v, r) for v in _variants() for r in ("skip", rng.choice(RESPONSES[1:]))]
    while len(pairs) < len(keys):
        block = combos[:]
        rng.shuffle(block)
        pairs += block

    def case(fam: str, impl: str, sync: str, sched: str, prec: str, resp: str) -> Case:
        k = rng.choice((3, 4, 5))
        bad = rng.randint(2, 10) if resp == "skip" else rng.randint(k + 1, N_POSITIONS - 5)
        return Case(fam, impl, sync, sched, prec, resp, bad, k)

    cases = [case(*v, s, p, r) for (v, r), (s, p) in zip(keys, pairs)]
    # The combinations the lazy path is most likely to get wrong, always present.
    cases += [
        case("adamw", "fused", "lazy", "onecycle", "fp16", "rollback"),
        case("adamw", "fused", "late", "onecycle", "fp16", "rollback"),
        case("adam", "fused", "late", "onecycle", "fp32", "skip"),
        case("sgd-momentum", "fused", "late", "cyclic", "fp16", "skip"),
        case("adamw", "fused", "late", "sequential", "bf16", "skip"),
        case("adam", "fused", "late", "cyclic", "fp16", "skip-rollback"),
    ]
    seen: set[str] = set()
    unique = []
    for c in cases:
        if c.id not in seen:
            seen.add(c.id)
            unique.append(c)
    return unique


CASES = _cases()


def test_matrix_covers_every_axis() -> None:
    assert {c.family for c in CASES} == set(FAMILIES)
    assert {(c.family, c.impl) for c in CASES} == {
        (name, impl) for name, fam in FAMILIES.items() for impl in fam.impls
    }
    assert {c.scheduler for c in CASES} == set(SCHEDULERS)
    assert {c.precision for c in CASES} == set(PRECISIONS)
    assert {c.response for c in CASES} == set(RESPONSES)
    assert {c.sync for c in CASES} == {"step", "lazy", "late"}
    assert {(c.scheduler, c.precision) for c in CASES} == set(
        itertools.product(SCHEDULERS, PRECISIONS)
    )
    lazy = [c for c in CASES if c.sync != "step"]
    assert any(c.scheduler == "onecycle" for c in lazy)
    assert any(c.precision == "fp16" for c in lazy)
    assert all(c.impl == "fused" for c in lazy)
    assert 60 <= len(CASES) <= 120


# --- one run ----------------------------------------------------------------------------------


def _data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(BATCH, 4, generator=g), torch.randn(BATCH, 2, generator=g))
        for _ in range(N_POSITIONS)
    ]


DATA = _data()


def _model(matrix_only: bool) -> nn.Module:
    torch.manual_seed(0)
    if matrix_only:  # Muon: 2-D weights only (the BatchNorm keeps its buffers, not its affine)
        return nn.Sequential(
            nn.Linear(4, 16, bias=False),
            nn.BatchNorm1d(16, affine=False),
            nn.ReLU(),
            nn.Linear(16, 2, bias=False),
        )
    return nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))


@dataclass
class Run:
    model: nn.Module
    opt: torch.optim.Optimizer
    sched: Any
    scaler: Any
    guard: Guard
    used: UsedHyperparameters
    actions: list[tuple[int, str]]


def _run(case: Case, bad: set[int], drop: set[int]) -> Run:
    fam = FAMILIES[case.family]
    model = _model(fam.matrix_only)
    kwargs = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in fam.kwargs.items()}
    if case.impl != "plain":
        kwargs[case.impl] = True
    elif "foreach" in fam.impls:
        kwargs["foreach"] = False  # the for-loop implementation, not torch's default pick
    opt = fam.make(model.parameters(), **kwargs)
    sched = _scheduler(case.scheduler, opt, fam)
    scaler = (
        torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=3)
        if case.precision == "fp16"
        else None
    )
    if case.response == "skip":
        config = GuardConfig(detectors=[], responses={"nonfinite": ("skip", "abort")})
    elif case.response == "rollback":
        config = GuardConfig(
            detectors=[],
            snapshot_every=case.snapshot_every,
            responses={"nonfinite": ("rollback", "abort")},
        )
    else:
        config = GuardConfig(
            detectors=[],
            snapshot_every=case.snapshot_every,
            responses={"nonfinite": ("skip", "rollback", "abort")},
            budgets=Budgets(skip=1),
            skip_after=1,
        )
    # The matrix checks the mechanics of a skip and a rollback: the non-finite rule alone, so
    # that what the default detectors think of a run cannot change the comparison.
    config.sync = "lazy" if case.sync in ("lazy", "late") else "step"
    guard = Guard(model, opt, sched, scaler=scaler, config=config)
    if case.sync == "late":
        make_deferred(guard)
    used = UsedHyperparameters(opt, lambda: guard.step_count)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[case.precision]
    actions: list[tuple[int, str]] = []
    pending = 0
    for _ in range(4 * N_POSITIONS):  # a hang guard: a replay takes a few extra iterations
        pos = guard.position
        if pos >= N_POSITIONS:
            break
        if pos in drop:
            guard.drop_batch()
            continue
        x, y = DATA[pos]
        if pos in bad:
            x = x.clone()
            x[0, 0] = math.nan
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            loss = nn.functional.mse_loss(model(x).float(), y)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        report = guard.step(loss)
        opt.zero_grad(set_to_none=True)
        pending += guard._pending is not None  # flags not read yet: the one-step-late path
        actions.append((pos, report.action))
    else:
        pytest.fail(f"the run did not reach position {N_POSITIONS}: {actions}")
    # "late" must really leave each step's flags for the next step; the others settle at once.
    assert (pending > 0) == (case.sync == "late"), pending
    guard.flush()
    return Run(model, opt, sched, scaler, guard, used, actions)


def _positions_left_out(run: Run) -> set[int]:
    return {p for a, b in run.guard.skip_list.windows for p in range(a, b + 1)}


# --- the matrix -------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_guarded_run_equals_the_run_that_never_saw_the_bad_batch(case: Case) -> None:
    streak = 2 if case.response == "skip-rollback" else 1
    guarded = _run(case, bad={case.bad, case.bad + streak - 1}, drop=set())
    if case.response == "skip":
        assert (case.bad, "skip") in guarded.actions, guarded.actions
        left_out = {case.bad}
    else:
        assert guarded.guard.counters.rollbacks == 1, guarded.actions
        # The streak, widened by skip_after (one good batch in skip-rollback).
        assert guarded.guard.skip_list.windows == [(case.bad, case.bad + 2 * streak - 2)]
        left_out = _positions_left_out(guarded)
    ref = _run(case, bad=set(), drop=left_out)
    assert all(a in ("step", "clip") for _, a in ref.actions), ref.actions

    assert_same(dict(guarded.model.named_parameters()), dict(ref.model.named_parameters()), "param")
    assert_same(dict(guarded.model.named_buffers()), dict(ref.model.named_buffers()), "buffer")
    assert_same(guarded.used.applied, ref.used.applied, "hyperparameters used")
    assert_same(guarded.opt.state_dict(), ref.opt.state_dict(), "optimizer")
    if guarded.sched is not None:
        assert_same(guarded.sched.state_dict(), ref.sched.state_dict(), "scheduler")
    if guarded.scaler is not None:
        assert_same(guarded.scaler.state_dict(), ref.scaler.state_dict(), "scaler")
    for p in guarded.model.parameters():
        assert torch.isfinite(p).all()
    # The reference trained: the comparison is not between two untouched models.
    start = next(_model(FAMILIES[case.family].matrix_only).parameters())
    assert not torch.equal(start, next(ref.model.parameters()))
