"""A small training loop that writes incident bundles the way the guard will.

It keeps a reference to the batch and the RNG state from the end of the previous step, and on an
incident (a non-finite loss or gradient norm, a norm ``10x`` the median of the history, or the
step named by ``incident_at``) calls :meth:`IncidentWriter.write` before the optimizer step, so
the bundle holds the state the step started from. Models and data are built here so that the
tests, the DDP worker and the CLI factories agree on them.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gradguard.core.snapshot import rng_state
from gradguard.guard.incident import IncidentWriter
from gradguard.records.bundle import BundleSpec, unwrap_model

IN, HIDDEN, OUT, ROWS = 8, 16, 1, 16


class ShiftLog(nn.Module):
    """``log(x + shift)``: finite while the shift keeps the input positive."""

    def __init__(self, shift: float = 10.0) -> None:
        super().__init__()
        self.register_buffer("shift", torch.tensor(shift))

    def forward(self, x: Tensor) -> Tensor:
        return torch.log(x + self.shift)


class ShiftExp(nn.Module):
    """``exp(x + shift)``: overflows fp16 (max 65504) above x + shift = 11.1, not fp32."""

    def __init__(self, shift: float = 0.0) -> None:
        super().__init__()
        self.register_buffer("shift", torch.tensor(shift))

    def forward(self, x: Tensor) -> Tensor:
        return torch.exp(x + self.shift)


def mlp(seed: int = 0, dropout: float = 0.1) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(IN, HIDDEN), nn.ReLU(), nn.Dropout(dropout), nn.Linear(HIDDEN, OUT)
    )


def log_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(IN, HIDDEN), ShiftLog(), nn.Linear(HIDDEN, OUT))


def exp_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(IN, HIDDEN), nn.Tanh(), ShiftExp(), nn.Linear(HIDDEN, OUT))


def batch(step: int, rows: int = ROWS, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(rows, IN, generator=g)
    y = x[:, :1] * 0.5 + 0.1 * torch.randn(rows, OUT, generator=g)
    return x.to(dtype), y.to(dtype)


def loss_fn(output: Tensor, b: Any) -> Tensor:
    return nn.functional.mse_loss(output.float(), b[1].float())


def grad_norm(model: nn.Module) -> float:
    grads = [p.grad.detach().double() for p in model.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    directory: Path,
    steps: int,
    *,
    data: Callable[[int], Any] = batch,
    before_step: Callable[[int], None] | None = None,
    after_backward: Callable[[int], None] | None = None,
    incident_at: int | None = None,
    signal: str = "nonfinite",
    writer: IncidentWriter | None = None,
    scaler: Any = None,
    rng_fn: Callable[[], dict[str, Any]] = rng_state,
) -> Path | None:
    """Train until the first incident; returns the bundle written (``None``: no incident)."""
    writer = writer or IncidentWriter(directory)
    history: list[dict[str, Any]] = []
    rng = rng_fn()  # the guard keeps this from the end of the previous step
    names = [n for n, _ in unwrap_model(model).named_parameters()]
    for step in range(steps):
        if before_step is not None:
            before_step(step)
        b = data(step)
        loss = loss_fn(model(b[0]), b)
        loss.backward()
        if after_backward is not None:
            after_backward(step)
        norm = grad_norm(model)
        median = statistics.median(r["grad_norm"] for r in history) if history else math.inf
        bad = (
            not (math.isfinite(float(loss.detach())) and math.isfinite(norm)) or norm > 10 * median
        )
        if bad or step == incident_at:
            path = writer.write(
                BundleSpec(
                    step=step,
                    position=step,
                    action="skip",
                    signal=signal
                    if not bad
                    else "nonfinite"
                    if not math.isfinite(norm)
                    else "spike",
                    reason=f"grad norm {norm:.3g}, loss {float(loss.detach()):.3g}",
                    batch=b,
                    rng=rng,
                    model=model,
                    optimizer=optimizer,
                    scaler=scaler,
                    history=history[-8:],
                    config={"max_norm": 1.0, "policy": object()},
                    recorded={"loss": loss.detach(), "grad_norm": norm},
                )
            )
            optimizer.zero_grad(set_to_none=True)
            return path
        layers = {
            n: float(p.grad.norm()) for n, p in zip(names, model.parameters()) if p.grad is not None
        }
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        history.append(
            {
                "kind": "step",
                "step": step,
                "loss": loss.detach(),  # still a tensor, as the guard's unflushed rows are
                "grad_norm": norm,
                "layers": layers,
            }
        )
        rng = rng_fn()
    return None


def ddp_worker(rank: int, world: int, directory: str) -> dict[str, Any]:
    """Two-rank DDP on gloo: rank 1's share of step 4 has row 3 scaled by 1e4.

    Launched by ``tests._dist_scale.launch``; every rank sees the all-reduced (bad) gradient and
    writes its own bundle (``-rank<r>``), as the guard does after agreeing on the flags.
    """
    model = nn.parallel.DistributedDataParallel(mlp(0, dropout=0.0))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)

    def data(step: int) -> tuple[Tensor, Tensor]:
        x, y = batch(1000 * rank + step, rows=8)
        if step == 4 and rank == 1:
            x[3] *= 1e4
        return x, y

    path = train(model, opt, Path(directory), 8, data=data)
    return {"path": str(path) if path is not None else ""}
