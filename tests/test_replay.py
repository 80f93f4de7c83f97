"""Incident bundles and ``gradguard replay``: inject one fault of each kind into a small training
loop that writes bundles as the guard will (tests/_replay_loop.py), and check that the replay
names the cause; check that damaged, hostile or mismatched input is refused."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from gradguard.app.cli import main
from gradguard.core.snapshot import capture, forward_rng_state, restore, rng_state, save_snapshot
from gradguard.guard.incident import IncidentWriter
from gradguard.insight.replay import NotReproducible, ReplayError, replay
from gradguard.records.bundle import BundleError, BundleSpec, load_bundle
from gradguard.report.incident import build_incident_page, render_incident
from tests import _replay_loop as L


def adam(model: nn.Module) -> torch.optim.Adam:
    return torch.optim.Adam(model.parameters(), lr=1e-2)


def data_incident(directory: Path, poison: str = "scale", rng_fn=rng_state) -> Path:
    def data(step: int):
        x, y = L.batch(step)
        if step == 6:
            if poison == "scale":
                x[5] *= 1e4
            else:
                x[5, 2] = float("nan")
        return x, y

    model = L.mlp()
    path = L.train(model, adam(model), directory, 10, data=data, rng_fn=rng_fn)
    assert path is not None and path.name == "incident-000000006.pt"
    return path


# -- the five kinds ------------------------------------------------------------------------------


@pytest.mark.parametrize(("poison", "rng_fn"), [("scale", rng_state), ("nan", forward_rng_state)])
def test_data_names_the_poisoned_row(tmp_path, poison, rng_fn):
    r = replay(data_incident(tmp_path, poison, rng_fn), lambda: L.mlp(seed=1))
    assert r.kind == "data", r.summary
    assert r.culprits == [5]
    assert "row 5" in r.summary
    assert r.without_culprits is not None and math.isfinite(r.without_culprits["grad_norm"])
    worst = max(
        r.rows, key=lambda row: row["grad_norm"] if math.isfinite(row["grad_norm"]) else 1e300
    )
    assert worst["row"] == 5
    # dropout is on: the step reproduces only because the pre-step RNG state was restored
    assert r.differs == []


def test_transient_bit_flip_in_the_original_step_only(tmp_path):
    model = L.mlp()

    def flip(step: int) -> None:
        if step == 6:  # an exponent bit of one gradient entry, as flaky hardware might
            model[0].weight.grad.view(-1)[3:4].view(torch.int32).bitwise_xor_(1 << 30)

    path = L.train(model, adam(model), tmp_path, 10, after_backward=flip)
    assert path is not None
    r = replay(path, lambda: L.mlp(seed=1))
    assert r.kind == "transient", r.summary
    assert [d["name"] for d in r.differs] == ["grad_norm"]
    assert r.differs[0]["recorded"] > 1e20 and r.differs[0]["replayed"] < 100
    assert "grad_norm" in r.summary and "loss matches" in r.summary


def test_optimizer_state_zeroed_second_moment(tmp_path):
    model = L.mlp(dropout=0.0)
    opt = adam(model)

    def collapse(step: int) -> None:
        if step == 20:
            opt.state[model[0].weight]["exp_avg_sq"].zero_()

    path = L.train(model, opt, tmp_path, 30, before_step=collapse, incident_at=20,
                   signal="update_ratio")  # fmt: skip
    r = replay(path, lambda: L.mlp(seed=1, dropout=0.0))
    assert r.kind == "optimizer-state", r.summary
    assert r.optimizer is not None and r.optimizer["huge"] == ["0.weight"]
    top = r.optimizer["tensors"][0]
    assert top["name"] == "0.weight" and top["ratio"] > 100
    assert "0.weight" in r.summary


def test_clean_step_is_not_blamed_on_anything(tmp_path):
    """The control of the test above: the same run without the collapse."""
    model = L.mlp(dropout=0.0)
    path = L.train(model, adam(model), tmp_path, 30, incident_at=20, signal="update_ratio")
    r = replay(path, lambda: L.mlp(seed=1, dropout=0.0))
    assert r.kind == "unclassified", r.summary
    assert r.optimizer is not None and r.optimizer["checked"] and r.optimizer["huge"] == []


def test_numerics_log_of_a_negative(tmp_path):
    model = L.log_net()

    def negative(step: int) -> None:
        if step == 5:
            model[1].shift.fill_(-100.0)

    path = L.train(model, adam(model), tmp_path, 10, before_step=negative)
    r = replay(path, lambda: L.log_net(seed=1))
    assert r.kind == "numerics", r.summary
    o = r.origin
    assert o is not None
    assert (o["op"], o["direction"], o["module"], o["born"]) == (
        "aten.log", "forward", "1 (ShiftLog)", True
    )  # fmt: skip
    assert o["inputs"][0]["max"] < 0  # the range of the op's input shows why
    assert o["fp32_avoids"] is None  # already fp32


def test_numerics_fp16_overflow_that_fp32_avoids(tmp_path):
    model = L.exp_net().half()

    def grow(step: int) -> None:
        if step == 3:
            model[2].shift.fill_(11.5)  # exp(11.5) > 65504, the fp16 maximum

    path = L.train(model, torch.optim.SGD(model.parameters(), lr=1e-3), tmp_path, 6,
                   before_step=grow, data=lambda s: L.batch(s, dtype=torch.float16))  # fmt: skip
    r = replay(path, lambda: L.exp_net(seed=1).half())
    assert r.kind == "numerics", r.summary
    assert r.origin is not None
    assert (r.origin["op"], r.origin["module"]) == ("aten.exp", "2 (ShiftExp)")
    assert r.origin["fp32_avoids"] is True and "In fp32 the step is finite" in r.summary


class Gate(nn.Module):
    """sqrt(x^2 * gate): finite forward; with gate 0 the backward of sqrt divides by zero."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("gate", torch.tensor(1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(x.pow(2) * self.gate)


