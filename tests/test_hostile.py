"""Hostile input: every public function and constructor argument, fuzzed with hypothesis.

Each scalar argument is declared once with the range its docstring promises (``SPECS``); a
hypothesis strategy throws wrong types, NaN, inf, negatives, bools, strings, tensors of every
shape and dtype at it. A value inside the range must be accepted; anything else must raise a
ValueError or TypeError that names the argument, and change nothing (gradients, parameters and
state are compared before and after). Structural hostility (empty models, frozen parameters,
mixed devices and dtypes, sparse gradients, exhausted generators) is tested below, and names
that reach a report are escaped.
"""

from __future__ import annotations

import inspect
import math
import numbers
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import gradguard
from gradguard.core import snapshot as rollback
from gradguard.decide import detect, policies
from gradguard.guard import rollback as skiplist
from gradguard.guard.guard import Guard, GuardConfig
from gradguard.guard.response import Budgets
from gradguard.insight import probe
from gradguard.records import recorder as records
from gradguard.records import sinks
from tests._dist_scale import tally

FUZZ = settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# --- what the library promises, restated independently ---------------------------------------


def real_value(x: Any) -> float | None:
    """The float a real-number argument stands for, or None when it is not a real number."""
    if isinstance(x, bool):
        return None
    if isinstance(x, torch.Tensor):
        if x.numel() != 1 or x.is_complex() or x.dtype == torch.bool:
            return None
        return float(x.reshape(()).double())
    if isinstance(x, numbers.Real):
        return float(x)
    if isinstance(x, str) and x.lower() in ("inf", "+inf", "infinity"):
        return math.inf
    return None


def _real(pred: Callable[[float], bool]) -> Callable[[Any], bool]:
    def ok(x: Any) -> bool:
        v = real_value(x)
        return v is not None and not math.isnan(v) and pred(v)

    return ok


POS = _real(lambda v: math.isfinite(v) and v > 0)
NONNEG = _real(lambda v: math.isfinite(v) and v >= 0)
NORM = _real(lambda v: v > 0)  # p > 0 or inf
FRAC_CO = _real(lambda v: 0 <= v < 1)
FRAC_CC = _real(lambda v: 0 <= v <= 1)
FRAC_OO = _real(lambda v: 0 < v < 1)


def opt(pred: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda x: x is None or pred(x)


def int_ge(lo: int) -> Callable[[Any], bool]:
    return lambda x: type(x) is int and x >= lo


def is_bool(x: Any) -> bool:
    return isinstance(x, bool)


def one_of(*choices: Any) -> Callable[[Any], bool]:
    return lambda x: isinstance(x, str) and x in choices


TENSORS = [
    torch.tensor(math.nan),
    torch.tensor(-1.0),
    torch.tensor(0.5),
    torch.tensor([1.0, 2.0]),
    torch.tensor(3),
    torch.tensor(True),
    torch.tensor(1 + 1j),
    torch.tensor([]),
]
HOSTILE = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=-2.0, max_value=2.0),
    st.integers(min_value=-3, max_value=200),
    st.booleans(),
    st.none(),
    st.sampled_from(["inf", "nan", "-1", "abc", ""]),
    st.sampled_from([[1.0], (2.0,), {"a": 1}, 1 + 2j, b"1"]),
    st.sampled_from(TENSORS),
)


# --- the fixture every function call gets: a small model with gradients ------------------------


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    m(torch.randn(5, 4)).pow(2).sum().mul(50).backward()
    return m


def observed(m: nn.Module) -> list[torch.Tensor]:
    """Everything a bad call must leave alone: parameters and gradients."""
    out = [p.detach().clone() for p in m.parameters()]
    out += [p.grad.detach().clone() for p in m.parameters() if p.grad is not None]
    return out


def assert_unchanged(before: list[torch.Tensor], after: list[torch.Tensor]) -> None:
    assert len(before) == len(after)
    for a, b in zip(before, after):
        assert torch.equal(a, b) or (a.isnan().any() and torch.equal(a.isnan(), b.isnan()))


@dataclass
class Spec:
    """One argument of one public callable."""

    label: str
    arg: str
    valid: Callable[[Any], bool]
    call: Callable[[nn.Module, Any], Any]  # (model with grads, value) -> result
    choices: tuple[Any, ...] = ()


def _fn(fn: Callable[..., Any], arg: str, **base: Any) -> Callable[[nn.Module, Any], Any]:
    def call(m: nn.Module, value: Any) -> Any:
        kwargs = {k: (v(m) if callable(v) else v) for k, v in base.items()}
        kwargs[arg] = value
        return fn(**kwargs)

    return call


