"""Aten ops per training step: what a guarded step runs beyond a torch-clip step, by component.

Every aten op of a whole step (forward, backward, clip or guard, optimizer step, zero_grad) is
counted by a ``TorchDispatchMode``. Each op is charged to the component running when it was
dispatched: the benchmark wraps the live guard's component objects (``guard.policy``, each of
``guard.detectors``, ``guard.nonfinite_rule``, ``guard.responder``, ``guard.buffers``,
``guard.lr_scale``, ``guard.recorder``) method by method, every gradguard function the
guard's modules call (norms, flags, measuring), and the guard's own methods, so the library
needs no hooks; the optimizer's step is marked by its own step hooks. The innermost wrapper
wins: ops of ``policy.update`` called from ``Guard._decide`` count for the policy.

Counts are averages over 50 steps after a warm-up past the policy's own (so one record flush,
every 50 steps by default, is included). An op is one dispatch of an aten operator: a foreach
op over 40 tensors is one op, as it is one kernel launch (per device and dtype) on a GPU; the
profiler's ``record_function`` marks (optimizer.step, zero_grad) run no kernel and are not
counted. Target: at most 25 extra ops per guarded step beyond a torch-clip step, with the defaults.
"""

from __future__ import annotations

import collections
import functools
import inspect
import sys
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from benchmarks import markdown_table
from benchmarks.models import Case, cases
from gradguard.core.fuse import Kernel

TARGET_EXTRA = 25
MODEL = "forward, backward, zero_grad"
CLIP = "torch clip_grad_norm_"
OPTIMIZER = "optimizer step"
STEPS = 50
WARMUP = 30

# The guard's attributes that hold components, and the component each one is.
COMPONENTS = {
    "policy": "policy",
    "detectors": "detector",
    "nonfinite_rule": "non-finite check",
    "responder": "flags/skip",
    "lr_scale": "flags/skip",
    "buffers": "buffer keeping",
    "recorder": "records",
}
# The component of a gradguard function, by the module that defines it; a module not named
# here is its own component (``gradguard.guard.measure`` -> ``measure``).
MODULES = {
    "gradguard.core.norms": "norms",
    "gradguard.core.distributed": "norms",
    "gradguard.core.clip": "clip",
    "gradguard.guard.skip": "flags/skip",
    "gradguard.guard.step": "flags/skip",
    "gradguard.guard.response": "flags/skip",
    "gradguard.guard.guard": "guard (own code)",
    "gradguard.decide.detect": "detector",
    "gradguard.decide.policies": "policy",
    "gradguard.records.recorder": "records",
}
# The packages whose modules' function globals are wrapped (where the guard's calls go).
PACKAGES = ("gradguard.core.", "gradguard.decide.", "gradguard.guard.", "gradguard.records.")


def module_component(module: str) -> str:
    """``"gradguard.core.norms"`` -> ``"norms"``; unnamed modules by their last part."""
    return MODULES.get(module, module.rsplit(".", 1)[-1])


class OpCounter(TorchDispatchMode):
    """Counts aten ops by the label on top of ``self.labels`` when each is dispatched."""

    def __init__(self) -> None:
        super().__init__()
        self.labels: list[str] = [MODEL]
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func.namespace != "profiler":  # record_function marks: bookkeeping, no kernel
            self.counts[self.labels[-1]] += 1
        return func(*args, **(kwargs or {}))

    @contextmanager
    def label(self, name: str) -> Iterator[None]:
        self.labels.append(name)
        try:
            yield
        finally:
            self.labels.pop()


