"""Random ordinary training programs under a Guard, each compared after every operation with a
twin that never saw the bad batches (``tests/_programs.py`` says what a program, the twin and
the comparison are).

A Hypothesis state machine draws the :class:`~tests._programs.Setup` once (model with or without
BatchNorm, dropout, tied or frozen weights; a torch or pytorch-optimizer optimizer, plain, foreach
or fused; a scheduler; fp32, bf16 or fp16 with a GradScaler; the plain or the framework path;
``sync="step"`` or the lazy route; accumulation; snapshots, budgets, clipping) and then a
sequence of operations: steps on clean and poisoned batches, checkpoint saves and loads in
every order, ``add_param_group``, ``model.double()``, an ``optimizer.step()`` that raises once.
A failure prints the shrunk program as rule calls; ``Program(setup).run("...")`` replays it.

Budget: ``make test`` (profile ``ci``, derandomized) runs 40 programs of up to 15 rules after
0-3 clean steps (a rule is up to four steps, or one other operation), a few hundred optimizer
steps in all; a failure is shrunk, the first one only. ``HYPOTHESIS_PROFILE=fuzz`` runs ten
times as many programs, of up to 20 rules, drawn at random, and reports every distinct failure.
The tally of programs, steps and actions is printed at the end of the module (``pytest -s``);
``--hypothesis-show-statistics`` shows which operations and actions the programs had.

The regression tests below pin each distinct failure the machine found on the Guard of today,
as plain programs (``test_a_program_the_fuzzer_found``).
"""

from __future__ import annotations

import collections
import contextlib
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, Phase, event, reject, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from tests._matrix_util import assert_same
from tests._programs import (
    LOADS,
    OPTIMIZERS,
    GuardRefused,
    InvalidProgram,
    Program,
    Setup,
    optimizer_state,
)

FUZZ = os.environ.get("HYPOTHESIS_PROFILE") == "fuzz"
PROGRAMS, RULES = (400, 20) if FUZZ else (40, 15)
BATCHES = ("clean", "nan", "clean", "inf", "clean", "huge")  # half of them clean
TALLY: collections.Counter[str] = collections.Counter()


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@st.composite
def setups(draw: st.DrawFn) -> Setup:
    """A user's choices; every list starts with the simplest value (what shrinking goes to)."""
    optimizer = draw(st.sampled_from(list(OPTIMIZERS)))
    impl = draw(st.sampled_from(OPTIMIZERS[optimizer].impls))
    precision = draw(st.sampled_from(("fp32", "bf16", "fp16")))
    snapshot_every = draw(st.sampled_from((0, 2, 3)))
    return Setup(
        optimizer=optimizer,
        impl=impl,
        scheduler=draw(st.sampled_from(("none", "steplr", "onecycle", "warmup", "custom"))),
        precision=precision,
        path=draw(st.sampled_from(("plain", "framework"))),
        sync=draw(st.sampled_from(("step", "auto"))),  # "auto": the lazy route when fused
        accumulation=draw(st.sampled_from((1, 2))),
        batchnorm=draw(st.booleans()),
        dropout=draw(st.booleans()),
        tied=draw(st.booleans()),
        frozen=draw(st.booleans()),
        snapshot_every=snapshot_every,
        keep_snapshots=draw(st.sampled_from((2, 1))) if snapshot_every else 2,
        skip_budget=draw(st.sampled_from((8, 1, 2))),
        rollback_budget=draw(st.sampled_from((2, 1))) if snapshot_every else 2,
        skip_before=draw(st.sampled_from((0, 1))) if snapshot_every else 0,
        skip_after=draw(st.sampled_from((0, 1))) if snapshot_every else 0,
        clip=draw(st.sampled_from((None, 0.5))),
        rng=draw(st.sampled_from(("stream", "position"))),
        init_scale=draw(st.sampled_from((2.0**16, 2.0**24))) if precision == "fp16" else 2.0**16,
    )