def _params(m: nn.Module) -> list[torch.Tensor]:
    return list(m.parameters())


def _grads(m: nn.Module) -> list[torch.Tensor]:
    return [p.grad for p in m.parameters() if p.grad is not None]


def _total(m: nn.Module) -> torch.Tensor:
    return gradguard.get_total_norm(_grads(m))


NONFINITE = ("propagate", "error", "skip", "zero")
SPECS: list[Spec] = []


def spec(label: str, fn: Callable[..., Any], arg: str, valid: Callable[[Any], bool], **base: Any):
    SPECS.append(Spec(label, arg, valid, _fn(fn, arg, **base)))


# clip and norms
G = gradguard


def nonneg_or_tensor(x: Any) -> bool:
    """max_norm of the torch-style clips: a finite number >= 0, or a one-element floating tensor
    whose value is trusted unread (documented: reading it would be a host sync)."""
    if isinstance(x, torch.Tensor):
        return x.numel() == 1 and x.dtype.is_floating_point
    return NONNEG(x)


spec("clip_grad_norm_", G.clip_grad_norm_, "max_norm", nonneg_or_tensor, parameters=_params)
spec("clip_grad_norm_", G.clip_grad_norm_, "norm_type", NORM, parameters=_params, max_norm=1.0)
spec("clip_grad_norm_", G.clip_grad_norm_, "error_if_nonfinite", is_bool, parameters=_params,
     max_norm=1.0)  # fmt: skip
spec("clip_grad_norm_", G.clip_grad_norm_, "foreach", opt(is_bool), parameters=_params,
     max_norm=1.0)  # fmt: skip
spec("clip_grad_norm_", G.clip_grad_norm_, "nonfinite", one_of(*NONFINITE), parameters=_params,
     max_norm=1.0)  # fmt: skip
spec("clip_grads_with_norm_", G.clip_grads_with_norm_, "max_norm", nonneg_or_tensor,
     parameters=_params,
     total_norm=_total)  # fmt: skip
spec("clip_grads_with_norm_", G.clip_grads_with_norm_, "nonfinite", one_of(*NONFINITE),
     parameters=_params, max_norm=1.0, total_norm=_total)  # fmt: skip
spec("clip_grad_value_", G.clip_grad_value_, "clip_value", NONNEG, parameters=_params)
spec("clip_grad_value_", G.clip_grad_value_, "foreach", opt(is_bool), parameters=_params,
     clip_value=1.0)  # fmt: skip
