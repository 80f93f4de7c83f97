"""Preflight diagnosis against closed forms (a one-neuron ReLU chain) and torch's autograd."""

from __future__ import annotations

import copy
import itertools
import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import gradguard
from gradguard.core.batch import default_loss
from gradguard.insight.diagnose import (
    Diagnosis,
    RemedyResult,
    measure_gains,
    rank_remedies,
)


@pytest.fixture(autouse=True)
def _one_thread():
    # Small models: one intra-op thread is fastest, and on a shared machine two spinning
    # threads per process cost 30x.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def chain(weight: float, depth: int = 20) -> nn.Sequential:
    """A one-neuron chain: `depth` layers, every weight `weight`, ReLU between."""
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


def loss_tier(r: RemedyResult, ref: float, tol: float, by_loss: bool = True) -> int:
    """The documented tiers, written out plainly: 0 no worse than no change, 1 worse, 2 blew up."""
    if math.isnan(r.loss_after) or math.isinf(r.loss_after):
        return 2
    if by_loss and math.isfinite(ref) and r.loss_after > ref + tol * abs(ref):
        return 1
    return 0


def assert_follows_the_ranking_rule(d: Diagnosis) -> None:
    """Check every adjacent pair of the ranking against the rule in rank_remedies' docstring."""
    ref = next(r for r in d.remedies if r.name == "no change (reference)")
    applicable = [r for r in d.remedies if r.applicable]
    assert d.remedies[: len(applicable)] == applicable  # inapplicable ones last

    def off(g: float) -> float:
        return abs(math.log(g)) if 0 < g < math.inf else math.inf

    def rest(r: RemedyResult) -> tuple:
        return (r.verdict != "healthy", round(off(r.per_layer_gain), 3), off(r.depth_gain))

    for a, b in itertools.pairwise(applicable):
        ta, tb = (
            loss_tier(r, ref.loss_after, d.loss_tolerance, d.by_loss) if d.steps else 0
            for r in (a, b)
        )
        assert ta <= tb, (a.name, b.name)
        if ta == tb == 1:
            assert a.loss_after <= b.loss_after, (a.name, b.name)
        elif ta == tb:
            assert rest(a) <= rest(b), (a.name, b.name)


def test_chain_of_weights_2_34_gains_2_34_per_layer_and_over_the_depth() -> None:
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


def test_chain_of_weights_0_5_vanishes() -> None:
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
    # a re-initialization wins here: healthy, closer to 1, and trains no worse than no change
    best = d.remedies[0]
    assert best.applicable and abs(math.log(best.per_layer_gain)) < abs(math.log(d.per_layer_gain))
    assert_follows_the_ranking_rule(d)
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
    model = gradguard.insight.remedies.reinit_(mlp(12, 64), "kaiming")
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
    model = gradguard.insight.remedies.add_residual(chain(0.5, depth=4))
    assert all(isinstance(m, gradguard.insight.remedies.Residual) for m in model)
    d = gradguard.diagnose(model, torch.ones(1, 1), remedies=False)
    assert d.overall_gain == pytest.approx(1.5**4, rel=1e-5)
    assert [s.gain for s in d.layers] == pytest.approx([1.5] * 4, rel=1e-5)


# -- shape changes are not depth growth --------------------------------------------------------


def cnn(scale: float = 1.0, pool: type[nn.Module] = nn.AdaptiveAvgPool2d) -> nn.Sequential:
    """Four 3x3 ReLU convs, He-initialized (times ``scale``), global pooling, a linear head."""
    mods: list[nn.Module] = []
    c_in = 3
    for _ in range(4):
        conv = nn.Conv2d(c_in, 16, 3, padding=1)
        nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
        nn.init.zeros_(conv.bias)
        with torch.no_grad():
            conv.weight.mul_(scale)
        mods += [conv, nn.ReLU()]
        c_in = 16
    mods += [pool(1), nn.Flatten(), nn.Linear(16, 10)]
    return nn.Sequential(*mods)


def cnn_batch() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(16, 3, 16, 16), torch.randint(0, 10, (16,))


def test_a_kaiming_cnn_with_global_average_pooling_is_healthy() -> None:
    torch.manual_seed(0)
    d = gradguard.diagnose(cnn(), cnn_batch(), remedies=False, jacobian_iters=0)
    assert d.verdict == "healthy", d.message
    assert 0.5 < d.per_layer_gain < 2.0
    # Averaging 16x16 positions divides the gradient norm by sqrt(256) = 16 exactly, once:
    # reported apart from the depth gain, not folded into it.
    pooled = [s for s in d.layers if s.shape_steps]
    assert [s.index for s in pooled] == [3]
    assert pooled[0].shape_steps == "8 (AdaptiveAvgPool2d)"
    assert pooled[0].shape_gain == pytest.approx(1 / 16, rel=1e-6)
    assert d.shape_gain == pytest.approx(1 / 16, rel=1e-6)
    assert d.overall_gain == pytest.approx(d.depth_gain / 16, rel=1e-6)
    assert math.prod(s.gain for s in d.layers) == pytest.approx(d.depth_gain, rel=1e-6)
    assert math.prod(s.gain * s.shape_gain for s in d.layers) == pytest.approx(
        d.overall_gain, rel=1e-6
    )
    assert "without the shape changes between layers (8 (AdaptiveAvgPool2d)" in d.message
    assert d.worst_layer is not None and d.worst_layer.index != 3  # pooling is not the culprit


