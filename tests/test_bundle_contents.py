"""What an incident bundle holds, field by field, and how the incident writer names and caps them.

A bundle is what replay and a person reading an incident rely on after the process is gone, so
each entry is pinned here: the snapshot's entries (model, optimizer, scheduler, scaler, RNG), the
incident entry's keys and values (format, version, batch kind, size and note, sampler, history,
config, versions, rank and world size, device, parameter names, autocast dtype), the rules that
turn batches, configs and history rows into plain storable values, and the writer's argument
checks, defaults, file names (rank suffix, ``-1``, ``-2`` on a name clash) and failure handling.
"""

from __future__ import annotations

import platform
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

from gradguard.core.snapshot import (
    capture,
    forward_rng_state,
    restore,
    rng_state,
    save_snapshot,
)
from gradguard.core.version import version
from gradguard.guard.incident import IncidentWriter
from gradguard.records.bundle import (
    DEFAULT_ACTIONS,
    BundleError,
    BundleSpec,
    dist_rank,
    load_bundle,
    make_bundle,
    plain,
)

SNAPSHOT_KEYS = {
    "format", "version", "step", "position", "model", "optimizer", "scheduler", "scaler", "rng",
    "guard", "incident",
}  # fmt: skip
INCIDENT_KEYS = {
    "format", "version", "action", "signal", "reason", "recorded", "batch_kind", "batch",
    "batch_bytes", "batch_note", "sampler", "history", "config", "versions", "rank",
    "world_size", "training", "device", "optimizer_class", "param_names", "amp_dtype",
}  # fmt: skip


class Opaque:
    """An object a bundle cannot hold as such (a policy, a sampler's generator)."""

    def __repr__(self) -> str:
        return "Opaque()"


class DuckScaler:
    """A loss scaler with a state dict but no ``is_enabled`` (not torch's GradScaler)."""

    def state_dict(self) -> dict[str, Any]:
        return {"scale": 8.0}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def linear() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(4, 2)


