"""The stability benchmark's clean suite C1-C8: healthy, well-tuned runs where a guard must cost
nothing.

Every optimizer a user picks (SGD, SGD with momentum, Adam, AdamW) on four model families (a deep
plain CNN, a wide MLP trained on a *summed* loss, an LSTM, a small transformer), at batch sizes
from 4 to 128. The learning rates are the best of a small sweep without any clipping, and no run
diverges there: whatever a guard does to these runs is a cost. Their healthy gradient norms span
four decades (about 0.3 for the transformers, tens for the CNN, hundreds to thousands for the
summed loss), so a threshold in gradient units cannot suit them all.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from gradguard.app.lab._scenarios import (
    SEQ,
    Batch,
    Problem,
    Scenario,
    _char_problem,
    _generator,
    _heldout,
    corpus,
)
from gradguard.app.lab.models import TinyLM

# -- models ------------------------------------------------------------------------------------

CLASSES, CHANNELS, SIDE, DEPTH = 10, 16, 16, 8


class PlainCNN(nn.Module):
    """``depth`` conv layers of 16 channels, ReLU, no normalization or skips, Kaiming init; two
    stride-2 layers; global average pool and a linear read-out (10 classes)."""

    def __init__(self, depth: int = DEPTH) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(1, CHANNELS, 3, padding=1), nn.ReLU()]
        for i in range(depth - 1):
            stride = 2 if i in (depth // 3, 2 * depth // 3) else 1
            layers += [nn.Conv2d(CHANNELS, CHANNELS, 3, padding=1, stride=stride), nn.ReLU()]
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(CHANNELS, CLASSES)
        for m in self.body.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / m.weight[0].numel()))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


class CharLSTM(nn.Module):
    """Embedding 32 -> one LSTM layer of 128 -> linear read-out."""

    def __init__(self, vocab: int, emb: int = 32, hidden: int = 128) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, emb)
        self.lstm = nn.LSTM(emb, hidden, batch_first=True)
        self.out = nn.Linear(hidden, vocab)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.lstm(self.emb(x))[0])


# -- problems ----------------------------------------------------------------------------------


def _templates() -> Tensor:
    g = torch.Generator().manual_seed(12345)
    raw = torch.randn(CLASSES, 1, SIDE, SIDE, generator=g)
    return nn.functional.avg_pool2d(raw, 3, 1, 1) * 3.0


def _images(n: int, g: torch.Generator, templates: Tensor) -> Batch:
    """Class templates shifted by up to 2 pixels, plus unit noise."""
    y = torch.randint(0, CLASSES, (n,), generator=g)
    shifts = torch.randint(-2, 3, (n, 2), generator=g).tolist()
    x = torch.stack(
        [torch.roll(templates[c], (dy, dx), (1, 2)) for c, (dy, dx) in zip(y.tolist(), shifts)]
    )
    return x + torch.randn(x.shape, generator=g), y


def _cnn(seed: int, quick: bool, *, batch: int, optimizer: str, lr: float, **kw: object) -> Problem:
    torch.manual_seed(seed)
    model = PlainCNN(DEPTH)
    templates = _templates()
    held = [_images(500, torch.Generator().manual_seed(999), templates)]

    def make(position: int) -> Batch:
        return _images(batch, _generator(seed, position, 4), templates)

    def loss(model: nn.Module, b: Batch) -> Tensor:
        return nn.functional.cross_entropy(model(b[0]), b[1])

    return Problem(
        model=model, optimizer=optimizer, lr=lr, steps=150 if quick else 400, batch=make,
        loss=loss, heldout=_heldout(held, loss), **kw,  # type: ignore[arg-type]
    )  # fmt: skip


WIDE_IN, WIDE = 32, 512


def _wide(
    seed: int, quick: bool, *, batch: int, optimizer: str, lr: float, **kw: object
) -> Problem:
    """Two hidden ReLU layers of 512 regressing a fixed random teacher; the loss is the *sum* of
    the squared errors over the batch (``reduction="sum"``), as many user losses are."""
    teacher = nn.Sequential(nn.Linear(WIDE_IN, 64), nn.Tanh(), nn.Linear(64, 1))
    with torch.no_grad():
        g = torch.Generator().manual_seed(4242)
        for p in teacher.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(max(1, p.shape[-1])))
        teacher.requires_grad_(False)
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(WIDE_IN, WIDE), nn.ReLU(), nn.Linear(WIDE, WIDE), nn.ReLU(), nn.Linear(WIDE, 1)
    )

    def target(x: Tensor) -> Tensor:
        with torch.no_grad():
            return teacher(x)

    def make(position: int) -> Batch:
        g = _generator(seed, position, 5)
        x = torch.randn(batch, WIDE_IN, generator=g)
        return x, target(x) + 0.1 * torch.randn(batch, 1, generator=g)

    def loss(model: nn.Module, b: Batch) -> Tensor:
        return nn.functional.mse_loss(model(b[0]), b[1], reduction="sum")

    def mean_loss(model: nn.Module, b: Batch) -> Tensor:
        return nn.functional.mse_loss(model(b[0]), b[1])

    xh = torch.randn(1024, WIDE_IN, generator=torch.Generator().manual_seed(780))
    return Problem(
        model=model, optimizer=optimizer, lr=lr, steps=150 if quick else 400, batch=make,
        loss=loss, heldout=_heldout([(xh, target(xh))], mean_loss), **kw,  # type: ignore[arg-type]
    )  # fmt: skip


def _lstm(
    seed: int, quick: bool, *, batch: int, optimizer: str, lr: float, **kw: object
) -> Problem:
    torch.manual_seed(seed)
    model = CharLSTM(len(corpus()[0]))
    return _char_problem(
        seed, model, batch=batch, steps=150 if quick else 400, optimizer=optimizer, lr=lr, **kw
    )


def _transformer(
    seed: int, quick: bool, *, batch: int, optimizer: str, lr: float, **kw: object
) -> Problem:
    model = TinyLM(vocab=len(corpus()[0]), dim=32, heads=4, layers=2, context=SEQ, seed=seed)
    steps = 150 if quick else 400
    return _char_problem(
        seed, model, batch=batch, steps=steps, optimizer=optimizer, lr=lr, warmup=steps // 10,
        decay=True, **kw,
    )  # fmt: skip


CNN = (
    f"{DEPTH}-layer plain CNN (16 channels, ReLU, Kaiming, no normalization) on 16x16 images of 10 "
)
CNN += "shifted noisy templates, cross-entropy"
WIDE_TXT = (
    f"MLP {WIDE_IN}-{WIDE}-{WIDE}-1 (ReLU) regressing a fixed random teacher plus noise 0.1, "
    "squared error SUMMED over the batch"
)
LSTM = "char-LSTM (embedding 32, one layer of 128) on stdlib docstrings, sequences of 32"
TRANSFORMER = (
    "char-level causal transformer (2 pre-norm layers, width 32, 4 heads) on stdlib docstrings, "
    "linear warm-up over 10% of the steps, cosine decay to 10%"
)


def _scenario(key: str, title: str, setup: str, build: object) -> Scenario:
    return Scenario(key, title, setup, build, clean=True, suite="clean")  # type: ignore[arg-type]


CLEAN: dict[str, Scenario] = {
    s.key: s
    for s in (
        _scenario(
            "C1", "CNN, SGD + momentum, batch 32", f"{CNN}; batch 32, SGD lr 0.01 momentum 0.9",
            lambda seed, quick, lr: _cnn(seed, quick, batch=32, optimizer="sgd", lr=lr or 0.01,
                                         momentum=0.9),
        ),
        _scenario(
            "C2", "CNN, Adam, batch 64", f"{CNN}; batch 64, Adam lr 2e-3",
            lambda seed, quick, lr: _cnn(seed, quick, batch=64, optimizer="adam", lr=lr or 2e-3),
        ),
        _scenario(
            "C3", "wide MLP, summed loss, SGD, batch 4", f"{WIDE_TXT}; batch 4, SGD lr 3e-3",
            lambda seed, quick, lr: _wide(seed, quick, batch=4, optimizer="sgd", lr=lr or 3e-3),
        ),
        _scenario(
            "C4", "wide MLP, summed loss, AdamW, batch 128",
            f"{WIDE_TXT}; batch 128, AdamW lr 1e-3 weight decay 0.01",
            lambda seed, quick, lr: _wide(seed, quick, batch=128, optimizer="adamw",
                                          lr=lr or 1e-3, weight_decay=0.01),
        ),
        _scenario(
            "C5", "LSTM, SGD, batch 16", f"{LSTM}; batch 16, SGD lr 8",
            lambda seed, quick, lr: _lstm(seed, quick, batch=16, optimizer="sgd", lr=lr or 8.0),
        ),
        _scenario(
            "C6", "LSTM, Adam, batch 32", f"{LSTM}; batch 32, Adam lr 1e-2",
            lambda seed, quick, lr: _lstm(seed, quick, batch=32, optimizer="adam", lr=lr or 1e-2),
        ),
        _scenario(
            "C7", "transformer, SGD + momentum, batch 32",
            f"{TRANSFORMER}; batch 32, SGD lr 0.3 momentum 0.9",
            lambda seed, quick, lr: _transformer(seed, quick, batch=32, optimizer="sgd",
                                                 lr=lr or 0.3, momentum=0.9),
        ),
        _scenario(
            "C8", "transformer, AdamW, batch 4",
            f"{TRANSFORMER}; batch 4, AdamW lr 3e-3 betas (0.9, 0.95) weight decay 0.1",
            lambda seed, quick, lr: _transformer(seed, quick, batch=4, optimizer="adamw",
                                                 lr=lr or 3e-3, betas=(0.9, 0.95),
                                                 weight_decay=0.1),
        ),
    )
}  # fmt: skip
