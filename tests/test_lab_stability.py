"""The stability benchmark: metric definitions on hand-made curves, real peers, determinism."""

from __future__ import annotations

import math
import re
import shutil
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
from torch import nn

from gradguard.app.lab import _methods, stability
from gradguard.app.lab._methods import METHODS, OlmoSkipStep, Stopped, guard_method, timm_agc_
from gradguard.app.lab._metrics import lr_sensitivity, median, recovery_steps, spike_score, spread
from gradguard.app.lab._scenarios import corpus

# -- metrics on hand-made curves -----------------------------------------------------------------


def test_spike_score_counts_outliers_against_the_rolling_window():
    flat = [1.0, 1.1] * 10  # mean 1.05, std 0.05: 3 sigma is 1.2
    curve = [*flat, 1.19, 1.5, *flat]
    # 42 steps; 1.19 is inside 3 sigma, 1.5 is a spike; the window after it holds 1.5,
    # which widens it, so nothing else counts
    assert spike_score(curve) == pytest.approx(1 / 42)
    assert spike_score(curve, k=20.0) == 0.0


def test_spike_score_non_finite_steps_always_count_and_excluded_steps_never():
    assert spike_score([1.0, math.nan, math.inf, 1.0]) == pytest.approx(0.5)  # before warm-up too
    curve = [1.0] * 12 + [100.0] + [1.0] * 7
    excluded = [False] * 12 + [True] + [False] * 7
    assert spike_score(curve) == pytest.approx(1 / 20)
    assert spike_score(curve, excluded) == 0.0  # the fault batch's own loss is not the method's
    assert spike_score([]) == 0.0


def test_spike_score_starts_scoring_after_min_window():
    curve = [1.0, 1.0, 50.0, 1.0]
    assert spike_score(curve, min_window=10) == 0.0
    assert spike_score(curve, min_window=2) == pytest.approx(1 / 4)


def test_recovery_steps_on_hand_made_curves():
    pos = list(range(10))
    twin = [3.0, 2.0] + [2.0] * 8
    # from step 3 the 5-step means are 3.8, 2.5, 2.0 against the twin's 2.0 (+10%): back at 5
    assert recovery_steps([3, 2, 9, 9, 4, 2, 2, 2, 2, 2], pos, (2, 2), twin) == 2
    # unaffected (the fault was skipped): back at once
    assert recovery_steps(twin, pos, (5, 5), twin) == 0
    # within 10% of the twin counts as back; 12% above does not
    assert recovery_steps([2.0] * 5 + [2.2] * 5, pos, (4, 4), [2.0] * 10) == 0
    assert recovery_steps([2.0] * 5 + [2.24] * 5, pos, (4, 4), [2.0] * 10) is None
    # a stall (poisoned Adam moments): the loss never falls with the twin's
    falling = [2.0 - 0.1 * i for i in range(10)]
    assert recovery_steps([2.0] * 10, pos, (2, 2), falling) is None
    # non-finite after the fault: never
    assert recovery_steps([2, 2, 2, 9, *([math.nan] * 6)], pos, (3, 3), [2.0] * 10) is None
    # the fault never reached (a rollback skipped it): no recovery to measure
    assert recovery_steps([2.0] * 5, [0, 1, 2, 6, 7], (3, 5), [2.0] * 5) is None


def test_recovery_waits_for_a_replayed_fault():
    # a rollback replays positions 3..4: position 4 is seen twice
    losses = [2.0, 2.0, 2.0, 2.0, 50.0, 2.0, 50.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0]
    positions = [0, 1, 2, 3, 4, 3, 4, 5, 6, 7, 8, 9, 10]
    assert recovery_steps(losses, positions, (4, 4), [2.0] * 13) == 0  # from the last hit


def test_lr_sensitivity_median_and_spread():
    assert lr_sensitivity([2.0, math.nan, 5.0], [4.0, 4.0, 4.0]) == pytest.approx(10 / 3)
    assert median([1.0, math.nan, 3.0]) == 3.0  # nan ranks last
    assert spread([1.0, 1.5, math.nan]) == 0.5
    assert spread([1.0]) == 0.0


# -- peers and re-implementations ----------------------------------------------------------------