def xy(rows: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(rows, 4, generator=g), torch.randn(rows, 2, generator=g)


def spec(model: nn.Module | None = None, optimizer: Any = None, **kw: Any) -> BundleSpec:
    model = model if model is not None else linear()
    if optimizer is None:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    args: dict[str, Any] = dict(step=5, position=7, action="skip", signal="spike:loss",
                                reason="loss 10x", batch=xy(), rng=forward_rng_state(),
                                model=model, optimizer=optimizer)  # fmt: skip
    args.update(kw)
    return BundleSpec(**args)


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def fake_dist(monkeypatch: pytest.MonkeyPatch, rank: int, world: int) -> None:
    """This process as rank ``rank`` of an initialized process group of ``world`` processes."""
    d = torch.distributed
    monkeypatch.setattr(d, "is_available", lambda: True)
    monkeypatch.setattr(d, "is_initialized", lambda: True)
    monkeypatch.setattr(d, "get_rank", lambda *a, **k: rank)
    monkeypatch.setattr(d, "get_world_size", lambda *a, **k: world)


# -- the entries of a bundle ---------------------------------------------------------------------


def test_a_bundle_has_exactly_the_documented_entries_and_values(tmp_path: Path) -> None:
    x, y = xy()
    s = spec(batch=(x, y), sampler={"epoch": 2}, recorded={"loss": torch.tensor(1.5)})
    snap = make_bundle(s)
    assert set(snap) == SNAPSHOT_KEYS
    inc = snap["incident"]
    assert set(inc) == INCIDENT_KEYS
    assert (inc["format"], inc["version"]) == ("gradguard.incident", 1)
    assert inc["batch_kind"] == "tensors" and inc["batch_note"] == ""
    assert inc["batch_bytes"] == nbytes(x, y)
    assert inc["sampler"] is None  # the batch itself is stored: no sampler state beside it
    assert inc["versions"] == {
        "gradguard": version(), "torch": str(torch.__version__),
        "python": platform.python_version(),
    }  # fmt: skip
    assert (inc["rank"], inc["world_size"], inc["device"]) == (None, 1, "cpu")
    assert inc["training"] is True and inc["amp_dtype"] is None
    assert inc["param_names"] == ["weight", "bias"]
    assert inc["optimizer_class"] == "torch.optim.sgd.SGD"
    assert inc["recorded"] == {"loss": 1.5}
    assert set(snap["model"]) == {"weight", "bias"}

    path = IncidentWriter(tmp_path).write(s)
    assert path is not None
    b = load_bundle(path)
    assert (b.step, b.position, b.sampler, b.has_batch, b.world_size) == (5, 7, None, True, 1)
    assert (b.meta["format"], b.meta["version"], b.meta["batch_bytes"]) == (
        "gradguard.incident", 1, nbytes(x, y)
    )  # fmt: skip
    assert set(b.meta) == INCIDENT_KEYS - {"action", "signal", "reason", "recorded", "history",
                                           "batch", "sampler"}  # fmt: skip
    assert torch.equal(b.batch[0], x) and torch.equal(b.batch[1], y)


def test_the_training_mode_is_recorded() -> None:
    model = linear().eval()
    assert make_bundle(spec(model))["incident"]["training"] is False


def test_scheduler_and_scaler_states_are_stored_and_restore(tmp_path: Path) -> None:
    model = linear()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for _ in range(2):
        opt.step()
        sched.step()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    snap = make_bundle(spec(model, opt, scheduler=sched, scaler=scaler))
    assert snap["scheduler"] == sched.state_dict() and snap["scheduler"]["last_epoch"] == 2
    assert snap["scaler"] == scaler.state_dict() and snap["scaler"]["scale"] == 1024.0
    assert snap["incident"]["amp_dtype"] == "float16"  # a GradScaler means fp16 autocast

    path = IncidentWriter(tmp_path).write(
        spec(model, opt, scheduler=sched, scaler=scaler, rng=rng_state())
    )
    assert path is not None
    for _ in range(3):
        opt.step()
        sched.step()
    fresh = torch.amp.GradScaler("cpu", init_scale=2.0)
    restore(load_bundle(path).snapshot, model, opt, sched, fresh)
    assert sched.last_epoch == 2 and opt.param_groups[0]["lr"] == pytest.approx(0.025)
    assert fresh.get_scale() == 1024.0


def test_no_scheduler_or_scaler_stores_none() -> None:
    snap = make_bundle(spec())
    assert snap["scheduler"] is None and snap["scaler"] is None


@pytest.mark.parametrize(
    ("amp_dtype", "scaler", "expected"),
    [
        (None, None, None),
        (torch.bfloat16, None, "bfloat16"),
        (torch.float16, None, "float16"),
        ("bf16", None, "bf16"),
        (None, "enabled", "float16"),
        (torch.bfloat16, "enabled", "bfloat16"),  # the caller's dtype wins over the scaler's
        (None, "disabled", None),
        (None, "duck", None),  # a scaler without is_enabled() implies nothing
    ],
)
def test_autocast_dtype(amp_dtype: Any, scaler: str | None, expected: str | None) -> None:
    scalers: dict[Any, Any] = {
        None: None,
        "enabled": torch.amp.GradScaler("cpu"),
        "disabled": torch.amp.GradScaler("cpu", enabled=False),
        "duck": DuckScaler(),
    }
    snap = make_bundle(spec(amp_dtype=amp_dtype, scaler=scalers[scaler]))
    assert snap["incident"]["amp_dtype"] == expected
    if scaler == "duck":
        assert snap["scaler"] == {"scale": 8.0}


# -- the batch -----------------------------------------------------------------------------------


def test_a_batch_exactly_at_the_cap_is_stored_one_byte_over_is_not() -> None:
    x, y = xy()
    size = nbytes(x, y)
    sampler = {"epoch": 1, "index": 48, "generator": Opaque(), "order": [3, Opaque()]}
    at = make_bundle(spec(batch=(x, y), sampler=sampler), max_batch_bytes=size)["incident"]
    assert (at["batch_kind"], at["batch_note"], at["sampler"]) == ("tensors", "", None)
    assert torch.equal(at["batch"][0], x)
    over = make_bundle(spec(batch=(x, y), sampler=sampler), max_batch_bytes=size - 1)["incident"]
    assert over["batch_kind"] == "position" and over["batch"] is None
    assert over["batch_bytes"] == size
    assert over["batch_note"] == f"batch not stored: {size} bytes > max_batch_bytes={size - 1}"
    # the sampler's state is stored instead, objects in it as their repr
    assert over["sampler"] == {"epoch": 1, "index": 48, "generator": "Opaque()",
                               "order": [3, "Opaque()"]}  # fmt: skip


def test_no_batch_is_a_position_bundle_without_a_note(tmp_path: Path) -> None:
    inc = make_bundle(spec(batch=None, sampler={"index": 3}))["incident"]
    assert (inc["batch_kind"], inc["batch"], inc["batch_bytes"], inc["batch_note"]) == (
        "position", None, 0, ""
    )  # fmt: skip
    assert inc["sampler"] == {"index": 3}
    path = IncidentWriter(tmp_path).write(spec(batch=None))
    assert path is not None and not load_bundle(path).has_batch


def test_a_batch_holding_an_object_is_not_stored_and_says_why() -> None:
    x, _ = xy()
    inc = make_bundle(spec(batch={"x": x, "meta": Opaque()}))["incident"]
    assert inc["batch_kind"] == "position" and inc["batch"] is None
    assert inc["batch_note"].startswith("batch not stored: ")
    assert "Opaque is not storable" in inc["batch_note"]


def test_batch_bytes_count_tensors_only_in_dicts_and_lists() -> None:
    x, y = xy()
    batch = {"inputs": x, "labels": [y, 7], "n": 3, "tag": "a"}
    inc = make_bundle(spec(batch=batch))["incident"]
    assert inc["batch_bytes"] == nbytes(x, y)
    assert inc["batch_kind"] == "tensors"
    assert inc["batch"]["n"] == 3 and inc["batch"]["labels"][1] == 7
    assert torch.equal(inc["batch"]["inputs"], x)


# -- history and config as plain values ----------------------------------------------------------


def test_history_rows_are_read_back_to_numbers_and_objects_to_text() -> None:
    row = {
        "step": 4,
        "loss": torch.tensor(2.5),
        "norms": [torch.tensor(1.0), 2.0, (torch.tensor(3.0),)],
        "layers": {"weight": torch.tensor(0.5)},
        "policy": Opaque(),
        "dtype": torch.float16,
        "trace": torch.tensor([1.0, 2.0]),
    }
    (out,) = make_bundle(spec(history=[row]))["incident"]["history"]
    trace = out.pop("trace")
    assert out == {
        "step": 4, "loss": 2.5, "norms": [1.0, 2.0, [3.0]], "layers": {"weight": 0.5},
        "policy": "Opaque()", "dtype": "torch.float16",
    }  # fmt: skip
    assert torch.equal(trace, torch.tensor([1.0, 2.0]))


def test_config_objects_keys_and_dtypes_are_stored_as_text(tmp_path: Path) -> None:
    config = {
        "policy": Opaque(),
        "detectors": [Opaque(), "spike"],
        (1, 2): "tuple key",
        3: "int key",
        "dtype": torch.bfloat16,
        "nested": {"inner": [Opaque()]},
    }
    expected = {
        "policy": "Opaque()",
        "detectors": ["Opaque()", "spike"],
        "(1, 2)": "tuple key",
        3: "int key",
        "dtype": "torch.bfloat16",
        "nested": {"inner": ["Opaque()"]},
    }
    assert make_bundle(spec(config=config))["incident"]["config"] == expected
    path = IncidentWriter(tmp_path).write(spec(config=config))
    assert path is not None and load_bundle(path).config == expected


def test_plain_refuses_objects_unless_lossy() -> None:
    with pytest.raises(TypeError, match="Opaque is not storable"):
        plain(Opaque())
    with pytest.raises(TypeError, match="not storable"):
        plain({(1, 2): 1})
    with pytest.raises(TypeError, match="not storable"):
        plain([1, [Opaque()]])
    assert plain({(1, 2): [Opaque()]}, lossy=True) == {"(1, 2)": ["Opaque()"]}
    assert plain((torch.float32, None, True, 1, 2.0, "s")) == ["torch.float32", None, True, 1,
                                                               2.0, "s"]  # fmt: skip


# -- parameter names and device ------------------------------------------------------------------


def test_a_parameter_the_model_does_not_own_has_an_empty_name() -> None:
    model = linear()
    extra = nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([{"params": list(model.parameters())}, {"params": [extra]}], lr=0.1)
    assert make_bundle(spec(model, opt))["incident"]["param_names"] == ["weight", "bias", ""]


def test_a_model_without_parameters_is_on_the_cpu() -> None:
    model = nn.Sequential(nn.ReLU())
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1)
    inc = make_bundle(spec(model, opt))["incident"]
    assert inc["device"] == "cpu" and inc["param_names"] == [""]


