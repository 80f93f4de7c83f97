"""Lab: transformer instabilities and their remedies (``gradguard lab transformer``).

On the stability benchmark's tiny char-GPT (scenario S3 of :mod:`gradguard.app.lab._scenarios`:
2 pre-norm layers, width 32, 4 heads, AdamW betas (0.9, 0.95), warm-up over 10% of the steps):

1. **LR sweep** (Wortsman et al. 2023, arXiv 2309.14322): every learning rate with no remedy
   and with each remedy of :mod:`gradguard.insight.transformer_remedies` (qk-layernorm, z-loss,
   QK-clip, output soft-capping); final held-out loss against the LR, and the LR sensitivity
   ``mean over LRs of min(final, initial) - best`` (lower: more robust).
2. **attention logits over time**: the max attention logit of each remedy at a high LR.
3. **early warning**: the step each detector of :mod:`gradguard.insight.telemetry` first warns
against
   the step the loss spikes (its loss ``SPIKE_NATS`` above the lowest so far), on the runs
   without remedy; and how often each warns on clean runs (normal LRs, and the healthy
   scenarios S6 and S7).

Each run is seeded and runs on one CPU thread; the detectors only watch (they never act), so a
run's numbers do not depend on them.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from gradguard.app.lab._metrics import lr_sensitivity
from gradguard.app.lab._plot import figure
from gradguard.app.lab._result import LabResult, NullTicker, Ticker, fmt
from gradguard.app.lab._scenarios import GPT, SCENARIOS, Problem
from gradguard.core.norms import get_total_norm
from gradguard.decide.attention import (
    AttentionLogitDetector,
    LogZDetector,
    PreconditionerLagDetector,
)
from gradguard.decide.detect import Detector, Signals
from gradguard.insight.telemetry import AttentionTelemetry
from gradguard.insight.transformer_remedies import QKClip, add_logit_softcap, insert_qk_norm, z_loss

__all__ = ["REMEDIES", "Run", "run", "run_one"]

REMEDIES = ("none", "qk-layernorm", "z-loss", "qk-clip", "soft-cap")
TAU = 30.0  # QK-clip's cap on this model (head dim 8: a logit of 30 is a near one-hot softmax)
CAP = 30.0  # Gemma 2's output soft-cap
SPIKE_NATS = 1.0  # a loss spike: the training loss this far above the lowest loss so far
SPIKE_AFTER = 10  # ... not counted in the first steps, where the loss falls from log(vocab)
DETECTORS = ("attn_logit", "logz", "adam_lag")
LRS = {True: (3e-3, 3e-2, 3e-1, 1.0), False: SCENARIOS["S3"].lrs[1]}
WARN_LRS = {True: (3e-1, 1.0), False: (1e-1, 3e-1, 1.0)}  # lead-time runs
WARN_STEPS = {True: 100, False: 400}
NORMAL_LR = 1e-2  # at or below: a normal LR, where a warning is a false alarm
MIN_LEAD = 10  # the criterion's least lead time, in steps


@dataclass
class Run:
    """One seeded training run of the tiny char-GPT.

    Attributes:
        scenario, remedy, lr, seed, steps: what ran.
        initial, final: held-out loss before and after training (``inf`` when non-finite).
        losses: training loss per step.
        max_logits: max attention logit per step (all layers and heads).
        logz: max output-logit ``log Z`` per step.
        warnings: detector -> steps it flagged.
        spike: the first loss-spike step (``None``: none).
        seconds: wall time.
    """

    scenario: str
    remedy: str
    lr: float
    seed: int
    steps: int
    initial: float
    final: float
    losses: list[float]
    max_logits: list[float]
    logz: list[float]
    warnings: dict[str, list[int]] = field(default_factory=dict)
    spike: int | None = None
    seconds: float = 0.0

    def first(self, detector: str) -> int | None:
        hits = self.warnings.get(detector, [])
        return hits[0] if hits else None


def spike_step(
    losses: list[float], nats: float = SPIKE_NATS, after: int = SPIKE_AFTER
) -> int | None:
    """The first step (from ``after``) whose loss is non-finite or ``nats`` above the lowest
    loss before it; ``None`` when there is none.

    Example:
        >>> spike_step([4, 3, 2.5] + [2.5] * 10 + [3.6])
        13
    """
    best = math.inf
    for i, x in enumerate(losses):
        if i >= after and (not math.isfinite(x) or x > best + nats):
            return i
        if math.isfinite(x):
            best = min(best, x)
    return None


def _detectors(tel: AttentionTelemetry, opt: torch.optim.Optimizer) -> dict[str, Detector]:
    return {
        "attn_logit": AttentionLogitDetector(tel),
        "logz": LogZDetector(tel),
        "adam_lag": PreconditionerLagDetector(opt),
    }


def run_one(
    remedy: str = "none",
    lr: float | None = None,
    seed: int = 0,
    *,
    quick: bool = True,
    scenario: str = "S3",
    steps: int | None = None,
) -> Run:
    """Train the tiny char-GPT of ``scenario`` once with ``remedy``; seconds on one thread.

    Args:
        remedy: one of :data:`REMEDIES`.
        lr: the peak learning rate (``None``: the scenario's).
        seed: model init and data order.
        quick: the scenario's quick run length.
        scenario: ``"S3"`` (the LR sweep), or the clean ``"S6"``/``"S7"``.
        steps: override the run length.

    Returns:
        A :class:`Run`; deterministic for the same arguments (except ``seconds``).
    """
    if remedy not in REMEDIES:
        raise ValueError(f"remedy must be one of {', '.join(REMEDIES)}, got {remedy!r}")
    torch.set_num_threads(1)
    problem: Problem = SCENARIOS[scenario].build(seed, quick, lr)
    if steps is not None:
        problem.steps = steps
    model = problem.model
    if remedy == "qk-layernorm":
        model = insert_qk_norm(model)
    elif remedy == "soft-cap":
        model = add_logit_softcap(model, CAP, output="out")
    opt = problem.make_optimizer(list(model.parameters()))
    sched = problem.make_scheduler(opt)
    tel = AttentionTelemetry(model, output="out")
    clip = QKClip(tel, TAU) if remedy == "qk-clip" else None
    dets = _detectors(tel, opt)
    initial = problem.heldout(model)
    rec: list[Tensor] = []
    t0 = time.perf_counter()
    for step in range(problem.steps):
        x, y = problem.batch(step)
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        objective = loss + z_loss(logits) if remedy == "z-loss" else loss
        objective.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        total = get_total_norm(grads).float()
        s = Signals(step, total, [], [], total.isfinite(), loss.detach())
        flags = []
        for d in dets.values():
            flags.append(d.check(s).flag)
            d.update(s, s.finite)  # watch only: every finite step is "accepted"
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if clip is not None:
            clip()
        top = tel.max_logit()
        lz = tel.logz_max
        rec.append(
            torch.stack(
                [
                    loss.detach().float(),
                    top if top is not None else torch.tensor(math.nan),
                    lz if lz is not None else torch.tensor(math.nan),
                    *(f.float() for f in flags),
                ]
            )
        )
    seconds = time.perf_counter() - t0
    tel.remove()
    final = problem.heldout(model)
    table = torch.stack(rec).tolist() if rec else []  # one host read per run
    losses = [r[0] for r in table]
    warnings = {
        name: [i for i, r in enumerate(table) if r[3 + k] > 0] for k, name in enumerate(dets)
    }
    return Run(
        scenario=scenario,
        remedy=remedy,
        lr=problem.lr,
        seed=seed,
        steps=problem.steps,
        initial=initial,
        final=final if math.isfinite(final) else math.inf,
        losses=losses,
        max_logits=[r[1] for r in table],
        logz=[r[2] for r in table],
        warnings=warnings,
        spike=spike_step(losses),
        seconds=seconds,
    )


# ---------------------------------------------------------------------------------- tables


def _sweep_rows(
    runs: list[Run], lrs: tuple[float, ...]
) -> tuple[list[list[Any]], dict[str, float]]:
    rows: list[list[Any]] = []
    sens: dict[str, float] = {}
    sweep = [r for r in runs if r.scenario == "S3"]
    best = min((r.final for r in sweep), default=math.nan)
    for remedy in REMEDIES:
        finals, initials = [], []
        cells: list[Any] = [remedy]
        for lr in lrs:
            mine = [r for r in sweep if r.remedy == remedy and r.lr == lr]
            f = statistics.median(r.final for r in mine) if mine else math.nan
            finals.append(f)
            initials.append(statistics.median(r.initial for r in mine) if mine else math.nan)
            cells.append(fmt(f, 3))
        s = lr_sensitivity(finals, initials) - best
        sens[remedy] = s
        top = max((max(r.max_logits) for r in sweep if r.remedy == remedy), default=math.nan)
        rows.append([*cells, fmt(min(finals), 3), fmt(s, 3), fmt(top, 3)])
    return rows, sens


def _lead_rows(runs: list[Run]) -> tuple[list[list[Any]], dict[str, list[int]]]:
    rows: list[list[Any]] = []
    leads: dict[str, list[int]] = {d: [] for d in DETECTORS}
    for r in runs:
        if r.scenario != "S3w":
            continue
        cells: list[Any] = [fmt(r.lr), r.seed, "-" if r.spike is None else r.spike]
        for d in DETECTORS:
            w = r.first(d)
            lead = None if w is None or r.spike is None or w > r.spike else r.spike - w
            if lead is not None:
                leads[d].append(lead)
            cells.append("-" if w is None else f"{w} (lead {lead})" if lead is not None else str(w))
        rows.append(cells)
    return rows, leads


def _warned_before(r: Run, detector: str) -> bool:
    w = r.first(detector)
    return w is not None and r.spike is not None and w <= r.spike


def _false_alarms(runs: list[Run]) -> tuple[int, dict[str, int]]:
    clean = [
        r for r in runs
        if r.remedy == "none" and (r.scenario in ("S6", "S7") or r.lr <= NORMAL_LR)
    ]  # fmt: skip
    steps = sum(r.steps for r in clean)
    return steps, {d: sum(len(r.warnings.get(d, [])) for r in clean) for d in DETECTORS}


# ---------------------------------------------------------------------------------- figures


def _figures(runs: list[Run], lrs: tuple[float, ...], out: Path) -> list[str]:
    paths = []
    sweep = [r for r in runs if r.scenario == "S3"]
    p = out / "transformer-lr-sweep.png"
    with figure(p) as ax:
        for remedy in REMEDIES:
            ys = []
            for lr in lrs:
                mine = [r.final for r in sweep if r.remedy == remedy and r.lr == lr]
                ys.append(statistics.median(mine) if mine else math.nan)
            ax.plot(lrs, [min(y, 6.0) for y in ys], marker="o", label=remedy)
        ax.set_xscale("log")
        ax.set_xlabel("peak learning rate")
        ax.set_ylabel("final held-out loss (capped at 6)")
        ax.set_title("tiny char-GPT: final loss vs learning rate")
        ax.legend(fontsize=8)
    paths.append(str(p))
    high = lrs[-2] if len(lrs) > 1 else lrs[-1]  # the top LR diverges whatever the remedy
    p = out / "transformer-max-logit.png"
    with figure(p) as ax:
        for remedy in REMEDIES:
            at_high = [r for r in sweep if r.remedy == remedy and r.lr == high and r.seed == 0]
            if at_high:
                ax.plot(at_high[0].max_logits, label=f"{remedy}, lr {high:g}")
        normal = [r for r in sweep if r.remedy == "none" and r.lr <= NORMAL_LR and r.seed == 0]
        if normal:
            ref = max(normal, key=lambda r: r.lr)
            ax.plot(ref.max_logits, "k--", label=f"none, lr {ref.lr:g}")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("max attention logit")
        ax.set_title("attention-logit growth")
        ax.legend(fontsize=8)
    paths.append(str(p))
    return paths


# ------------------------------------------------------------------------------------ run


def run(
    *,
    seeds: int = 1,
    quick: bool = False,
    out: Path | None = None,
    ticker: Ticker | None = None,
    command: str = "gradguard lab transformer",
) -> LabResult:
    """The LR sweep with each remedy, the logit figure and the early-warning tables.

    Args:
        seeds: seeds of the sweep (the lead-time LRs get ``seeds + 2``, the clean scenarios
            ``seeds + 1`` quick / 12 full).
        quick: 150-step runs over 4 LRs (a few minutes on 2 cores); else 400 steps over 7.
        out: folder for ``transformer.md``, the figures and ``transformer-runs.json``.
        ticker: progress callbacks.
        command: the command line written into the markdown.

    Returns:
        A :class:`~gradguard.app.lab.LabResult`.
    """
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds must be an int >= 1, got {seeds!r}")
    ticker = ticker or NullTicker()
    lrs = LRS[quick]
    jobs: list[tuple[str, str, float | None, int]] = [
        ("S3", remedy, lr, seed) for lr in lrs for remedy in REMEDIES for seed in range(seeds)
    ]
    # Lead times on the full S3 setting (warm-up over 40 steps, as the stability benchmark's
    # full run): the quick setting's 15-step warm-up diverges at LR 1 within 10 steps.
    jobs += [("S3w", "none", lr, s) for lr in WARN_LRS[quick] for s in range(seeds + 2)]
    clean_seeds = seeds + 1 if quick else 12  # full: over 10,000 clean steps in all
    jobs += [(sc, "none", None, s) for sc in ("S6", "S7") for s in range(clean_seeds)]
    ticker.start("transformer runs", len(jobs))
    t0 = time.perf_counter()
    runs: list[Run] = []
    for scenario, remedy, lr, seed in jobs:
        if scenario == "S3w":
            r = run_one(remedy, lr, seed, quick=False, steps=WARN_STEPS[quick])
            r.scenario = "S3w"
        else:
            r = run_one(remedy, lr, seed, quick=quick, scenario=scenario)
        runs.append(r)
        ticker.advance()
    seconds = time.perf_counter() - t0
    sweep_rows, sens = _sweep_rows(runs, lrs)
    lead_rows, leads = _lead_rows(runs)
    clean_steps, alarms = _false_alarms(runs)
    attn = leads["attn_logit"]
    spiking = [r for r in runs if r.scenario == "S3w" and r.spike is not None]
    missed = [r for r in spiking if not _warned_before(r, "attn_logit")]
    passed = (
        sens["qk-layernorm"] < sens["none"]
        and bool(attn)
        and not missed
        and min(attn) >= MIN_LEAD
        and alarms["attn_logit"] == 0
    )
    steps = 150 if quick else 400
    summary = (
        f"LR sensitivity none {sens['none']:.3f}, qk-layernorm {sens['qk-layernorm']:.3f}, "
        f"z-loss {sens['z-loss']:.3f}, QK-clip {sens['qk-clip']:.3f}, soft-cap "
        f"{sens['soft-cap']:.3f}; attention-logit warning lead "
        f"{'-' if not attn else f'{min(attn)}-{max(attn)} (median {statistics.median(attn):g})'} "
        f"steps over {len(spiking)} spiking runs ({len(missed)} missed); false alarms in "
        f"{clean_steps} clean steps: " + ", ".join(f"{d} {alarms[d]}" for d in DETECTORS)
    )
    result = LabResult(
        name="transformer",
        title="attention-logit growth and its remedies on a tiny char-GPT",
        setup=(
            f"{GPT}, then constant; {steps} steps, batch 16; peak LRs {', '.join(map(fmt, lrs))}; "
            f"remedies: qk-layernorm, z-loss 1e-4, QK-clip tau {TAU:g}, output soft-cap "
            f"{CAP:g}; detectors with their defaults, watching only; a spike is a training loss "
            f"{SPIKE_NATS:g} nat above the lowest so far (after step {SPIKE_AFTER})"
        ),
        criterion=(
            "qk-layernorm lowers the LR sensitivity; the attention-logit detector warns at "
            f"least {MIN_LEAD} steps before every loss spike without remedy (20 is the aim; at "
            "LR 1 the run diverges 20-30 steps in, from logits that are normal at init), "
            "and never on clean runs"
        ),
        columns=["remedy", *(f"lr {fmt(lr)}" for lr in lrs), "best", "LR sensitivity", "max logit"],
        rows=sweep_rows,
        passed=passed,
        summary=summary,
    )
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        result.figures = _figures(runs, lrs, out)
        _write(out, result, runs, lead_rows, clean_steps, alarms, seconds, command)
    return result


def _write(
    out: Path,
    result: LabResult,
    runs: list[Run],
    lead_rows: list[list[Any]],
    clean_steps: int,
    alarms: dict[str, int],
    seconds: float,
    command: str,
) -> None:
    lines = [f"<!-- generated by: {command} -->", "", result.to_markdown(seconds), ""]
    lines += [
        "#### Early warning: first warning step vs loss-spike step (runs without remedy)",
        "",
        "| lr | seed | spike | " + " | ".join(DETECTORS) + " |",
        "|---|---|---|" + "---|" * len(DETECTORS),
    ]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in lead_rows]
    lines += [
        "",
        f"#### False alarms on clean runs ({clean_steps} steps: LR <= {NORMAL_LR:g} and "
        "S6/S7, no remedy)",
        "",
        "| detector | warnings |",
        "|---|---|",
        *(f"| {d} | {alarms[d]} |" for d in DETECTORS),
        "",
    ]
    (out / "transformer.md").write_text("\n".join(lines), encoding="utf-8")
    (out / "transformer-runs.json").write_text(
        json.dumps([asdict(r) for r in runs], default=str) + "\n", encoding="utf-8"
    )


# ----------------------------------------------------------------------------- telemetry cost


def telemetry_cost(model: str = "tiny", steps: int = 20) -> dict[str, float]:
    """Milliseconds per training step (forward, backward, AdamW) without and with telemetry.

    ``model``: ``"tiny"`` (the lab's char-GPT, batch 16 x 32 characters) or ``"gpt2-12"`` (a
    Hugging Face GPT-2 small config: 12 layers, width 768, 12 heads, random init, batch 2 x 128
    tokens, SDPA attention). Two identical copies train side by side, one with an
    :class:`AttentionTelemetry` (max logit per layer and head, output log Z, a records row of
    device tensors every step), their steps alternating so that a load change hits both alike;
    :func:`~gradguard.decide.attention.preconditioner_lag` is timed on its own, before the telemetry
    copy's optimizer step. Medians after two warm-up steps.

    Returns:
        ``{"plain_ms", "telemetry_ms", "overhead", "lag_ms"}`` (overhead = ratio - 1, attention
        and log Z telemetry only).
    """
    import copy

    torch.set_num_threads(1)
    torch.manual_seed(0)
    if model == "tiny":
        net: torch.nn.Module = SCENARIOS["S3"].build(0, True, None).model
        x = torch.randint(0, 90, (16, 32))
        out_name: str | None = "out"
    elif model == "gpt2-12":
        import transformers

        cfg = transformers.GPT2Config(  # type: ignore[call-arg]
            n_layer=12, n_embd=768, n_head=12, n_positions=128, vocab_size=50257,
            attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, attn_implementation="sdpa",
        )  # fmt: skip
        net = transformers.GPT2LMHeadModel(cfg)
        x = torch.randint(0, 50257, (2, 128))
        out_name = None
    else:
        raise ValueError(f"model must be 'tiny' or 'gpt2-12', got {model!r}")
    from gradguard.decide.attention import preconditioner_lag

    net.train()
    twin = copy.deepcopy(net)
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-4) for m in (net, twin)]
    tel = AttentionTelemetry(twin, output=out_name)

    def step(m: torch.nn.Module, opt: torch.optim.Optimizer, lag: list[float] | None) -> float:
        t0 = time.perf_counter()
        out = m(x)
        logits = out if isinstance(out, Tensor) else out.logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        loss.backward()
        if lag is not None:
            tel.row(per_head=True)  # device tensors, read back at the recorder's flush
            t1 = time.perf_counter()
            preconditioner_lag(opt, min_step=0)
            lag.append((time.perf_counter() - t1) * 1e3)
            t0 += time.perf_counter() - t1
        opt.step()
        opt.zero_grad(set_to_none=True)
        return (time.perf_counter() - t0) * 1e3

    plain: list[float] = []
    with_tel: list[float] = []
    lags: list[float] = []
    for i in range(steps + 2):
        a = step(net, opts[0], None)
        b = step(twin, opts[1], lags)
        if i >= 2:  # warm-up
            plain.append(a)
            with_tel.append(b)
    tel.remove()
    p, t = statistics.median(plain), statistics.median(with_tel)
    return {
        "plain_ms": p,
        "telemetry_ms": t,
        "overhead": t / p - 1.0,
        "lag_ms": statistics.median(lags[2:]),
    }
