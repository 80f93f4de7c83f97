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
  ReLU layer has gain ~1 whatever its fan-in, fan-out or stride).
* **shape changes**: a parameter-free module between two layers that changes the number of
  elements (average pooling, upsampling) scales the gradient once, whatever the depth: global
  average pooling over ``S`` positions divides the norm by ``sqrt(S)``. Its gain is measured
  apart (``LayerStats.shape_gain``) and left out of the segment's gain, so that a healthy CNN
  with pooling is not called vanishing. Flatten and reshapes keep the number of elements and
  max pooling keeps the norm; functional pooling in a ``forward`` is not a module and stays in.
* **depth gain**: the product of the segment gains (shape changes left out); **overall gain**:
  the gradient norm at the input over the norm at the output, as measured (the two are equal
  without shape changes). **per-layer gain**: ``depth ** (1 / n_layers)``, the geometric mean.
* **Jacobian norm**: an estimate of each segment's Jacobian spectral norm on the recorded input,
  by power iteration with double-backward products (``J v`` and ``J^T u``); over a batch the
  Jacobian is block-diagonal for per-sample layers, so this is the largest per-sample value.

Norms are measured by :mod:`gradguard.core.norms` (in float64, so a vanished gradient does not
underflow) and the clipping remedy clips with :func:`gradguard.core.clip.clip_grad_norm_`.

The verdict is "exploding" when the depth gain is above ``tolerance``, "vanishing" when it is
below ``1 / tolerance``, else "healthy". Each remedy of :mod:`gradguard.insight.remedies` is then
applied to a fresh copy, run once in train and eval mode (a remedy that breaks the model is
reported as not applicable, with the reason), measured the same way, trained for a few SGD
steps, and ranked by :func:`rank_remedies`: a remedy that trains worse than no change never
ranks above it, one whose loss blows up ranks last, and otherwise those that make the model
healthy come first, then those whose per-layer gain gets closest to 1.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from gradguard.core import validate as _validate
from gradguard.core.batch import default_loss, model_input
from gradguard.core.clip import clip_grad_norm_
from gradguard.core.norms import get_total_norm, tensor_norms
from gradguard.insight import remedies as _rem
from gradguard.insight import transformer_remedies as _tr
from gradguard.insight.telemetry import AttentionTelemetry, attention_modules
from gradguard.records.recorder import SCHEMA_VERSION, Row

__all__ = [
    "BlockGain",
    "Diagnosis",
    "Gains",
    "LayerStats",
    "RemedyResult",
    "default_loss",
    "diagnose",
    "measure_blocks",
    "measure_gains",
    "probe_transformer_remedies",
    "rank_remedies",
    "transformer_blocks",
]

LossFn = Callable[[Any, Any], Tensor]
REFERENCE = "no change (reference)"  # the unchanged model's row among the remedies


@dataclass
class LayerStats:
    """What one layer measured. Gains refer to the segment that starts at this layer's input.

    Attributes:
        index: position in execution order.
        name: qualified module name.
        module: the module's class name.
        act_rms: RMS of the layer's output (forward).
        grad_rms: RMS of the loss gradient at the layer's output.
        grad_norm: L2 norm of the loss gradient at the segment's start (the layer's input).
        weight_grad_norm: L2 norm of the loss gradient of the layer's own parameters.
        gain: backward gain of the segment (gradient norm at its start over its end), without
            its shape changes; ``gain * shape_gain`` is the measured ratio.
        act_gain: forward RMS gain from the previous layer's output (shape changes excluded).
        jacobian_norm: spectral-norm estimate of the segment's Jacobian (None: not estimated).
        shape_gain: backward gain of the segment's shape changes (pooling), 1.0 without any.
        shape_steps: the modules behind ``shape_gain``, comma-separated.
    """

    index: int
    name: str
    module: str
    act_rms: float  # RMS of the layer's output (forward)
    grad_rms: float  # RMS of dLoss/d(output of the layer)
    grad_norm: float  # L2 norm of the gradient at the segment's start (the layer's input)
    weight_grad_norm: float  # L2 norm of dLoss/d(the layer's own parameters)
    gain: float  # backward gain of the segment without its shape changes
    act_gain: float  # forward: RMS of this layer's output / RMS of the previous layer's output
    jacobian_norm: float | None  # spectral-norm estimate of the segment's Jacobian
    shape_gain: float = 1.0  # backward gain of the segment's shape changes, not in ``gain``
    shape_steps: str = ""  # the modules behind ``shape_gain`` (comma-separated names)


@dataclass
class RemedyResult:
    """One remedy, measured on a copy of the model.

    Attributes:
        name: what it is (``"kaiming init"``).
        how: the call that applies it.
        per_layer_gain: ``depth_gain ** (1 / n_layers)`` of the changed model.
        overall_gain: its gradient norm at the input over the norm at the output, as measured.
        verdict: ``"exploding"``, ``"vanishing"``, ``"healthy"`` (on ``depth_gain``), or
            ``"unknown"`` when the gradient is NaN.
        loss_after: the loss after the probe run (``steps`` SGD steps on the batch); NaN when
            not trained, NaN/inf when training blew up.
        threshold: the clipping threshold (the clipping remedy only).
        note: what to keep in mind when reading the numbers.
        error: why it does not apply to this model (None: it applies).
        depth_gain: ``overall_gain`` without the shape changes between layers.
        max_logit: the largest attention logit after the probe run (transformer remedies,
            :func:`probe_transformer_remedies`; NaN otherwise).
    """

    name: str
    how: str
    per_layer_gain: float = math.nan
    overall_gain: float = math.nan
    verdict: str = ""
    loss_after: float = math.nan
    threshold: float | None = None
    note: str = ""
    error: str | None = None
    depth_gain: float = math.nan
    max_logit: float = math.nan

    @property
    def applicable(self) -> bool:
        """Whether the remedy could be applied, run and measured on this model."""
        return self.error is None