def _labelled(counter: OpCounter, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with counter.label(name):
            return fn(*args, **kwargs)

    return wrapper


def _methods(obj: object, private: bool = False) -> list[str]:
    """Names of the plain methods of ``obj``'s class (no properties, no dunders)."""
    out = []
    for name, attr in inspect.getmembers_static(type(obj)):
        if name.startswith("__") or (name.startswith("_") and not private):
            continue
        if isinstance(attr, (types.FunctionType, staticmethod, classmethod)):
            out.append(name)
    return out


class Instrument:
    """Wraps a live guard's components (and the guard's module's functions) with op labels.

    Patches instance attributes and module globals only; :meth:`undo` puts every one back.
    """

    def __init__(self, counter: OpCounter) -> None:
        self.counter = counter
        self._undo: list[Callable[[], None]] = []

    def wrap_object(self, obj: object, component: str, private: bool = False) -> None:
        for name in _methods(obj, private):
            label = f"{component}: {type(obj).__name__}.{name}"
            setattr(obj, name, _labelled(self.counter, label, getattr(obj, name)))
            self._undo.append(functools.partial(delattr, obj, name))

    def wrap_functions(self, module: types.ModuleType) -> None:
        """Wrap every gradguard function ``module`` reaches through its globals."""
        for name, fn in list(vars(module).items()):
            if isinstance(fn, types.FunctionType) and fn.__module__.startswith("gradguard."):
                label = f"{module_component(fn.__module__)}: {fn.__name__}"
                setattr(module, name, _labelled(self.counter, label, fn))
                self._undo.append(functools.partial(setattr, module, name, fn))

    def guard(self, guard: Any) -> None:
        for attr, component in COMPONENTS.items():
            value = getattr(guard, attr, None)
            for obj in value if isinstance(value, (list, tuple)) else [value]:
                if obj is not None:
                    self.wrap_object(obj, component)
        # The gradguard functions the guard calls, wherever they are called from: every module
        # of the packages has its function globals wrapped (``from .norms import grad_norms``
        # binds a global in the caller's module; ``_skip.scaler_update`` reads skip's own).
        for name, module in list(sys.modules.items()):
            if name.startswith(PACKAGES) and module is not None:
                self.wrap_functions(module)
        self.wrap_object(guard, "guard (own code)", private=True)
        self.optimizer(guard.optimizer)
        self.kernels()

    def kernels(self) -> None:
        """Count each call of a compiled kernel (gradguard.core.fuse) as one op.

        A dispatch mode cannot see inside compiled code, and ``torch.compile`` does not run
        under one: the compiled call runs with the counter paused and counts once, as it is one
        fused kernel (on a GPU, one launch, plus one for a median, which inductor leaves to
        aten). Eager kernels are counted op by op as everything else."""
        seen: set[int] = set()
        for name, module in list(sys.modules.items()):
            if not name.startswith(PACKAGES) or module is None:
                continue
            for k in list(vars(module).values()):
                if not isinstance(k, Kernel) or id(k) in seen or k._compiled is None:
                    continue
                seen.add(id(k))
                label = f"{module_component(k.fn.__module__)}: compiled {k.fn.__name__}"
                k._compiled = self._paused(label, k._compiled)
                self._undo.append(
                    functools.partial(setattr, k, "_compiled", k._compiled.__wrapped__)
                )

    def _paused(self, label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        counts = self.counter.counts

        @functools.wraps(fn)
        def call(*args: Any) -> Any:
            counts[label] += 1
            with _disable_current_modes():
                return fn(*args)

        return call

    def optimizer(self, opt: torch.optim.Optimizer) -> None:
        labels = self.counter.labels

        def enter(*_: Any) -> None:
            labels.append(OPTIMIZER)

        def leave(*_: Any) -> None:
            labels.pop()

        hooks = [opt.register_step_pre_hook(enter), opt.register_step_post_hook(leave)]
        self._undo += [h.remove for h in hooks]

    def clip(self) -> None:
        original = torch.nn.utils.clip_grad_norm_
        torch.nn.utils.clip_grad_norm_ = _labelled(self.counter, CLIP, original)  # type: ignore[assignment]
        self._undo.append(lambda: setattr(torch.nn.utils, "clip_grad_norm_", original))

    def undo(self) -> None:
        for fn in reversed(self._undo):
            fn()
        self._undo = []


def count(case: Case, variant: str, steps: int = STEPS, warmup: int = WARMUP) -> dict[str, float]:
    """Aten ops per step of ``variant`` on ``case``, by label (averaged over ``steps``)."""
    model, opt, guard = case.build(variant)
    step = case.step_fn(variant, model, opt, guard)
    for _ in range(warmup):
        step()
    counter = OpCounter()
    tools = Instrument(counter)
    if guard is not None:
        tools.guard(guard)
    else:
        tools.optimizer(opt)
        tools.clip()
    try:
        with counter:
            for _ in range(steps):
                step()
    finally:
        tools.undo()
    return {k: v / steps for k, v in counter.counts.items()}


def component(label: str) -> str:
    """``"records: Recorder.log"`` -> ``"records"``."""
    return label.split(":", 1)[0]


def extra_ops(
    case: Case, steps: int = STEPS, warmup: int = WARMUP, variant: str = "guard"
) -> dict[str, Any]:
    """Both variants' counts, the guard's by component, and the extra ops per guarded step."""
    clip = count(case, "torch clip", steps, warmup)
    guard = count(case, variant, steps, warmup)
    by_component: dict[str, float] = collections.defaultdict(float)
    for label, n in guard.items():
        if label != MODEL:
            by_component[component(label)] += n
    return {
        "clip": clip,
        "guard": guard,
        "components": dict(by_component),
        "extra": sum(guard.values()) - sum(clip.values()),
        "clip_total": sum(clip.values()),
        "guard_total": sum(guard.values()),
    }


def _n(x: float) -> str:
    return f"{x:.0f}" if abs(x - round(x)) < 0.05 else f"{x:.2f}"


def run(quick: bool) -> str:
    """The markdown section for docs/benchmarks.md."""
    chosen = [c for c in cases() if not quick or c.key != "cnn"]
    results = {c.key: extra_ops(c) for c in chosen}
    fused = {c.key: extra_ops(c, variant="guard compiled") for c in chosen}
    detail_key = "mlp256"
    names = sorted({k for r in [*results.values(), *fused.values()] for k in r["components"]})

    def verdict(extra: float) -> str:
        return "met" if extra <= TARGET_EXTRA else "**not met**"

    totals = [
        [
            c.label,
            _n(results[c.key]["clip_total"]),
            _n(results[c.key]["guard_total"]),
            _n(results[c.key]["extra"]),
            verdict(results[c.key]["extra"]),
            _n(fused[c.key]["guard_total"]),
            _n(fused[c.key]["extra"]),
            verdict(fused[c.key]["extra"]),
        ]
        for c in chosen
    ]
    comp_rows = [
        [name, *[f"{_n(results[c.key]['components'].get(name, 0.0))} / "
                 f"{_n(fused[c.key]['components'].get(name, 0.0))}" for c in chosen]]
        for name in names
    ]  # fmt: skip
    comp_rows.append(
        ["torch-clip step: clip_grad_norm_ + optimizer step"]
        + [_n(results[c.key]["clip"].get(CLIP, 0.0) + results[c.key]["clip"].get(OPTIMIZER, 0.0))
           for c in chosen]
    )  # fmt: skip
    detail, detail_fused = results[detail_key]["guard"], fused[detail_key]["guard"]
    labels = sorted({*detail, *detail_fused} - {MODEL}, key=lambda k: (component(k), k))
    detail_rows = [[k, _n(detail.get(k, 0.0)), _n(detail_fused.get(k, 0.0))] for k in labels]
    skipped = "" if not quick else " (quick run: the ResNet-18 is left out)"
    return "\n".join(
        [
            "## Aten ops per step, by component",
            "",
            "Every aten op of a whole training step, counted with a `TorchDispatchMode` "
            "(`benchmarks/bench_ops.py`); each op is charged to the guard component running "
            "when it was dispatched (the benchmark wraps the live guard's component methods; "
            f"the library has no hooks for it). Averages over {STEPS} steps after {WARMUP} "
            "warm-up steps, so one record flush (every 50 steps by default) is included. A "
            "foreach op over many tensors is one op. Extra: ops of a guarded step minus ops of "
            f"a torch-clip step{skipped}. `compiled`: the same guard with its decision compiled "
            "(`GuardConfig(compile=True)`, the default on CUDA); each call of a compiled kernel "
            "counts as one op (a dispatch mode cannot see inside compiled code; the call runs "
            "with the counter paused). On a GPU a compiled kernel is one launch, two where it "
            "takes a median (inductor leaves the median to aten).",
            "",
            markdown_table(
                ["model", "torch-clip step", "guarded step", "extra ops", f"<= {TARGET_EXTRA}",
                 "compiled step", "extra ops, compiled", f"<= {TARGET_EXTRA}"],
                totals,
            ),
            "",
            "Ops of a guarded step by component (a column per model, eager / compiled), and "
            "what the torch-clip step runs in their place:",
            "",
            markdown_table(["component", *[c.key for c in chosen]], comp_rows),
            "",
            f"Per method, {detail_key} (`component: object.method`; the innermost wrapped "
            "method gets the op):",
            "",
            markdown_table(["where", "ops per step", "compiled"], detail_rows),
            "",
        ]
    )  # fmt: skip


if __name__ == "__main__":
    print(run(quick=True))