def test_the_same_cnn_with_weights_three_times_larger_explodes() -> None:
    torch.manual_seed(0)
    d = gradguard.diagnose(cnn(scale=3.0), cnn_batch(), remedies=False, jacobian_iters=0)
    assert d.verdict == "exploding", d.message
    # each ReLU conv now multiplies the gradient by about 3 (He init keeps it at ~1)
    assert all(2.0 < s.gain < 4.5 for s in d.layers[:4])
    assert d.per_layer_gain > 1.8


def test_max_pooling_keeps_the_gradient_norm_and_flatten_is_no_shape_change() -> None:
    # Max pooling routes each window's gradient to one entry: the norm is kept exactly.
    torch.manual_seed(0)
    d = gradguard.diagnose(
        cnn(pool=nn.AdaptiveMaxPool2d), cnn_batch(), remedies=False, jacobian_iters=0
    )
    pooled = [s for s in d.layers if s.shape_steps]
    assert len(pooled) == 1 and pooled[0].shape_gain == pytest.approx(1.0, rel=1e-6)
    assert d.depth_gain == pytest.approx(d.overall_gain, rel=1e-6)
    # Flatten keeps the number of elements: never a shape change.
    assert "Flatten" not in pooled[0].shape_steps


# -- ranking weighs the loss after the probe run -----------------------------------------------


def result(name: str, loss: float, gain: float = 1.0, verdict: str = "healthy") -> RemedyResult:
    return RemedyResult(
        name, name, gain, gain, verdict, loss_after=loss, depth_gain=gain**4
    )  # fmt: skip


def test_a_remedy_that_trains_worse_than_no_change_ranks_below_it() -> None:
    ref = result("no change (reference)", 0.463, gain=1.8, verdict="exploding")
    layer_norm = result("layer norm", 0.667, gain=1.0)  # the best gain, but a worse loss
    kaiming = result("kaiming", 0.40, gain=1.1)
    close = result("close", 0.463 * 1.04, gain=1.2)  # within the 5% tolerance
    worse = result("worse", 0.55, gain=1.5)
    nan = result("blew up", math.nan, gain=1.0)
    inf = result("inf", math.inf, gain=1.0)
    broken = RemedyResult("broken", "", error="no layer")
    ranked = rank_remedies([broken, nan, layer_norm, inf, ref, worse, close, kaiming], ref)
    assert [r.name for r in ranked] == [
        "kaiming", "close", "no change (reference)",  # no worse than no change, by gain
        "worse", "layer norm",  # worse than no change, by loss
        "blew up", "inf",  # non-finite: last of the applicable, by gain
        "broken",
    ]  # fmt: skip
    # A tolerance of 0 demotes "close"; a large one keeps "layer norm" in the first tier.
    names = [r.name for r in rank_remedies([ref, close, kaiming], ref, loss_tolerance=0.0)]
    assert names == ["kaiming", "no change (reference)", "close"]
    names = [r.name for r in rank_remedies([ref, layer_norm], ref, loss_tolerance=0.5)]
    assert names == ["layer norm", "no change (reference)"]


def test_ranking_without_training_or_with_a_blown_up_reference() -> None:
    untrained = [result("a", math.nan, 1.5), result("b", math.nan, 1.0)]
    ranked = rank_remedies(untrained, untrained[0], trained=False)
    assert [r.name for r in ranked] == ["b", "a"]  # gains alone decide
    ref = result("no change (reference)", math.inf, gain=3.0, verdict="exploding")
    ranked = rank_remedies([ref, result("x", 9.0, 1.4), result("y", 2.0, 1.1)], ref)
    assert [r.name for r in ranked] == ["y", "x", "no change (reference)"]
    # A loss that is no objective (a bare batch's output.pow(2).mean()): gains decide, but a
    # remedy that blows up still ranks last.
    ref = result("no change (reference)", 0.05, gain=0.2, verdict="vanishing")
    res, nan = result("residual", 9.0, 1.02), result("nan", math.nan, 1.0)
    ranked = rank_remedies([nan, ref, res], ref, by_loss=False)
    assert [r.name for r in ranked] == ["residual", "no change (reference)", "nan"]


