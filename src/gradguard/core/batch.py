"""BATCH: what a training batch looks like to a model: its input, a default loss, its device.

A batch is whatever a data loader yields: an ``(x, y)`` tuple, a bare tensor, or a mapping that a
Hugging Face model takes as keyword arguments. The preflight diagnosis and the incident replay
both run a model on a batch the user gave; these helpers are their one definition of how.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._pytree import tree_map

__all__ = ["Call", "default_loss", "model_input", "move_batch", "own_loss", "run_model"]

# How to run a model on a batch: ``call(model, batch) -> output``.
Call = Callable[[nn.Module, Any], Any]


def model_input(batch: Any) -> Any:
    """What to call the model with: the first item of an ``(x, y)`` tuple/list, else the batch.

    Raises:
        ValueError: an empty tuple or list.

    Example:
        >>> model_input((x, y)) is x
        True
    """
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise ValueError("batch must be a tensor or a non-empty (x, y) tuple, got empty")
        return batch[0]
    return batch


def run_model(model: nn.Module, batch: Any, call: Call | None = None) -> Any:
    """The model's output on ``batch``: ``call(model, batch)`` when given, else
    ``model(**x)`` for a mapping input (Hugging Face) and ``model(x)`` otherwise, with ``x`` the
    :func:`model_input` of the batch.

    Example:
        >>> run_model(model, {"x": x, "y": y}, call=lambda m, b: m(b))   # forward(batch)
    """
    if call is not None:
        return call(model, batch)
    x = model_input(batch)
    return model(**x) if isinstance(x, Mapping) else model(x)


def move_batch(batch: Any, device: torch.device | str) -> Any:
    """The batch with every tensor moved to ``device`` (other leaves as they are)."""

    def move(t: Any) -> Any:
        return t.to(device) if isinstance(t, Tensor) else t

    return tree_map(move, batch)


def default_loss(output: Any, batch: Any) -> Tensor:
    """The loss :func:`diagnose` uses when none is given.

    ``(x, y)`` with an integer ``y``: cross-entropy (classes in dim 1 as torch expects, or, for
    a language model's ``[B, T, V]`` logits and ``[B, T]`` targets, in the last dim); with a
    floating ``y`` of the output's shape: mean squared error; a bare tensor batch:
    ``output.pow(2).mean()`` (its gradient is the output itself, which is what a gain
    measurement needs). A tuple output uses its first item, a Hugging Face output its
    ``logits``.

    Args:
        output: the model's output (a tensor, or a tuple whose first item is one).
        batch: the batch the output came from.

    Returns:
        A scalar float tensor.

    Raises:
        ValueError: ``(x, y)`` whose ``y`` fits neither rule; pass ``loss_fn`` to
            :func:`diagnose`.

    Example:
        >>> default_loss(model(x), (x, labels))  # == F.cross_entropy(model(x), labels)
    """
    out = output[0] if isinstance(output, (tuple, list)) else output
    if not isinstance(out, Tensor) and isinstance(getattr(out, "logits", None), Tensor):
        out = out.logits
    if isinstance(batch, (tuple, list)) and len(batch) >= 2 and isinstance(batch[1], Tensor):
        y = batch[1]
        lm = out.dim() == y.dim() + 1 >= 3 and out.shape[:-1] == y.shape
        torch_layout = out.dim() == y.dim() + 1 and out.shape[:1] + out.shape[2:] == y.shape
        if not y.dtype.is_floating_point and lm and not torch_layout:
            return F.cross_entropy(out.float().reshape(-1, out.shape[-1]), y.reshape(-1))
        if not y.dtype.is_floating_point and out.dim() >= 2:
            return F.cross_entropy(out.float(), y)
        if y.dtype.is_floating_point and y.shape == out.shape:
            return F.mse_loss(out.float(), y.float())
        raise ValueError(
            f"cannot pick a default loss for output shape {tuple(out.shape)} and target "
            f"{y.dtype} of shape {tuple(y.shape)}; pass loss_fn(output, batch)"
        )
    return out.float().pow(2).mean()


def own_loss(
    output: Any, batch: Any, loss_fn: Callable[[Any, Any], Tensor] | None = None
) -> Tensor:
    """The loss of one output: ``loss_fn(output, batch)`` when given, else the model's own loss
    (a Hugging Face output's ``loss``), else :func:`default_loss`."""
    if loss_fn is not None:
        return loss_fn(output, batch)
    own = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
    return own if isinstance(own, Tensor) else default_loss(output, batch)
