"""The Guard writes incident bundles that gradguard.replay classifies, end to end."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

import gradguard
from gradguard import Guard, GuardConfig
from gradguard.insight.replay import replay
from gradguard.records.bundle import load_bundle


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 1))


def batch_at(step: int, bad: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    x = torch.randn(16, 8, generator=g)
    y = x[:, :1] * 0.5
    if step == bad:
        x[11] = float("nan")
    return x, y


def _train(tmp_path: Path, fused: bool, bad: int = 12, steps: int = 16) -> Guard:
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=fused)
    cfg = GuardConfig(incident_dir=str(tmp_path / "incidents"), incident_history=4)
    guard = Guard(model, opt, config=cfg)
    for step in range(steps):
        x, y = batch_at(step, bad)
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        guard.step(loss, batch=(x, y))
        opt.zero_grad()
    return guard


def test_a_skipped_nan_row_writes_a_bundle_that_replays_as_data(tmp_path: Path) -> None:
    for fused in (False, True):
        guard = _train(tmp_path / str(fused), fused)
        events = [r for r in guard.records if r["kind"] == "action" and r["action"] == "skip"]
        assert len(events) == 1 and "bundle" in events[0]
        bundle = load_bundle(events[0]["bundle"])
        assert (bundle.step, bundle.action, bundle.signal) == (12, "skip", "nonfinite")
        assert len(bundle.history) == 4  # incident_history rows, this step's included
        result = replay(events[0]["bundle"], make_model)
        assert result.kind == "data" and result.culprits == [11], result.summary


def test_no_bundles_without_an_incident_dir_and_the_cap_holds(tmp_path: Path) -> None:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = Guard(model, opt)
    assert guard.incidents is None
    cfg = GuardConfig(incident_dir=str(tmp_path), incident_max=1, detectors=[])
    guard = Guard(model, opt, config=cfg)
    for step in range(3):
        x, y = batch_at(step, step)
        nn.functional.mse_loss(model(x), y).backward()
        guard.step(batch=(x, y))
        opt.zero_grad()
    assert guard.counters.skips == 3
    assert len(list(tmp_path.glob("*.pt"))) == 1 and guard.incidents is not None
    assert guard.incidents.dropped == 2


def test_public_names() -> None:
    assert gradguard.replay is replay and gradguard.load_bundle is load_bundle
