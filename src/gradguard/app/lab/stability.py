"""Lab: the stability benchmark (``gradguard lab stability``), every method on every scenario.

Scenarios S1-S7 (:mod:`gradguard.app.lab._scenarios`) are real instabilities and injected faults;
methods (:mod:`gradguard.app.lab._methods`) are no clipping, torch's ``clip_grad_norm_`` over a
grid of thresholds, the peers (zclip, autoclip, pytorch-optimizer's AdaGC/SPAM/StableSPAM,
OLMo-core's skip-step rule, timm-style AGC) and gradguard configurations. Each (scenario,
setting, method, seed) is one seeded run on one CPU thread; the tables hold medians over seeds.

One run from a script, while tuning a default::

    >>> from gradguard.app.lab.stability import run_one
    >>> r = run_one("S1", "gradguard-defaults", seed=0)       # doctest: +SKIP
    >>> r.final_loss, r.diverged, r.clips, r.skips             # doctest: +SKIP

A whole sweep (``methods``/``scenarios`` narrow it; new methods go in ``METHODS``)::

    >>> result = run_stability(quick=True, seeds=3, methods=["clip-1", "gradguard-best"])
    ... # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from gradguard.app.lab._clean import CLEAN
from gradguard.app.lab._methods import (
    BACKOFF,
    CLIP,
    CLIP_GRID,
    METHODS,
    PEERS,
    ROLLBACK,
    SKIP,
    Stopped,
    clip_value,
    default_methods,
    is_clip_grid,
)
from gradguard.app.lab._metrics import (
    RECOVER_AHEAD,
    RECOVER_TOL,
    SPIKE_K,
    SPIKE_MIN,
    SPIKE_WINDOW,
    lr_sensitivity,
    median,
    recovery_steps,
    spike_score,
    spread,
)
from gradguard.app.lab._plot import figure, figure_grid
from gradguard.app.lab._result import LabResult, NullTicker, Ticker, fmt
from gradguard.app.lab._scenarios import SCENARIOS as STRESS
from gradguard.app.lab._scenarios import UNITS, Problem, Scenario, in_units
from gradguard.app.lab._stability_notes import NOTES

__all__ = ["METHODS", "SCENARIOS", "RunResult", "StabilityResult", "run", "run_one"]

# S1-S7, each in other units (S1x100, S1x0.01, ...), then the clean suite C1-C8.
SCENARIOS: dict[str, Scenario] = {
    **STRESS,
    **{v.key: v for s in STRESS.values() for v in (in_units(s, u) for u in UNITS)},
    **CLEAN,
}

DEFAULTS = "gradguard-defaults"
ADAM = ("adam", "adamw")  # where the peers that bring their own Adam-type optimizer run
NOISE_FLOOR = 0.01  # "within noise" never narrower than 1% of the reference's value
CLEAN_SEEDS = 5  # the clean suite's seeds at least: its noise is the unguarded seeds' spread


@dataclass
class RunResult:
    """One seeded run of one method on one scenario setting.

    Attributes:
        scenario, method, seed, lr: what ran (``lr``: the optimizer's base learning rate).
        initial_loss, final_loss: held-out loss before and after training (``nan``: non-finite),
            in the scenario's own units (a units variant's held-out loss is not rescaled).
        diverged: stopped, non-finite final loss, or final loss above the initial one.
        stopped: why the method stopped the run early (``""``: it did not).
        steps: forward-backward passes done.
        clips, skips, backoffs, rollbacks: what the method did (``clips`` is ``None`` where the
            method clips inside its own optimizer and does not say).
        spike_score: :func:`~gradguard.app.lab._metrics.spike_score` of the training loss.
        recovery: steps to recover after each injected fault (``None``: never), against the
            clean twin (:func:`~gradguard.app.lab._metrics.recovery_steps`).
        fault_cost: final loss minus the clean twin's (``nan`` without faults).
        ms_per_step: median wall time of forward + backward + the method's step.
        losses, positions: the training-loss curve and the data position of each step.
    """

    scenario: str
    method: str
    seed: int
    lr: float
    initial_loss: float
    final_loss: float
    diverged: bool
    stopped: str
    steps: int
    clips: int | None
    skips: int
    rollbacks: int
    spike_score: float
    recovery: list[int | None]
    fault_cost: float
    ms_per_step: float
    losses: list[float] = field(repr=False)
    positions: list[int] = field(repr=False)
    backoffs: int = 0

    def summary(self) -> dict[str, Any]:
        """The numbers without the curves."""
        d = asdict(self)
        d.pop("losses")
        d.pop("positions")
        return d

    @property
    def score(self) -> float:
        """The headline number: the final loss, ``inf`` for a stopped or non-finite run."""
        return math.inf if self.stopped or not math.isfinite(self.final_loss) else self.final_loss

    @property
    def interventions(self) -> int:
        """Steps the method did not apply as given: skips, back-offs and rollbacks."""
        return self.skips + self.backoffs + self.rollbacks


def build_problem(scenario: str, seed: int, quick: bool = True, lr: float | None = None) -> Problem:
    """The problem of ``scenario`` for ``seed`` (its default LR unless ``lr`` is given)."""
    if scenario not in SCENARIOS:
        raise ValueError(f"scenario must be one of {', '.join(SCENARIOS)}, got {scenario!r}")
    return SCENARIOS[scenario].build(seed, quick, lr)


@dataclass
class _Trace:
    losses: list[float]
    positions: list[int]
    times: list[float]
    counts: dict[str, int]
    stopped: str
    initial: float
    final: float


def _train(problem: Problem, method: str, seed: int) -> _Trace:
    spec = METHODS[method]
    model = problem.model
    initial = problem.heldout(model)
    torch.manual_seed(seed)
    stepper = spec.build(model, problem)
    trace = _Trace([], [], [], {CLIP: 0, SKIP: 0, BACKOFF: 0, ROLLBACK: 0}, "", initial, math.nan)
    params = list(model.parameters())
    for _ in range(problem.steps):
        position = stepper.position
        batch = problem.batch(position)
        t0 = time.perf_counter()
        loss = problem.loss(model, batch)
        loss.backward()
        action = ""
        try:
            action = stepper.step(loss)
        except Stopped as e:
            trace.stopped = str(e).splitlines()[0][:200]
        except (RuntimeError, ValueError, ZeroDivisionError, OverflowError) as e:
            trace.stopped = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        trace.times.append(time.perf_counter() - t0)
        for p in params:
            p.grad = None
        trace.losses.append(float(loss.detach()))
        trace.positions.append(position)
        if trace.stopped:
            break
        trace.counts[action] = trace.counts.get(action, 0) + 1
    final = problem.heldout(model)
    trace.final = final if math.isfinite(final) else math.nan
    return trace


def run_one(
    scenario: str,
    method: str,
    *,
    seed: int = 0,
    quick: bool = True,
    lr: float | None = None,
    steps: int | None = None,
) -> RunResult:
    """Train ``method`` on ``scenario`` once; seconds on one CPU thread.

    Where the scenario injects faults, a clean twin (same method, seed and batches, no faults)
    runs too: recovery and fault cost are measured against it.

    Args:
        scenario: a key of :data:`SCENARIOS` (``"S1"``, ``"S1x100"``, ``"C1"``, ...).
        method: a key of :data:`METHODS`.
        seed: the seed (model init, data order; faults are at fixed positions).
        quick: the quick setting's run length.
        lr: override the scenario's learning rate (the S3 sweep passes each of its LRs).
        steps: override the run length (tests use a few steps).

    Returns:
        A :class:`RunResult`. Deterministic: the same arguments give the same numbers (except
        ``ms_per_step``).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    torch.set_num_threads(1)
    problem = build_problem(scenario, seed, quick, lr)
    if steps is not None:
        problem.steps = steps
    spec = METHODS[method]
    if spec.replaces_optimizer and problem.optimizer not in ADAM:
        raise ValueError(
            f"{method} replaces Adam/AdamW; {scenario} trains with {problem.optimizer}"
        )
    run = _train(problem, method, seed)
    recovery: list[int | None] = []
    fault_cost = math.nan
    if problem.faults and problem.clean_batch is not None:
        twin = build_problem(scenario, seed, quick, lr)
        twin.steps, twin.batch, twin.faults = problem.steps, problem.clean_batch, ()
        ref = _train(twin, method, seed)
        recovery = [
            recovery_steps(run.losses, run.positions, f, ref.losses) for f in problem.faults
        ]
        fault_cost = run.final - ref.final
    faulty = problem.fault_positions()
    return RunResult(
        scenario=scenario,
        method=method,
        seed=seed,
        lr=problem.lr,
        initial_loss=run.initial,
        final_loss=run.final,
        diverged=bool(run.stopped) or not math.isfinite(run.final) or run.final > run.initial,
        stopped=run.stopped,
        steps=len(run.losses),
        clips=None if spec.replaces_optimizer else run.counts[CLIP],
        skips=run.counts[SKIP],
        backoffs=run.counts[BACKOFF],
        rollbacks=run.counts[ROLLBACK],
        spike_score=spike_score(run.losses, [p in faulty for p in run.positions]),
        recovery=recovery,
        fault_cost=fault_cost,
        ms_per_step=1000 * statistics.median(run.times) if run.times else math.nan,
        losses=run.losses,
        positions=run.positions,
    )


