"""The stability benchmark's methods: gradguard configurations and every peer, one interface.

A method turns ``(model, problem)`` into a :class:`Stepper`, which replaces ``optimizer.step()``
in the training loop and says what it did (``"step"``, ``"clip"``, ``"skip"``, ``"backoff"``,
``"rollback"``).
Adding a method is one entry in :data:`METHODS`; a gradguard configuration is one
:func:`guard_method` line::

    METHODS["gradguard-mine"] = guard_method(
        "my config", lambda: GuardConfig(policy=FixedThreshold(2.0), detectors=[])
    )

Peers are the real packages where they install beside torch (pinned in the ``peers`` extra):
zclip 1.0.0, autoclip 0.2.1, pytorch-optimizer 4.1.0. Two are re-implemented, cited, because
their packages do not install cleanly beside this torch: timm's AGC (timm pins a torchvision
that pulls another torch) and OLMo-core's skip-step rule (ai2-olmo-core pulls cloud SDKs and
downgrades rich).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from gradguard.app.lab._scenarios import Problem

STEP, CLIP, SKIP, BACKOFF, ROLLBACK = "step", "clip", "skip", "backoff", "rollback"


class Stopped(Exception):
    """The method stopped the run (gradguard's abort, or a peer that raised)."""


class Stepper(Protocol):
    """Replaces ``optimizer.step()`` (and ``scheduler.step()``) in the training loop."""

    @property
    def position(self) -> int:
        """The data position of the next batch (a rollback moves it back)."""
        ...

    def step(self, loss: Tensor) -> str:
        """Apply (or not) this step's update; return the action taken."""
        ...


@dataclass(frozen=True)
class Method:
    """One benchmarked method.

    Attributes:
        label: what it is, in words (shown in the tables).
        build: ``(model, problem) -> Stepper``.
        replaces_optimizer: an Adam-type optimizer of its own; runs only where the scenario's
            optimizer is Adam or AdamW (its clip counts are internal, so not reported).
        family: ``"gradguard"``, ``"peer"``, ``"baseline"`` or ``"grid"`` (a clip threshold of
            the tuning grid, in the scenario's units).
    """

    label: str
    build: Callable[[nn.Module, Problem], Stepper]
    replaces_optimizer: bool = False
    family: str = "peer"


def _params(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


class _Plain:
    """Optimizer + scheduler, with an optional in-place gradient transform before the step."""

    def __init__(
        self,
        model: nn.Module,
        problem: Problem,
        transform: Callable[[], bool] | None = None,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> None:
        self.params = _params(model)
        self.optimizer = optimizer or problem.make_optimizer(self.params)
        self.scheduler = problem.make_scheduler(self.optimizer)
        self.transform = transform
        self.position = 0

    def step(self, loss: Tensor) -> str:
        clipped = self.transform() if self.transform is not None else False
        self.optimizer.step()
        self.scheduler.step()
        self.position += 1
        return CLIP if clipped else STEP


def none_method() -> Method:
    return Method("no clipping", lambda m, p: _Plain(m, p), family="baseline")


def torch_clip(max_norm: float, *, in_units: bool = False) -> Method:
    """``torch.nn.utils.clip_grad_norm_(params, max_norm)`` before every step.

    ``in_units``: the threshold is ``max_norm`` times the scenario's units
    (:attr:`Problem.units`), as a user who tuned it in the units of their own loss would set it:
    the tuning grid. Otherwise it is ``max_norm`` whatever the loss's scale (a constant a user
    copied, as ``clip_grad_norm_(params, 1.0)`` and Hugging Face's ``max_grad_norm=1.0`` are).
    """

    def build(model: nn.Module, problem: Problem) -> Stepper:
        params = _params(model)
        limit = max_norm * problem.units if in_units else max_norm

        def clip() -> bool:
            total = torch.nn.utils.clip_grad_norm_(params, limit)
            return bool(total > limit)

        return _Plain(model, problem, clip)

    if in_units:
        label = f"torch clip_grad_norm_({max_norm:g} x units), a point of the tuning grid"
        return Method(label, build, family="grid")
    return Method(f"torch clip_grad_norm_({max_norm:g})", build, family="baseline")


def _norm(params: list[nn.Parameter]) -> Tensor:
    grads = [p.grad for p in params if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())


def _clipped(params: list[nn.Parameter], before: Tensor) -> bool:
    """Whether a peer shrank the gradients (it does not say so itself)."""
    after = _norm(params)
    return bool(torch.isfinite(before) & (after < before * (1 - 1e-4)))


def zclip_method(**kwargs: Any) -> Method:
    """zclip 1.0.0's ``ZClip`` with the package defaults (which include ``max_grad_norm=1.0``).

    ZClip, Kumar et al. 2025, arXiv 2504.02507: EMA z-score of the gradient norm.
    """

    def build(model: nn.Module, problem: Problem) -> Stepper:
        from zclip import ZClip

        zc = ZClip(**kwargs)
        params = _params(model)

        def clip() -> bool:
            before = _norm(params)
            zc.step(model)
            return _clipped(params, before)

        return _Plain(model, problem, clip)

    extra = ", ".join(f"{k}={v}" for k, v in kwargs.items())
    return Method(f"zclip 1.0.0 ZClip({extra})", build)


def autoclip_method(quantile: float = 0.9, history_length: int = 1000) -> Method:
    """autoclip 0.2.1's ``QuantileClip`` (per parameter, the package default).

    AutoClip, Seetharaman et al. 2020, arXiv 2007.14469: clip to a percentile of past norms.
    """

    def build(model: nn.Module, problem: Problem) -> Stepper:
        from autoclip.torch import QuantileClip

        params = _params(model)
        qc = QuantileClip(iter(params), quantile=quantile, history_length=history_length)

        def clip() -> bool:
            before = _norm(params)
            qc.step()
            return _clipped(params, before)

        return _Plain(model, problem, clip)

    return Method(f"autoclip 0.2.1 QuantileClip({quantile:g})", build)


def pytorch_optimizer_method(name: str) -> Method:
    """pytorch-optimizer 4.1.0's ``AdaGC``, ``SPAM`` or ``StableSPAM`` in place of AdamW.

    AdaGC: Wang et al. 2025, arXiv 2502.11034; SPAM: Huang et al. 2025, arXiv 2501.06842;
    Stable-SPAM: Huang et al. 2025, arXiv 2502.17055. Built with the scenario's lr, betas and
    weight decay, their other arguments at the package's defaults.
    """

    def build(model: nn.Module, problem: Problem) -> Stepper:
        import pytorch_optimizer

        cls = getattr(pytorch_optimizer, name)
        opt = cls(
            _params(model), lr=problem.lr, betas=problem.betas,
            weight_decay=problem.weight_decay,
        )  # fmt: skip
        return _Plain(model, problem, optimizer=opt)

    return Method(f"pytorch-optimizer 4.1.0 {name}", build, replaces_optimizer=True)


def timm_agc_(params: list[nn.Parameter], clip_factor: float = 0.01, eps: float = 1e-3) -> bool:
    """timm's ``adaptive_clip_grad`` re-implemented (timm/utils/agc.py, Brock et al. 2021).

    Per unit (row of a weight, the whole of a bias): ``g <- g * min(1, clip_factor *
    max(||w||, eps) / ||g||)``, on every parameter (timm leaves excluding the classifier to the
    caller). Returns whether any unit was clipped.
    """
    any_clipped = False
    for p in params:
        if p.grad is None:
            continue
        w, g = p.detach(), p.grad.detach()
        dims = tuple(range(1, w.ndim)) if w.ndim > 1 else None
        w_norm = w.norm(dim=dims, keepdim=True) if dims else w.norm()
        g_norm = g.norm(dim=dims, keepdim=True) if dims else g.norm()
        max_norm = w_norm.clamp(min=eps).mul(clip_factor)
        clipped = g * (max_norm / g_norm.clamp(min=1e-6))
        over = g_norm >= max_norm
        any_clipped |= bool(over.any())
        g.copy_(torch.where(over, clipped, g))
    return any_clipped


def timm_agc_method(clip_factor: float = 0.01) -> Method:
    def build(model: nn.Module, problem: Problem) -> Stepper:
        params = _params(model)
        return _Plain(model, problem, lambda: timm_agc_(params, clip_factor))

    return Method(f"timm-style AGC({clip_factor:g}) (re-implemented)", build)


class OlmoSkipStep:
    """OLMo-core's skip-step rule, re-implemented around the scenario's optimizer.

    From ``olmo_core/optim/skip_step_optimizer.py`` (``SkipStepOptimizer.get_step_factor``):
    keep the last 128 (+1) losses and gradient norms; once at least ``max(20, 128 // 2)`` losses
    are in, skip the step when ``|x - mean| / std > 6`` for the loss or the grad norm, mean and
    std over the earlier values in the window (a NaN z-score skips too). Every value enters the
    window, skipped or not, as in OLMo-core. A skip masks the whole update (moments, weight
    decay, step counter); the LR schedule follows the global step, as in OLMo-core's trainer.
    """

    def __init__(self, model: nn.Module, problem: Problem, window: int = 128, sigma: float = 6):
        self.inner = _Plain(model, problem)
        self.window, self.sigma = window, sigma
        self.losses: list[Tensor] = []
        self.norms: list[Tensor] = []
        self.position = 0

    def _push(self, values: list[Tensor], x: Tensor) -> None:
        values.append(x.detach().float().reshape(()))
        del values[: max(0, len(values) - self.window - 1)]

    def _ok(self, values: list[Tensor]) -> Tensor:
        std, mean = torch.std_mean(torch.stack(values[:-1]))
        return (values[-1] - mean).abs().div(std) <= self.sigma

    def step(self, loss: Tensor) -> str:
        self._push(self.losses, loss)
        self._push(self.norms, _norm(self.inner.params))
        self.position += 1
        if len(self.losses) >= max(20, self.window // 2) and not bool(
            self._ok(self.losses) & self._ok(self.norms)
        ):
            self.inner.scheduler.step()
            return SKIP
        self.inner.step(loss)
        return STEP


class GuardStepper:
    """``gradguard.Guard`` in the loop; its abort becomes :class:`Stopped`."""

    def __init__(self, model: nn.Module, problem: Problem, config: Any = None) -> None:
        from gradguard.guard.guard import Guard

        self.params = _params(model)
        self.optimizer = problem.make_optimizer(self.params)
        scheduler = problem.make_scheduler(self.optimizer)
        kw = {} if config is None else {"config": config}
        self.guard = Guard(model, self.optimizer, scheduler=scheduler, **kw)

    @property
    def position(self) -> int:
        return int(self.guard.position)

    def step(self, loss: Tensor) -> str:
        from gradguard.guard.response import GuardAbort

        try:
            report = self.guard.step(loss)
            action = str(report.action)
        except GuardAbort as e:
            raise Stopped(f"GuardAbort: {e}") from e
        if action in (ROLLBACK, BACKOFF, SKIP):
            return action
        total = getattr(report, "total_norm", None)
        threshold = getattr(report, "threshold", None)
        if isinstance(total, Tensor) and isinstance(threshold, Tensor):
            return CLIP if bool(torch.isfinite(total) & (total > threshold)) else STEP
        return STEP


def guard_method(label: str, config: Callable[[], Any] | None = None) -> Method:
    """A gradguard configuration: ``config()`` returns a fresh ``GuardConfig`` (``None``:
    ``Guard(model, optimizer)`` with every default, as they are when the benchmark runs)."""

    def build(model: nn.Module, problem: Problem) -> Stepper:
        return GuardStepper(model, problem, None if config is None else config())

    return Method(label, build, family="gradguard")


def _best_config() -> Any:
    """The lead's candidate: edit freely. Fixed clip at 1.0, skip non-finite steps only."""
    from gradguard.decide.policies import FixedThreshold
    from gradguard.guard.guard import GuardConfig

    return GuardConfig(policy=FixedThreshold(1.0), detectors=[], record_layers=False)


# The tuning grid: half-decades over four decades, in the scenario's own units. Its best point
# per scenario is the oracle a user reaches only after a sweep.
CLIP_GRID = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
FIXED_CLIPS = (0.25, 1.0, 4.0)  # absolute thresholds, whatever the units (clip-1: HF's default)


def _registry() -> dict[str, Method]:
    methods: dict[str, Method] = {"none": none_method()}
    for c in FIXED_CLIPS:
        methods[f"clip-{c:g}"] = torch_clip(c)
    for c in CLIP_GRID:
        methods[f"grid-{c:g}"] = torch_clip(c, in_units=True)
    methods.update(
        {
            "zclip": zclip_method(),
            "zclip-nocap": zclip_method(max_grad_norm=None),
            "autoclip": autoclip_method(),
            "adagc": pytorch_optimizer_method("AdaGC"),
            "spam": pytorch_optimizer_method("SPAM"),
            "stablespam": pytorch_optimizer_method("StableSPAM"),
            "olmo-skip": Method(
                "OLMo-core skip-step, 6 sigma over 128 steps (re-implemented)",
                lambda m, p: OlmoSkipStep(m, p),
            ),
            "agc": timm_agc_method(),
            "gradguard-defaults": guard_method("gradguard Guard(model, opt) defaults"),
            "gradguard-best": guard_method(
                "gradguard FixedThreshold(1.0) + skip non-finite", _best_config
            ),
        }
    )
    return methods


METHODS: dict[str, Method] = _registry()


PEERS = ("zclip", "autoclip", "adagc", "spam", "stablespam", "olmo-skip", "agc")


def default_methods(quick: bool) -> tuple[str, ...]:
    """The methods a benchmark run compares: no clipping, the tuning grid, torch's clip at 1.0,
    every peer and gradguard's defaults (``zclip-nocap``, ``gradguard-best`` and the other
    absolute clips are available, not default). The clean suite skips the grid."""
    return (
        "none", *(f"grid-{c:g}" for c in CLIP_GRID), "clip-1", *PEERS, "gradguard-defaults",
    )  # fmt: skip


def is_clip_grid(name: str) -> bool:
    """A point of the tuning grid (``grid-0.3``: 0.3 in the scenario's units)."""
    return name.startswith("grid-")


def clip_value(name: str) -> float:
    """The grid point's threshold in the scenario's own units (``nan`` for other methods)."""
    return float(name.removeprefix("grid-")) if is_clip_grid(name) else math.nan
