"""Shared conformance checks for every clipping policy and detector (and, through
:func:`no_host_sync`, the guard).

Plain functions, so any test module can call them on any object that follows the contract in
``gradguard.decide.policies`` / ``gradguard.decide.detect``:

* state round-trip: ``state_dict()`` -> fresh object -> ``load_state_dict()`` (also through
  ``torch.save``/``torch.load(weights_only=True)``) continues with identical outputs;
* NaN/inf immunity: non-finite steps, accepted or not, leave the future exactly as if those
  steps had never been seen, and never produce a NaN threshold;
* dtype and device: outputs follow the input norms (fp32, bf16; CPU and any accelerator);
* no host sync on the hot path: :func:`no_host_sync` makes every Tensor -> host read raise.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from gradguard.core.clip import clip_coefficient
from gradguard.core.norms import GradNorms
from gradguard.decide.detect import Detection, Detector, Signals
from gradguard.decide.policies import ClipPolicy

# Tensor methods that copy a device value to the host (a sync on an accelerator).
HOST_READS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__complex__")


class HostSyncError(RuntimeError):
    """Raised by :func:`no_host_sync` when code reads a tensor's value on the host."""


@contextmanager
def no_host_sync() -> Iterator[None]:
    """Within the block, ``Tensor.item``, ``tolist``, ``numpy``, ``bool(t)``, ``float(t)``,
    ``int(t)`` and ``complex(t)`` raise :class:`HostSyncError`.

    On a CPU-only machine there is no real sync to catch; this catches the code that would
    cause one on an accelerator (``if t > x:``, ``.item()``). Where CUDA is present the block
    also runs under ``torch.cuda.set_sync_debug_mode("error")``.

    Example:
        >>> with no_host_sync():
        ...     policy.threshold(norms)      # fine
        ...     float(norms.total)           # HostSyncError
    """
    saved = {name: torch.Tensor.__dict__.get(name) for name in HOST_READS}

    def make(name: str) -> Callable[..., Any]:
        def refuse(self: Tensor, *args: Any, **kwargs: Any) -> Any:
            raise HostSyncError(f"Tensor.{name}() reads a device value on the host (a sync)")

        return refuse

    for name in HOST_READS:
        setattr(torch.Tensor, name, make(name))
    # On a GPU the driver catches what the patches miss (e.g. a sync inside a C++ op).
    cuda = torch.cuda.is_available()
    previous = torch.cuda.get_sync_debug_mode() if cuda else 0
    if cuda:
        torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        if cuda:
            torch.cuda.set_sync_debug_mode(previous)
        for name, original in saved.items():
            if original is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, original)


def devices() -> list[torch.device]:
    """The devices to run conformance on: the CPU, plus CUDA where present."""
    out = [torch.device("cpu")]
    if torch.cuda.is_available():
        out.append(torch.device("cuda"))
    return out


def same(a: Tensor, b: Tensor) -> bool:
    """Bitwise-equal values, NaN equal to NaN, same dtype and shape."""
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(
            torch.nan_to_num(a.detach().cpu().double(), nan=-12345.0),
            torch.nan_to_num(b.detach().cpu().double(), nan=-12345.0),
        )
        and bool((a.isnan().cpu() == b.isnan().cpu()).all())
    )


