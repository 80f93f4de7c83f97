"""The stability benchmark's scenarios S1-S7: seeded, CPU-sized training problems.

Each scenario builds a :class:`Problem` for one seed (and, for the LR sweep, one learning rate):
a fresh model, the optimizer the user would pick, a batch function keyed by the data position
(so a rollback that replays a position sees the same batch), the injected faults, and a held-out
loss. Nothing is downloaded: the character-level data is the docstrings of a fixed list of
standard-library modules.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from gradguard.app.lab.models import TinyLM

Batch = tuple[Tensor, Tensor]

# Modules whose docstrings make the character corpus: plain English with code, stable across
# 3.11+ patch releases (the corpus is built on the machine that runs the benchmark).
DOC_MODULES = (
    "abc", "argparse", "bisect", "collections", "contextlib", "dataclasses", "enum",
    "functools", "heapq", "inspect", "itertools", "json", "pathlib", "random", "re",
    "shutil", "statistics", "string", "tempfile", "textwrap", "fractions",
)  # fmt: skip


@functools.cache
def corpus() -> tuple[str, Tensor, Tensor]:
    """The character corpus: ``(alphabet, train ids, held-out ids)`` (last 10% held out)."""
    parts: list[str] = []
    for name in DOC_MODULES:
        module = importlib.import_module(name)
        if module.__doc__:
            parts.append(inspect.cleandoc(module.__doc__))
        for attr, obj in sorted(vars(module).items()):
            if attr.startswith("_") or not (inspect.isfunction(obj) or inspect.isclass(obj)):
                continue
            if getattr(obj, "__module__", None) == name and obj.__doc__:
                parts.append(inspect.cleandoc(obj.__doc__))
    text = "".join(c for c in "\n\n".join(parts) if c == "\n" or 32 <= ord(c) < 127)
    alphabet = "".join(sorted(set(text)))
    index = {c: i for i, c in enumerate(alphabet)}
    ids = torch.tensor([index[c] for c in text], dtype=torch.long)
    cut = int(len(ids) * 0.9)
    return alphabet, ids[:cut], ids[cut:]


def _generator(seed: int, position: int, salt: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + position * 7_919 + salt)


def _char_batch(ids: Tensor, batch: int, length: int, g: torch.Generator) -> Batch:
    starts = torch.randint(0, len(ids) - length - 1, (batch,), generator=g)
    rows = torch.stack([ids[int(s) : int(s) + length + 1] for s in starts])
    return rows[:, :-1], rows[:, 1:]


@dataclass
class Problem:
    """One training run's setting: model, optimizer, data, faults and evaluation.

    Attributes:
        model: the freshly initialized model.
        optimizer: ``"sgd"``, ``"adam"`` or ``"adamw"`` (what the user picked; peers that
            replace the optimizer only run where it is Adam or AdamW).
        lr, momentum, betas, weight_decay: the optimizer's hyper-parameters.
        steps: forward-backward passes every method gets (a rollback spends some on replays).
        warmup: linear LR warm-up steps (0: none).
        decay: after the warm-up, cosine decay to 10% of the LR (else constant).
        batch: data position -> ``(inputs, targets)``, faults applied.
        loss: ``(model, batch) -> scalar loss``.
        heldout: ``model -> held-out loss`` (no faults; fixed batches).
        faults: injected fault windows as ``(first, last)`` data positions, inclusive.
        clean_batch: the same batches without the faults (``None``: ``batch`` has none); the
            clean twin run that recovery is measured against uses it.
        units: the factor the training loss is multiplied by (:func:`in_units`); thresholds
            tuned in the scenario's own units scale with it.
    """

    model: nn.Module
    optimizer: str
    lr: float
    steps: int
    batch: Callable[[int], Batch]
    loss: Callable[[nn.Module, Batch], Tensor]
    heldout: Callable[[nn.Module], float]
    momentum: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    warmup: int = 0
    decay: bool = False
    faults: tuple[tuple[int, int], ...] = ()
    clean_batch: Callable[[int], Batch] | None = None
    units: float = 1.0

    def make_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        """The user's optimizer over ``params``."""
        if self.optimizer == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum)
        if self.optimizer == "adam":
            return torch.optim.Adam(params, lr=self.lr, betas=self.betas)
        return torch.optim.AdamW(
            params, lr=self.lr, betas=self.betas, weight_decay=self.weight_decay
        )

    def make_scheduler(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        """Linear warm-up over ``warmup`` steps, then constant or cosine decay to 10%."""
        warm, total, decay = self.warmup, self.steps, self.decay

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            if not decay:
                return 1.0
            frac = min(1.0, (step - warm) / max(1, total - warm))
            return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * frac))

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    def fault_positions(self) -> set[int]:
        return {p for a, b in self.faults for p in range(a, b + 1)}


