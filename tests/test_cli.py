"""The ``gradguard`` CLI end to end: real subprocesses for the main paths, exit codes for errors."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from gradguard.app.cli import EXIT_USAGE, main
from gradguard.records.sinks import read_jsonl


@pytest.fixture(autouse=True)
def _one_thread():
    # on a machine with few cores, intra-op threads only contend
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def gradguard(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 1800):
    """Run ``python -m gradguard ARGS`` (the console script runs the same ``main``).

    ``timeout`` is a hang guard only: a busy CI machine can be 10x slower than an idle one.
    """
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "160", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "gradguard", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


FACTORY = textwrap.dedent(
    """
    import math
    import torch
    from torch import nn

    def make():
        torch.manual_seed(0)
        layers = []
        for _ in range(12):
            lin = nn.Linear(32, 32)
            nn.init.normal_(lin.weight, 0.0, 2.0 / math.sqrt(32))  # 2x Kaiming variance: explodes
            layers += [lin, nn.ReLU()]
        model = nn.Sequential(*layers, nn.Linear(32, 1))
        x, y = torch.randn(32, 32), torch.randn(32, 1)
        return model, (x, y), lambda out, batch: nn.functional.mse_loss(out, batch[1])

    def make_two():
        model, batch, _ = make()
        return model, batch

    def broken():
        raise RuntimeError("the dataset is missing")

    def wrong_count():
        return (1, 2, 3, 4)

    def wrong_model():
        return "not a model", torch.zeros(2, 2)

    def wrong_batch():
        model, _, _ = make()
        return model, torch.zeros(4, 7)  # the model takes 32 features

    def wrong_loss():
        model, batch, _ = make()
        return model, batch, 42

    NOT_CALLABLE = 3
    """
)


@pytest.fixture(scope="module")
def factory_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("user") / "my_model.py"
    path.write_text(FACTORY)
    return path


# -- help and usage ------------------------------------------------------------------------------


def test_help_of_every_command_and_exit_codes_documented(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    top = capsys.readouterr().out
    assert "exit codes" in top
    for cmd in ("demo", "lab", "diagnose", "report"):
        assert cmd in top
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
        text = " ".join(capsys.readouterr().out.split())
        assert "exit codes: 0 ok; 1 failure" in text
        if cmd == "diagnose":
            assert "RUNS THE USER'S CODE" in text


def test_usage_errors_exit_2(tmp_path, capsys):
    assert main([]) == EXIT_USAGE
    for argv in (
        ["frobnicate"],
        ["lab", "nope"],
        ["demo", "--steps", "0"],
        ["lab", "--seeds", "x"],
    ):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
    capsys.readouterr()
    assert main(["demo", "--steps", "5"]) == 2
    assert "--steps must be >= 20" in capsys.readouterr().err
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    assert main(["lab", "chain", "--out", str(a_file)]) == 2
    assert "must be a folder" in capsys.readouterr().err


# -- demo ----------------------------------------------------------------------------------------


def test_demo_unguarded_diverges_guarded_does_not(tmp_path):
    out = tmp_path / "report"
    res = gradguard("demo", "--steps", "80", "--out", str(out), cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "the unguarded run diverged and the guarded one did not" in res.stdout, res.stdout
    plain = read_jsonl(out / "unguarded.jsonl")
    guarded = read_jsonl(out / "records.jsonl")
    assert any(not math.isfinite(r["loss"]) for r in plain if r["kind"] == "step")
    steps = [r for r in guarded if r["kind"] == "step"]
    applied = [r for r in steps if r["action"] in ("step", "clip")]
    assert len(applied) >= 70, res.stdout
    # every applied update came from a finite gradient, and the run ends with a finite loss
    assert all(math.isfinite(r["grad_norm"]) for r in applied)
    assert math.isfinite(steps[-1]["loss"]) and steps[-1]["loss"] < 5.0
    actions = {r["action"] for r in guarded if r["kind"] == "action"}
    assert "skip" in actions, res.stdout  # the defaults skip the outliers and the NaN window
    html = (out / "report.html").read_text()
    assert html.lstrip().lower().startswith("<!doctype html")
    # One incident bundle, and the replay command the demo prints names the data as the cause.
    (bundle,) = sorted((out / "incidents").glob("incident-*.pt"))
    assert f"gradguard replay {bundle}" in " ".join(res.stdout.split())
    why = gradguard(
        "replay", str(bundle), "--factory", f"{out / 'demo_model.py'}:make", cwd=tmp_path
    )
    assert why.returncode == 0, why.stdout + why.stderr
    assert why.stdout.lstrip().startswith("data:"), why.stdout


# -- lab -----------------------------------------------------------------------------------------


def test_lab_quick_chain_vectors_rnn(tmp_path):
    out = tmp_path / "lab"
    res = gradguard(
        "lab", "chain", "vectors", "rnn", "--quick", "--seeds", "1", "--out", str(out), cwd=tmp_path
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("success criterion") == 3
    assert res.stdout.count("criterion held") == 3
    # chain: its numbers against the closed form
    chain = json.loads((out / "chain.json").read_text())
    assert chain["passed"] is True
    row = next(r for r in chain["rows"] if r[0] == "2.34" and r[1] == 20)
    assert float(row[2]) == pytest.approx(2.34**20, rel=1e-5)  # output
    assert float(row[4]) == pytest.approx(2.34**19, rel=1e-5)  # dL/dw1
    assert json.loads((out / "vectors.json").read_text())["passed"] is True
    # rnn: plain SGD diverges, clipping solves the task
    plain, clipped = json.loads((out / "rnn.json").read_text())["rows"]
    assert plain[2] == "none" and plain[3] == "0/1" and plain[4] == "1/1"
    assert clipped[3] == "1/1" and clipped[4] == "0/1"
    assert float(clipped[5]) < 0.05
    for name in ("chain", "vectors", "rnn"):
        assert (out / f"{name}.png").stat().st_size > 1000
    assert "| length T |" in (out / "chain-vectors-rnn.md").read_text()


# -- diagnose ------------------------------------------------------------------------------------


def test_diagnose_file_factory(tmp_path, factory_file):
    out = tmp_path / "diag"
    res = gradguard("diagnose", f"{factory_file}:make", "--out", str(out), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "EXPLODING" in res.stdout
    assert "remedies" in res.stdout
    rows = read_jsonl(out / "diagnosis.jsonl")
    assert rows[0]["kind"] == "diagnosis" and rows[0]["verdict"] == "exploding"
    assert (out / "diagnosis.html").exists()


def test_diagnose_module_factory_two_tuple(tmp_path, factory_file, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(factory_file.parent))
    code = main(["diagnose", "my_model:make_two", "--no-remedies", "--out", str(tmp_path)])
    assert code == 0
    assert "verdict: EXPLODING" in capsys.readouterr().out
    assert (tmp_path / "diagnosis.html").exists()


def test_diagnose_missing_file_exits_2(tmp_path):
    res = gradguard("diagnose", "no/such/file.py:make", cwd=tmp_path)  # the real entry point
    assert res.returncode == 2
    assert "file not found" in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("nothere", "has no attribute 'nothere'"),
        ("NOT_CALLABLE", "not a callable factory"),
        ("broken", "raised RuntimeError: the dataset is missing"),
        ("wrong_count", "must return (model, batch) or (model, batch, loss_fn)"),
        ("wrong_model", "not a torch.nn.Module"),
        ("wrong_loss", "as loss_fn, not a callable"),
        ("wrong_batch", "cannot diagnose what"),
        ("bad-name", "not a Python identifier"),
    ],
)
def test_diagnose_bad_factory_exits_2(tmp_path, factory_file, capsys, name, message):
    code = main(["diagnose", f"{factory_file}:{name}", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert message in " ".join(err.split())
    assert not (tmp_path / "diagnosis.html").exists()


def test_diagnose_bad_specs_exit_2(tmp_path, capsys):
    assert main(["diagnose", "no_colon_here"]) == 2
    assert "no ':factory' part" in capsys.readouterr().err
    assert main(["diagnose", "surely_not_a_module_xyz:make"]) == 2
    assert "cannot import module" in capsys.readouterr().err
    bad = tmp_path / "syntax.py"
    bad.write_text("def make(:\n")
    assert main(["diagnose", f"{bad}:make"]) == 2
    assert "SyntaxError" in capsys.readouterr().err


# -- report --------------------------------------------------------------------------------------


def test_report_from_jsonl(tmp_path):
    from gradguard.records.sinks import JsonlSink

    path = tmp_path / "run.jsonl"
    sink = JsonlSink(path)
    rows = [
        {
            "v": 1,
            "kind": "step",
            "step": i,
            "loss": 1.0 / (i + 1),
            "grad_norm": 2.0 + i % 3,
            "clipped_norm": 2.0,
            "threshold": 2.5,
            "clipped": i % 3 == 2,
            "action": "step",
            "lr": 0.1,
        }
        for i in range(30)
    ]
    rows.append({"v": 1, "kind": "action", "step": 12, "action": "skip", "reason": "test"})
    sink.write(rows)
    sink.close()
    html = tmp_path / "out" / "r.html"
    res = gradguard("report", str(path), "-o", str(html), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert html.exists() and "31 records" in res.stdout
    assert "<html" in html.read_text().lower()


def test_report_bad_input_exits_2(tmp_path, capsys):
    assert main(["report", str(tmp_path / "missing.jsonl")]) == 2
    assert "not found" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text("this is not json\n")
    assert main(["report", str(bad), "-o", str(tmp_path / "x.html")]) == 2
    assert "not a JSON line" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["report", str(empty), "-o", str(tmp_path / "x.html")]) == 2
    assert not (tmp_path / "x.html").exists()


def test_demo_run_rejects_bad_arguments(tmp_path):
    from gradguard.app import demo

    with pytest.raises(ValueError, match="steps"):
        demo.run(out=tmp_path, steps=10)
    with pytest.raises(TypeError, match="seed"):
        demo.run(out=tmp_path, steps=40, seed="0")  # type: ignore[arg-type]
    assert not any(tmp_path.iterdir())  # nothing written


def test_demo_poison_plan_scales_with_steps():
    from gradguard.app import demo

    for steps in (20, 80, 300):
        plan = demo.poison_plan(steps)
        assert sorted(plan.values()).count("nan") == 4
        assert all(0 < p < steps for p in plan)
