"""Sharded norms on 2 real gloo processes against the single-process norm of the full tensors.

DTensor inputs (``distribute_tensor`` with ``Shard(0)`` over a 2-rank DeviceMesh) must give the
full norm as a plain tensor; ``group=`` must reduce norms of plain local shards (sum of p-th
powers, max for inf). One launch measures every case; a hang fails after its timeout.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import gradguard as gg
from tests import _dist_norms as dn


@pytest.fixture(scope="module")
def results() -> list[dict[str, Any]]:
    return dn.launch(world=2, timeout=900.0)  # a hang guard


@pytest.mark.parametrize("p", dn.NORM_TYPES)
def test_dtensor_inputs_give_the_full_norm(results, p):
    full = dn.full_tensors()
    expected_total = torch.nn.utils.get_total_norm(full, p).item()
    expected_per = [torch.linalg.vector_norm(t, p).item() for t in full]
    for rank, res in enumerate(results):
        assert res[f"dtensor-{p}-plain"], f"rank {rank}: total is still a DTensor"
        assert res[f"dtensor-{p}-total"] == pytest.approx(expected_total, rel=1e-12)
        assert res[f"dtensor-{p}-get_total_norm"] == pytest.approx(expected_total, rel=1e-12)
        assert res[f"dtensor-{p}-per"] == pytest.approx(expected_per, rel=1e-12)


@pytest.mark.parametrize("p", dn.NORM_TYPES)
def test_group_reduces_local_shards(results, p):
    full = dn.full_tensors()
    expected = torch.nn.utils.get_total_norm(full, p).item()
    for res in results:
        assert res[f"group-{p}-total"] == pytest.approx(expected, rel=1e-12)
    # Without the group each rank sees only its shard: a smaller norm, so the test can fail.
    assert results[0][f"local-{p}-total"] < expected or p == float("inf")


def test_clip_on_dtensor_parameters_scales_by_the_full_norm(results):
    full = dn.full_tensors()
    expected = [t.clone() for t in full]
    params = []
    for t in expected:
        param = torch.nn.Parameter(torch.zeros_like(t))
        param.grad = t
        params.append(param)
    total = gg.clip_grad_norm_(params, 1.0)
    for res in results:
        assert res["clip-total"] == pytest.approx(total.item(), rel=1e-12)
        for got, want in zip(res["clip-grads"], expected):
            torch.testing.assert_close(
                torch.tensor(got, dtype=want.dtype), want, rtol=1e-12, atol=1e-14
            )


def test_one_ranks_nan_reaches_every_ranks_flag(results):
    assert [res["group-nan-finite"] for res in results] == [False, False]


@pytest.mark.parametrize("p", dn.NORM_TYPES)
def test_a_rank_with_an_empty_shard_still_gets_the_full_norm(results, p):
    """torch's inf-norm raises on the empty shard; the norm of nothing is 0 on that rank."""
    full = dn.full_tensors(1, dn.UNEVEN_SHAPES)
    assert [res["uneven-empty-shard"] for res in results] == [[False] * 3, [True, False, True]]
    expected_total = torch.nn.utils.get_total_norm(full, p).item()
    expected_per = [torch.linalg.vector_norm(t, p).item() for t in full]
    for res in results:
        assert res[f"uneven-{p}-plain"]
        assert res[f"uneven-{p}-total"] == pytest.approx(expected_total, rel=1e-12)
        assert res[f"uneven-{p}-per"] == pytest.approx(expected_per, rel=1e-12)


def test_inf_norm_clipping_with_an_empty_shard_matches_one_process(results):
    full = dn.full_tensors(1, dn.UNEVEN_SHAPES)
    params = []
    for t in full:
        param = torch.nn.Parameter(torch.zeros_like(t))
        param.grad = t.clone()
        params.append(param)
    total = torch.nn.utils.clip_grad_norm_(params, 1.0, float("inf"))
    for res in results:
        assert res["uneven-clip-total"] == pytest.approx(total.item(), rel=1e-12)
        for got, param in zip(res["uneven-clip-grads"], params):
            torch.testing.assert_close(
                torch.tensor(got, dtype=torch.float64), param.grad, rtol=1e-12, atol=1e-14
            )
