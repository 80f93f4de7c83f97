"""An opt-in contiguous gradient buffer: every ``.grad`` is a view into one flat tensor.

With thousands of small gradients, per-tensor kernels cost more than the arithmetic (torch
spends microseconds per tensor). Keeping all gradients of a (device, dtype) in one flat buffer
turns measuring and clipping into one reduction and one multiply, the idea behind DDP's
``gradient_as_bucket_view`` and DeepSpeed's contiguous gradients.

Autograd accumulates into an existing ``.grad`` in place, so the views survive ``backward``.
What breaks them is ``optimizer.zero_grad(set_to_none=True)`` (the default) or an optimizer that
replaces ``.grad``: call :meth:`ContiguousGrads.zero_grad` instead, and the buffer re-attaches
itself (copying any replaced gradient in) whenever it notices a detached view.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from gradguard.core import validate as _validate


class ContiguousGrads:
    """Flat gradient storage for ``parameters``, one buffer per (device, dtype).

    Args:
        parameters: the parameters that require grad (others are ignored).

    Example:
        >>> grads = ContiguousGrads(model.parameters())
        >>> loss.backward()
        >>> gradguard.clip_grad_norm_(grads, 1.0)     # one norm, one multiply
        >>> optimizer.step(); grads.zero_grad()
    """

    def __init__(self, parameters: Iterable[Tensor]) -> None:
        params = [p for p in _validate.materialize(parameters) if p.requires_grad]
        if not params:
            raise ValueError("parameters must contain at least one tensor that requires grad")
        _validate.check_tensors(params, "parameters")
        # attach() copies existing gradients in: a sparse or integer one must fail here, before
        # any .grad is replaced, not later with torch's "Cannot access data pointer".
        _validate.grads_of(params)
        self.params = params
        self.buffers: dict[tuple[torch.device, torch.dtype], Tensor] = {}
        self._slices: list[tuple[tuple[torch.device, torch.dtype], int, int]] = []
        sizes: dict[tuple[torch.device, torch.dtype], int] = {}
        for p in params:
            key = (p.device, p.dtype)
            start = sizes.get(key, 0)
            self._slices.append((key, start, start + p.numel()))
            sizes[key] = start + p.numel()
        for key, n in sizes.items():
            self.buffers[key] = torch.zeros(n, device=key[0], dtype=key[1])
        # Views are built once: checking "is p.grad still my view" is then an identity test.
        self._views = [self._view(i) for i in range(len(params))]
        self.attach()

    def _view(self, i: int) -> Tensor:
        key, start, end = self._slices[i]
        return self.buffers[key][start:end].view_as(self.params[i])

    def attach(self) -> None:
        """Point every ``.grad`` at its view, copying in any gradient that was replaced."""
        with torch.no_grad():
            for p, view in zip(self.params, self._views):
                g = p.grad
                if g is view:
                    continue
                if g is None:
                    view.zero_()
                elif g.data_ptr() != view.data_ptr() or g.shape != view.shape:
                    view.copy_(g)
                p.grad = view

    def is_attached(self) -> bool:
        """True when every ``.grad`` is still the buffer's view (a host-side identity check)."""
        return all(p.grad is view for p, view in zip(self.params, self._views))

    def zero_grad(self) -> None:
        """Zero all gradients with one fill per buffer (use instead of ``zero_grad()``)."""
        for b in self.buffers.values():
            b.zero_()
        self.attach()

    def flat(self) -> list[Tensor]:
        """The flat buffers, re-attached first so they hold the current gradients."""
        if not self.is_attached():
            self.attach()
        return list(self.buffers.values())

    def total_norm(self, norm_type: float = 2.0) -> Tensor:
        """The total p-norm of all gradients: one reduction per buffer, fp32 accumulation.

        Args:
            norm_type: p > 0 or ``inf``.

        Returns:
            A 0-dim tensor on the first buffer's device (fp64 if any buffer is fp64, else fp32).
        """
        p = _validate.norm_type(norm_type)
        flats = self.flat()
        first = flats[0].device
        norms = []
        for b in flats:
            acc = torch.float32 if b.dtype in (torch.float16, torch.bfloat16) else None
            # An empty buffer's inf-norm has no identity in torch; its norm is 0 for every p.
            norms.append(torch.linalg.vector_norm(b, p if b.numel() else 2.0, dtype=acc))
        if len(norms) == 1:
            return norms[0]
        wide = torch.float64 if any(n.dtype == torch.float64 for n in norms) else torch.float32
        return torch.linalg.vector_norm(torch.stack([n.to(first, wide) for n in norms]), p)

    def scale_(self, coef: Tensor, zero_nonfinite: bool = False) -> None:
        """Multiply all gradients by the 0-dim ``coef`` in place."""
        for b in self.flat():
            b.mul_(coef.to(b.device))
            if zero_nonfinite:
                torch.nan_to_num_(b, nan=0.0, posinf=0.0, neginf=0.0)

    def state_dict(self) -> dict[str, Any]:
        """The current gradients (copies of the flat buffers), e.g. mid gradient accumulation."""
        return {"buffers": [b.detach().clone() for b in self.flat()]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore gradients saved by :meth:`state_dict` for the same parameters."""
        saved = state.get("buffers") if isinstance(state, dict) else None
        if not isinstance(saved, list) or len(saved) != len(self.buffers):
            raise ValueError(
                f"state must hold 'buffers', a list of {len(self.buffers)} tensors, as "
                "state_dict() returns"
            )
        for i, (b, t) in enumerate(zip(self.buffers.values(), saved)):
            if not isinstance(t, Tensor) or t.shape != b.shape:
                raise ValueError(
                    f"state['buffers'][{i}] must be a tensor of shape {tuple(b.shape)}, got "
                    f"{getattr(t, 'shape', type(t).__name__)}"
                )
        self.attach()
        with torch.no_grad():
            for b, t in zip(self.buffers.values(), saved):
                b.copy_(t)
