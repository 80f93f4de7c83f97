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

import torch
from torch import Tensor

from gradguard import _validate


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
        self.attach()

    def _view(self, i: int) -> Tensor:
        key, start, end = self._slices[i]
        return self.buffers[key][start:end].view_as(self.params[i])

    def attach(self) -> None:
        """Point every ``.grad`` at its view, copying in any gradient that was replaced."""
        with torch.no_grad():
            for i, p in enumerate(self.params):
                view = self._view(i)
                g = p.grad
                if g is not None and g.data_ptr() == view.data_ptr():
                    continue
                if g is None:
                    view.zero_()
                else:
                    view.copy_(g)
                p.grad = view

    def is_attached(self) -> bool:
        """True when every ``.grad`` is still a view of the buffer (host-side pointer check)."""
        return all(
            p.grad is not None and p.grad.data_ptr() == self._view(i).data_ptr()
            for i, p in enumerate(self.params)
        )

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
        """The total p-norm of all gradients: one reduction per buffer, fp32 accumulation."""
        flats = self.flat()
        first = flats[0].device
        norms = []
        for b in flats:
            acc = torch.float32 if b.dtype in (torch.float16, torch.bfloat16) else None
            norms.append(torch.linalg.vector_norm(b, norm_type, dtype=acc).to(first))
        if len(norms) == 1:
            return norms[0]
        return torch.linalg.vector_norm(torch.stack([n.float() for n in norms]), norm_type)

    def scale_(self, coef: Tensor, zero_nonfinite: bool = False) -> None:
        """Multiply all gradients by the 0-dim ``coef`` in place."""
        for b in self.flat():
            b.mul_(coef.to(b.device))
            if zero_nonfinite:
                torch.nan_to_num_(b, nan=0.0, posinf=0.0, neginf=0.0)
