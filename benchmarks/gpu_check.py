"""The GPU check, one script: host syncs, on-device skips, launches and time per guarded step.

On a CUDA device it runs a small transformer LM (4 layers, d=128, T=64, B=8) in four variants
(fp32 with fused AdamW, fp32 with AdamW, bf16 autocast with fused AdamW, fp16 autocast with a
GradScaler and fused AdamW), each guarded with the defaults, and measures:

1. **host syncs per step** under ``torch.cuda.set_sync_debug_mode("warn")``, one count per
   step (every warning is one synchronizing call): a fused optimizer lets the guard decide on
   the device (``sync="auto"`` picks ``"lazy"``: 0 syncs on a clean step, the flags read one
   step late); any other optimizer needs the flags on the host before it steps (``"step"``: 1
   sync per step). The record flush (one blocking copy every ``flush_every`` steps) is counted
   apart. A plain torch-clip step is measured beside it, and gradguard's per-step functions
   (norms, ``clip_grad_norm_`` in each non-finite mode, ``agc_``, ``ContiguousGrads``) are run
   once each under ``"error"`` with finite and NaN gradients: none may synchronize;
2. **skips on the device**: a NaN loss and a 10^4x loss spike are skipped with the weights,
   Adam's moments and its step counters unchanged, and the records say so once the flags are
   read (one step late in lazy mode);
3. **kernel launches per step** (``torch.profiler``, every CUDA kernel, memcpy and memset) and
   the guarded / torch-clip step time ratio (CUDA events, variants alternating, medians).

It prints one compact report and, with ``--json PATH``, writes it as JSON. Without CUDA it says
so and exits 0. Exit status 1: a check failed (the report says which).

Usage: ``python benchmarks/gpu_check.py [--quick] [--json gpu-check.json]`` (``--quick``: under
about 3 minutes on one GPU). ``--dry-run-cpu`` runs the same code on the CPU with a tiny model
and a few steps (syncs and launches then read 0), so a CPU test keeps the script working.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
for _path in (ROOT / "src", ROOT):  # run as a script: make `src/` and `benchmarks` importable
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

import gradguard as gg  # noqa: E402
from benchmarks.models import GPT  # noqa: E402

NO_CUDA = "gpu_check: CUDA not available, so nothing was checked (run it on a CUDA GPU)."
VOCAB, T, B = 256, 64, 8


class Sizes:
    """Steps per phase and the model; ``full``, ``quick`` or the CPU dry run's ``smoke``."""

    def __init__(self, kind: str) -> None:
        self.warmup, self.clean, self.timed, self.profiled = {
            "full": (30, 100, 300, 10),
            "quick": (30, 20, 50, 10),
            "smoke": (4, 2, 2, 1),
        }[kind]
        small = kind == "smoke"
        self.model = {"dim": 32 if small else 128, "layers": 1 if small else 4}


# name: (fused AdamW, autocast dtype, GradScaler, expected syncs on a clean step)
VARIANTS: dict[str, tuple[bool, torch.dtype | None, bool, int]] = {
    "fp32, fused AdamW": (True, None, False, 0),
    "fp32, AdamW": (False, None, False, 1),
    "bf16 autocast, fused AdamW": (True, torch.bfloat16, False, 0),
    "fp16 + GradScaler, fused AdamW": (True, torch.float16, True, 0),
}


# -- syncs -------------------------------------------------------------------------------------