Job = tuple[str, str, int, bool, float | None, int | None]


def _job(job: Job) -> RunResult:
    scenario, method, seed, quick, lr, steps = job
    return run_one(scenario, method, seed=seed, quick=quick, lr=lr, steps=steps)


# -- aggregation -------------------------------------------------------------------------------


@dataclass
class Cell:
    """One (scenario, method) over seeds: medians and per-seed values of the headline metric."""

    scenario: str
    method: str
    score: list[float]  # per seed: final held-out loss (S3: LR sensitivity); lower is better
    diverged: float  # fraction of runs
    spike: float
    recovery: float | None  # median over seeds of the worst fault's recovery (inf: never)
    fault_cost: float | None  # median over seeds of final - clean twin's final
    clip_rate: float | None
    skips: float
    rollbacks: float
    ms: float
    backoffs: float = 0.0
    worst_interventions: int = 0  # the most skips + back-offs + rollbacks of any one run

    @property
    def median(self) -> float:
        return median(self.score)


@dataclass
class StabilityResult:
    """Everything one benchmark run measured, and how it reads."""

    quick: bool
    seeds: int
    methods: list[str]
    scenarios: list[str]
    runs: list[RunResult]
    seconds: float = 0.0
    clean_seeds: int = 0

    def runs_of(self, scenario: str, method: str) -> list[RunResult]:
        return [r for r in self.runs if r.scenario == scenario and r.method == method]

    def cell(self, scenario: str, method: str) -> Cell | None:
        runs = self.runs_of(scenario, method)
        if not runs:
            return None
        seeds = sorted({r.seed for r in runs})
        by_seed = {s: [r for r in runs if r.seed == s] for s in seeds}
        if len(SCENARIOS[scenario].settings(self.quick)) > 1:
            score = [
                lr_sensitivity([r.score for r in rs], [r.initial_loss for r in rs])
                for rs in by_seed.values()
            ]
        else:
            score = [rs[0].score for rs in by_seed.values()]
        worst: list[float] = []
        for r in runs:
            if r.recovery:
                worst.append(max(math.inf if v is None else v for v in r.recovery))
        clips = [r.clips / max(1, r.steps) for r in runs if r.clips is not None]
        costs = [
            math.inf if r.stopped else r.fault_cost
            for r in runs
            if r.recovery or (r.stopped and SCENARIOS[scenario].faulty)
        ]
        return Cell(
            scenario=scenario,
            method=method,
            score=score,
            diverged=statistics.fmean(r.diverged for r in runs),
            spike=statistics.median(r.spike_score for r in runs),
            recovery=statistics.median(worst) if worst else None,
            fault_cost=median(costs) if costs else None,
            clip_rate=statistics.median(clips) if clips else None,
            skips=statistics.median(r.skips for r in runs),
            rollbacks=statistics.median(r.rollbacks for r in runs),
            ms=statistics.median(r.ms_per_step for r in runs),
            backoffs=statistics.median(r.backoffs for r in runs),
            worst_interventions=max(r.interventions for r in runs),
        )

    def suite(self, name: str) -> list[str]:
        """The scenarios run of one suite (``"stress"`` or ``"clean"``), in order."""
        return [s for s in self.scenarios if SCENARIOS[s].suite == name]

    def best_clip(self, scenario: str) -> str | None:
        """The tuning grid's point with the lowest median score on ``scenario`` (the oracle)."""
        cells = [self.cell(scenario, m) for m in self.methods if is_clip_grid(m)]
        ok = [c for c in cells if c is not None]
        return min(ok, key=lambda c: c.median).method if ok else None

    def verdict(
        self, scenario: str, method: str = DEFAULTS, against: str | None = None
    ) -> tuple[str, bool]:
        """How ``method`` compares on ``scenario``'s headline metric with a reference:
        ``against="tuned"``, the tuned clip (the grid's best point); ``"none"``, no clipping
        (default: ``"none"`` on the clean suite, ``"tuned"`` on the stress suite).

        Within noise: ``median(method) <= median(reference) + noise``, ``noise`` the reference's
        seed spread (max - min), at least 1% of its median. Against no clipping, a skip,
        back-off or rollback on any seed also fails.
        """
        mine = self.cell(scenario, method)
        if against is None:
            against = "none" if SCENARIOS[scenario].suite == "clean" else "tuned"
        clean = against == "none"
        ref_name = "none" if clean else self.best_clip(scenario)
        ref = self.cell(scenario, ref_name) if ref_name else None
        if mine is None or ref is None:
            return "not run", True
        noise = max(spread(ref.score), NOISE_FLOOR * abs(ref.median))
        gap = mine.median - ref.median
        what = "no clipping" if clean else f"the tuned clip ({_grid_label(ref.method)})"
        if clean and mine.worst_interventions:
            return (
                f"FAILS: {mine.worst_interventions} skips/back-offs/rollbacks in one run",
                False,
            )
        if gap <= 0:
            return f"at or below {what} ({gap:+.3g})", True
        if gap <= noise:
            return f"within noise of {what} (+{gap:.3g} <= {noise:.3g})", True
        return f"LOSES to {what} by {gap:.3g} (noise {noise:.3g})", False

    def ranks(self, scenario: str, methods: Sequence[str]) -> dict[str, float]:
        """Each method's rank by median score on ``scenario`` (1 = best, ties share the mean
        rank), among ``methods`` that ran there."""
        cells = [c for c in (self.cell(scenario, m) for m in methods) if c is not None]
        out: dict[str, float] = {}
        for c in cells:
            better = sum(o.median < c.median for o in cells)
            tied = sum(o.median == c.median for o in cells)
            out[c.method] = better + (tied + 1) / 2
        return out


