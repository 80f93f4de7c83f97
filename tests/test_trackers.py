"""Weights & Biases and MLflow sinks, read back with each tracker's own storage and client.

Nothing leaves the machine: W&B runs offline (the run is a ``.wandb`` file of protobuf records,
read here with W&B's own protobuf classes), MLflow writes to a local sqlite store (read back
with ``MlflowClient``). The rows are the same rows the JSONL/CSV/TensorBoard tests use.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from gradguard.records.recorder import SCHEMA_VERSION, Recorder
from gradguard.records.sinks import JsonlSink, MlflowSink, WandbSink, metrics, read_jsonl
from tests._wandb import offline_env, wandb_history
from tests.test_records import same, sample_rows, write_all

wandb = pytest.importorskip("wandb")
mlflow = pytest.importorskip("mlflow")


@pytest.fixture
def wandb_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    offline_env(monkeypatch, tmp_path)
    return tmp_path


def _num(v: Any) -> float:
    """W&B writes NaN/inf as the JSON words NaN/Infinity; json.loads reads them back."""
    return float(v)


# MLflow 3.17's sqlite store queries with SQLAlchemy's ``noload``, which SQLAlchemy 2.1
# deprecates; the warning is MLflow's to fix and says nothing about gradguard.
mlflow_sqlalchemy = pytest.mark.filterwarnings(
    "ignore:The ``noload`` loader strategy is deprecated:sqlalchemy.exc.SADeprecationWarning"
)


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """MLflow's sqlite store puts artifacts under ./mlruns: keep them out of the checkout.

    And MLflow 3 sends usage telemetry unless told not to: nothing leaves the machine.
    """
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("DO_NOT_TRACK", "true")


def sql_store(value: float) -> float:
    """What MLflow's SQL stores keep: +-inf as the largest finite float, NaN as NaN."""
    return math.copysign(sys.float_info.max, value) if math.isinf(value) else value


def expected_metrics(rows: list[dict[str, Any]]) -> list[tuple[int, dict[str, float]]]:
    return [(r["step"], m) for r in rows if (m := metrics(r))]


def test_metric_names_are_the_tensorboard_tags() -> None:
    row = {"v": 1, "kind": "step", "step": 3, "grad_norm": 2.0, "clipped": True, "action": "skip"}
    row["layers"] = {"fc1": 0.5}
    assert metrics(row) == {
        "grad/total_norm": 2.0,
        "grad/clipped": 1.0,
        "layers/fc1/grad_norm": 0.5,
    }
    probe = {"v": 1, "kind": "probe", "step": 3, "event": "layers", "act_rms": {"fc1": 1.5}}
    assert metrics(probe) == {"layers/fc1/act_rms": 1.5}
    assert metrics({"v": 1, "kind": "action", "step": 3, "action": "skip"}) == {}


def test_wandb_offline_run_holds_the_same_rows(wandb_offline: Path) -> None:
    rows = sample_rows()
    sink = WandbSink(project="gradguard-test", mode="offline", dir=str(wandb_offline))
    run_dir = Path(sink.run.dir).parent  # .../wandb/offline-run-<time>-<id>
    write_all(sink, rows)  # closes the sink, which finishes the run it started
    history = wandb_history(run_dir)
    want = expected_metrics(rows)
    assert len(history) == len(want)
    for got, (step, values) in zip(history, want):
        assert got.pop(WandbSink.STEP_METRIC) == step
        assert got.keys() == values.keys()
        for key, value in values.items():
            assert same(_num(got[key]), value), (step, key)
    # events (the action row, the probe finding, the meta row) in the run's files, as JSONL
    events = read_jsonl(run_dir / "files" / WandbSink.EVENTS_FILE)
    assert same(events, [r for r in rows if r["kind"] in ("action", "probe", "meta")])
    with pytest.raises(ValueError, match="closed"):
        sink.write(rows[:1])


def test_wandb_sink_logs_to_a_run_it_is_given_and_leaves_it_open(wandb_offline: Path) -> None:
    run = wandb.init(project="gradguard-test", mode="offline", dir=str(wandb_offline))
    run_dir = Path(run.dir).parent
    rec = Recorder([WandbSink(run)], flush_every=2)
    # after a rollback the guard's step goes back: W&B's own step could not, guard/step can
    for step, loss in [(0, 1.0), (1, 0.5), (2, 0.25), (1, 0.75), (2, 0.125)]:
        rec.log(step, loss=torch.tensor(loss))
    rec.close()
    run.log({"after": 1.0})  # still open: the sink did not finish a run it did not start
    assert run.summary["after"] == 1.0
    run.finish()
    history = wandb_history(run_dir)
    assert [(h[WandbSink.STEP_METRIC], h["train/loss"]) for h in history[:5]] == [
        (0, 1.0),
        (1, 0.5),
        (2, 0.25),
        (1, 0.75),
        (2, 0.125),
    ]
    assert history[5]["after"] == 1.0
    with pytest.raises(TypeError, match="either a run"):
        WandbSink(run, project="x")
    with pytest.raises(TypeError, match="wandb run"):
        WandbSink(run_dir)


