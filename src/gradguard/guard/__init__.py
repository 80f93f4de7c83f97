"""GUARD: the stateful shell that measures, decides, responds and records once per step.

:mod:`~gradguard.guard.guard` holds the :class:`~gradguard.guard.guard.Guard` and its step;
:mod:`~gradguard.guard.response` the ladders, budgets and how each response is carried out;
:mod:`~gradguard.guard.skip` what a skipped step must leave as it was;
:mod:`~gradguard.guard.rollback` the bad windows a rollback skips; and
:mod:`~gradguard.guard.incident` the incident bundles it writes.
"""
