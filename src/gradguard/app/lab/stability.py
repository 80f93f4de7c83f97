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

from gradguard.app.lab._methods import (
    CLIP,
    METHODS,
    ROLLBACK,
    SKIP,
    Stopped,
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
from gradguard.app.lab._plot import figure
from gradguard.app.lab._result import LabResult, NullTicker, Ticker, fmt
from gradguard.app.lab._scenarios import SCENARIOS, Problem

__all__ = ["METHODS", "SCENARIOS", "RunResult", "StabilityResult", "run", "run_one"]

DEFAULTS = "gradguard-defaults"
NOISE_FLOOR = 0.01  # "within noise" never narrower than 1% of the best value


@dataclass
class RunResult:
    """One seeded run of one method on one scenario setting.

    Attributes:
        scenario, method, seed, lr: what ran (``lr``: the optimizer's base learning rate).
        initial_loss, final_loss: held-out loss before and after training (``nan``: non-finite).
        diverged: stopped, non-finite final loss, or final loss above the initial one.
        stopped: why the method stopped the run early (``""``: it did not).
        steps: forward-backward passes done.
        clips, skips, rollbacks: what the method did (``clips`` is ``None`` where the method
            clips inside its own optimizer and does not say).
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
    trace = _Trace([], [], [], {CLIP: 0, SKIP: 0, ROLLBACK: 0}, "", initial, math.nan)
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
        scenario: ``"S1"`` ... ``"S7"``.
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
    if spec.replaces_optimizer and problem.optimizer != "adamw":
        raise ValueError(f"{method} replaces AdamW; {scenario} trains with {problem.optimizer}")
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
        )

    def best_clip(self, scenario: str) -> str | None:
        """The torch clip threshold with the lowest median score on ``scenario`` (oracle)."""
        cells = [self.cell(scenario, m) for m in self.methods if is_clip_grid(m)]
        ok = [c for c in cells if c is not None]
        return min(ok, key=lambda c: c.median).method if ok else None

    def verdict(self, scenario: str, method: str = DEFAULTS) -> tuple[str, bool]:
        """How ``method`` compares with the best method on ``scenario``'s headline metric.

        Within noise: ``median(method) <= median(best) + noise`` with ``noise`` the best's seed
        spread (max - min), at least 1% of the best's median.
        """
        mine = self.cell(scenario, method)
        cells = [c for c in (self.cell(scenario, m) for m in self.methods) if c is not None]
        if mine is None or not cells:
            return "not run", True
        best = min(cells, key=lambda c: c.median)
        noise = max(spread(best.score), NOISE_FLOOR * abs(best.median))
        gap = mine.median - best.median
        if best.method == method or gap <= 0:
            return "best", True
        if gap <= noise:
            return f"within noise of {best.method} (+{gap:.3g} <= {noise:.3g})", True
        return f"LOSES to {best.method} by {gap:.3g} (noise {noise:.3g})", False


def run_stability(
    *,
    quick: bool = True,
    seeds: int = 3,
    methods: Sequence[str] | None = None,
    scenarios: Sequence[str] | None = None,
    workers: int | None = None,
    steps: int | None = None,
    ticker: Ticker | None = None,
) -> StabilityResult:
    """Run every (scenario, setting, method, seed).

    Args:
        quick: short runs and the small clip grid (about 5 minutes on 2 cores).
        seeds: seeds per setting (medians are over these).
        methods: keys of :data:`METHODS` (``None``: :func:`default_methods`).
        scenarios: keys of :data:`SCENARIOS` (``None``: all).
        workers: processes (``None``: up to 2; each pins torch to one thread).
        steps: override every run's length (a smoke test).
        ticker: progress callbacks.

    Returns:
        A :class:`StabilityResult`.
    """
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds must be an int >= 1, got {seeds!r}")
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
        adamw = build_problem(s, 0, quick).optimizer == "adamw"
        for lr in SCENARIOS[s].settings(quick):
            for m in methods:
                if METHODS[m].replaces_optimizer and not adamw:
                    continue
                jobs += [(s, m, seed, quick, lr, steps) for seed in range(seeds)]
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
    )


# -- tables, figures, markdown -----------------------------------------------------------------

COLUMNS = [
    "method", "final loss (median)", "seeds", "diverged", "spike score", "recover (steps)",
    "fault cost", "clip rate", "skips", "rollbacks", "ms/step",
]  # fmt: skip


def _num(x: float | None, digits: int = 4) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and math.isinf(x):
        return "never" if x > 0 else "-inf"
    if isinstance(x, float) and math.isnan(x):
        return "nan"
    return fmt(float(x), digits)


def scenario_rows(result: StabilityResult, scenario: str) -> list[list[str]]:
    """One row per method (skipped where it did not run), plus the grid's best clip."""
    rows: list[list[str]] = []
    best_clip = result.best_clip(scenario)
    for m in result.methods:
        c = result.cell(scenario, m)
        if c is None:
            continue
        name = m + (" (grid best)" if m == best_clip else "")
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
    if family == "baseline":
        return {"color": color, "linewidth": 1.2, "linestyle": ":"}
    return {"color": color, "linewidth": 0.9, "linestyle": "-"}


def _figures(result: StabilityResult, out: Path) -> list[str]:
    paths: list[str] = []
    every = result.methods
    for s in result.scenarios:
        grid_best = result.best_clip(s)
        shown = [m for m in every if not is_clip_grid(m) or m in ("clip-1", grid_best)]
        lrs = SCENARIOS[s].settings(result.quick)
        lr = lrs[-2] if len(lrs) > 1 else lrs[0]  # the sweep's curves: where instability shows
        path = out / f"stability-{s}.png"
        with figure(path, width=7.0, height=3.8) as ax:
            for m in shown:
                runs = [
                    r
                    for r in result.runs_of(s, m)
                    if r.seed == 0 and (lr is None or math.isclose(r.lr, lr))
                ]
                if not runs:
                    continue
                curve = runs[0].losses
                xs = [i for i, v in enumerate(curve) if math.isfinite(v)]
                ys = [curve[i] for i in xs]
                ax.plot(xs, ys, label=m, **_style(every, m))
            ax.set_yscale("log")
            ax.set_xlabel("step")
            ax.set_ylabel("training loss (log; non-finite not drawn)")
            at = f", lr {lr:g}" if lr is not None else ""
            ax.set_title(f"{s}: {SCENARIOS[s].title} (seed 0{at})", fontsize=9)
            ax.legend(fontsize=6, ncol=2)
        paths.append(str(path))
    for s in result.scenarios:
        lrs = SCENARIOS[s].settings(result.quick)
        if lrs[0] is None:
            continue
        grid_best = result.best_clip(s)
        shown = [m for m in every if not is_clip_grid(m) or m in ("clip-1", grid_best)]
        path = out / f"stability-{s}-lr.png"
        with figure(path, width=7.0, height=3.8) as ax:
            for m in shown:
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
    return paths


def _md_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]
    return lines


