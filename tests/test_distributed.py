"""Distributed parity: real gloo processes (2 and 4 ranks) against a single-process reference.

Each launch has a timeout, so a hung collective fails the test instead of blocking CI.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

import gradguard
from tests import _dist_scale as ds

TOL: dict[str, Any] = {
    "rtol": 1e-10,
    "atol": 1e-12,
}  # fp64 models: only the summation order differs


def _reference(world: int, max_norm: float, norm_type: float) -> dict[str, object]:
    model = ds.make_model()
    x, y = ds.full_batch(0, world)
    ds.loss_fn(model, x, y).backward()
    grads = [p.grad for p in model.parameters()]
    per_tensor = [torch.linalg.vector_norm(g, norm_type) for g in grads]  # type: ignore[arg-type]
    total = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm, norm_type)
    return {
        "total": total,
        "per_tensor": per_tensor,
        "clipped": [p.grad.clone() for p in model.parameters()],  # type: ignore[union-attr]
    }


MAX_NORM = 0.05  # well below the measured norms, so clipping really scales
# group cases first: an FSDP case that fails stops its launch, and the rest then report it.
CASES = [
    ("group", 1.0),
    ("group", 2.0),
    ("group", 3.0),
    ("group", math.inf),
    ("ddp", 2.0),
    ("ddp", math.inf),
    ("fsdp", 1.0),
    ("fsdp", 2.0),
    ("fsdp", math.inf),
]


KINDS = ["ddp", "fsdp"]


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"{w}ranks")
def run(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[int, list[dict[str, Any]]]:
    """One launch per world size runs every case (process start-up is the cost)."""
    world = int(request.param)
    disk = str(tmp_path_factory.mktemp(f"snapshots{world}"))
    results = ds.launch(ds.everything, world, CASES, MAX_NORM, KINDS, disk, timeout=300)
    ds.tally("ranks", world, len(results))
    return world, results


def _case(results: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    out = []
    for rank, res in enumerate(results):
        if key not in res:
            pytest.fail(f"{key}: not reached on rank {rank}: an earlier case failed")
        if "error" in res[key]:
            pytest.fail(f"{key} rank {rank}: {res[key]['error']}")
        out.append(res[key])
    return out


@pytest.mark.parametrize(("kind", "norm_type"), [c for c in CASES if c[0] != "group"])
def test_norms_and_clipping_match_single_process(
    run: tuple[int, list[dict[str, Any]]], kind: str, norm_type: float
) -> None:
    """DDP and FSDP2: total and per-layer norms, and clipped gradients, equal one process."""
    world, results = run
    key = f"{kind}-{norm_type}"
    ref = _reference(world, MAX_NORM, norm_type)
    assert float(ref["total"]) > 4 * MAX_NORM  # type: ignore[arg-type]
    for rank, res in enumerate(_case(results, key)):
        where = f"{key} rank {rank}"
        assert res["grad_type"] == ("DTensor" if kind == "fsdp" else "Tensor")
        torch.testing.assert_close(res["total"], ref["total"], **TOL, msg=where)
        torch.testing.assert_close(res["returned"], ref["total"], **TOL, msg=where)
        for i, (got, want) in enumerate(zip(res["per_tensor"], ref["per_tensor"])):  # type: ignore[call-overload]
            torch.testing.assert_close(got, want, **TOL, msg=f"{where} layer {i}")
        for got, want in zip(res["clipped"], ref["clipped"]):  # type: ignore[call-overload]
            torch.testing.assert_close(got, want, **TOL, msg=where)
        clipped_total = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(g, norm_type) for g in res["clipped"]]),
            norm_type,
        )
        assert float(clipped_total) == pytest.approx(MAX_NORM, rel=1e-4)


@pytest.mark.parametrize("norm_type", [c[1] for c in CASES if c[0] == "group"])
def test_group_reduction_of_plain_shards(
    run: tuple[int, list[dict[str, Any]]], norm_type: float
) -> None:
    world, results = run
    g = torch.Generator().manual_seed(7)
    want = torch.linalg.vector_norm(
        torch.randn(world * 5, generator=g, dtype=torch.float64), norm_type
    )
    for res in _case(results, f"group-{norm_type}"):
        torch.testing.assert_close(res["total"], want, rtol=1e-12, atol=0)


def test_launcher_turns_a_hang_into_a_failure() -> None:
    with pytest.raises(TimeoutError, match="collective hung"):
        ds.launch(ds.hang_one_rank, 2, timeout=6)


def test_reference_gradients_are_what_ddp_averages() -> None:
    """Sanity of the reference itself: full-batch mean = mean of per-rank means."""
    world = 2
    model = ds.make_model()
    grads = []
    for r in range(world):
        model.zero_grad()
        ds.loss_fn(model, *ds.batch(0, r, world)).backward()
        grads.append([p.grad.clone() for p in model.parameters()])  # type: ignore[union-attr]
    model.zero_grad()
    ds.loss_fn(model, *ds.full_batch(0, world)).backward()
    for i, p in enumerate(model.parameters()):
        torch.testing.assert_close(p.grad, (grads[0][i] + grads[1][i]) / 2)
    assert (
        gradguard.get_total_norm([p.grad for p in model.parameters() if p.grad is not None]).dtype
        == torch.float64
    )


# --- the guard across ranks -------------------------------------------------------------------


def _same_on_every_rank(runs: list[dict[str, Any]], key: str) -> Any:
    first = runs[0][key]
    for rank, r in enumerate(runs[1:], 1):
        assert r[key] == first, f"rank {rank} {key} {r[key]} != rank 0 {first}"
    return first


def _params_equal_across_ranks(runs: list[dict[str, Any]]) -> None:
    for rank, r in enumerate(runs[1:], 1):
        for step, (mine, ref) in enumerate(zip(r["params"], runs[0]["params"])):
            for a, b in zip(mine, ref):
                assert torch.equal(a, b), f"rank {rank} drifted at step {step}"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("scenario", ["skip-loss", "skip-grad"])
def test_nan_on_one_rank_makes_every_rank_skip(
    run: tuple[int, list[dict[str, Any]]], kind: str, scenario: str
) -> None:
    """The poisoned step and rank are drawn at random (seeded); every rank must skip it."""
    _, results = run
    runs = _case(results, f"{kind}-{scenario}")
    actions = _same_on_every_rank(runs, "action")
    bad_index, _ = _same_on_every_rank(runs, "bad")
    assert actions[bad_index] == "skip"
    assert all(a in ("step", "clip") for i, a in enumerate(actions) if i != bad_index), actions
    _params_equal_across_ranks(runs)
    for r in runs:
        # Skip means skip: parameters bitwise unchanged and AdamW's step counter not advanced.
        for a, b in zip(r["params"][bad_index], r["params"][bad_index - 1]):
            assert torch.equal(a, b)
        assert set(r["opt_steps"]) == {float(len(actions) - 1)}
        assert r["finite"]


@pytest.mark.parametrize("where", ["memory", "disk"])
@pytest.mark.parametrize("kind", KINDS)
def test_rollback_restores_every_rank_to_the_same_step(
    run: tuple[int, list[dict[str, Any]]], kind: str, where: str
) -> None:
    """Snapshots on disk use one ``snapshot_dir`` for all ranks, as a user would write it:
    each rank must still restore its own state (its FSDP2 shards, its RNG)."""
    _, results = run
    runs = _case(results, f"{kind}-rollback" + ("-disk" if where == "disk" else ""))
    actions = _same_on_every_rank(runs, "action")
    steps = _same_on_every_rank(runs, "step")
    positions = _same_on_every_rank(runs, "position")
    _params_equal_across_ranks(runs)
    i = actions.index("rollback")
    assert positions[i] == 5  # the poisoned batch
    assert steps[i] == 4  # back to the snapshot taken after step 4
    for r in runs:
        # Restored bitwise: the parameters equal those right after step 4 (index 3).
        for a, b in zip(r["params"][i], r["params"][3]):
            assert torch.equal(a, b)
        assert r["finite"]
    # Replay from the snapshot's position; the bad batch is left out.
    assert positions[i + 1 :] == [4, 6]
    assert steps[i + 1 :] == [5, 6]
