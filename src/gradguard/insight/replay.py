"""Replay an incident bundle and say why the step went wrong.

:func:`replay` rebuilds the model with the user's factory, loads the state the step started
from, restores the RNG states of that moment and re-executes the forward and backward pass on
the recorded batch. Then it classifies the incident, checking in this order:

``transient``
    The replay does not reproduce what the guard recorded (loss, gradient norm): a bit flip,
    flaky hardware or nondeterminism. The differing values are named.
``model-state``
    The weights were already bad: a parameter or buffer holds NaN/inf; or the first NaN/inf is
    an overflow on a weight or on inputs beyond sqrt(max) of their dtype, and known-good batches
    (the batch without its suspect rows, small random inputs) overflow too; or the step is
    finite but extreme on those batches too.
``data``
    The step reproduces on the same batch and per-sample losses and gradient norms (one
    forward/backward per row) name culprit rows: non-finite, or ``factor`` times the median row.
    Without them the step is sane.
``numerics``
    A NaN/inf is born inside an op from finite inputs. A ``TorchDispatchMode`` checks every
    aten op's output and names the first op that produced a non-finite value, the module it ran
    in (module hooks; in backward, the autograd node's sequence number maps back to the module
    whose forward created it), the direction and its inputs' range. Under fp16/bf16 the step is
    re-run in fp32 to say whether that avoids it.
``optimizer-state``
    The gradient is sane but one optimizer step (on a copy) moves some tensor ``factor`` times
    as far as it does with the optimizer state repaired (Adam: the second moment raised to at
    least the squared gradient; others: moments reset): e.g. Adam's ``exp_avg_sq`` collapsed,
    so the update is eps-dominated and huge (SPAM, arXiv 2501.06842, resets such moments).

A step that reproduces and passes every check is ``unclassified``. Megatron-LM's rerun state
machine tells transient from reproducible faults the same way, inside its own loop.

Example:
    >>> result = gradguard.replay("incidents/incident-000000812.pt", make_model)
    >>> result.kind, result.culprits
    ('data', [5])
    >>> print(result.summary)
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import statistics
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from gradguard.core.batch import Call, model_input, move_batch, own_loss, run_model
from gradguard.core.snapshot import rng_state, set_rng_state
from gradguard.records.bundle import Bundle, BundleError, load_bundle, strip_prefixes, unwrap_model

__all__ = ["KINDS", "NotReproducible", "Replay", "ReplayError", "replay"]

KINDS = ("data", "transient", "optimizer-state", "model-state", "numerics", "unclassified")
LossFn = Callable[[Any, Any], Tensor]
_LOW = (torch.float16, torch.bfloat16)
# sqrt of each dtype's largest finite value: a product of two such inputs overflows.
_HUGE = {
    str(t).replace("torch.", ""): math.sqrt(torch.finfo(t).max)
    for t in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
}
_MAX_TRIES = 16  # re-runs of the batch without 1, 2, ... suspects before trying all of them
# Ops whose output is uninitialized memory: garbage there is not a NaN "born" in the model.
_UNINITIALIZED = ("empty", "new_empty", "empty_like", "empty_strided", "resize_", "set_")


class ReplayError(ValueError):
    """Bad input to :func:`replay`: not a bundle, a bad factory, no batch to replay."""


class NotReproducible(RuntimeError):
    """The recorded step cannot be re-executed at all: a different model or code."""


@dataclass
class Replay:
    """What :func:`replay` found.

    Attributes:
        kind: one of :data:`KINDS`.
        summary: the finding in plain words.
        step, action, signal, reason: the incident as the guard saw it.
        recorded, replayed: loss and gradient norm as recorded and as replayed.
        differs: the recorded values the replay does not reproduce (``transient``).
        rows: per-sample ``{"row", "loss", "grad_norm"}``.
        culprits: the rows that make the step bad (``data``).
        without_culprits: loss and gradient norm of the step without those rows.
        model: non-finite parameters/buffers and known-good batch results.
        optimizer: per-tensor update norms, recorded vs repaired optimizer state.
        origin: the op where the first non-finite value was born, its module, direction and
            inputs, and whether fp32 avoids it.
        notes: caveats (e.g. the gradient norm was averaged over ranks).
        meta: bundle path, versions, rank, world size.
    """

    kind: str
    summary: str
    step: int
    action: str
    signal: str
    reason: str
    recorded: dict[str, float | None]
    replayed: dict[str, float | None]
    differs: list[dict[str, Any]] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    culprits: list[int] = field(default_factory=list)
    without_culprits: dict[str, Any] | None = None
    model: dict[str, Any] | None = None
    optimizer: dict[str, Any] | None = None
    origin: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (non-finite floats as the strings ``"nan"``, ``"inf"``, ``"-inf"``)."""
        return _jsonable(asdict(self))  # type: ignore[no-any-return]

    def to_json(self, path: str | os.PathLike[str] | None = None) -> str:
        """The result as JSON text; also written to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text + "\n", encoding="utf-8")
        return text


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Tensor):
        return _jsonable(obj.tolist())
    return obj


# --------------------------------------------------------------------------- small helpers


def _f(t: Tensor) -> float:
    return float(t.detach().double())


def _fin(v: float | None) -> bool:
    return v is not None and math.isfinite(v)


def _g(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3g}"


def _floats(obj: Any) -> list[Tensor]:
    return [t for t in tree_flatten(obj)[0] if isinstance(t, Tensor) and t.is_floating_point()]


def _all_finite(t: Tensor) -> bool:
    return t.numel() == 0 or bool(torch.isfinite(t).all())


def _n_rows(batch: Any) -> int | None:
    x = model_input(batch)
    if isinstance(x, Mapping):  # keyword batches (Hugging Face): the first tensor's rows
        x = next((t for t in tree_flatten(x)[0] if isinstance(t, Tensor)), None)
    return int(x.shape[0]) if isinstance(x, Tensor) and x.dim() >= 1 else None


def _whole_batch(model: nn.Module, batch: Any) -> Any:
    """``model(batch)``: how a model whose forward takes the batch dict itself is called."""
    return model(batch)


def _loss(output: Any, batch: Any) -> Tensor:
    """The model's own loss when it returns one (Hugging Face), else the default loss."""
    return own_loss(output, batch)