def roundtrip_bytes(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` through ``torch.save`` and ``torch.load(weights_only=True)``."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded: dict[str, Any] = torch.load(buf, weights_only=True)
    return loaded


# ----------------------------------------------------------------------------------- policies


def make_norms(per_tensor: Sequence[float], dtype: torch.dtype, device: torch.device) -> GradNorms:
    """A :class:`GradNorms` from per-tensor values (total = their 2-norm, as grad_norms does)."""
    per = [torch.tensor(v, dtype=dtype, device=device) for v in per_tensor]
    stacked = torch.stack(per)
    if dtype in (torch.float16, torch.bfloat16):
        stacked = stacked.float()
    total = torch.linalg.vector_norm(stacked).to(dtype)
    return GradNorms(per, total, total.isfinite())


def norm_sequence(
    steps: int,
    n_tensors: int = 3,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    spikes: dict[int, float] | None = None,
    bad: dict[int, float] | None = None,
) -> list[GradNorms]:
    """Log-normal per-tensor norms around 1, with ``spikes`` {step: factor} and ``bad``
    {step: nan or inf} written into the first tensor."""
    g = torch.Generator().manual_seed(seed)
    base = torch.linspace(0.5, 2.0, n_tensors, dtype=torch.float64)
    out = []
    for step in range(steps):
        noise = torch.exp(0.1 * torch.randn(n_tensors, generator=g, dtype=torch.float64))
        values = (base * noise).tolist()
        if spikes and step in spikes:
            values[0] *= spikes[step]
        if bad and step in bad:
            values[0] = bad[step]
        out.append(make_norms(values, dtype, torch.device(device)))
    return out


def simulate_clip(policy: ClipPolicy, norms: GradNorms) -> tuple[Any, Tensor | list[Tensor]]:
    """The threshold and the post-clip norm(s) a guard would feed back (``Clipped.learn`` of
    :meth:`ClipPolicy.clip_` on a finite step), without any gradients: the coefficient is
    :func:`gradguard.core.clip.clip_coefficient`, the one the clip uses."""
    limit = policy.threshold(norms)
    if isinstance(limit, Tensor):
        return limit, norms.total * clip_coefficient(limit, norms.total, "skip")
    clipped = [n * clip_coefficient(t, n, "skip") for n, t in zip(norms.per_tensor, limit)]
    return limit, clipped


def drive_policy(
    policy: ClipPolicy, seq: Sequence[GradNorms], accept_nonfinite: bool = False
) -> list[Tensor]:
    """Run ``threshold`` and ``update`` over ``seq``; returns each step's threshold(s) stacked.

    Steps with a non-finite total are fed with ``accepted=False`` (what the guard does), or
    with ``accepted=True`` when ``accept_nonfinite`` (the policy must then ignore them itself).
    """
    out = []
    for norms in seq:
        limit, clipped = simulate_clip(policy, norms)
        accepted = norms.finite | accept_nonfinite
        policy.update(norms, clipped, accepted)
        out.append(limit if isinstance(limit, Tensor) else torch.stack(limit))
    return out


def check_policy_roundtrip(
    factory: Callable[[], ClipPolicy], seq: Sequence[GradNorms], split: int
) -> None:
    """Resuming from ``state_dict`` (in memory and through torch.save) continues identically."""
    a = factory()
    drive_policy(a, seq[:split])
    state = a.state_dict()
    b, c = factory(), factory()
    b.load_state_dict(state)
    c.load_state_dict(roundtrip_bytes(state))
    ta, tb, tc = (drive_policy(p, seq[split:]) for p in (a, b, c))
    for i, (x, y, z) in enumerate(zip(ta, tb, tc)):
        assert same(x, y), f"{a!r}: step {split + i} differs after load_state_dict: {x} vs {y}"
        assert same(x, z), f"{a!r}: step {split + i} differs after torch.save/load: {x} vs {z}"
    # state_dict must not alias live state: mutating the object later leaves the dict alone.
    again = factory()
    again.load_state_dict(state)
    assert all(same(x, y) for x, y in zip(drive_policy(again, seq[split:]), ta))


def check_policy_nan_immunity(
    factory: Callable[[], ClipPolicy], seq: Sequence[GradNorms], bad_steps: set[int]
) -> None:
    """Non-finite steps (accepted or not) change nothing: the thresholds at the clean steps equal
    those of a run that never saw the bad ones, and no threshold is ever NaN."""
    clean = [n for i, n in enumerate(seq) if i not in bad_steps]
    reference = drive_policy(factory(), clean)
    for accept in (False, True):
        got = drive_policy(factory(), seq, accept_nonfinite=accept)
        for t in got:
            assert not bool(t.isnan().any()), f"{factory()!r}: NaN threshold {t}"
        kept = [t for i, t in enumerate(got) if i not in bad_steps]
        for j, (x, y) in enumerate(zip(kept, reference)):
            assert same(x, y), f"{factory()!r} (accepted={accept}): clean step {j}: {x} vs {y}"


def check_policy_dtype_device(
    factory: Callable[[], ClipPolicy], dtype: torch.dtype, device: torch.device
) -> None:
    """Thresholds have the norms' dtype and device; state lives on that device."""
    seq = norm_sequence(40, dtype=dtype, device=device, spikes={30: 50.0})
    policy = factory()
    for t in drive_policy(policy, seq):
        assert t.dtype == dtype, f"{policy!r}: threshold dtype {t.dtype}, norms {dtype}"
        assert t.device.type == device.type
        assert not bool(t.isnan().any())
    for k, v in _tensors(policy.state_dict()):
        assert v.device.type == device.type, f"{policy!r}: state {k} on {v.device}"


def check_policy_no_host_sync(factory: Callable[[], ClipPolicy], seq: Sequence[GradNorms]) -> None:
    """``threshold`` and ``update`` never read a device value on the host."""
    policy = factory()
    with no_host_sync():
        drive_policy(policy, seq)


def _tensors(tree: Any, prefix: str = "") -> Iterator[tuple[str, Tensor]]:
    if isinstance(tree, Tensor):
        yield prefix, tree
    elif isinstance(tree, dict):
        for k, v in tree.items():
            yield from _tensors(v, f"{prefix}.{k}")
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from _tensors(v, f"{prefix}[{i}]")


# ---------------------------------------------------------------------------------- detectors

StepHook = Callable[[Detector, int], None]


def signal_sequence(
    steps: int,
    names: Sequence[str] = ("a.weight", "b.weight", "c.weight", "d.weight"),
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    loss_spikes: dict[int, float] | None = None,
    norm_spikes: dict[int, float] | None = None,
    bad_loss: dict[int, float] | None = None,
    bad_grad: dict[int, float] | None = None,
    tiny: dict[str, float] | None = None,
) -> list[Signals]:
    """Signals with a slowly falling noisy loss and log-normal per-layer norms; spikes multiply,
    ``bad_*`` write NaN/inf, ``tiny`` {name: factor} scales one layer's norm at every step."""
    g = torch.Generator().manual_seed(seed)
    dev = torch.device(device)
    out = []
    for step in range(steps):
        noise = torch.exp(0.05 * torch.randn(len(names) + 1, generator=g, dtype=torch.float64))
        loss = 3.0 * math.exp(-step / 200) * float(noise[0])
        per = noise[1:].tolist()
        for i, name in enumerate(names):
            per[i] *= (tiny or {}).get(name, 1.0)
        if norm_spikes and step in norm_spikes:
            per = [v * norm_spikes[step] for v in per]
        if loss_spikes and step in loss_spikes:
            loss *= loss_spikes[step]
        if bad_loss and step in bad_loss:
            loss = bad_loss[step]
        if bad_grad and step in bad_grad:
            per[0] = bad_grad[step]
        per_t = [torch.tensor(v, dtype=dtype, device=dev) for v in per]
        total = torch.linalg.vector_norm(torch.stack(per_t).float())
        out.append(
            Signals(
                step=step,
                total_norm=total,
                per_tensor=per_t,
                names=list(names),
                finite=total.isfinite(),
                loss=torch.tensor(loss, dtype=dtype, device=dev),
            )
        )
    return out


def _finite(s: Signals) -> Tensor:
    ok = s.finite & s.total_norm.isfinite()
    return ok if s.loss is None else ok & s.loss.isfinite()


def drive_detector(
    det: Detector,
    seq: Sequence[Signals],
    accept_nonfinite: bool = False,
    hook: StepHook | None = None,
) -> list[Detection]:
    """``check`` then ``update`` over ``seq``; a non-finite step is accepted only when
    ``accept_nonfinite`` (the detector must then ignore it itself); flagged steps are not
    accepted (the guard skips them). ``hook(det, step)`` runs before each check."""
    out = []
    for s in seq:
        if hook is not None:
            hook(det, s.step)
        d = det.check(s)
        accepted = (_finite(s) | accept_nonfinite) & ~d.flag
        det.update(s, accepted)
        out.append(d)
    return out


def _same_detections(a: list[Detection], b: list[Detection], what: str) -> None:
    for i, (x, y) in enumerate(zip(a, b)):
        assert same(x.flag, y.flag) and same(x.score, y.score), f"{what}: step {i}: {x} vs {y}"


def check_detector_roundtrip(
    factory: Callable[[], Detector],
    seq: Sequence[Signals],
    split: int,
    hook: StepHook | None = None,
) -> None:
    """Resuming from ``state_dict`` (also through torch.save) gives identical detections.
    ``hook`` must depend on the step number only (not on earlier calls)."""
    a = factory()
    drive_detector(a, seq[:split], hook=hook)
    state = a.state_dict()
    b, c = factory(), factory()
    b.load_state_dict(state)
    c.load_state_dict(roundtrip_bytes(state))
    da, db, dc = (drive_detector(d, seq[split:], hook=hook) for d in (a, b, c))
    _same_detections(da, db, f"{a!r} after load_state_dict")
    _same_detections(da, dc, f"{a!r} after torch.save/load")


def check_detector_nan_immunity(
    factory: Callable[[], Detector],
    seq: Sequence[Signals],
    bad_steps: set[int],
    hook: StepHook | None = None,
) -> None:
    """Non-finite steps change no statistics: detections at the clean steps equal those of a run
    that never saw the bad ones; the bad steps themselves never yield a NaN score."""
    clean = [s for s in seq if s.step not in bad_steps]
    reference = drive_detector(factory(), clean, hook=hook)
    for accept in (False, True):
        got = drive_detector(factory(), seq, accept_nonfinite=accept, hook=hook)
        for d in got:
            assert not bool(d.score.isnan()), f"{factory()!r}: NaN score"
        kept = [d for s, d in zip(seq, got) if s.step not in bad_steps]
        _same_detections(kept, reference, f"{factory()!r} (accepted={accept})")


def check_detector_dtype_device(
    factory: Callable[[], Detector],
    dtype: torch.dtype,
    device: torch.device,
    hook: StepHook | None = None,
) -> None:
    """Flags are 0-dim bool, scores 0-dim fp32, on the signals' device, for fp32/bf16 inputs."""
    seq = signal_sequence(80, dtype=dtype, device=device, loss_spikes={70: 20.0})
    det = factory()
    for d in drive_detector(det, seq, hook=hook):
        assert d.flag.dtype == torch.bool and d.flag.shape == ()
        assert d.score.dtype == torch.float32 and d.score.shape == ()
        assert d.flag.device.type == device.type and d.score.device.type == device.type
    for k, v in _tensors(det.state_dict()):
        assert v.device.type == device.type, f"{det!r}: state {k} on {v.device}"


def check_detector_no_host_sync(
    factory: Callable[[], Detector],
    seq: Sequence[Signals],
    hook: StepHook | None = None,
) -> None:
    """``check``, ``update`` (and the hook) never read a device value on the host."""
    det = factory()
    with no_host_sync():
        drive_detector(det, seq, hook=hook)


# ------------------------------------------------------------------------------- bad state

HOSTILE_VALUES: tuple[Any, ...] = (
    None,
    "x",
    -1,
    1.5,
    float("nan"),
    [],
    {},
    torch.zeros(7),
    torch.tensor(float("nan")),
    torch.tensor(-3, dtype=torch.int64),
)


def _state_equal(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor):
        return isinstance(b, Tensor) and same(a, b)
    if isinstance(a, dict):
        return (
            isinstance(b, dict)
            and a.keys() == b.keys()
            and all(_state_equal(a[k], b[k]) for k in a)
        )
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(_state_equal, a, b))
    return bool(a == b) or (isinstance(a, float) and math.isnan(a) and math.isnan(b))


def check_bad_state_changes_nothing(obj: Any, factory: Callable[[], Any]) -> None:
    """Every key of ``obj.state_dict()`` (and of a nested ``state`` dict) replaced by hostile
    values: ``load_state_dict`` either raises ValueError/TypeError leaving the state as it was,
    or accepts a state that then round-trips."""
    good = obj.state_dict()
    variants: list[Any] = [None, "garbage", {}, {"unknown": 1}]
    for key in good:
        variants += [{**good, key: v} for v in HOSTILE_VALUES]
        if isinstance(good[key], dict):
            for sub in good[key]:
                variants += [{**good, key: {**good[key], sub: v}} for v in HOSTILE_VALUES]
    for state in variants:
        try:
            obj.load_state_dict(state)
        except (ValueError, TypeError) as e:
            assert _state_equal(obj.state_dict(), good), f"{obj!r}: failed load changed state: {e}"
            continue
        again = factory()
        again.load_state_dict(obj.state_dict())
        assert _state_equal(again.state_dict(), obj.state_dict())
        obj.load_state_dict(good)