# -- loading -------------------------------------------------------------------------------------


def test_a_snapshot_that_is_no_bundle_is_refused_by_file_name(tmp_path: Path) -> None:
    model = linear()
    path = save_snapshot(
        tmp_path / "plain-snapshot.pt",
        capture(model, torch.optim.SGD(model.parameters(), lr=0.1), step=0, position=0),
    )
    with pytest.raises(BundleError) as err:
        load_bundle(path)
    assert str(err.value).startswith(f"{path} is a gradguard snapshot but not an incident bundle")


def test_the_incident_version_is_checked_and_may_be_absent(tmp_path: Path) -> None:
    snap = make_bundle(spec())
    del snap["incident"]["version"]  # an early bundle: read as version 0
    old = save_snapshot(tmp_path / "old.pt", snap)
    b = load_bundle(old)
    assert b.path == old and b.action == "skip" and "version" not in b.meta
    snap["incident"]["version"] = 2
    newer = save_snapshot(tmp_path / "newer.pt", snap)
    with pytest.raises(BundleError, match="incident version 2, newer than this gradguard reads"):
        load_bundle(newer)


class RawPickler:
    """Writes a hand-made protocol-0 pickle (the INST opcode builds an OrderedDict): what an old
    or forged file may hold instead of torch's own pickle."""

    def __init__(self, f: Any, protocol: int = 2) -> None:
        self.f = f

    def dump(self, obj: Any) -> None:
        self.f.write(b"(icollections\nOrderedDict\n.")