@dataclass
class BlockGain:
    """One transformer block's effect on the residual stream (see :func:`measure_blocks`).

    Attributes:
        index: position in execution order.
        name: the block's qualified name.
        rms_in, rms_out: RMS of the residual stream entering and leaving the block.
        forward_gain: ``rms_out / rms_in``: how much the block grows the stream.
        grad_in, grad_out: L2 norm of the loss gradient at the block's input and output.
        backward_gain: ``grad_in / grad_out``.
        max_logit: the block's largest attention logit on the batch.
    """

    index: int
    name: str
    rms_in: float
    rms_out: float
    forward_gain: float
    grad_in: float
    grad_out: float
    backward_gain: float
    max_logit: float = math.nan


@dataclass
class Diagnosis:
    """The result of :func:`diagnose`.

    Attributes:
        layers: per-layer statistics in execution order.
        per_layer_gain: geometric mean of the layers' backward gains,
            ``depth_gain ** (1 / n_layers)``.
        overall_gain: gradient norm at the input over the gradient norm at the output, as
            measured.
        forward_gain: geometric mean of the per-layer activation RMS gains.
        verdict: ``"exploding"``, ``"vanishing"``, ``"healthy"`` (on ``depth_gain``), or
            ``"unknown"`` when the gradient is NaN.
        message: the verdict in plain words.
        loss: the loss on the batch.
        tolerance: the verdict's threshold on the depth gain.
        remedies: ranked, best first (empty when not requested); see :func:`rank_remedies`.
        steps: SGD steps behind each remedy's ``loss_after`` (0: not trained).
        depth_gain: ``overall_gain`` without the shape changes between layers (pooling), the
            product of the layers' ``gain``; equal to ``overall_gain`` when nothing between two
            layers changes the number of elements.
        shape_gain: ``overall_gain / depth_gain``: what the shape changes contribute, once.
        loss_tolerance: how much worse than no change a remedy's loss may be before it ranks
            below it (relative).
        by_loss: whether the ranking compared losses with no change's (False for a bare tensor
            batch without ``loss_fn``: the default loss there is no training objective).
        blocks: for a transformer, each block's residual-stream gains (:func:`measure_blocks`).
        transformer_remedies: for a transformer, its remedies measured by a short high-LR
            AdamW probe run, ranked (:func:`probe_transformer_remedies`).
        probe: how that probe ran, in words.

    Example:
        >>> d = gradguard.diagnose(model, (x, y))
        >>> d.verdict, d.worst_layer.name
        ('vanishing', '4')
        >>> rows = d.to_rows(step=0)  # for gradguard.report.build_report
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
    depth_gain: float = math.nan
    shape_gain: float = 1.0
    loss_tolerance: float = 0.05
    by_loss: bool = True
    blocks: list[BlockGain] = field(default_factory=list)
    transformer_remedies: list[RemedyResult] = field(default_factory=list)
    probe: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Plain Python values (JSON-ready except for non-finite floats).

        Returns:
            The fields as nested dicts and lists; each remedy also carries ``applicable``.
        """
        d = asdict(self)
        for r, obj in zip(d["remedies"], self.remedies):
            r["applicable"] = obj.applicable
        for r, obj in zip(d["transformer_remedies"], self.transformer_remedies):
            r["applicable"] = obj.applicable
        return d

    @property
    def worst_layer(self) -> LayerStats | None:
        """The layer whose segment gain is farthest from 1 (where to look first)."""
        finite = [s for s in self.layers if s.gain > 0 and math.isfinite(s.gain)]
        return max(finite, key=lambda s: abs(math.log(s.gain))) if finite else None

    def summary(self) -> str:
        """A plain-text report: verdict, per-layer table and ranked remedies.

        Returns:
            Lines of text: the verdict and its message, the forward gain, the layer farthest
            from 1, one table row per layer (with the shape change after it, if any), then the
            applicable remedies best first (marked when they trained worse than no change or
            blew up) and the inapplicable ones as ``name: not applicable: why``.
        """
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
            shape = f"  (then {s.shape_steps}: {s.shape_gain:.3g}x, once)" if s.shape_steps else ""
            lines.append(
                f"{s.index:>3} {s.name[:24]:<24} {s.act_rms:>10.3g} {s.grad_rms:>10.3g} "
                f"{s.gain:>8.3g} {jac:>8}{shape}"
            )
        if self.remedies:
            lines += ["", "remedies, best first (measured on a copy of the model):"]
            ref = next((r for r in self.remedies if r.name == REFERENCE), None)
            ref_loss = math.nan if ref is None else ref.loss_after
            rank = 0
            for r in self.remedies:
                if not r.applicable:
                    continue
                rank += 1
                trained = f", loss after {self.steps} SGD steps {r.loss_after:.3g}"
                tier = _loss_tier(r, ref_loss, self.loss_tolerance, self.steps > 0, self.by_loss)
                if tier == 1:
                    trained += " (worse than no change)"
                elif tier == 2:
                    trained += " (training blew up)"
                extra = (trained if self.steps else "") + (f"; {r.note}" if r.note else "")
                lines.append(
                    f"{rank:>2}. {r.name}: per-layer gain {r.per_layer_gain:.3g}, over the depth "
                    f"{r.depth_gain:.3g}{extra}"
                )
                lines.append(f"    apply: {r.how}")
            skipped = [r for r in self.remedies if not r.applicable]
            for r in skipped:
                lines.append(f"  - {r.name}: not applicable: {r.error}")
        lines += self._transformer_lines()
        return "\n".join(lines)

    def _transformer_lines(self) -> list[str]:
        lines: list[str] = []
        if self.blocks:
            lines += ["", "transformer blocks (residual stream):"]
            lines.append(
                f"{'#':>3} {'block':<24} {'rms in':>8} {'rms out':>8} {'fwd':>6} {'bwd':>6} "
                f"{'max logit':>9}"
            )
            for b in self.blocks:
                lines.append(
                    f"{b.index:>3} {b.name[:24]:<24} {b.rms_in:>8.3g} {b.rms_out:>8.3g} "
                    f"{b.forward_gain:>6.3g} {b.backward_gain:>6.3g} {b.max_logit:>9.3g}"
                )
        if self.transformer_remedies:
            lines += ["", f"transformer remedies, best first ({self.probe}):"]
            rank = 0
            for r in self.transformer_remedies:
                if not r.applicable:
                    lines.append(f"  - {r.name}: not applicable: {r.error}")
                    continue
                rank += 1
                note = f"; {r.note}" if r.note else ""
                lines.append(
                    f"{rank:>2}. {r.name}: loss after {r.loss_after:.3g}, max attention logit "
                    f"{r.max_logit:.3g}{note}"
                )
                lines.append(f"    apply: {r.how}")
        return lines

    def to_rows(self, step: int = 0) -> list[Row]:
        """Records rows (kind ``"diagnosis"``) for the report and the sinks.

        Args:
            step: the training step the diagnosis belongs to.

        Returns:
            One ``part="verdict"`` row, one ``part="layer"`` row per layer and one
            ``part="remedy"`` row per remedy, in ranking order (``rank`` 0: not applicable).
        """
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
                "depth_gain": self.depth_gain,
                "shape_gain": self.shape_gain,
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
                    "depth_gain": r.depth_gain,
                    "verdict": r.verdict,
                    "loss_after": r.loss_after,
                    "threshold": r.threshold,
                    "note": r.note,
                    "error": r.error,
                }
            )
        for blk in self.blocks:
            rows.append({**base, "part": "block", **asdict(blk)})
        rank = 0
        for r in self.transformer_remedies:
            rank += r.applicable
            rows.append(
                {
                    **base,
                    "part": "transformer_remedy",
                    "rank": rank if r.applicable else 0,
                    "remedy": r.name,
                    "how": r.how,
                    "loss_after": r.loss_after,
                    "max_logit": r.max_logit,
                    "note": r.note,
                    "error": r.error,
                }
            )
        return rows


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
        v = v / get_total_norm(v).clamp_min(1e-30)
        sigma = 0.0
        for _ in range(iters):
            (jv,) = torch.autograd.grad(jt_w, w, v, retain_graph=True)
            sigma = _norms([jv])[0]
            if not sigma > 0 or not math.isfinite(sigma):
                break
            (jtu,) = torch.autograd.grad(y, x, jv, retain_graph=True)
            n = get_total_norm(jtu)
            if not _f(n) > 0:
                break
            v = jtu / n
        return sigma
    except RuntimeError:
        # Some ops are not twice differentiable; the estimate is optional.
        return None