def gate_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(L.IN, L.HIDDEN), Gate(), nn.Linear(L.HIDDEN, L.OUT))


def test_numerics_born_in_backward(tmp_path):
    model = gate_net()

    def close(step: int) -> None:
        if step == 2:
            model[1].gate.fill_(0.0)

    path = L.train(model, adam(model), tmp_path, 4, before_step=close)
    r = replay(path, gate_net)
    assert r.kind == "numerics", r.summary
    assert r.origin is not None
    assert r.origin["direction"] == "backward"
    assert r.origin["module"] == "1 (Gate)"
    assert r.origin["autograd_node"] == "SqrtBackward0"


def test_model_state_weight_already_nan(tmp_path):
    model = L.mlp()

    def poison(step: int) -> None:
        if step == 5:
            with torch.no_grad():
                model[3].weight[0, 2] = float("nan")

    path = L.train(model, adam(model), tmp_path, 10, before_step=poison)
    r = replay(path, lambda: L.mlp(seed=1))
    assert r.kind == "model-state", r.summary
    assert r.model is not None and [s["name"] for s in r.model["nonfinite"]] == ["3.weight"]
    assert any(t["finite"] is False for t in r.model["known_good"])


# -- the bundle ----------------------------------------------------------------------------------


def test_bundle_holds_the_pre_step_state_and_restores_it(tmp_path):
    model = L.mlp()
    opt = adam(model)
    path = data_incident(tmp_path)
    b = load_bundle(path)
    assert (b.step, b.position, b.action, b.signal) == (6, 6, "skip", "spike")
    assert b.has_batch and b.batch[0][5].abs().max() > 1e3
    assert b.meta["versions"]["torch"] == torch.__version__
    assert b.meta["rank"] is None and b.world_size == 1
    assert b.meta["optimizer_class"] == "torch.optim.adam.Adam"
    assert b.config["policy"].startswith("<object object")  # objects stored as text
    assert all(isinstance(r["loss"], float) for r in b.history)  # read back from tensors
    assert len(b.history) == 6 and set(b.history[-1]["layers"]) == {
        "0.weight", "0.bias", "3.weight", "3.bias"
    }  # fmt: skip
    restore(b.snapshot, model, opt)
    assert int(opt.state_dict()["state"][0]["step"]) == 6  # six clean steps, then the incident
    for name, t in model.state_dict().items():
        assert torch.equal(t, b.snapshot["model"][name])


