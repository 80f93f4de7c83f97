"""Seeded synthetic data for the lab: regression, the adding problem and a Markov-chain language."""

from __future__ import annotations

import torch
from torch import Tensor


def regression(n: int = 512, inputs: int = 16, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``y = sin(X w) + 0.1 noise`` with ``X ~ N(0, I)``: a smooth target a small MLP can fit.

    Returns:
        ``(X, y)`` of shapes ``(n, inputs)`` and ``(n, 1)``.
    """
    g = torch.Generator().manual_seed(10_000 + seed)
    x = torch.randn(n, inputs, generator=g)
    w = torch.randn(inputs, 1, generator=g) / inputs**0.5
    y = torch.sin(2.0 * (x @ w)) + 0.1 * torch.randn(n, 1, generator=g)
    return x, y


def adding_problem(batch: int, length: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """The adding problem (Hochreiter & Schmidhuber 1997; Pascanu et al. 2013).

    Each sequence has two channels: a value drawn uniformly from [0, 1] and a marker that is 1 at
    exactly two positions, one in the first half and one in the second. The target is the sum of
    the two marked values. Predicting the mean (1.0) gives a mean squared error of 1/6.

    Returns:
        ``(x, y)``: ``x`` of shape ``(batch, length, 2)``, ``y`` of shape ``(batch,)``.
    """
    if length < 2:
        raise ValueError(f"length must be >= 2, got {length!r}")
    values = torch.rand(batch, length, generator=generator)
    half = length // 2
    first = torch.randint(0, half, (batch,), generator=generator)
    second = torch.randint(half, length, (batch,), generator=generator)
    marks = torch.zeros(batch, length)
    rows = torch.arange(batch)
    marks[rows, first] = 1.0
    marks[rows, second] = 1.0
    y = values[rows, first] + values[rows, second]
    return torch.stack([values, marks], dim=-1), y


def markov_tokens(
    batch: int, length: int, vocab: int, transition: Tensor, generator: torch.Generator
) -> Tensor:
    """Token sequences from a first-order Markov chain with the given transition matrix."""
    tokens = torch.empty(batch, length, dtype=torch.long)
    tokens[:, 0] = torch.randint(0, vocab, (batch,), generator=generator)
    for t in range(1, length):
        probs = transition[tokens[:, t - 1]]
        tokens[:, t] = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return tokens


def markov_transition(vocab: int, seed: int = 0, concentration: float = 0.3) -> Tensor:
    """A random sparse-ish transition matrix (rows from a Dirichlet), so the chain is learnable."""
    g = torch.Generator().manual_seed(20_000 + seed)
    gamma = torch._standard_gamma(torch.full((vocab, vocab), concentration), generator=g)
    return gamma / gamma.sum(dim=1, keepdim=True)