def summary_rows(result: StabilityResult) -> list[list[str]]:
    """Per scenario: the best method, gradguard's defaults and best config, torch clip(1)."""
    rows = []
    for s in result.scenarios:
        cells = [c for c in (result.cell(s, m) for m in result.methods) if c is not None]
        if not cells:
            continue
        best = min(cells, key=lambda c: c.median)
        d = result.cell(s, DEFAULTS)
        verdict, _ = result.verdict(s)
        rows.append(
            [
                s,
                "LR sensitivity" if len(SCENARIOS[s].settings(result.quick)) > 1 else "final loss",
                f"{best.method} {_num(best.median)}",
                _num(d.median) if d else "-",
                _num(c.median) if (c := result.cell(s, "gradguard-best")) else "-",
                _num(c.median) if (c := result.cell(s, "clip-1")) else "-",
                verdict,
                _spike_verdict(result, s),
                clean_check(result, s),
            ]
        )
    return rows


def _spike_verdict(result: StabilityResult, scenario: str) -> str:
    cells = [c for c in (result.cell(scenario, m) for m in result.methods) if c is not None]
    mine = result.cell(scenario, DEFAULTS)
    if mine is None:
        return "-"
    lowest = min(c.spike for c in cells)
    if mine.spike <= lowest:
        return f"{mine.spike:.3f}, lowest"
    best = sorted(c.method for c in cells if c.spike == lowest)
    more = f" +{len(best) - 1}" if len(best) > 1 else ""
    return f"{mine.spike:.3f} vs {lowest:.3f} ({best[0]}{more})"