@dataclass
class Gains:
    """What :func:`measure_gains` found: per-layer statistics and the summary gains.

    Attributes:
        layers: per-layer statistics, in execution order.
        overall: gradient norm at the first layer's input over the norm at the last layer's
            output, as measured.
        per_layer: ``depth ** (1 / len(layers))``.
        forward: geometric mean of the layers' activation RMS gains (shape changes excluded).
        loss: the loss on the batch.
        depth: ``overall`` without the shape changes between layers (``overall / shape``).
        shape: the product of the excluded shape changes' gains (1.0 when there are none).
    """

    layers: list[LayerStats]
    overall: float
    per_layer: float
    forward: float
    loss: float
    depth: float
    shape: float


@dataclass
class _ShapeStep:
    """One call of a parameter-free module that changes the number of elements (pooling)."""

    name: str
    x: Tensor
    y: Tensor
    t0: int
    t1: int


def _norms(ts: Sequence[Tensor | None]) -> list[float]:
    """L2 norms (NaN for None) measured by :func:`gradguard.core.norms.tensor_norms`, in float64:
    the entries of a vanished gradient (1e-20) square below float32's range."""
    present = [t.detach().double() for t in ts if t is not None]
    values = iter(torch.stack([n.cpu() for n in tensor_norms(present)]).tolist() if present else [])
    return [math.nan if t is None else next(values) for t in ts]


