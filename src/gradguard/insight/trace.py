"""TRACE: where a non-finite value first appeared in one step, forward and backward.

A :class:`NonFiniteTracer` puts a forward hook on every module (its inputs and outputs), a
tensor hook on every gradient flowing into a module's output or out of its inputs, and a
post-accumulate hook on every parameter gradient. Each hook records a (min, max, norm) triple
of 0-dim device tensors, in execution order; :meth:`NonFiniteTracer.resolve` reads them all back
in one transfer and names the first module whose forward output was non-finite (with the state
of its inputs: finite or not, NaN/inf, RMS and max-abs) and the first module whose gradient went
non-finite in backward execution order (with the state of the gradient that arrived at its
output), as :class:`NonFiniteOrigin` findings. Each check is one min/max pass and one norm pass
on the device, and nothing is read back before :meth:`~NonFiniteTracer.resolve`.

:class:`gradguard.insight.probe.Probe` owns one tracer and switches it on for ``trace=True`` or
inside ``probe.trace_nonfinite()``; the probe writes the findings to the records. How to read a
finding is in ``docs/probe.md``.

Example:
    >>> tracer = NonFiniteTracer(list(model.named_modules()))
    >>> tracer.attach()
    >>> loss_fn(model(x), y).backward()
    >>> for origin in tracer.resolve(step=0):
    ...     print(origin.describe())
    >>> tracer.detach()
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from gradguard.records.recorder import Row

__all__ = ["NonFiniteOrigin", "NonFiniteTrace", "NonFiniteTracer", "TensorState", "float_tensors"]

_F32 = torch.float32
_TOKENS = itertools.count(1)
_TOKEN_ATTR = "_gradguard_probe_token"


@dataclass(frozen=True)
class TensorState:
    """The numeric state of one tensor, as the trace saw it.

    Attributes:
        label: which tensor, e.g. ``"output"``, ``"input[0]"``, ``"kw.mask"``, ``"weight"``.
        finite: no NaN and no inf.
        nan: some entry is NaN.
        inf: some entry is +-inf and none is NaN (a NaN hides infinities: the trace reads one
            min/max pair per tensor, the cheapest pass that sees both).
        numel: number of entries.
        maxabs, rms: max-abs and root-mean-square of the entries (exact for a finite tensor;
            NaN or inf otherwise).
    """

    label: str
    finite: bool
    nan: bool
    inf: bool
    numel: int
    maxabs: float
    rms: float


@dataclass(frozen=True)
class NonFiniteOrigin:
    """Where a non-finite value first appeared in one step.

    Attributes:
        event: ``"nonfinite_forward"`` or ``"nonfinite_backward"``.
        step: the probe's step index.
        module: qualified module name (``"(root)"`` for the model itself).
        where: ``"output"`` (forward), or in backward ``"grad_output"`` (the gradient arriving at
            the module's output), ``"grad_input"`` (the gradient the module's backward produced
            for its input) or ``"param_grad"`` (one of its parameters' gradient).
        call: which call of the module in the step (0 for the first; > 0 for shared modules and
            recurrent cells).
        tensor: the first non-finite tensor.
        inputs: forward: the module's inputs; backward: the gradient that arrived at the
            module's output (empty when it was never seen).
        previous: the last module before it, in execution order, whose tensors were all finite.

    ``inputs_finite`` False in a forward finding means the module received non-finite input:
    the value went bad before it (in the data, or in code between ``previous`` and it that is
    not a module). In a backward finding ``inputs_finite`` True means the module's own backward
    (or a hook on it) produced the first non-finite gradient.
    """

    event: str
    step: int
    module: str
    where: str
    call: int
    tensor: TensorState
    inputs: tuple[TensorState, ...] = ()
    previous: str | None = None

    @property
    def inputs_finite(self) -> bool | None:
        return all(s.finite for s in self.inputs) if self.inputs else None

    def describe(self) -> str:
        """One plain sentence, for logs and reports."""
        what = "forward output" if self.where == "output" else self.where.replace("_", " ")
        bad = f"{'NaN' if self.tensor.nan else 'inf'} in {self.tensor.numel} values"
        head = f"step {self.step}: first non-finite {what} in '{self.module}' ({bad})"
        if self.inputs_finite is None:
            return head
        side = "inputs were" if self.event == "nonfinite_forward" else "incoming gradient was"
        state = "finite" if self.inputs_finite else "already non-finite"
        return f"{head}; its {side} {state}"

    def to_row(self) -> Row:
        """The ``kind="probe"`` record (flat, plus one dict of input numbers)."""
        t = self.tensor
        row: Row = {
            "event": self.event,
            "module": self.module,
            "where": self.where,
            "call": self.call,
            "tensor": t.label,
            "nan": t.nan,
            "inf": t.inf,
            "numel": t.numel,
            "maxabs": t.maxabs,
            "rms": t.rms,
            "inputs_finite": self.inputs_finite,
            "previous": self.previous,
            "message": self.describe(),
        }
        if self.inputs:
            row["inputs"] = {
                f"{s.label}/{k}": getattr(s, k)
                for s in self.inputs
                for k in ("finite", "maxabs", "rms")
            }
        return row

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NonFiniteOrigin:
        """Inverse of :func:`dataclasses.asdict` (used by ``Probe.load_state_dict``)."""
        return cls(
            event=d["event"],
            step=int(d["step"]),
            module=d["module"],
            where=d["where"],
            call=int(d["call"]),
            tensor=TensorState(**d["tensor"]),
            inputs=tuple(TensorState(**s) for s in d["inputs"]),
            previous=d["previous"],
        )


@dataclass
class NonFiniteTrace:
    """What ``Probe.trace_nonfinite()`` yields; ``findings`` is filled when steps resolve."""

    findings: list[NonFiniteOrigin] = field(default_factory=list)

    @property
    def forward(self) -> NonFiniteOrigin | None:
        return next((f for f in self.findings if f.event == "nonfinite_forward"), None)

    @property
    def backward(self) -> NonFiniteOrigin | None:
        return next((f for f in self.findings if f.event == "nonfinite_backward"), None)


def float_tensors(obj: Any, label: str = "") -> list[tuple[str, Tensor]]:
    """The non-empty floating tensors nested in ``obj`` (tensors, tuples, lists, dicts), each with
    a label that says where it sat (``"output"``, ``"input[1]"``, ``"kw.mask"``).

    Example:
        >>> [lb for lb, _ in float_tensors((x, {"mask": m}), "input")]
        ['input[0]', 'input[1].mask']
    """
    out: list[tuple[str, Tensor]] = []
    _collect(obj, label, out)
    return out


def _collect(obj: Any, label: str, out: list[tuple[str, Tensor]]) -> None:
    if isinstance(obj, Tensor):
        if obj.is_floating_point() and obj.numel() > 0:
            out.append((label, obj))
    elif isinstance(obj, (tuple, list)):
        for i, x in enumerate(obj):
            _collect(x, f"{label}[{i}]" if label else f"[{i}]", out)
    elif isinstance(obj, dict):
        for k, x in obj.items():
            _collect(x, f"{label}.{k}" if label else str(k), out)


_Vec = tuple[Tensor, Tensor, Tensor]


def _state_vector(t: Tensor) -> _Vec:
    """(min, max, 2-norm) of ``t`` as 0-dim device tensors, stacked only when resolved.

    Two reading passes: min/max propagate NaN and show +-inf, so they alone say whether the
    tensor is finite. Counting NaNs (isnan().sum()) costs several times more on CPU, and the
    trace runs this on every module's inputs, outputs and gradients.
    """
    a = t.detach()
    lo, hi = torch.aminmax(a)
    return lo, hi, torch.linalg.vector_norm(a, dtype=_F32)


def _state(label: str, numel: int, v: list[float]) -> TensorState:
    lo, hi, norm = v
    nan = math.isnan(lo) or math.isnan(hi)
    inf = not nan and (math.isinf(lo) or math.isinf(hi))
    maxabs = math.nan if nan else max(abs(lo), abs(hi))
    rms = norm / math.sqrt(numel)
    return TensorState(label, not (nan or inf), nan, inf, numel, maxabs, rms)


def _token(t: Tensor) -> int:
    """A stable identity for a tensor object while it flows from one module to the next.

    ``id()`` is reused once an activation's Python object is freed, so two unrelated tensors
    could look alike; a counter stored on the object cannot.
    """
    tok = getattr(t, _TOKEN_ATTR, None)
    if tok is None:
        tok = next(_TOKENS)
        try:
            setattr(t, _TOKEN_ATTR, tok)
        except (AttributeError, TypeError):
            return id(t)
    return int(tok)


@dataclass
class _BwdEvent:
    module: str
    call: int
    where: str
    label: str
    numel: int
    vec: _Vec
    token: int | None
    foreign: bool = False


@dataclass
class _FwdEvent:
    module: str
    call: int
    outputs: list[tuple[str, int, _Vec]]
    inputs: list[tuple[str, int, _Vec]]


class NonFiniteTracer:
    """Hooks that check every module's tensors for NaN/inf, and the first-origin resolution.

    Args:
        named: the ``(qualified name, module)`` pairs to watch; the name is what findings report
            (``"(root)"`` is customary for the model itself).

    The hooks only record device tensors; nothing is read back until :meth:`resolve`. Hooks a
    detach leaves on live tensors (an activation's gradient hook) go quiet: each attach starts
    a new generation and the hooks of older ones return at once.
    """

    def __init__(self, named: list[tuple[str, nn.Module]]) -> None:
        self._named = named
        self._handles: list[RemovableHandle] = []
        self._gen = 0
        self.reset()

    @property
    def attached(self) -> bool:
        """Whether the hooks are installed."""
        return bool(self._handles)

    def attach(self) -> None:
        """Install a forward hook on every module and a post-accumulate hook on every
        parameter that requires grad (each parameter once, under its first owner's name)."""
        if self._handles:
            return
        gen = self._gen
        seen: set[int] = set()
        for name, module in self._named:
            self._handles.append(
                module.register_forward_hook(partial(self._forward, gen, name), with_kwargs=True)
            )
            for pname, p in module.named_parameters(recurse=False):
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    hook = partial(self._param, gen, name, pname)
                    self._handles.append(p.register_post_accumulate_grad_hook(hook))

    def detach(self) -> None:
        """Remove the hooks; those still on live tensors go quiet."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._gen += 1

    def reset(self) -> None:
        """Forget what the hooks recorded so far (a new step begins)."""
        self._fwd: list[_FwdEvent] = []
        self._bwd: list[_BwdEvent] = []
        self._calls: dict[str, int] = {}
        self._ours: dict[int, int] = {}

    def claim(self, t: Tensor) -> None:
        """Count one gradient hook on ``t`` as a friend's (the probe's gather), not a foreign one.

        The backward resolution blames the producer of a tensor rather than its consumer when a
        hook registered by someone else ran first and may have injected the value.
        """
        tok = _token(t)
        self._ours[tok] = self._ours.get(tok, 0) + 1

    def resolve(self, step: int) -> list[NonFiniteOrigin]:
        """Read every recorded triple back in one transfer and name the first non-finite ones.

        Args:
            step: the step index the findings carry.

        Returns:
            Up to two findings: the forward origin, then the backward one (each only when the
            step had one). What was recorded is forgotten.
        """
        fwd, bwd = self._fwd, self._bwd
        self.reset()
        vecs = [v for e in fwd for _, _, v in (*e.outputs, *e.inputs)] + [e.vec for e in bwd]
        if not vecs:
            return []
        # one stack and one device-to-host copy for the whole step (float(): bf16 min/max)
        flat = torch.stack([x.float() for v in vecs for x in v]).cpu().tolist()
        host = [flat[i : i + 3] for i in range(0, len(flat), 3)]
        it = iter(host)
        fwd_states = [
            (
                [_state(lb, n, next(it)) for lb, n, _ in e.outputs],
                [_state(lb, n, next(it)) for lb, n, _ in e.inputs],
            )
            for e in fwd
        ]
        bwd_states = [_state(e.label, e.numel, next(it)) for e in bwd]
        found = [_first_forward(step, fwd, fwd_states), _first_backward(step, bwd, bwd_states)]
        return [f for f in found if f is not None]

    def _next_call(self, name: str) -> int:
        call = self._calls.get(name, 0)
        self._calls[name] = call + 1
        return call

    def _forward(
        self, gen: int, name: str, module: nn.Module, args: Any, kwargs: Any, out: Any
    ) -> None:
        if gen != self._gen:
            return
        call = self._next_call(name)
        outs = float_tensors(out, "output")
        ins = float_tensors(args, "input") + float_tensors(kwargs, "kw")
        self._fwd.append(
            _FwdEvent(
                name,
                call,
                [(lb, t.numel(), _state_vector(t)) for lb, t in outs],
                [(lb, t.numel(), _state_vector(t)) for lb, t in ins],
            )
        )
        if not torch.is_grad_enabled():
            return
        for where, tensors in (("grad_output", outs), ("grad_input", ins)):
            for lb, t in tensors:
                if t.requires_grad:
                    tok = _token(t)
                    # Hooks registered on this tensor by someone else before ours run first
                    # and may have changed the gradient (e.g. one set up inside the module's
                    # forward): remember that, to tell "injected here" from "arrived so".
                    ours = self._ours.get(tok, 0)
                    foreign = len(getattr(t, "_backward_hooks", None) or {}) > ours
                    self._ours[tok] = ours + 1
                    hook = partial(self._grad, gen, name, call, where, "grad_" + lb, tok, foreign)
                    t.register_hook(hook)

    def _grad(
        self,
        gen: int,
        name: str,
        call: int,
        where: str,
        label: str,
        tok: int,
        foreign: bool,
        grad: Tensor,
    ) -> None:
        if gen == self._gen and grad.numel() > 0:
            vec = _state_vector(grad)
            self._bwd.append(_BwdEvent(name, call, where, label, grad.numel(), vec, tok, foreign))

    def _param(self, gen: int, name: str, pname: str, p: Tensor) -> None:
        if gen == self._gen and p.grad is not None and p.grad.numel() > 0:
            call = max(self._calls.get(name, 1) - 1, 0)
            self._bwd.append(
                _BwdEvent(
                    name, call, "param_grad", pname, p.grad.numel(), _state_vector(p.grad), None
                )
            )


def _first_forward(
    step: int, fwd: list[_FwdEvent], states: list[tuple[list[TensorState], list[TensorState]]]
) -> NonFiniteOrigin | None:
    previous = None
    for e, (outs, ins) in zip(fwd, states):
        bad = next((s for s in outs if not s.finite), None)
        if bad is not None:
            return NonFiniteOrigin(
                "nonfinite_forward", step, e.module, "output", e.call, bad,
                tuple(ins), previous,
            )  # fmt: skip
        previous = e.module
    return None


def _first_backward(
    step: int, bwd: list[_BwdEvent], states: list[TensorState]
) -> NonFiniteOrigin | None:
    first = next((i for i, s in enumerate(states) if not s.finite), None)
    if first is None:
        return None
    pick = first
    e = bwd[first]
    # Hooks on one tensor fire back to back. When the gradient was already non-finite at
    # the first of them, the consumer's backward produced it (sqrt or log at 0, a custom
    # Function): blame the consumer (its grad_input), not the producer whose output the
    # tensor also is, unless a foreign hook ran before ours on that tensor and may have
    # injected it.
    if e.token is not None and not e.foreign:
        group = [first]
        j = first - 1
        while j >= 0 and bwd[j].token == e.token:
            group.insert(0, j)
            j -= 1
        j = first + 1
        while j < len(bwd) and bwd[j].token == e.token:
            group.append(j)
            j += 1
        if group[0] == first:
            pick = next((k for k in group if bwd[k].where == "grad_input"), first)
    chosen = bwd[pick]
    incoming = tuple(
        states[k]
        for k in range(pick)
        if bwd[k].module == chosen.module
        and bwd[k].call == chosen.call
        and bwd[k].where == "grad_output"
    )
    previous = next(
        (bwd[k].module for k in range(first - 1, -1, -1) if bwd[k].module != chosen.module),
        None,
    )
    return NonFiniteOrigin(
        "nonfinite_backward", step, chosen.module, chosen.where, chosen.call,
        states[pick], incoming, previous,
    )  # fmt: skip