def test_peers_are_the_real_packages():
    import autoclip.torch
    import pytorch_optimizer
    import zclip

    assert version("pytorch-optimizer") == "4.1.0" and version("zclip") == "1.0.0"
    assert version("autoclip") == "0.2.1"
    assert hasattr(zclip, "ZClip") and hasattr(autoclip.torch, "QuantileClip")
    for name in ("AdaGC", "SPAM", "StableSPAM"):
        assert issubclass(getattr(pytorch_optimizer, name), torch.optim.Optimizer)


def test_timm_agc_matches_the_unitwise_closed_form():
    w = nn.Parameter(torch.tensor([[3.0, 4.0], [0.0, 1e-4]]))  # row norms 5 and ~1e-4 (eps 1e-3)
    w.grad = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    b = nn.Parameter(torch.tensor([1.0, 0.0]))
    b.grad = torch.tensor([0.001, 0.0])
    assert timm_agc_([w, b], clip_factor=0.1)
    # row 0: max 0.5 < 1 -> scaled to norm 0.5; row 1: max 0.1 * 1e-3 -> norm 1e-4
    assert torch.allclose(w.grad[0], torch.tensor([0.5, 0.0]))
    assert torch.allclose(w.grad[1].norm(), torch.tensor(1e-4), rtol=1e-4)
    assert torch.equal(b.grad, torch.tensor([0.001, 0.0]))  # under 0.1 * ||b|| = 0.1


def test_olmo_skip_step_rule():
    problem = stability.build_problem("S4", seed=0)
    model = problem.model
    stepper = OlmoSkipStep(model, problem)
    actions = []
    for i in range(80):
        loss = problem.loss(model, problem.batch(i + 10))  # no fault positions
        if i == 70:
            loss = loss * 1000.0  # a loss 6+ sigma off (the gradient follows)
        loss.backward()
        actions.append(stepper.step(loss))
        model.zero_grad(set_to_none=True)
    assert actions[:64] == ["step"] * 64  # inactive until 64 losses are in
    assert actions[70] == "skip"
    assert actions.count("skip") == 1


def test_every_method_runs_on_every_scenario_it_applies_to():
    chosen = ["none", "clip-1", "grid-0.3", "zclip", "autoclip", "adagc", "spam", "stablespam"]
    chosen += ["olmo-skip", "agc", "gradguard-defaults", "gradguard-best"]
    scenarios = [s for s, sc in stability.SCENARIOS.items() if sc.units == 1.0] + ["S4x100"]
    for scenario in scenarios:
        adam = stability.build_problem(scenario, 0).optimizer in stability.ADAM
        for method in chosen:
            if METHODS[method].replaces_optimizer and not adam:
                with pytest.raises(ValueError, match="replaces Adam/AdamW"):
                    stability.run_one(scenario, method, steps=2)
                continue
            r = stability.run_one(scenario, method, steps=6)
            assert r.steps == 6 or r.stopped, (scenario, method, r.stopped)
            assert r.skips + (r.clips or 0) + r.rollbacks <= r.steps
            assert math.isfinite(r.initial_loss)
            assert 0.0 <= r.spike_score <= 1.0


def test_faulted_runs_are_measured_against_a_clean_twin():
    r = stability.run_one("S4", "none", steps=12)  # the x1e3 targets at position 2
    assert len(r.recovery) == 2 and r.recovery[1] is None  # the late fault is beyond 12 steps
    assert math.isfinite(r.fault_cost)
    clean = stability.run_one("S6", "none", steps=4)
    assert clean.recovery == [] and math.isnan(clean.fault_cost)


def test_an_abort_is_a_stopped_diverged_run(monkeypatch):
    from gradguard import GuardConfig

    monkeypatch.setitem(
        METHODS,
        "abort-on-nan",
        guard_method("abort on NaN", lambda: GuardConfig(responses={"nonfinite": ("abort",)})),
    )
    r = stability.run_one("S5", "abort-on-nan", steps=80)  # the NaN window starts at 75
    assert r.stopped.startswith("GuardAbort") and r.diverged and r.score == math.inf
    assert r.steps == 76  # the aborted step is the last one counted
    assert issubclass(Stopped, Exception)