spec("clip_by_norm_", G.clip_by_norm_, "max_norm", NONNEG, parameters=_params)
spec("clip_by_norm_", G.clip_by_norm_, "norm_type", NORM, parameters=_params, max_norm=1.0)
spec("grad_norms", G.grad_norms, "norm_type", NORM, tensors=_grads)
spec("grad_norms", G.grad_norms, "foreach", opt(is_bool), tensors=_grads)
spec("get_total_norm", G.get_total_norm, "norm_type", NORM, tensors=_grads)
spec("get_total_norm", G.get_total_norm, "error_if_nonfinite", is_bool, tensors=_grads)
spec("clip_by_norm", G.clip_by_norm, "clip_norm", POS, t=lambda m: _grads(m)[0])
spec("clip_by_global_norm", G.clip_by_global_norm, "clip_norm", POS, t_list=_grads)
spec("agc_", G.agc_, "clip_factor", POS, parameters=lambda m: m)
spec("agc_", G.agc_, "eps", POS, parameters=lambda m: m)
spec("agc_", G.agc_, "foreach", opt(is_bool), parameters=lambda m: m)
# constructors
P, D = policies, detect
spec("FixedThreshold", P.FixedThreshold, "max_norm", POS)
spec("QuantileClip", P.QuantileClip, "quantile", FRAC_CC)
spec("QuantileClip", P.QuantileClip, "history", int_ge(1), warmup=1)
spec("QuantileClip", P.QuantileClip, "warmup", lambda x: int_ge(1)(x) and x <= 1000)
spec("QuantileClip", P.QuantileClip, "max_norm", opt(POS))
spec("QuantileClip", P.QuantileClip, "feed", one_of("raw", "clipped"))
spec("ZScoreClip", P.ZScoreClip, "alpha", FRAC_CO)
spec("ZScoreClip", P.ZScoreClip, "z_thresh", POS)
spec("ZScoreClip", P.ZScoreClip, "warmup", int_ge(1))
spec("ZScoreClip", P.ZScoreClip, "mode", one_of(*P.ZCLIP_MODES))
spec("ZScoreClip", P.ZScoreClip, "max_norm", opt(POS))
spec("ZScoreClip", P.ZScoreClip, "eps", NONNEG)
spec("EMARatioClip", P.EMARatioClip, "ratio", POS)
spec("EMARatioClip", P.EMARatioClip, "beta", FRAC_CO)
spec("EMARatioClip", P.EMARatioClip, "warmup", int_ge(0))
spec("EMARatioClip", P.EMARatioClip, "max_norm", opt(POS))
spec("AGCPolicy", P.AGCPolicy, "clip_factor", POS)
spec("AGCPolicy", P.AGCPolicy, "eps", POS)
spec("SpikeDetector", D.SpikeDetector, "signal", one_of(*D.SPIKE_SIGNALS))
spec("SpikeDetector", D.SpikeDetector, "window", int_ge(2), warmup=2)
spec("SpikeDetector", D.SpikeDetector, "warmup", opt(lambda x: int_ge(2)(x) and x <= 128))
spec("SpikeDetector", D.SpikeDetector, "z", POS)
spec("SpikeDetector", D.SpikeDetector, "log", is_bool)
spec("SpikeDetector", D.SpikeDetector, "min_std", NONNEG)
RATIO = _real(lambda v: math.isfinite(v) and v > 1)
FRAC_OC = _real(lambda v: 0 < v <= 1)
spec("SpikeDetector", D.SpikeDetector, "bootstrap", opt(RATIO))
spec("DivergenceDetector", D.DivergenceDetector, "ratio", RATIO)
spec("DivergenceDetector", D.DivergenceDetector, "beta", FRAC_CO)
spec("DivergenceDetector", D.DivergenceDetector, "warmup", int_ge(1))
spec("DivergenceDetector", D.DivergenceDetector, "cooldown", int_ge(0))
spec("DivergenceDetector", D.DivergenceDetector, "clip", RATIO)
spec("DivergenceDetector", D.DivergenceDetector, "noise", NONNEG)
spec("DivergenceDetector", D.DivergenceDetector, "memory", FRAC_OC)
spec("MedianClip", P.MedianClip, "factor", RATIO)
spec("MedianClip", P.MedianClip, "window", int_ge(1))
spec("RatioSpikeDetector", D.RatioSpikeDetector, "ratio", RATIO)
spec("RatioSpikeDetector", D.RatioSpikeDetector, "window", int_ge(2))
spec("RatioSpikeDetector", D.RatioSpikeDetector, "patience", int_ge(1))
spec("VanishingDetector", D.VanishingDetector, "floor", FRAC_OO)
spec("VanishingDetector", D.VanishingDetector, "patience", int_ge(1))
spec("UpdateRatioDetector", D.UpdateRatioDetector, "max_ratio", POS)
spec("UpdateRatioDetector", D.UpdateRatioDetector, "include_1d", is_bool)
spec("UpdateRatioDetector", D.UpdateRatioDetector, "eps", POS)
spec("Recorder", records.Recorder, "flush_every", int_ge(1))
spec("SnapshotStore", rollback.SnapshotStore, "keep", int_ge(1))
spec("SkipSampler", skiplist.SkipSampler, "per_step", int_ge(1), sampler=[0, 1],
     should_skip=lambda m: (lambda i: False))  # fmt: skip
spec("SkipSampler", skiplist.SkipSampler, "start", int_ge(0), sampler=[0, 1],
     should_skip=lambda m: (lambda i: False))  # fmt: skip
for _arg in ("skip", "backoff", "rollback"):
    spec("Budgets", Budgets, _arg, int_ge(0))
spec("GuardConfig", GuardConfig, "backoff_factor", FRAC_OO)
spec("GuardConfig", GuardConfig, "norm_type", NORM)
spec("GuardConfig", GuardConfig, "sync", one_of("auto", "step", "lazy"))
spec("GuardConfig", GuardConfig, "record_layers", is_bool)
spec("GuardConfig", GuardConfig, "foreach", opt(is_bool))
for _arg in ("snapshot_every", "skip_before", "skip_after"):
    spec("GuardConfig", GuardConfig, _arg, int_ge(0))
for _arg in ("keep_snapshots", "flush_every", "incident_max", "incident_history"):
    spec("GuardConfig", GuardConfig, _arg, int_ge(1))
