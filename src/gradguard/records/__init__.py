"""RECORDS: what a run wrote down, kept on the device until a flush, and where it goes.

:mod:`~gradguard.records.recorder` (rows, flushed every k steps), :mod:`~gradguard.records.sinks`
(JSONL, CSV, TensorBoard, W&B, MLflow, the console) and :mod:`~gradguard.records.bundle` (the
incident bundle format). Records know no guard and no detector: reports read them alone.
"""