@dataclass(frozen=True)
class Scenario:
    """A named scenario: what it stresses, and how to build its problem for a seed.

    Attributes:
        key: ``"S1"`` ... ``"S7"``, ``"C1"`` ... ``"C8"`` (the clean suite), and a units variant
            ``"S1x100"`` (:func:`in_units`).
        title: one line.
        setup: model, data, optimizer and faults in words.
        build: ``(seed, quick, lr) -> Problem`` (``lr`` is ``None`` except in an LR sweep).
        lrs: the swept learning rates ``(quick, full)``; empty for a single-setting scenario.
        faulty: the scenario injects faults (its runs have a clean twin).
        clean: a healthy, fault-free run: a guard should not skip, nor cost loss, here.
        units: the loss is multiplied by this (1: the scenario as written).
        base: the key of the scenario in its own units (itself when ``units`` is 1).
        suite: ``"stress"`` (S1-S7 and their units variants: compared with a tuned clip) or
            ``"clean"`` (C1-C8: compared with no clipping, no tuning grid).
    """

    key: str
    title: str
    setup: str
    build: Callable[[int, bool, float | None], Problem]
    lrs: tuple[tuple[float, ...], tuple[float, ...]] = field(default=((), ()))
    faulty: bool = False
    clean: bool = False
    units: float = 1.0
    base: str = ""
    suite: str = "stress"

    @property
    def family(self) -> str:
        """The key in the scenario's own units (``"S1"`` for ``"S1x100"``)."""
        return self.base or self.key

    def settings(self, quick: bool) -> tuple[float | None, ...]:
        swept = self.lrs[0] if quick else self.lrs[1]
        return tuple(swept) if swept else (None,)


# -- models ------------------------------------------------------------------------------------


class CharRNN(nn.Module):
    """Embedding -> 2-layer tanh RNN -> linear read-out, as in ``early_explosion.py``."""

    def __init__(self, vocab: int, emb: int = 32, hidden: int = 64, gain: float = 1.5) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, emb)
        self.rnn = nn.RNN(emb, hidden, num_layers=2, nonlinearity="tanh", batch_first=True)
        self.out = nn.Linear(hidden, vocab)
        for name, p in self.rnn.named_parameters():
            if "weight_hh" in name:  # spectral radius ~gain: the exploding regime
                nn.init.orthogonal_(p, gain=gain)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.rnn(self.emb(x))[0])


def _relu_mlp(depth: int, width: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(width, 1))
    for m in model:
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)
    return model


def _ce(model: nn.Module, batch: Batch) -> Tensor:
    x, y = batch
    logits = model(x)
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def _mse(model: nn.Module, batch: Batch) -> Tensor:
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def _heldout(batches: list[Batch], loss: Callable[[nn.Module, Batch], Tensor]):
    def evaluate(model: nn.Module) -> float:
        model.eval()
        with torch.no_grad():
            value = sum(float(loss(model, b)) for b in batches) / len(batches)
        model.train()
        return value

    return evaluate


# -- builders ----------------------------------------------------------------------------------

SEQ = 32  # characters per sequence (char-GPT and char-RNN)


def _char_problem(
    seed: int,
    model: nn.Module,
    *,
    batch: int,
    steps: int,
    optimizer: str,
    lr: float,
    **kw: object,
) -> Problem:
    _, train, held = corpus()
    g = torch.Generator().manual_seed(777)
    held_batches = [_char_batch(held, 32, SEQ, g) for _ in range(2)]

    def make(position: int) -> Batch:
        return _char_batch(train, batch, SEQ, _generator(seed, position, 1))

    return Problem(
        model=model,
        optimizer=optimizer,
        lr=lr,
        steps=steps,
        batch=make,
        loss=_ce,
        heldout=_heldout(held_batches, _ce),
        **kw,  # type: ignore[arg-type]
    )