spec("GuardConfig", GuardConfig, "keep_buffers", is_bool)
for _arg in ("max_count", "max_batch_bytes"):
    spec("IncidentWriter", gradguard.IncidentWriter, _arg, int_ge(0),
         directory=lambda m: tempfile.mkdtemp(prefix="gg-hostile-inc-"))  # fmt: skip


def _closing(cls: Callable[..., Any]) -> Callable[..., Any]:
    """Construct, then close (an open sink or probe left behind is a ResourceWarning)."""

    def make(**kwargs: Any) -> Any:
        obj = cls(**kwargs)
        obj.close()
        return obj

    return make


def _tmp_file(m: nn.Module) -> str:
    return str(Path(tempfile.mkdtemp(prefix="gg-hostile-")) / "rows.out")


def _real_not_tensor(pred: Callable[[float], bool]) -> Callable[[Any], bool]:
    # Probe takes plain Python numbers only (no tensors, no "inf" strings).
    return lambda x: isinstance(x, (int, float)) and not isinstance(x, bool) and _real(pred)(x)


spec("Probe", _closing(probe.Probe), "every", int_ge(1), model=lambda m: m)
spec("Probe", _closing(probe.Probe), "eps", _real_not_tensor(lambda v: math.isfinite(v) and v >= 0),
     model=lambda m: m)  # fmt: skip
spec("Probe", _closing(probe.Probe), "start_step", int_ge(0), model=lambda m: m)
spec("Probe", _closing(probe.Probe), "trace", is_bool, model=lambda m: m)
spec("JsonlSink", _closing(sinks.JsonlSink), "append", is_bool, path=_tmp_file)
# remedies and diagnose (set-up code: plain numbers, read on the host)
R = gradguard.insight.remedies
PERCENT = _real(lambda v: 0 <= v <= 100)
spec("l2_penalty", R.l2_penalty, "weight", NONNEG, model=lambda m: m)
spec("suggest_clip_threshold", R.suggest_clip_threshold, "percentile", PERCENT, norms=[1.0, 2.0])
spec("lsuv_", R.lsuv_, "tol", POS, model=lambda m: m, batch=lambda m: torch.randn(8, 4))
spec("lsuv_", R.lsuv_, "max_iter", int_ge(1), model=lambda m: m, batch=lambda m: torch.randn(8, 4))
spec("truncate", R.truncate, "n_layers", lambda x: type(x) is int and x == 2, model=lambda m: m)
spec("reinit_", R.reinit_, "scheme", one_of(*R.SCHEMES), model=lambda m: m)
_DIAG = {"model": lambda m: m, "batch": (torch.randn(6, 4), torch.randn(6, 2)), "remedies": False,
         "jacobian_iters": 0, "steps": 0}  # fmt: skip
for _arg, _ok in (
    ("tolerance", lambda x: type(x) in (int, float) and 1 < x < math.inf),
    ("jacobian_iters", int_ge(0)),
    ("steps", int_ge(0)),
    ("lr", POS),
    ("l2", NONNEG),
    ("percentile", PERCENT),
    ("seed", lambda x: type(x) is int),
):
    spec("diagnose", gradguard.diagnose, _arg, _ok, **{k: v for k, v in _DIAG.items() if k != _arg})

spec("TensorBoardSink", _closing(sinks.TensorBoardSink), "flush_secs", int_ge(1),
     logdir=lambda m: tempfile.mkdtemp(prefix="gg-hostile-tb-"))  # fmt: skip


@pytest.mark.parametrize("s", SPECS, ids=[f"{s.label}-{s.arg}" for s in SPECS])
@FUZZ
@given(data=st.data())
def test_every_argument_accepts_its_range_and_rejects_the_rest(s: Spec, data: Any) -> None:
    choices = st.sampled_from([c for c in ("raw", "clipped", "loss", "grad_norm", "skip")])
    value = data.draw(st.one_of(HOSTILE, choices), label=s.arg)
    m = tiny_model()
    before = observed(m)
    tally("fuzz", s.label, s.arg)
    if s.valid(value):
        result = s.call(m, value)
        _check_documented_result(s, value, m, result)
        return
    with pytest.raises((ValueError, TypeError)) as err:
        s.call(m, value)
    assert s.arg in str(err.value), f"{s.label}({s.arg}={value!r}): {err.value}"
    assert_unchanged(before, observed(m))


