"""Preflight diagnosis against closed forms (the seeds' one-neuron chain) and torch's autograd."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import gradguard
from gradguard.diagnose import Diagnosis, default_loss, measure_gains


@pytest.fixture(autouse=True)
def _one_thread():
    # Small models: one intra-op thread is fastest, and on a shared machine two spinning
    # threads per process cost 30x.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def chain(weight: float, depth: int = 20) -> nn.Sequential:
    """The seeds' network: `depth` one-neuron layers, every weight `weight`, ReLU between."""
    mods: list[nn.Module] = []
    for i in range(depth):
        layer = nn.Linear(1, 1, bias=False)
        nn.init.constant_(layer.weight, weight)
        mods.append(layer)
        if i < depth - 1:
            mods.append(nn.ReLU())
    return nn.Sequential(*mods)


def mlp(depth: int, width: int, act: type[nn.Module] = nn.ReLU, std: float | None = None):
    mods: list[nn.Module] = []
    for i in range(depth):
        layer = nn.Linear(width, width)
        if std is not None:
            nn.init.normal_(layer.weight, 0.0, std)
        mods.append(layer)
        if i < depth - 1:
            mods.append(act())
    return nn.Sequential(*mods)


def test_seed_chain_234_gain_per_layer_and_over_the_depth() -> None:
    d = gradguard.diagnose(chain(2.34), torch.ones(1, 1), remedies=False)
    assert d.verdict == "exploding"
    assert d.per_layer_gain == pytest.approx(2.34, rel=0.01)
    assert d.overall_gain == pytest.approx(2.34**20, rel=0.01)
    assert len(d.layers) == 20
    for s in d.layers:
        assert s.gain == pytest.approx(2.34, rel=0.01)
        assert s.jacobian_norm == pytest.approx(2.34, rel=0.01)
        assert s.act_rms == pytest.approx(2.34 ** (s.index + 1), rel=0.01)
    assert "grows about 2.34x per layer" in d.message
    assert "2.4e+07 times its size at the output" in d.message


@settings(max_examples=25, deadline=None)
@given(st.floats(0.3, 3.0), st.integers(2, 12), st.floats(0.1, 10.0))
def test_chain_gain_is_the_weight_for_any_weight_depth_and_input(
    w: float, depth: int, x: float
) -> None:
    d = gradguard.diagnose(chain(w, depth), torch.full((1, 1), x), remedies=False, jacobian_iters=0)
    assert d.per_layer_gain == pytest.approx(w, rel=1e-4)
    assert d.overall_gain == pytest.approx(w**depth, rel=1e-3)
    g = w**depth
    if min(abs(math.log(g / 10)), abs(math.log(g / 0.1))) > 0.01:  # off the verdict's edges
        want = "exploding" if g > 10 else "vanishing" if g < 0.1 else "healthy"
        assert d.verdict == want


def test_a_dead_relu_chain_is_reported_as_vanished() -> None:
    d = gradguard.diagnose(chain(-1.0, depth=4), torch.ones(1, 1), remedies=False)
    assert d.overall_gain == 0.0 and d.per_layer_gain == 0.0
    assert d.verdict == "vanishing"
    assert "no gradient reaches the input" in d.message


def test_seed_chain_05_vanishes() -> None:
    d = gradguard.diagnose(chain(0.5), torch.ones(1, 1), remedies=False)
    assert d.verdict == "vanishing"
    assert d.per_layer_gain == pytest.approx(0.5, rel=0.01)
    assert d.overall_gain == pytest.approx(0.5**20, rel=0.01)
    assert "shrinks to about 0.5x per layer" in d.message


def test_overall_gain_is_the_input_gradient_over_the_output_gradient() -> None:
    # Oracle: plain autograd on the same model, no hooks.
    torch.manual_seed(0)
    model = mlp(6, 12, nn.Tanh)
    x = torch.randn(5, 12, requires_grad=True)
    out = model(x)
    (gx, gout) = torch.autograd.grad(out.pow(2).mean(), [x, out])
    d = gradguard.diagnose(model, x.detach(), remedies=False)
    assert d.overall_gain == pytest.approx((gx.norm() / gout.norm()).item(), rel=1e-5)
    assert math.prod(s.gain for s in d.layers) == pytest.approx(d.overall_gain, rel=1e-5)


def test_jacobian_estimate_matches_the_exact_spectral_norm() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6))
    x = torch.randn(1, 6)
    d = gradguard.diagnose(model, x, remedies=False, jacobian_iters=50)
    h = model[1](model[0](x))
    j0 = torch.autograd.functional.jacobian(lambda v: model[1](model[0](v)), x).reshape(6, 6)
    j1 = model[2].weight
    assert d.layers[0].jacobian_norm == pytest.approx(
        torch.linalg.matrix_norm(j0, 2).item(), rel=1e-3
    )
    assert d.layers[1].jacobian_norm == pytest.approx(
        torch.linalg.matrix_norm(j1, 2).item(), rel=1e-3
    )
    assert h.shape == (1, 6)


