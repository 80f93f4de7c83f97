"""Thin adapters that put :class:`gradguard.Guard` into the trainers people already use.

* :mod:`gradguard.integrations.lightning`: ``GuardCallback`` for ``lightning.Trainer``;
* :mod:`gradguard.integrations.transformers`: ``GuardCallback`` and ``GuardedTrainer`` for the
  Hugging Face ``transformers.Trainer``.

Each module imports its framework on import, so ``import gradguard`` never needs either. The
adapters hold wiring only (which framework hook calls which guard method, where the numbers are
logged, where the state is saved); every decision is the guard's.
"""