def count_syncs(fn: Callable[[], object]) -> int:
    """Synchronizing CUDA calls made by ``fn()`` (one warning each in ``"warn"`` mode)."""
    if not torch.cuda.is_available():  # the CPU dry run: nothing to synchronize with
        fn()
        return 0
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def functions_sync_free(device: str) -> dict[str, str]:
    """gradguard's per-step functions under ``"error"``: ``{"<grads> <name>": "ok" | error}``."""
    cuda = device == "cuda"

    def model() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 300),
            nn.Linear(300, 10),
        ).to(device)  # fmt: skip

    def backward(m: nn.Module, poison: bool) -> None:
        m.zero_grad(set_to_none=False)
        m(torch.randn(4, 3, 8, 8, device=device)).square().sum().backward()
        if poison:
            first = next(m.parameters()).grad
            assert first is not None
            first.view(-1)[0] = float("nan")  # a device-side write, no sync

    m, flat_model = model(), model()
    contiguous = gg.ContiguousGrads(flat_model.parameters())
    params = list(m.parameters())

    def grads() -> list[Tensor]:
        return [p.grad for p in params if p.grad is not None]

    checks: dict[str, Callable[[], object]] = {
        "grad_norms": lambda: gg.grad_norms(grads()),
        "clip_grad_norm_ propagate": lambda: gg.clip_grad_norm_(params, 1.0),
        "clip_grad_norm_ skip": lambda: gg.clip_grad_norm_(params, 1.0, nonfinite="skip"),
        "clip_grad_norm_ zero": lambda: gg.clip_grad_norm_(params, 1.0, nonfinite="zero"),
        "clip_grad_norm_ inf-norm skip": lambda: gg.clip_grad_norm_(
            params, 1.0, float("inf"), nonfinite="skip"
        ),
        "clip_grads_with_norm_ skip": lambda: gg.clip_grads_with_norm_(
            params, 1.0, gg.get_total_norm(grads()), nonfinite="skip"
        ),
        "clip_by_norm_": lambda: gg.clip_by_norm_(params, 1.0),
        "clip_grad_value_": lambda: gg.clip_grad_value_(params, 0.1),
        "agc_": lambda: gg.agc_(m, 0.01),
        "clip_by_global_norm": lambda: gg.clip_by_global_norm(grads(), 1.0),
        "ContiguousGrads skip": lambda: gg.clip_grad_norm_(contiguous, 1.0, nonfinite="skip"),
    }
    out = {}
    for poison in (False, True):
        for name, fn in checks.items():
            backward(flat_model if name.startswith("Contiguous") else m, poison)
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")
            try:
                fn()
                status = "ok"
            except RuntimeError as e:
                status = f"SYNC: {str(e).splitlines()[0]}"
            finally:
                if cuda:
                    torch.cuda.set_sync_debug_mode("default")
            out[f"{'NaN' if poison else 'finite'} {name}"] = status
    return out


# -- one variant's training steps --------------------------------------------------------------


class _Flushes:
    """A sink that only counts the recorder's flushes (each one a blocking copy to the host)."""

    def __init__(self) -> None:
        self.count = 0

    def write(self, rows: list[dict[str, Any]]) -> None:
        self.count += 1

    def close(self) -> None:
        pass


class Run:
    """A model, its optimizer (and scaler), and one training step, guarded or torch-clipped."""

    def __init__(
        self, base: nn.Module, variant: str, guarded: bool, compile: bool | None = None
    ) -> None:
        fused, self.dtype, scaled, _ = VARIANTS[variant]
        self.device = next(base.parameters()).device.type
        self.model = copy.deepcopy(base)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3, fused=fused)
        self.scaler = torch.amp.GradScaler(self.device) if scaled else None
        config = gg.GuardConfig(compile=compile)  # None: compiled on CUDA, the default
        self.guard = (
            gg.Guard(self.model, self.opt, scaler=self.scaler, config=config) if guarded else None
        )
        self.flushes = _Flushes()
        if self.guard is not None:
            self.guard.recorder.sinks.append(self.flushes)
        g = torch.Generator(device=self.device).manual_seed(0)
        self.tokens = torch.randint(0, VOCAB, (16, B, T + 1), device=self.device, generator=g)
        self.i = 0

    def step(self, scale: float = 1.0) -> None:
        """One step on the next batch; ``scale`` multiplies the loss (NaN or a spike)."""
        batch = self.tokens[self.i % len(self.tokens)]
        self.i += 1
        amp = torch.autocast(self.device, dtype=self.dtype) if self.dtype else nullcontext()
        with amp:
            out = self.model(batch[:, :-1]).float()
        loss = nn.functional.cross_entropy(out.reshape(-1, VOCAB), batch[:, 1:].reshape(-1))
        if scale != 1.0:
            loss = loss * scale
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        if self.guard is not None:
            self.guard.step(loss)
        else:
            if self.scaler is not None:
                self.scaler.unscale_(self.opt)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            if self.scaler is not None:
                self.scaler.step(self.opt)
                self.scaler.update()
            else:
                self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def state(self) -> list[Tensor]:
        """Weights, then every optimizer state tensor (moments, step counters), cloned."""
        out = [p.detach().clone() for p in self.model.parameters()]
        for p in self.model.parameters():
            for v in self.opt.state.get(p, {}).values():
                if isinstance(v, Tensor):
                    out.append(v.detach().clone())
        return out


