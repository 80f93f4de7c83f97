"""The Recorder's memory stays flat: a window of recent steps in memory, the whole run in sinks."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from gradguard.guard.guard import Guard
from gradguard.records.recorder import SCHEMA_VERSION, WINDOW, Recorder, is_event

Row = dict[str, Any]


class ListSink:
    def __init__(self) -> None:
        self.rows: list[Row] = []

    def write(self, rows: list[Row]) -> None:
        self.rows.extend(rows)

    def close(self) -> None:
        pass


def kept(all_rows: list[Row], window: int | None, max_events: int) -> tuple[list[Row], int]:
    """A slow plain-Python reference: what a recorder keeps of a run's rows, and what it drops.

    Steps are runs of consecutive rows with one step number; the last ``window`` of them are
    kept whole, and of the older ones only the first ``max_events`` rare rows.
    """
    groups = [list(g) for _, g in itertools.groupby(all_rows, key=lambda r: r["step"])]
    if window is None:
        return all_rows, 0
    old = [r for g in groups[: max(len(groups) - window, 0)] for r in g if is_event(r)]
    recent = [r for g in groups[max(len(groups) - window, 0) :] for r in g]
    return old[:max_events] + recent, max(len(old) - max_events, 0)


def _run(recorder: Recorder, specs: list[tuple[int, str, bool]]) -> None:
    for step, kind, now in specs:
        if now:
            recorder.event(step, kind, action="skip", reason="x")
        else:
            recorder.log(step, kind, loss=torch.tensor(float(step)))


_specs = st.lists(
    st.tuples(
        st.integers(0, 12),  # step numbers repeat and go back, as after a rollback
        st.sampled_from(["step", "step", "step", "action", "incident", "probe", "transformer"]),
        st.booleans(),  # logged (flushed every k steps) or an event (flushed at once)
    ),
    max_size=60,
)


@settings(max_examples=60, deadline=None)
@given(
    specs=_specs,
    window=st.one_of(st.none(), st.integers(0, 6)),
    max_events=st.integers(0, 4),
    flush_every=st.integers(1, 5),
)
def test_the_window_keeps_what_the_reference_keeps_and_the_sink_gets_every_row(
    specs: list[tuple[int, str, bool]], window: int | None, max_events: int, flush_every: int
) -> None:
    sink = ListSink()
    rec = Recorder([sink], flush_every=flush_every, window=window, max_events=max_events)
    _run(rec, specs)
    rec.flush()
    assert len(sink.rows) == len(specs)  # nothing is lost on the way to the sinks
    rows, dropped = kept(sink.rows, window, max_events)
    assert rec.rows == rows
    assert rec.dropped_events == dropped
    # and the state carries exactly that through a checkpoint
    other = Recorder()
    other.load_state_dict(rec.state_dict())
    assert other.rows == rec.rows and other.state_dict() == rec.state_dict()


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))


def _guarded_rows(recorder: Recorder | None, steps: int, nan_at: int) -> list[Row]:
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    guard = Guard(model, opt, recorder=recorder)
    g = torch.Generator().manual_seed(1)
    for i in range(steps):
        x = torch.randn(16, 4, generator=g)
        loss = nn.functional.mse_loss(model(x), x.sum(1, keepdim=True))
        loss.backward()
        if i == nan_at:
            model[0].weight.grad.view(-1)[0] = float("nan")  # type: ignore[index,union-attr]
        guard.step(loss)
        opt.zero_grad(set_to_none=True)
    return guard.records


def test_a_run_shorter_than_the_window_keeps_every_row_as_before() -> None:
    """The default recorder of a short run keeps exactly what an unbounded one keeps."""
    default = _guarded_rows(None, 120, nan_at=30)
    unbounded = _guarded_rows(Recorder(flush_every=50, window=None), 120, nan_at=30)
    assert len(default) > 120 and any(r["kind"] == "action" for r in default)
    assert repr(default) == repr(unbounded)  # repr: NaN losses compare equal as text


def test_a_long_run_keeps_the_recent_window_and_its_incidents() -> None:
    """A run longer than the window keeps its last steps and the skip from long ago."""
    sink = ListSink()
    rows = _guarded_rows(Recorder([sink], flush_every=7, window=40), 150, nan_at=5)
    steps = [r["step"] for r in rows if r["kind"] == "step"]
    assert steps == list(range(110, 150))
    old = [r for r in rows if r["step"] < 110]
    assert old and all(r["kind"] == "action" and r["step"] == 5 for r in old)
    assert len([r for r in sink.rows if r["kind"] == "step"]) == 150  # the sink has the run


def test_memory_holds_a_bounded_number_of_rows_over_a_long_run() -> None:
    rec = Recorder(flush_every=50, window=100, max_events=10)
    for s in range(5000):
        rec.log(s, loss=1.0, layers={"a": 1.0, "b": 2.0})
        if s % 7 == 0:
            rec.event(s, "action", action="skip", reason="spike")
    rows = rec.rows
    assert len([r for r in rows if r["kind"] == "step"]) == 100
    assert len(rows) == 10 + 100 + len([s for s in range(4900, 5000) if s % 7 == 0])
    assert rec.dropped_events == len([s for s in range(4900) if s % 7 == 0]) - 10
    assert len(rec.state_dict()["rows"]) == len(rows)  # checkpoints stay small too


def test_window_zero_keeps_only_rare_rows_and_keep_false_keeps_nothing() -> None:
    only_events = Recorder(flush_every=2, window=0)
    nothing = Recorder(flush_every=2, keep=False)
    for rec in (only_events, nothing):
        for s in range(5):
            rec.log(s, loss=float(s))
        rec.event(5, "action", action="skip", reason="x")
        rec.log(6, "probe", event="layers", layers={"a": 1.0})
        rec.event(6, "probe", event="nonfinite_forward", module="fc")
        rec.flush()
    assert [(r["kind"], r["step"]) for r in only_events.rows] == [("action", 5), ("probe", 6)]
    assert nothing.rows == []
    assert only_events.window == 0 and WINDOW >= 100


def test_old_checkpoints_load_through_the_window() -> None:
    """A state saved before the window existed (every row) loads and keeps what fits."""
    rows = [{"v": SCHEMA_VERSION, "kind": "step", "step": s, "loss": s / 2} for s in range(30)]
    rows.insert(3, {"v": SCHEMA_VERSION, "kind": "action", "step": 2, "action": "skip"})
    old = {"flush_every": 5, "keep": True, "rows": rows}
    rec = Recorder(window=10)
    rec.load_state_dict(old)
    assert rec.flush_every == 5 and rec.window == 10
    assert rec.rows == kept(rows, 10, rec.max_events)[0]
    assert rec.rows[0]["kind"] == "action" and len(rec.rows) == 11
    unbounded = Recorder(window=None)
    unbounded.load_state_dict(old)
    assert unbounded.rows == rows


def test_state_round_trips_the_window_and_the_dropped_count() -> None:
    rec = Recorder(flush_every=3, window=4, max_events=1)
    for s in range(12):
        rec.log(s, loss=torch.tensor(float(s)))
        if s in (1, 2, 3):
            rec.event(s, "incident", reason="x")
    state = rec.state_dict()
    assert (state["window"], state["max_events"], state["evicted"]) == (4, 1, 1)
    assert state["dropped_events"] == 2
    other = Recorder(flush_every=1, window=None, max_events=9)
    other.load_state_dict(state)
    assert other.state_dict() == state
    other.log(12, loss=1.0)
    assert other.rows == rec.rows  # flush_every=3 restored: step 12 still queued


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"window": -1}, ValueError),
        ({"window": 2.5}, ValueError),
        ({"window": True}, ValueError),
        ({"max_events": -3}, ValueError),
        ({"max_events": None}, ValueError),
        ({"keep": 1}, TypeError),
    ],
)
def test_bad_window_settings_raise(kwargs: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error):
        Recorder(**kwargs)


@pytest.mark.parametrize(
    "change",
    [{"window": -2}, {"evicted": 99}, {"dropped_events": "x"}, {"max_events": 1.5}],
)
def test_a_bad_state_raises_and_changes_nothing(change: dict[str, Any]) -> None:
    rec = Recorder(flush_every=2, window=3)
    for s in range(6):
        rec.log(s, loss=float(s))
    good = rec.state_dict()
    with pytest.raises((ValueError, TypeError)):
        rec.load_state_dict({**good, **change})
    assert rec.state_dict() == good


def test_the_report_of_a_run_longer_than_the_window_reads_every_step_from_the_sink(
    tmp_path: Path,
) -> None:
    from gradguard.records.sinks import JsonlSink
    from gradguard.report import build_report

    rec = Recorder([JsonlSink(tmp_path / "run.jsonl")], flush_every=8, window=10)
    for s in range(60):
        rec.log(s, loss=1.0 / (s + 1), grad_norm=0.5, clipped=False, action="step", lr=0.1)
        if s == 7:
            rec.event(7, "action", action="skip", reason="a spike")
    rec.close()
    assert len(rec.rows) == 11  # memory: the action of step 7 and the last 10 steps
    html = build_report(tmp_path / "run.jsonl", tmp_path / "report.html").read_text()
    assert "60 (step 0 to 59)" in html and "a spike" in html