class GuardedPrograms(RuleBasedStateMachine):
    """One program per example: a guarded run and its twin, checked after every rule."""

    program: Program | None = None

    def _do(self, fn: Callable[..., object], *args: object) -> None:
        try:
            fn(*args)
        except InvalidProgram:
            reject()  # plain PyTorch refuses it, or it diverged on clean data

    def _live(self) -> bool:
        return self.program is not None and not self.program.aborted

    @initialize(setup=setups(), warmup=st.integers(0, 3))
    def build(self, setup: Setup, warmup: int) -> None:
        """The setup, and a few clean steps before anything else happens."""
        try:
            self.program = Program(setup)
        except InvalidProgram:
            reject()
        self.steps(["clean"] * warmup)

    @precondition(_live)
    @rule(kinds=st.lists(st.sampled_from(BATCHES), min_size=1, max_size=4))
    def steps(self, kinds: list[str]) -> None:
        assert self.program is not None
        for kind in kinds:
            if self.program.aborted:
                break
            self._do(self.program.step, kind)
            self.program.check()

    @precondition(_live)
    @rule(n=st.integers(1, 4))
    def clean_steps(self, n: int) -> None:
        self.steps(["clean"] * n)

    @precondition(lambda self: self._live() and self.program.setup.path == "plain")
    @rule()
    def failing_step(self) -> None:
        assert self.program is not None
        self._do(self.program.fail)

    @precondition(_live)
    @rule()
    def save(self) -> None:
        assert self.program is not None
        self._do(self.program.save)

    @precondition(lambda self: self.program is not None and bool(self.program.checkpoints))
    @rule(index=st.integers(0, 7), how=st.sampled_from(LOADS))
    def load(self, index: int, how: str) -> None:
        assert self.program is not None
        self._do(self.program.load, index, how)

    @precondition(
        lambda self: (
            self._live()
            and self.program.setup.frozen
            and not self.program.unfrozen
            and self.program.setup.scheduler in ("none", "steplr", "custom")
        )
    )
    @rule()
    def unfreeze(self) -> None:
        assert self.program is not None
        self._do(self.program.unfreeze)

    @precondition(
        lambda self: (
            self._live()
            and not self.program.double
            and self.program.setup.precision == "fp32"
            and self.program.steps == 0
            and not self.program.checkpoints
        )
    )
    @rule()
    def to_double(self) -> None:
        assert self.program is not None
        self._do(self.program.to_double)

    @precondition(lambda self: self.program is not None and self.program.aborted)
    @rule()
    def read_records(self) -> None:
        """After a GuardAbort with no checkpoint to go back to, the program can only look at
        what happened (the state machine needs a rule it can always take)."""
        assert self.program is not None
        self.program.guard.records  # noqa: B018

    @invariant()
    def same_as_the_twin(self) -> None:
        if self.program is not None:
            self.program.check()

    def teardown(self) -> None:
        if self.program is None:
            return
        TALLY["programs"] += 1
        TALLY["steps"] += self.program.steps
        TALLY["operations"] += len(self.program.script)
        for action in self.program.actions:
            TALLY[f"action {action}"] += 1
        for op in {line.split()[0] for line in self.program.script}:
            event(f"has {op}")
        event(f"actions {sorted(set(self.program.actions))}")


GuardedPrograms.TestCase.settings = settings(
    max_examples=PROGRAMS,
    stateful_step_count=RULES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    # make test: the first failure, shrunk, and no explain phase; fuzz: every distinct one.
    report_multiple_bugs=FUZZ,
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink]
    + ([Phase.explain] if FUZZ else []),
)
TestGuardedPrograms = GuardedPrograms.TestCase


@pytest.fixture(scope="module", autouse=True)
def _report_tally() -> Iterator[None]:
    yield
    if TALLY:
        print(f"\nfuzzed programs: {dict(sorted(TALLY.items()))}")


# --- the programs the machine found failing, pinned ---------------------------------------------
# Each is a shrunk program the machine once found failing; each now passes and must keep passing.


