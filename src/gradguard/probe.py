"""PROBE: per-layer gradient and activation statistics, and where a NaN first appeared.

Two modes share one object.

*Gather* (every ``every`` steps): module forward hooks and parameter gradient hooks collect, per
layer (the module's qualified name), the norm of the gradient of its own parameters, the norm of
the gradient flowing into its output, the RMS and max-abs of its output activation, and the
fraction of near-zero activations (``|a| <= eps``: dead ReLUs). Everything stays a 0-dim tensor
on the device; one ``kind="probe"``, ``event="layers"`` row per gathered step goes to a
:class:`~gradguard.records.Recorder`, which reads the numbers back only when it flushes. On the
other steps no hook is installed at all, so an off step costs exactly a plain step.

*Trace* (``with probe.trace_nonfinite():`` or ``Probe(..., trace=True)``): every module's forward
output and inputs, every gradient flowing into a module's output or out of its inputs, and every
parameter gradient is checked for NaN/inf, in execution order. The first module whose forward
output is non-finite is reported with the state of its inputs (finite or not, NaN/inf counts,
RMS and max-abs of the finite entries), and the first module whose gradient went non-finite in
backward execution order is reported with its incoming gradient's state. Findings are
:class:`NonFiniteOrigin` dataclasses, and ``kind="probe"`` rows with
``event="nonfinite_forward"`` / ``"nonfinite_backward"`` in the same records stream. Trace
mode reads its flags back once per traced step (one host transfer when the step is resolved),
and costs a few reductions per tensor: use it on demand, e.g. when re-running a bad step.

Example:
    >>> probe = Probe(model, every=10, recorder=rec)
    >>> for batch in data:
    ...     loss = loss_fn(model(batch)); loss.backward(); opt.step(); opt.zero_grad()
    ...     probe.step()                       # emits the layer row on gathered steps
    >>> with probe.trace_nonfinite() as trace:  # re-run a suspicious step
    ...     loss_fn(model(bad_batch)).backward()
    >>> trace.findings[0].module
    'blocks.3.mlp'
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from gradguard.records import Recorder, Row

__all__ = ["NonFiniteOrigin", "NonFiniteTrace", "Probe", "TensorState"]

ROOT = "(root)"
_F32 = torch.float32
_TOKENS = itertools.count(1)
_TOKEN_ATTR = "_gradguard_probe_token"

ModuleFilter = Iterable[str] | Iterable[type] | Callable[[str, nn.Module], bool] | None


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


def _float_tensors(obj: Any, label: str, out: list[tuple[str, Tensor]]) -> None:
    """Floating tensors nested in ``obj`` (tensors, tuples, lists, dicts), with labels."""
    if isinstance(obj, Tensor):
        if obj.is_floating_point() and obj.numel() > 0:
            out.append((label, obj))
    elif isinstance(obj, (tuple, list)):
        for i, x in enumerate(obj):
            _float_tensors(x, f"{label}[{i}]" if label else f"[{i}]", out)
    elif isinstance(obj, dict):
        for k, x in obj.items():
            _float_tensors(x, f"{label}.{k}" if label else str(k), out)


def _first_float(obj: Any) -> Tensor | None:
    found: list[tuple[str, Tensor]] = []
    _float_tensors(obj, "", found)
    return found[0][1] if found else None


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


class Probe:
    """Per-layer gradient/activation statistics every ``every`` steps, and a NaN-origin trace.

    Args:
        model: the module to watch.
        every: gather statistics on steps where ``step % every == 0`` (>= 1; default 50).
        recorder: where rows go; a private ``Recorder()`` when None (see ``probe.recorder``).
        modules: which modules gather statistics: None (default) = every module that has
            parameters of its own or no children; or an iterable of qualified names, or of
            module types, or a predicate ``f(name, module) -> bool``. The trace always watches
            every module.
        eps: an activation with ``|a| <= eps`` counts as near zero (dead) (>= 0).
        trace: trace non-finite values on every step (costly; see the module docstring).
        start_step: the index of the first step.

    Forward passes run with gradients disabled (evaluation) are ignored by the gather.
    Statistics of a step called with several forward/backward passes (gradient accumulation,
    shared modules) cover all of them: RMS and dead fraction over all outputs, max over all,
    parameter gradient norm of the accumulated ``.grad``.

    Example:
        >>> probe = Probe(model, every=50, recorder=guard.recorder)
        >>> ...; loss.backward(); probe.step()
        >>> probe.close()
    """

    def __init__(
        self,
        model: nn.Module,
        every: int = 50,
        *,
        recorder: Recorder | None = None,
        modules: ModuleFilter = None,
        eps: float = 1e-6,
        trace: bool = False,
        start_step: int = 0,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        _check_every(every)
        _check_eps(eps)
        if not isinstance(trace, bool):
            raise TypeError(f"trace must be True or False, got {type(trace).__name__}")
        if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0:
            raise ValueError(f"start_step must be an int >= 0, got {start_step!r}")
        if recorder is not None and not isinstance(recorder, Recorder):
            raise TypeError(
                f"recorder must be a gradguard.records.Recorder, got {type(recorder).__name__}"
            )
        named = [(name or ROOT, m) for name, m in model.named_modules()]
        self._selected = _select(named, modules)
        self.model = model
        self.every = every
        self.eps = float(eps)
        self.trace = trace
        self.recorder = recorder if recorder is not None else Recorder()
        self.findings: list[NonFiniteOrigin] = []
        self._all = named
        self._step = start_step
        self._closed = False
        # bumped on every detach, so hooks still attached to live tensors go quiet
        self._gen = {"gather": 0, "trace": 0}
        self._gather_handles: list[RemovableHandle] = []
        self._trace_handles: list[RemovableHandle] = []
        self._traces: list[NonFiniteTrace] = []
        self._owners: dict[str, list[int]] = {}  # layer name -> ids of its own parameters
        self._reset_step_buffers()
        self._sync_hooks()

    # -- public API -------------------------------------------------------------------------

    @property
    def current_step(self) -> int:
        """The index of the step in progress (the one ``step()`` will close)."""
        return self._step

    @property
    def active(self) -> bool:
        """Whether the step in progress gathers statistics."""
        return self._step % self.every == 0

    @property
    def tracing(self) -> bool:
        return self.trace or bool(self._traces)

    @property
    def layer_names(self) -> list[str]:
        """Qualified names of the modules that gather statistics, in model order."""
        return [name for name, _ in self._selected]

    def set_step(self, step: int) -> None:
        """Re-align the probe's step counter (e.g. with a guard's), before the step's forward."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        self._step = step
        self._reset_step_buffers()
        self._sync_hooks()

    def step(self) -> list[NonFiniteOrigin]:
        """Close the current step: log its layer row (if gathered), resolve the trace, advance.

        Call once per training step, after backward (before or after ``optimizer.step()``).

        Returns:
            The non-finite origins found in this step (traced steps only; else ``[]``).
        """
        self._check_open()
        if self.active and self._gathered:
            self.recorder.log(self._step, "probe", **self._layer_row())
        found = self._resolve_trace()
        self._step += 1
        self._reset_step_buffers()
        self._sync_hooks()
        return found

    def latest(self) -> dict[str, dict[str, Tensor]]:
        """The statistics gathered so far in the current step, as 0-dim device tensors.

        Keys: ``grad_norm``, ``out_grad_norm``, ``act_rms``, ``act_maxabs``, ``dead_frac``,
        each ``{layer name: value}``. A guard can merge ``grad_norm`` into its step row.
        """
        row = self._layer_row()
        return {
            "grad_norm": row.get("layers", {}),
            **{k: row.get(k, {}) for k in ("out_grad_norm", "act_rms", "act_maxabs", "dead_frac")},
        }

    @contextmanager
    def trace_nonfinite(self) -> Iterator[NonFiniteTrace]:
        """Trace where non-finite values first appear while the block runs.

        Steps closed by ``probe.step()`` inside the block are resolved there; anything left is
        resolved (labelled with the current step) when the block exits. Reads the flags back
        to the host once per resolved step.

        Example:
            >>> with probe.trace_nonfinite() as trace:
            ...     loss_fn(model(x), y).backward()
            >>> print(trace.forward.describe() if trace.forward else "forward was finite")
        """
        self._check_open()
        trace = NonFiniteTrace()
        self._traces.append(trace)
        self._sync_hooks()
        try:
            yield trace
        finally:
            if not self._closed:
                self._resolve_trace()
            self._traces.remove(trace)
            if not self._closed:
                self._sync_hooks()

    def close(self) -> None:
        """Remove every hook; the probe can no longer be used. Pending rows stay queued."""
        self._detach(self._gather_handles, "gather")
        self._detach(self._trace_handles, "trace")
        self._closed = True

    def __enter__(self) -> Probe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def state_dict(self) -> dict[str, Any]:
        """Settings, the step counter and the findings so far (host values only)."""
        return {
            "every": self.every,
            "eps": self.eps,
            "trace": self.trace,
            "step": self._step,
            "findings": [asdict(f) for f in self.findings],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = {"every", "eps", "trace", "step", "findings"} - state.keys()
        if missing:
            raise ValueError(f"state is missing the keys {sorted(missing)}")
        _check_every(state["every"])
        _check_eps(state["eps"])
        step = state["step"]
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"state['step'] must be an int >= 0, got {step!r}")
        if not isinstance(state["trace"], bool):
            raise TypeError(f"state['trace'] must be a bool, got {type(state['trace']).__name__}")
        findings = [NonFiniteOrigin.from_dict(d) for d in state["findings"]]
        self.every = int(state["every"])
        self.eps = float(state["eps"])
        self.trace = bool(state["trace"])
        self.findings = findings
        self.set_step(step)

    # -- hook management --------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this Probe is closed; create a new one")

    def _detach(self, handles: list[RemovableHandle], kind: str) -> None:
        for h in handles:
            h.remove()
        handles.clear()
        self._gen[kind] += 1

    def _sync_hooks(self) -> None:
        """Install gather hooks only on gathered steps and trace hooks only while tracing."""
        if self._closed:
            return
        if self.active and not self._gather_handles:
            self._attach_gather()
        elif not self.active and self._gather_handles:
            self._detach(self._gather_handles, "gather")
        if self.tracing and not self._trace_handles:
            self._attach_trace()
        elif not self.tracing and self._trace_handles:
            self._detach(self._trace_handles, "trace")

    def _attach_gather(self) -> None:
        gen = self._gen["gather"]
        seen: set[int] = set()
        for name, module in self._selected:
            self._gather_handles.append(
                module.register_forward_hook(partial(self._gather_forward, gen, name))
            )
            for p in module.parameters(recurse=False):
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    self._gather_handles.append(
                        p.register_post_accumulate_grad_hook(
                            partial(self._gather_param, gen, id(p))
                        )
                    )
        self._owners = {
            name: [id(p) for _, p in m.named_parameters(recurse=False) if p.requires_grad]
            for name, m in self._selected
        }

    def _attach_trace(self) -> None:
        gen = self._gen["trace"]
        seen: set[int] = set()
        for name, module in self._all:
            self._trace_handles.append(
                module.register_forward_hook(
                    partial(self._trace_forward, gen, name), with_kwargs=True
                )
            )
            for pname, p in module.named_parameters(recurse=False):
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    hook = partial(self._trace_param, gen, name, pname)
                    self._trace_handles.append(p.register_post_accumulate_grad_hook(hook))

    def _reset_step_buffers(self) -> None:
        self._act: dict[str, list[tuple[Tensor, Tensor, Tensor, Tensor]]] = {}
        self._count: dict[str, int] = {}
        self._out_norm: dict[str, list[Tensor]] = {}
        self._pnorm: dict[int, Tensor] = {}
        self._gathered = False
        self._fwd: list[_FwdEvent] = []
        self._bwd: list[_BwdEvent] = []
        self._calls: dict[str, int] = {}
        self._ours: dict[int, int] = {}

    # -- gather -----------------------------------------------------------------------------

    def _gather_forward(self, gen: int, name: str, module: nn.Module, args: Any, out: Any) -> None:
        if gen != self._gen["gather"] or not torch.is_grad_enabled():
            return
        x = _first_float(out)
        if x is None:
            return
        a = x.detach()
        # Raw reductions only, combined at emit time. Live entries (|a| > eps) are counted as
        # sum(|sign(hardshrink(a))|): four vectorised passes, ten times faster on CPU than
        # count_nonzero, which branches on every entry.
        live = a if self.eps == 0 else torch.nn.functional.hardshrink(a, self.eps)
        lo, hi = torch.aminmax(a)
        n_live = live.sign().abs().sum(dtype=_F32)
        stats = (torch.linalg.vector_norm(a, dtype=_F32), n_live, lo, hi)
        self._act.setdefault(name, []).append(stats)
        self._count[name] = self._count.get(name, 0) + a.numel()
        self._gathered = True
        if x.requires_grad:
            x.register_hook(partial(self._gather_out_grad, gen, name))
            if self.tracing:  # the trace must not take this hook for a foreign one
                tok = _token(x)
                self._ours[tok] = self._ours.get(tok, 0) + 1

    def _gather_out_grad(self, gen: int, name: str, grad: Tensor) -> None:
        if gen == self._gen["gather"]:
            norm = torch.linalg.vector_norm(grad.detach(), dtype=_F32)
            self._out_norm.setdefault(name, []).append(norm)

    def _gather_param(self, gen: int, key: int, p: Tensor) -> None:
        # post-accumulate: .grad is the accumulated gradient, so the last call wins
        if gen == self._gen["gather"] and p.grad is not None:
            self._pnorm[key] = torch.linalg.vector_norm(p.grad.detach(), dtype=_F32)
            self._gathered = True

    def _layer_row(self) -> Row:
        grad: dict[str, Tensor] = {}
        out_grad: dict[str, Tensor] = {}
        rms: dict[str, Tensor] = {}
        maxabs: dict[str, Tensor] = {}
        dead: dict[str, Tensor] = {}
        owners = self._owners
        for name, _ in self._selected:
            norms = [self._pnorm[k] for k in owners.get(name, ()) if k in self._pnorm]
            if norms:
                grad[name] = norms[0] if len(norms) == 1 else torch.stack(norms).norm()
            if name in self._out_norm:
                norms = self._out_norm[name]
                out_grad[name] = norms[0] if len(norms) == 1 else torch.stack(norms).norm()
            if name in self._act:
                calls = self._act[name]
                n = self._count[name]
                if len(calls) == 1:
                    norm, live, lo, hi = calls[0]
                    rms[name] = norm / math.sqrt(n)
                else:
                    norm_, live_, lo_, hi_ = (torch.stack(list(c)) for c in zip(*calls))
                    rms[name] = (norm_.square().sum() / n).sqrt()
                    live, lo, hi = live_.sum(), lo_.amin(), hi_.amax()
                dead[name] = 1.0 - live.to(_F32) / n
                maxabs[name] = torch.maximum(-lo, hi).to(_F32)
        row: Row = {"event": "layers"}
        for key, d in (
            ("layers", grad),
            ("out_grad_norm", out_grad),
            ("act_rms", rms),
            ("act_maxabs", maxabs),
            ("dead_frac", dead),
        ):
            if d:
                row[key] = d
        return row

    # -- trace ------------------------------------------------------------------------------

    def _next_call(self, name: str) -> int:
        call = self._calls.get(name, 0)
        self._calls[name] = call + 1
        return call

    def _trace_forward(
        self, gen: int, name: str, module: nn.Module, args: Any, kwargs: Any, out: Any
    ) -> None:
        if gen != self._gen["trace"]:
            return
        call = self._next_call(name)
        outs: list[tuple[str, Tensor]] = []
        ins: list[tuple[str, Tensor]] = []
        _float_tensors(out, "output", outs)
        _float_tensors(args, "input", ins)
        _float_tensors(kwargs, "kw", ins)
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
                    hook = partial(
                        self._trace_grad, gen, name, call, where, "grad_" + lb, tok, foreign
                    )
                    t.register_hook(hook)

    def _trace_grad(
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
        if gen == self._gen["trace"] and grad.numel() > 0:
            vec = _state_vector(grad)
            self._bwd.append(_BwdEvent(name, call, where, label, grad.numel(), vec, tok, foreign))

    def _trace_param(self, gen: int, name: str, pname: str, p: Tensor) -> None:
        if gen == self._gen["trace"] and p.grad is not None and p.grad.numel() > 0:
            call = max(self._calls.get(name, 1) - 1, 0)
            self._bwd.append(
                _BwdEvent(
                    name, call, "param_grad", pname, p.grad.numel(), _state_vector(p.grad), None
                )
            )

    def _resolve_trace(self) -> list[NonFiniteOrigin]:
        """Read every trace vector back in one transfer and name the first non-finite ones."""
        fwd, bwd = self._fwd, self._bwd
        self._fwd, self._bwd, self._calls, self._ours = [], [], {}, {}
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
        found: list[NonFiniteOrigin] = []
        f = self._first_forward(fwd, fwd_states)
        if f is not None:
            found.append(f)
        b = self._first_backward(bwd, bwd_states)
        if b is not None:
            found.append(b)
        for origin in found:
            self.findings.append(origin)
            for trace in self._traces:
                trace.findings.append(origin)
            self.recorder.event(self._step, "probe", **origin.to_row())
        return found

    def _first_forward(
        self, fwd: list[_FwdEvent], states: list[tuple[list[TensorState], list[TensorState]]]
    ) -> NonFiniteOrigin | None:
        previous = None
        for e, (outs, ins) in zip(fwd, states):
            bad = next((s for s in outs if not s.finite), None)
            if bad is not None:
                return NonFiniteOrigin(
                    "nonfinite_forward", self._step, e.module, "output", e.call, bad,
                    tuple(ins), previous,
                )  # fmt: skip
            previous = e.module
        return None

    def _first_backward(
        self, bwd: list[_BwdEvent], states: list[TensorState]
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
            "nonfinite_backward", self._step, chosen.module, chosen.where, chosen.call,
            states[pick], incoming, previous,
        )  # fmt: skip


def _check_every(every: Any) -> None:
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"every must be an int >= 1, got {every!r}")


