"""Records: the device-side buffer, and the round trip through every sink."""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rich.console import Console
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils._python_dispatch import TorchDispatchMode

from gradguard.records.recorder import SCHEMA_VERSION, Named, Recorder
from gradguard.records.sinks import (
    ConsoleSink,
    CsvSink,
    JsonlSink,
    TensorBoardSink,
    read_csv,
    read_jsonl,
)

ROOT = Path(__file__).resolve().parent.parent


class OpLog(TorchDispatchMode):
    """Every aten op that runs inside the block (an observer, not a mock)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops.append(str(func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))


class ListSink:
    def __init__(self) -> None:
        self.batches: list[list[dict[str, Any]]] = []
        self.closed = False

    def write(self, rows: list[dict[str, Any]]) -> None:
        self.batches.append(rows)

    def close(self) -> None:
        self.closed = True


def same(a: Any, b: Any) -> bool:
    """Equality where NaN equals NaN (records keep NaN on purpose)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def sample_rows() -> list[dict[str, Any]]:
    """Rows covering every value type in the schema, including NaN and both infinities."""
    rows: list[dict[str, Any]] = []
    for s in range(6):
        rows.append(
            {
                "v": SCHEMA_VERSION,
                "kind": "step",
                "step": s,
                "loss": [2.5, 2.25, float("nan"), 2.0, 1.75, 1.5][s],
                "grad_norm": [1.0, float("inf"), float("nan"), 0.5, 3.0, 0.25][s],
                "clipped": s % 2 == 0,
                "action": ["step", "clip", "skip", "step", "clip", "step"][s],
                "lr": 0.001,
                "layers": {
                    "fc1.weight": 0.1 * (s + 1),
                    "fc2.weight": float("-inf") if s == 1 else s,
                },
            }
        )
        if s == 2:  # the guard's order: the step row, then the action row that says why
            rows.append(
                {
                    "v": SCHEMA_VERSION,
                    "kind": "action",
                    "step": 2,
                    "action": "skip",
                    "reason": "nonfinite",
                }
            )
    rows.append(
        {
            "v": SCHEMA_VERSION,
            "kind": "probe",
            "step": 4,
            "event": "nonfinite_forward",
            "module": "blocks.2",
            "where": "output",
            "inputs_finite": True,
            "previous": None,
            "nan": 3,
            "inputs": {"input[0]/rms": 0.5},
        }
    )
    # a column that appears only in a later row: the CSV header must widen
    rows.append({"v": SCHEMA_VERSION, "kind": "meta", "step": 6, "seed": 7, "note": "late"})
    return rows


def write_all(sink: Any, rows: list[dict[str, Any]]) -> None:
    rec = Recorder([sink], flush_every=2)
    for r in rows:
        values = {k: v for k, v in r.items() if k not in ("v", "kind", "step")}
        rec.log(r["step"], r["kind"], **values)
    rec.close()


def test_jsonl_round_trip_keeps_every_value(tmp_path: Path) -> None:
    rows = sample_rows()
    write_all(JsonlSink(tmp_path / "run.jsonl"), rows)
    lines = (tmp_path / "run.jsonl").read_text().splitlines()
    assert len(lines) == len(rows)
    first = json.loads(lines[2])  # strict JSON: NaN written as a string
    assert first["loss"] == "nan" and first["grad_norm"] == "nan"
    assert json.loads(lines[1])["layers"]["fc2.weight"] == "-inf"
    assert same(read_jsonl(tmp_path / "run.jsonl"), rows)


