"""The benchmark tools keep working: the GPU check on a machine without a GPU, the op counter's
attribution, the heap measurement and the page a partial run rewrites. No timing is asserted."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import bench_memory, bench_ops, run  # noqa: E402
from benchmarks.models import cases  # noqa: E402

GPU_CHECK = ROOT / "benchmarks" / "gpu_check.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the check runs")
def test_gpu_check_without_cuda_says_so_and_exits_0(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    done = subprocess.run(
        [sys.executable, str(GPU_CHECK), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,  # a hang guard, not a speed test
    )
    assert done.returncode == 0, done.stderr
    assert "CUDA not available" in done.stdout
    assert json.loads(out.read_text())["cuda"] is False


@pytest.mark.slow
def test_gpu_check_code_runs_end_to_end_on_the_cpu(tmp_path: Path) -> None:
    """The dry run goes through every check the GPU run makes, so a GPU's time is not spent
    on a broken script; on the CPU the skips are real (weights and moments unchanged)."""
    out = tmp_path / "gpu.json"
    done = subprocess.run(
        [sys.executable, str(GPU_CHECK), "--dry-run-cpu", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=900,  # a hang guard, not a speed test
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(out.read_text())
    assert report["failed"] == []
    assert set(report["variants"]) == {
        "fp32, fused AdamW",
        "fp32, AdamW",
        "bf16 autocast, fused AdamW",
        "fp16 + GradScaler, fused AdamW",
    }
    for variant in report["variants"].values():
        for skip in variant["syncs"]["skips"].values():
            assert skip["unchanged"] and "skip" in skip["recorded_actions"]
    assert all(v == "ok" for v in report["functions"].values())


def test_op_counter_charges_every_op_of_a_guarded_step_and_undoes_its_wrappers() -> None:
    case = next(c for c in cases() if c.key == "mlp64")
    model, opt, guard = case.build("guard")
    assert guard is not None
    step = case.step_fn("guard", model, opt, guard)
    step()
    modules = [m for n, m in sys.modules.items() if n.startswith(bench_ops.PACKAGES)]
    before = [dict(vars(m)) for m in modules]
    with bench_ops.OpCounter() as plain:
        for _ in range(3):
            step()
    counter = bench_ops.OpCounter()
    tools = bench_ops.Instrument(counter)
    tools.guard(guard)
    try:
        with counter:
            for _ in range(3):
                step()
    finally:
        tools.undo()
    # labels only move ops between components: the same steps, the same total
    assert sum(counter.counts.values()) == sum(plain.counts.values())
    charged = {bench_ops.component(k) for k in counter.counts}
    assert {"policy", "guard (own code)", bench_ops.OPTIMIZER, bench_ops.MODEL} <= charged
    # every wrapper is gone: instance attributes, module globals, optimizer hooks
    assert not any(isinstance(v, types.FunctionType) for v in vars(guard.policy).values())
    assert not any(callable(v) and k in dir(type(guard)) for k, v in vars(guard).items())
    assert [vars(m) for m in modules] == before
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks


def test_heap_growth_reports_the_recorders_window() -> None:
    from gradguard.records.recorder import Recorder

    r = bench_memory.heap_growth(60, Recorder(flush_every=10, window=20), marks=3)
    assert r["rows"] == 20  # the window's steps only, though 260 steps ran
    assert [s for s, _ in r["marks"]] == [20, 40, 60]


def test_a_partial_run_replaces_only_its_sections_of_the_page() -> None:
    earlier = run.page(
        {},
        {
            "machine": run.block("machine", "## Machine\n\nold machine"),
            "clip": run.block("clip", "## Clipping\n\nold clip"),
            "small": run.block("small", "## Small\n\nold small"),
            "gpu": run.block("gpu", "## GPU\n\nold gpu"),
        },
    )
    fresh = {
        "machine": run.block("machine", "## Machine\n\nnew machine"),
        "small": run.block("small", "## Small\n\nnew small"),
        "ops": run.block("ops", "## Ops\n\nnew ops"),
        "gpu": run.block("gpu", "## GPU\n\nnew gpu"),
    }
    doc = run.page(run.blocks(earlier), fresh)
    assert list(run.blocks(doc)) == ["machine", "clip", "small", "ops", "gpu"]
    assert "old clip" in doc and "new small" in doc and "old small" not in doc
    assert doc.count("# Benchmarks") == 1 and "new gpu" in doc and "old gpu" not in doc
