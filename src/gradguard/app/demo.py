"""``gradguard demo``: the same model trained unguarded and guarded, side by side.

The model is a 10-layer ReLU MLP (Kaiming init) trained with SGD + momentum on a smooth
regression task. The data stream carries the kinds of poison real runs meet: two batches whose
targets are 10,000 times too large (a finite loss spike, like a corrupted shard) and a window of
four batches containing a NaN input (a broken record). The unguarded run applies whatever the
gradients say, so the first spike throws its weights to a non-finite state and it never recovers.
The guarded run is ``gradguard.Guard`` with its defaults (ZClip under a 1.0 cap from step 0, a
loss-spike rule that works from the second step, a divergence detector, skip before roll back
before abort), plus a snapshot every few steps and one incident bundle: it skips the spikes and
the NaN window and ends finite; `gradguard replay` on the bundle names the data as the cause.

Both runs use the same batches (batch ``i`` is drawn from a generator seeded with ``seed`` and
``i``), so they differ only by the guard.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gradguard.app.lab._result import NullTicker, Ticker
from gradguard.app.lab.data import regression
from gradguard.app.lab.models import deep_mlp
from gradguard.core.norms import grad_norms
from gradguard.guard.guard import Guard, GuardConfig
from gradguard.records.recorder import Recorder
from gradguard.records.sinks import JsonlSink, read_jsonl

DESCRIPTION = (
    "A 10-layer ReLU MLP, SGD lr 0.02 momentum 0.9, batch 64, on y = sin(2 x.w) + noise. "
    "Poisoned batches: targets x 1e4 at 27% and 73% of the run, a NaN input in 4 batches in a row "
    "at 50%. Same model, same batches; the only difference is gradguard.Guard."
)
COLUMNS = [
    "run",
    "first non-finite weights",
    "final loss",
    "clips",
    "skips",
    "rollbacks",
    "updates applied",
    "seconds",
]
DEPTH = 10
# The model factory `gradguard replay` needs, written next to the records.
FACTORY = """\"\"\"The demo's model: `gradguard replay BUNDLE --factory demo_model.py:make`.\"\"\"

import math

from gradguard.app.lab.models import deep_mlp


def make():
    return deep_mlp(depth={depth}, gain=math.sqrt(2.0), seed={seed})
"""
LR = 0.02
BATCH = 64


def poison_plan(steps: int) -> dict[int, str]:
    """Which batch positions are poisoned, and how, for a run of ``steps`` steps."""
    nan_start = steps // 2
    return {
        int(steps * 0.27): "outlier",
        **{nan_start + i: "nan" for i in range(4)},
        int(steps * 0.73): "outlier",
    }


def make_batch(
    x: Tensor, y: Tensor, position: int, seed: int, plan: dict[int, str]
) -> tuple[Tensor, Tensor]:
    """Batch number ``position`` of the stream (deterministic), poisoned as ``plan`` says."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + position)
    idx = torch.randint(0, x.shape[0], (BATCH,), generator=g)
    xb, yb = x[idx].clone(), y[idx].clone()
    kind = plan.get(position)
    if kind == "outlier":
        yb = yb * 1e4
    elif kind == "nan":
        xb[0, 0] = math.nan
    return xb, yb


@dataclass
class RunSummary:
    """One run's outcome (host values, read once at the end)."""

    name: str
    first_nonfinite_weights: int | None
    final_loss: float
    clips: int | None
    skips: int | None
    rollbacks: int | None
    applied: int
    seconds: float

    @property
    def diverged(self) -> bool:
        return self.first_nonfinite_weights is not None or not math.isfinite(self.final_loss)

    def row(self) -> list[Any]:
        def opt(v: int | None) -> str:
            return "-" if v is None else str(v)

        first = (
            "never"
            if self.first_nonfinite_weights is None
            else f"step {self.first_nonfinite_weights}"
        )
        return [
            self.name,
            first,
            f"{self.final_loss:.4g}",
            opt(self.clips),
            opt(self.skips),
            opt(self.rollbacks),
            str(self.applied),
            f"{self.seconds:.1f}",
        ]


@dataclass
class DemoResult:
    """Both runs, and where the records and the report went."""

    unguarded: RunSummary
    guarded: RunSummary
    records_path: Path
    unguarded_records_path: Path
    report_path: Path | None
    plan: dict[int, str] = field(default_factory=dict)
    bundles: list[Path] = field(default_factory=list)
    factory: Path | None = None

    @property
    def guarded_ok(self) -> bool:
        """The guarded run stayed finite (the demo's success criterion)."""
        return not self.guarded.diverged

    def table(self) -> list[list[Any]]:
        return [self.unguarded.row(), self.guarded.row()]

    def notes(self) -> list[str]:
        spikes = sorted(p for p, k in self.plan.items() if k == "outlier")
        nans = sorted(p for p, k in self.plan.items() if k == "nan")
        verdict = (
            "the unguarded run diverged and the guarded one did not"
            if self.unguarded.diverged and not self.guarded.diverged
            else "UNEXPECTED: see the table"
        )
        return [
            f"poisoned batches: targets x 1e4 at {spikes}, NaN input at {nans}",
            "final loss: MSE of the final weights on the whole (clean) training set",
            f"result: {verdict}",
        ]