def _check_documented_result(s: Spec, value: Any, m: nn.Module, result: Any) -> None:
    """What a valid call promises, per family."""
    grads = _grads(m)
    if isinstance(value, torch.Tensor) and s.arg == "max_norm":
        return  # a tensor threshold is trusted unread: NaN in, NaN out, as in torch
    assert all(bool(g.isfinite().all()) for g in grads), f"{s.label} made gradients non-finite"
    if s.label == "clip_grad_norm_" and s.arg == "max_norm":
        after = gradguard.get_total_norm(grads)
        assert float(after) <= real_value(value) * (1 + 1e-5) + 1e-6  # type: ignore[operator]
    if s.label in ("grad_norms", "get_total_norm"):
        total = result.total if isinstance(result, gradguard.GradNorms) else result
        p = real_value(value) if s.arg == "norm_type" else 2.0
        assert p is not None
        ref = torch.nn.utils.get_total_norm([g.detach().clone() for g in grads], p)
        torch.testing.assert_close(total, ref)


def test_specs_cover_the_public_constructors_and_functions() -> None:
    """Every public callable with a scalar argument is fuzzed above, or listed as not needing it.

    New public names must be added to SPECS or to NO_SCALAR_ARGS (with a reason), so the fuzz
    keeps up with the API.
    """
    fuzzed = {s.label for s in SPECS}
    public: dict[str, Any] = {}
    for mod in (gradguard, policies, detect, records, rollback, probe, sinks):
        for name in getattr(mod, "__all__", None) or [n for n in dir(mod) if not n.startswith("_")]:
            obj = getattr(mod, name, None)
            if (inspect.isfunction(obj) or inspect.isclass(obj)) and str(
                getattr(obj, "__module__", "")
            ).startswith("gradguard"):
                public[name] = obj
    missing = sorted(set(public) - fuzzed - NO_SCALAR_ARGS)
    assert not missing, f"public callables without a hostile-input spec: {missing}"


# Public callables whose arguments are objects, not numbers: covered by the structural tests
# below (or by their own modules' tests), not by the scalar fuzz.
NO_SCALAR_ARGS = {
    "GradNorms", "tensor_norms", "total_from_norms", "clip_coefficient", "clip_by_value",
    "agc_parameters", "ContiguousGrads", "ClipPolicy", "Detector", "Detection", "Signals",
    "NonFiniteDetector", "update_ratios", "others_median", "Sink", "read_jsonl", "SkipList",
    "SnapshotError", "capture", "checksum", "load_snapshot", "restore", "rng_state",
    "save_snapshot", "set_rng_state", "to_cpu", "Diagnosis", "diagnose", "Guard", "StepReport",
    "GuardAbort", "ConsoleSink", "CsvSink", "NonFiniteOrigin", "NonFiniteTrace", "TensorState",
    "read_csv", "Stage", "Named", "Bundle", "BundleError", "load_bundle", "Replay", "replay",
    "metrics", "WandbSink", "MlflowSink", "BundleSpec", "forward_rng_state", "is_event",
}  # fmt: skip


# --- structural hostility -------------------------------------------------------------------


def _grads_or_items(ps: list[Any]) -> list[Any]:
    return [getattr(p, "grad", p) for p in ps if getattr(p, "grad", p) is not None]


def _inplace_calls() -> list[tuple[str, Callable[[list[torch.Tensor]], Any]]]:
    return [
        ("clip_grad_norm_", lambda ps: gradguard.clip_grad_norm_(ps, 1.0)),
        ("clip_grad_norm_ skip", lambda ps: gradguard.clip_grad_norm_(ps, 1.0, nonfinite="skip")),
        ("clip_grad_value_", lambda ps: gradguard.clip_grad_value_(ps, 0.1)),
        ("clip_by_norm_", lambda ps: gradguard.clip_by_norm_(ps, 0.1)),
        ("grad_norms", lambda ps: gradguard.grad_norms(_grads_or_items(ps))),
        ("agc_", lambda ps: gradguard.agc_(ps, 0.01)),
        ("ContiguousGrads", lambda ps: gradguard.ContiguousGrads(ps)),
    ]


CALLS = _inplace_calls()
CALL_IDS = [c[0] for c in CALLS]


def _param(data: torch.Tensor, grad: torch.Tensor | None) -> nn.Parameter:
    p = nn.Parameter(data)
    p.grad = grad
    return p