@mlflow_sqlalchemy
def test_mlflow_local_store_holds_the_same_rows(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    rows = sample_rows()
    sink = MlflowSink(tracking_uri=uri, experiment="gradguard-test", run_name="sample")
    write_all(sink, rows)
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(sink.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "sample"
    want: dict[str, list[tuple[int, float]]] = {}
    for step, values in expected_metrics(rows):
        for key, value in values.items():
            want.setdefault(key, []).append((step, value))
    assert set(run.data.metrics) == set(want)
    for key, points in want.items():
        got = sorted((m.step, m.value) for m in client.get_metric_history(sink.run_id, key))
        assert len(got) == len(points), key
        for (s1, v1), (s2, v2) in zip(got, sorted(points)):
            assert s1 == s2 and same(float(v1), sql_store(v2)), (key, s1)
    local = client.download_artifacts(sink.run_id, MlflowSink.EVENTS_ARTIFACT, str(tmp_path))
    events = read_jsonl(local)
    assert same(events, [r for r in rows if r["kind"] in ("action", "probe", "meta")])
    with pytest.raises(ValueError, match="closed"):
        sink.write(rows[:1])


@mlflow_sqlalchemy
def test_mlflow_sink_logs_to_an_existing_run_and_batches_large_flushes(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    run_id = client.create_run("0").info.run_id
    sink = MlflowSink(run_id, tracking_uri=uri)
    layers = {f"l{i}": float(i) for i in range(700)}  # 2 rows x 701 metrics: two batches
    sink.write(
        [{"v": SCHEMA_VERSION, "kind": "step", "step": s, "loss": 0.5, "layers": layers}
         for s in range(2)]
    )  # fmt: skip
    sink.close()
    assert client.get_run(run_id).info.status == "RUNNING"  # not ours to end
    history = client.get_metric_history(run_id, "layers/l699/grad_norm")
    assert sorted((m.step, m.value) for m in history) == [(0, 699.0), (1, 699.0)]
    assert len(client.get_run(run_id).data.metrics) == 701
    with pytest.raises(TypeError, match="run_id"):
        MlflowSink(run_id, tracking_uri=uri, experiment="x")
    with pytest.raises(TypeError, match="run_name must be a str"):
        MlflowSink(tracking_uri=uri, run_name=3)  # type: ignore[arg-type]


@mlflow_sqlalchemy
def test_tracker_sinks_beside_jsonl_in_a_guarded_run(wandb_offline: Path, tmp_path: Path) -> None:
    """One recorder, three sinks: what W&B and MLflow hold equals what the JSONL file holds."""
    from mlflow.tracking import MlflowClient

    from gradguard.guard.guard import Guard

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    wb = WandbSink(project="gradguard-test", mode="offline", dir=str(wandb_offline))
    run_dir = Path(wb.run.dir).parent
    ml = MlflowSink(tracking_uri=uri)
    rec = Recorder([JsonlSink(tmp_path / "run.jsonl"), wb, ml], flush_every=4)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    guard = Guard(model, opt, recorder=rec)
    for s in range(10):
        x = torch.randn(8, 4)
        if s == 6:
            x[0, 0] = math.nan
        loss = torch.nn.functional.mse_loss(model(x), x.sum(1, keepdim=True))
        loss.backward()
        guard.step(loss)
        opt.zero_grad(set_to_none=True)
    rec.close()
    rows = read_jsonl(tmp_path / "run.jsonl")
    losses = [[r["step"], r["loss"]] for r in rows if r["kind"] == "step"]
    assert any(math.isnan(v) for _, v in losses)  # the NaN batch's loss, kept as NaN
    history = wandb_history(run_dir)
    got = [[h[WandbSink.STEP_METRIC], _num(h["train/loss"])] for h in history if "train/loss" in h]
    assert same(got, losses)
    client = MlflowClient(tracking_uri=uri)
    points = [[m.step, m.value] for m in client.get_metric_history(ml.run_id, "train/loss")]
    assert same(sorted(points), sorted(losses))
    skips = [r for r in rows if r["kind"] == "action"]
    assert skips and same(read_jsonl(run_dir / "files" / WandbSink.EVENTS_FILE), skips)