# -- determinism, the sweep, the document ------------------------------------------------------


def test_same_seed_same_numbers():
    a = stability.run_one("S1", "gradguard-defaults", seed=1, steps=15)
    b = stability.run_one("S1", "gradguard-defaults", seed=1, steps=15)
    c = stability.run_one("S1", "gradguard-defaults", seed=2, steps=15)
    da, db = a.summary(), b.summary()
    da.pop("ms_per_step"), db.pop("ms_per_step")
    assert da == db and a.losses == b.losses
    assert a.losses != c.losses


def test_the_corpus_is_stdlib_text():
    alphabet, train, held = corpus()
    assert " " in alphabet and "e" in alphabet and len(alphabet) < 100
    assert len(train) > 50_000 and len(held) > 5_000


def test_sweep_tables_figures_and_verdict(tmp_path):
    methods = ["none", "grid-1", "grid-10", "clip-1", "adagc", "gradguard-defaults"]
    result = stability.run_stability(
        quick=True,
        seeds=2,
        methods=methods,
        scenarios=["S3", "S4", "S4x100", "C3"],
        workers=1,
        steps=8,
        clean_seeds=3,
    )
    # S3: 5 LRs x 6 methods; S4 in two units: 6 methods; C3 (SGD): no grid, no AdaGC
    assert len(result.runs) == (5 * 6 + 6 + 6) * 2 + 3 * 3
    cell = result.cell("S3", "none")
    assert cell is not None and len(cell.score) == 2  # LR sensitivity per seed
    assert result.best_clip("S4") in ("grid-1", "grid-10")
    assert result.cell("C3", "grid-1") is None and result.cell("C3", "adagc") is None
    assert len(result.cell("C3", "none").score) == 3  # type: ignore[union-attr]
    text, ok = result.verdict("S4")
    assert isinstance(ok, bool) and "tuned clip" in text
    assert "no clipping" in result.verdict("C3")[0]
    assert result.ranks("S4", ["none", "clip-1", "gradguard-defaults"]).keys() == {
        "none",
        "clip-1",
        "gradguard-defaults",
    }
    md = stability.to_markdown(result, "test", notes="A measured note.")
    for part in ("## S3", "LR sensitivity", "within noise", "## Clean runs", "## Mean ranks",
                 "x100", "A measured note.", "## C3"):  # fmt: skip
        assert part in md, part
    paths = stability._figures(result, tmp_path)
    assert (tmp_path / "stability-S3-lr.png").is_file() and (tmp_path / "stability-clean.png")
    assert len(paths) == 4  # S3, S3 vs LR, S4 (own units only), the clean suite


def test_units_variant_is_the_same_problem_in_other_units():
    base = stability.build_problem("S1", 0)
    scaled = stability.build_problem("S1x100", 0)
    assert scaled.units == 100.0 and scaled.lr == pytest.approx(base.lr / 100)  # SGD: lr / c
    batch = base.batch(0)
    a, b = base.loss(base.model, batch), scaled.loss(scaled.model, batch)
    assert float(b.detach()) == pytest.approx(100 * float(a.detach()), rel=1e-6)
    assert base.heldout(base.model) == scaled.heldout(scaled.model)  # held out in own units
    adamw = stability.build_problem("S4x0.01", 0)
    assert adamw.lr == stability.build_problem("S4", 0).lr  # Adam-type: the same lr
    # The grid scales with the units, torch's clip at 1.0 does not.
    assert METHODS["grid-1"].family == "grid" and METHODS["clip-1"].family == "baseline"


STEPS_CLEAN = 40


@pytest.mark.parametrize("scenario", [s for s in stability.SCENARIOS if s.startswith("C")])
def test_the_defaults_cost_nothing_on_a_clean_run(scenario: str):
    """Every optimizer on a CNN, a wide MLP with a summed loss, an LSTM and a transformer
    (batch 4 to 128), shortened to 40 steps: the defaults never skip, back off or roll back.

    After 40 steps the loss still falls steeply, and the few steps the policy clipped show:
    measured, C3 (SGD on batches of 4, whose norms swing past twice their median one step in
    seven) ends 5.3% above the unguarded run, C5 1.1%, C2 0.8%, the others within 0.3%. At the
    full length those gaps are within the seeds' noise (docs/stability.md, the clean runs)."""
    none = stability.run_one(scenario, "none", steps=STEPS_CLEAN)
    mine = stability.run_one(scenario, "gradguard-defaults", steps=STEPS_CLEAN)
    assert mine.interventions == 0 and not mine.stopped
    assert mine.final_loss <= none.final_loss * 1.06, (mine.final_loss, none.final_loss)