@pytest.mark.parametrize(("label", "call"), CALLS, ids=CALL_IDS)
def test_sparse_gradients_give_a_clear_error_and_change_nothing(label: str, call: Any) -> None:
    emb = nn.Embedding(10, 3, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    dense = _param(torch.ones(3), torch.full((3,), 5.0))
    params = [dense, emb.weight]
    assert emb.weight.grad is not None and emb.weight.grad.is_sparse
    before = [dense.grad.clone(), emb.weight.grad.to_dense().clone(), emb.weight.detach().clone()]  # type: ignore[union-attr]
    with pytest.raises(TypeError, match=r"dense|sparse|layout"):
        call(params)
    after = [dense.grad, emb.weight.grad.to_dense(), emb.weight.detach()]
    assert all(torch.equal(a, b) for a, b in zip(before, after))  # type: ignore[arg-type]


@pytest.mark.parametrize(("label", "call"), CALLS, ids=CALL_IDS)
def test_mixed_device_types_give_a_clear_error_and_change_nothing(label: str, call: Any) -> None:
    cpu = _param(torch.ones(3), torch.full((3,), 5.0))
    meta = _param(torch.ones(3, device="meta"), torch.ones(3, device="meta"))
    before = cpu.grad.clone()  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="device"):
        call([cpu, meta])
    assert torch.equal(cpu.grad, before)  # type: ignore[arg-type]


@pytest.mark.parametrize(("label", "call"), CALLS, ids=CALL_IDS)
def test_integer_gradients_and_non_tensors_give_a_clear_error(label: str, call: Any) -> None:
    good = _param(torch.ones(3), torch.full((3,), 5.0))
    with pytest.raises(TypeError, match=r"parameters|tensors|tensor"):
        call([good, "not a tensor"])
    assert torch.equal(good.grad, torch.full((3,), 5.0))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("label", "call"), [c for c in CALLS if c[0] != "ContiguousGrads"], ids=CALL_IDS[:-1]
)
def test_frozen_parameters_are_ignored(label: str, call: Any) -> None:
    """Frozen parameters (no gradient) change neither the result nor themselves."""
    torch.manual_seed(0)
    a = _param(torch.randn(4, 3), torch.randn(4, 3) * 10)
    b = _param(torch.randn(3), torch.randn(3) * 10)
    frozen = nn.Parameter(torch.randn(4, 3), requires_grad=False)
    assert a.grad is not None and b.grad is not None
    ref_a = _param(a.detach().clone(), a.grad.clone())
    ref_b = _param(b.detach().clone(), b.grad.clone())
    got = call([a, frozen, b])
    want = call([ref_a, ref_b])
    assert torch.equal(a.grad, ref_a.grad) and torch.equal(b.grad, ref_b.grad)  # type: ignore[arg-type]
    assert frozen.grad is None
    if isinstance(got, torch.Tensor):
        assert torch.equal(got, want)


@pytest.mark.parametrize(
    ("label", "call"), [c for c in CALLS if c[0] != "ContiguousGrads"], ids=CALL_IDS[:-1]
)
def test_empty_inputs_give_the_documented_result(label: str, call: Any) -> None:
    """No parameters at all: a zero norm / zero count, as torch does; nothing raises."""
    got = call([])
    if isinstance(got, torch.Tensor):
        assert float(got) == 0.0
    elif isinstance(got, gradguard.GradNorms):
        assert got.per_tensor == [] and float(got.total) == 0.0 and bool(got.finite)


def test_empty_model_and_exhausted_generator() -> None:
    empty = nn.Sequential()
    assert float(gradguard.clip_grad_norm_(list(empty.parameters()), 1.0)) == 0.0
    assert int(gradguard.agc_(empty)) == 0
    # Documented: an empty *generator* is refused (usually one consumed by an earlier call).
    with pytest.raises(ValueError, match="empty generator"):
        gradguard.clip_grad_norm_(empty.parameters(), 1.0)
    with pytest.raises(ValueError, match="parameters"):
        gradguard.ContiguousGrads(empty.parameters())
    m = tiny_model()
    gen = m.parameters()
    gradguard.clip_grad_norm_(gen, 1.0)
    with pytest.raises(ValueError, match="generator"):
        gradguard.clip_grad_norm_(gen, 1.0)
    with pytest.raises(TypeError, match="Module"):
        gradguard.clip_grad_norm_(m, 1.0)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "dtypes", [(torch.float32, torch.float64), (torch.bfloat16, torch.float16, torch.float32)]
)
def test_mixed_dtypes_are_measured_in_fp32_or_better(dtypes: tuple[torch.dtype, ...]) -> None:
    torch.manual_seed(0)
    grads = [torch.randn(50, dtype=torch.float64) * 100 for _ in dtypes]
    params = [_param(torch.zeros(50, dtype=d), g.to(d)) for d, g in zip(dtypes, grads)]
    exact = torch.linalg.vector_norm(torch.cat([p.grad.double() for p in params]))  # type: ignore[union-attr]
    total = gradguard.clip_grad_norm_(params, 1.0)
    assert total.dtype in (torch.float32, torch.float64)
    assert float(total) == pytest.approx(float(exact), rel=1e-6)
    after = torch.linalg.vector_norm(torch.cat([p.grad.double() for p in params]))  # type: ignore[union-attr]
    assert float(after) == pytest.approx(1.0, rel=1e-2)  # bf16 storage rounds the result


