"""INSIGHT: understand a model and an incident, apart from the training loop.

Per-layer statistics and the first non-finite value (:mod:`~gradguard.insight.probe`,
:mod:`~gradguard.insight.trace`), transformer telemetry (:mod:`~gradguard.insight.telemetry`),
a preflight diagnosis that tries each remedy on a copy (:mod:`~gradguard.insight.diagnose`,
:mod:`~gradguard.insight.remedies`, :mod:`~gradguard.insight.transformer_remedies`) and the
replay of an incident bundle (:mod:`~gradguard.insight.replay`).
"""
