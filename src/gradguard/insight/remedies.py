"""Model transforms that fix exploding or vanishing gradients, each one a user can apply.

The chain rule multiplies one factor per layer, so a model whose layers each scale the gradient
by ``g`` scales it by ``g**depth`` overall. Every transform here changes that product in one of
the classic ways: a better initialization (:func:`reinit_`, :func:`lsuv_`), normalization after
each linear/conv layer (:func:`insert_norm`), skip connections (:func:`add_residual`), fewer
layers (:func:`truncate`), weight regularization (:func:`l2_penalty`) and a clipping threshold
drawn from the observed norms (:func:`suggest_clip_threshold`).
:func:`gradguard.diagnose` measures each of them on a copy of a model before recommending one.

Conventions: a trailing underscore changes the model in place (as in torch); the other
transforms return a new model and leave theirs untouched. "Layers" are the modules that hold
the weights: ``nn.Linear``, ``nn.Conv1d/2d/3d`` and the recurrent layers (``nn.RNN``, ``nn.LSTM``,
``nn.GRU``). Structural transforms (:func:`add_residual`, :func:`truncate`) work on the
``nn.Sequential`` containers of a model, whose order is the order of execution.
"""

from __future__ import annotations

import copy
import inspect
import math
import re
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from gradguard.core import validate as _validate
from gradguard.core.batch import model_input

__all__ = [
    "Residual",
    "add_residual",
    "insert_norm",
    "l2_penalty",
    "lsuv_",
    "reinit_",
    "suggest_clip_threshold",
    "truncate",
]

WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.RNNBase)
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
SCHEMES = ("kaiming", "xavier", "orthogonal")
# Parameter-free modules that keep the shape of their input (so a block built of a same-shape
# layer and these can be skipped over or removed).
_SHAPE_KEEPING = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Tanh,
    nn.Sigmoid,
    nn.Hardtanh,
    nn.Softplus,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.Identity,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.LayerNorm,
    nn.GroupNorm,
)
_ACTIVATION_GAIN_NAMES = {
    nn.ReLU: "relu",
    nn.GELU: "relu",
    nn.SiLU: "relu",
    nn.ELU: "relu",
    nn.Mish: "relu",
    nn.LeakyReLU: "leaky_relu",
    nn.Tanh: "tanh",
    nn.Sigmoid: "sigmoid",
    nn.SELU: "selu",
}


def _check_module(model: Any, name: str = "model") -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{name} must be a torch.nn.Module, got {type(model).__name__}")
    return model


def weighted_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The (qualified name, module) of every linear, conv and recurrent layer, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, WEIGHTED)]


def _guess_nonlinearity(model: nn.Module) -> str:
    """The most common activation of ``model`` as a ``nn.init.calculate_gain`` name."""
    counts: dict[str, int] = {}
    for m in model.modules():
        for cls, gain_name in _ACTIVATION_GAIN_NAMES.items():
            if type(m) is cls:
                counts[gain_name] = counts.get(gain_name, 0) + 1
    return max(counts, key=lambda k: counts[k]) if counts else "linear"


def reinit_(
    model: nn.Module,
    scheme: str = "kaiming",
    *,
    nonlinearity: str | None = None,
    generator: torch.Generator | None = None,
) -> nn.Module:
    """Re-initialize every linear/conv/recurrent weight of ``model`` in place; biases become 0.

    Args:
        model: the model to change.
        scheme: ``"kaiming"`` (He et al. 2015, "Delving Deep into Rectifiers": normal, fan-in,
            variance ``gain**2 / fan_in``), ``"xavier"`` (Glorot & Bengio 2010: normal, variance
            ``gain**2 * 2 / (fan_in + fan_out)``) or ``"orthogonal"`` (Saxe et al. 2014, "Exact
            solutions to the nonlinear dynamics of learning in deep linear networks").
        nonlinearity: the activation the gain is chosen for (a ``nn.init.calculate_gain`` name:
            ``"relu"``, ``"tanh"``, ``"sigmoid"``, ``"linear"``, ...); ``None`` picks the most
            common activation module in ``model``.
        generator: random source (``None``: the global one).

    Returns:
        ``model`` itself. Embeddings and normalization layers are left as they are.

    Example:
        >>> reinit_(mlp, "kaiming")          # He init for a ReLU MLP
    """
    _check_module(model)
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    nl = nonlinearity if nonlinearity is not None else _guess_nonlinearity(model)
    try:
        gain = nn.init.calculate_gain(nl)  # type: ignore[arg-type]
    except ValueError as e:
        raise ValueError(f"nonlinearity {nl!r} is not a nn.init.calculate_gain name: {e}") from None
    with torch.no_grad():
        for _, layer in weighted_layers(model):
            for pname, p in layer.named_parameters(recurse=False):
                if p.dim() >= 2:
                    _init_weight(p, scheme, gain, generator)
                elif "bias" in pname:
                    p.zero_()
    return model