def clean_check(result: StabilityResult, scenario: str, method: str = DEFAULTS) -> str:
    """On a fault-free scenario (S6, S7): no skips or rollbacks, and a final loss no worse than
    no clipping beyond noise (no clipping's seed spread, at least 1%); the clip rate."""
    if not SCENARIOS[scenario].clean:
        return "-"
    mine, none = result.cell(scenario, method), result.cell(scenario, "none")
    if mine is None or none is None:
        return "-"
    noise = max(spread(none.score), NOISE_FLOOR * abs(none.median))
    worse = mine.median - none.median
    ok = mine.skips == 0 and mine.rollbacks == 0 and worse <= noise
    rate = "internal" if mine.clip_rate is None else f"{mine.clip_rate:.0%}"
    return (
        f"{'ok' if ok else 'FAILS'}: skips {_num(mine.skips)}, rollbacks {_num(mine.rollbacks)}, "
        f"clip rate {rate}, {worse:+.3g} vs none (noise {noise:.2g})"
    )


def _why(result: StabilityResult, scenario: str) -> str:
    """What the defaults did against what the winner did, in numbers (the closing note)."""
    mine = result.cell(scenario, DEFAULTS)
    cells = [c for c in (result.cell(scenario, m) for m in result.methods) if c is not None]
    if mine is None or not cells:
        return ""
    best = min(cells, key=lambda c: c.median)

    def did(c: Cell) -> str:
        rate = "internal clipping" if c.clip_rate is None else f"clip rate {c.clip_rate:.0%}"
        return (
            f"{rate}, {_num(c.skips)} skips, {_num(c.rollbacks)} rollbacks, "
            f"{c.diverged:.0%} diverged"
        )

    stops = sorted({r.stopped for r in result.runs_of(scenario, DEFAULTS) if r.stopped})
    text = f"defaults: {did(mine)}; {best.method}: {did(best)}"
    if stops:
        text += f"; the defaults stopped: {stops[0]}"
    return text


SUMMARY_COLUMNS = [
    "scenario", "metric", "best method (median)", "gradguard defaults", "gradguard best",
    "torch clip 1.0", "defaults vs best", "defaults' spike score", "clean-run check",
]  # fmt: skip


