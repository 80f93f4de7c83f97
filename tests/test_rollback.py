"""Snapshots (memory and disk), their crash safety and checksums, the skip list and sampler."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from gradguard.core.snapshot import (
    SnapshotError,
    SnapshotStore,
    capture,
    checksum,
    load_snapshot,
    restore,
    rng_state,
    save_snapshot,
    set_rng_state,
)
from gradguard.guard.rollback import SkipList, SkipSampler


def _trained() -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Linear(5, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, 2, 0.5)
    for _ in range(3):
        model(torch.randn(4, 3)).pow(2).mean().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    return model, opt, sched


def _perturb(model: nn.Module, opt: torch.optim.Optimizer, sched: object) -> None:
    for _ in range(2):
        model(torch.randn(4, 3)).pow(2).mean().backward()
        opt.step()
        sched.step()  # type: ignore[attr-defined]
        opt.zero_grad()
    torch.rand(3)
    np.random.rand(2)
    random.random()


def _equal_trees(a: object, b: object) -> bool:
    return checksum(a) == checksum(b)


def test_rng_state_roundtrip_covers_every_generator() -> None:
    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    np.random.randn()  # leaves a cached gaussian in numpy's state
    state = rng_state()
    want = (torch.rand(4), np.random.randn(3), [random.random() for _ in range(3)])
    set_rng_state(state)
    got = (torch.rand(4), np.random.randn(3), [random.random() for _ in range(3)])
    assert torch.equal(want[0], got[0])
    assert np.array_equal(want[1], got[1])
    assert want[2] == got[2]


def test_capture_and_restore_are_bitwise() -> None:
    model, opt, sched = _trained()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(torch.ones(()))  # the scale tensor is created lazily
    snap = capture(model, opt, sched, scaler, step=3, position=3, guard={"x": torch.ones(2)})
    ref_model = {k: v.clone() for k, v in model.state_dict().items()}
    ref_rand = torch.rand(2)
    _perturb(model, opt, sched)
    scaler.update(new_scale=2.0)
    assert not _equal_trees(model.state_dict(), ref_model)
    restore(snap, model, opt, sched, scaler)
    assert _equal_trees(model.state_dict(), ref_model)
    assert _equal_trees(opt.state_dict(), snap["optimizer"])
    assert sched.state_dict() == snap["scheduler"]
    assert scaler.get_scale() == 1024.0
    assert torch.equal(torch.rand(2), ref_rand)
    # The snapshot itself was not consumed: training on after a restore leaves it intact, so a
    # second rollback to it is exact too (torch's optimizer would alias its tensors).
    ref_opt = checksum(snap["optimizer"])
    _perturb(model, opt, sched)
    assert checksum(snap["optimizer"]) == ref_opt
    restore(snap, model, opt, sched, scaler)
    assert _equal_trees(model.state_dict(), ref_model)
    assert _equal_trees(opt.state_dict(), snap["optimizer"])


def test_disk_snapshot_loads_with_weights_only_and_verifies(tmp_path: Path) -> None:
    model, opt, sched = _trained()
    snap = capture(model, opt, sched, step=3, position=7)
    path = save_snapshot(tmp_path / "s.pt", snap)
    raw = torch.load(path, weights_only=True)  # plain torch, no custom classes
    assert raw["format"] == "gradguard.snapshot" and len(raw["sha256"]) == 64
    loaded = load_snapshot(path)
    assert _equal_trees(loaded, snap)
    assert loaded["position"] == 7
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_truncated_and_corrupted_files_give_clear_errors(tmp_path: Path) -> None:
    model, opt, sched = _trained()
    path = save_snapshot(tmp_path / "s.pt", capture(model, opt, sched, step=1, position=1))
    data = path.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(SnapshotError, match="truncated or corrupted"):
        load_snapshot(tmp_path / "trunc.pt")
    # Flip bytes inside a tensor's data: the archive still opens, the checksum catches it.
    weight = model.state_dict()["0.weight"].numpy().tobytes()
    at = data.find(weight)
    assert at > 0
    bad = bytearray(data)
    bad[at : at + 4] = bytes(4)
    (tmp_path / "flip.pt").write_bytes(bytes(bad))
    with pytest.raises(SnapshotError, match="checksum"):
        load_snapshot(tmp_path / "flip.pt")
    with pytest.raises(SnapshotError, match="does not exist"):
        load_snapshot(tmp_path / "missing.pt")
    torch.save({"a": 1}, tmp_path / "other.pt")
    with pytest.raises(SnapshotError, match="not a gradguard snapshot"):
        load_snapshot(tmp_path / "other.pt")


def test_failed_write_keeps_the_previous_file(tmp_path: Path) -> None:
    model, opt, sched = _trained()
    good = capture(model, opt, sched, step=1, position=1)
    path = save_snapshot(tmp_path / "s.pt", good)
    broken = dict(good, guard={"f": lambda: 0})  # torch.save cannot pickle a lambda
    with pytest.raises(Exception, match=r"lambda|pickle|Can't"):
        save_snapshot(path, broken)
    assert _equal_trees(load_snapshot(path), good)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.pt"]


def test_store_falls_back_to_the_previous_snapshot(tmp_path: Path) -> None:
    model, opt, sched = _trained()
    store = SnapshotStore(tmp_path, keep=2)
    for step in (10, 20, 30):
        store.push(capture(model, opt, sched, step=step, position=step))
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["snapshot-000000020.pt", "snapshot-000000030.pt"]
    newest = tmp_path / names[-1]
    newest.write_bytes(newest.read_bytes()[:100])
    snap = store.latest()
    assert snap is not None and snap["step"] == 20
    assert store.errors and "truncated" in store.errors[0]
    # A fresh store ignores old files until asked to adopt them.
    fresh = SnapshotStore(tmp_path)
    assert fresh.latest() is None and fresh.scan() == 2
    adopted = fresh.latest()
    assert adopted is not None and adopted["step"] == 20


def test_memory_store_keeps_the_last_and_filters_by_position() -> None:
    model, opt, sched = _trained()
    store = SnapshotStore(keep=2)
    assert store.latest() is None and not store.has()
    for step in (0, 10, 20):
        store.push(capture(model, opt, sched, step=step, position=step))
    assert len(store) == 2
    assert store.latest()["step"] == 20  # type: ignore[index]
    assert store.latest(max_position=15)["step"] == 10  # type: ignore[index]
    assert store.latest(max_position=5) is None
    assert store.has(10) and not store.has(9)
    with pytest.raises(ValueError, match="keep"):
        SnapshotStore(keep=0)


def test_skip_list_merges_and_roundtrips() -> None:
    s = SkipList()
    s.add(5, 7)
    s.add(8, 9)
    s.add(20, 20)
    assert s.windows == [(5, 9), (20, 20)]
    assert [i for i in range(25) if s.contains(i)] == [5, 6, 7, 8, 9, 20]
    assert s.next_allowed(5) == 10 and s.next_allowed(4) == 4 and s.next_allowed(20) == 21
    assert len(s) == 6
    t = SkipList()
    t.load_state_dict(s.state_dict())
    assert t.windows == s.windows
    for bad in ((-1, 2), (3, 1), (1.5, 2)):
        with pytest.raises(ValueError):
            s.add(*bad)  # type: ignore[arg-type]
    assert s.windows == [(5, 9), (20, 20)]


def test_skip_sampler_leaves_out_skipped_positions_across_epochs() -> None:
    s = SkipList()
    s.add(2, 3)
    s.add(6, 6)
    sampler = SkipSampler(range(5), s.contains)
    assert list(sampler) == [0, 1, 4]
    assert list(sampler) == [0, 2, 3, 4]  # second epoch: positions 5..9, 6 skipped
    one = SkipList()
    one.add(1, 1)
    batched = SkipSampler([[0, 1], [2, 3], [4, 5], [6, 7]], one.contains, per_step=2)
    assert list(batched) == [[0, 1], [2, 3]]  # two micro-batches per step: items 2, 3 -> 1
    state = sampler.state_dict()
    again = SkipSampler(range(5), s.contains)
    again.load_state_dict(state)
    assert again.count == 10
    with pytest.raises(ValueError, match="per_step"):
        SkipSampler(range(3), s.contains, per_step=0)


# --- per-rank files, FSDP2 shards, earlier runs in snapshot_dir ------------------------------


def test_ranks_share_a_directory_and_read_only_their_own_files(tmp_path: Path) -> None:
    model, opt, sched = _trained()
    stores = [SnapshotStore(tmp_path, keep=1, rank=r) for r in (0, 1)]
    for r, store in enumerate(stores):
        torch.manual_seed(r)  # different RNG state per rank, as under DDP
        store.push(capture(model, opt, sched, step=4, position=4))
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["snapshot-000000004-rank0.pt", "snapshot-000000004-rank1.pt"]
    for r in (0, 1):
        fresh = SnapshotStore(tmp_path, rank=r)
        assert fresh.scan() == 1 and [f.name for _, f in fresh.on_disk()] == [names[r]]
        snap = fresh.latest()
        assert snap is not None
        torch.manual_seed(r)
        assert torch.equal(snap["rng"]["torch"], torch.get_rng_state())
    # A single-process store ignores every rank's files, and a rank store the plain ones.
    assert SnapshotStore(tmp_path).scan() == 0
    SnapshotStore(tmp_path).push(capture(model, opt, step=9, position=9))
    assert SnapshotStore(tmp_path, rank=0).scan() == 1
    for bad in (-1, 1.0, True, "0"):
        with pytest.raises(ValueError, match="rank"):
            SnapshotStore(tmp_path, rank=bad)  # type: ignore[arg-type]


def _fsdp_disk_roundtrip(rank: int, world: int, directory: str) -> dict[str, object]:
    """FSDP2 on gloo: snapshot to one shared directory, train on, restore twice."""
    from tests import _dist_scale as ds

    model = ds._wrap(ds.make_model(), "fsdp", world)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)

    def train(pos: int) -> None:
        ds.loss_fn(model, *ds.batch(pos, rank, world)).backward()
        opt.step()
        opt.zero_grad()

    def local() -> list[torch.Tensor]:
        return [p.to_local().detach().clone() for p in model.parameters()]  # type: ignore[operator]

    train(0)
    store = SnapshotStore(directory, keep=2)
    torch.manual_seed(100 + rank)  # each rank's own RNG state must come back
    store.push(capture(model, opt, step=1, position=1))
    saved, rng = local(), torch.get_rng_state()
    snap = store.latest()
    assert snap is not None
    finals, restored = [], []
    for _ in range(2):  # restoring twice gives the same state: no aliasing of the snapshot
        restore(snap, model, opt)
        restored.append(
            all(torch.equal(a, b) for a, b in zip(local(), saved))
            and torch.equal(torch.get_rng_state(), rng)
        )
        train(1)
        train(2)
        finals.append(local())
    kinds = {type(v).__name__ for st in opt.state.values() for v in st.values()}
    return {
        "resumed": _resume_with_one_rank_damaged(rank, world, os.path.join(directory, "guard")),
        "names": sorted(n for n in os.listdir(directory) if n.endswith(".pt")),
        "restored": restored,
        "replayed_equal": all(torch.equal(a, b) for a, b in zip(*finals)),
        "state_kinds": sorted(kinds),
        "param_kinds": sorted({type(p).__name__ for p in model.parameters()}),
    }


def _resume_with_one_rank_damaged(rank: int, world: int, directory: str) -> list[int]:
    """Guarded FSDP2 run with snapshots every step; rank 1's newest file is then truncated. A
    resume must still pick the same step on every rank (the newest one all ranks can read)."""
    from gradguard.guard.guard import Guard, GuardConfig
    from tests import _dist_scale as ds

    def build() -> tuple[nn.Module, torch.optim.Optimizer, Guard]:
        model = ds._wrap(ds.make_model(), "fsdp", world)
        opt = torch.optim.AdamW(model.parameters(), lr=0.01)
        cfg = GuardConfig(snapshot_every=1, snapshot_dir=directory, detectors=[])
        return model, opt, Guard(model, opt, config=cfg)

    model, opt, guard = build()
    for pos in range(3):
        loss = ds.loss_fn(model, *ds.batch(pos, rank, world))
        loss.backward()
        guard.step(loss)
        opt.zero_grad()
    if rank == 1:
        newest = max(Path(directory).glob(f"snapshot-*-rank{rank}.pt"))
        newest.write_bytes(newest.read_bytes()[:-50])
    torch.distributed.barrier()
    model, opt, guard = build()  # a new process on every rank
    return [guard.resume(), guard.step_count, len(guard.snapshots.errors)]


def test_fsdp2_disk_snapshots_restore_each_ranks_own_shards(tmp_path: Path) -> None:
    from tests import _dist_scale as ds

    results = ds.launch(_fsdp_disk_roundtrip, 2, str(tmp_path), timeout=900.0)  # hang guard
    for r, res in enumerate(results):
        assert res["names"] == [f"snapshot-000000001-rank{k}.pt" for k in (0, 1)]
        assert res["restored"] == [True, True], r
        assert res["replayed_equal"], r
        assert res["resumed"] == [2, 2, r], r  # step 3 is unreadable on rank 1: all go to 2
        assert res["param_kinds"] == ["DTensor"] and "DTensor" in res["state_kinds"]  # type: ignore[operator]
    # The files hold plain tensors (a rank's shard), loadable anywhere with weights_only=True.
    for k in (0, 1):
        snap = load_snapshot(tmp_path / f"snapshot-000000001-rank{k}.pt")
        shards = [v for v in snap["model"].values() if isinstance(v, dict)]
        assert shards and all(type(s["local"]) is torch.Tensor for s in shards)


def test_guard_keeps_an_earlier_runs_snapshots_until_resumed(tmp_path: Path) -> None:
    from gradguard.guard.guard import Guard, GuardConfig

    def build() -> tuple[nn.Module, torch.optim.Optimizer, Guard]:
        torch.manual_seed(0)
        model = nn.Linear(3, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        cfg = GuardConfig(snapshot_every=2, snapshot_dir=str(tmp_path), detectors=[])
        return model, opt, Guard(model, opt, config=cfg)

    def step(model: nn.Module, guard: Guard) -> None:
        model(torch.randn(4, 3)).pow(2).mean().backward()
        guard.step(model(torch.randn(4, 3)).pow(2).mean().detach())

    model, opt, guard = build()
    for _ in range(3):
        step(model, guard)
        opt.zero_grad()
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert sorted(before) == ["snapshot-000000000.pt", "snapshot-000000002.pt"]
    model, opt, guard = build()  # a new process on the same directory
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # nothing overwritten
    with pytest.raises(ValueError, match=r"snapshot_dir.*resume"):
        step(model, guard)
    assert guard.step_count == 0 and {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert guard.resume() == 2 and guard.step_count == 2
    step(model, guard)  # continuing the earlier run is allowed
    assert guard.step_count == 3