def run_stability(
    *,
    quick: bool = True,
    seeds: int = 3,
    methods: Sequence[str] | None = None,
    scenarios: Sequence[str] | None = None,
    workers: int | None = None,
    steps: int | None = None,
    ticker: Ticker | None = None,
    clean_seeds: int | None = None,
) -> StabilityResult:
    """Run every (scenario, setting, method, seed).

    The tuning grid runs on the stress suite only; the peers that replace the optimizer only
    where the scenario trains with Adam or AdamW.

    Args:
        quick: short runs (about an hour on 2 cores for everything).
        seeds: seeds per setting of the stress suite (medians are over these).
        methods: keys of :data:`METHODS` (``None``: :func:`default_methods`).
        scenarios: keys of :data:`SCENARIOS` (``None``: all).
        workers: processes (``None``: up to 2; each pins torch to one thread).
        steps: override every run's length (a smoke test).
        ticker: progress callbacks.
        clean_seeds: seeds per clean-suite scenario (``None``: ``max(5, seeds)``).

    Returns:
        A :class:`StabilityResult`.
    """
    for name, n in (("seeds", seeds), ("clean_seeds", clean_seeds)):
        if n is None and name == "clean_seeds":
            continue
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{name} must be an int >= 1, got {n!r}")
    n_clean = max(CLEAN_SEEDS, seeds) if clean_seeds is None else clean_seeds
    methods = list(methods or default_methods(quick))
    scenarios = list(scenarios or SCENARIOS)
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}; one of {', '.join(METHODS)}")
    for s in scenarios:
        if s not in SCENARIOS:
            raise ValueError(f"unknown scenario {s!r}; one of {', '.join(SCENARIOS)}")
    jobs: list[Job] = []
    for s in scenarios:
        sc = SCENARIOS[s]
        adam = build_problem(s, 0, quick).optimizer in ADAM
        n = n_clean if sc.suite == "clean" else seeds
        for lr in sc.settings(quick):
            for m in methods:
                if METHODS[m].replaces_optimizer and not adam:
                    continue
                if is_clip_grid(m) and sc.suite == "clean":
                    continue
                jobs += [(s, m, seed, quick, lr, steps) for seed in range(n)]
    ticker = ticker or NullTicker()
    ticker.start(f"stability: {len(jobs)} runs", len(jobs))
    workers = workers or min(2, os.cpu_count() or 1)
    t0 = time.perf_counter()
    runs: list[RunResult] = []
    if workers == 1:
        for job in jobs:
            runs.append(_job(job))
            ticker.advance()
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for r in pool.map(_job, jobs, chunksize=1):
                runs.append(r)
                ticker.advance()
    return StabilityResult(
        quick=quick,
        seeds=seeds,
        methods=methods,
        scenarios=scenarios,
        runs=runs,
        seconds=time.perf_counter() - t0,
        clean_seeds=n_clean,
    )