FOUND: list[object] = [
    # An optimizer.step() that raises (an OOM) is a transaction: the guard stays usable, and the
    # streak, BatchNorm's statistics and the GradScaler are as before the call.
    pytest.param(Setup(), "fail", id="raise-in-step-guard-usable"),
    pytest.param(Setup(), "step nan; fail", id="raise-in-step-keeps-the-streak"),
    pytest.param(Setup(batchnorm=True), "fail", id="raise-in-step-batchnorm"),
    pytest.param(Setup(precision="fp16"), "fail", id="raise-in-step-gradscaler"),
    # The framework path: optimizers that keep counters in their param groups, a GradScaler.
    *(
        pytest.param(Setup(optimizer=name, path="framework"), "step; step nan; step",
                     id=f"framework-skip-{name}")
        for name in ("lion", "adan", "prodigy", "schedulefree")
    ),
    pytest.param(Setup(precision="fp16", path="framework"), "step nan",
                 id="framework-skip-gradscaler"),
    pytest.param(Setup(precision="fp16", skip_budget=1), "step nan; step nan",
                 id="abort-gradscaler"),
    # A GuardAbort raised by before_optimizer_step() after the framework's scaler.unscale_().
    pytest.param(Setup(precision="fp16", path="framework", skip_budget=1), "step nan; step nan",
                 id="framework-abort-gradscaler"),
    # A hand-written scheduler with step() only: refused with snapshots, guarded without.
    pytest.param(Setup(scheduler="custom", snapshot_every=2), "step",
                 id="hand-scheduler-snapshots"),
    pytest.param(Setup(impl="fused", sync="auto", scheduler="custom"), "step",
                 id="hand-scheduler-lazy"),
    # The sync-free route (found_inf) and the optimizer's fused flag.
    pytest.param(Setup(optimizer="sgd-momentum", impl="fused", sync="auto"), "step nan; step",
                 id="lazy-fused-sgd-skipped-first-step"),
    pytest.param(Setup(optimizer="adamw", sync="auto"),
                 "step; save; load 0 other-impl-guard-first; step",
                 id="resume-fused-from-non-fused-checkpoint"),
    # One fused param group beside non-fused ones (a non-fused checkpoint loaded into a
    # fused-built optimizer, then add_param_group): the plain route, found_inf would assert.
    pytest.param(Setup(impl="foreach", sync="auto", frozen=True),
                 "save; load 0 other-impl; unfreeze; step", id="fused-and-non-fused-groups"),
    # Read, don't remember: what the user changed after the Guard was built (weights loaded,
    # a param group added, the model cast; a restore keeps the optimizer state's dtypes).
    pytest.param(Setup(batchnorm=True), "save; step; load 0 model-only; step nan",
                 id="skip-after-loading-weights-batchnorm"),
    pytest.param(Setup(snapshot_every=3, skip_budget=1),
                 "step; save; step; load 0 model-only; step nan; step nan",
                 id="rollback-after-loading-weights"),
    pytest.param(Setup(frozen=True, snapshot_every=3, skip_budget=1),
                 "unfreeze; step nan; step nan", id="rollback-after-add-param-group"),
    pytest.param(Setup(batchnorm=True), "to_double; step; step nan",
                 id="skip-after-model-double-batchnorm"),
    pytest.param(Setup(optimizer="adagrad", snapshot_every=3, skip_budget=1),
                 "to_double; step nan; step nan; step", id="rollback-after-model-double"),
]  # fmt: skip


@pytest.mark.parametrize(("setup", "script"), FOUND)
def test_a_program_the_fuzzer_found(setup: Setup, script: str) -> None:
    # run() checks every state against the never-guarded twin after each operation.
    with contextlib.suppress(GuardRefused):  # a clear refusal when built is a fine answer
        program = Program(setup).run(script)
        assert program.steps > 0


# --- a run resumed in a new process -----------------------------------------------------------

RESUMED = Setup(
    optimizer="adamw",
    impl="fused",
    sync="auto",
    scheduler="onecycle",
    batchnorm=True,
    dropout=True,
    snapshot_every=3,
    skip_budget=1,
)


@pytest.mark.slow
def test_a_run_resumed_from_a_file_in_a_new_process_ends_where_the_uninterrupted_run_ends(
    tmp_path: Path,
) -> None:
    """Save in the middle (after a skip and a rollback), continue in a new Python process from
    the file with new objects and a new Guard: every step there equals the twin, and the end
    equals this process's uninterrupted run."""
    program = Program(RESUMED).run("step; step; step nan; step inf; step; step huge; save")
    checkpoint, out = tmp_path / "checkpoint.pt", tmp_path / "final.pt"
    torch.save(program.dump(), checkpoint)
    after = "step; step nan; step; step inf; step huge; step; step"
    program.run(after)  # the uninterrupted run
    root = Path(__file__).resolve().parents[1]
    code = "import sys; from tests._programs import resume_in_this_process as r; r(*sys.argv[1:])"
    subprocess.run(
        [sys.executable, "-c", code, repr(RESUMED), str(checkpoint), after, str(out)],
        cwd=root,
        env={
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
        },
        check=True,
        timeout=300,
    )
    final = torch.load(out, weights_only=True)
    assert_same(final["model"], program.guarded.model.state_dict(), "model")
    assert_same(final["opt"], optimizer_state(program.guarded.opt), "optimizer")