def test_jsonl_append_and_schema_checks(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    rows = sample_rows()
    write_all(JsonlSink(path), rows[:3])
    write_all(JsonlSink(path, append=True), rows[3:])
    assert same(read_jsonl(path), rows)
    bad = tmp_path / "new.jsonl"
    bad.write_text(json.dumps({"v": SCHEMA_VERSION + 1, "kind": "step", "step": 0}) + "\n")
    with pytest.raises(ValueError, match="newer"):
        read_jsonl(bad)
    sink = JsonlSink(tmp_path / "closed.jsonl")
    sink.close()
    with pytest.raises(ValueError, match="closed"):
        sink.write(rows[:1])
    with pytest.raises(TypeError, match="path"):
        JsonlSink(3)  # type: ignore[arg-type]


def test_csv_round_trip_flattens_layers_and_widens_header(tmp_path: Path) -> None:
    rows = sample_rows()
    rows[0]["reason"] = None  # None reads back as absent
    write_all(CsvSink(tmp_path / "run.csv"), rows)
    header = (tmp_path / "run.csv").read_text().splitlines()[0].split(",")
    assert header[:3] == ["v", "kind", "step"]
    assert "layers/fc1.weight" in header and "seed" in header and "note" in header
    back = read_csv(tmp_path / "run.csv")
    expected = [{k: v for k, v in r.items() if v is not None} for r in rows]
    assert same(back, expected)
    assert not (tmp_path / "run.csv.tmp").exists()
    # a resumed run appends, keeping the columns (and widening them again if needed)
    more = [{"v": SCHEMA_VERSION, "kind": "step", "step": 9, "loss": 0.5, "extra": 1}]
    write_all(CsvSink(tmp_path / "run.csv", append=True), more)
    assert same(read_csv(tmp_path / "run.csv"), [*expected, *more])
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="header"):
        CsvSink(tmp_path / "other.csv", append=True)


def test_tensorboard_round_trip_with_tensorboards_reader(tmp_path: Path) -> None:
    rows = sample_rows()
    rows.append(
        {
            "v": SCHEMA_VERSION,
            "kind": "probe",
            "step": 4,
            "event": "layers",
            "layers": {"fc1": 0.75},
            "act_rms": {"fc1": 1.25},
            "dead_frac": {"relu": 0.5},
        }
    )
    write_all(TensorBoardSink(tmp_path / "tb"), rows)
    ea = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    steps = [r for r in rows if r["kind"] == "step"]

    def scalars(tag: str) -> list[tuple[int, float]]:
        return [(e.step, e.value) for e in ea.Scalars(tag)]

    want = [(r["step"], r["grad_norm"]) for r in steps]
    got = scalars("grad/total_norm")
    assert [s for s, _ in got] == [s for s, _ in want]
    for (_, a), (_, b) in zip(got, want):
        assert same(float(a), float(b))  # TensorBoard stores fp32; these values are exact
    assert [v for _, v in scalars("grad/clipped")] == [float(r["clipped"]) for r in steps]
    assert scalars("train/lr")[0][1] == pytest.approx(0.001)
    assert scalars("layers/fc1.weight/grad_norm")[5] == (5, pytest.approx(0.6))
    assert scalars("layers/fc1/grad_norm") == [(4, 0.75)]
    assert scalars("layers/fc1/act_rms") == [(4, 1.25)]
    assert scalars("layers/relu/dead_frac") == [(4, 0.5)]

    def texts(tag: str) -> list[tuple[int, str]]:
        return [
            (e.step, e.tensor_proto.string_val[0].decode())
            for e in ea.Tensors(tag + "/text_summary")
        ]

    actions = texts("guard/action")
    assert [s for s, _ in actions] == [1, 2, 4]  # clip, skip, clip: plain steps are not text
    assert actions[1][1].startswith("skip")
    finding = texts("probe/nonfinite_forward")
    assert finding[0][0] == 4 and "blocks.2" in finding[0][1]
    assert texts("action/skip")[0][0] == 2
    with pytest.raises(ValueError, match="flush_secs"):
        TensorBoardSink(tmp_path / "x", flush_secs=0)


def test_console_prints_one_status_line_per_flush() -> None:
    buf = io.StringIO()
    sink = ConsoleSink(Console(file=buf, width=200, color_system=None))
    write_all(sink, sample_rows())
    lines = [ln for ln in buf.getvalue().splitlines() if ln.strip()]
    status = [ln for ln in lines if ln.startswith("step ") and "clip " in ln]
    assert len(status) == 3  # steps 0-5 flushed two steps at a time
    assert status[0] == "step 1  loss 2.25  norm inf  clip 50% (1/2)  skips 0 (total 0)"
    assert status[1] == "step 3  loss 2  norm 0.5  clip 50% (1/2)  skips 1 (total 1)"
    # one line for the skip, from the action row that gives the reason (not one per row)
    assert [ln for ln in lines if ln.startswith("step 2: ")] == ["step 2: skip (nonfinite)"]
    assert any("blocks.2" in ln for ln in lines)
    with pytest.raises(TypeError, match="console"):
        ConsoleSink(console=sys.stdout)