class _Run:
    """One training run that advances one step at a time, so two can run side by side."""

    def __init__(self, *, guarded: bool, steps: int, seed: int, out: Path, plan: dict[int, str]):
        self.guarded = guarded
        self.steps = steps
        self.seed = seed
        self.plan = plan
        self.x, self.y = regression(n=2048, seed=seed)
        self.model = deep_mlp(depth=DEPTH, gain=math.sqrt(2.0), seed=seed)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=LR, momentum=0.9)
        path = out / ("records.jsonl" if guarded else "unguarded.jsonl")
        if path.exists():
            path.unlink()
        self.path = path
        self.recorder = Recorder(sinks=[JsonlSink(path)], flush_every=50)
        self.guard: Guard | None = None
        if guarded:
            # The defaults, plus snapshots (off by default: a copy of the state costs memory)
            # and one incident bundle, for `gradguard replay` (docs/replay.md).
            config = GuardConfig(
                snapshot_every=max(5, steps // 20),
                incident_dir=str(out / "incidents"),
                incident_max=1,
            )
            self.guard = Guard(self.model, self.opt, config=config, recorder=self.recorder)
        self.iterations = 0
        self.finite: list[Tensor] = []  # weights finite after each iteration, read at the end
        self.seconds = 0.0

    @property
    def done(self) -> bool:
        progress = self.guard.step_count if self.guard is not None else self.iterations
        # a guarded run replays the steps a rollback undid; bound the total work anyway
        return progress >= self.steps or self.iterations >= 2 * self.steps

    @property
    def progress(self) -> int:
        return self.guard.step_count if self.guard is not None else self.iterations

    def step(self) -> None:
        t0 = time.perf_counter()
        position = self.guard.position if self.guard is not None else self.iterations
        xb, yb = make_batch(self.x, self.y, position, self.seed, self.plan)
        loss = nn.functional.mse_loss(self.model(xb), yb)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.guard is not None:
            self.guard.step(loss, batch=(xb, yb))
        else:
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            total = grad_norms(grads).total
            self.recorder.log(self.iterations, loss=loss.detach(), grad_norm=total, action="step")
            self.opt.step()
        with torch.no_grad():
            self.finite.append(
                torch.stack([p.isfinite().all() for p in self.model.parameters()]).all()
            )
        self.iterations += 1
        self.seconds += time.perf_counter() - t0

    def summary(self) -> RunSummary:
        if self.guard is not None:
            self.guard.flush()
        self.recorder.close()
        finite = torch.stack(self.finite).tolist()
        first_bad = next((i for i, ok in enumerate(finite) if not ok), None)
        with torch.no_grad():
            final = float(nn.functional.mse_loss(self.model(self.x), self.y))
        clips = skips = rollbacks = None
        applied = self.iterations
        if self.guard is not None:
            rows = read_jsonl(self.path)  # the sink holds the whole run; memory a window
            steps = [r for r in rows if r["kind"] == "step"]
            clips = sum(bool(r.get("clipped")) for r in steps)
            skips = sum(r.get("action") in ("skip", "backoff") for r in steps)
            # one rollback may log more than one action row: count the steps it happened on
            rollbacks = len(
                {r["step"] for r in rows if r["kind"] == "action" and r.get("action") == "rollback"}
            )
            applied = sum(r.get("action") in ("step", "clip") for r in steps)
        return RunSummary(
            name="guarded (gradguard.Guard)" if self.guarded else "unguarded (plain SGD)",
            first_nonfinite_weights=first_bad,
            final_loss=final,
            clips=clips,
            skips=skips,
            rollbacks=rollbacks,
            applied=applied,
            seconds=self.seconds,
        )


def run(
    *,
    out: Path = Path("gradguard-report"),
    steps: int = 300,
    seed: int = 0,
    tickers: tuple[Ticker, Ticker] | None = None,
    report: bool = True,
) -> DemoResult:
    """Train unguarded and guarded in lockstep; write records and the HTML report.

    Args:
        out: output folder (``records.jsonl``: the guarded run, ``unguarded.jsonl``,
            ``report.html``).
        steps: steps per run (>= 20, so that the poison plan fits after the warm-up).
        seed: seeds the data, the initialization and the batch order.
        tickers: progress callbacks for the unguarded and the guarded run.
        report: build the HTML report (needs matplotlib).

    Returns:
        A :class:`DemoResult`.

    Example:
        >>> result = run(out=Path("/tmp/demo"), steps=120)
        >>> result.unguarded.diverged, result.guarded.diverged
        (True, False)
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 20:
        raise ValueError(f"steps must be an int >= 20, got {steps!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    for old in (out / "incidents").glob("incident-*.pt"):
        old.unlink()  # a rerun's bundles only
    factory = out / "demo_model.py"
    factory.write_text(FACTORY.format(depth=DEPTH, seed=seed))
    plan = poison_plan(steps)
    torch.manual_seed(seed)
    runs = (
        _Run(guarded=False, steps=steps, seed=seed, out=out, plan=plan),
        _Run(guarded=True, steps=steps, seed=seed, out=out, plan=plan),
    )
    tick = tickers or (NullTicker(), NullTicker())
    for t, r in zip(tick, runs):
        t.start("unguarded (plain SGD)" if not r.guarded else "guarded (gradguard.Guard)", steps)
    while not all(r.done for r in runs):
        for t, r in zip(tick, runs):
            if not r.done:
                before = r.progress
                r.step()
                # a rollback moves progress backwards; the bar shows steps kept
                t.advance(r.progress - before)
    unguarded, guarded = (r.summary() for r in runs)
    report_path: Path | None = None
    if report:
        from gradguard.records.sinks import read_jsonl
        from gradguard.report import build_report

        report_path = build_report(
            read_jsonl(runs[1].path), out / "report.html", title="gradguard demo: the guarded run"
        )
    return DemoResult(
        unguarded=unguarded,
        guarded=guarded,
        records_path=runs[1].path,
        unguarded_records_path=runs[0].path,
        report_path=report_path,
        plan=plan,
        bundles=sorted((out / "incidents").glob("incident-*.pt")),
        factory=factory,
    )