def _init_weight(w: Tensor, scheme: str, gain: float, generator: torch.Generator | None) -> None:
    fan_in = w.shape[1] * (w[0][0].numel() if w.dim() > 2 else 1)
    fan_out = w.shape[0] * (w[0][0].numel() if w.dim() > 2 else 1)
    if scheme == "kaiming":
        nn.init.normal_(w, 0.0, gain / math.sqrt(fan_in), generator=generator)
    elif scheme == "xavier":
        nn.init.normal_(w, 0.0, gain * math.sqrt(2.0 / (fan_in + fan_out)), generator=generator)
    else:
        nn.init.orthogonal_(w, gain=gain, generator=generator)


def lsuv_(
    model: nn.Module,
    batch: Any,
    *,
    tol: float = 0.05,
    max_iter: int = 10,
    generator: torch.Generator | None = None,
) -> nn.Module:
    """Layer-sequential unit-variance initialization, in place.

    Mishkin & Matas 2015, "All you need is a good init" (arXiv 1511.06422): orthogonal weights,
    then, layer by layer in forward order, divide each weight by the standard deviation of that
    layer's output on ``batch`` until the output variance is within ``tol`` of 1.

    Args:
        model: the model to change (its train/eval mode is kept).
        batch: a tensor, or an ``(x, y)`` tuple whose ``x`` is fed to the model.
        tol: accepted distance of the output variance from 1 (> 0).
        max_iter: rescaling rounds per layer (>= 1).
        generator: random source of the orthogonal init.

    Returns:
        ``model`` itself.

    Example:
        >>> lsuv_(mlp, x_batch)
    """
    _check_module(model)
    tol = _validate.threshold("tol", tol, allow_zero=False)
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be an int >= 1, got {max_iter!r}")
    x = model_input(batch)
    reinit_(model, "orthogonal", nonlinearity="linear", generator=generator)
    seen: dict[int, Tensor] = {}

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        out = output[0] if isinstance(output, tuple) else output
        seen.setdefault(id(module), out.detach())

    layers = [m for _, m in weighted_layers(model)]
    handles = [m.register_forward_hook(hook) for m in layers]
    try:
        with torch.no_grad():
            for layer in layers:
                weights = [p for p in layer.parameters(recurse=False) if p.dim() >= 2]
                for _ in range(max_iter):
                    seen.clear()
                    model(x)
                    out = seen.get(id(layer))
                    if out is None or out.numel() < 2:
                        break
                    var = out.float().var()
                    if not bool(var.isfinite()) or float(var) <= 0:
                        break
                    if abs(float(var) - 1.0) < tol:
                        break
                    for w in weights:
                        w.div_(var.sqrt().to(w.dtype))
    finally:
        for h in handles:
            h.remove()
    return model


def _norm_for(layer: nn.Module, kind: str) -> nn.Module:
    ref = next(layer.parameters())
    if isinstance(layer, nn.Linear):
        c = layer.out_features
        norm: nn.Module = nn.BatchNorm1d(c) if kind == "batch" else nn.LayerNorm(c)
    else:
        assert isinstance(layer, _CONV)
        c = layer.out_channels
        if kind == "batch":
            bn = {nn.Conv1d: nn.BatchNorm1d, nn.Conv2d: nn.BatchNorm2d, nn.Conv3d: nn.BatchNorm3d}
            norm = bn[type(layer)](c)
        else:
            # GroupNorm with one group is LayerNorm over (C, *spatial) for any spatial shape.
            norm = nn.GroupNorm(1, c)
    return norm.to(device=ref.device, dtype=ref.dtype)


_SOURCES: dict[type, str] = {}


def _class_source(cls: type) -> str:
    """The source of ``cls`` and of its ``nn.Module`` bases below ``nn.Module`` ('' if unknown)."""
    if cls in _SOURCES:
        return _SOURCES[cls]
    parts = []
    for base in cls.__mro__:
        if base is nn.Module or not (isinstance(base, type) and issubclass(base, nn.Module)):
            continue
        try:
            parts.append(inspect.getsource(base))
        except (OSError, TypeError):  # defined in a REPL, exec'd, or compiled
            continue
    _SOURCES[cls] = "\n".join(parts)
    return _SOURCES[cls]