def to_markdown(result: StabilityResult, command: str) -> str:
    """docs/stability.md: definitions, the summary, one table and figure per scenario."""
    mode = "quick" if result.quick else "full"
    lines = [
        f"<!-- generated by: {command} -->",
        "",
        "# Stability benchmark",
        "",
        f"`{command}` ({mode}: {result.seeds} seeds, {len(result.runs)} runs, "
        f"{result.seconds / 60:.1f} min wall on {os.cpu_count()} cores, one torch thread per run). "
        "Every method gets the same forward-backward passes on the same batches; a rollback "
        "spends some of them replaying.",
        "",
        "## Definitions",
        "",
        "* **final loss**: held-out loss at the end (fixed held-out batches, no faults); a "
        "non-finite one ranks last (`never`). Medians over seeds; per-seed values are listed.",
        "* **LR sensitivity** (S3): per seed, mean over the swept LRs of min(final loss, "
        "initial loss) (Wortsman et al. 2023, arXiv 2309.14322); then the median over seeds.",
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
        "* A run the method **stopped** (gradguard's abort) counts as `never` in the final loss "
        "(the user gets no finished run); its weights' loss is still in `stability-runs.json`.",
        "* **clip rate**: fraction of steps whose gradients the method shrank (`internal`: the "
        "optimizer clips inside and does not say); **skips / rollbacks**: medians per run.",
        "* **ms/step**: median wall time of forward + backward + the method's step (a shared "
        "machine: compare within a table, not across runs).",
        "* **clean-run check** (S6, S7): no skips or rollbacks, and a final loss at most no "
        "clipping's plus its seed spread (at least 1%).",
        "* **within noise**: gradguard's defaults' median is at most the best method's median "
        f"plus the best's seed spread (max - min over seeds), that spread at least "
        f"{NOISE_FLOOR:.0%} of the best's median.",
        "* **grid best**: the torch `clip_grad_norm_` threshold with the lowest median on that "
        "scenario, chosen on the same seeds (an oracle no user has in advance).",
        "",
        "## Summary: where gradguard's defaults stand",
        "",
        *_md_table(SUMMARY_COLUMNS, summary_rows(result)),
        "",
        _closing(result),
        "",
        "## Methods",
        "",
    ]
    lines += [f"* `{m}`: {METHODS[m].label}" for m in result.methods]
    lines += [
        "",
        "Peers that replace the optimizer (AdaGC, SPAM, StableSPAM) run only where the scenario "
        "trains with AdamW; S1 and S2 use SGD.",
    ]
    for s in result.scenarios:
        sc = SCENARIOS[s]
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


def _closing(result: StabilityResult) -> str:
    """The verdict against the benchmark's goal (gradguard's defaults best or within noise of the
    best on every scenario), with what the defaults did where they lose."""
    losses = [s for s in result.scenarios if not result.verdict(s)[1]]
    clean = [s for s in result.scenarios if clean_check(result, s).startswith("FAILS")]
    spiky = [s for s in result.scenarios if not _spike_verdict(result, s).endswith("lowest")]
    if not losses and not clean:
        head = (
            "**Goal met on the headline metric**: gradguard's defaults are best or within noise "
            "of the best on every scenario run."
        )
    else:
        parts = [f"{s} ({result.verdict(s)[0]})" for s in losses]
        parts += [f"{s} clean-run check ({clean_check(result, s)})" for s in clean]
        head = "**Goal not met.** gradguard's defaults lose on: " + "; ".join(parts) + "."
    lines = [head]
    if spiky:
        lines.append(
            "Spike score not the lowest on: "
            + "; ".join(f"{s} ({_spike_verdict(result, s)})" for s in spiky)
            + "."
        )
    if losses:
        lines.append("")
        lines.append("Where they lose, what each did (medians per run):")
        lines.append("")
        lines += [f"* {s}: {_why(result, s)}" for s in losses]
    return "\n".join(lines)


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
        A :class:`LabResult` whose table is the summary; ``passed`` when gradguard's defaults are
        best or within noise of the best on every scenario.
    """
    result = run_stability(quick=quick, seeds=seeds, ticker=ticker)
    figures: list[str] = []
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        figures = _figures(result, out)
        cmd = command or f"gradguard lab stability{' --quick' if quick else ''} --seeds {seeds}"
        (out / "stability.md").write_text(to_markdown(result, cmd), encoding="utf-8")
        (out / "stability-runs.json").write_text(
            json.dumps([r.summary() for r in result.runs], indent=1, default=str) + "\n",
            encoding="utf-8",
        )
    passed = all(result.verdict(s)[1] for s in result.scenarios)
    sc = result.scenarios
    return LabResult(
        name="stability",
        title="Stability benchmark: every method on scenarios S1-S7",
        setup=(
            f"{len(sc)} scenarios, {len(result.methods)} methods, {seeds} seeds, "
            f"{'quick' if quick else 'full'} run lengths; {len(result.runs)} runs"
        ),
        criterion=(
            "gradguard's defaults are best or within seed noise of the best on every scenario "
            "(final held-out loss; S3: LR sensitivity)"
        ),
        columns=SUMMARY_COLUMNS,
        rows=summary_rows(result),
        passed=passed,
        summary=_closing(result).splitlines()[0],
        figures=figures,
    )
