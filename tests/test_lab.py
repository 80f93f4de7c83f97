"""The lab's experiments in-process: closed forms, training outcomes, result plumbing."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradguard.app.lab import (
    EXPERIMENTS,
    LabResult,
    chain,
    remedies,
    rnn,
    run_experiment,
    spike,
    vectors,
)
from gradguard.app.lab.data import adding_problem, markov_tokens, markov_transition, regression
from gradguard.app.lab.models import TanhRNN, TinyLM, deep_mlp


@pytest.fixture(autouse=True)
def _one_thread():
    # on a machine with few cores, intra-op threads only contend (up to 20x slower)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class CountingTicker:
    def __init__(self) -> None:
        self.totals: list[int] = []
        self.done = 0

    def start(self, description: str, total: int) -> None:
        self.totals.append(total)

    def advance(self, n: int = 1) -> None:
        self.done += n


# -- chain ---------------------------------------------------------------------------------------


def test_chain_matches_seed_number_and_closed_form():
    out, grads = chain.chain_forward_backward(2.34, 20)
    assert out == pytest.approx(2.34**20, rel=1e-12)
    assert out == pytest.approx(24_228_000, rel=1e-3)  # 2.34**20: about 24 million
    # dL/dw_i multiplies every weight but w_i: w^(d-1), the same for every layer of the chain
    for g in grads:
        assert g == pytest.approx(2.34**19, rel=1e-12)
    out, grads = chain.chain_forward_backward(0.5, 20)
    assert grads[0] == pytest.approx(0.5**19, rel=1e-12)
    assert grads[0] < 2e-6


@settings(max_examples=30, deadline=None)
@given(w=st.floats(0.1, 3.0), depth=st.integers(1, 30))
def test_chain_autograd_equals_closed_form(w, depth):
    out, grads = chain.chain_forward_backward(w, depth)
    y, g = chain.closed_form(w, depth)
    assert out == pytest.approx(y, rel=1e-12)
    assert grads[0] == pytest.approx(g, rel=1e-12)


def test_chain_relu_kills_negative_weights():
    # relu(w * 1) = 0 for w < 0: no output and no gradient, the closed form does not apply
    out, grads = chain.chain_forward_backward(-1.5, 5)
    assert out == 0.0 and grads[0] == 0.0


@pytest.mark.parametrize("depth", [0, -1, 2.5, True])
def test_chain_rejects_bad_depth(depth):
    with pytest.raises(ValueError, match="depth"):
        chain.chain_forward_backward(2.0, depth)


def test_chain_run_passes_and_writes_figure(tmp_path):
    ticker = CountingTicker()
    result = chain.run(out=tmp_path, ticker=ticker)
    assert result.passed
    assert (tmp_path / "chain.png").stat().st_size > 1000
    assert ticker.done == ticker.totals[0] == 40
    depth20 = next(r for r in result.rows if r[0] == "2.34" and r[1] == 20)
    assert float(depth20[2]) == pytest.approx(2.34**20, rel=1e-5)


# -- vectors -------------------------------------------------------------------------------------


def test_vectors_seed_loop_equals_closed_form():
    v1, v2 = vectors.EXPLODING
    loop = vectors.seed_loop(v1, v2)
    for a, x, f in zip(loop, v1, v2):
        assert a == pytest.approx(x * f**5, rel=1e-12)
    assert max(loop) > 190  # 1.73 * 2.58^5 = 197.8: explodes
    small = vectors.seed_loop(*vectors.VANISHING)
    assert max(small) < 0.15


def test_vectors_rescaling_bounds_the_norm_and_keeps_direction():
    v1, v2 = vectors.EXPLODING
    none = vectors.rescaled_products(v1, v2, 20, 10.0, "none")
    clipped = vectors.rescaled_products(v1, v2, 20, 10.0, "clip")
    divided = vectors.rescaled_products(v1, v2, 20, 10.0, "divide")
    assert none[-1] > 1e8
    assert max(clipped) <= 10.0 + 1e-9
    assert max(divided) <= 10.0 * max(v2)
    # without rescaling the norm is the closed form's
    closed = math.sqrt(sum((a * b**20) ** 2 for a, b in zip(v1, v2)))
    assert none[-1] == pytest.approx(closed, rel=1e-12)


def test_vectors_rejects_unknown_rule():
    with pytest.raises(ValueError, match="rule"):
        vectors.rescaled_products([1.0], [2.0], 3, 1.0, "scale")


def test_vectors_run_passes(tmp_path):
    ticker = CountingTicker()
    result = vectors.run(out=tmp_path, ticker=ticker)
    assert result.passed
    assert ticker.done == ticker.totals[0]
    assert (tmp_path / "vectors.png").exists()


# -- models and data -----------------------------------------------------------------------------


def test_deep_mlp_gain_controls_growth():
    x = torch.randn(256, 16, generator=torch.Generator().manual_seed(0))
    big = deep_mlp(depth=20, gain=2.0)(x).std()
    kaiming = deep_mlp(depth=20, gain=math.sqrt(2.0))(x).std()
    assert big > 100 * kaiming  # about sqrt(2)^20 = 1024 apart


def test_deep_mlp_is_seeded_and_validates():
    a, b = deep_mlp(seed=3), deep_mlp(seed=3)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="depth"):
        deep_mlp(depth=0)


def test_adding_problem_targets():
    x, y = adding_problem(64, 10, torch.Generator().manual_seed(0))
    assert x.shape == (64, 10, 2)
    assert torch.equal(x[..., 1].sum(1), torch.full((64,), 2.0))
    assert torch.allclose((x[..., 0] * x[..., 1]).sum(1), y)
    with pytest.raises(ValueError, match="length"):
        adding_problem(4, 1, torch.Generator())


def test_tanh_rnn_spectral_radius_and_shapes():
    m = TanhRNN(radius=1.1, seed=0)
    eig = torch.linalg.eigvals(m.rnn.weight_hh_l0.detach()).abs()
    assert eig.max().item() == pytest.approx(1.1, rel=1e-4)
    assert m(torch.randn(3, 7, 2)).shape == (3,)


def test_markov_data_and_lm_shapes():
    p = markov_transition(32, seed=0)
    assert torch.allclose(p.sum(1), torch.ones(32))
    tokens = markov_tokens(4, 9, 32, p, torch.Generator().manual_seed(0))
    assert tokens.shape == (4, 9) and tokens.max() < 32
    assert TinyLM()(tokens[:, :8]).shape == (4, 8, 32)
    # the entropy rate is a lower bound no model beats, and below the uniform log(32)
    assert 0 < spike.entropy_rate(p) < math.log(32)


def test_regression_is_seeded():
    assert torch.equal(regression(seed=1)[1], regression(seed=1)[1])
    assert not torch.equal(regression(seed=1)[1], regression(seed=2)[1])


# -- training experiments (reduced) --------------------------------------------------------------


def _remedy(name: str) -> remedies.Remedy:
    return next(r for r in remedies.REMEDIES if r.name == name)


def test_remedies_baseline_diverges_and_kaiming_fixes_it():
    base = remedies.train(_remedy("none"), steps=30, seed=0)
    assert base.first_nonfinite is not None and base.first_nonfinite < 5
    assert math.isnan(base.final_loss)
    fixed = remedies.train(_remedy("Kaiming init"), steps=60, seed=0)
    assert fixed.first_nonfinite is None
    _, y = regression(seed=0)
    assert fixed.final_loss < float(y.var(unbiased=False))


def test_remedies_global_norm_clipping_keeps_training_finite():
    run = remedies.train(_remedy("global norm"), steps=40, seed=0)
    assert run.first_nonfinite is None
    assert math.isfinite(run.final_loss)
    assert run.max_grad_norm > 1e5  # the pre-clip norm is still huge: clipping, not a cure


def test_rnn_clipping_solves_what_plain_sgd_cannot():
    plain = rnn.train(length=20, clip=False, steps=400, seed=0)
    clipped = rnn.train(length=20, clip=True, steps=400, seed=0)
    assert plain.first_nonfinite is not None
    assert clipped.first_nonfinite is None
    assert clipped.test_mse < 1 / 6  # better than predicting the mean already


def test_spike_guard_survives_poison_that_breaks_unguarded():
    steps = 60
    bad, _, _ = spike.train("unguarded", steps=steps, seed=0)
    skip, _, counts = spike.train("guarded: skip", steps=steps, seed=0)
    clean, _, _ = spike.train("clean", steps=steps, seed=0)
    rollback, _, rb_counts = spike.train("guarded: rollback", steps=steps, seed=0)
    assert math.isnan(bad)
    assert counts.get("skip", 0) >= 4  # the four NaN batches at least
    assert rb_counts.get("rollback", 0) >= 1
    assert abs(skip - clean) < 0.1
    assert abs(rollback - clean) < 0.1


def test_spike_rejects_unknown_mode():
    with pytest.raises(ValueError, match="mode"):
        spike.train("guarded: pray", steps=5, seed=0)


# -- plumbing ------------------------------------------------------------------------------------


def test_run_experiment_validates_and_saves(tmp_path):
    with pytest.raises(ValueError, match="experiment"):
        run_experiment("nope")
    with pytest.raises(ValueError, match="seeds"):
        run_experiment("chain", seeds=0)
    result = run_experiment("chain", out=tmp_path)
    saved = json.loads((tmp_path / "chain.json").read_text())
    assert saved["passed"] is True and saved["name"] == "chain"
    assert LabResult(**saved).to_markdown().startswith("### chain")
    assert set(EXPERIMENTS) == {"chain", "vectors", "remedies", "rnn", "spike"}
    assert result.rows == saved["rows"]


@pytest.mark.parametrize("module", [remedies, rnn, spike])
def test_training_experiments_reject_bad_seeds(module):
    with pytest.raises(ValueError, match="seeds"):
        module.run(seeds=0)
