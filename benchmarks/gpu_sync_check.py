"""Check that gradguard's measure-and-clip path never synchronizes the GPU with the host.

Runs every per-step function (norms, the guarded ``clip_grad_norm_`` in each non-finite mode,
``clip_grads_with_norm_``, ``clip_by_norm_``, ``clip_grad_value_``, ``agc_`` and the
``ContiguousGrads`` path) on CUDA gradients, with and without a NaN, under
``torch.cuda.set_sync_debug_mode("error")``, which raises on any device-to-host synchronization
(``.item()``, ``bool(t)``, a blocking copy to the CPU).

Usage: ``python benchmarks/gpu_sync_check.py``. Exit status 0: every check passed; 1: a check
synchronized (the traceback names the line); 2: no CUDA device, nothing was checked.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import gradguard as gg  # noqa: E402


def _model(device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 300), nn.Linear(300, 10)
    ).to(device)


def _backward(model: nn.Module, device: torch.device, poison: bool) -> None:
    model.zero_grad(set_to_none=False)
    x = torch.randn(4, 3, 8, 8, device=device)
    model(x).square().sum().backward()
    if poison:
        first = next(model.parameters()).grad
        assert first is not None
        first.view(-1)[0] = float("nan")  # a device-side write, no sync


def checks(model: nn.Module) -> dict[str, Callable[[], object]]:
    params = list(model.parameters())
    grads = [p.grad for p in params]
    return {
        "grad_norms": lambda: gg.grad_norms(grads),  # type: ignore[arg-type]
        "clip_grad_norm_ propagate": lambda: gg.clip_grad_norm_(params, 1.0),
        "clip_grad_norm_ skip": lambda: gg.clip_grad_norm_(params, 1.0, nonfinite="skip"),
        "clip_grad_norm_ zero": lambda: gg.clip_grad_norm_(params, 1.0, nonfinite="zero"),
        "clip_grad_norm_ inf-norm skip": lambda: gg.clip_grad_norm_(
            params, 1.0, float("inf"), nonfinite="skip"
        ),
        "clip_grads_with_norm_ skip": lambda: gg.clip_grads_with_norm_(
            params,
            1.0,
            gg.get_total_norm(grads),  # type: ignore[arg-type]
            nonfinite="skip",
        ),
        "clip_by_norm_": lambda: gg.clip_by_norm_(params, 1.0),
        "clip_grad_value_": lambda: gg.clip_grad_value_(params, 0.1),
        "agc_": lambda: gg.agc_(model, 0.01),
        "clip_by_global_norm": lambda: gg.clip_by_global_norm(grads, 1.0),  # type: ignore[arg-type]
    }


def main() -> int:
    if not torch.cuda.is_available():
        print(
            "gpu_sync_check: no CUDA device is available, so the "
            'torch.cuda.set_sync_debug_mode("error") check was NOT run.',
            file=sys.stderr,
        )
        return 2
    device = torch.device("cuda")
    model = _model(device)
    buffer_model = _model(device)
    contiguous = gg.ContiguousGrads(buffer_model.parameters())
    failures = 0
    for poison in (False, True):
        for name in checks(model):
            _backward(model, device, poison)
            fn = checks(model)[name]
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                fn()
                status = "ok"
            except RuntimeError as e:
                failures += 1
                status = f"SYNC: {e}"
            finally:
                torch.cuda.set_sync_debug_mode("default")
            print(f"{'NaN' if poison else 'finite'} grads  {name:32s} {status}")
        _backward(buffer_model, device, poison)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            gg.clip_grad_norm_(contiguous, 1.0, nonfinite="skip")
            status = "ok"
        except RuntimeError as e:
            failures += 1
            status = f"SYNC: {e}"
        finally:
            torch.cuda.set_sync_debug_mode("default")
        print(f"{'NaN' if poison else 'finite'} grads  {'ContiguousGrads skip':32s} {status}")
    print(f"gpu_sync_check on {torch.cuda.get_device_name(0)}: {failures} check(s) synchronized")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