def _reads_child(parent: nn.Module, attr: str) -> bool:
    """Whether ``parent``'s code reaches into its child ``attr`` instead of only calling it.

    ``nn.MultiheadAttention`` passes ``self.out_proj.weight`` to a functional kernel, and the
    fused inference path of ``nn.TransformerEncoderLayer`` reads ``self.linear1.weight``: wrap
    such a child, or restructure it, and the parent breaks (``'Sequential' object has no
    attribute 'weight'``). A read like ``self.<attr>.<name>`` or ``self.<attr>[...]`` in the
    parent's class source counts; code whose source cannot be read counts as calling only.
    """
    pattern = rf"\.{re.escape(attr)}\s*(?:\[|\.\s*(?!forward\b)[A-Za-z_])"
    return re.search(pattern, _class_source(type(parent))) is not None


def _parent(root: nn.Module, name: str) -> tuple[nn.Module, str] | None:
    """``(parent module, attribute name)`` of the submodule ``name``; None for the root."""
    if not name:
        return None
    parent_name, _, attr = name.rpartition(".")
    return (root.get_submodule(parent_name) if parent_name else root), attr


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)


def insert_norm(model: nn.Module, kind: str = "batch", *, skip_last: bool = True) -> nn.Module:
    """A copy of ``model`` with a normalization layer right after each Linear/Conv layer.

    ``kind="batch"``: BatchNorm (Ioffe & Szegedy 2015, arXiv 1502.03167); ``"layer"``: LayerNorm
    (Ba et al. 2016, arXiv 1607.06450) after Linear, GroupNorm with one group after Conv. Each
    layer ``L`` becomes ``nn.Sequential(L, norm)`` under the same name, so state-dict keys of the
    original weights gain a ``.0``.

    A layer whose parent reads its attributes instead of only calling it is left alone: the
    ``out_proj`` of ``nn.MultiheadAttention`` (its weight goes straight to a fused kernel), the
    ``linear1``/``linear2`` of ``nn.TransformerEncoderLayer`` (read by its fused inference path),
    and any custom parent whose code reads ``self.<name>.weight`` (or another attribute) or
    indexes it. Wrapping those would break the parent's forward.

    Args:
        model: left unchanged.
        kind: ``"batch"`` or ``"layer"``.
        skip_last: leave the last Linear/Conv (in module order) alone: it is usually the output
            layer, whose scale is the prediction.

    Returns:
        The new model, on the device and dtype of the original layers.

    Raises:
        ValueError: no layer is left to normalize (none, only the output layer, or only layers
            whose parent reads them directly; the message names those).

    Example:
        >>> bn_mlp = insert_norm(mlp, "batch")
    """
    _check_module(model)
    if kind not in ("batch", "layer"):
        raise ValueError(f"kind must be 'batch' or 'layer', got {kind!r}")
    new = copy.deepcopy(model)
    targets = [(n, m) for n, m in new.named_modules() if isinstance(m, (nn.Linear, *_CONV))]
    if skip_last and targets:
        targets = targets[:-1]
    read = [n for n, _ in targets if (pa := _parent(new, n)) is not None and _reads_child(*pa)]
    targets = [(n, m) for n, m in targets if n not in read]
    if not targets:
        why = []
        if skip_last:
            why.append("the last one, the output layer, is skipped: skip_last=False")
        if read:
            shown = ", ".join(read[:4]) + (", ..." if len(read) > 4 else "")
            why.append(f"{shown}: their parent reads their weights directly")
        raise ValueError(
            "insert_norm found no Linear/Conv layer to normalize"
            + (f" ({'; '.join(why)})" if why else "")
        )
    for name, layer in targets:
        wrapped = nn.Sequential(layer, _norm_for(layer, kind))
        if name == "":
            return wrapped
        _set_submodule(new, name, wrapped)
    return new


class Residual(nn.Module):
    """``x + scale * body(x)``: a skip connection around ``body`` (He et al. 2016, ResNet).

    The identity path carries the gradient past ``body`` unchanged, so depth no longer multiplies
    it by ``body``'s gain alone.
    """

    def __init__(self, body: nn.Module, scale: float = 1.0) -> None:
        super().__init__()
        self.body = body
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        return x + self.scale * self.body(x)


def _has_params(m: nn.Module) -> bool:
    return any(True for _ in m.parameters())