def _unchanged(before: list[Tensor], after: list[Tensor]) -> bool:
    return len(before) == len(after) and all(
        torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0)) for a, b in zip(before, after)
    )


def syncs_and_skips(base: nn.Module, variant: str, sizes: Sizes) -> dict[str, Any]:
    """Syncs per step (guarded and torch-clip), and a NaN step and a loss spike skipped."""
    # the CPU dry run has no device to wait for: 0 syncs in every variant
    expected = VARIANTS[variant][3] if next(base.parameters()).is_cuda else 0
    run, plain = Run(base, variant, True), Run(base, variant, False)
    assert run.guard is not None
    for _ in range(sizes.warmup):  # past the policy's and the loss-spike rule's warm-up
        run.step()
        plain.step()
    clean_syncs: list[int] = []
    flush_syncs: list[int] = []
    for _ in range(sizes.clean):
        flushes = run.flushes.count
        n = count_syncs(run.step)
        (flush_syncs if run.flushes.count > flushes else clean_syncs).append(n)
    clip_syncs = [count_syncs(plain.step) for _ in range(min(sizes.clean, 10))]
    skips = {}
    for name, scale in (("nan", float("nan")), ("spike", 1e4)):
        run.guard.flush()  # settle what is pending, so the bad step starts clean
        before, at = run.state(), run.guard.step_count
        n = count_syncs(functools.partial(run.step, scale))
        unchanged = _unchanged(before, run.state())  # before any later step reads its flags
        for _ in range(2):
            run.step()
        actions = {r.get("action") for r in run.guard.records if r["step"] == at}
        skips[name] = {
            "unchanged": unchanged,
            "syncs_in_step": n,
            "recorded_actions": sorted(str(a) for a in actions),
            "ok": unchanged and "skip" in actions,
        }
    return {
        "lazy": bool(getattr(run.guard, "lazy", False)),
        "expected_syncs": expected,
        "syncs_per_clean_step": {
            "median": statistics.median(clean_syncs) if clean_syncs else None,
            "max": max(clean_syncs, default=None),
        },
        "syncs_per_flush_step": max(flush_syncs, default=None),
        "torch_clip_syncs_per_step": statistics.median(clip_syncs),
        "syncs_ok": bool(clean_syncs) and min(clean_syncs) == max(clean_syncs) == expected,
        "skips": skips,
    }


# -- launches and time -------------------------------------------------------------------------


def launches_per_step(run: Run, steps: int) -> float:
    """CUDA kernels, memcpys and memsets per step, from ``torch.profiler``."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = run.device == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    _sync(run.device)
    with profile(activities=activities) as prof:
        for _ in range(steps):
            run.step()
        _sync(run.device)
    n = sum(1 for e in prof.events() if e.device_type == DeviceType.CUDA)
    return n / steps


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def step_ms(run: Run) -> float:
    """One step's time: CUDA events on the GPU, the wall clock in the CPU dry run."""
    if run.device != "cuda":
        start_s = time.perf_counter()
        run.step()
        return (time.perf_counter() - start_s) * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    run.step()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def launches_and_time(base: nn.Module, variant: str, sizes: Sizes) -> dict[str, Any]:
    """Launches per step and median step ms (alternating) of torch clip, the guard with its
    defaults (its decision compiled on CUDA) and the guard with an eager decision."""
    runs = {
        "torch clip": Run(base, variant, False),
        "guard": Run(base, variant, True),
        "guard eager": Run(base, variant, True, compile=False),
    }
    for r in runs.values():
        for _ in range(sizes.warmup):
            r.step()
    launches = {k: launches_per_step(r, sizes.profiled) for k, r in runs.items()}
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(sizes.timed):
        for k, r in runs.items():
            times[k].append(step_ms(r))
    ms = {k: statistics.median(v) for k, v in times.items()}
    return {
        "launches_per_step": launches,
        "extra_launches": launches["guard"] - launches["torch clip"],
        "extra_launches_eager": launches["guard eager"] - launches["torch clip"],
        "step_ms": ms,
        "ratio": ms["guard"] / ms["torch clip"],
        "ratio_eager": ms["guard eager"] / ms["torch clip"],
    }