def test_a_hand_made_pickle_is_refused_as_a_pickled_object(tmp_path: Path) -> None:
    path = tmp_path / "forged.pt"
    torch.save({"a": 1}, path, pickle_module=SimpleNamespace(Pickler=RawPickler, __name__="raw"))
    with pytest.raises(BundleError, match="holds a pickled Python object and was refused"):
        load_bundle(path)


# -- ranks ---------------------------------------------------------------------------------------


def test_rank_without_a_process_group() -> None:
    assert dist_rank() is None


@pytest.mark.parametrize(("rank", "world", "named"), [(0, 1, None), (1, 2, 1), (2, 3, 2)])
def test_rank_in_a_process_group(monkeypatch, tmp_path, rank, world, named) -> None:
    fake_dist(monkeypatch, rank, world)
    assert dist_rank() == named  # a rank in file names only with more than one process
    inc = make_bundle(spec())["incident"]
    assert (inc["rank"], inc["world_size"]) == (rank, world)
    suffix = "" if named is None else f"-rank{named}"
    assert IncidentWriter(tmp_path).path(4).name == f"incident-000000004{suffix}.pt"
    # an explicit rank wins over the process group's
    assert IncidentWriter(tmp_path, rank=7).path(4).name == "incident-000000004-rank7.pt"
    path = IncidentWriter(tmp_path / "w").write(spec(step=4))
    assert path is not None and load_bundle(path).world_size == world


# -- the writer ----------------------------------------------------------------------------------


