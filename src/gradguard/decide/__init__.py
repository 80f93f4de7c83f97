"""DECIDE: clipping policies and detectors, pure functions of a step's measurements.

A policy (:mod:`~gradguard.decide.policies`) turns norms into a threshold and learns from
accepted steps; a detector (:mod:`~gradguard.decide.detect`, and the transformer warnings of
:mod:`~gradguard.decide.attention`) turns a step's signals into a flag and a score. They keep
their state on the device and never read it on the host per step; they never import the guard,
the records or the probes.
"""
