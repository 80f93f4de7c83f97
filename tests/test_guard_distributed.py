"""The guard on 2 real gloo processes: a NaN on one rank makes every rank skip (or roll back)
at the same step, parameters stay identical across ranks, and nothing hangs."""

from __future__ import annotations

import torch

from tests import _dist_guard as dg
from tests._dist_scale import launch


def test_every_rank_reaches_the_same_decision() -> None:
    results = launch(dg.guard_agreement, 2, timeout=240)
    for name in ("ddp-skip", "fsdp-skip", "ddp-rollback", "fsdp-rollback"):
        r0, r1 = results[0][name], results[1][name]
        assert r0["actions"] == r1["actions"], name
        for a, b in zip(r0["params"], r1["params"]):
            assert torch.equal(a, b), name
        assert all(torch.isfinite(p).all() for p in r0["params"]), name
        assert r0["skips"] == r1["skips"], name
    skip = results[0]["ddp-skip"]["actions"]
    assert "3:skip" in skip and "5:skip" in skip  # rank 1's NaN gradient, rank 0's NaN loss
    assert sum(a.endswith(":skip") for a in skip) == 2
    rb = results[0]["ddp-rollback"]
    assert "3:rollback" in rb["actions"] and "5:rollback" in rb["actions"]
    assert rb["skips"] == [[3, 3], [5, 5]]
    assert results[0]["fsdp-skip"]["actions"] == skip