def _take(batch: Any, rows: list[int], n: int) -> Any:
    """The batch restricted to ``rows`` (every tensor whose first dimension is the batch's)."""

    def pick(t: Any) -> Any:
        if isinstance(t, Tensor) and t.dim() >= 1 and t.shape[0] == n:
            return t[torch.tensor(rows, dtype=torch.long, device=t.device)]
        return t

    return tree_map(pick, batch)


def _nonfinite_rows(batch: Any, n: int) -> list[int]:
    bad = torch.zeros(n, dtype=torch.bool)
    for t in _floats(batch):
        if t.dim() >= 1 and t.shape[0] == n:
            bad |= ~torch.isfinite(t.detach().reshape(n, -1)).all(dim=1).cpu()
    return [int(i) for i in torch.nonzero(bad).flatten()]


def _median(values: list[float | None]) -> float | None:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(finite) if finite else None


def _range(t: Tensor) -> dict[str, Any]:
    d = t.detach()
    fin = d[torch.isfinite(d)] if d.numel() else d
    return {
        "shape": list(d.shape),
        "dtype": str(d.dtype).replace("torch.", ""),
        "min": _f(fin.min()) if fin.numel() else None,
        "max": _f(fin.max()) if fin.numel() else None,
        "nonfinite": int(d.numel() - fin.numel()),
    }


# --------------------------------------------------------------------------- one forward/backward


def _set_rng(state: Mapping[str, Any]) -> None:
    """Restore a full :func:`rng_state` or the torch-only ``forward_rng_state``."""
    if {"numpy", "python"} <= set(state):
        set_rng_state(dict(state))
        return
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class _Run:
    loss: float
    grad_norm: float
    grads: list[Tensor | None]
    error: str | None = None

    @property
    def finite(self) -> bool:
        return math.isfinite(self.loss) and math.isfinite(self.grad_norm)


