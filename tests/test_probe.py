"""The per-layer probe: statistics against hand-computed values, and the NaN-origin trace."""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from gradguard.insight.probe import NonFiniteOrigin, Probe
from gradguard.records.recorder import Recorder
from tests.conformance import no_host_sync

# Ops that read a tensor's value on the host (a device sync on an accelerator).
SYNC_OPS = {"_local_scalar_dense", "is_nonzero", "item", "equal"}


class OpLog(TorchDispatchMode):
    """Every aten op that runs inside the block (an observer, not a mock)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops.append(str(func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))


class NaNAt(nn.Module):
    """A layer whose forward output turns NaN on one chosen call (step)."""

    def __init__(self, width: int, at: int) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)
        self.at, self.calls = at, 0

    def forward(self, x: Tensor) -> Tensor:
        y = self.lin(x)
        if self.calls == self.at:
            y = y * float("nan")
        self.calls += 1
        return y


class Scale(nn.Module):
    """A leaf layer; on one call a tensor hook poisons the gradient flowing through it."""

    def __init__(self, width: int, at: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(width))
        self.at, self.calls = at, 0

    def forward(self, x: Tensor) -> Tensor:
        y = x * self.w
        if self.calls == self.at:
            y.register_hook(lambda g: g * float("nan"))
        self.calls += 1
        return y


class SqrtAtZero(nn.Module):
    """Finite forward, but d sqrt(|x - x|)/dx is 0 * inf = NaN: a NaN born in backward."""

    def forward(self, x: Tensor) -> Tensor:
        return x + (x - x.detach()).abs().sqrt()


def mlp(middle: nn.Module, width: int = 6) -> nn.Sequential:
    return nn.Sequential(
        OrderedDict(
            [
                ("inp", nn.Linear(3, width)),
                ("act", nn.Tanh()),
                ("blocks", nn.Sequential(OrderedDict([("mid", middle), ("act", nn.ReLU())]))),
                ("head", nn.Linear(width, 1)),
            ]
        )
    )


def train(model: nn.Module, probe: Probe, steps: int) -> dict[int, list[NonFiniteOrigin]]:
    torch.manual_seed(1)
    found = {}
    for s in range(steps):
        model(torch.randn(8, 3)).pow(2).mean().backward()
        found[s] = probe.step()
        model.zero_grad(set_to_none=True)
    return found


def test_forward_nan_is_traced_to_the_named_layer_and_step() -> None:
    torch.manual_seed(0)
    model = mlp(NaNAt(6, at=3))
    rec = Recorder(flush_every=100)
    probe = Probe(model, every=1, recorder=rec, trace=True)
    found = train(model, probe, 6)
    assert all(not f for s, f in found.items() if s != 3)
    fwd = [f for f in found[3] if f.event == "nonfinite_forward"]
    assert len(fwd) == 1
    origin = fwd[0]
    assert (origin.module, origin.step, origin.where) == ("blocks.mid", 3, "output")
    assert origin.inputs_finite is True  # born inside blocks.mid, not before it
    assert origin.previous == "blocks.mid.lin"
    assert origin.tensor.nan and not origin.tensor.finite and origin.tensor.numel == 8 * 6
    assert origin.inputs[0].rms > 0 and origin.inputs[0].maxabs <= 1.0  # tanh output
    rows = [r for r in rec.rows if r.get("event") == "nonfinite_forward"]
    assert [(r["step"], r["module"], r["kind"]) for r in rows] == [(3, "blocks.mid", "probe")]
    assert "blocks.mid" in rows[0]["message"] and "step 3" in rows[0]["message"]
    assert probe.findings[: len(found[3])] == found[3]


def test_nonfinite_data_is_reported_with_nonfinite_inputs() -> None:
    model = mlp(nn.Linear(6, 6))
    probe = Probe(model)
    x = torch.randn(4, 3)
    x[1, 2] = float("inf")
    with probe.trace_nonfinite() as trace:
        model(x)
    assert trace.forward is not None
    assert trace.forward.module == "inp" and trace.forward.inputs_finite is False
    assert trace.forward.inputs[0].inf and not trace.forward.inputs[0].nan
    assert trace.forward.tensor.inf and trace.forward.previous is None


def test_the_tracer_works_without_a_probe_and_the_probe_reexports_its_names() -> None:
    # The non-finite trace is its own module; the probe only switches it on and records.
    import gradguard
    from gradguard.insight import probe as probe_mod
    from gradguard.insight import trace

    for name in ("NonFiniteOrigin", "NonFiniteTrace", "TensorState"):
        assert getattr(probe_mod, name) is getattr(trace, name)
    assert gradguard.NonFiniteOrigin is trace.NonFiniteOrigin
    model = mlp(SqrtAtZero())
    tracer = trace.NonFiniteTracer([(n or "(root)", m) for n, m in model.named_modules()])
    tracer.attach()
    assert tracer.attached
    model(torch.randn(4, 3)).pow(2).mean().backward()
    found = tracer.resolve(step=7)
    assert [f.event for f in found] == ["nonfinite_backward"]  # forward stayed finite
    assert (found[0].module, found[0].where, found[0].step) == ("blocks.mid", "grad_input", 7)
    assert tracer.resolve(step=8) == []  # resolving forgets the step
    tracer.detach()
    assert not tracer.attached
    model(torch.randn(4, 3)).pow(2).mean().backward()
    assert tracer.resolve(step=9) == []  # detached: nothing recorded
    labels = [lb for lb, _ in trace.float_tensors((torch.ones(2), {"m": torch.ones(1)}), "in")]
    assert labels == ["in[0]", "in[1].m"]


def test_backward_nan_from_a_tensor_hook_names_the_layer_and_step() -> None:
    torch.manual_seed(0)
    model = mlp(Scale(6, at=5))
    rec = Recorder(flush_every=100)
    probe = Probe(model, every=2, recorder=rec, trace=True)
    found = train(model, probe, 7)
    assert all(not f for s, f in found.items() if s != 5)
    assert [f.event for f in found[5]] == ["nonfinite_backward"]  # the forward stayed finite
    origin = found[5][0]
    assert (origin.module, origin.step, origin.where) == ("blocks.mid", 5, "grad_output")
    rows = [r for r in rec.rows if r.get("event") == "nonfinite_backward"]
    assert [(r["step"], r["module"]) for r in rows] == [(5, "blocks.mid")]


def test_backward_nan_born_in_a_layers_math_names_that_layer() -> None:
    torch.manual_seed(0)
    model = mlp(SqrtAtZero())
    probe = Probe(model)
    with probe.trace_nonfinite() as trace:
        model(torch.randn(4, 3)).sum().backward()
    assert trace.forward is None
    b = trace.backward
    assert b is not None and b.module == "blocks.mid" and b.where == "grad_input"
    assert b.inputs_finite is True  # finite gradient in, NaN out: born here


def test_backward_nan_in_a_parameter_gradient_names_its_layer() -> None:
    model = mlp(nn.Linear(6, 6))
    model.blocks.mid.weight.register_hook(lambda g: g * float("inf"))
    probe = Probe(model)
    with probe.trace_nonfinite() as trace:
        model(torch.randn(4, 3)).sum().backward()
    b = trace.backward
    assert b is not None and (b.module, b.where) == ("blocks.mid", "param_grad")
    assert b.tensor.label == "weight" and b.inputs_finite is True


def test_layer_statistics_equal_hand_computed_values() -> None:
    torch.manual_seed(0)
    lin1, relu, lin2 = nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 2)
    model = nn.Sequential(lin1, relu, lin2)
    eps = 1e-6
    probe = Probe(model, eps=eps)
    x = torch.randn(11, 5)
    model(x).pow(2).sum().backward()
    got = {k: {n: v.clone() for n, v in d.items()} for k, d in probe.latest().items()}
    probe.step()

    # by hand, with autograd.grad as the oracle for the gradients at each output
    w1, b1, w2, b2 = (p.detach().clone().requires_grad_() for p in model.parameters())
    h = x @ w1.T + b1
    r = h.clamp(min=0)
    out = r @ w2.T + b2
    dh, dr, dout, gw1, gb1, gw2, gb2 = torch.autograd.grad(
        out.pow(2).sum(), [h, r, out, w1, b1, w2, b2]
    )
    acts = {"0": h, "1": r, "2": out}
    close = dict(rtol=1e-5, atol=1e-7)
    for name, a in acts.items():
        a = a.detach()
        torch.testing.assert_close(got["act_rms"][name], a.pow(2).mean().sqrt(), **close)
        torch.testing.assert_close(got["act_maxabs"][name], a.abs().max(), **close)
        dead = (a.abs() <= eps).float().mean()
        torch.testing.assert_close(got["dead_frac"][name], dead, **close)
    for name, g in {"0": dh, "1": dr, "2": dout}.items():
        torch.testing.assert_close(got["out_grad_norm"][name], g.norm(), **close)
    torch.testing.assert_close(got["grad_norm"]["0"], torch.cat([gw1.flatten(), gb1]).norm())
    torch.testing.assert_close(got["grad_norm"]["2"], torch.cat([gw2.flatten(), gb2]).norm())
    assert "1" not in got["grad_norm"]  # ReLU has no parameters
    row = probe.recorder.flush()[0]
    assert row["kind"] == "probe" and row["event"] == "layers" and row["step"] == 0
    assert row["dead_frac"]["1"] == pytest.approx(got["dead_frac"]["1"].item())


def test_dead_relu_fraction() -> None:
    lin = nn.Linear(4, 8)
    with torch.no_grad():
        lin.weight.zero_()
        lin.bias.copy_(torch.tensor([1.0, -1.0, 2.0, -2.0, -3.0, -0.5, 0.25, -1e-3]))
    model = nn.Sequential(lin, nn.ReLU())
    probe = Probe(model)
    model(torch.randn(10, 4)).sum().backward()
    assert probe.latest()["dead_frac"]["1"].item() == pytest.approx(5 / 8)
    assert probe.latest()["dead_frac"]["0"].item() == 0.0


def test_statistics_cover_every_call_of_a_shared_module() -> None:
    lin = nn.Linear(3, 3)
    model = nn.Sequential(lin, nn.Tanh(), lin)
    probe = Probe(model, modules=[nn.Linear])
    x = torch.randn(4, 3)
    a = lin(x)
    b = lin(torch.tanh(a))
    model(x).sum().backward()
    both = torch.cat([a, b]).detach()
    # named_modules() lists a shared module once, under its first name
    assert probe.layer_names == ["0"]
    torch.testing.assert_close(probe.latest()["act_rms"]["0"], both.pow(2).mean().sqrt())
    torch.testing.assert_close(probe.latest()["act_maxabs"]["0"], both.abs().max())


def hook_counts(model: nn.Module) -> tuple[int, int]:
    fwd = sum(len(m._forward_hooks) for m in model.modules())
    post = sum(
        len(getattr(p, "_post_accumulate_grad_hooks", None) or {}) for p in model.parameters()
    )
    return fwd, post


def test_interval_is_honoured_and_off_steps_have_no_hooks() -> None:
    torch.manual_seed(0)
    model = mlp(nn.Linear(6, 6))
    rec = Recorder(flush_every=1)
    probe = Probe(model, every=3, recorder=rec)
    for s in range(10):
        installed = hook_counts(model)
        assert (installed != (0, 0)) == (s % 3 == 0) == probe.active
        with OpLog() as logged:
            model(torch.randn(4, 3)).sum().backward()
        model.zero_grad(set_to_none=True)
        if s % 3:
            # an off step runs exactly the plain step's ops
            with OpLog() as plain:
                model(torch.randn(4, 3)).sum().backward()
            model.zero_grad(set_to_none=True)
            assert sorted(logged.ops) == sorted(plain.ops)
        probe.step()
    assert [r["step"] for r in rec.rows] == [0, 3, 6, 9]
    assert all(r["event"] == "layers" and len(r["layers"]) == 3 for r in rec.rows)


def test_gather_step_reads_nothing_back_to_the_host() -> None:
    torch.manual_seed(0)
    model = mlp(nn.Linear(6, 6))
    rec = Recorder(flush_every=10)
    probe = Probe(model, every=1, recorder=rec)
    with OpLog() as logged, no_host_sync():  # .item(), bool(t), .tolist() ... would raise
        for _ in range(3):
            model(torch.randn(4, 3)).pow(2).mean().backward()
            probe.step()
    assert not SYNC_OPS & set(logged.ops)
    assert rec.rows == []  # still on the device until the recorder flushes
    assert len(rec.flush()) == 3


def test_close_removes_every_hook_and_eval_forwards_are_ignored() -> None:
    model = mlp(nn.Linear(6, 6))
    before = hook_counts(model)
    with Probe(model, trace=True) as probe:
        assert hook_counts(model)[0] > 0
        with torch.no_grad():
            model(torch.randn(2, 3))
        assert probe.latest()["act_rms"] == {}
        with probe.trace_nonfinite():
            pass
        assert probe.tracing
    assert hook_counts(model) == before == (0, 0)
    with pytest.raises(RuntimeError, match="closed"):
        probe.step()
    model(torch.randn(2, 3)).sum().backward()  # the model still trains without the probe


def test_trace_context_attaches_only_while_open() -> None:
    model = mlp(nn.Linear(6, 6))
    probe = Probe(model, every=1000, start_step=1)  # an off step: nothing installed
    assert hook_counts(model) == (0, 0)
    with probe.trace_nonfinite():
        assert hook_counts(model)[0] == len(list(model.modules()))
    assert hook_counts(model) == (0, 0)


def test_state_round_trip() -> None:
    torch.manual_seed(0)
    model = mlp(NaNAt(6, at=1))
    probe = Probe(model, every=4, eps=1e-3, trace=True)
    train(model, probe, 6)
    state = probe.state_dict()
    assert state["step"] == 6 and len(state["findings"]) == 2
    other = Probe(mlp(nn.Linear(6, 6)))
    other.load_state_dict(state)
    assert repr(other.state_dict()) == repr(state)  # repr: NaN statistics compare equal
    assert repr(other.findings) == repr(probe.findings)
    assert (other.current_step, other.active, other.tracing) == (6, False, True)
    torch.save(state, buf := __import__("io").BytesIO())
    buf.seek(0)
    third = Probe(mlp(nn.Linear(6, 6)))
    third.load_state_dict(torch.load(buf, weights_only=True))
    assert repr(third.state_dict()) == repr(state)
    with pytest.raises(ValueError, match="missing"):
        third.load_state_dict({"every": 2})
    with pytest.raises(ValueError, match="every"):
        third.load_state_dict({**state, "every": 0})
    with pytest.raises(ValueError, match="step"):
        third.load_state_dict({**state, "every": 7, "step": -2})
    assert repr(third.state_dict()) == repr(state)  # a refused state changes nothing


def test_transformer_layers_are_probed_and_traced() -> None:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    probe = Probe(model, trace=True)
    x = torch.randn(3, 5, 16)
    model(x).pow(2).mean().backward()
    stats = probe.latest()
    assert "layers.0.self_attn" in stats["grad_norm"]  # own in_proj parameters
    assert "layers.1.linear2" in stats["act_rms"]
    assert all(math.isfinite(v.item()) for v in stats["grad_norm"].values())
    assert probe.step() == []


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"every": 0}, ValueError),
        ({"every": 1.5}, ValueError),
        ({"eps": -1.0}, ValueError),
        ({"eps": "x"}, TypeError),
        ({"trace": 1}, TypeError),
        ({"modules": ["nope"]}, ValueError),
        ({"modules": 3}, TypeError),
        ({"modules": ["inp", nn.Linear]}, TypeError),
        ({"recorder": []}, TypeError),
        ({"start_step": -1}, ValueError),
    ],
)
def test_bad_arguments_are_refused_and_install_nothing(
    kwargs: dict[str, Any], error: type[Exception]
) -> None:
    model = mlp(nn.Linear(6, 6))
    with pytest.raises(error):
        Probe(model, **kwargs)
    assert hook_counts(model) == (0, 0)
    with pytest.raises(TypeError, match="model"):
        Probe([nn.Linear(2, 2)])  # type: ignore[arg-type]


def test_low_precision_models_get_fp32_statistics() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1)).to(torch.bfloat16)
    probe = Probe(model, eps=0.0)
    x = torch.randn(32, 8, dtype=torch.bfloat16)
    h = model[0](x).detach()
    model(x).float().pow(2).mean().backward()
    stats = probe.latest()
    assert all(v.dtype == torch.float32 for d in stats.values() for v in d.values())
    want = h.float().pow(2).mean().sqrt()
    torch.testing.assert_close(stats["act_rms"]["0"], want, rtol=1e-6, atol=0)
    dead = (model[1](h) == 0).float().mean()
    torch.testing.assert_close(stats["dead_frac"]["1"], dead)
    grad = torch.cat([p.grad.float().flatten() for p in model[2].parameters()]).norm()
    torch.testing.assert_close(stats["grad_norm"]["2"], grad, rtol=1e-6, atol=0)