def _s1(seed: int, quick: bool, lr: float | None) -> Problem:
    vocab = len(corpus()[0])
    torch.manual_seed(seed)
    model = CharRNN(vocab)
    return _char_problem(
        seed, model, batch=16, steps=120 if quick else 300, optimizer="sgd",
        lr=lr or 1.0, momentum=0.9,
    )  # fmt: skip


def _s2(seed: int, quick: bool, lr: float | None) -> Problem:
    torch.manual_seed(seed)
    width = 64
    model = _relu_mlp(30, width)
    w = torch.randn(width, 1, generator=torch.Generator().manual_seed(5))  # one task, all seeds

    def make(position: int) -> Batch:
        x = torch.randn(64, width, generator=_generator(seed, position, 2))
        return x, torch.sin(x @ w)

    g = torch.Generator().manual_seed(778)
    held = [(x, torch.sin(x @ w)) for x in (torch.randn(256, width, generator=g),)]
    return Problem(
        model=model, optimizer="sgd", lr=lr or 0.2, momentum=0.9,
        steps=120 if quick else 300, batch=make, loss=_mse, heldout=_heldout(held, _mse),
    )  # fmt: skip


def _regression(seed: int, quick: bool, lr: float | None, fault: str) -> Problem:
    """A small tanh MLP regressing ``sin(2 x.w)`` with AdamW, with faults in the stream."""
    torch.manual_seed(seed)
    inputs = 16
    model = nn.Sequential(
        nn.Linear(inputs, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1)
    )
    # one task for every seed: the seed moves the init and the batches, so the seed spread is
    # run-to-run noise, not a different problem
    w = torch.randn(inputs, 1, generator=torch.Generator().manual_seed(10_000)) / 4.0
    steps = 150 if quick else 400
    if fault == "corrupt":  # one within the first 5 steps, one late
        faults: tuple[tuple[int, int], ...] = ((2, 2), (int(steps * 0.7), int(steps * 0.7)))
    else:
        start = steps // 2
        faults = ((start, start + 4),)
    early = faults[0][0]

    def target(x: Tensor) -> Tensor:
        return torch.sin(2.0 * (x @ w))

    def clean(position: int) -> Batch:
        g = _generator(seed, position, 3)
        x = torch.randn(32, inputs, generator=g)
        return x, target(x) + 0.05 * torch.randn(32, 1, generator=g)

    def make(position: int) -> Batch:
        x, y = clean(position)
        if any(a <= position <= b for a, b in faults):
            if fault == "nan":
                x = torch.full_like(x, math.nan)  # a corrupt record
            elif position == early:
                y = y * 1e3  # targets in the wrong unit
            else:
                x = x * 1e4  # inputs not normalized
        return x, y

    g = torch.Generator().manual_seed(779)
    xh = torch.randn(512, inputs, generator=g)
    return Problem(
        model=model, optimizer="adamw", lr=lr or 3e-3, steps=steps, batch=make, loss=_mse,
        heldout=_heldout([(xh, target(xh))], _mse), faults=faults, clean_batch=clean,
    )  # fmt: skip


def _gpt(
    seed: int, quick: bool, lr: float | None, *, batch: int, default_lr: float, healthy: bool
) -> Problem:
    vocab = len(corpus()[0])
    model = TinyLM(vocab=vocab, dim=32, heads=4, layers=2, context=SEQ, seed=seed)
    steps = 150 if quick else 400
    return _char_problem(
        seed, model, batch=batch, steps=steps, optimizer="adamw", lr=lr or default_lr,
        betas=(0.9, 0.95), weight_decay=0.1 if healthy else 0.0, warmup=steps // 10,
        decay=healthy,
    )  # fmt: skip


GPT = (
    "char-level causal transformer (2 pre-norm layers, width 32, 4 heads, context 32) on "
    "stdlib docstrings; AdamW betas (0.9, 0.95), linear warm-up over 10% of the steps"
)
HEALTHY = f"{GPT}, then cosine decay to 10%; weight decay 0.1"