def test_inf_norm_of_an_empty_gradient_is_zero_not_a_crash() -> None:
    """An empty tensor's inf-norm is 0 (|x| >= 0); torch's foreach kernel raises instead.

    Also what an FSDP2 rank whose shard of a small bias is empty sees (tests/test_distributed).
    """
    total = gradguard.grad_norms([torch.zeros(0), torch.tensor([1.0, -3.0])], math.inf).total
    assert float(total) == 3.0


# --- state: load_state_dict with garbage changes nothing ------------------------------------

STATEFUL: list[tuple[str, Callable[[], Any]]] = [
    ("FixedThreshold", lambda: policies.FixedThreshold(1.0)),
    ("QuantileClip", lambda: policies.QuantileClip(warmup=2, history=8)),
    ("ZScoreClip", lambda: policies.ZScoreClip(warmup=2)),
    ("MedianClip", lambda: policies.MedianClip(window=4)),
    ("AGCPolicy", lambda: policies.AGCPolicy()),
    ("SpikeDetector", lambda: detect.SpikeDetector("grad_norm", window=8, warmup=2)),
    ("DivergenceDetector", lambda: detect.DivergenceDetector(warmup=2)),
    ("RatioSpikeDetector", lambda: detect.RatioSpikeDetector(window=4)),
    ("VanishingDetector", lambda: detect.VanishingDetector()),
    ("Recorder", lambda: records.Recorder(flush_every=2)),
    ("SkipList", lambda: skiplist.SkipList()),
]


def _feed(obj: Any) -> None:
    """Give a stateful object some history so that 'unchanged' means something."""
    norms = gradguard.grad_norms([torch.tensor([3.0, 4.0]), torch.tensor([1.0])])
    ok = torch.tensor(True)
    if isinstance(obj, policies.ClipPolicy):
        for _ in range(3):
            obj.update(norms, norms.total, ok)
    elif isinstance(obj, detect.Detector):
        s = detect.Signals(0, norms.total, norms.per_tensor, ["a", "b"], norms.finite, None)
        for _ in range(3):
            obj.update(s, ok)
    elif isinstance(obj, records.Recorder):
        obj.log(0, loss=torch.tensor(1.0))
        obj.flush()
    elif isinstance(obj, skiplist.SkipList):
        obj.add(3, 5)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return bool(a == b) or (isinstance(a, float) and math.isnan(a) and math.isnan(b))


GARBAGE = st.one_of(
    st.none(),
    st.integers(),
    st.text(max_size=5),
    st.dictionaries(st.text(max_size=8), HOSTILE, max_size=4),
    st.just({}),
)


@pytest.mark.parametrize(("label", "make"), STATEFUL, ids=[s[0] for s in STATEFUL])
@FUZZ
@given(data=st.data())
def test_load_state_dict_with_garbage_raises_and_changes_nothing(
    label: str, make: Callable[[], Any], data: Any
) -> None:
    obj = make()
    _feed(obj)
    good = obj.state_dict()
    # Garbage: random values, or the real state with one entry replaced by a hostile value.
    if data.draw(st.booleans(), label="mutate") and isinstance(good, dict) and good:
        key = data.draw(st.sampled_from(sorted(good)), label="key")
        state = {**good, key: data.draw(HOSTILE, label="value")}
    else:
        state = data.draw(GARBAGE, label="state")
    tally("fuzz_state", label)
    try:
        obj.load_state_dict(state)
    except (ValueError, TypeError, KeyError):
        assert _same(obj.state_dict(), good), f"{label}: a failed load changed the state"
        return
    # Accepted: then it must round-trip like any state.
    again = make()
    again.load_state_dict(obj.state_dict())
    assert _same(again.state_dict(), obj.state_dict())


# --- the guard with hostile models -------------------------------------------------------------


