"""The lab: small, seeded, CPU-sized experiments that anyone can re-run (``gradguard lab``).

Each experiment is a module with ``run(*, seeds, quick, out, ticker) -> LabResult``:

* ``chain``: a 20-layer one-neuron ReLU chain against its closed form;
* ``vectors``: element-wise products above and below 1, and rescaling by the norm;
* ``remedies``: a deep plain MLP that diverges, trained once per remedy;
* ``rnn``: a vanilla tanh RNN on the adding problem with and without clipping
  (Pascanu, Mikolov & Bengio 2013);
* ``spike``: a tiny transformer LM with injected poisoned batches, unguarded vs guarded.

Example:
    >>> from gradguard.app.lab import run_experiment
    >>> result = run_experiment("chain")
    >>> result.passed
    True
"""

from __future__ import annotations

import importlib
from pathlib import Path

from gradguard.app.lab._result import LabResult as LabResult
from gradguard.app.lab._result import NullTicker as NullTicker
from gradguard.app.lab._result import Ticker as Ticker

EXPERIMENTS: tuple[str, ...] = ("chain", "vectors", "remedies", "rnn", "spike")


def run_experiment(
    name: str,
    *,
    seeds: int | None = None,
    quick: bool = False,
    out: Path | None = None,
    ticker: Ticker | None = None,
) -> LabResult:
    """Run one experiment by name.

    Args:
        name: one of :data:`EXPERIMENTS`.
        seeds: seeds per setting (``None``: the experiment's default).
        quick: the reduced setting (minutes for the whole lab on 2 CPU cores).
        out: folder for figures and the result JSON; ``None`` writes nothing.
        ticker: progress callbacks.

    Returns:
        The experiment's :class:`LabResult`.
    """
    if name not in EXPERIMENTS:
        raise ValueError(f"experiment must be one of {', '.join(EXPERIMENTS)}, got {name!r}")
    if seeds is not None and (isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1):
        raise ValueError(f"seeds must be an int >= 1, got {seeds!r}")
    module = importlib.import_module(f"gradguard.app.lab.{name}")
    kwargs = {} if seeds is None else {"seeds": seeds}
    result: LabResult = module.run(quick=quick, out=out, ticker=ticker, **kwargs)
    if out is not None:
        result.save(out)
    return result