SCENARIOS: dict[str, Scenario] = {
    s.key: s
    for s in (
        Scenario(
            "S1",
            "a char-RNN exploding from the start",
            "2-layer tanh char-RNN (embedding 32, hidden 64, recurrent weights orthogonal at gain "
            "1.5) on stdlib docstrings, sequences of 32, batch 16, SGD lr 1.0 momentum 0.9",
            _s1,
        ),
        Scenario(
            "S2",
            "a 30-layer ReLU MLP with a bad init",
            "30 hidden ReLU layers of width 64, Kaiming init, no normalization or skips, "
            "regressing sin(x.w), batch 64, SGD lr 0.2 momentum 0.9",
            _s2,
        ),
        Scenario(
            "S3",
            "a learning-rate sweep on a tiny char-GPT",
            f"{GPT}, then constant; no weight decay; batch 16; peak LRs swept; LR sensitivity = "
            "mean over the LRs of min(final held-out loss, initial held-out loss) (Wortsman et "
            "al. 2023, arXiv 2309.14322)",
            lambda seed, quick, lr: _gpt(seed, quick, lr, batch=16, default_lr=3e-2, healthy=False),
            lrs=((1e-2, 3e-2, 1e-1, 3e-1, 1.0), (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)),
        ),
        Scenario(
            "S4",
            "corrupt batches: one in the first 5 steps, one late",
            "tanh MLP 16-64-64-1 regressing sin(2 x.w), batch 32, AdamW lr 3e-3; the batch at "
            "position 2 has targets x1e3, the one at 70% of the run inputs x1e4",
            lambda seed, quick, lr: _regression(seed, quick, lr, "corrupt"),
            faulty=True,
        ),
        Scenario(
            "S5",
            "a window of NaN batches",
            "the S4 model and optimizer; 5 consecutive batches at mid-run have NaN inputs",
            lambda seed, quick, lr: _regression(seed, quick, lr, "nan"),
            faulty=True,
        ),
        Scenario(
            "S6",
            "a clean run (no fault)",
            f"{HEALTHY}; batch 16, lr 3e-3; nothing injected",
            lambda seed, quick, lr: _gpt(seed, quick, lr, batch=16, default_lr=3e-3, healthy=True),
            clean=True,
        ),
        Scenario(
            "S7",
            "a healthy but noisy run (small batches)",
            f"{HEALTHY}; batch 2 (64 characters per step), lr 1e-3; nothing injected",
            lambda seed, quick, lr: _gpt(seed, quick, lr, batch=2, default_lr=1e-3, healthy=True),
            clean=True,
        ),
    )
}


# -- units -------------------------------------------------------------------------------------

UNITS = (100.0, 0.01)  # the units variants: the same training problem, the loss x100 and x0.01


def in_units(scenario: Scenario, units: float) -> Scenario:
    """``scenario`` with its training loss multiplied by ``units``: the same problem in other units.

    SGD's learning rate is divided by ``units``, so that an unclipped run takes the same steps
    (up to rounding); Adam and AdamW keep theirs (their step ignores the gradient's scale, up to
    ``eps``). The held-out loss stays in the scenario's own units, so final losses compare across
    units. What changes is every threshold in gradient units: a clip at 1.0 is 100 times tighter
    at ``units=100`` and 100 times looser at ``units=0.01``.

    Example:
        >>> s = in_units(SCENARIOS["S1"], 100.0)
        >>> s.key, s.build(0, True, None).lr
        ('S1x100', 0.01)
    """

    def build(seed: int, quick: bool, lr: float | None) -> Problem:
        problem = scenario.build(seed, quick, lr)
        inner = problem.loss

        def loss(model: nn.Module, batch: Batch) -> Tensor:
            return inner(model, batch) * units

        problem.loss = loss
        problem.units = units
        if problem.optimizer == "sgd":
            problem.lr = problem.lr / units
        return problem

    return Scenario(
        key=f"{scenario.key}x{units:g}",
        title=f"{scenario.title}, loss x{units:g}",
        setup=f"{scenario.setup}; the training loss x{units:g} (SGD's lr /{units:g})",
        build=build,
        lrs=scenario.lrs,
        faulty=scenario.faulty,
        clean=scenario.clean,
        units=units,
        base=scenario.key,
        suite=scenario.suite,
    )