def test_writer_defaults(tmp_path: Path) -> None:
    w = IncidentWriter(tmp_path)
    assert w.actions == DEFAULT_ACTIONS == ("skip", "rollback", "abort")
    assert (w.max_count, w.max_batch_bytes) == (20, 64 * 2**20)
    assert (w.written, w.dropped, w.errors) == ([], 0, [])
    w.load_state_dict({"written": [str(tmp_path / f"{i}.pt") for i in range(19)], "dropped": 0})
    assert w.wants("skip")  # the 20th is still written
    w.load_state_dict({"written": [str(tmp_path / f"{i}.pt") for i in range(20)], "dropped": 0})
    assert not w.wants("skip")


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"actions": "skip"}, TypeError, "^actions must be a sequence"),
        ({"actions": ["skip", 1]}, TypeError, "^actions must be a sequence"),
        ({"max_count": -1}, ValueError, "^max_count must be an int >= 0"),
        ({"max_count": True}, ValueError, "^max_count must be an int >= 0"),
        ({"max_count": 2.5}, ValueError, "^max_count must be an int >= 0"),
        ({"max_batch_bytes": -1}, ValueError, "^max_batch_bytes must be an int >= 0"),
        ({"max_batch_bytes": True}, ValueError, "^max_batch_bytes must be an int >= 0"),
        ({"max_batch_bytes": 1.5}, ValueError, "^max_batch_bytes must be an int >= 0"),
        ({"rank": -1}, ValueError, "^rank must be an int >= 0"),
        ({"rank": True}, ValueError, "^rank must be an int >= 0"),
        ({"rank": 1.0}, ValueError, "^rank must be an int >= 0"),
    ],
)
def test_writer_refuses_bad_arguments(tmp_path, kwargs, error, message) -> None:
    with pytest.raises(error, match=message):
        IncidentWriter(tmp_path, **kwargs)


def test_zero_is_a_valid_count_cap_and_rank(tmp_path: Path) -> None:
    none = IncidentWriter(tmp_path / "none", max_count=0)
    assert not none.wants("skip")
    assert none.write(spec()) is None and none.dropped == 1 and none.written == []

    x, y = xy()
    w = IncidentWriter(tmp_path, max_batch_bytes=0, rank=0)
    path = w.write(spec(step=3, batch=(x, y), sampler={"index": 9}))
    assert path is not None and path.name == "incident-000000003-rank0.pt"
    b = load_bundle(path)
    assert not b.has_batch and b.sampler == {"index": 9}


def test_explicit_rank_names_the_file(tmp_path: Path) -> None:
    assert IncidentWriter(tmp_path, rank=3).path(12).name == "incident-000000012-rank3.pt"
    assert IncidentWriter(tmp_path).path(12).name == "incident-000000012.pt"


@pytest.mark.timeout(60)
def test_name_clashes_count_up_from_one(tmp_path: Path) -> None:
    w = IncidentWriter(tmp_path)
    paths = [w.write(spec(step=5)) for _ in range(3)]
    assert [p.name for p in paths if p is not None] == [
        "incident-000000005.pt", "incident-000000005-1.pt", "incident-000000005-2.pt"
    ]  # fmt: skip
    assert w.written == paths
    (tmp_path / "incident-000000005-3.pt").touch()
    (tmp_path / "incident-000000005-4.pt").touch()
    assert w.path(5).name == "incident-000000005-5.pt"
    assert w.path(6).name == "incident-000000006.pt"


def test_a_failed_write_is_recorded_not_raised(tmp_path: Path, caplog) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    w = IncidentWriter(blocker / "incidents")
    assert w.write(spec(step=9)) is None
    assert w.written == [] and len(w.errors) == 1
    assert w.errors[0].startswith("step 9: ")
    assert "not written" in caplog.text
    ok = IncidentWriter(tmp_path / "ok")
    path = ok.write(spec(step=9))
    assert path is not None and ok.written == [path] and ok.errors == []


def test_restore_puts_a_run_back_to_the_start_of_a_guard_written_incident(tmp_path) -> None:
    # The bundle the guard writes holds the RNG state from before the step's forward (torch's,
    # CUDA's) beside the others (numpy, Python): restore() sets every one of them.
    from gradguard import Guard, GuardConfig
    from gradguard.core.snapshot import restore

    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = Guard(model, opt, config=GuardConfig(incident_dir=str(tmp_path)))
    for step in range(3):
        x = torch.randn(8, 4)
        if step == 2:  # the state at the incident step's forward
            weights = [p.detach().clone() for p in model.parameters()]
            rng = torch.get_rng_state()
            x[0] = float("nan")
        loss = nn.functional.mse_loss(model(x), x[:, :1])
        loss.backward()
        guard.step(loss, batch=(x,))
        opt.zero_grad()
    (path,) = tmp_path.glob("*.pt")
    torch.manual_seed(123)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    restore(load_bundle(path).snapshot, model, opt)
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights, strict=True))
    assert torch.equal(torch.get_rng_state(), rng)
