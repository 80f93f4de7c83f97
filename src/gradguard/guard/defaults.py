"""DEFAULTS: what ``Guard(model, optimizer)`` measures, clips and detects when told nothing.

The defaults are the product: most users write ``Guard(model, optimizer)`` and nothing else,
and the Lightning and Hugging Face adapters build the same. They live here, once, so that the
guard, the adapters, the docs and the benchmarks all name the same objects (docs/guard.md,
"What the defaults do").

Every default is a ratio of the run's own measurements, never a constant in the units of the
gradient or the loss: multiplying the loss by any power of two (SGD's learning rate divided by
it) gives bit-for-bit the same steps (tests/test_scale_free.py).
"""

from __future__ import annotations

from gradguard.decide.detect import Detector, DivergenceDetector, RatioSpikeDetector
from gradguard.decide.policies import ClipPolicy, MedianClip

__all__ = ["default_detectors", "default_policy"]


def default_policy() -> ClipPolicy:
    """A fresh instance of the default clipping policy: :class:`MedianClip`, twice the median of
    the run's last 16 accepted gradient norms (no constant in gradient units)."""
    return MedianClip(factor=2.0, window=16)


def default_detectors() -> list[Detector]:
    """Fresh instances of the default detectors (the non-finite rule is built into the guard):
    a loss 10 times above every recent one is skipped (:class:`RatioSpikeDetector`), a loss
    that climbs 1.2 times above its best, beyond its noise, backs the LR off
    (:class:`DivergenceDetector`). Both work on ratios of the loss: no unit."""
    return [RatioSpikeDetector(ratio=10.0, window=128, patience=1), DivergenceDetector()]
