"""Preflight diagnosis: do gradients explode or vanish in this initialized model, and what fixes it?

Backpropagation multiplies one factor per layer (the chain rule), so the gradient that reaches the
input is the product of the per-layer gains. :func:`diagnose` measures those gains on one batch,
on a copy of the model, before any training:

* **layers** are the modules that own a weight with two or more dimensions (``Linear``, ``Conv``,
  ``RNN``, ``Embedding``, custom layers), in the order they first run. Normalization layers have
  1-dim weights and are not layers: they belong to the segment they sit in. A module that runs
  several times (weight sharing) is measured at its first call.
* **segments**: segment ``i`` runs from the input of layer ``i`` to the input of layer ``i + 1``
  (so it holds layer ``i`` and the activation after it); the last one ends at the last layer's
  output. Their gains multiply to the whole depth's gain.
* **gain** of a segment: the L2 norm of the loss gradient at its start over the norm at its end.
  Norms rather than RMS, so that a change of width is not counted as growth (a Kaiming-initialized
  ReLU layer has gain ~1 whatever its fan-in and fan-out).
* **per-layer gain**: the geometric mean of the segment gains, ``overall ** (1 / n_layers)``.
* **Jacobian norm**: an estimate of each segment's Jacobian spectral norm on the recorded input,
  by power iteration with double-backward products (``J v`` and ``J^T u``); over a batch the
  Jacobian is block-diagonal for per-sample layers, so this is the largest per-sample value.

The verdict is "exploding" when the gradient at the input is more than ``tolerance`` times its size
at the output, "vanishing" when it is less than ``1 / tolerance`` times, else "healthy". Each
remedy of :mod:`gradguard.remedies` is then applied to a fresh copy and measured the same way,
and ranked: those that make the model healthy first, then by how close the per-layer gain
gets to 1.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradguard import _validate
from gradguard import remedies as _rem
from gradguard.records import SCHEMA_VERSION, Row

__all__ = [
    "Diagnosis",
    "Gains",
    "LayerStats",
    "RemedyResult",
    "default_loss",
    "diagnose",
    "measure_gains",
]

LossFn = Callable[[Any, Any], Tensor]


@dataclass
class LayerStats:
    """What one layer measured. Gains refer to the segment that starts at this layer's input."""

    index: int
    name: str
    module: str
    act_rms: float  # RMS of the layer's output (forward)
    grad_rms: float  # RMS of dLoss/d(output of the layer)
    grad_norm: float  # L2 norm of the gradient at the segment's start (the layer's input)
    weight_grad_norm: float  # L2 norm of dLoss/d(the layer's own parameters)
    gain: float  # backward gain of the segment: grad norm at its start / at its end
    act_gain: float  # forward: RMS of this layer's output / RMS of the previous layer's output
    jacobian_norm: float | None  # spectral-norm estimate of the segment's Jacobian


@dataclass
class RemedyResult:
    """One remedy, measured on a copy of the model."""

    name: str
    how: str  # the call that applies it
    per_layer_gain: float = math.nan
    overall_gain: float = math.nan
    verdict: str = ""
    loss_after: float = math.nan  # loss after ``steps`` SGD steps on the batch
    threshold: float | None = None  # for the clipping remedy
    note: str = ""
    error: str | None = None  # why it does not apply to this model

    @property
    def applicable(self) -> bool:
        return self.error is None


