"""The training steps the guard's cost is measured on: four models where most users train.

Each :class:`Case` builds a fresh model, its optimizer and a loss over a fixed batch, so every
benchmark (time per step, aten ops per step, heap growth) runs the same steps:

* ``mlp256``: a 20-layer ReLU MLP, width 256, batch 64, SGD with momentum;
* ``mlp64``: the same MLP at width 64 (batch 32), where the guard's fixed cost weighs most;
* ``gpt`` / ``gpt-fused``: a causal transformer LM (4 layers, d=128, 4 heads, T=64, B=8,
  vocabulary 256) with AdamW, and with fused AdamW;
* ``cnn``: a ResNet-18 (torchvision's layout, 11.2M parameters) on 32x32 images, batch 16,
  SGD with momentum.

A step is what a training loop runs: forward, backward, then either ``clip_grad_norm_(params,
1.0)`` and ``optimizer.step()`` (``"torch clip"``), ``optimizer.step()`` alone (``"plain"``) or
``guard.step(loss)`` with the defaults (``"guard"``: eager, as on a CPU; ``"guard compiled"``:
their arithmetic compiled, as on CUDA), then ``zero_grad(set_to_none=True)``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gradguard import Guard, GuardConfig

VARIANTS = ("plain", "torch clip", "guard", "guard compiled")


def guard_for(variant: str, model: nn.Module, opt: torch.optim.Optimizer) -> Guard | None:
    """The guard of ``variant``: the defaults, compiled or not; ``None`` for the others."""
    if variant == "guard":
        return Guard(model, opt, config=GuardConfig(compile=False))  # eager on any device
    if variant == "guard compiled":
        return Guard(model, opt, config=GuardConfig(compile=True))
    return None


def mlp(width: int, depth: int = 20, inputs: int = 16) -> nn.Module:
    """``depth`` linear layers with ReLU between them, one output."""
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(inputs, width), nn.ReLU()]
    for _ in range(depth - 2):
        layers += [nn.Linear(width, width), nn.ReLU()]
    layers.append(nn.Linear(width, 1))
    return nn.Sequential(*layers)


class _Block(nn.Module):
    """A pre-norm GPT block: causal self-attention (SDPA) and a 4x MLP, both residual."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        a = nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """A small causal language model (nanoGPT's shape): tokens -> next-token logits."""

    def __init__(self, vocab: int, dim: int, heads: int, layers: int, context: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(context, dim) * 0.02)
        self.blocks = nn.Sequential(*[_Block(dim, heads) for _ in range(layers)])
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.embed(tokens) + self.pos[: tokens.shape[1]]
        return self.out(self.norm(self.blocks(h)))


class _Basic(nn.Module):
    """ResNet's basic block: two 3x3 convolutions with batch norm and a shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(h)) + self.down(x))


def resnet18(classes: int = 10) -> nn.Module:
    """ResNet-18 in torchvision's layout (7x7 stem, max pool, 4 stages of 2 basic blocks)."""
    torch.manual_seed(0)
    stages: list[nn.Module] = []
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        stages += [_Basic(cin, cout, stride), _Basic(cout, cout, 1)]
        cin = cout
    return nn.Sequential(
        nn.Conv2d(3, 64, 7, 2, 3, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.MaxPool2d(3, 2, 1),
        *stages,
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(512, classes),
    )


@dataclass
class Case:
    """One model's training step: build it, then make a step function per variant."""

    key: str
    label: str
    model: Callable[[], nn.Module]
    optimizer: Callable[[nn.Module], torch.optim.Optimizer]
    loss: Callable[[nn.Module], Tensor]

    def build(self, variant: str) -> tuple[nn.Module, torch.optim.Optimizer, Guard | None]:
        """A fresh model, its optimizer and, for ``"guard"``, a ``Guard`` with the defaults
        (``"guard compiled"``: their arithmetic compiled, ``GuardConfig(compile=True)``)."""
        model = self.model()
        opt = self.optimizer(model)
        return model, opt, guard_for(variant, model, opt)

    def step_fn(
        self,
        variant: str,
        model: nn.Module,
        opt: torch.optim.Optimizer,
        guard: Guard | None,
    ) -> Callable[[], None]:
        """One whole training step of ``variant`` on ``model``."""
        params = [p for p in model.parameters() if p.requires_grad]
        loss_of = self.loss

        def step() -> None:
            loss = loss_of(model)
            loss.backward()
            if guard is not None:
                guard.step(loss)
            else:
                if variant == "torch clip":
                    torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    def steps(self) -> dict[str, Callable[[], None]]:
        """One step function per variant, each on its own copy of one initial model."""
        base = self.model()
        out = {}
        for variant in VARIANTS:
            model = copy.deepcopy(base)
            opt = self.optimizer(model)
            out[variant] = self.step_fn(variant, model, opt, guard_for(variant, model, opt))
        return out


def cases() -> list[Case]:
    """The four models (five cases: the GPT with AdamW and with fused AdamW)."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 16, generator=g), torch.randn(64, 1, generator=g)
    tokens = torch.randint(0, 256, (8, 65), generator=g)
    images = torch.randn(16, 3, 32, 32, generator=g)
    labels = torch.randint(0, 10, (16,), generator=g)

    def mse(batch: int) -> Callable[[nn.Module], Tensor]:
        return lambda m: nn.functional.mse_loss(m(x[:batch]), y[:batch])

    def lm_loss(m: nn.Module) -> Tensor:
        out = m(tokens[:, :-1])
        return nn.functional.cross_entropy(out.reshape(-1, 256), tokens[:, 1:].reshape(-1))

    def sgd(m: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9)

    def gpt() -> nn.Module:
        return GPT(vocab=256, dim=128, heads=4, layers=4, context=64)

    return [
        Case("mlp256", "20-layer MLP (width 256, batch 64), SGD momentum", lambda: mlp(256), sgd,
             mse(64)),
        Case("mlp64", "20-layer MLP (width 64, batch 32), SGD momentum", lambda: mlp(64), sgd,
             mse(32)),
        Case("gpt", "GPT (4 layers, d=128, T=64, B=8), AdamW", gpt,
             lambda m: torch.optim.AdamW(m.parameters(), lr=1e-4), lm_loss),
        Case("gpt-fused", "GPT (4 layers, d=128, T=64, B=8), fused AdamW", gpt,
             lambda m: torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True), lm_loss),
        Case("cnn", "ResNet-18 (32x32, batch 16), SGD momentum", resnet18, sgd,
             lambda m: nn.functional.cross_entropy(m(images), labels)),
    ]  # fmt: skip