class _Runner:
    """Re-executes the step's forward and backward pass, RNG first, without touching ``.grad``.

    Every run starts from the bundle's state: a forward in training mode moves BatchNorm's
    running statistics (a NaN sample makes them NaN), so the buffers are put back after each run
    and the next check sees the weights the incident started from, not the last trial's.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        rng: Mapping[str, Any] | None,
        amp: str | None,
        call: Call | None = None,
    ) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.rng = rng
        self.amp = amp
        self.call = call
        self.params = [p for p in model.parameters() if p.requires_grad]
        self._buffers = [(b, b.detach().clone()) for b in model.buffers()]

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.amp is None:
            return contextlib.nullcontext()
        device = next((p.device.type for p in self.params), "cpu")
        return torch.autocast(device, dtype=getattr(torch, self.amp))

    def __call__(self, batch: Any) -> _Run:
        if self.rng is not None:
            _set_rng(self.rng)
        try:
            with self._autocast():
                out = run_model(self.model, batch, self.call)
                loss = self.loss_fn(out, batch)
            grads: list[Tensor | None] = list(
                torch.autograd.grad(loss, self.params, allow_unused=True)
            )
        finally:
            with torch.no_grad():
                for live, kept in self._buffers:
                    live.copy_(kept)
        present = [g.detach().double().pow(2).sum() for g in grads if g is not None]
        norm = _f(torch.stack(present).sum().sqrt()) if present else 0.0
        return _Run(_f(loss), norm, grads)


# --------------------------------------------------------------------------- where NaN is born

# Private torch hooks into the autograd engine (present since torch 2.1); without them the
# backward pass is still traced, only its module is not named.
_current_autograd_node = getattr(torch._C, "_current_autograd_node", None)
_sequence_nr = getattr(torch._C._autograd, "_get_sequence_nr", None)


def _current_node() -> Any:
    return _current_autograd_node() if _current_autograd_node is not None else None


def _seq() -> int:
    return int(_sequence_nr()) if _sequence_nr is not None else -1


class _Births(TorchDispatchMode):
    """Finds the first aten op whose output is non-finite while its inputs were all finite."""

    def __init__(self, params: dict[int, str], module_at: Callable[[Any], str | None]) -> None:
        super().__init__()
        self.params = params
        self.module_at = module_at
        self.found: dict[str, Any] | None = None

    def _describe(self, t: Tensor) -> dict[str, Any]:
        try:
            param = self.params.get(t.untyped_storage().data_ptr())
        except RuntimeError:  # tensors without storage (meta, sparse)
            param = None
        return {**_range(t), "parameter": param}

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if self.found is not None or func.__name__.split(".")[0] in _UNINITIALIZED:
            return func(*args, **kwargs)
        # Inputs are checked before the op: an in-place op overwrites them. ``out=`` is not an
        # input (uninitialized buffers may hold anything).
        ins = _floats((args, {k: v for k, v in kwargs.items() if k != "out"}))
        ins_finite = [_all_finite(t) for t in ins]
        mutable = bool(getattr(getattr(func, "_schema", None), "is_mutable", True))
        before = [self._describe(t) for t in ins] if mutable else None
        out = func(*args, **kwargs)
        outs = _floats(out)
        if outs and not all(_all_finite(t) for t in outs):
            node = _current_node()
            inputs = before if before is not None else [self._describe(t) for t in ins]
            self.found = {
                "op": str(func.overloadpacket),
                "overload": str(func),
                "direction": "backward" if node is not None else "forward",
                "autograd_node": node.name() if node is not None else None,
                "module": self.module_at(node),
                "born": all(ins_finite),
                "inputs": inputs,
                "output": _range(outs[0]),
                "scalars": [
                    a for a in args if isinstance(a, (int, float)) and not isinstance(a, bool)
                ],
            }
        return out


@contextlib.contextmanager
def _module_tracker(model: nn.Module) -> Iterator[Callable[[Any], str | None]]:
    """Yields ``module_at(node)``: the current module in forward, the creating one in backward.

    Forward pre/post hooks keep a stack of module names and record the range of autograd
    sequence numbers each module's forward created; a backward node's sequence number falls in
    the innermost such range.
    """
    stack: list[str] = []
    spans: list[tuple[int, int, str]] = []
    starts: list[int] = []
    classes = {name: type(m).__name__ for name, m in model.named_modules()}

    def label(name: str) -> str:
        return f"{name or '(root)'} ({classes.get(name, '?')})"

    def pre(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            stack.append(name)
            starts.append(_seq())

        return hook

    def post(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if stack:
                stack.pop()
                spans.append((starts.pop(), _seq(), name))

        return hook

    def module_at(node: Any) -> str | None:
        if node is None:
            return label(stack[-1]) if stack else None
        seq = int(node._sequence_nr())
        inside = [s for s in spans if s[0] <= seq < s[1]]
        return label(max(inside, key=lambda s: s[0])[2]) if inside else None

    handles = []
    for name, m in model.named_modules():
        handles.append(m.register_forward_pre_hook(pre(name)))
        handles.append(m.register_forward_hook(post(name)))
    try:
        yield module_at
    finally:
        for h in handles:
            h.remove()


def _trace(model: nn.Module, runner: _Runner, batch: Any) -> dict[str, Any] | None:
    params: dict[int, str] = {}
    for name, p in model.named_parameters():
        params.setdefault(p.untyped_storage().data_ptr(), name)
    with _module_tracker(model) as module_at:
        mode = _Births(params, module_at)
        with contextlib.suppress(RuntimeError), mode:
            runner(batch)
    return mode.found


# --------------------------------------------------------------------------- the optimizer


def _optimizer_maker(
    bundle: Bundle,
    model: nn.Module,
    optimizer_factory: Callable[[nn.Module], torch.optim.Optimizer] | None,
) -> tuple[Callable[[], torch.optim.Optimizer], list[nn.Parameter]] | str:
    """A function building a fresh optimizer over ``model``, and its parameters in order.

    Returns a string saying why not when it cannot be built.
    """
    sd = bundle.snapshot.get("optimizer")
    names = bundle.meta.get("param_names")
    if not isinstance(sd, dict) or not isinstance(names, list):
        return "the bundle holds no optimizer state"
    named = dict(model.named_parameters())
    missing = [n for n in names if n not in named]
    if missing:
        return f"optimizer parameters not in the model: {missing[:3]}"
    ordered = [named[n] for n in names]
    if optimizer_factory is not None:
        return (lambda: optimizer_factory(model)), ordered
    cls_path = str(bundle.meta.get("optimizer_class", ""))
    module, _, cls_name = cls_path.rpartition(".")
    cls = getattr(torch.optim, cls_name, None) if module.startswith("torch.optim") else None
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        return f"optimizer {cls_path} is not in torch.optim: pass optimizer_factory"
    groups = sd.get("param_groups", [])

    def make() -> torch.optim.Optimizer:
        return cls(  # type: ignore[no-any-return, call-arg]
            [
                {"params": [ordered[i] for i in g["params"]]}
                | {k: v for k, v in g.items() if k != "params"}
                for g in groups
            ]
        )

    return make, ordered


def _update_norms(
    params: list[nn.Parameter],
    grads: list[Tensor | None],
    state: dict[str, Any],
    make: Callable[[], torch.optim.Optimizer],
) -> list[float]:
    """Per-tensor norm of one optimizer step from ``state`` (the parameters are put back)."""
    saved = [p.detach().clone() for p in params]
    opt = make()
    opt.load_state_dict(copy.deepcopy(state))  # the loader keeps tensors it could reuse
    try:
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.grad = None if g is None else g.detach().to(p.dtype).clone()
        opt.step()
        with torch.no_grad():
            return [
                _f(torch.linalg.vector_norm(p.double() - s.double())) for p, s in zip(params, saved)
            ]
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
                p.grad = None


def _repair(state: dict[str, Any], grads: list[Tensor | None]) -> tuple[dict[str, Any], str]:
    fixed = copy.deepcopy(state)
    moments = fixed.get("state", {})
    if any(isinstance(s, dict) and "exp_avg_sq" in s for s in moments.values()):
        for i, s in moments.items():
            g = grads[int(i)] if int(i) < len(grads) else None
            if g is None or not isinstance(s, dict):
                continue
            # E[g]^2 <= E[g^2]: a healthy second moment is at least the squared first moment,
            # and then each coordinate moves about lr at most.
            m = s.get("exp_avg")
            for key in ("exp_avg_sq", "max_exp_avg_sq"):
                v = s.get(key)
                if isinstance(v, Tensor) and v.shape == g.shape:
                    floor = g.detach().to(v).pow(2)
                    if isinstance(m, Tensor) and m.shape == v.shape:
                        floor = torch.maximum(floor, m.to(v).pow(2))
                    s[key] = torch.maximum(v, floor)
        return fixed, "second moment raised to at least the squared moment and gradient"
    fixed["state"] = {}
    return fixed, "moments reset"


def _optimizer_check(
    bundle: Bundle,
    model: nn.Module,
    grads_by_name: dict[str, Tensor | None],
    optimizer_factory: Callable[[nn.Module], torch.optim.Optimizer] | None,
    factor: float,
) -> dict[str, Any]:
    made = _optimizer_maker(bundle, model, optimizer_factory)
    if isinstance(made, str):
        return {"checked": False, "why": made}
    make, params = made
    state = bundle.snapshot["optimizer"]
    if not state.get("state"):
        return {"checked": False, "why": "the optimizer had no state yet (first step)"}
    names = list(bundle.meta["param_names"])
    grads = [grads_by_name.get(n) for n in names]
    fixed, how = _repair(state, grads)
    momentum = max((float(g.get("momentum", 0.0) or 0.0) for g in state["param_groups"]), default=0)
    # Without a second moment the repair drops momentum, which alone shrinks a steady update
    # by 1/(1 - momentum): only more than that counts.
    limit = factor if "second" in how else factor / max(1.0 - momentum, 1e-3)
    recorded = _update_norms(params, grads, state, make)
    repaired = _update_norms(params, grads, fixed, make)
    tensors = []
    for name, p, u, r in zip(names, params, recorded, repaired):
        ratio = u / r if r > 0 else (math.inf if u > 0 else 1.0)
        w = _f(torch.linalg.vector_norm(p.detach().double()))
        huge = not math.isfinite(u) or (math.isfinite(r) and ratio > limit)
        tensors.append(
            {"name": name, "update": u, "repaired": r, "ratio": ratio, "weight": w, "huge": huge}
        )
    tensors.sort(key=lambda t: -t["ratio"] if math.isfinite(t["ratio"]) else -math.inf)
    sane = all(math.isfinite(t["repaired"]) for t in tensors)
    return {
        "checked": True,
        "repair": how,
        "limit": limit,
        "huge": [t["name"] for t in tensors if t["huge"]],
        "repaired_sane": sane,
        "tensors": tensors,
    }


# --------------------------------------------------------------------------- the model


def _make_model(
    model_factory: Any, loss_fn: LossFn | None, call: Call | None
) -> tuple[nn.Module, LossFn | None, Any, Call | None]:
    """Model, loss_fn, example batch and call from a factory (diagnose's convention, plus an
    optional fourth item: how to call the model on a batch) or a module."""
    if isinstance(model_factory, nn.Module):
        return model_factory, loss_fn, None, call
    if not callable(model_factory):
        raise ReplayError(
            f"model_factory must be a callable or an nn.Module, got {type(model_factory).__name__}"
        )
    made = model_factory()
    batch = None
    if isinstance(made, (tuple, list)):
        if len(made) not in (2, 3, 4):
            raise ReplayError(
                "model_factory must return a model, (model, batch), (model, batch, loss_fn) "
                "or (model, batch, loss_fn, call)"
            )
        if len(made) >= 3 and loss_fn is None:
            loss_fn = made[2]
        if len(made) == 4 and call is None:
            call = made[3]
        made, batch = made[0], made[1]
    if not isinstance(made, nn.Module):
        raise ReplayError(f"model_factory returned a {type(made).__name__}, not an nn.Module")
    if call is not None and not callable(call):
        raise ReplayError(f"call must be callable(model, batch), got {type(call).__name__}")
    return made, loss_fn, batch, call


def _load_model(model: nn.Module, bundle: Bundle) -> None:
    # Plain keys on both sides: a bundle (or the factory's model) from DDP or torch.compile
    # carries module. / _orig_mod. prefixes the other side may not.
    state = strip_prefixes(bundle.snapshot["model"])
    model = unwrap_model(model)
    live = model.state_dict()
    missing = sorted(set(live) - set(state))
    unexpected = sorted(set(state) - set(live))
    shapes = [
        f"{k}: {tuple(state[k].shape)} recorded vs {tuple(live[k].shape)}"
        for k in set(live) & set(state)
        if isinstance(state[k], Tensor) and state[k].shape != live[k].shape
    ]
    if any(isinstance(v, dict) for v in state.values()):
        raise NotReproducible("the bundle holds FSDP2 shards; replay needs the full weights")
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"not in the bundle: {missing[:5]}")
        if unexpected:
            parts.append(f"not in the model: {unexpected[:5]}")
        if shapes:
            parts.append(f"shapes differ: {sorted(shapes)[:5]}")
        raise NotReproducible(
            "the factory's model is not the model of the incident (" + "; ".join(parts) + ")"
        )
    model.load_state_dict(state)


# --------------------------------------------------------------------------- classification


def _same(a: float | None, b: float, rtol: float) -> bool:
    if a is None:
        return True
    if not math.isfinite(a) or not math.isfinite(b):
        return not math.isfinite(a) and not math.isfinite(b)
    return abs(a - b) <= rtol * max(abs(a), abs(b)) + 1e-12


def _per_sample(runner: _Runner, batch: Any, n: int, max_rows: int) -> list[dict[str, Any]]:
    rows = []
    for i in range(min(n, max_rows)):
        try:
            r = runner(_take(batch, [i], n))
        except (RuntimeError, ValueError) as e:  # e.g. BatchNorm cannot train on one row
            return [{"row": i, "error": f"{type(e).__name__}: {e}"}]
        rows.append({"row": i, "loss": r.loss, "grad_norm": r.grad_norm})
    return rows


def _suspects(rows: list[dict[str, Any]], nonfinite_rows: list[int], factor: float) -> list[int]:
    """Rows that may carry the blow-up, worst first: NaN/inf rows, then outliers (``factor``
    times the median row's loss or gradient norm) by how far out they are."""
    if rows and "error" in rows[0]:
        rows = []
    med_g = _median([r["grad_norm"] for r in rows]) or 0.0
    med_l = _median([abs(r["loss"]) for r in rows]) or 0.0
    scored: dict[int, float] = {i: math.inf for i in nonfinite_rows}
    for r in rows:
        g, loss = r["grad_norm"], abs(r["loss"])
        if not (math.isfinite(g) and math.isfinite(loss)):
            scored[r["row"]] = math.inf
            continue
        score = max(g / med_g if med_g else 0.0, loss / med_l if med_l else 0.0)
        if score > factor:
            scored.setdefault(r["row"], score)
    return sorted(scored, key=lambda i: (-scored[i], i))


def _known_good(batch: Any, n: int | None, culprits: list[int]) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    if n and culprits and len(culprits) < n:
        keep = [i for i in range(n) if i not in set(culprits)]
        out.append(("the batch without its culprit rows", _take(batch, keep, n)))
    x = model_input(batch)
    if not isinstance(x, Tensor):
        return out

    def swap(new_x: Tensor) -> Any:
        if isinstance(batch, (tuple, list)):
            return [new_x, *batch[1:]]
        return new_x

    out.append(("zero inputs", swap(torch.zeros_like(x))))
    if x.is_floating_point():
        gen = torch.Generator().manual_seed(0)
        small = torch.randn(x.shape, generator=gen, dtype=torch.float32) * 0.1
        out.append(("small random inputs", swap(small.to(x))))
    return out


def _nonfinite_state(model: nn.Module) -> list[dict[str, Any]]:
    bad = []
    for kind, items in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in items:
            if t.is_floating_point() and not _all_finite(t):
                count = int((~torch.isfinite(t.detach())).sum())
                bad.append({"name": name, "kind": kind, "nonfinite": count, "numel": t.numel()})
    return bad


def replay(
    bundle: Bundle | str | os.PathLike[str],
    model_factory: Any,
    loss_fn: LossFn | None = None,
    *,
    call: Call | None = None,
    optimizer_factory: Callable[[nn.Module], torch.optim.Optimizer] | None = None,
    batch: Any = None,
    factor: float = 10.0,
    rtol: float = 1e-3,
    max_rows: int = 1024,
) -> Replay:
    """Re-execute an incident's step deterministically and classify why it went wrong.

    Nothing global changes: the RNG states are restored afterwards; the model is the
    factory's, loaded with the bundle's weights.

    Args:
        bundle: a path written by :class:`gradguard.guard.incident.IncidentWriter`, or a loaded
            :class:`~gradguard.records.bundle.Bundle`.
        model_factory: the convention of :func:`gradguard.diagnose`'s CLI: a callable
            returning ``model``, ``(model, batch)`` or ``(model, batch, loss_fn)``; or the
            model itself. Its batch is used only when the bundle holds none.
        loss_fn: ``loss_fn(output, batch) -> scalar``; ``None``: the factory's, else the
            model's own ``output.loss`` when it returns one (Hugging Face, called with
            ``model(**batch)`` on a dict batch), else
            :func:`gradguard.core.batch.default_loss`.
        call: ``call(model, batch) -> output``, how the training loop runs the model on a batch
            (``lambda m, b: m(b)`` for a model whose ``forward`` takes the batch itself);
            ``None``: the factory's fourth item, else ``model(x)`` for an ``(x, y)`` batch and
            ``model(**batch)`` for a dict batch (``model(batch)`` when the model takes no such
            keywords).
        optimizer_factory: ``optimizer_factory(model) -> optimizer`` for an optimizer outside
            ``torch.optim`` (its state is loaded from the bundle); ``None`` rebuilds the
            recorded ``torch.optim`` class with the recorded param groups.
        batch: the batch, when the bundle stored only its data position.
        factor: "extreme" means this many times the reference (the median of the recorded
            history, of the rows, or the repaired update).
        rtol: relative tolerance within which a replayed value reproduces a recorded one.
        max_rows: per-sample analysis covers at most this many rows.

    Returns:
        A :class:`Replay`; ``print(result.summary)``.

    Raises:
        ReplayError: bad input (not a bundle, a bad factory, no batch).
        NotReproducible: the model is not the incident's (state_dict mismatch), or it does
            not run on the recorded batch.

    Example:
        >>> r = gradguard.replay("incidents/incident-000000812.pt", lambda: MyNet())
        >>> r.kind
        'data'
    """
    if not isinstance(bundle, Bundle):
        try:
            bundle = load_bundle(bundle)
        except BundleError as e:
            raise ReplayError(str(e)) from None
    if isinstance(factor, bool) or not (isinstance(factor, (int, float)) and factor > 1):
        raise ReplayError(f"factor must be a number > 1, got {factor!r}")
    saved_rng = rng_state()
    try:
        return _replay(bundle, model_factory, loss_fn, call, optimizer_factory, batch, factor,
                       rtol, max_rows)  # fmt: skip
    finally:
        set_rng_state(saved_rng)


def _replay(
    b: Bundle,
    model_factory: Any,
    loss_fn: LossFn | None,
    call: Call | None,
    optimizer_factory: Callable[[nn.Module], torch.optim.Optimizer] | None,
    batch: Any,
    factor: float,
    rtol: float,
    max_rows: int,
) -> Replay:
    model, fn, example, call = _make_model(model_factory, loss_fn, call)
    _load_model(model, b)
    model.train(bool(b.meta.get("training", True)))
    notes: list[str] = []
    if batch is None:
        batch = b.batch
    if batch is None:
        if example is None:
            raise ReplayError(
                f"the bundle stored no batch ({b.meta.get('batch_note') or 'over the size cap'}"
                f"; data position {b.position}): pass batch="
            )
        batch = example
        notes.append("the bundle holds no batch; replayed the factory's batch instead")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    case = _Case(b, model, fn or _loss, move_batch(batch, device), factor, notes, call)
    case.result.meta["factor"] = factor
    checks = (
        lambda: case.transient(rtol),
        case.bad_weights,
        lambda: case.data(max_rows),
        case.numerics,
        case.extreme_everywhere,
        lambda: case.optimizer_state(optimizer_factory),
    )
    if not any(check() for check in checks):
        base = case.base
        case.result.summary = (
            f"{case.head} reproduces (loss {_g(base.loss)}, gradient norm {_g(base.grad_norm)})"
            " and no check found a cause: no culprit rows, no NaN born in an op, sane weights "
            "and optimizer state. The detector may be too tight for this run."
        )
    return case.result


class _Case:
    """One replayed incident; each check fills ``result`` and returns True when it decides."""

    def __init__(
        self,
        b: Bundle,
        model: nn.Module,
        fn: LossFn,
        batch: Any,
        factor: float,
        notes: list[str],
        call: Call | None = None,
    ) -> None:
        self.b, self.model, self.fn, self.batch, self.factor = b, model, fn, batch, factor
        self.call = call
        self.runner = _Runner(model, fn, b.snapshot.get("rng"), b.meta.get("amp_dtype"), call)
        try:
            self.base = self.runner(batch)
        except TypeError as e:
            if call is not None or not isinstance(model_input(batch), Mapping):
                raise NotReproducible(
                    f"the factory's model does not run on the recorded batch: TypeError: {e}"
                ) from e
            # A dict batch the model's forward takes whole (forward(batch)), not as keywords.
            self.call = call = _whole_batch
            self.runner = _Runner(model, fn, b.snapshot.get("rng"), b.meta.get("amp_dtype"), call)
            try:
                self.base = self.runner(batch)
            except (RuntimeError, ValueError, TypeError, IndexError) as e2:
                raise NotReproducible(
                    "the factory's model runs neither as model(**batch) nor as model(batch) on "
                    f"the recorded batch ({type(e2).__name__}: {e2}); pass call="
                ) from e2
            notes.append("the model takes the batch dict whole: replayed as model(batch)")
        except (RuntimeError, ValueError, IndexError) as e:
            raise NotReproducible(
                f"the factory's model does not run on the recorded batch: {type(e).__name__}: {e}"
            ) from e
        self.n = _n_rows(batch)
        self.ref_norm = _median([r.get("grad_norm") for r in b.history])
        self.ref_loss = _median(
            [abs(v) if isinstance(v := r.get("loss"), float) else None for r in b.history]
        )
        self.head = f"Step {b.step} ({b.action} on {b.signal})"
        self.result = Replay(
            kind="unclassified",
            summary="",
            step=b.step,
            action=b.action,
            signal=b.signal,
            reason=b.reason,
            recorded=dict(b.recorded),
            replayed={"loss": self.base.loss, "grad_norm": self.base.grad_norm},
            notes=notes,
            meta={
                "bundle": str(b.path) if b.path is not None else None,
                "versions": b.meta.get("versions"),
                "rank": b.meta.get("rank"),
                "world_size": b.world_size,
                "amp_dtype": b.meta.get("amp_dtype"),
            },
        )

    def extreme(self, run: _Run) -> bool:
        """Non-finite, or ``factor`` times the recorded history's median norm or loss."""
        if not run.finite:
            return True
        f, norm, loss = self.factor, self.ref_norm, self.ref_loss
        return bool((norm and run.grad_norm > f * norm) or (loss and abs(run.loss) > f * loss))

    def known_good(self) -> list[dict[str, Any]]:
        batches = _known_good(self.batch, self.n, self.result.culprits)
        return [_try(self.runner, name, kb) for name, kb in batches]

    def decide(self, kind: str, summary: str) -> bool:
        self.result.kind, self.result.summary = kind, f"{self.head}{summary}"
        return True

    # -- the checks, in order

    def transient(self, rtol: float) -> bool:
        """The recorded loss / gradient norm do not come back."""
        r, b = self.result, self.b
        comparable = ["loss", "grad_norm"]
        if b.world_size > 1:
            comparable = ["loss"]
            r.notes.append(
                f"the recorded gradient norm is of the gradient averaged over {b.world_size} "
                "ranks; only the loss (this rank's) is compared"
            )
        for key in comparable:
            rec, rep = b.recorded.get(key), r.replayed[key]
            if rep is not None and not _same(rec, rep, rtol):
                r.differs.append({"name": key, "recorded": rec, "replayed": rep})
        if not r.differs:
            return False
        same = [k for k in comparable if k not in {d["name"] for d in r.differs}]
        what = "; ".join(
            f"{d['name']} was {_g(d['recorded'])} when recorded, {_g(d['replayed'])} now"
            for d in r.differs
        )
        return self.decide(
            "transient",
            f" does not reproduce: {what}"
            + (f" ({', '.join(same)} matches)" if same else "")
            + ". A transient fault: a bit flip, flaky hardware or nondeterminism. Skipping the "
            "step was right; if it recurs, check the device that ran it.",
        )

    def bad_weights(self) -> bool:
        """A parameter or buffer already holds NaN/inf."""
        bad = _nonfinite_state(self.model)
        if not bad:
            return False
        trials = self.known_good()
        self.result.model = {"nonfinite": bad, "known_good": trials}
        listed = ", ".join(f"{s['name']} ({s['nonfinite']} of {s['numel']})" for s in bad[:4])
        confirm = next((t for t in trials if t["finite"] is False), None)
        return self.decide(
            "model-state",
            f": the weights were already bad before the step: NaN/inf in {listed}."
            + (f" A known-good batch ({confirm['batch']}) also gives a non-finite result."
               if confirm else "")
            + " Roll back to a snapshot from before they went bad; the data is not to blame.",
        )  # fmt: skip

    def data(self, max_rows: int) -> bool:
        """Per-sample losses and gradient norms name rows without which the step is sane."""
        r, n = self.result, self.n
        if n is None or not self.extreme(self.base):
            return False
        nonfinite_rows = _nonfinite_rows(self.batch, n)
        r.rows = _per_sample(self.runner, self.batch, n, max_rows)
        if r.rows and "error" in r.rows[0]:
            r.notes.append(f"per-sample analysis failed: {r.rows[0]['error']}")
        elif len(r.rows) < n:
            r.notes.append(f"per-sample analysis covered the first {len(r.rows)} of {n} rows")
        if self.whole_batch():
            return True
        # The fewest suspects, worst first, without which the step is sane: a row can be an
        # outlier by chance (squared errors vary), but then removing it is not needed.
        suspects = _suspects(r.rows, nonfinite_rows, self.factor)
        if not suspects:
            return False
        first = max(1, sum(1 for i in suspects if i in set(nonfinite_rows)))
        sizes = list(range(first, min(len(suspects), n - 1, first + _MAX_TRIES) + 1))
        if len(suspects) < n and len(suspects) not in sizes:
            sizes.append(len(suspects))
        without = None
        for k in sizes:
            keep = [i for i in range(n) if i not in set(suspects[:k])]
            without = self.runner(_take(self.batch, keep, n))
            r.without_culprits = {"loss": without.loss, "grad_norm": without.grad_norm}
            if not self.extreme(without):
                r.culprits = sorted(suspects[:k])
                break
        if not r.culprits or without is None:
            return False
        culprits = r.culprits
        detail = []
        for i in culprits[:5]:
            row = next((x for x in r.rows if x.get("row") == i), {})
            finite = _fin(row.get("loss")) and _fin(row.get("grad_norm"))
            why = (
                "holds NaN/inf" if i in nonfinite_rows
                else "gives a non-finite loss or gradient" if not finite
                else "is an outlier"
            )  # fmt: skip
            detail.append(
                f"row {i} {why} (loss {_g(row.get('loss'))}, gradient norm "
                f"{_g(row.get('grad_norm'))})"
            )
        med = _median([x.get("grad_norm") for x in r.rows])
        return self.decide(
            "data",
            f" went wrong because of the data: {'; '.join(detail)}"
            + (f"; the median row's gradient norm is {_g(med)}" if med else "")
            + f". Without {'that row' if len(culprits) == 1 else 'those rows'} the step is sane"
            f" (loss {_g(without.loss)}, gradient norm {_g(without.grad_norm)}). Skip or clean"
            " these samples.",
        )

    def whole_batch(self) -> bool:
        """Every row is extreme against the last steps' losses while the weights are finite:
        the batch itself is off (targets or inputs scaled), not one sample. The last accepted
        step, one update earlier with nearly these weights, was sane."""
        r = self.result
        rows = [x for x in r.rows if "error" not in x]
        if not rows or not self.ref_loss or len(rows) < (self.n or 0):
            return False
        # Finite rows only: a NaN/inf born inside an op is the numerics check's to name.
        if not all(_fin(x["loss"]) and abs(x["loss"]) > self.factor * self.ref_loss for x in rows):
            return False
        r.culprits = [x["row"] for x in rows]
        low = min(abs(x["loss"]) for x in rows)
        return self.decide(
            "data",
            f" went wrong because of the data: every row of the batch is off, not one sample: "
            f"the smallest per-row loss is {_g(low)}, {_g(low / self.ref_loss)} times the median "
            f"loss of the last steps ({_g(self.ref_loss)}), and the weights are finite. Look at "
            "how this batch was made (scaled targets or inputs, a wrong file); skip it.",
        )

    def numerics(self) -> bool:
        """A NaN/inf born inside an op, unless huge weights overflow it on any batch."""
        if self.base.finite:
            return False
        origin = _trace(self.model, self.runner, self.batch)
        if origin is None:
            return False
        self.result.origin = origin
        _fp32_check(origin, self.model, self.fn, self.b, self.batch, self.call)
        # An overflow from inputs beyond sqrt(max) (an upstream magnitude, not this op's domain)
        # or on a weight, that every known-good batch repeats, is the weights' doing.
        reach = max((_reach(i) for i in origin["inputs"]), default=0.0)
        huge = any(_reach(i) > _HUGE.get(i["dtype"], math.inf) for i in origin["inputs"])
        on_weight = any(i.get("parameter") for i in origin["inputs"])
        if origin.get("fp32_avoids") is not True and (huge or on_weight):
            trials = self.known_good()
            decisive = _decisive(trials)
            if decisive and all(t["finite"] is False for t in decisive):
                self.result.model = {"nonfinite": [], "known_good": trials}
                name, top = _largest_weight(self.model)
                return self.decide(
                    "model-state",
                    f": the weights were already bad: {origin['op']} overflows on inputs up to "
                    f"{_g(reach)}"
                    f", the largest weight is {name} (|w| up to {_g(top)}), and "
                    + ", ".join(t["batch"] for t in decisive)
                    + " also give a non-finite result. Roll back to a snapshot from before the "
                    "weights grew.",
                )
        return self.decide("numerics", ": " + _describe_origin(origin))

    def extreme_everywhere(self) -> bool:
        """Finite but extreme, and every known-good batch is extreme too."""
        if not self.extreme(self.base):
            return False
        trials = self.known_good()
        for t in trials:
            t["extreme"] = t["finite"] is False or bool(
                t["finite"] and self.ref_norm and t["grad_norm"] > self.factor * self.ref_norm
            )
        self.result.model = {"nonfinite": [], "known_good": trials}
        if not (_decisive(trials) and all(t["extreme"] for t in _decisive(trials))):
            return False
        return self.decide(
            "model-state",
            ": the weights were already bad: every known-good batch ("
            + ", ".join(t["batch"] for t in trials)
            + f") also gives an extreme gradient (median of the last steps: "
            f"{_g(self.ref_norm)}). Roll back to a snapshot from before the weights went bad.",
        )

    def optimizer_state(
        self, optimizer_factory: Callable[[nn.Module], torch.optim.Optimizer] | None
    ) -> bool:
        """A sane gradient whose update is huge only with the recorded optimizer state."""
        if not self.base.finite:
            return False
        names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        grads = dict(zip(names, self.base.grads))
        check = _optimizer_check(self.b, self.model, grads, optimizer_factory, self.factor)
        self.result.optimizer = check
        if not check.get("checked"):
            self.result.notes.append(f"optimizer not checked: {check.get('why')}")
            return False
        if not (check["huge"] and check["repaired_sane"]):
            return False
        moved = "; ".join(
            f"{t['name']} moves {_g(t['update'])} ({_g(t['ratio'])}x the repaired "
            f"{_g(t['repaired'])}, weight norm {_g(t['weight'])})"
            for t in [t for t in check["tensors"] if t["huge"]][:3]
        )
        return self.decide(
            "optimizer-state",
            f": the gradient is sane (norm {_g(self.base.grad_norm)}) but the optimizer update "
            f"is huge: {moved}. With the optimizer state repaired ({check['repair']}) the "
            "update is sane: the optimizer's state for these tensors went bad (e.g. Adam's "
            "second moment collapsed). Reset their moments (SPAM, arXiv 2501.06842) or raise "
            "eps.",
        )


def _reach(described: dict[str, Any]) -> float:
    """The largest finite magnitude of a traced input."""
    return max(abs(described["min"] or 0.0), abs(described["max"] or 0.0))


def _largest_weight(model: nn.Module) -> tuple[str, float]:
    best = ("", 0.0)
    for name, p in model.named_parameters():
        d = p.detach()
        if d.numel() and d.is_floating_point():
            top = _f(d[torch.isfinite(d)].abs().max()) if bool(torch.isfinite(d).any()) else 0.0
            best = max(best, (name, top), key=lambda x: x[1])
    return best


def _decisive(trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The known-good batches that exercise the weights: zero inputs reach only the biases."""
    return [t for t in trials if t["batch"] != "zero inputs"] or trials


def _try(runner: _Runner, name: str, batch: Any) -> dict[str, Any]:
    try:
        r = runner(batch)
    except (RuntimeError, ValueError) as e:
        return {"batch": name, "finite": None, "error": f"{type(e).__name__}: {e}"}
    return {"batch": name, "finite": r.finite, "loss": r.loss, "grad_norm": r.grad_norm}


def _fp32_check(
    origin: dict[str, Any],
    model: nn.Module,
    fn: LossFn,
    b: Bundle,
    batch: Any,
    call: Call | None = None,
) -> None:
    low = b.meta.get("amp_dtype") is not None or any(p.dtype in _LOW for p in model.parameters())
    if not low:
        origin["fp32_avoids"] = None
        return
    wide = copy.deepcopy(model).float()

    def widen(t: Any) -> Any:
        return t.float() if isinstance(t, Tensor) and t.is_floating_point() else t

    run = _Runner(wide, fn, b.snapshot.get("rng"), None, call)(tree_map(widen, batch))
    origin["fp32_avoids"] = run.finite
    origin["fp32"] = {"loss": run.loss, "grad_norm": run.grad_norm}


def _describe_origin(o: dict[str, Any]) -> str:
    ins = o["inputs"]
    rng = "; ".join(
        f"{i['dtype']} {tuple(i['shape'])} in [{_g(i['min'])}, {_g(i['max'])}]"
        + (f" ({i['parameter']})" if i.get("parameter") else "")
        for i in ins[:3]
    )
    what = "NaN/inf" if o["output"]["nonfinite"] else "non-finite value"
    where = f"in module {o['module']}" if o.get("module") else "outside any module"
    text = (
        f"a {what} was born inside an op in the {o['direction']} pass: {o['op']} {where}"
        + (f" (autograd node {o['autograd_node']})" if o.get("autograd_node") else "")
        + (f", from finite inputs {rng}" if o["born"] else f", inputs {rng}")
        + "."
    )
    if o.get("fp32_avoids") is True:
        text += (
            " In fp32 the step is finite: the low precision overflows here; keep this op in "
            "fp32 or scale its input down."
        )
    elif o.get("fp32_avoids") is False:
        text += " fp32 does not avoid it: the op's input is outside its domain or range."
    return text + " Fix the op (clamp its input, add an epsilon) rather than the data."