@dataclass
class Diagnosis:
    """The result of :func:`diagnose`.

    Attributes:
        layers: per-layer statistics in execution order.
        per_layer_gain: geometric mean of the backward gains per layer.
        overall_gain: gradient norm at the input over the gradient norm at the output.
        forward_gain: geometric mean of the per-layer activation RMS gains.
        verdict: ``"exploding"``, ``"vanishing"`` or ``"healthy"``.
        message: the verdict in plain words.
        loss: the loss on the batch.
        tolerance: the verdict's threshold on the overall gain.
        remedies: ranked, best first (empty when not requested).
        steps: SGD steps behind each remedy's ``loss_after`` (0: not trained).
    """

    layers: list[LayerStats]
    per_layer_gain: float
    overall_gain: float
    forward_gain: float
    verdict: str
    message: str
    loss: float
    tolerance: float
    remedies: list[RemedyResult] = field(default_factory=list)
    steps: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Plain Python values (JSON-ready except for non-finite floats)."""
        d = asdict(self)
        for r, obj in zip(d["remedies"], self.remedies):
            r["applicable"] = obj.applicable
        return d

    @property
    def worst_layer(self) -> LayerStats | None:
        """The layer whose segment gain is farthest from 1 (where to look first)."""
        finite = [s for s in self.layers if s.gain > 0 and math.isfinite(s.gain)]
        return max(finite, key=lambda s: abs(math.log(s.gain))) if finite else None

    def summary(self) -> str:
        """A plain-text report: verdict, per-layer table and ranked remedies."""
        lines = [f"verdict: {self.verdict.upper()}", self.message]
        if math.isfinite(self.forward_gain):
            lines.append(
                f"forward, the activations' RMS changes about {self.forward_gain:.3g}x per layer"
            )
        worst = self.worst_layer
        if worst is not None:
            lines.append(
                f"farthest from 1: layer {worst.index} ({worst.name}, {worst.module}), "
                f"gain {worst.gain:.3g}x"
            )
        lines.append("")
        lines.append(
            f"{'#':>3} {'layer':<24} {'act rms':>10} {'grad rms':>10} {'gain':>8} {'|J|':>8}"
        )
        for s in self.layers:
            jac = "-" if s.jacobian_norm is None else f"{s.jacobian_norm:.3g}"
            lines.append(
                f"{s.index:>3} {s.name[:24]:<24} {s.act_rms:>10.3g} {s.grad_rms:>10.3g} "
                f"{s.gain:>8.3g} {jac:>8}"
            )
        if self.remedies:
            lines += ["", "remedies, best first (measured on a copy of the model):"]
            rank = 0
            for r in self.remedies:
                if not r.applicable:
                    continue
                rank += 1
                trained = f", loss after {self.steps} SGD steps {r.loss_after:.3g}"
                extra = (trained if self.steps else "") + (f"; {r.note}" if r.note else "")
                lines.append(
                    f"{rank:>2}. {r.name}: per-layer gain {r.per_layer_gain:.3g}, over the depth "
                    f"{r.overall_gain:.3g}{extra}"
                )
                lines.append(f"    apply: {r.how}")
            skipped = [r for r in self.remedies if not r.applicable]
            for r in skipped:
                lines.append(f"  - {r.name}: not applicable ({r.error})")
        return "\n".join(lines)

    def to_rows(self, step: int = 0) -> list[Row]:
        """Records rows (kind ``"diagnosis"``): one ``part="verdict"`` row, one ``part="layer"``
        row per layer and one ``part="remedy"`` row per remedy (rank 0: not applicable)."""
        base = {"v": SCHEMA_VERSION, "kind": "diagnosis", "step": int(step)}
        worst = self.worst_layer
        rows: list[Row] = [
            {
                **base,
                "part": "verdict",
                "verdict": self.verdict,
                "message": self.message,
                "per_layer_gain": self.per_layer_gain,
                "overall_gain": self.overall_gain,
                "forward_gain": self.forward_gain,
                "n_layers": len(self.layers),
                "loss": self.loss,
                "steps": self.steps,
                "worst_layer": None if worst is None else worst.name,
                "worst_gain": None if worst is None else worst.gain,
            }
        ]
        for s in self.layers:
            rows.append({**base, "part": "layer", **asdict(s)})
        rank = 0
        for r in self.remedies:
            rank += r.applicable
            rows.append(
                {
                    **base,
                    "part": "remedy",
                    "rank": rank if r.applicable else 0,
                    "remedy": r.name,
                    "how": r.how,
                    "per_layer_gain": r.per_layer_gain,
                    "overall_gain": r.overall_gain,
                    "verdict": r.verdict,
                    "loss_after": r.loss_after,
                    "threshold": r.threshold,
                    "note": r.note,
                    "error": r.error,
                }
            )
        return rows


def default_loss(output: Any, batch: Any) -> Tensor:
    """The loss :func:`diagnose` uses when none is given.

    ``(x, y)`` with an integer ``y``: cross-entropy; with a floating ``y`` of the output's shape:
    mean squared error; a bare tensor batch: ``output.pow(2).mean()`` (its gradient is the output
    itself, which is what a gain measurement needs). A tuple output uses its first item.
    """
    out = output[0] if isinstance(output, (tuple, list)) else output
    if isinstance(batch, (tuple, list)) and len(batch) >= 2 and isinstance(batch[1], Tensor):
        y = batch[1]
        if not y.dtype.is_floating_point and out.dim() >= 2:
            return F.cross_entropy(out.float(), y)
        if y.dtype.is_floating_point and y.shape == out.shape:
            return F.mse_loss(out.float(), y.float())
        raise ValueError(
            f"cannot pick a default loss for output shape {tuple(out.shape)} and target "
            f"{y.dtype} of shape {tuple(y.shape)}; pass loss_fn(output, batch)"
        )
    return out.float().pow(2).mean()


def _first_tensor(x: Any) -> Tensor | None:
    if isinstance(x, Tensor):
        return x
    if isinstance(x, (tuple, list)) and x and isinstance(x[0], Tensor):
        return x[0]
    return None


def _owns_weight(m: nn.Module) -> bool:
    return any(p.dim() >= 2 for p in m.parameters(recurse=False))


def _f(t: Tensor) -> float:
    return float(t.detach().double())


def _norm(t: Tensor | None) -> float:
    return math.nan if t is None else _f(torch.linalg.vector_norm(t.detach().double()))


def _rms(t: Tensor) -> float:
    return _f(t.detach().double().pow(2).mean().sqrt()) if t.numel() else math.nan


def _spectral_norm(x: Tensor, y: Tensor, iters: int, gen: torch.Generator) -> float | None:
    """Power iteration for the largest singular value of dy/dx, with J v from double-backward."""
    if iters <= 0 or not x.requires_grad:
        return None
    try:
        w = torch.zeros_like(y, requires_grad=True)
        (jt_w,) = torch.autograd.grad(y, x, w, create_graph=True, allow_unused=True)
        if jt_w is None or not jt_w.requires_grad:
            return None
        v = torch.randn(x.shape, generator=gen, dtype=x.dtype).to(x.device)
        v = v / torch.linalg.vector_norm(v).clamp_min(1e-30)
        sigma = 0.0
        for _ in range(iters):
            (jv,) = torch.autograd.grad(jt_w, w, v, retain_graph=True)
            sigma = _norm(jv)
            if not sigma > 0 or not math.isfinite(sigma):
                break
            (jtu,) = torch.autograd.grad(y, x, jv, retain_graph=True)
            n = torch.linalg.vector_norm(jtu)
            if not _f(n) > 0:
                break
            v = jtu / n
        return sigma
    except RuntimeError:
        # Some ops are not twice differentiable; the estimate is optional.
        return None


@dataclass
class Gains:
    """What :func:`measure_gains` found: per-layer statistics and the three summary gains."""

    layers: list[LayerStats]
    overall: float
    per_layer: float
    forward: float
    loss: float


def measure_gains(
    model: nn.Module,
    batch: Any,
    loss_fn: LossFn | None = None,
    *,
    jacobian_iters: int = 10,
    generator: torch.Generator | None = None,
) -> Gains:
    """One forward and backward of ``model`` on ``batch`` with hooks: the per-layer statistics.

    The building block of :func:`diagnose` (which calls it on copies). The model is used as
    given, in its current mode; parameter ``.grad`` is not touched (gradients come from
    ``torch.autograd.grad``), but a module with state (BatchNorm running statistics) sees one
    forward pass.

    Args:
        model: the model to measure.
        batch: a tensor or an ``(x, y, ...)`` tuple.
        loss_fn: ``loss_fn(output, batch)``; ``None``: :func:`default_loss`.
        jacobian_iters: power-iteration steps per segment Jacobian (0: no estimate).
        generator: random source of the power iteration's start vectors.

    Returns:
        :class:`Gains`.

    Example:
        >>> g = measure_gains(copy.deepcopy(model), (x, y), jacobian_iters=0)
        >>> g.per_layer, [s.gain for s in g.layers]
    """
    loss_fn = loss_fn or default_loss
    gen = generator or torch.Generator().manual_seed(0)
    order: list[tuple[str, nn.Module]] = []
    inputs: dict[int, Tensor | None] = {}
    outputs: dict[int, Tensor] = {}

    def pre_hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        if id(module) not in inputs:
            x = _first_tensor(args)
            inputs[id(module)] = x if x is not None and x.requires_grad else None

    def fwd_hook(module: nn.Module, args: Any, output: Any) -> None:
        if id(module) in outputs:
            return
        out = _first_tensor(output)
        if out is not None and out.requires_grad:
            outputs[id(module)] = out
            order.append((names[id(module)], module))

    names = {id(m): n for n, m in model.named_modules()}
    handles = []
    for m in model.modules():
        if _owns_weight(m):
            handles.append(m.register_forward_pre_hook(pre_hook))
            handles.append(m.register_forward_hook(fwd_hook))
    x_in = _rem.model_input(batch)
    if isinstance(x_in, Tensor) and x_in.is_floating_point() and not x_in.requires_grad:
        # A differentiable copy of the input, so that the gradient reaching it is measured on
        # every path (a skip connection around the first layer included).
        x_in = x_in.detach().requires_grad_(True)
    try:
        output = model(x_in)
    finally:
        for h in handles:
            h.remove()
    if not order:
        raise ValueError(
            "diagnose found no layer (a module owning a weight with 2+ dimensions) whose output "
            "requires grad; is the model frozen or empty?"
        )
    loss = loss_fn(output, batch)
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise TypeError("loss_fn must return a scalar tensor")
    n = len(order)
    ins = [inputs.get(id(m)) for _, m in order]
    outs = [outputs[id(m)] for _, m in order]
    wanted: list[Tensor] = [t for t in ins if t is not None] + outs
    params = [[p for p in m.parameters(recurse=False) if p.requires_grad] for _, m in order]
    flat_params: list[Tensor] = [p for ps in params for p in ps]
    grads = torch.autograd.grad(loss, wanted + flat_params, retain_graph=True, allow_unused=True)
    by_id = {id(t): g for t, g in zip(wanted + flat_params, grads)}
    g_in = [by_id.get(id(t)) if t is not None else None for t in ins]
    g_out = [by_id.get(id(t)) for t in outs]
    # The gradient at each segment's start: the layer's input, or its output if the input is
    # not differentiable (an embedding's indices).
    points = [_norm(gi if gi is not None else go) for gi, go in zip(g_in, g_out)]
    end = _norm(g_out[-1])
    ends = [*points[1:], end]
    stats: list[LayerStats] = []
    prev_rms = math.nan
    for i, (name, m) in enumerate(order):
        act_rms = _rms(outs[i])
        x, y = ins[i], (ins[i + 1] if i + 1 < n else outs[i])
        jac = _spectral_norm(x, y, jacobian_iters, gen) if x is not None and y is not None else None
        go_i = g_out[i]
        wg = [by_id.get(id(p)) for p in params[i]]
        wnorm = math.sqrt(sum(_norm(g) ** 2 for g in wg if g is not None))
        stats.append(
            LayerStats(
                index=i,
                name=name or type(m).__name__,
                module=type(m).__name__,
                act_rms=act_rms,
                grad_rms=_rms(go_i) if go_i is not None else math.nan,
                grad_norm=points[i],
                weight_grad_norm=wnorm,
                gain=_ratio(points[i], ends[i]),
                act_gain=_ratio(act_rms, prev_rms) if i else math.nan,
                jacobian_norm=jac,
            )
        )
        prev_rms = act_rms
    # No gradient at either end (a dead ReLU stack): nothing reaches the input, it vanished.
    overall = 0.0 if points[0] == 0 and end == 0 else _ratio(points[0], end)
    act_gains = [s.act_gain for s in stats[1:]]
    forward = _ratio(stats[-1].act_rms, stats[0].act_rms) ** (1.0 / max(len(act_gains), 1))
    return Gains(stats, overall, _geo(overall, n), forward, _f(loss))


def _ratio(a: float, b: float) -> float:
    if math.isnan(a) or math.isnan(b):
        return math.nan
    if b == 0:
        return math.inf if a > 0 else math.nan
    return a / b


def _geo(overall: float, n: int) -> float:
    if math.isnan(overall) or overall < 0:
        return math.nan
    if overall == 0:
        return 0.0
    if math.isinf(overall):
        return math.inf
    return math.exp(math.log(overall) / n)


def _verdict(overall: float, tolerance: float) -> str:
    if math.isnan(overall):
        return "unknown"
    if overall > tolerance:
        return "exploding"
    if overall < 1.0 / tolerance:
        return "vanishing"
    return "healthy"


def _describe(verdict: str, per_layer: float, overall: float, n: int) -> str:
    if verdict == "unknown":
        return "the gradient could not be measured (it is NaN); check the loss and the input"
    if overall == 0:
        return (
            f"backward, no gradient reaches the input: it is exactly zero ({n} layers); "
            "dead ReLUs or zero weights block it"
        )
    if per_layer >= 1.0:
        head = f"backward, the gradient grows about {per_layer:.3g}x per layer"
    else:
        head = f"backward, the gradient shrinks to about {per_layer:.3g}x per layer"
    tail = f"at the input it is {overall:.2g} times its size at the output ({n} layers)"
    if verdict == "healthy":
        tail += ", which is healthy"
    return f"{head}; {tail}"


def _train_loss(
    model: nn.Module,
    batch: Any,
    loss_fn: LossFn,
    steps: int,
    lr: float,
    *,
    clip: float | None = None,
    l2: float = 0.0,
) -> float:
    """The loss after ``steps`` plain SGD steps on ``batch`` (NaN/inf when training blew up)."""
    # Plain SGD by hand: constructing a torch.optim optimizer imports torch._dynamo (seconds).
    params = [p for p in model.parameters() if p.requires_grad]
    x = _rem.model_input(batch)
    for _ in range(steps):
        loss = loss_fn(model(x), batch)
        if l2:
            loss = loss + _rem.l2_penalty(model, l2).to(loss.device)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        pairs = [(p, g) for p, g in zip(params, grads) if g is not None]
        if clip is not None and pairs:
            total = torch.linalg.vector_norm(torch.stack([g.norm() for _, g in pairs]))
            coef = (clip / (total + 1e-6)).clamp(max=1.0)
            pairs = [(p, g * coef) for p, g in pairs]
        with torch.no_grad():
            for p, g in pairs:
                p.sub_(g, alpha=lr)
    with torch.no_grad():
        return _f(loss_fn(model(x), batch))


def _chunks(batch: Any, k: int) -> list[Any]:
    """Split a batch along dim 0 into up to ``k`` sub-batches (the batch itself if it cannot)."""
    x = _rem.model_input(batch)
    if not isinstance(x, Tensor) or x.dim() == 0 or x.shape[0] < 2:
        return [batch]
    idx = torch.arange(x.shape[0]).chunk(min(k, x.shape[0]))
    if isinstance(batch, (tuple, list)):
        return [
            type(batch)(t[i.to(t.device)] if isinstance(t, Tensor) else t for t in batch)
            for i in idx
        ]
    return [batch[i.to(batch.device)] for i in idx]


def _total_grad_norm(model: nn.Module, batch: Any, loss_fn: LossFn) -> float:
    model.zero_grad(set_to_none=True)
    loss_fn(model(_rem.model_input(batch)), batch).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    model.zero_grad(set_to_none=True)
    return _f(total)


@contextlib.contextmanager
def _rng_fork(model: nn.Module, seed: int) -> Iterator[None]:
    cuda = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        yield


def _remedy_candidates(
    model: nn.Module, batch: Any, l2: float
) -> list[tuple[str, str, Callable[[], nn.Module]]]:
    def reinit(scheme: str) -> Callable[[], nn.Module]:
        return lambda: _rem.reinit_(copy.deepcopy(model), scheme)

    lo, cur = _rem.truncatable_range(model)
    half = max(lo, cur // 2)

    def fewer() -> nn.Module:
        if half >= cur:
            raise ValueError("no hidden block of the same input and output shape to remove")
        return _rem.truncate(model, half)

    return [
        ("kaiming init", "gradguard.remedies.reinit_(model, 'kaiming')", reinit("kaiming")),
        ("xavier init", "gradguard.remedies.reinit_(model, 'xavier')", reinit("xavier")),
        ("orthogonal init", "gradguard.remedies.reinit_(model, 'orthogonal')",
         reinit("orthogonal")),
        ("LSUV init", "gradguard.remedies.lsuv_(model, batch)",
         lambda: _rem.lsuv_(copy.deepcopy(model), batch)),
        ("batch norm", "model = gradguard.remedies.insert_norm(model, 'batch')",
         lambda: _rem.insert_norm(model, "batch")),
        ("layer norm", "model = gradguard.remedies.insert_norm(model, 'layer')",
         lambda: _rem.insert_norm(model, "layer")),
        ("residual connections", "model = gradguard.remedies.add_residual(model)",
         lambda: _rem.add_residual(model)),
        (f"fewer layers ({half} of {cur})" if half < cur else "fewer layers",
         f"model = gradguard.remedies.truncate(model, {half})", fewer),
        (f"L2 penalty ({l2:g})",
         f"loss = loss + gradguard.remedies.l2_penalty(model, {l2:g})",
         lambda: copy.deepcopy(model)),
    ]  # fmt: skip


def diagnose(
    model: nn.Module,
    batch: Any,
    loss_fn: LossFn | None = None,
    *,
    remedies: bool = True,
    tolerance: float = 10.0,
    jacobian_iters: int = 10,
    steps: int = 5,
    lr: float = 1e-2,
    l2: float = 1e-3,
    percentile: float = 10.0,
    seed: int = 0,
) -> Diagnosis:
    """Diagnose exploding or vanishing gradients on the initialized ``model``, before training.

    Nothing of ``model`` changes: everything runs on ``copy.deepcopy(model)`` in train mode, and
    the global random state is restored afterwards. See the module docstring for what a layer,
    a segment and a gain are.

    Args:
        model: the model, as initialized.
        batch: a tensor, or an ``(x, y, ...)`` tuple whose first item is the model's input.
        loss_fn: ``loss_fn(output, batch) -> scalar tensor``; ``None`` uses
            :func:`default_loss` (cross-entropy or MSE for ``(x, y)``, else
            ``output.pow(2).mean()``).
        remedies: also measure every remedy of :mod:`gradguard.remedies` on a copy and rank them.
        tolerance: "exploding" above this overall gain, "vanishing" below its inverse (> 1).
        jacobian_iters: power-iteration steps per Jacobian estimate (0 skips the estimate).
        steps: SGD steps each remedy (and the unchanged model) trains for, on the batch, to
            report the loss after them (0 skips).
        lr: their learning rate.
        l2: the L2 penalty weight tried as a remedy.
        percentile: the percentile of the norms over sub-batches used as clipping threshold
            (AutoClip, arXiv 2007.14469, uses 10).
        seed: seeds the remedies' initializations, so a diagnosis is reproducible.

    Returns:
        A :class:`Diagnosis`; ``print(d.summary())`` reads it out.

    Example:
        >>> d = gradguard.diagnose(mlp, (x, y))
        >>> d.verdict, d.per_layer_gain
        ('exploding', 1.73)
        >>> d.remedies[0].how
        "gradguard.remedies.reinit_(model, 'kaiming')"
    """
    _rem._check_module(model)
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable or None, got {type(loss_fn).__name__}")
    tol = float(tolerance) if isinstance(tolerance, (int, float)) else math.nan
    if isinstance(tolerance, bool) or not (1.0 < tol < math.inf):
        raise ValueError(f"tolerance must be a finite number > 1, got {tolerance!r}")
    for name, value, low in (("jacobian_iters", jacobian_iters, 0), ("steps", steps, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    _validate.threshold("lr", lr, allow_zero=False)
    _validate.threshold("l2", l2)
    p = _validate.as_float("percentile", percentile)
    if not 0.0 <= p <= 100.0:
        raise ValueError(f"percentile must be in [0, 100], got {percentile!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    x = _rem.model_input(batch)
    if not isinstance(x, Tensor):
        raise TypeError(
            f"batch must be a tensor or a tuple whose first item is a tensor, got "
            f"{type(x).__name__}"
        )
    fn: LossFn = loss_fn or default_loss
    with _rng_fork(model, seed):
        base = copy.deepcopy(model).train()
        g = measure_gains(base, batch, fn, jacobian_iters=jacobian_iters)
        verdict = _verdict(g.overall, tol)
        diag = Diagnosis(
            layers=g.layers,
            per_layer_gain=g.per_layer,
            overall_gain=g.overall,
            forward_gain=g.forward,
            verdict=verdict,
            message=_describe(verdict, g.per_layer, g.overall, len(g.layers)),
            loss=g.loss,
            tolerance=tol,
            steps=steps if remedies else 0,
        )
        if remedies:
            diag.remedies = _measure_remedies(base, batch, fn, g, tol, steps, lr, l2, percentile)
    return diag


def _measure_remedies(
    base: nn.Module,
    batch: Any,
    fn: LossFn,
    g: Gains,
    tol: float,
    steps: int,
    lr: float,
    l2: float,
    percentile: float,
) -> list[RemedyResult]:
    results: list[RemedyResult] = []
    baseline = RemedyResult(
        "no change (reference)",
        "(the model as it is)",
        g.per_layer,
        g.overall,
        _verdict(g.overall, tol),
    )
    if steps:
        baseline.loss_after = _train_loss(copy.deepcopy(base), batch, fn, steps, lr)
    results.append(baseline)
    for name, how, make in _remedy_candidates(base, batch, l2):
        r = RemedyResult(name, how)
        try:
            m = make().train()
            mg = measure_gains(m, batch, fn, jacobian_iters=0)
            r.per_layer_gain, r.overall_gain = mg.per_layer, mg.overall
            r.verdict = _verdict(mg.overall, tol)
            if name.startswith("L2"):
                r.note = "acts during training: the gain at initialization is unchanged"
            elif mg.overall == 0:
                r.note = "no gradient reaches the input (dead ReLUs or zero weights)"
            if steps:
                r.loss_after = _train_loss(m, batch, fn, steps, lr, l2=l2 if "L2" in name else 0)
        except (RuntimeError, ValueError, TypeError, IndexError) as e:
            r.error = str(e).splitlines()[0]
        results.append(r)
    clip = RemedyResult(
        "clip gradient norm",
        "torch.nn.utils.clip_grad_norm_(model.parameters(), {t:.3g})",
        g.per_layer,
        g.overall,
        _verdict(g.overall, tol),
    )
    try:
        norms = [_total_grad_norm(copy.deepcopy(base), b, fn) for b in _chunks(batch, 8)]
        t = _rem.suggest_clip_threshold(norms, percentile)
        clip.threshold, clip.how = t, clip.how.format(t=t)
        clip.note = (
            f"threshold = {percentile:g}th percentile of {len(norms)} sub-batch norms; caps the "
            "update, the gain is unchanged"
        )
        if steps:
            clip.loss_after = _train_loss(copy.deepcopy(base), batch, fn, steps, lr, clip=t)
    except (RuntimeError, ValueError, TypeError, IndexError) as e:
        clip.error = str(e).splitlines()[0]
    results.append(clip)

    def off(gain: float) -> float:
        return abs(math.log(gain)) if gain > 0 and math.isfinite(gain) else math.inf

    def key(r: RemedyResult) -> tuple[int, int, float, float, float]:
        # A remedy that makes the model healthy first; then the per-layer gain's distance from 1
        # (rounded, so that float noise does not decide a tie), then the whole depth's gain
        # (where fewer layers help), then the loss after a few steps.
        loss = r.loss_after if math.isfinite(r.loss_after) else math.inf
        return (
            0 if r.applicable else 1,
            0 if r.verdict == "healthy" else 1,
            round(off(r.per_layer_gain), 3),
            off(r.overall_gain),
            loss,
        )

    return sorted(results, key=key)
