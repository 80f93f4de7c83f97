"""CORE: measure and act on gradients, and capture a run's state; it knows no guard.

Norms (:mod:`~gradguard.core.norms`), torch- and TF-compatible clipping
(:mod:`~gradguard.core.clip`), adaptive gradient clipping (:mod:`~gradguard.core.agc`), one flat
gradient buffer (:mod:`~gradguard.core.buffer`), snapshots and RNG states
(:mod:`~gradguard.core.snapshot`), what a model's batch looks like (:mod:`~gradguard.core.batch`)
and the plumbing they share: the foreach rule, argument checks, state validation, agreement
across ranks and the installed version.
"""