def _check_eps(eps: Any) -> None:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a real number >= 0, got {type(eps).__name__}")
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")


def _select(
    named: list[tuple[str, nn.Module]], modules: ModuleFilter
) -> list[tuple[str, nn.Module]]:
    if modules is None:
        return [
            (n, m)
            for n, m in named
            if next(m.children(), None) is None
            or next(m.parameters(recurse=False), None) is not None
        ]
    if callable(modules) and not isinstance(modules, type):
        return [(n, m) for n, m in named if modules(n, m)]  # type: ignore[call-arg]
    if isinstance(modules, (str, bytes)) or not isinstance(modules, Iterable):
        raise TypeError(
            "modules must be None, an iterable of module names or types, or a predicate "
            f"f(name, module) -> bool; got {type(modules).__name__}"
        )
    items = list(modules)
    if all(isinstance(x, type) for x in items):
        types = tuple(items)
        return [(n, m) for n, m in named if isinstance(m, types)]  # type: ignore[arg-type]
    if all(isinstance(x, str) for x in items):
        known = {n for n, _ in named}
        unknown = [x for x in items if x not in known]
        if unknown:
            raise ValueError(
                f"modules names {unknown} are not in the model; known names: {sorted(known)[:20]}"
            )
        wanted = set(items)
        return [(n, m) for n, m in named if n in wanted]
    raise TypeError("modules must hold only names (str) or only module types, not a mix")