def test_guard_rejects_wrong_types_and_guards_sparse_gradients() -> None:
    m = tiny_model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    for kwargs, arg in (
        ({"model": "m"}, "model"),
        ({"optimizer": [1]}, "optimizer"),
        ({"scheduler": 3}, "scheduler"),
        ({"scaler": "x"}, "scaler"),
        ({"config": {}}, "config"),
        ({"recorder": []}, "recorder"),
    ):
        args: dict[str, Any] = {"model": m, "optimizer": opt, **kwargs}
        with pytest.raises(TypeError, match=arg):
            Guard(**args)
    emb = nn.Sequential(nn.Embedding(10, 3, sparse=True), nn.Linear(3, 1))
    opt2 = torch.optim.SGD(emb.parameters(), lr=0.1)
    guard = Guard(emb, opt2, config=GuardConfig(detectors=[]))
    loss = emb(torch.tensor([1, 2])).sum()
    loss.backward()
    before = [p.detach().clone() for p in emb.parameters()]
    emb[0].weight.grad = emb[0].weight.grad * float("nan")  # type: ignore[operator]
    report = guard.step(loss)  # a sparse gradient is guarded like a dense one: skipped here
    assert report.skipped and report.signal == "nonfinite"
    assert all(torch.equal(a, p) for a, p in zip(before, emb.parameters()))
    assert guard.step_count == 1 and opt2.state == {}


def test_guard_with_frozen_layers_and_no_gradient_at_all() -> None:
    m = tiny_model()
    for p in m[0].parameters():  # type: ignore[index]
        p.requires_grad_(False)
        p.grad = None
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
    guard = Guard(m, opt, config=GuardConfig(detectors=[]))
    report = guard.step(torch.tensor(1.0))
    assert report.action in ("step", "clip")
    m.zero_grad(set_to_none=True)
    steps = guard.step_count
    with pytest.raises(ValueError, match=r"call loss\.backward"):  # a forgotten backward
        guard.step(torch.tensor(1.0))
    assert guard.step_count == steps and guard.stage.value == "ready"


# --- names in reports are escaped ------------------------------------------------------------

EVIL = "<script>alert(1)</script>"


def test_a_module_named_like_a_script_is_escaped_in_the_report(tmp_path: Path) -> None:
    m = nn.Sequential()
    m.add_module(EVIL, nn.Linear(3, 3))
    m.add_module("out", nn.Linear(3, 1))
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    guard = Guard(m, opt, config=GuardConfig(detectors=[], flush_every=1))
    for _ in range(3):
        loss = m(torch.randn(4, 3)).pow(2).mean()
        loss.backward()
        guard.step(loss)
        opt.zero_grad()
    rows = guard.records
    assert any(EVIL in str(r.get("layers", {})) for r in rows)  # the name did reach the records
    html = gradguard.report.render_html([*rows, {"v": 1, "kind": "meta", "step": 0, "name": EVIL}])
    assert EVIL not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html


def test_guard_with_parameters_on_mixed_device_types_fails_cleanly() -> None:
    """A CPU and a meta parameter (a missing .to()): a clear ValueError, nothing applied."""
    m = nn.Module()
    m.a = nn.Parameter(torch.ones(3))
    m.b = nn.Parameter(torch.ones(3, device="meta"))
    m.a.grad = torch.full((3,), 2.0)
    m.b.grad = torch.ones(3, device="meta")
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    guard = Guard(m, opt, config=GuardConfig(detectors=[]))
    with pytest.raises(ValueError, match="device"):
        guard.step(torch.tensor(1.0))
    assert torch.equal(m.a.detach(), torch.ones(3)) and torch.equal(m.a.grad, torch.full((3,), 2.0))
    assert guard.step_count == 0 and guard.records == []


HOSTILE_NAME = '<script>alert(1)</script>,"q"\nx\t;y'


@pytest.mark.parametrize("sink", ["jsonl", "csv"])
def test_hostile_names_round_trip_through_the_sinks(tmp_path: Path, sink: str) -> None:
    """A layer name with markup, quotes, a comma and a newline comes back exactly (no column or
    line injection); reports then escape it (test above)."""
    path = tmp_path / f"rows.{sink}"
    out = sinks.JsonlSink(path) if sink == "jsonl" else sinks.CsvSink(path)
    rec = records.Recorder([out], flush_every=1)
    rec.log(0, loss=torch.tensor(0.5), layers={HOSTILE_NAME: torch.tensor(1.5), "b": 2.0})
    rec.event(1, "action", action="skip", reason=HOSTILE_NAME)
    rec.close()
    rows = sinks.read_jsonl(path) if sink == "jsonl" else sinks.read_csv(path)
    assert rows[0]["layers"][HOSTILE_NAME] == 1.5 and rows[0]["loss"] == 0.5
    assert rows[1]["reason"] == HOSTILE_NAME