# -- tables, figures, markdown -----------------------------------------------------------------

COLUMNS = [
    "method", "final loss (median)", "seeds", "diverged", "spike score", "recover (steps)",
    "fault cost", "clip rate", "skips", "back-offs", "rollbacks", "ms/step",
]  # fmt: skip


def _num(x: float | None, digits: int = 4) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and math.isinf(x):
        return "never" if x > 0 else "-inf"
    if isinstance(x, float) and math.isnan(x):
        return "nan"
    return fmt(float(x), digits)


def _grid_label(method: str) -> str:
    """``grid-0.3`` as ``0.3 x units``."""
    return f"{clip_value(method):g} x units" if is_clip_grid(method) else method


def scenario_rows(result: StabilityResult, scenario: str) -> list[list[str]]:
    """One row per method (skipped where it did not run); the grid's best point is marked."""
    rows: list[list[str]] = []
    best_clip = result.best_clip(scenario)
    for m in result.methods:
        c = result.cell(scenario, m)
        if c is None:
            continue
        name = m + (" (tuned clip)" if m == best_clip else "")
        rows.append(
            [
                name,
                _num(c.median),
                "; ".join(_num(v, 3) for v in c.score),
                f"{c.diverged:.0%}",
                f"{c.spike:.3f}",
                _num(c.recovery),
                _num(c.fault_cost, 3),
                "internal" if c.clip_rate is None else f"{c.clip_rate:.0%}",
                _num(c.skips),
                _num(c.backoffs),
                _num(c.rollbacks),
                f"{c.ms:.1f}",
            ]
        )
    return rows


def _style(methods: Sequence[str], method: str) -> dict[str, Any]:
    """One colour per method (tab10, then Dark2); gradguard thick and dashed, baselines dotted."""
    import matplotlib

    colors = [matplotlib.colormaps["tab10"](i) for i in range(10)]
    colors += [matplotlib.colormaps["Dark2"](i) for i in range(8)]
    color = colors[methods.index(method) % len(colors)]
    family = METHODS[method].family
    if family == "gradguard":
        return {"color": color, "linewidth": 2.0, "linestyle": "--", "zorder": 3}
    if family in ("baseline", "grid"):
        return {"color": color, "linewidth": 1.2, "linestyle": ":"}
    return {"color": color, "linewidth": 0.9, "linestyle": "-"}


def _shown(result: StabilityResult, scenario: str) -> list[str]:
    """The curves of a figure: every method but the grid, whose best point stands for it."""
    best = result.best_clip(scenario)
    return [m for m in result.methods if not is_clip_grid(m) or m == best]


def _curves(ax: Any, result: StabilityResult, scenario: str, lr: float | None) -> None:
    for m in _shown(result, scenario):
        runs = [
            r
            for r in result.runs_of(scenario, m)
            if r.seed == 0 and (lr is None or math.isclose(r.lr, lr))
        ]
        if not runs:
            continue
        curve = runs[0].losses
        xs = [i for i, v in enumerate(curve) if math.isfinite(v)]
        ax.plot(xs, [curve[i] for i in xs], label=m, **_style(result.methods, m))
    ax.set_yscale("log")


