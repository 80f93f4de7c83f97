"""Model transforms of gradguard.insight.remedies, each against a closed form or torch itself."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from gradguard.core.batch import model_input
from gradguard.insight import remedies as R


@pytest.fixture(autouse=True)
def _one_thread():
    # Small models: one intra-op thread is fastest, and on a shared machine two spinning
    # threads per process cost 30x.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def mlp(depth: int = 6, width: int = 16, d_in: int = 16, d_out: int = 4, act=nn.ReLU):
    mods: list[nn.Module] = [nn.Linear(d_in, width), act()]
    for _ in range(depth - 2):
        mods += [nn.Linear(width, width), act()]
    mods.append(nn.Linear(width, d_out))
    return nn.Sequential(*mods)


def same(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize(
    ("scheme", "std"),
    [
        ("kaiming", math.sqrt(2.0 / 400)),  # He: gain sqrt(2) for ReLU, fan-in 400
        ("xavier", math.sqrt(2.0) * math.sqrt(2.0 / (400 + 300))),
    ],
)
def test_reinit_matches_the_closed_form_variance(scheme: str, std: float) -> None:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(400, 300), nn.ReLU(), nn.Linear(300, 300))
    out = R.reinit_(m, scheme)
    assert out is m
    for layer in (m[0], m[2]):
        fan_in = layer.in_features
        want = std if fan_in == 400 else std * math.sqrt(400 / 300) if scheme == "kaiming" else None
        if want is not None:
            assert layer.weight.std().item() == pytest.approx(want, rel=0.03)
        assert torch.count_nonzero(layer.bias) == 0


def test_reinit_orthogonal_gives_orthogonal_rows_and_conv_and_rnn() -> None:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(32, 32), nn.Tanh(), nn.Conv1d(4, 8, 3), nn.RNN(8, 8))
    R.reinit_(m, "orthogonal", nonlinearity="linear")
    w = m[0].weight
    torch.testing.assert_close(w @ w.T, torch.eye(32), atol=1e-5, rtol=0)
    c = m[2].weight.reshape(8, -1)
    torch.testing.assert_close(c @ c.T, torch.eye(8), atol=1e-5, rtol=0)
    hh = m[3].weight_hh_l0
    torch.testing.assert_close(hh @ hh.T, torch.eye(8), atol=1e-5, rtol=0)
    assert torch.count_nonzero(m[3].bias_ih_l0) == 0


def test_reinit_guesses_the_nonlinearity_gain() -> None:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(500, 500), nn.Tanh(), nn.Linear(500, 500), nn.Tanh())
    R.reinit_(m, "kaiming")
    # calculate_gain("tanh") = 5/3
    assert m[0].weight.std().item() == pytest.approx(5 / 3 / math.sqrt(500), rel=0.03)


def test_reinit_rejects_bad_arguments_and_changes_nothing() -> None:
    m = mlp()
    before = copy.deepcopy(m)
    with pytest.raises(ValueError, match="scheme must be one of"):
        R.reinit_(m, "he")
    with pytest.raises(ValueError, match="nonlinearity"):
        R.reinit_(m, "kaiming", nonlinearity="swishy")
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module"):
        R.reinit_([torch.zeros(2, 2)], "kaiming")  # type: ignore[arg-type]
    assert same(m, before)


def test_lsuv_makes_every_layer_output_unit_variance() -> None:
    torch.manual_seed(0)
    m = mlp(depth=8, width=64, d_in=32, d_out=64)
    x = torch.randn(256, 32) * 5.0
    R.lsuv_(m, (x, torch.zeros(256)), tol=0.02)
    outs: list[torch.Tensor] = []
    hooks = [
        layer.register_forward_hook(lambda mod, a, o: outs.append(o.detach()))
        for layer in m
        if isinstance(layer, nn.Linear)
    ]
    with torch.no_grad():
        m(x)
    for h in hooks:
        h.remove()
    assert len(outs) == 8
    for o in outs:
        assert o.var().item() == pytest.approx(1.0, abs=0.03)


def test_lsuv_validates() -> None:
    with pytest.raises(ValueError, match="tol"):
        R.lsuv_(mlp(), torch.randn(4, 16), tol=0)
    with pytest.raises(ValueError, match="max_iter"):
        R.lsuv_(mlp(), torch.randn(4, 16), max_iter=0)


@pytest.mark.parametrize("kind", ["batch", "layer"])
def test_insert_norm_adds_a_norm_after_each_hidden_layer(kind: str) -> None:
    torch.manual_seed(0)
    m = mlp(depth=4)
    before = copy.deepcopy(m)
    new = R.insert_norm(m, kind)
    assert same(m, before)  # the original is untouched
    norm_type = nn.BatchNorm1d if kind == "batch" else nn.LayerNorm
    wrapped = [c for c in new if isinstance(c, nn.Sequential)]
    assert len(wrapped) == 3  # the output layer is left alone
    for w in wrapped:
        assert isinstance(w[0], nn.Linear) and isinstance(w[1], norm_type)
    x = torch.randn(8, 16)
    assert new(x).shape == m(x).shape
    # the normalized hidden activations have zero mean per feature (batch) or per row (layer)
    h = new[0](x)
    axis = 0 if kind == "batch" else 1
    torch.testing.assert_close(h.mean(axis), torch.zeros(h.shape[1 - axis]), atol=1e-5, rtol=0)


def test_insert_norm_conv_and_validation() -> None:
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
    new = R.insert_norm(m, "batch")
    assert isinstance(new[0][1], nn.BatchNorm2d)
    ln = R.insert_norm(m, "layer", skip_last=False)
    assert isinstance(ln[2][1], nn.GroupNorm)
    assert ln(torch.randn(2, 3, 5, 5)).shape == (2, 8, 5, 5)
    with pytest.raises(ValueError, match="kind must be"):
        R.insert_norm(m, "group")


def test_add_residual_wraps_same_shape_blocks_and_computes_x_plus_f() -> None:
    torch.manual_seed(0)
    m = mlp(depth=5, width=16, d_in=8)
    before = copy.deepcopy(m)
    new = R.add_residual(m, scale=0.5)
    assert same(m, before)
    res = [c for c in new if isinstance(c, R.Residual)]
    assert len(res) == 3  # the 16->16 hidden blocks; 8->16 and 16->4 cannot skip
    x = torch.randn(3, 8)
    h = torch.relu(m[0](x))
    for i in (2, 4, 6):
        h = h + 0.5 * torch.relu(m[i](h))
    torch.testing.assert_close(new(x), m[8](h))


def test_add_residual_refuses_when_no_shape_matches() -> None:
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(ValueError, match="no block whose output shape"):
        R.add_residual(m)
    with pytest.raises(ValueError, match="scale"):
        R.add_residual(mlp(), scale=-1.0)


def test_add_residual_conv_same_padding_only() -> None:
    m = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU())
    new = R.add_residual(m)
    assert isinstance(new[0], R.Residual) and isinstance(new[1], nn.Conv2d)
    assert new(torch.randn(1, 4, 6, 6)).shape == (1, 4, 4, 4)


def test_truncate_removes_hidden_blocks_and_keeps_shapes() -> None:
    torch.manual_seed(0)
    m = mlp(depth=10, width=16, d_in=8, d_out=3)
    assert R.truncatable_range(m) == (2, 10)
    new = R.truncate(m, 4)
    assert sum(isinstance(c, nn.Linear) for c in new) == 4
    assert sum(isinstance(c, nn.Linear) for c in m) == 10
    x = torch.randn(5, 8)
    assert new(x).shape == (5, 3)
    # the kept layers are the first ones (input side) and the output layer, with their weights
    torch.testing.assert_close(new[0].weight, m[0].weight)
    torch.testing.assert_close(new[-1].weight, m[-1].weight)
    with pytest.raises(ValueError, match="between 2 and 10"):
        R.truncate(m, 1)
    with pytest.raises(TypeError, match="n_layers must be an int"):
        R.truncate(m, 2.5)  # type: ignore[arg-type]


def test_l2_penalty_matches_the_closed_form_and_its_gradient() -> None:
    torch.manual_seed(0)
    m = mlp(depth=3)
    pen = R.l2_penalty(m, 0.01)
    want = 0.01 * sum((p**2).sum() for p in m.parameters() if p.dim() >= 2)
    torch.testing.assert_close(pen, want)
    pen.backward()
    torch.testing.assert_close(m[0].weight.grad, 0.02 * m[0].weight.detach())
    assert m[0].bias.grad is None
    with_b = R.l2_penalty(list(m.parameters()), 0.01, biases=True)
    assert with_b.item() > pen.item()
    with pytest.raises(ValueError, match="weight must be a finite number >= 0"):
        R.l2_penalty(m, -1.0)


@settings(max_examples=30, deadline=None)
@given(
    st.lists(st.floats(1e-6, 1e6), min_size=1, max_size=40),
    st.floats(0.0, 100.0),
)
def test_suggest_clip_threshold_is_numpys_percentile(values: list[float], p: float) -> None:
    got = R.suggest_clip_threshold([*values, math.nan, math.inf], p)
    assert got == pytest.approx(float(np.percentile(values, p)), rel=1e-9)
    assert R.suggest_clip_threshold(torch.tensor(values), p) == pytest.approx(got, rel=1e-6)


def test_suggest_clip_threshold_validates() -> None:
    with pytest.raises(ValueError, match="percentile must be in"):
        R.suggest_clip_threshold([1.0], 101)
    with pytest.raises(ValueError, match="at least one finite"):
        R.suggest_clip_threshold([math.nan], 50)


def test_model_input() -> None:
    x = torch.zeros(2)
    assert model_input(x) is x and model_input((x, 1)) is x
    with pytest.raises(ValueError, match="non-empty"):
        model_input(())


def test_insert_norm_refuses_a_model_without_hidden_layers() -> None:
    with pytest.raises(ValueError, match="no Linear/Conv layer to normalize"):
        R.insert_norm(nn.Sequential(nn.Linear(3, 2)))
    one = R.insert_norm(nn.Linear(3, 2), "layer", skip_last=False)
    assert isinstance(one, nn.Sequential) and isinstance(one[1], nn.LayerNorm)


def test_insert_norm_leaves_layers_whose_parent_reads_their_weight() -> None:
    # MultiheadAttention passes out_proj.weight to a fused kernel, and TransformerEncoderLayer's
    # inference fast path reads linear1/linear2.weight: wrapped, both raised AttributeError.
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(32, 32), nn.TransformerEncoderLayer(32, 4, 64, batch_first=True), nn.Linear(32, 1)
    )
    x = torch.randn(4, 10, 32)
    new = R.insert_norm(model, "layer", skip_last=False)
    assert isinstance(new[0], nn.Sequential) and isinstance(new[0][1], nn.LayerNorm)
    assert isinstance(new[2], nn.Sequential)
    enc = new[1]
    assert type(enc.self_attn.out_proj) is type(model[1].self_attn.out_proj)
    assert isinstance(enc.linear1, nn.Linear) and isinstance(enc.linear2, nn.Linear)
    assert new.train()(x).shape == (4, 10, 1)
    with torch.no_grad():  # eval + no_grad: the fused path that reads the weights itself
        assert new.eval()(x).shape == (4, 10, 1)
    with pytest.raises(ValueError, match=r"0\.self_attn\.out_proj, 0\.linear1, 0\.linear2"):
        R.insert_norm(nn.Sequential(model[1], nn.Linear(32, 1)), "batch")


class _TiedHead(nn.Module):
    """A parent that reads its child's weight (weight tying in forward)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(6, 6)
        self.proj = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.body(x))
        return nn.functional.linear(h, self.proj.weight.t())


class _Indexed(nn.Module):
    """A parent that indexes its Sequential: restructuring it would move its members."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers[2](self.layers[1](self.layers[0](x)))


def test_custom_parents_that_read_or_index_children_are_left_alone() -> None:
    torch.manual_seed(0)
    m = nn.Sequential(_TiedHead(), nn.Linear(6, 2))
    new = R.insert_norm(m, "batch")
    assert isinstance(new[0].body, nn.Sequential) and isinstance(new[0].proj, nn.Linear)
    x = torch.randn(8, 6)
    assert new(x).shape == (8, 2)
    with pytest.raises(ValueError, match="no block whose output shape"):
        R.add_residual(_Indexed())
    outer = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), _Indexed())
    res = R.add_residual(outer)
    assert isinstance(res[0], R.Residual)  # the outer Sequential is restructured ...
    assert [type(c) for c in res[1].layers] == [type(c) for c in outer[2].layers]  # ... not this
    torch.testing.assert_close(res(x), outer[2](x + torch.relu(outer[0](x))))