def _rms(norm: float, t: Tensor) -> float:
    return norm / math.sqrt(t.numel()) if t.numel() else math.nan


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
    forward pass. Norms are measured by :mod:`gradguard.core.norms` (in float64).

    Shape changes: a parameter-free module (no children, no weight of 2+ dimensions) whose
    output has a different number of elements than its input (``AvgPool2d``,
    ``AdaptiveAvgPool2d``, ``Upsample``) and that runs between one layer's input and the next
    layer's input scales the gradient once, not once per layer: average pooling over ``S``
    positions divides the norm by ``sqrt(S)`` whatever the weights. Its gain (gradient norm at
    its input over its output) is divided out of that segment's ``gain`` and kept in the
    layer's ``shape_gain``; its forward RMS ratio likewise leaves ``act_gain``. Functional
    pooling (``x.mean((2, 3))`` in a forward) is not a module and stays in the gain.

    Args:
        model: the model to measure.
        batch: a tensor or an ``(x, y, ...)`` tuple.
        loss_fn: ``loss_fn(output, batch)``; ``None``: :func:`default_loss`.
        jacobian_iters: power-iteration steps per segment Jacobian (0: no estimate).
        generator: random source of the power iteration's start vectors.

    Returns:
        :class:`Gains`.

    Raises:
        ValueError: no layer's output requires grad (a frozen or empty model).
        TypeError: ``loss_fn`` did not return a scalar tensor.

    Example:
        >>> g = measure_gains(copy.deepcopy(model), (x, y), jacobian_iters=0)
        >>> g.per_layer, [s.gain for s in g.layers]
    """
    loss_fn = loss_fn or default_loss
    gen = generator or torch.Generator().manual_seed(0)
    clock = itertools.count()
    order: list[tuple[str, nn.Module]] = []
    inputs: dict[int, Tensor | None] = {}
    outputs: dict[int, Tensor] = {}
    start: dict[int, int] = {}
    finish: dict[int, int] = {}
    shape_steps: list[_ShapeStep] = []
    pending: dict[int, list[tuple[int, Tensor | None]]] = {}

    def pre_hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        if id(module) not in inputs:
            x = _first_tensor(args)
            inputs[id(module)] = x if x is not None and x.requires_grad else None
            start[id(module)] = next(clock)

    def fwd_hook(module: nn.Module, args: Any, output: Any) -> None:
        if id(module) in outputs:
            return
        out = _first_tensor(output)
        if out is not None and out.requires_grad:
            outputs[id(module)] = out
            finish[id(module)] = next(clock)
            order.append((names[id(module)], module))

    def step_pre(module: nn.Module, args: tuple[Any, ...]) -> None:
        pending.setdefault(id(module), []).append((next(clock), _first_tensor(args)))

    def step_post(module: nn.Module, args: Any, output: Any) -> None:
        t0, x = pending[id(module)].pop()
        y = _first_tensor(output)
        if (
            x is not None
            and y is not None
            and x.requires_grad
            and y.requires_grad
            and x.numel() != y.numel()
        ):
            name = f"{names[id(module)] or '(root)'} ({type(module).__name__})"
            shape_steps.append(_ShapeStep(name, x, y, t0, next(clock)))

    names = {id(m): n for n, m in model.named_modules()}
    handles = []
    for m in model.modules():
        if _owns_weight(m):
            handles.append(m.register_forward_pre_hook(pre_hook))
            handles.append(m.register_forward_hook(fwd_hook))
        elif next(m.children(), None) is None:
            handles.append(m.register_forward_pre_hook(step_pre))
            handles.append(m.register_forward_hook(step_post))
    x_in = model_input(batch)
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
    wanted += [t for st in shape_steps for t in (st.x, st.y)]
    params = [[p for p in m.parameters(recurse=False) if p.requires_grad] for _, m in order]
    flat_params: list[Tensor] = [p for ps in params for p in ps]
    grads = torch.autograd.grad(loss, wanted + flat_params, retain_graph=True, allow_unused=True)
    by_id = {id(t): g for t, g in zip(wanted + flat_params, grads)}

    def grad_of(t: Tensor | None) -> Tensor | None:
        return None if t is None else by_id.get(id(t))

    g_in = [grad_of(t) for t in ins]
    g_out = [grad_of(t) for t in outs]
    # The gradient at each segment's start: the layer's input, or its output if the input is
    # not differentiable (an embedding's indices).
    points = _norms([gi if gi is not None else go for gi, go in zip(g_in, g_out)])
    out_norms = _norms(outs)
    go_norms = _norms(g_out)
    end = go_norms[-1]
    ends = [*points[1:], end]
    bounds = [start[id(m)] for _, m in order] + [finish[id(order[-1][1])]]
    back, fwd, labels = _shape_factors(shape_steps, grad_of, bounds)
    stats: list[LayerStats] = []
    prev_rms = math.nan
    for i, (name, m) in enumerate(order):
        act_rms = _rms(out_norms[i], outs[i])
        x, y = ins[i], (ins[i + 1] if i + 1 < n else outs[i])
        jac = _spectral_norm(x, y, jacobian_iters, gen) if x is not None and y is not None else None
        go_i = g_out[i]
        wg = [g for g in (by_id.get(id(p)) for p in params[i]) if g is not None]
        stats.append(
            LayerStats(
                index=i,
                name=name or type(m).__name__,
                module=type(m).__name__,
                act_rms=act_rms,
                grad_rms=_rms(go_norms[i], go_i) if go_i is not None else math.nan,
                grad_norm=points[i],
                weight_grad_norm=_f(get_total_norm([g.double() for g in wg])) if wg else 0.0,
                gain=_ratio(points[i], ends[i]) / back[i],
                act_gain=_ratio(act_rms, prev_rms) / fwd[i - 1] if i else math.nan,
                jacobian_norm=jac,
                shape_gain=back[i],
                shape_steps=labels[i],
            )
        )
        prev_rms = act_rms
    # No gradient at either end (a dead ReLU stack): nothing reaches the input, it vanished.
    overall = 0.0 if points[0] == 0 and end == 0 else _ratio(points[0], end)
    shape = math.prod(back)
    depth = overall / shape
    fwd_shape = math.prod(fwd[: n - 1])
    forward = (_ratio(stats[-1].act_rms, stats[0].act_rms) / fwd_shape) ** (1.0 / max(n - 1, 1))
    return Gains(stats, overall, _geo(depth, n), forward, _f(loss), depth, shape)


def _shape_factors(
    steps: list[_ShapeStep], grad_of: Callable[[Tensor], Tensor | None], bounds: list[int]
) -> tuple[list[float], list[float], list[str]]:
    """Per segment: the backward and forward gains of its shape changes, and their names.

    ``bounds`` are the hooks' clock at each layer's input, then at the last layer's output:
    segment ``i`` runs from ``bounds[i]`` to ``bounds[i + 1]``. A step outside every segment
    (before the first layer, after the last) is outside the measured depth. Only a finite,
    positive gain is divided out: a zero or NaN gradient is the model's problem, not a shape
    change.
    """
    n = len(bounds) - 1
    back, fwd, labels = [1.0] * n, [1.0] * n, [""] * n
    if not steps:
        return back, fwd, labels
    xs = _norms([st.x for st in steps])
    ys = _norms([st.y for st in steps])
    gxs = _norms([grad_of(st.x) for st in steps])
    gys = _norms([grad_of(st.y) for st in steps])
    for st, nx, ny, gx, gy in zip(steps, xs, ys, gxs, gys):
        seg = next(
            (i for i in range(n) if bounds[i] < st.t0 and st.t1 < bounds[i + 1]),
            None,
        )
        b = _ratio(gx, gy)
        if seg is None or not (0 < b < math.inf):
            continue
        back[seg] *= b
        f = _ratio(_rms(ny, st.y), _rms(nx, st.x))
        if 0 < f < math.inf:
            fwd[seg] *= f
        labels[seg] = f"{labels[seg]}, {st.name}" if labels[seg] else st.name
    return back, fwd, labels


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


def _verdict(gain: float, tolerance: float) -> str:
    if math.isnan(gain):
        return "unknown"
    if gain > tolerance:
        return "exploding"
    if gain < 1.0 / tolerance:
        return "vanishing"
    return "healthy"


def _describe(verdict: str, g: Gains) -> str:
    n = len(g.layers)
    if verdict == "unknown":
        return "the gradient could not be measured (it is NaN); check the loss and the input"
    if g.overall == 0:
        return (
            f"backward, no gradient reaches the input: it is exactly zero ({n} layers); "
            "dead ReLUs or zero weights block it"
        )
    if g.per_layer >= 1.0:
        head = f"backward, the gradient grows about {g.per_layer:.3g}x per layer"
    else:
        head = f"backward, the gradient shrinks to about {g.per_layer:.3g}x per layer"
    tail = f"at the input it is {g.overall:.2g} times its size at the output ({n} layers)"
    steps = ", ".join(s.shape_steps for s in g.layers if s.shape_steps)
    if steps:
        tail += (
            f"; {g.depth:.2g} without the shape changes between layers ({steps}: "
            f"{g.shape:.2g}x, once, not per layer)"
        )
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
    """The loss after ``steps`` plain SGD steps on ``batch`` (NaN/inf when training blew up).

    The clipping remedy clips with :func:`gradguard.core.clip.clip_grad_norm_`, the call it
    recommends, so the rule is the package's own.
    """
    # Plain SGD by hand: constructing a torch.optim optimizer imports torch._dynamo (seconds).
    params = [p for p in model.parameters() if p.requires_grad]
    x = model_input(batch)
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), batch)
        if l2:
            loss = loss + _rem.l2_penalty(model, l2).to(loss.device)
        loss.backward()
        if clip is not None:
            clip_grad_norm_(params, clip)
        with torch.no_grad():
            for p in params:
                if p.grad is not None:
                    p.sub_(p.grad, alpha=lr)
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        return _f(loss_fn(model(x), batch))


def _chunks(batch: Any, k: int) -> list[Any]:
    """Split a batch along dim 0 into up to ``k`` sub-batches (the batch itself if it cannot)."""
    x = model_input(batch)
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
    loss_fn(model(model_input(batch)), batch).backward()
    total = get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
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
    loss_tolerance: float = 0.05,
    probe_lr: float = 3e-2,
    probe_steps: int = 20,
) -> Diagnosis:
    """Diagnose exploding or vanishing gradients on the initialized ``model``, before training.

    Backpropagation multiplies one factor per layer (the chain rule), so gradients grow or
    shrink exponentially with depth (Pascanu, Mikolov & Bengio 2013, "On the difficulty of
    training recurrent neural networks", arXiv 1211.5063). This measures those factors on one
    batch (see the module docstring for what a layer, a segment and a gain are), gives a
    verdict on the gain over the depth, and, with ``remedies=True``, applies each remedy of
    :mod:`gradguard.insight.remedies` to a fresh copy, checks that the copy still runs (a forward
    and backward in train mode, a forward in eval mode), measures it the same way, trains it
    ``steps`` plain SGD steps on the batch, and ranks the results with :func:`rank_remedies`.

    The remedies tried:

    * Kaiming init (He et al. 2015, "Delving Deep into Rectifiers", arXiv 1502.01852), Xavier
      init (Glorot & Bengio 2010, "Understanding the difficulty of training deep feedforward
      neural networks"), orthogonal init (Saxe et al. 2014, arXiv 1312.6120):
      :func:`~gradguard.insight.remedies.reinit_`;
    * LSUV init (Mishkin & Matas 2015, "All you need is a good init", arXiv 1511.06422):
      :func:`~gradguard.insight.remedies.lsuv_`;
    * batch norm (Ioffe & Szegedy 2015, arXiv 1502.03167) and layer norm (Ba et al. 2016,
      arXiv 1607.06450) after each hidden layer: :func:`~gradguard.insight.remedies.insert_norm`;
    * residual connections (He et al. 2016, arXiv 1512.03385):
      :func:`~gradguard.insight.remedies.add_residual`;
    * fewer layers (half the removable depth): :func:`~gradguard.insight.remedies.truncate`;
    * an L2 penalty (Krogh & Hertz 1992): :func:`~gradguard.insight.remedies.l2_penalty`;
    * clipping the gradient norm at the ``percentile``-th percentile of sub-batch norms
      (AutoClip, Seetharaman et al. 2020, arXiv 2007.14469), with
      :func:`gradguard.core.clip.clip_grad_norm_`.

    A remedy that does not fit the model (no same-shape block for a skip connection, BatchNorm
    on a batch of one, a transform whose copy no longer runs) is kept in the list as not
    applicable, with the reason; it never stops the diagnosis.

    Nothing of ``model`` changes: everything runs on ``copy.deepcopy(model)`` in train mode,
    and the global random state is restored afterwards.

    Args:
        model: the model, as initialized.
        batch: a tensor, or an ``(x, y, ...)`` tuple whose first item is the model's input.
        loss_fn: ``loss_fn(output, batch) -> scalar tensor``; ``None`` uses
            :func:`default_loss` (cross-entropy or MSE for ``(x, y)``, else
            ``output.pow(2).mean()``).
        remedies: also measure every remedy on a copy and rank them.
        tolerance: "exploding" above this depth gain, "vanishing" below its inverse (> 1).
        jacobian_iters: power-iteration steps per Jacobian estimate (0 skips the estimate).
        steps: SGD steps each remedy (and the unchanged model) trains for, on the batch, to
            report the loss after them and rank by it (0 skips). With a bare tensor batch and no
            ``loss_fn`` the default loss is no training objective: only a non-finite loss
            then changes the ranking.
        lr: their learning rate (> 0).
        l2: the L2 penalty weight tried as a remedy (>= 0).
        percentile: the percentile of the norms over sub-batches used as clipping threshold,
            in [0, 100] (AutoClip uses 10).
        seed: seeds the remedies' initializations, so a diagnosis is reproducible.
        loss_tolerance: a remedy whose loss after ``steps`` is more than this fraction above
            the unchanged model's ranks below it (>= 0); see :func:`rank_remedies`.
        probe_lr: for a transformer (a model with attention modules), the AdamW learning
            rate of the probe run behind ``transformer_remedies`` (> 0); use the peak LR you
            plan to train with, or higher.
        probe_steps: its steps (0: no transformer remedies; the block gains are measured).

    Returns:
        A :class:`Diagnosis`; ``print(d.summary())`` reads it out, ``d.to_rows()`` gives
        records rows for the report.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, ``batch`` holds no input tensor,
            ``loss_fn`` is not callable or returns no scalar, or ``seed`` is not an int.
        ValueError: an argument is out of range, no layer of ``model`` requires grad, or no
            default loss fits ``batch`` (pass ``loss_fn``).

    Example:
        >>> d = gradguard.diagnose(mlp, (x, y))
        >>> d.verdict, round(d.per_layer_gain, 2)
        ('exploding', 1.73)
        >>> d.remedies[0].how
        "gradguard.remedies.reinit_(model, 'kaiming')"
        >>> print(d.summary())
    """
    _rem._check_module(model)
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable or None, got {type(loss_fn).__name__}")
    tol = float(tolerance) if isinstance(tolerance, (int, float)) else math.nan
    if isinstance(tolerance, bool) or not (1.0 < tol < math.inf):
        raise ValueError(f"tolerance must be a finite number > 1, got {tolerance!r}")
    for name, value, low in (
        ("jacobian_iters", jacobian_iters, 0),
        ("steps", steps, 0),
        ("probe_steps", probe_steps, 0),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    _validate.threshold("lr", lr, allow_zero=False)
    _validate.threshold("probe_lr", probe_lr, allow_zero=False)
    _validate.threshold("l2", l2)
    loss_tol = _validate.threshold("loss_tolerance", loss_tolerance)
    p = _validate.as_float("percentile", percentile)
    if not 0.0 <= p <= 100.0:
        raise ValueError(f"percentile must be in [0, 100], got {percentile!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    x = model_input(batch)
    if not isinstance(x, Tensor):
        raise TypeError(
            f"batch must be a tensor or a tuple whose first item is a tensor, got "
            f"{type(x).__name__}"
        )
    fn: LossFn = loss_fn or default_loss
    with _rng_fork(model, seed):
        base = copy.deepcopy(model).train()
        g = measure_gains(base, batch, fn, jacobian_iters=jacobian_iters)
        verdict = _verdict(g.depth, tol)
        diag = Diagnosis(
            layers=g.layers,
            per_layer_gain=g.per_layer,
            overall_gain=g.overall,
            forward_gain=g.forward,
            verdict=verdict,
            message=_describe(verdict, g),
            loss=g.loss,
            tolerance=tol,
            steps=steps if remedies else 0,
            depth_gain=g.depth,
            shape_gain=g.shape,
            loss_tolerance=loss_tol,
            by_loss=_has_objective(batch, loss_fn),
        )
        if remedies:
            results = _measure_remedies(base, batch, fn, g, tol, steps, lr, l2, percentile)
            diag.remedies = rank_remedies(
                results,
                results[0],
                loss_tolerance=loss_tol,
                trained=steps > 0,
                by_loss=diag.by_loss,
            )
        if attention_modules(base):
            _diagnose_transformer(diag, base, batch, fn, remedies, probe_lr, probe_steps)
    return diag


def _diagnose_transformer(
    diag: Diagnosis,
    base: nn.Module,
    batch: Any,
    fn: LossFn,
    remedies: bool,
    lr: float,
    steps: int,
) -> None:
    """Block gains and probed transformer remedies; a model these do not fit loses nothing
    else of its diagnosis."""
    try:
        diag.blocks = measure_blocks(copy.deepcopy(base).train(), batch, fn)
    except Exception as e:
        diag.probe = f"block gains not measured: {type(e).__name__}: {_first_line(e)}"
    if remedies and steps:
        diag.transformer_remedies = probe_transformer_remedies(
            base, batch, fn, lr=lr, steps=steps, loss_tolerance=diag.loss_tolerance
        )
        diag.probe = f"{steps} AdamW steps at lr {lr:g} on the batch, on a copy each"


def _loss_tier(
    r: RemedyResult, reference_loss: float, loss_tolerance: float, trained: bool, by_loss: bool
) -> int:
    """0: the loss after training is no worse than no change's (within the tolerance), or not
    compared; 1: finite but worse; 2: NaN or inf (training blew up)."""
    if not trained:
        return 0
    if not math.isfinite(r.loss_after):
        return 2
    bar = reference_loss + loss_tolerance * abs(reference_loss)
    return 1 if by_loss and math.isfinite(reference_loss) and r.loss_after > bar else 0


def _has_objective(batch: Any, loss_fn: LossFn | None) -> bool:
    """Whether the loss is a training objective: a ``loss_fn`` was given or the batch has a
    target. ``output.pow(2).mean()`` on a bare batch measures gains; lowering it is no goal."""
    return loss_fn is not None or (isinstance(batch, (tuple, list)) and len(batch) >= 2)


def rank_remedies(
    results: list[RemedyResult],
    reference: RemedyResult,
    *,
    loss_tolerance: float = 0.05,
    trained: bool = True,
    by_loss: bool = True,
) -> list[RemedyResult]:
    """Order measured remedies best first; the rule :func:`diagnose` uses.

    1. Applicable remedies before the ones that are not (those keep their order).
    2. When trained, by the loss after the probe run, in three tiers: first the remedies whose
       loss is finite and at most ``reference.loss_after * (1 + loss_tolerance)`` (for a
       negative reference loss: ``reference + loss_tolerance * |reference|``), the reference
       itself included; then those whose loss is finite but worse, by that loss, lowest first;
       last those whose loss is NaN or inf. A remedy that trains worse than doing nothing thus
       never ranks above no change, nor above a remedy with a better loss; one that blows up
       ranks last. When the reference's own loss is not finite, every finite loss is in the
       first tier.
    3. Within a tier: a remedy whose verdict is healthy first; then by how close the per-layer
       gain gets to 1 (``|log gain|`` rounded to 3 decimals, so float noise does not decide a
       tie); then the gain over the depth (where fewer layers help); then the loss.

    Args:
        results: the measured remedies (the reference among them, or not).
        reference: the unchanged model's result, whose ``loss_after`` is the bar.
        loss_tolerance: relative slack on the bar (>= 0).
        trained: whether ``loss_after`` was measured (``diagnose(steps > 0)``); if not, the
            tiers of step 2 are skipped.
        by_loss: whether the loss is a training objective to compare against the reference's
            (the second tier). :func:`diagnose` passes False for a bare tensor batch without
            ``loss_fn``, whose default loss ``output.pow(2).mean()`` only serves the gain
            measurement; a non-finite loss still ranks last.

    Returns:
        A new list, best first.

    Example:
        >>> ranked = rank_remedies(d.remedies, d.remedies[0], loss_tolerance=0.1)
    """

    def off(gain: float) -> float:
        return abs(math.log(gain)) if gain > 0 and math.isfinite(gain) else math.inf

    def key(r: RemedyResult) -> tuple[int, int, float, int, float, float, float]:
        if not r.applicable:
            return (1, 0, 0.0, 0, 0.0, 0.0, 0.0)
        tier = _loss_tier(r, reference.loss_after, loss_tolerance, trained, by_loss)
        loss = r.loss_after if math.isfinite(r.loss_after) else math.inf
        return (
            0,
            tier,
            loss if tier == 1 else 0.0,
            0 if r.verdict == "healthy" else 1,
            round(off(r.per_layer_gain), 3),
            off(r.depth_gain),
            loss,
        )

    return sorted(results, key=key)


def _first_line(e: BaseException) -> str:
    text = str(e).splitlines()
    return text[0] if text else type(e).__name__


class _NotApplicable(Exception):
    """A remedy that does not fit the model; the message says why."""


def _stage(what: str, e: Exception) -> _NotApplicable:
    if isinstance(e, _NotApplicable):
        return e
    return _NotApplicable(f"{what} raised {type(e).__name__}: {_first_line(e)}")


def _check_runs(m: nn.Module, batch: Any, fn: LossFn) -> None:
    """Run a transformed copy before measuring it: forward and backward in train mode, then a
    forward in eval mode (where some modules take fused paths that read weights directly)."""
    x = model_input(batch)
    try:
        fn(m(x), batch).backward()
    except Exception as e:
        raise _stage("its forward and backward in train mode", e) from e
    finally:
        m.zero_grad(set_to_none=True)
    m.eval()
    try:
        with torch.no_grad():
            m(x)
    except Exception as e:
        raise _stage("its forward in eval mode", e) from e
    finally:
        m.train()


def _try_remedy(
    r: RemedyResult,
    make: Callable[[], nn.Module],
    batch: Any,
    fn: LossFn,
    tol: float,
    steps: int,
    lr: float,
    l2: float,
) -> None:
    """Fill ``r`` in, or its ``error`` when the remedy does not fit: build, run, measure, train."""
    try:
        try:
            m = make().train()
        except ValueError as e:  # the remedies' own "does not fit" (no block, no layer)
            raise _NotApplicable(_first_line(e)) from e
        except Exception as e:
            raise _stage("applying it", e) from e
        _check_runs(m, batch, fn)
        try:
            mg = measure_gains(m, batch, fn, jacobian_iters=0)
        except Exception as e:
            raise _stage("measuring it", e) from e
        r.per_layer_gain, r.overall_gain, r.depth_gain = mg.per_layer, mg.overall, mg.depth
        r.verdict = _verdict(mg.depth, tol)
        if r.name.startswith("L2"):
            r.note = "acts during training: the gain at initialization is unchanged"
        elif mg.overall == 0:
            r.note = "no gradient reaches the input (dead ReLUs or zero weights)"
        if steps:
            try:
                r.loss_after = _train_loss(m, batch, fn, steps, lr, l2=l2)
            except Exception as e:
                raise _stage("training it", e) from e
    except _NotApplicable as e:
        r.error = str(e)


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
    """The reference (unchanged model) first, then every remedy, unranked."""
    verdict = _verdict(g.depth, tol)

    def unchanged(name: str, how: str) -> RemedyResult:
        return RemedyResult(
            name, how, g.per_layer, g.overall, verdict, depth_gain=g.depth
        )  # fmt: skip

    baseline = unchanged(REFERENCE, "(the model as it is)")
    if steps:
        try:
            baseline.loss_after = _train_loss(copy.deepcopy(base), batch, fn, steps, lr)
        except Exception as e:
            baseline.note = f"training it raised {type(e).__name__}: {_first_line(e)}"
    results = [baseline]
    for name, how, make in _remedy_candidates(base, batch, l2):
        r = RemedyResult(name, how)
        _try_remedy(r, make, batch, fn, tol, steps, lr, l2 if name.startswith("L2") else 0.0)
        results.append(r)
    clip = unchanged(
        "clip gradient norm", "torch.nn.utils.clip_grad_norm_(model.parameters(), {t:.3g})"
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
    except Exception as e:
        clip.error = f"{type(e).__name__}: {_first_line(e)}"
    results.append(clip)
    return results


# ----------------------------------------------------------------------------- transformers


def transformer_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The blocks of a transformer: children of an ``nn.ModuleList`` that hold an attention
    module (``TransformerEncoder.layers``, GPT-2's ``h``, Llama's ``layers``), in order."""
    attn = list(attention_modules(model))
    out: list[tuple[str, nn.Module]] = []
    for list_name, lst in model.named_modules():
        if not isinstance(lst, nn.ModuleList):
            continue
        for i, child in enumerate(lst):
            name = f"{list_name}.{i}" if list_name else str(i)
            if any(a.startswith(name + ".") for a in attn):
                out.append((name, child))
    return out


def measure_blocks(model: nn.Module, batch: Any, loss_fn: LossFn | None = None) -> list[BlockGain]:
    """Per-block gains of the residual stream: one forward and backward with hooks.

    For each block (:func:`transformer_blocks`): the RMS of the stream entering and leaving it
    (a pre-norm block adds to the stream, so its forward gain is above 1 and large values point
    at the block that grows it), the gradient norm at both ends, and the block's largest
    attention logit (:class:`~gradguard.insight.telemetry.AttentionTelemetry`). The model runs as
    given (call it on a copy in train mode); ``.grad`` is not touched.

    Returns:
        One :class:`BlockGain` per block, in execution order (empty: no blocks found).
    """
    fn = loss_fn or default_loss
    blocks = transformer_blocks(model)
    if not blocks:
        return []
    ins: dict[str, Tensor] = {}
    outs: dict[str, Tensor] = {}
    order: list[str] = []

    def pre(name: str) -> Callable[..., None]:
        def hook(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x = _first_tensor(args)
            x = kwargs.get("hidden_states") if x is None else x
            if isinstance(x, Tensor) and x.requires_grad and name not in ins:
                ins[name] = x

        return hook

    def post(name: str) -> Callable[..., None]:
        def hook(m: nn.Module, args: Any, output: Any) -> None:
            y = _first_tensor(output)
            if y is not None and y.requires_grad and name not in outs:
                outs[name] = y
                order.append(name)

        return hook

    handles = []
    for name, m in blocks:
        handles.append(m.register_forward_pre_hook(pre(name), with_kwargs=True))
        handles.append(m.register_forward_hook(post(name)))
    tel = AttentionTelemetry(model, training_only=False)
    try:
        loss = fn(model(model_input(batch)), batch)
    finally:
        tel.remove()
        for h in handles:
            h.remove()
    names = [n for n in order if n in ins]
    wanted = [ins[n] for n in names] + [outs[n] for n in names]
    grads = torch.autograd.grad(loss, wanted, allow_unused=True)
    g_in, g_out = grads[: len(names)], grads[len(names) :]
    result = []
    for i, name in enumerate(names):
        x, y = ins[name], outs[name]
        rin, rout = (
            _f(x.detach().double().square().mean().sqrt()),
            _f(y.detach().double().square().mean().sqrt()),
        )
        gi = _f(g_in[i].double().norm()) if g_in[i] is not None else 0.0
        go = _f(g_out[i].double().norm()) if g_out[i] is not None else 0.0
        logits = [v for a, v in tel.max_logits.items() if a.startswith(name + ".")]
        top = _f(torch.stack([v.max() for v in logits]).max()) if logits else math.nan
        result.append(BlockGain(i, name, rin, rout, _ratio(rout, rin), gi, go, _ratio(gi, go), top))
    return result


def _logits_of(output: Any) -> Tensor:
    out = output[0] if isinstance(output, (tuple, list)) else output
    if not isinstance(out, Tensor) and isinstance(getattr(out, "logits", None), Tensor):
        out = out.logits
    if not isinstance(out, Tensor):
        raise TypeError(f"cannot find logits in a {type(output).__name__}")
    return out


def _probe_run(
    model: nn.Module,
    batch: Any,
    fn: LossFn,
    *,
    lr: float,
    steps: int,
    z: float = 0.0,
    tau: float | None = None,
    warmup: bool = False,
) -> tuple[float, float]:
    """AdamW (betas 0.9/0.95, as LLM recipes) for ``steps`` steps on ``batch``; the loss and
    the largest attention logit of a last forward."""
    tel = AttentionTelemetry(model)
    clip = _tr.QKClip(tel, tau) if tau is not None else None
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    x = model_input(batch)
    try:
        for step in range(steps):
            if warmup:
                for group in opt.param_groups:
                    group["lr"] = lr * (step + 1) / steps
            opt.zero_grad(set_to_none=True)
            out = model(x)
            loss = fn(out, batch)
            if z:
                loss = loss + _tr.z_loss(_logits_of(out), z)
            loss.backward()
            opt.step()
            if clip is not None:
                clip()
        with torch.no_grad():
            final = _f(fn(model(x), batch))
        top = tel.max_logit()
        return final, (_f(top) if top is not None else math.nan)
    finally:
        tel.remove()
        model.zero_grad(set_to_none=True)


def probe_transformer_remedies(
    model: nn.Module,
    batch: Any,
    loss_fn: LossFn | None = None,
    *,
    lr: float = 3e-2,
    steps: int = 20,
    tau: float = 50.0,
    cap: float = 30.0,
    loss_tolerance: float = 0.05,
) -> list[RemedyResult]:
    """Each transformer remedy on a copy, measured by a short high-LR probe run, ranked.

    Attention-logit growth and output-logit divergence appear at high learning rates, not at
    initialization (Wortsman et al. 2023, arXiv 2309.14322), so every candidate trains ``steps``
    AdamW steps at ``lr`` on ``batch`` and reports the loss and the largest attention logit
    after them. Candidates: no change, qk-layernorm, z-loss 1e-4, QK-clip at ``tau``, output
    soft-capping at ``cap``, and a linear LR warm-up over the probe. Ranked by
    :func:`rank_remedies` on the loss after the probe, so a remedy that trains worse than no
    change never ranks above it; one that does not fit is kept as not applicable, with the
    reason.

    Returns:
        The ranked :class:`RemedyResult` list (``max_logit`` filled in).
    """
    fn = loss_fn or default_loss

    def copy_of() -> nn.Module:
        return copy.deepcopy(model).train()

    candidates: list[tuple[str, str, Callable[[], nn.Module], dict[str, Any]]] = [
        (REFERENCE, "(the model as it is)", copy_of, {}),
        ("qk-layernorm", "model = gradguard.insight.transformer_remedies.insert_qk_norm(model)",
         lambda: _tr.insert_qk_norm(model).train(), {}),
        ("z-loss (1e-4)",
         "loss = gradguard.insight.transformer_remedies.ZLoss(loss_fn)(logits, y)",
         copy_of, {"z": _tr.Z_LOSS_COEF}),
        (f"QK-clip (tau {tau:g})",
         "guard.register_post_step_hook("
         f"gradguard.insight.transformer_remedies.QKClip(telemetry, {tau:g}))",
         copy_of, {"tau": tau}),
        (f"logit soft-cap ({cap:g})",
         f"model = gradguard.insight.transformer_remedies.add_logit_softcap(model, {cap:g})",
         lambda: _tr.add_logit_softcap(model, cap).train(), {}),
        (f"LR warm-up ({steps} steps)",
         "a linear warm-up of the learning rate (here over the probe's steps)",
         copy_of, {"warmup": True}),
    ]  # fmt: skip
    results: list[RemedyResult] = []
    for name, how, make, kw in candidates:
        r = RemedyResult(name, how)
        try:
            try:
                m = make()
            except (ValueError, TypeError, NotImplementedError) as e:
                raise _NotApplicable(_first_line(e)) from e
            try:
                r.loss_after, r.max_logit = _probe_run(m, batch, fn, lr=lr, steps=steps, **kw)
            except _NotApplicable:
                raise
            except Exception as e:
                raise _stage("its probe run", e) from e
        except _NotApplicable as e:
            r.error = str(e)
        results.append(r)
    return rank_remedies(results, results[0], loss_tolerance=loss_tolerance)