def _console_lines(batches: list[list[dict[str, Any]]]) -> list[str]:
    buf = io.StringIO()
    sink = ConsoleSink(Console(file=buf, width=200, color_system=None))
    for rows in batches:
        sink.write(rows)
    sink.close()
    return [ln for ln in buf.getvalue().splitlines() if ln.strip()]


def _row(step: int, kind: str = "step", **values: Any) -> dict[str, Any]:
    return {"v": SCHEMA_VERSION, "kind": kind, "step": step, **values}


def test_console_prints_each_incident_once_across_flush_boundaries() -> None:
    skip = _row(5, action="skip", loss=1.0)
    why = _row(5, "action", action="skip", reason="nonfinite: step not applied")
    said = "step 5: skip (nonfinite: step not applied)"
    # the step row ends one flush and its action row opens the next (flush_every hit on log)
    lines = _console_lines([[_row(4, action="step"), skip], [why], [_row(6, action="step")]])
    assert [ln for ln in lines if ln.startswith("step 5:")] == [said]
    # both in one flush
    lines = _console_lines([[skip, why, _row(6, action="step")]])
    assert [ln for ln in lines if ln.startswith("step 5:")] == [said]
    # a loss-scale overflow: a skipping step row and no action row, held one flush, then said
    amp = _row(7, action="skip")
    lines = _console_lines([[amp], [_row(8, action="step")]])
    assert [ln for ln in lines if ln.startswith("step 7:")] == ["step 7: skip"]
    assert lines.index("step 7: skip") < len(lines) - 1  # before the next flush's status line
    # ... or at close, when it ended the last flush
    assert "step 7: skip" in _console_lines([[amp]])
    # an action row of another action at the same step is another incident
    lines = _console_lines([[skip, _row(5, "action", action="log", reason="spike")]])
    assert [ln for ln in lines if ln.startswith("step 5:")] == [
        "step 5: skip",
        "step 5: log (spike)",
    ]


@pytest.mark.parametrize("flush_every", [1, 3, 50])
def test_console_says_each_skip_of_a_real_guard_once(flush_every: int) -> None:
    from gradguard.guard.guard import Guard

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    buf = io.StringIO()
    rec = Recorder([ConsoleSink(Console(file=buf, width=300, color_system=None))], flush_every)
    guard = Guard(model, opt, recorder=rec)
    for s in range(12):
        x = torch.randn(8, 4)
        if s in (4, 9):
            x[0, 0] = float("nan")
        loss = torch.nn.functional.mse_loss(model(x), x.sum(1, keepdim=True))
        loss.backward()
        guard.step(loss)
        opt.zero_grad(set_to_none=True)
    rec.close()
    skipped = [r["step"] for r in rec.rows if r["kind"] == "action" and r["action"] == "skip"]
    assert len(skipped) == 2
    lines = buf.getvalue().splitlines()
    for step in skipped:
        said = [ln for ln in lines if ln.startswith(f"step {step}: skip")]
        assert len(said) == 1 and "(" in said[0], lines  # once, with the reason