def test_diagnose_ranks_by_the_loss_after_training() -> None:
    # A vanishing tanh MLP: re-initializations make it healthy at step 0, but train worse than
    # the unchanged model over the probe run; gains alone ranked them first.
    torch.manual_seed(0)
    model = mlp(6, 16, nn.Tanh)
    batch = (torch.randn(32, 16), torch.randn(32, 16))
    d = gradguard.diagnose(model, batch, steps=5, lr=0.05, jacobian_iters=0)
    assert d.verdict == "vanishing"
    assert_follows_the_ranking_rule(d)
    ref = next(r for r in d.remedies if r.name == "no change (reference)")
    assert math.isfinite(ref.loss_after)
    worse = [r for r in d.remedies if r.applicable and loss_tier(r, ref.loss_after, 0.05) > 0]
    assert any(r.verdict == "healthy" for r in worse), "the test needs a healthy, worse remedy"
    pos = {id(r): i for i, r in enumerate(d.remedies)}
    assert all(pos[id(r)] > pos[id(ref)] for r in worse)
    assert "(worse than no change)" in d.summary()


@pytest.mark.parametrize("bad", [{"loss_tolerance": -0.1}, {"loss_tolerance": math.nan}])
def test_loss_tolerance_is_validated(bad: dict) -> None:
    with pytest.raises(ValueError, match="loss_tolerance"):
        gradguard.diagnose(mlp(2, 3), torch.randn(2, 3), **bad)


# -- attention, and remedies that break the model ----------------------------------------------


def test_diagnose_on_a_transformer_encoder_layer_with_remedies() -> None:
    # Once broke: insert_norm wrapped MultiheadAttention's out_proj in a
    # Sequential, MHA reads out_proj.weight directly, and the whole diagnosis raised.
    torch.manual_seed(0)
    model = nn.Sequential(nn.TransformerEncoderLayer(32, 4, 64, batch_first=True), nn.Linear(32, 1))
    x = torch.randn(4, 10, 32)
    before = copy.deepcopy(model.state_dict())
    d = gradguard.diagnose(model, x, steps=2, jacobian_iters=2)
    assert [s.name for s in d.layers] == ["0.self_attn", "0.linear1", "0.linear2", "1"]
    assert d.verdict == "healthy"
    by_name = {r.name: r for r in d.remedies}
    for kind in ("batch norm", "layer norm"):
        assert not by_name[kind].applicable
        assert "0.self_attn.out_proj" in by_name[kind].error
        assert "parent reads their weights directly" in by_name[kind].error
    for name in ("kaiming init", "LSUV init", "no change (reference)", "clip gradient norm"):
        r = by_name[name]
        assert r.applicable and math.isfinite(r.per_layer_gain) and math.isfinite(r.loss_after)
    assert "layer norm: not applicable: insert_norm found no" in d.summary()
    assert_follows_the_ranking_rule(d)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class _ReadsByName(nn.Module):
    """Reads its child's weight in a way no source scan sees (like a fused kernel would)."""

    def __init__(self, width: int, *, eval_only: bool) -> None:
        super().__init__()
        self.proj = nn.Linear(width, width)
        self.eval_only = eval_only

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        child = getattr(self, "proj")  # noqa: B009 - the point is to hide the attribute read
        if self.eval_only and self.training:
            return torch.relu(child(x))
        return torch.relu(nn.functional.linear(x, child.weight, child.bias))


@pytest.mark.parametrize(
    ("eval_only", "stage"),
    [(False, "its forward and backward in train mode"), (True, "its forward in eval mode")],
)
def test_a_remedy_that_breaks_the_model_is_not_applicable_and_says_why(
    eval_only: bool, stage: str
) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, 8), _ReadsByName(8, eval_only=eval_only), nn.ReLU(), nn.Linear(8, 2)
    )
    d = gradguard.diagnose(model, torch.randn(16, 8), steps=1, jacobian_iters=0)
    by_name = {r.name: r for r in d.remedies}
    for kind in ("batch norm", "layer norm"):
        err = by_name[kind].error
        assert err is not None and err.startswith(f"{stage} raised AttributeError")
        assert "'Sequential' object has no attribute 'weight'" in err
    assert by_name["kaiming init"].applicable and by_name["xavier init"].applicable
    assert f"batch norm: not applicable: {stage} raised" in d.summary()


def test_a_bare_batch_has_no_objective_to_rank_by() -> None:
    torch.manual_seed(0)
    model = mlp(20, 32, nn.Sigmoid)
    d = gradguard.diagnose(model, torch.randn(16, 32), steps=2, jacobian_iters=0)
    assert not d.by_loss and d.steps == 2
    assert d.remedies[0].name == "residual connections"  # the gain fix, whatever its output^2
    assert_follows_the_ranking_rule(d)
    d = gradguard.diagnose(model, torch.randn(16, 32), default_loss, steps=1, remedies=False)
    assert d.by_loss  # an explicit loss_fn is an objective
