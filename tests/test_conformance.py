"""Every policy and detector through the shared conformance checks (tests/conformance.py)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from gradguard.core.norms import grad_norms
from gradguard.decide.detect import (
    Detector,
    DivergenceDetector,
    NonFiniteDetector,
    RatioSpikeDetector,
    SpikeDetector,
    UpdateRatioDetector,
    VanishingDetector,
)
from gradguard.decide.policies import (
    AGCPolicy,
    ClipPolicy,
    EMARatioClip,
    FixedThreshold,
    MedianClip,
    QuantileClip,
    ZScoreClip,
)
from tests import conformance as C

POLICIES: dict[str, Callable[[], ClipPolicy]] = {
    "fixed": lambda: FixedThreshold(1.5),
    "quantile": lambda: QuantileClip(quantile=0.5, history=16, warmup=5),
    "quantile-clipped-capped": lambda: QuantileClip(
        quantile=0.9, history=16, warmup=5, max_norm=3.0, feed="clipped"
    ),
    "zclip-adaptive": lambda: ZScoreClip(warmup=5),
    "zclip-zscore": lambda: ZScoreClip(warmup=5, mode="zscore", max_norm=4.0),
    "zclip-mean": lambda: ZScoreClip(alpha=0.9, warmup=5, mode="mean"),
    "ema-ratio": lambda: EMARatioClip(warmup=5, max_norm=2.0),
    "ema-ratio-nowarm": lambda: EMARatioClip(ratio=1.2, beta=0.9, warmup=0, max_norm=None),
    "agc": lambda: AGCPolicy(0.02),
    "median": lambda: MedianClip(),
    "median-short": lambda: MedianClip(factor=1.5, window=3),
}

SPIKES = {25: 40.0, 26: 3.0, 33: 80.0}
BAD = {8: float("nan"), 20: float("inf"), 27: float("nan")}


@pytest.mark.parametrize("name", POLICIES)
def test_policy_roundtrip(name: str) -> None:
    seq = C.norm_sequence(45, spikes=SPIKES)
    for split in (0, 3, 22):  # fresh, inside and after warm-up
        C.check_policy_roundtrip(POLICIES[name], seq, split)


@pytest.mark.parametrize("name", POLICIES)
def test_policy_nan_immunity(name: str) -> None:
    seq = C.norm_sequence(45, spikes=SPIKES, bad=BAD)
    C.check_policy_nan_immunity(POLICIES[name], seq, set(BAD))


@pytest.mark.parametrize("device", C.devices(), ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", POLICIES)
def test_policy_dtype_device(name: str, dtype: torch.dtype, device: torch.device) -> None:
    C.check_policy_dtype_device(POLICIES[name], dtype, device)


@pytest.mark.parametrize("name", POLICIES)
def test_policy_no_host_sync(name: str) -> None:
    C.check_policy_no_host_sync(POLICIES[name], C.norm_sequence(30, spikes=SPIKES, bad=BAD))


def test_agc_policy_clip_no_host_sync() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    model(torch.randn(3, 4)).square().sum().backward()
    before = [p.grad.clone() for p in model.parameters()]  # type: ignore[union-attr]
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    norms = grad_norms(grads)
    with C.no_host_sync():
        clipped = AGCPolicy(1e-3).clip_(grads, norms, model)
    # lambda = 1e-3 clips every unit of these random gradients: the call must have acted.
    assert bool(clipped.clipped)
    assert any(not torch.equal(b, p.grad) for b, p in zip(before, model.parameters()))


# ----------------------------------------------------------------------------------- detectors


def _ratio_hook(det: Detector, step: int) -> None:
    """Moves a private weight by an amount that depends on the step only (a jump at step 30)."""
    assert isinstance(det, UpdateRatioDetector)
    g = torch.Generator().manual_seed(1)
    w = torch.randn(4, 4, generator=g)
    det.before([w])
    w.mul_(1.5 if step == 30 else 1.0 + 1e-3 * (1 + step % 3))
    det.after([w])


DETECTORS: dict[str, tuple[Callable[[], Detector], C.StepHook | None]] = {
    "nonfinite": (NonFiniteDetector, None),
    "spike-loss": (lambda: SpikeDetector("loss", window=16, z=4.0), None),
    "spike-grad": (lambda: SpikeDetector("grad_norm", window=16, warmup=4, log=False), None),
    "spike-bootstrap": (lambda: SpikeDetector("loss", window=32, z=4.0, bootstrap=3.0), None),
    "spike-bootstrap-linear": (
        lambda: SpikeDetector("grad_norm", window=64, bootstrap=3.0, log=False),
        None,
    ),
    # A low ratio and a short cool-down, so that the planted loss spike makes it fire.
    "divergence": (lambda: DivergenceDetector(ratio=1.05, warmup=3, cooldown=2, noise=0.0), None),
    "ratio-spike": (lambda: RatioSpikeDetector(ratio=3.0, window=16), None),
    "ratio-spike-patient": (lambda: RatioSpikeDetector(ratio=1.5, window=4, patience=2), None),
    "vanishing": (lambda: VanishingDetector(floor=1e-2, patience=3), None),
    "update-ratio": (lambda: UpdateRatioDetector(max_ratio=0.1), _ratio_hook),
}


def _signals(**kw: object) -> list:
    return C.signal_sequence(
        50,
        loss_spikes={30: 10.0},
        norm_spikes={36: 50.0},
        tiny={"c.weight": 1e-4},
        **kw,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize("name", DETECTORS)
def test_detector_roundtrip(name: str) -> None:
    factory, hook = DETECTORS[name]
    seq = _signals()
    for split in (0, 2, 25):
        C.check_detector_roundtrip(factory, seq, split, hook)


@pytest.mark.parametrize("name", DETECTORS)
def test_detector_nan_immunity(name: str) -> None:
    factory, hook = DETECTORS[name]
    seq = _signals(bad_loss={12: float("nan"), 40: float("inf")}, bad_grad={20: float("nan")})
    C.check_detector_nan_immunity(factory, seq, {12, 20, 40}, hook)


@pytest.mark.parametrize("device", C.devices(), ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", DETECTORS)
def test_detector_dtype_device(name: str, dtype: torch.dtype, device: torch.device) -> None:
    factory, hook = DETECTORS[name]
    C.check_detector_dtype_device(factory, dtype, device, hook)


@pytest.mark.parametrize("name", DETECTORS)
def test_detector_no_host_sync(name: str) -> None:
    factory, hook = DETECTORS[name]
    C.check_detector_no_host_sync(factory, _signals(bad_loss={12: float("nan")}), hook)


# ------------------------------------------------------------------------- the guard itself


def test_no_host_sync_catches_every_host_read() -> None:
    t = torch.tensor([1.5])
    reads = [
        lambda: t.item(),
        lambda: t.tolist(),
        lambda: t.numpy(),
        lambda: bool(t),
        lambda: float(t),
        lambda: int(t),
        lambda: complex(t),
    ]
    with C.no_host_sync():
        for read in reads:
            with pytest.raises(C.HostSyncError):
                read()
        # Device-side work is untouched.
        assert isinstance(torch.where(t > 1, t, 0.0), torch.Tensor)
    # Everything is restored afterwards.
    assert t.item() == 1.5 and bool(t) and float(t) == 1.5 and t.tolist() == [1.5]


def test_no_host_sync_restores_after_an_error() -> None:
    with pytest.raises(ZeroDivisionError), C.no_host_sync():
        raise ZeroDivisionError
    assert torch.tensor(2.0).item() == 2.0


# ----------------------------------------------------------- the checks themselves can fail


class _BranchyPolicy(FixedThreshold):
    """Branches on a device value: what the no-host-sync check must catch."""

    def threshold(self, norms):  # type: ignore[no-untyped-def]
        if norms.total > 100:
            return norms.total / 2
        return super().threshold(norms)


class _NaiveEMA(ClipPolicy):
    """An EMA of the raw norm with a state_dict that forgets the EMA (two peer bugs)."""

    def __init__(self) -> None:
        self.mean = torch.tensor(1.0)

    def threshold(self, norms):  # type: ignore[no-untyped-def]
        return 3 * self.mean

    def update(self, norms, clipped, accepted):  # type: ignore[no-untyped-def]
        self.mean = 0.9 * self.mean + 0.1 * norms.total

    def state_dict(self):  # type: ignore[no-untyped-def]
        return {}


def test_conformance_checks_catch_broken_policies() -> None:
    seq = C.norm_sequence(30, bad=BAD)
    with pytest.raises(C.HostSyncError):
        C.check_policy_no_host_sync(_BranchyPolicy, seq)
    with pytest.raises(AssertionError):
        C.check_policy_nan_immunity(_NaiveEMA, seq, set(BAD))
    with pytest.raises(AssertionError):
        C.check_policy_roundtrip(_NaiveEMA, C.norm_sequence(30), 10)


@pytest.mark.parametrize("name", POLICIES)
def test_policy_bad_state_changes_nothing(name: str) -> None:
    policy = POLICIES[name]()
    C.drive_policy(policy, C.norm_sequence(12, spikes=SPIKES))
    C.check_bad_state_changes_nothing(policy, POLICIES[name])


@pytest.mark.parametrize("name", DETECTORS)
def test_detector_bad_state_changes_nothing(name: str) -> None:
    factory, hook = DETECTORS[name]
    det = factory()
    C.drive_detector(det, _signals()[:20], hook=hook)
    C.check_bad_state_changes_nothing(det, factory)