def test_read_jsonl_refuses_rows_a_report_cannot_use(tmp_path: Path) -> None:
    good = {"v": SCHEMA_VERSION, "kind": "step", "step": 3}
    for bad, what in [
        ({**good, "step": "x"}, "'step' must be an integer"),
        ({**good, "step": 2.5}, "'step' must be an integer"),
        ({**good, "step": True}, "'step' must be an integer"),
        ({**good, "v": "1"}, "'v' must be an integer"),
        ({**good, "kind": 7}, "'kind' must be a string"),
        ([1, 2], "needs the keys"),
    ]:
        path = tmp_path / "bad.jsonl"
        path.write_text(json.dumps(good) + "\n\n" + json.dumps(bad) + "\n")
        with pytest.raises(ValueError, match=rf"bad.jsonl:3: .*{what}"):
            read_jsonl(path)
    path.write_bytes(b'{"v": 1, "kind": "step", "step": 0}\n\xff\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl: not UTF-8"):
        read_jsonl(path)


def test_read_jsonl_lives_beside_jsonl_sink_and_the_package_face() -> None:
    import gradguard
    import gradguard.records.sinks

    assert gradguard.records.sinks.read_jsonl.__module__ == "gradguard.records.sinks"
    assert gradguard.read_jsonl is gradguard.records.sinks.read_jsonl
    # either module may be imported first, in a fresh interpreter
    for first in ("gradguard.records.sinks", "gradguard.records.recorder"):
        code = f"import {first}; from gradguard.records.sinks import read_jsonl; print('ok')"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert out.stdout.strip() == "ok", out.stderr


def test_recorder_flushes_every_k_steps_in_one_transfer_with_exact_values() -> None:
    sink = ListSink()
    rec = Recorder([sink], flush_every=4)
    torch.manual_seed(0)
    values = torch.randn(8, dtype=torch.float32)
    ints = torch.arange(8) * 1000
    args = [
        {"loss": values[s], "n": ints[s], "ok": values[s] > 0, "layers": {"a": values[s] * 2}}
        for s in range(4)
    ]
    with OpLog() as logged:
        for s in range(3):
            rec.log(s, **args[s])
    assert logged.ops == []  # logging runs no tensor op: nothing waits for the device
    assert sink.batches == [] and rec.rows == []
    with OpLog() as logged:
        rec.log(3, **args[3])
    assert logged.ops.count("cat") == 1  # one concatenated tensor per device ...
    assert "_local_scalar_dense" not in logged.ops  # ... read at once, not value by value
    assert len(sink.batches) == 1 and len(sink.batches[0]) == 4
    for s, row in enumerate(sink.batches[0]):
        assert row["loss"] == values[s].item() and type(row["loss"]) is float
        assert row["n"] == ints[s].item() and type(row["n"]) is int
        assert row["ok"] is bool(values[s] > 0)
        assert row["layers"]["a"] == (values[s] * 2).item()
        assert (row["v"], row["kind"], row["step"]) == (SCHEMA_VERSION, "step", s)


def test_named_values_flush_to_a_dict_in_the_same_transfer() -> None:
    sink = ListSink()
    rec = Recorder([sink], flush_every=2)
    norms = torch.tensor([[1.5, 2.5], [3.5, float("nan")]])
    with OpLog() as logged:
        for s in range(2):
            rec.log(s, loss=torch.tensor(float(s)), layers=Named(["a", "b"], norms[s]))
    assert logged.ops.count("cat") == 1 and "_local_scalar_dense" not in logged.ops
    assert sink.batches[0][0]["layers"] == {"a": 1.5, "b": 2.5}
    assert sink.batches[0][1]["layers"]["a"] == 3.5 and math.isnan(
        sink.batches[0][1]["layers"]["b"]
    )
    assert set(Named(["a", "b"], norms[0]).as_dict()) == {"a", "b"}


def test_recorder_counts_steps_not_rows() -> None:
    sink = ListSink()
    rec = Recorder([sink], flush_every=3)
    for s in range(3):
        rec.log(s, loss=torch.tensor(float(s)))
        if s < 2:
            rec.log(s, "probe", event="layers", layers={"fc": torch.tensor(1.0)})
    assert [len(b) for b in sink.batches] == [5]
    rec.event(3, "action", action="skip", reason="x")  # events flush at once
    assert [len(b) for b in sink.batches] == [5, 1]
    rec.close()
    assert sink.closed


def test_recorder_state_round_trip() -> None:
    rec = Recorder(flush_every=5)
    for s in range(7):
        rec.log(s, loss=torch.tensor(s / 2))
    state = rec.state_dict()
    other = Recorder(flush_every=1, keep=False)
    other.load_state_dict(state)
    assert other.state_dict() == state
    assert [r["loss"] for r in other.rows] == [s / 2 for s in range(7)]
    other.log(7, loss=torch.tensor(3.5))
    assert len(other.rows) == 7  # flush_every=5 restored: step 7 still queued
    with pytest.raises(ValueError, match="flush_every"):
        Recorder(flush_every=0)


WRITER = textwrap.dedent(
    """
    import sys, torch
    from torch import nn
    from gradguard.records.recorder import Recorder
    from gradguard.records.sinks import JsonlSink
    from gradguard.insight.probe import Probe
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    rec = Recorder([JsonlSink(sys.argv[1])], flush_every=3)
    probe = Probe(model, every=2, recorder=rec)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(6):
        loss = model(torch.randn(16, 4)).pow(2).mean()
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        rec.log(step, loss=loss.detach(), grad_norm=norm, clipped=norm > 0.5, threshold=0.5,
                action="clip", lr=0.1)
        probe.step()
        opt.step(); opt.zero_grad()
    rec.close()
    torch.save(rec.rows, sys.argv[2])
    """
)


def test_report_builds_from_jsonl_written_by_an_earlier_process(tmp_path: Path) -> None:
    from gradguard.report import build_report

    jsonl, saved = tmp_path / "run.jsonl", tmp_path / "rows.pt"
    done = subprocess.run(
        [sys.executable, "-c", WRITER, str(jsonl), str(saved)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,  # a hang guard, not a speed test
    )
    assert done.returncode == 0, done.stderr
    rows = read_jsonl(jsonl)
    assert same(rows, torch.load(saved, weights_only=True))
    assert [r["step"] for r in rows if r["kind"] == "probe"] == [0, 2, 4]
    html = build_report(jsonl, tmp_path / "report.html").read_text()
    assert "<img" in html and "gradguard report" in html


def test_guard_actions_and_probe_findings_share_one_stream(tmp_path: Path) -> None:
    from torch import nn

    from gradguard.guard.guard import Guard
    from gradguard.insight.probe import Probe

    class NaNAt(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin, self.calls = nn.Linear(4, 4), 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            return self.lin(x) * (float("nan") if self.calls == 4 else 1.0)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), NaNAt(), nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    rec = Recorder([JsonlSink(tmp_path / "run.jsonl")], flush_every=2)
    guard = Guard(model, opt, recorder=rec)
    probe = Probe(model, every=2, recorder=rec, trace=True)
    for _ in range(6):
        loss = model(torch.randn(8, 3)).pow(2).mean()
        loss.backward()
        guard.step(loss)
        probe.step()
        opt.zero_grad(set_to_none=True)
    rec.close()
    rows = read_jsonl(tmp_path / "run.jsonl")
    at3 = [r for r in rows if r["step"] == 3]
    kinds = {(r["kind"], r.get("event") or r.get("action")) for r in at3}
    assert ("probe", "nonfinite_forward") in kinds
    assert ("step", "skip") in kinds or ("action", "skip") in kinds
    finding = next(r for r in at3 if r.get("event") == "nonfinite_forward")
    assert finding["module"] == "2" and finding["inputs_finite"] is True
    assert [r["step"] for r in rows if r.get("event") == "layers"] == [0, 2, 4]


_names = st.text(alphabet="abcdefghij._0123456789", min_size=1, max_size=8).filter(
    lambda s: s[0].isalpha()
)
_numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=64),
    st.integers(min_value=-(2**62), max_value=2**62),
)
_values = st.one_of(
    _numbers,
    st.booleans(),
    _names,  # strings that cannot be mistaken for numbers or bools
    st.dictionaries(_names, _numbers, min_size=1, max_size=3),
)


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 10**6),
            st.sampled_from(["step", "action", "probe", "meta"]),
            st.dictionaries(_names.filter(lambda s: "/" not in s), _values, max_size=5),
        ),
        min_size=1,
        max_size=8,
    )
)
def test_any_rows_round_trip_through_jsonl_and_csv(
    tmp_path_factory: pytest.TempPathFactory, specs: list[tuple[int, str, dict[str, Any]]]
) -> None:
    folder = tmp_path_factory.mktemp("rt")
    rows = [
        {"v": SCHEMA_VERSION, "kind": kind, "step": step, **values}
        for step, kind, values in specs
        if not {"v", "kind", "step"} & values.keys()
    ]
    if not rows:
        return
    write_all(JsonlSink(folder / "r.jsonl"), rows)
    assert same(read_jsonl(folder / "r.jsonl"), rows)
    write_all(CsvSink(folder / "r.csv"), rows)
    assert same(read_csv(folder / "r.csv"), rows)
