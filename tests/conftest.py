"""Test-wide settings.

Hypothesis runs derandomized in ``make test`` (profile ``ci``, the default): the same examples on
every machine and every run, and no example database carried between runs, so a clone that once
found a failure does not fail differently from a fresh one. ``make fuzz`` selects the ``fuzz``
profile: random examples, many more of them, for finding new bugs (not for CI).
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "fuzz",
    derandomize=False,
    database=None,
    deadline=None,
    max_examples=500,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
