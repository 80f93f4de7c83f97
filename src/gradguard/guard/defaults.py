"""DEFAULTS: what ``Guard(model, optimizer)`` measures, clips and detects when told nothing.

The defaults are the product: most users write ``Guard(model, optimizer)`` and nothing else,
and the Lightning and Hugging Face adapters build the same. They live here, once, so that the
guard, the adapters, the docs and the benchmarks all name the same objects (docs/guard.md,
"What the defaults do").
"""

from __future__ import annotations

from gradguard.decide.detect import Detector, DivergenceDetector, SpikeDetector
from gradguard.decide.policies import ClipPolicy, ZScoreClip

__all__ = ["default_detectors", "default_policy"]


def default_policy() -> ClipPolicy:
    """A fresh instance of the default clipping policy."""
    return ZScoreClip(max_norm=1.0)


def default_detectors() -> list[Detector]:
    """Fresh instances of the default detectors (the non-finite rule is built into the guard)."""
    return [SpikeDetector("loss", bootstrap=10.0), DivergenceDetector()]