def _figures(result: StabilityResult, out: Path) -> list[str]:
    paths: list[str] = []
    every = result.methods
    own_units = [s for s in result.suite("stress") if SCENARIOS[s].units == 1.0]
    for s in own_units:
        lrs = SCENARIOS[s].settings(result.quick)
        lr = lrs[-2] if len(lrs) > 1 else lrs[0]  # the sweep's curves: where instability shows
        path = out / f"stability-{s}.png"
        with figure(path, width=7.0, height=3.8) as ax:
            _curves(ax, result, s, lr)
            ax.set_xlabel("step")
            ax.set_ylabel("training loss (log; non-finite not drawn)")
            at = f", lr {lr:g}" if lr is not None else ""
            ax.set_title(f"{s}: {SCENARIOS[s].title} (seed 0{at})", fontsize=9)
            ax.legend(fontsize=6, ncol=2)
        paths.append(str(path))
    for s in own_units:
        lrs = SCENARIOS[s].settings(result.quick)
        if lrs[0] is None:
            continue
        path = out / f"stability-{s}-lr.png"
        with figure(path, width=7.0, height=3.8) as ax:
            for m in _shown(result, s):
                pts = []
                for lr in lrs:
                    rs = [r for r in result.runs_of(s, m) if r.lr == lr]
                    if rs:
                        vals = [min(r.score, r.initial_loss) for r in rs]
                        pts.append((lr, statistics.median(vals)))
                if pts:
                    lr_x, loss_y = [p[0] for p in pts], [p[1] for p in pts]
                    ax.plot(lr_x, loss_y, marker="o", markersize=3, label=m, **_style(every, m))
            ax.set_xscale("log")
            ax.set_xlabel("peak learning rate")
            ax.set_ylabel("min(final, initial) held-out loss (median)")
            ax.set_title(f"{s}: final loss vs learning rate", fontsize=9)
            ax.legend(fontsize=6, ncol=2)
        paths.append(str(path))
    clean = result.suite("clean")
    if clean:
        path = out / "stability-clean.png"
        cols = 4
        rows = (len(clean) + cols - 1) // cols
        with figure_grid(path, rows, cols, width=12.0, height=2.6 * rows) as axes:
            for ax, s in zip(axes, clean):
                _curves(ax, result, s, None)
                ax.set_title(f"{s}: {SCENARIOS[s].title}", fontsize=8)
                ax.tick_params(labelsize=6)
            axes[0].legend(fontsize=5, ncol=2)
        paths.append(str(path))
    return paths


def _md_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]
    return lines


def _others(result: StabilityResult) -> list[str]:
    """The methods the defaults are compared with in the summaries: torch's clip at 1.0 and
    every peer that ran, in the benchmark's order (the grid and no clipping have their own
    columns)."""
    return [m for m in result.methods if m == "clip-1" or m in PEERS]


def _median_cell(result: StabilityResult, scenario: str, method: str) -> str:
    c = result.cell(scenario, method)
    return _num(c.median) if c is not None else "-"


CLEAN_COLUMNS = ["scenario", "no clipping (spread)", "gradguard defaults", "verdict"]


def clean_rows(result: StabilityResult) -> list[list[str]]:
    """The clean suite (and S6, S7): the defaults against no clipping, what they did, the peers."""
    rows = []
    scenarios = [s for s in result.scenarios if SCENARIOS[s].clean and SCENARIOS[s].units == 1.0]
    for s in scenarios:
        none, mine = result.cell(s, "none"), result.cell(s, DEFAULTS)
        if none is None or mine is None:
            continue
        rate = "internal" if mine.clip_rate is None else f"{mine.clip_rate:.0%}"
        rows.append(
            [
                f"{s} {SCENARIOS[s].title}",
                f"{_num(none.median)} ({_num(spread(none.score), 2)})",
                f"{_num(mine.median)}; clip rate {rate}, skips/back-offs/rollbacks "
                f"{mine.worst_interventions} (worst seed)",
                result.verdict(s, against="none")[0],
                *(_median_cell(result, s, m) for m in _others(result)),
            ]
        )
    return rows


STRESS_COLUMNS = ["scenario", "units", "tuned clip (threshold)", "gradguard defaults", "verdict"]


def stress_rows(result: StabilityResult) -> list[list[str]]:
    """S1-S7 in every units: the defaults against the tuned clip, then the others' medians."""
    rows = []
    for s in result.suite("stress"):
        sc = SCENARIOS[s]
        best = result.best_clip(s)
        tuned = result.cell(s, best) if best else None
        rows.append(
            [
                sc.family,
                f"x{sc.units:g}",
                f"{_num(tuned.median)} ({_grid_label(tuned.method)})" if tuned else "-",
                _median_cell(result, s, DEFAULTS),
                result.verdict(s)[0],
                *(_median_cell(result, s, m) for m in _others(result)),
                _median_cell(result, s, "none"),
            ]
        )
    return rows


RANK_COLUMNS = [
    "method", "stress rows run", "its mean rank", "defaults' mean rank on those rows",
    "defaults ahead", "fault/explosion rows", "its mean rank there", "defaults' there",
    "defaults ahead there",
]  # fmt: skip


