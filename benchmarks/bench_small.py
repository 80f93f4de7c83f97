"""Small models: the guard's fixed cost per step, where most users train.

A whole training step (forward, backward, clip or guard, optimizer step, zero_grad) of small
models on the CPU with one thread, timed round-robin, medians:

* a 20-layer MLP (width 256, batch 64: about 9 ms a plain step on one idle core) with SGD +
  momentum and with fused AdamW, and a tiny one (width 64, batch 32),
  where the guard's fixed cost weighs most;
* a small 2-layer LSTM language model with Adam (hidden 128, 8 x 32 tokens: about 5 ms a step;
  the "Guard overhead" section times a larger one, about 60 ms a step).

Methods: ``plain`` (no clipping), ``torch clip`` (``clip_grad_norm_(params, 1.0)`` + step) and
``guard`` (``Guard(model, optimizer)`` with its defaults; ``guard.step(loss)``). Targets: the
guarded step at most 1.10x a torch-clip step on the MLP and at most 1.03x on the LSTM (the tiny
MLP is reported, without a target).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from benchmarks import markdown_table, median_ms_interleaved
from gradguard.guard.guard import Guard

TARGETS = {"mlp": 1.10, "lstm": 1.03, "tiny": None}


def _mlp(width: int = 256) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(16, width), nn.ReLU()]
    for _ in range(18):
        layers += [nn.Linear(width, width), nn.ReLU()]
    layers.append(nn.Linear(width, 1))
    return nn.Sequential(*layers)


class _LSTM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(64, 64)
        self.lstm = nn.LSTM(64, 128, num_layers=2, batch_first=True)
        self.dec = nn.Linear(128, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dec(self.lstm(self.emb(x))[0])  # type: ignore[no-any-return]


def _steps(
    make: Callable[[], nn.Module],
    make_opt: Callable[[nn.Module], torch.optim.Optimizer],
    loss_of: Callable[[nn.Module], torch.Tensor],
) -> dict[str, Callable[[], object]]:
    base = make()
    fns: dict[str, Callable[[], object]] = {}
    for name in ("plain", "torch clip", "guard"):
        model = copy.deepcopy(base)
        opt = make_opt(model)
        guard = Guard(model, opt) if name == "guard" else None

        def step(
            model: nn.Module = model,
            opt: torch.optim.Optimizer = opt,
            name: str = name,
            guard: Guard | None = guard,
        ) -> None:
            loss = loss_of(model)
            loss.backward()
            if guard is not None:
                guard.step(loss)
            else:
                if name == "torch clip":
                    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
            opt.zero_grad(set_to_none=True)

        fns[name] = step
    return fns


def _cases(quick: bool) -> list[tuple[str, str, dict[str, Callable[[], object]]]]:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 16, generator=g), torch.randn(64, 1, generator=g)
    tokens = torch.randint(0, 64, (8, 33), generator=g)

    def mlp_loss(m: nn.Module) -> torch.Tensor:
        return nn.functional.mse_loss(m(x), y)

    def tiny_loss(m: nn.Module) -> torch.Tensor:
        return nn.functional.mse_loss(m(x[:32]), y[:32])

    def lstm_loss(m: nn.Module) -> torch.Tensor:
        out = m(tokens[:, :-1])
        return nn.functional.cross_entropy(out.reshape(-1, 64), tokens[:, 1:].reshape(-1))

    def sgd(m: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9)

    def fused_adamw(m: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True)

    return [
        ("mlp", "20-layer MLP (width 256), SGD momentum", _steps(_mlp, sgd, mlp_loss)),
        ("mlp", "20-layer MLP (width 256), fused AdamW", _steps(_mlp, fused_adamw, mlp_loss)),
        ("tiny", "20-layer MLP (width 64), SGD momentum", _steps(lambda: _mlp(64), sgd, tiny_loss)),
        (
            "lstm",
            "2-layer LSTM LM, Adam",
            _steps(_LSTM, lambda m: torch.optim.Adam(m.parameters(), lr=1e-4), lstm_loss),
        ),
    ]


def run(quick: bool) -> str:
    """The markdown section for docs/benchmarks.md."""
    rows = []
    repeats = 60 if quick else 400
    for kind, label, fns in _cases(quick):
        ms = median_ms_interleaved({k: (f, repeats) for k, f in fns.items()}, warmup=20)
        ratio = ms["guard"] / ms["torch clip"]
        target = TARGETS[kind]
        rows.append(
            [
                label,
                f"{ms['plain']:.3f}",
                f"{ms['torch clip']:.3f}",
                f"{ms['guard']:.3f}",
                f"{ratio:.3f}",
                "-" if target is None else f"<= {target:.2f}",
                "" if target is None else ("met" if ratio <= target else "NOT met"),
            ]
        )
    return "\n".join(
        [
            "## Small models: the guard's fixed cost per step",
            "",
            "A whole step (forward, backward, clip or guard, optimizer step, zero_grad) on the",
            f"CPU, one thread, medians of {repeats} round-robin calls; `guard` is",
            "`Guard(model, optimizer)` with its defaults. Ratio: guard / torch clip.",
            "",
            markdown_table(
                ["model", "plain ms", "torch clip ms", "guard ms", "ratio", "target", ""], rows
            ),
        ]
    )