# -- report ------------------------------------------------------------------------------------


def _line(name: str, r: dict[str, Any]) -> str:
    s = r["syncs"]
    sk = s["skips"]
    t = r["speed"]
    return (
        f"{name:32s} syncs/step {s['syncs_per_clean_step']['median']} (expected "
        f"{s['expected_syncs']}, {'ok' if s['syncs_ok'] else 'NOT OK'}; flush "
        f"{s['syncs_per_flush_step']}; torch clip {s['torch_clip_syncs_per_step']})  "
        f"nan skip {'ok' if sk['nan']['ok'] else 'FAILED'}  spike skip "
        f"{'ok' if sk['spike']['ok'] else 'FAILED'}  launches {t['launches_per_step']['guard']:.0f}"
        f" vs {t['launches_per_step']['torch clip']:.0f} (+{t['extra_launches']:.0f})  "
        f"time x{t['ratio']:.3f} ({t['step_ms']['guard']:.2f} / "
        f"{t['step_ms']['torch clip']:.2f} ms); eager decision +{t['extra_launches_eager']:.0f} "
        f"launches, x{t['ratio_eager']:.3f}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps (under ~3 minutes)")
    parser.add_argument("--json", type=Path, default=None, help="write the report here")
    parser.add_argument(
        "--dry-run-cpu",
        action="store_true",
        help="run the script's code on the CPU, tiny model, few steps (a test of the script)",
    )
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.dry_run_cpu:
        print(NO_CUDA)
        if args.json is not None:
            args.json.write_text(json.dumps({"cuda": False, "message": NO_CUDA}, indent=2))
        return 0
    device = "cuda" if cuda and not args.dry_run_cpu else "cpu"
    if device == "cpu":
        torch.set_num_threads(1)  # a busy machine's descheduled worker threads stall every op
    sizes = Sizes("smoke" if args.dry_run_cpu else "quick" if args.quick else "full")
    torch.manual_seed(0)
    base = GPT(vocab=VOCAB, heads=4, context=T, **sizes.model).to(device)
    one_sync = 1 if device == "cuda" else 0
    self_test = count_syncs(lambda: torch.ones(1, device=device).item())
    report: dict[str, Any] = {
        "cuda": device == "cuda",
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu (dry run)",
        "torch": torch.__version__,
        "quick": args.quick,
        "sync_counter_self_test": self_test,  # one .item(): must count 1 on a GPU
        "functions": functions_sync_free(device),
        "variants": {},
    }
    for variant in VARIANTS:
        report["variants"][variant] = {
            "syncs": syncs_and_skips(base, variant, sizes),
            "speed": launches_and_time(base, variant, sizes),
        }
    failed = [k for k, v in report["functions"].items() if v != "ok"]
    for name, r in report["variants"].items():
        if not r["syncs"]["syncs_ok"]:
            failed.append(f"{name}: syncs per clean step")
        failed += [f"{name}: {k} skip" for k, v in r["syncs"]["skips"].items() if not v["ok"]]
    if self_test != one_sync:
        failed.append(f"the sync counter's self-test (one .item() counted {self_test})")
    report["failed"] = failed
    print(f"gpu_check on {report['device']}, torch {report['torch']}")
    bad = [k for k, v in report["functions"].items() if v != "ok"]
    n = len(report["functions"])
    print(f"per-step functions sync-free: {n - len(bad)}/{n}", *[f"(syncing: {b})" for b in bad])
    for name, r in report["variants"].items():
        print(_line(name, r))
    print("all checks passed" if not failed else "FAILED: " + "; ".join(failed))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2, default=str))
        print(f"wrote {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