def test_writer_caps_count_actions_and_batch_size(tmp_path):
    model = L.mlp()
    opt = adam(model)
    x, y = L.batch(0)
    args = dict(position=0, signal="s", reason="r", batch=(x, y), rng=rng_state(), model=model,
                optimizer=opt)  # fmt: skip
    w = IncidentWriter(tmp_path, actions=("skip",), max_count=2)
    assert w.write(BundleSpec(step=0, action="log", **args)) is None
    assert not w.wants("log") and w.wants("skip")
    first = w.write(BundleSpec(step=0, action="skip", **args))
    second = w.write(BundleSpec(step=0, action="skip", **args))  # same step twice: a new name
    assert first is not None and second is not None and first != second
    assert w.write(BundleSpec(step=1, action="skip", **args)) is None and w.dropped == 1
    assert not w.wants("skip")
    state = w.state_dict()
    again = IncidentWriter(tmp_path, max_count=2)
    again.load_state_dict(state)
    assert again.state_dict() == state and not again.wants("skip")

    small = IncidentWriter(tmp_path / "small", max_batch_bytes=100)
    path = small.write(BundleSpec(step=3, action="skip", sampler={"epoch": 1, "index": 48}, **args))
    assert path is not None
    b = load_bundle(path)
    assert not b.has_batch and b.batch is None and b.sampler == {"epoch": 1, "index": 48}
    assert "max_batch_bytes" in b.meta["batch_note"]
    with pytest.raises(ReplayError, match="stored no batch"):
        replay(path, lambda: L.mlp(seed=1))
    assert replay(path, lambda: L.mlp(seed=1), batch=(x, y)).kind in ("unclassified",)


def test_truncated_and_altered_bundles_give_clear_errors(tmp_path):
    path = data_incident(tmp_path)
    raw = path.read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(BundleError, match="truncated or corrupted"):
        load_bundle(cut)
    payload = torch.load(path, weights_only=True)
    payload["data"]["model"]["0.weight"][0, 0] += 1.0
    altered = tmp_path / "altered.pt"
    torch.save(payload, altered)
    with pytest.raises(BundleError, match="checksum does not match"):
        load_bundle(altered)
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(tmp_path / "missing.pt")
    snap = tmp_path / "snapshot.pt"
    model = L.mlp()
    save_snapshot(snap, capture(model, adam(model), step=0, position=0))
    with pytest.raises(BundleError, match="not an incident bundle"):
        load_bundle(snap)


class Smuggled:
    """Any class: torch.save pickles it by reference; weights_only loading must refuse it."""

    def __init__(self) -> None:
        self.payload = "os.system('echo hi')"


def test_bundle_holding_a_pickled_object_is_refused(tmp_path):
    path = data_incident(tmp_path)
    payload = torch.load(path, weights_only=True)
    payload["data"]["incident"]["config"]["policy"] = Smuggled()
    hostile = tmp_path / "hostile.pt"
    torch.save(payload, hostile)
    with pytest.raises(BundleError, match="pickled Python object"):
        load_bundle(hostile)
    with pytest.raises(ReplayError, match="pickled Python object"):
        replay(hostile, lambda: L.mlp(seed=1))


def test_a_different_model_is_not_reproducible(tmp_path):
    path = data_incident(tmp_path)

    def wider() -> nn.Module:
        return nn.Sequential(nn.Linear(L.IN, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 1))

    with pytest.raises(NotReproducible, match="shapes differ"):
        replay(path, wider)
    with pytest.raises(NotReproducible, match="not in the bundle"):
        replay(path, lambda: nn.Sequential(L.mlp(), nn.Linear(1, 1)))