def rank_rows(result: StabilityResult) -> list[list[str]]:
    """Mean rank over the stress rows (scenario x units) among the defaults, torch's clip at 1.0,
    the peers and no clipping (the tuned clip is the reference, not ranked); each method against
    the defaults on the rows where both ran (the Adam-only peers skip the SGD scenarios)."""
    field_ = [DEFAULTS, *_others(result), "none"]
    field_ = [m for m in field_ if m in result.methods]
    per_row = {s: result.ranks(s, field_) for s in result.suite("stress")}

    def compare(m: str, rows: list[dict[str, float]]) -> list[str]:
        both = [r for r in rows if m in r and DEFAULTS in r]
        if not both:
            return ["0", "-", "-", "-"]
        theirs = statistics.fmean(r[m] for r in both)
        ours = statistics.fmean(r[DEFAULTS] for r in both)
        ahead = "-" if m == DEFAULTS else ("yes" if ours < theirs else "NO")
        return [str(len(both)), f"{theirs:.2f}", f"{ours:.2f}", ahead]

    stressed = [r for s, r in per_row.items() if not SCENARIOS[s].clean]
    rows = []
    for m in field_:
        every = compare(m, list(per_row.values()))
        if every[0] != "0":
            rows.append([m, *every, *compare(m, stressed)])
    return rows


UNITS_COLUMNS = [
    "scenario", "units", "defaults", "defaults' mean rank", "clip-1", "clip-1's mean rank",
]  # fmt: skip


def units_rows(result: StabilityResult) -> list[list[str]]:
    """Per scenario, the defaults and torch's clip at 1.0 over the three units: the median final
    score in each and the mean rank (among the defaults, the clip at 1.0, the peers and no
    clipping) averaged over the units."""
    field_ = [m for m in (DEFAULTS, *_others(result), "none") if m in result.methods]
    families: dict[str, list[str]] = {}
    for s in result.suite("stress"):
        families.setdefault(SCENARIOS[s].family, []).append(s)
    rows = []
    for family, members in families.items():
        ranks = [result.ranks(s, field_) for s in members]
        cells = []
        for m in (DEFAULTS, "clip-1"):
            scores = " / ".join(_median_cell(result, s, m) for s in members)
            got = [r[m] for r in ranks if m in r]
            mean = f"{statistics.fmean(got):.2f}" if got else "-"
            cells += [scores, mean]
        rows.append([family, " / ".join(f"x{SCENARIOS[s].units:g}" for s in members), *cells])
    return rows


def summary_rows(result: StabilityResult) -> list[list[str]]:
    """One row per scenario run: the defaults' verdict against its reference."""
    rows = []
    for s in result.scenarios:
        mine = result.cell(s, DEFAULTS)
        if mine is None:
            continue
        rows.append([s, SCENARIOS[s].suite, _num(mine.median), result.verdict(s)[0]])
    return rows


SUMMARY_COLUMNS = ["scenario", "suite", "gradguard defaults", "verdict"]


def _goals(result: StabilityResult) -> list[str]:
    """The benchmark's three questions, answered from this run."""
    clean = [s for s in result.scenarios if SCENARIOS[s].clean and SCENARIOS[s].units == 1.0]
    clean_fail = [s for s in clean if not result.verdict(s, against="none")[1]]
    stress = result.suite("stress")
    stress_fail = [s for s in stress if not result.verdict(s)[1]]
    ranks = {r[0]: r for r in rank_rows(result)}
    behind = [m for m, r in ranks.items() if r[4] == "NO" and m in PEERS]
    behind_stressed = [m for m, r in ranks.items() if r[8] == "NO" and m in PEERS]
    clip1 = ranks.get("clip-1")
    lines = []
    if clean:
        lines.append(
            f"* **Clean runs** ({len(clean)} scenarios, {result.clean_seeds} seeds each on the "
            "clean suite): "
            + (
                "the defaults are within noise of no clipping on every one, with no skip, "
                "back-off or rollback on any seed."
                if not clean_fail
                else "not met on "
                + "; ".join(f"{s} ({result.verdict(s)[0]})" for s in clean_fail)
                + "."
            )
        )
    if stress:
        met = len(stress) - len(stress_fail)
        lines.append(
            f"* **Stress runs at any units** ({len(stress)} rows): within noise of the tuned clip "
            f"on {met} of {len(stress)}"
            + ("." if not stress_fail else "; not on " + ", ".join(stress_fail) + " (why: below).")
        )
        if ranks:
            lines.append(
                "* **Mean rank** (stress rows, pairwise on the rows both ran): "
                + (
                    "the defaults are ahead of every peer"
                    if not behind
                    else "the defaults are behind " + ", ".join(behind)
                )
                + (
                    f"; ahead of torch's clip at 1.0 ({clip1[3]} vs {clip1[2]})"
                    if clip1 and clip1[4] == "yes"
                    else f"; NOT ahead of torch's clip at 1.0 ({clip1[3]} vs {clip1[2]})"
                    if clip1
                    else ""
                )
                + ". On the rows with a fault or an explosion (the clean S6 and S7 left out): "
                + (
                    "ahead of every peer."
                    if not behind_stressed
                    else "behind " + ", ".join(behind_stressed) + "."
                )
            )
    return lines