def _blocks(seq: nn.Sequential) -> list[list[nn.Module]]:
    """Split a Sequential into blocks: a module with parameters plus the shape-keeping
    parameter-free modules after it (activations, dropout). A parameter-free module that may
    change the shape (Flatten, pooling) starts a block of its own, as do leading ones."""
    blocks: list[list[nn.Module]] = []
    for m in seq:
        if _has_params(m) or not blocks or not _keeps_shape(m):
            blocks.append([m])
        else:
            blocks[-1].append(m)
    return blocks


def _keeps_shape(m: nn.Module) -> bool:
    if isinstance(m, nn.Linear):
        return m.in_features == m.out_features
    if isinstance(m, _CONV):
        k, s, d = m.kernel_size, m.stride, m.dilation
        if m.in_channels != m.out_channels or any(x != 1 for x in s):
            return False
        if m.padding == "same":
            return True
        pad = m.padding
        return not isinstance(pad, str) and all(
            2 * p == di * (ki - 1) for p, di, ki in zip(pad, d, k)
        )
    if isinstance(m, Residual):
        return True
    if isinstance(m, nn.Sequential):
        return all(_keeps_shape(c) for c in m)
    return isinstance(m, _SHAPE_KEEPING)


def _block_keeps_shape(block: list[nn.Module]) -> bool:
    return _has_params(block[0]) and all(_keeps_shape(m) for m in block)


def _sequentials(model: nn.Module) -> list[tuple[str, nn.Sequential]]:
    """The plain Sequentials of ``model`` that may be restructured: not those whose parent
    indexes them or reads their members' attributes (``self.layers[0].weight``), whose code
    would no longer find what it expects."""
    return [
        (n, m)
        for n, m in model.named_modules()
        if type(m) is nn.Sequential and ((pa := _parent(model, n)) is None or not _reads_child(*pa))
    ]


def add_residual(model: nn.Module, *, scale: float = 1.0) -> nn.Module:
    """A copy of ``model`` where every same-shape block of every ``nn.Sequential`` is wrapped in
    a :class:`Residual` skip connection (He et al. 2016, "Deep Residual Learning", arXiv
    1512.03385).

    A block is a layer with parameters plus the parameter-free modules after it (``Linear,
    ReLU``). It is wrapped only when its output shape provably equals its input shape: a square
    Linear, a stride-1 Conv with equal channels and "same" padding, followed by activations,
    dropout or normalization.

    Args:
        model: left unchanged.
        scale: the residual branch's weight (a finite number >= 0; ``1/sqrt(depth)`` keeps the
            forward variance bounded in very deep stacks).

    Returns:
        The new model (the same object type when the model is a Sequential).

    Raises:
        ValueError: no block of ``model`` keeps its shape, so no skip connection fits.

    Example:
        >>> res_mlp = add_residual(mlp)
    """
    _check_module(model)
    scale = _validate.threshold("scale", scale)
    new = copy.deepcopy(model)
    wrapped = 0
    for _, seq in _sequentials(new):
        blocks = _blocks(seq)
        if not any(_block_keeps_shape(b) for b in blocks):
            continue
        modules: list[nn.Module] = []
        for b in blocks:
            if _block_keeps_shape(b):
                body = b[0] if len(b) == 1 else nn.Sequential(*b)
                modules.append(Residual(body, scale))
                wrapped += 1
            else:
                modules.extend(b)
        # Rebuild in place: the Sequential object keeps its identity inside its parent.
        for key in list(seq._modules):
            del seq._modules[key]
        for i, m in enumerate(modules):
            seq.add_module(str(i), m)
    if wrapped == 0:
        raise ValueError(
            "add_residual found no block whose output shape equals its input shape "
            "(a square Linear or a stride-1, same-padding Conv with equal channels inside an "
            "nn.Sequential); skip connections need matching shapes"
        )
    return new


def _trunk(model: nn.Module) -> tuple[nn.Sequential, list[list[nn.Module]], list[int]] | None:
    """The Sequential with the most removable blocks, its blocks and the removable indices."""
    best = None
    for _, seq in _sequentials(model):
        blocks = _blocks(seq)
        weighted = [i for i, b in enumerate(blocks) if _has_params(b[0])]
        # The first and last weighted blocks adapt the input and output shapes: keep them.
        removable = [i for i in weighted[1:-1] if _block_keeps_shape(blocks[i])]
        if best is None or len(removable) > len(best[2]):
            best = (seq, blocks, removable)
    return best