def test_replay_leaves_the_global_rng_alone(tmp_path):
    path = data_incident(tmp_path)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    replay(path, lambda: L.mlp(seed=1))
    assert torch.equal(torch.get_rng_state(), before)


# -- outputs -------------------------------------------------------------------------------------


def test_json_and_html_page_escape_what_the_bundle_says(tmp_path):
    model = L.mlp()
    x, y = L.batch(0)
    x[1] = float("nan")
    loss = L.loss_fn(model(x), (x, y))
    path = IncidentWriter(tmp_path).write(BundleSpec(
        step=0, position=0, action="skip", signal="nonfinite",
        reason='<script>alert("x")</script>', batch=(x, y), rng=rng_state(), model=model,
        optimizer=adam(model), recorded={"loss": loss.detach(), "grad_norm": float("nan")},
    ))  # fmt: skip
    assert path is not None
    r = replay(path, lambda: L.mlp(seed=1))
    assert r.kind == "data" and r.culprits == [1]
    data = json.loads(r.to_json(tmp_path / "r.json"))
    assert data["kind"] == "data" and data["recorded"]["grad_norm"] == "nan"
    page = render_incident(r)
    assert "<script" not in page and "&lt;script&gt;" in page
    assert "Content-Security-Policy" in page and "default-src 'none'" in page
    out = build_incident_page(tmp_path / "r.json", tmp_path / "r.html")
    assert out.read_text("utf-8") == page  # the JSON alone rebuilds the same page


# -- command line --------------------------------------------------------------------------------


FACTORY = """
import torch
from tests._replay_loop import batch, mlp

def make():
    return mlp(seed=1), batch(0)

def model_only():
    return mlp(seed=1)

def other():
    return torch.nn.Sequential(torch.nn.Linear(8, 4)), batch(0)

def broken():
    raise RuntimeError("no GPU here")
"""


def test_cli_replay_exit_codes(tmp_path, capsys):
    path = data_incident(tmp_path)
    factory = tmp_path / "factory.py"
    factory.write_text(FACTORY)
    out_json, out_html = tmp_path / "out.json", tmp_path / "out.html"
    code = main(["replay", str(path), "--factory", f"{factory}:make", "--json", str(out_json),
                 "--html", str(out_html)])  # fmt: skip
    text = " ".join(capsys.readouterr().out.split())
    assert code == 0, text
    assert "data: Step 6" in text and "row 5" in text
    assert json.loads(out_json.read_text())["culprits"] == [5]
    assert "DATA" in out_html.read_text("utf-8")
    assert main(["replay", str(path), "--factory", f"{factory}:model_only"]) == 0
    assert main(["replay", str(path), "--factory", f"{factory}:other"]) == 1
    assert "not reproducible" in capsys.readouterr().err
    assert main(["replay", str(path), "--factory", f"{factory}:broken"]) == 2
    assert main(["replay", str(tmp_path / "nope.pt"), "--factory", f"{factory}:make"]) == 2
    cut = tmp_path / "cut.pt"
    cut.write_bytes(path.read_bytes()[:1000])
    assert main(["replay", str(cut), "--factory", f"{factory}:make"]) == 2
    assert "truncated" in " ".join(capsys.readouterr().err.split())


# -- distributed ---------------------------------------------------------------------------------


def test_bundle_written_under_ddp_replays_in_one_process(tmp_path):
    from tests import _dist_scale as ds

    results = ds.launch(L.ddp_worker, 2, str(tmp_path), timeout=900)  # a hang guard
    paths = [Path(r["path"]) for r in results]
    assert [p.name for p in paths] == ["incident-000000004-rank0.pt", "incident-000000004-rank1.pt"]
    b = load_bundle(paths[1])
    assert (b.meta["rank"], b.world_size) == (1, 2)
    assert not any(k.startswith("module.") for k in b.snapshot["model"])
    r = replay(b, lambda: L.mlp(seed=5, dropout=0.0))
    assert r.kind == "data", r.summary
    assert r.culprits == [3]
    assert any("averaged over 2 ranks" in n for n in r.notes)
    clean = replay(paths[0], lambda: L.mlp(seed=5, dropout=0.0))
    assert clean.kind != "data" and clean.culprits == []