def test_deep_mlp_with_large_init_explodes_and_kaiming_fixes_it() -> None:
    torch.manual_seed(0)
    width = 64
    model = mlp(30, width, std=math.sqrt(6.0 / width))  # 3x the He variance: ~sqrt(3) per layer
    batch = (torch.randn(64, width), torch.randn(64, width))
    d = gradguard.diagnose(model, batch, steps=3, jacobian_iters=2)
    assert d.verdict == "exploding"
    worst = d.worst_layer
    assert worst is not None and worst.gain == max(s.gain for s in d.layers)
    assert d.per_layer_gain > 1.5
    by_name = {r.name: r for r in d.remedies}
    kaiming = by_name["kaiming init"]
    assert 0.8 <= kaiming.per_layer_gain <= 1.25
    assert kaiming.verdict == "healthy"
    assert math.isfinite(kaiming.loss_after)
    # ranked by closeness of the per-layer gain to 1; a re-initialization wins here
    best = d.remedies[0]
    assert best.applicable and abs(math.log(best.per_layer_gain)) < abs(math.log(d.per_layer_gain))
    applicable = [r for r in d.remedies if r.applicable]
    healthy = [r.verdict == "healthy" for r in applicable]
    assert healthy == sorted(healthy, reverse=True)  # the remedies that cure come first
    for group in (True, False):
        offs = [
            round(abs(math.log(r.per_layer_gain)), 3)
            for r in applicable
            if healthy[applicable.index(r)] is group
        ]
        assert offs == sorted(offs)
    clip = by_name["clip gradient norm"]
    assert clip.threshold is not None and clip.threshold > 0
    assert "kaiming init" in d.summary()


def test_deep_sigmoid_network_vanishes_and_residuals_help() -> None:
    torch.manual_seed(0)
    model = mlp(20, 32, nn.Sigmoid)
    d = gradguard.diagnose(model, torch.randn(16, 32), steps=0)
    assert d.verdict == "vanishing"
    assert d.per_layer_gain < 0.3
    res = next(r for r in d.remedies if r.name == "residual connections")
    assert res.per_layer_gain > 0.8


def test_kaiming_relu_mlp_is_healthy() -> None:
    torch.manual_seed(0)
    model = gradguard.remedies.reinit_(mlp(12, 64), "kaiming")
    d = gradguard.diagnose(model, torch.randn(128, 64), remedies=False)
    assert d.verdict == "healthy"
    assert 0.8 <= d.per_layer_gain <= 1.25
    # Away from the output each He-initialized ReLU layer keeps the gradient norm (gain ~1).
    # Near the output the loss gradient lies in the range of the last weights, whose W^T W
    # then amplifies it (up to ~2x for the last layer): a property of the loss, not the init.
    hidden = [s.gain for s in d.layers[:-3]]
    assert 0.85 < math.prod(hidden) ** (1 / len(hidden)) < 1.15


def test_diagnose_does_not_touch_the_model_or_the_global_rng() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8))
    model.eval()
    before = copy.deepcopy(model.state_dict())  # includes BatchNorm's running statistics
    batch = (torch.randn(4, 8), torch.randn(4, 8))
    rng = torch.get_rng_state()
    gradguard.diagnose(model, batch, steps=2)
    assert torch.equal(torch.get_rng_state(), rng)
    assert not model.training
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())


def test_diagnosis_is_reproducible_with_a_seed() -> None:
    torch.manual_seed(0)
    model = mlp(6, 8)
    x = torch.randn(8, 8)
    a = gradguard.diagnose(model, x, steps=1, seed=3).to_dict()
    b = gradguard.diagnose(model, x, steps=1, seed=3).to_dict()
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def test_embedding_and_classification_loss() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Embedding(10, 8), nn.Flatten(), nn.Linear(24, 8), nn.ReLU(), nn.Linear(8, 3)
    )
    batch = (torch.randint(0, 10, (5, 3)), torch.randint(0, 3, (5,)))
    d = gradguard.diagnose(model, batch, remedies=False)
    assert [s.module for s in d.layers] == ["Embedding", "Linear", "Linear"]
    assert math.isfinite(d.overall_gain) and d.overall_gain > 0
    # the default loss is cross-entropy for integer targets
    out = model(batch[0])
    torch.testing.assert_close(default_loss(out, batch), nn.functional.cross_entropy(out, batch[1]))


