"""Small, seeded models the lab trains: a deep MLP, a vanilla tanh RNN and a tiny transformer LM."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class Block(nn.Module):
    """``relu(norm(W h))``, optionally added to ``h`` (a residual block) with a branch scale."""

    def __init__(self, width: int, *, batchnorm: bool, residual: bool, branch_scale: float) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)
        self.norm: nn.Module = nn.BatchNorm1d(width) if batchnorm else nn.Identity()
        self.residual = residual
        self.branch_scale = branch_scale

    def forward(self, h: Tensor) -> Tensor:
        out = torch.relu(self.norm(self.linear(h)))
        return h + self.branch_scale * out if self.residual else out


def deep_mlp(
    *,
    depth: int = 20,
    width: int = 64,
    inputs: int = 16,
    gain: float = 2.0,
    batchnorm: bool = False,
    residual: bool = False,
    seed: int = 0,
) -> nn.Sequential:
    """A plain MLP ``inputs -> width -> [depth hidden blocks] -> 1`` with a chosen init gain.

    Hidden weights are drawn from ``N(0, gain**2 / fan_in)``: ``gain = sqrt(2)`` is Kaiming (He et
    al. 2015) and keeps ReLU activations at constant scale; ``gain = 2`` multiplies them by about
    ``sqrt(2)`` per layer, so 20 layers amplify the signal and the gradient by about 1000. The input
    and output layers use gain 1; biases start at zero. Residual branches are scaled by
    ``1/sqrt(depth)`` (a common choice so that depth does not add variance).

    Args:
        depth: hidden blocks (>= 1).
        width: hidden units.
        inputs: input features.
        gain: init gain of the hidden layers.
        batchnorm: insert ``BatchNorm1d`` after each hidden linear layer (Ioffe & Szegedy 2015).
        residual: make each hidden block ``h + relu(W h) / sqrt(depth)`` (He et al. 2016).
        seed: seed of the initialization.

    Returns:
        The model (``nn.Sequential``).

    Example:
        >>> model = deep_mlp(depth=20, gain=2.0)
        >>> model(torch.randn(8, 16)).shape
        torch.Size([8, 1])
    """
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth must be an int >= 1, got {depth!r}")
    g = torch.Generator().manual_seed(seed)
    scale = 1.0 / math.sqrt(depth) if residual else 1.0
    blocks = [
        Block(width, batchnorm=batchnorm, residual=residual, branch_scale=scale)
        for _ in range(depth)
    ]
    model = nn.Sequential(nn.Linear(inputs, width), *blocks, nn.Linear(width, 1))
    with torch.no_grad():
        for i, m in enumerate(model):
            lin = m if isinstance(m, nn.Linear) else m.linear
            assert isinstance(lin, nn.Linear)
            std = (1.0 if i in (0, len(model) - 1) else gain) / math.sqrt(lin.in_features)
            lin.weight.normal_(0.0, std, generator=g)
            lin.bias.zero_()
    return model


class TanhRNN(nn.Module):
    """A vanilla tanh RNN with a linear read-out of the last hidden state (Elman 1990).

    The recurrent matrix starts as ``radius`` times a random orthogonal matrix, so its spectral
    radius is ``radius``: above 1 the backpropagated gradient can grow exponentially with the
    sequence length, the regime Pascanu, Mikolov & Bengio (2013) study.
    """

    def __init__(self, inputs: int = 2, hidden: int = 50, radius: float = 1.2, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.rnn = nn.RNN(inputs, hidden, nonlinearity="tanh", batch_first=True)
        self.head = nn.Linear(hidden, 1)
        with torch.no_grad():
            q, _ = torch.linalg.qr(torch.randn(hidden, hidden, generator=g))
            w_hh, w_ih, b_hh, b_ih = (
                getattr(self.rnn, n)
                for n in ("weight_hh_l0", "weight_ih_l0", "bias_hh_l0", "bias_ih_l0")
            )
            w_hh.copy_(radius * q)
            w_ih.normal_(0.0, 1.0 / math.sqrt(inputs), generator=g)
            b_hh.zero_()
            b_ih.zero_()
            self.head.weight.normal_(0.0, 1.0 / math.sqrt(hidden), generator=g)
            self.head.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        h, _ = self.rnn(x)
        return self.head(h[:, -1]).squeeze(-1)


class TinyLM(nn.Module):
    """A causal transformer language model small enough for a CPU: tokens -> next-token logits."""

    def __init__(
        self,
        vocab: int = 32,
        dim: int = 64,
        heads: int = 4,
        layers: int = 2,
        context: int = 32,
        seed: int = 0,
    ) -> None:
        super().__init__()
        torch.manual_seed(seed)  # nn layers draw their init from the global generator
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.zeros(context, dim))
        layer = nn.TransformerEncoderLayer(
            dim, heads, dim_feedforward=4 * dim, dropout=0.0, batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, vocab)
        self.mask: Tensor
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context))

    def forward(self, tokens: Tensor) -> Tensor:
        t = tokens.shape[1]
        h = self.embed(tokens) + self.pos[:t]
        h = self.blocks(h, mask=self.mask[:t, :t], is_causal=True)
        return self.out(self.norm(h))