def test_the_pre_step_rng_state_is_what_makes_dropout_reproduce(tmp_path):
    """A bundle given the RNG state of after the forward pass replays other dropout masks."""
    model = L.mlp(dropout=0.5)
    x, y = L.batch(0)
    before = forward_rng_state()
    loss = L.loss_fn(model(x), (x, y))
    loss.backward()
    rec = {"loss": loss.detach(), "grad_norm": L.grad_norm(model)}
    common = dict(step=0, position=0, action="skip", signal="s", reason="r", batch=(x, y),
                  model=model, optimizer=adam(model), recorded=rec)  # fmt: skip
    writer = IncidentWriter(tmp_path)
    right = writer.write(BundleSpec(rng=before, **common))
    wrong = writer.write(BundleSpec(rng=forward_rng_state(), **common))
    assert right is not None and wrong is not None
    assert replay(right, lambda: L.mlp(seed=1, dropout=0.5)).differs == []
    assert replay(wrong, lambda: L.mlp(seed=1, dropout=0.5)).kind == "transient"


def test_the_worked_example_in_the_docs_runs_and_prints_what_it_says(tmp_path, monkeypatch):
    doc = (Path(__file__).parents[1] / "docs" / "replay.md").read_text("utf-8")
    code = doc.split("```python\n", 1)[1].split("```", 1)[0]
    printed = doc.split("It prints:\n\n```\n", 1)[1].split("```", 1)[0]
    script = tmp_path / "example.py"
    script.write_text(code)
    monkeypatch.chdir(tmp_path)
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300, check=True
    ).stdout
    assert out == printed
    assert json.loads((tmp_path / "incident-30.json").read_text())["culprits"] == [11]


class KeywordModel(nn.Module):
    """A model called as Hugging Face models are: ``model(**batch)``, returning ``{"loss"}``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = L.mlp(dropout=0.0)

    def forward(self, inputs: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.body(inputs)
        return {"logits": out, "loss": nn.functional.mse_loss(out, labels)}


def test_keyword_batch_as_a_framework_hands_it(tmp_path):
    model = KeywordModel()
    x, y = L.batch(0)
    x[7] = float("inf")
    batch = {"inputs": x, "labels": y}
    out = model(**batch)
    out["loss"].backward()
    path = IncidentWriter(tmp_path).write(BundleSpec(
        step=0, position=0, action="skip", signal="nonfinite", reason="inf loss", batch=batch,
        rng=forward_rng_state(), model=model, optimizer=adam(model),
        recorded={"loss": out["loss"].detach(), "grad_norm": L.grad_norm(model)},
    ))  # fmt: skip
    assert path is not None and set(load_bundle(path).batch) == {"inputs", "labels"}
    r = replay(path, KeywordModel)
    assert r.kind == "data", r.summary
    assert r.culprits == [7]


def test_model_state_finite_weights_that_overflow_any_batch(tmp_path):
    model = L.mlp(dropout=0.0)

    def grow(step: int) -> None:
        if step == 4:
            with torch.no_grad():
                model[0].weight.mul_(1e38)  # finite, but any real input overflows the matmul

    path = L.train(model, adam(model), tmp_path, 8, before_step=grow)
    r = replay(path, lambda: L.mlp(seed=1, dropout=0.0))
    assert r.kind == "model-state", r.summary
    # the overflow surfaces downstream (in the loss), far from the weight: the summary names it
    assert r.origin is not None and r.origin["op"] == "aten.mse_loss"
    assert "largest weight is 0.weight" in r.summary
    assert r.model is not None and r.model["known_good"][-1]["finite"] is False