def to_markdown(result: StabilityResult, command: str, notes: str = "") -> str:
    """docs/stability.md: definitions, the goals, the summary tables, one table and figure per
    scenario in its own units."""
    mode = "quick" if result.quick else "full"
    others = _others(result)
    lines = [
        f"<!-- generated by: {command} -->",
        "",
        "# Stability benchmark",
        "",
        f"`{command}` ({mode}: {result.seeds} seeds per stress scenario, {result.clean_seeds} "
        f"per clean one, {len(result.runs)} runs, {result.seconds / 60:.1f} min wall on "
        f"{os.cpu_count()} cores, one torch thread per run). Every method gets the same "
        "forward-backward passes on the same batches; a rollback spends some of them replaying.",
        "",
        "Three questions, each with its own reference: on **clean** runs (C1-C8: every optimizer "
        "on four model families, batch 4 to 128; S6, S7), do gradguard's defaults cost anything "
        "against no clipping? On **stress** runs (S1-S7: explosions, faults, an LR sweep), are "
        "they within noise of a clip threshold tuned per scenario, and that **at any units** "
        "(each scenario again with its training loss x100 and x0.01)? And how do they rank "
        "against the peers and torch's `clip_grad_norm_(1.0)`?",
        "",
        "## Definitions",
        "",
        "* **final loss**: held-out loss at the end (fixed held-out batches, no faults, in the "
        "scenario's own units whatever the training loss's units); a non-finite one ranks last "
        "(`never`). Medians over seeds; per-seed values are listed.",
        "* **LR sensitivity** (S3): per seed, mean over the swept LRs of min(final loss, "
        "initial loss) (Wortsman et al. 2023, arXiv 2309.14322); then the median over seeds.",
        "* **units**: `x100` multiplies the training loss by 100 (SGD's learning rate is divided "
        "by 100, so an unclipped run takes the same steps; Adam and AdamW keep theirs): the same "
        "problem, with every gradient norm 100 times larger. A threshold in gradient units is 100 "
        "times tighter there; a scale-free rule does not notice.",
        "* **tuned clip**: torch's `clip_grad_norm_` at the best point of a grid over four "
        f"decades, {', '.join(f'{c:g}' for c in CLIP_GRID)} times the units, chosen per scenario "
        "and units on the same seeds: the oracle a user reaches only after a sweep. "
        "`clip-1` is `clip_grad_norm_(1.0)` whatever the units (Hugging Face's default).",
        "* **within noise**: the defaults' median is at most the reference's median plus the "
        "reference's seed spread (max - min over seeds), that spread at least "
        f"{NOISE_FLOOR:.0%} of the reference's median. The reference is the tuned clip on a "
        "stress run and no clipping on a clean one, where any skip, back-off or rollback on any "
        "seed also fails the check.",
        "* **mean rank**: per stress row (scenario x units), methods ranked by median score "
        "(1 = best, ties share); the defaults, `clip-1`, the peers and no clipping are ranked, "
        "and each method is compared with the defaults on the rows where both ran (AdaGC, SPAM "
        "and StableSPAM replace the optimizer and run only where it is Adam or AdamW).",
        "* **diverged**: the method stopped the run (gradguard's abort, a peer that raised), or "
        "the final loss is non-finite or above the initial loss.",
        f"* **spike score**: fraction of steps whose training loss is non-finite or above the "
        f"rolling mean by k = {SPIKE_K:g} rolling standard deviations, over the previous "
        f"{SPIKE_WINDOW} valid steps (scored once {SPIKE_MIN} are in); steps that consumed an "
        "injected fault batch are left out (their loss is the data's).",
        "* **recover** (S4, S5): every faulted run has a clean twin (same method, seed and "
        "batches, faults left out); recovery is the number of steps after the fault until the "
        f"mean training loss over the next {RECOVER_AHEAD} steps is within "
        f"{RECOVER_TOL:.0%} of the twin's over the same steps; the worst of a run's faults, "
        "median over seeds; `never` if it did not. **fault cost**: final loss minus the twin's "
        "(`never`: the run stopped).",
        "* **clip rate**: fraction of steps whose gradients the method shrank (`internal`: the "
        "optimizer clips inside and does not say); **skips / back-offs / rollbacks**: medians "
        "per run.",
        "* **ms/step**: median wall time of forward + backward + the method's step (a shared "
        "machine: compare within a table, not across runs).",
        "",
        "## The answers",
        "",
        *_goals(result),
    ]
    if notes:
        lines += ["", notes.strip()]
    lines += [
        "",
        "## Clean runs: the defaults against no clipping",
        "",
        "Medians of the final held-out loss over seeds; the other columns are the methods' "
        "medians.",
        "",
        *_md_table([*CLEAN_COLUMNS, *others], clean_rows(result)),
        "",
        "![clean runs](stability-clean.png)",
        "",
        "## Stress runs at any units: the defaults against the tuned clip",
        "",
        *_md_table([*STRESS_COLUMNS, *others, "none"], stress_rows(result)),
        "",
        "## Mean ranks",
        "",
        *_md_table(RANK_COLUMNS, rank_rows(result)),
        "",
        "Averaged over the units, per scenario (median final score at x1 / x100 / x0.01, and the "
        "mean rank over the three):",
        "",
        *_md_table(UNITS_COLUMNS, units_rows(result)),
        "",
        "## Methods",
        "",
    ]
    lines += [f"* `{m}`: {METHODS[m].label}" for m in result.methods if not is_clip_grid(m)]
    lines += [
        f"* `grid-c`: torch `clip_grad_norm_(c x units)`, c in "
        f"{', '.join(f'{c:g}' for c in CLIP_GRID)}",
        "",
        "Peers that replace the optimizer (AdaGC, SPAM, StableSPAM) run only where the scenario "
        "trains with Adam or AdamW; S1, S2, C1, C3, C5 and C7 use SGD.",
    ]
    for s in result.scenarios:
        sc = SCENARIOS[s]
        if sc.units != 1.0:
            continue  # in the tables above; every run is in stability-runs.json
        lines += ["", f"## {s}: {sc.title}", "", f"*Setup:* {sc.setup}", ""]
        lines += _md_table(COLUMNS, scenario_rows(result, s))
        if len(sc.settings(result.quick)) > 1:
            lines += ["", "The first columns hold LR sensitivity; per LR (median final loss):", ""]
            lines += _lr_table(result, s)
            lines += ["", f"![{s} final loss vs LR](stability-{s}-lr.png)"]
        stops = sorted(
            {f"{r.method}: {r.stopped}" for r in result.runs if r.scenario == s and r.stopped}
        )
        if stops:
            lines += ["", "Stopped runs: " + "; ".join(stops[:8])]
        if sc.suite == "stress":
            lines += ["", f"![{s} loss curves](stability-{s}.png)"]
    return "\n".join(lines) + "\n"