def truncate(model: nn.Module, n_layers: int) -> nn.Module:
    """A copy of ``model`` with fewer layers: same-shape hidden blocks of its main
    ``nn.Sequential`` are removed, from the deep end, until ``n_layers`` weighted blocks remain.

    Fewer layers means fewer factors in the chain rule's product (the textbook's first remedy:
    "reduce the number of hidden layers"). The input and output layers are always kept, so the
    model still maps the same input shape to the same output shape.

    Args:
        model: left unchanged.
        n_layers: weighted blocks to keep in the main Sequential (the one with the most
            removable blocks), between its minimum (the blocks that cannot be removed) and its
            current count.

    Returns:
        The new model.

    Example:
        >>> shallow = truncate(mlp, 8)
    """
    _check_module(model)
    if isinstance(n_layers, bool) or not isinstance(n_layers, int):
        raise TypeError(f"n_layers must be an int, got {type(n_layers).__name__}")
    new = copy.deepcopy(model)
    found = _trunk(new)
    if found is None:
        raise ValueError("truncate needs a model with an nn.Sequential of layers; found none")
    seq, blocks, removable = found
    current = sum(1 for b in blocks if _has_params(b[0]))
    lowest = current - len(removable)
    if not lowest <= n_layers <= current:
        raise ValueError(
            f"n_layers must be between {lowest} and {current} for this model "
            f"({len(removable)} removable same-shape blocks), got {n_layers}"
        )
    drop = set(removable[len(removable) - (current - n_layers) :]) if current > n_layers else set()
    kept = [m for i, b in enumerate(blocks) if i not in drop for m in b]
    for key in list(seq._modules):
        del seq._modules[key]
    for i, m in enumerate(kept):
        seq.add_module(str(i), m)
    return new


def truncatable_range(model: nn.Module) -> tuple[int, int]:
    """``(fewest, current)`` weighted blocks :func:`truncate` accepts for ``model``."""
    found = _trunk(model)
    if found is None:
        return (0, 0)
    _, blocks, removable = found
    current = sum(1 for b in blocks if _has_params(b[0]))
    return (current - len(removable), current)


def l2_penalty(
    model: nn.Module | Iterable[Tensor], weight: float, *, biases: bool = False
) -> Tensor:
    """The L2 weight penalty ``weight * sum(w**2)`` to add to the loss (Krogh & Hertz 1992,
    "A Simple Weight Decay Can Improve Generalization"; the textbook "L1/L2 weight regularization").

    Large weights are what make a layer's gain large; the penalty pulls them toward 0 during
    training, by ``2 * lr * weight * w`` per SGD step.

    Args:
        model: a module (its parameters), or an iterable of tensors.
        weight: the coefficient (finite, >= 0).
        biases: include 1-dim parameters (biases, norm scales); off by default, as usual.

    Returns:
        A 0-dim tensor on the parameters' device, differentiable.

    Example:
        >>> loss = criterion(model(x), y) + l2_penalty(model, 1e-4)
    """
    weight = _validate.threshold("weight", weight)
    params = (
        list(model.parameters())
        if isinstance(model, nn.Module)
        else _validate.materialize(model, "model")
    )
    chosen = [p for p in params if biases or p.dim() >= 2]
    if not chosen:
        return torch.zeros(())
    total = torch.stack([p.float().pow(2).sum() for p in chosen]).sum()
    return total * weight


def suggest_clip_threshold(norms: Iterable[Any] | Tensor, percentile: float = 10.0) -> float:
    """A clipping threshold: the ``percentile``-th percentile of observed gradient norms.

    AutoClip (Seetharaman et al. 2020, arXiv 2007.14469) clips to the p-th percentile of the
    norm history and finds p = 10 works across tasks. Non-finite norms are ignored.

    Args:
        norms: gradient norms (numbers or tensors), at least one finite.
        percentile: in [0, 100].

    Returns:
        The threshold as a float (read on the host: this is set-up code, not the hot path).

    Example:
        >>> suggest_clip_threshold([0.8, 1.1, 0.9, 25.0], 50)
        1.0
    """
    p = _validate.as_float("percentile", percentile)
    if not 0.0 <= p <= 100.0:
        raise ValueError(f"percentile must be in [0, 100], got {p!r}")
    if isinstance(norms, Tensor):
        values = norms.detach().reshape(-1).double().cpu()
    else:
        items = list(norms)
        values = torch.tensor(
            [float(v.detach().reshape(())) if isinstance(v, Tensor) else float(v) for v in items],
            dtype=torch.float64,
        )
    values = values[values.isfinite()]
    if values.numel() == 0:
        raise ValueError("norms must contain at least one finite value")
    return float(torch.quantile(values, p / 100.0))