def test_rows_follow_the_records_schema() -> None:
    d = gradguard.diagnose(chain(2.34, depth=5), torch.ones(1, 1), steps=1)
    rows = d.to_rows(step=7)
    assert all(r["kind"] == "diagnosis" and r["step"] == 7 and r["v"] == 1 for r in rows)
    parts = [r["part"] for r in rows]
    assert parts.count("verdict") == 1 and parts.count("layer") == 5
    assert parts.count("remedy") == len(d.remedies)
    for r in rows:  # flat JSON values only (one level of dicts allowed, none needed here)
        assert all(isinstance(v, (int, float, str, bool, type(None))) for v in r.values())
    ranks = [r["rank"] for r in rows if r["part"] == "remedy" and r["rank"]]
    assert ranks == list(range(1, len(ranks) + 1))
    verdict = rows[0]
    assert verdict["verdict"] == "exploding" and verdict["n_layers"] == 5
    assert verdict["worst_gain"] == pytest.approx(2.34, rel=1e-4)
    assert verdict["worst_layer"] in {s.name for s in d.layers}
    assert isinstance(d, Diagnosis) and d.to_dict()["verdict"] == "exploding"


def test_summary_reads_out_verdict_layers_and_remedies() -> None:
    d = gradguard.diagnose(chain(0.5, depth=4), torch.ones(1, 1), steps=0)
    text = d.summary()
    assert text.startswith("verdict: VANISHING")
    assert "forward, the activations' RMS changes about 0.5x per layer" in text
    assert "farthest from 1: layer " in text and "gain 0.5x" in text
    assert "remedies, best first" in text and "apply:" in text
    assert "batch norm: not applicable" in text  # one sample per channel: BatchNorm cannot train


def test_measure_gains_rejects_frozen_models() -> None:
    model = mlp(3, 4)
    for p in model.parameters():
        p.requires_grad_(False)
    model2 = nn.Sequential(nn.ReLU())
    with pytest.raises(ValueError, match="found no layer"):
        measure_gains(model2, torch.randn(2, 4))


@pytest.mark.parametrize(
    ("kwargs", "err", "match"),
    [
        ({"tolerance": 1.0}, ValueError, "tolerance must be a finite number > 1"),
        ({"tolerance": math.inf}, ValueError, "tolerance"),
        ({"jacobian_iters": -1}, ValueError, "jacobian_iters must be an int >= 0"),
        ({"steps": 1.5}, ValueError, "steps must be an int"),
        ({"loss_fn": 3}, TypeError, "loss_fn must be callable"),
        ({"lr": 0.0}, ValueError, "lr must be a finite number > 0"),
        ({"l2": -1.0}, ValueError, "l2 must be a finite number >= 0"),
        ({"percentile": 120}, ValueError, r"percentile must be in \[0, 100\]"),
        ({"seed": "a"}, TypeError, "seed must be an int"),
    ],
)
def test_bad_arguments(kwargs: dict, err: type, match: str) -> None:
    with pytest.raises(err, match=match):
        gradguard.diagnose(mlp(2, 3), torch.randn(2, 3), **kwargs)


def test_bad_model_and_batch() -> None:
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module"):
        gradguard.diagnose(lambda x: x, torch.randn(2, 3))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="batch must be a tensor"):
        gradguard.diagnose(mlp(2, 3), ["a", "b"])
    with pytest.raises(ValueError, match="pass loss_fn"):
        gradguard.diagnose(mlp(2, 3), (torch.randn(2, 3), torch.randn(7)), remedies=False)


class _RNNClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.RNN(3, 8, batch_first=True)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def test_recurrent_and_conv_models_are_measured_and_inapplicable_remedies_say_why() -> None:
    torch.manual_seed(0)
    d = gradguard.diagnose(
        _RNNClassifier(), (torch.randn(4, 12, 3), torch.randint(0, 2, (4,))), steps=1
    )
    assert [s.name for s in d.layers] == ["rnn", "head"]
    assert math.isfinite(d.overall_gain)
    reasons = {r.name: r.error for r in d.remedies if not r.applicable}
    assert "no block whose output shape" in reasons["residual connections"]
    assert "no Linear/Conv layer to normalize" in reasons["batch norm"]
    cnn = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 5 * 5, 3),
    )  # fmt: skip
    d = gradguard.diagnose(cnn, (torch.randn(4, 3, 5, 5), torch.randint(0, 3, (4,))), steps=1)
    assert [s.module for s in d.layers] == ["Conv2d", "Conv2d", "Linear"]
    assert all(r.applicable for r in d.remedies if "norm" in r.name or "residual" in r.name)


def test_gain_counts_every_path_including_a_skip_around_the_first_layer() -> None:
    # x + relu(0.5 x) = 1.5 x per block for x > 0: the residual chain grows by exactly 1.5.
    model = gradguard.remedies.add_residual(chain(0.5, depth=4))
    assert all(isinstance(m, gradguard.remedies.Residual) for m in model)
    d = gradguard.diagnose(model, torch.ones(1, 1), remedies=False)
    assert d.overall_gain == pytest.approx(1.5**4, rel=1e-5)
    assert [s.gain for s in d.layers] == pytest.approx([1.5] * 4, rel=1e-5)