def _lr_table(result: StabilityResult, scenario: str) -> list[str]:
    lrs = [lr for lr in SCENARIOS[scenario].settings(result.quick) if lr is not None]
    rows = []
    for m in result.methods:
        cells = []
        for lr in lrs:
            rs = [r for r in result.runs_of(scenario, m) if r.lr == lr]
            cells.append(_num(median([r.score for r in rs]), 3) if rs else "-")
        if any(c != "-" for c in cells):
            rows.append([m, *cells])
    return _md_table(["method", *(f"lr {lr:g}" for lr in lrs)], rows)


def _meta(result: StabilityResult, command: str) -> dict[str, Any]:
    return {
        "command": command,
        "quick": result.quick,
        "seeds": result.seeds,
        "clean_seeds": result.clean_seeds,
        "methods": result.methods,
        "scenarios": result.scenarios,
        "seconds": result.seconds,
    }


def _write(result: StabilityResult, out: Path, command: str) -> None:
    """stability.md (with the measured notes of :mod:`._stability_notes`) and the runs' JSON."""
    (out / "stability.md").write_text(to_markdown(result, command, NOTES), encoding="utf-8")
    runs = [r.summary() for r in result.runs]
    doc = {"meta": _meta(result, command), "runs": runs}
    (out / "stability-runs.json").write_text(
        json.dumps(doc, indent=1, default=str) + "\n", encoding="utf-8"
    )


def render(out: Path) -> StabilityResult:
    """Write ``out/stability.md`` again from ``out/stability-runs.json`` (no run, no figures):
    after the notes changed, or the tables' layout.

    Example:
        >>> render(Path("docs"))   # doctest: +SKIP
    """
    doc = json.loads((out / "stability-runs.json").read_text(encoding="utf-8"))
    meta = doc["meta"]
    runs = [RunResult(**r, losses=[], positions=[]) for r in doc["runs"]]
    result = StabilityResult(
        quick=meta["quick"],
        seeds=meta["seeds"],
        methods=meta["methods"],
        scenarios=meta["scenarios"],
        runs=runs,
        seconds=meta["seconds"],
        clean_seeds=meta["clean_seeds"],
    )
    _write(result, out, meta["command"])
    return result


def run(
    *,
    seeds: int = 3,
    quick: bool = False,
    out: Path | None = None,
    ticker: Ticker | None = None,
    command: str | None = None,
) -> LabResult:
    """The lab entry point: run the benchmark, write stability.md, figures and JSON to ``out``.

    Returns:
        A :class:`LabResult` whose table is the summary; ``passed`` when gradguard's defaults
        meet their reference (no clipping, the tuned clip) on every scenario.
    """
    result = run_stability(quick=quick, seeds=seeds, ticker=ticker)
    figures: list[str] = []
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        figures = _figures(result, out)
        cmd = command or f"gradguard lab stability{' --quick' if quick else ''} --seeds {seeds}"
        _write(result, out, cmd)
    passed = all(result.verdict(s)[1] for s in result.scenarios)
    return LabResult(
        name="stability",
        title="Stability benchmark: clean runs, stress runs at any units, every peer",
        setup=(
            f"{len(result.scenarios)} scenario settings, {len(result.methods)} methods, "
            f"{seeds} seeds (clean suite {result.clean_seeds}), "
            f"{'quick' if quick else 'full'} run lengths; {len(result.runs)} runs"
        ),
        criterion=(
            "gradguard's defaults are within seed noise of no clipping on every clean run (and "
            "never skip there) and of the tuned clip on every stress run, at any units"
        ),
        columns=SUMMARY_COLUMNS,
        rows=summary_rows(result),
        passed=passed,
        summary=" ".join(_goals(result)),
        figures=figures,
    )