def test_unknown_names_are_rejected():
    with pytest.raises(ValueError, match="scenario"):
        stability.run_one("S9", "none")
    with pytest.raises(ValueError, match="clean_seeds"):
        stability.run_stability(clean_seeds=0)
    with pytest.raises(ValueError, match="method"):
        stability.run_one("S1", "nope")
    with pytest.raises(ValueError, match="unknown method"):
        stability.run_stability(methods=["nope"])
    assert set(_methods.default_methods(True)) <= set(METHODS)


def test_cli_runs_stability_alone():
    from gradguard.app.cli import main

    assert main(["lab", "stability", "chain", "--out", "/nonexistent-never-written"]) == 2


# -- the published page ---------------------------------------------------------------------------

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_the_published_page_is_rendered_from_its_runs(tmp_path: Path):
    # docs/stability.md is what render() writes from docs/stability-runs.json: no number by hand.
    shutil.copy(DOCS / "stability-runs.json", tmp_path)
    stability.render(tmp_path)
    assert (tmp_path / "stability.md").read_text("utf-8") == (DOCS / "stability.md").read_text(
        "utf-8"
    )


def _tables(text: str, heading: str) -> list[list[str]]:
    """The body rows of the Markdown tables after the paragraph starting with ``heading``."""
    section = text.split(heading, 1)[1]
    rows, seen = [], False
    for line in section.splitlines():
        if line.startswith("|"):
            seen = True
            rows.append([c.strip() for c in line.strip("|").split("|")])
        elif seen:
            break
    return [r for r in rows[2:]]  # the header and the rule are not numbers of a run


def test_the_guide_quotes_the_benchmark():
    # Every decimal number in docs/guard.md's two benchmark tables (the first column names the
    # run) is a number of docs/stability.md, rounded to the digits the guide shows.
    bench = [
        float(x) for x in re.findall(r"(?<![\w.])\d+\.\d+", (DOCS / "stability.md").read_text())
    ]
    guide = (DOCS / "guard.md").read_text("utf-8")
    quoted = 0
    for heading in ("**What it costs**", "**What it buys**"):
        for row in _tables(guide, heading):
            for token in re.findall(r"(?<![\w.])\d+\.\d+", " ".join(row[1:])):
                digits = len(token.split(".")[1])
                half = 0.5 * 10.0**-digits * (1 + 1e-9)  # 3.105 shows as 3.11 or 3.10
                assert any(abs(b - float(token)) <= half for b in bench), token
                quoted += 1
    assert quoted > 50


def test_the_readme_quotes_the_benchmark():
    # README's "what they cost and buy" says the numbers of docs/stability.md: the count of
    # stress runs within noise, and what torch's clip at 1.0 costs the summed-loss MLP (C3).
    page = (DOCS / "stability.md").read_text("utf-8")
    readme = (DOCS.parent / "README.md").read_text("utf-8")
    section = " ".join(readme.split("cost and buy", 1)[1].split("\n## ")[0].split())
    n = re.search(r"within noise of the tuned clip on (\d+) of (\d+)", page)
    assert n and f"per run on {n[1]} of {n[2]}" in section
    c3 = next(ln for ln in page.splitlines() if ln.startswith("| C3 "))
    cells = [c.strip() for c in c3.strip("|").split("|")]
    none, clip1 = float(cells[1].split()[0]), float(cells[4])
    quoted = re.search(r"\((\d+\.\d+) against (\d+\.\d+)\)", section)
    assert quoted, "README must quote C3's clip-1 and no-clipping losses"
    for token, value in zip(quoted.groups(), (clip1, none), strict=True):
        half = 0.5 * 10.0 ** -len(token.split(".")[1]) * (1 + 1e-9)
        assert abs(float(token) - value) <= half, (token, value)
