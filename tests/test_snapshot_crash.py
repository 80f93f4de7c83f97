"""On-disk snapshots survive SIGKILL at random moments, corruption and truncation.

A writer process pushes snapshots back to back (so most random moments fall inside a write)
and is killed with SIGKILL after a random delay, again and again on the same directory. After
every kill the newest completed snapshot must be there and intact, every visible snapshot file
must load with ``torch.load(weights_only=True)``, and the next writer resumes from it.
"""

from __future__ import annotations

import io
import os
import random
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradguard.core.snapshot import SnapshotError, SnapshotStore, load_snapshot, save_snapshot
from tests import _snapshot_worker as sw
from tests._dist_scale import tally

KILLS = 20
# Imported once by the fork server, so each writer starts in milliseconds. torch._dynamo is what
# an optimizer's first step() imports (seconds).
PRELOAD = [
    "torch",
    "torch._dynamo",
    "torch.optim",
    "gradguard.guard.guard",
    "tests._snapshot_worker",
]


def _ctx() -> Any:
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def _kill_cycle(ctx: Any, directory: Path, rng: random.Random) -> tuple[int, bool]:
    """Start a writer and SIGKILL it at a random moment inside a snapshot write.

    The writer counts the snapshot files it begins; once it has completed one push (so its
    duration is known) the parent waits for the next one to begin and kills it after a delay
    drawn uniformly over that duration. Returns (last completed step, torn: a temp file left).
    """
    ready = ctx.Event()
    done, started, seconds = ctx.RawValue("q", -1), ctx.RawValue("q", 0), ctx.RawValue("d", 0)
    before = set(sw.temp_files(str(directory)))
    p = ctx.Process(
        target=sw.write_forever, args=(str(directory), ready, done, started, seconds), daemon=True
    )
    p.start()
    try:
        assert ready.wait(60), "writer did not start"
        deadline = time.monotonic() + 60
        while seconds.value == 0 and time.monotonic() < deadline:
            time.sleep(0.001)
        begun = started.value
        while started.value == begun and time.monotonic() < deadline:
            time.sleep(0.0002)
        time.sleep(rng.uniform(0.0, seconds.value))
    finally:
        os.kill(p.pid, signal.SIGKILL)  # type: ignore[arg-type]
        p.join(10)
    assert p.exitcode == -signal.SIGKILL
    torn = bool(set(sw.temp_files(str(directory))) - before)
    return int(done.value), torn


def test_sigkill_during_snapshot_writes_never_loses_the_last_good_one(tmp_path: Path) -> None:
    ctx = _ctx()
    rng = random.Random(1234)
    torn_writes = 0
    steps_seen = []
    for kill in range(KILLS):
        last_done, torn = _kill_cycle(ctx, tmp_path, rng)
        torn_writes += torn
        files = sorted(tmp_path.glob("snapshot-*.pt"))
        assert files, f"kill {kill}: no snapshot file left"
        # Every visible snapshot file is complete: the rename is atomic, temp files are hidden.
        for f in files:
            snap = load_snapshot(f)
            assert sw.snapshot_matches(snap), f"kill {kill}: {f.name} has torn content"
            raw = torch.load(f, map_location="cpu", weights_only=True)
            assert raw["data"]["step"] == snap["step"]
        store = SnapshotStore(tmp_path, keep=2)
        store.scan()
        newest = store.latest()
        assert newest is not None and not store.errors
        # Nothing completed is lost; at most the push in flight when the kill came is there too.
        assert last_done <= int(newest["step"]) <= last_done + 1 or last_done == -1
        steps_seen.append(int(newest["step"]))
    # The runs really did resume from each other and really were killed inside writes.
    assert steps_seen == sorted(steps_seen) and steps_seen[-1] >= KILLS
    # Most kills must land before the rename (a temp file is left); the rest fall in the
    # directory fsync and clean-up after it, also inside push().
    assert torn_writes >= KILLS // 4, f"only {torn_writes} of {KILLS} kills tore a write"
    tally("kills", KILLS, torn_writes)


# --- corruption and truncation --------------------------------------------------------------


@pytest.fixture(scope="module")
def two_snapshots(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from gradguard.core.snapshot import capture

    d = tmp_path_factory.mktemp("snaps")
    for step in (1, 2):
        model, opt = sw.filled_run(step)
        store = SnapshotStore(d, keep=2)
        store.scan()
        store.push(capture(model, opt, step=step, position=step))
    old, new = sorted(d.glob("snapshot-*.pt"))
    return old, new


DAMAGE = st.one_of(
    st.tuples(st.just("truncate"), st.floats(min_value=0.0, max_value=0.999)),
    st.tuples(st.just("flip"), st.floats(min_value=0.0, max_value=0.999)),
    st.tuples(st.just("zero"), st.floats(min_value=0.0, max_value=0.99)),
)


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(damage=DAMAGE)
def test_damaged_snapshot_gives_a_clear_error_and_the_store_falls_back(
    two_snapshots: tuple[Path, Path], damage: tuple[str, float], tmp_path: Path
) -> None:
    old_bytes, new_bytes = (p.read_bytes() for p in two_snapshots)
    d = Path(tempfile.mkdtemp(dir=tmp_path))  # one fresh directory per example
    (d / "snapshot-000000001.pt").write_bytes(old_bytes)
    kind, where = damage
    at = int(where * len(new_bytes))
    if kind == "truncate":
        bad = new_bytes[:at]
    elif kind == "flip":
        bad = new_bytes[:at] + bytes([new_bytes[at] ^ 0xFF]) + new_bytes[at + 1 :]
    else:
        n = max(1, len(new_bytes) // 100)
        bad = new_bytes[:at] + bytes(n) + new_bytes[at + n :]
    newest = d / "snapshot-000000002.pt"
    newest.write_bytes(bad)
    try:
        snap = load_snapshot(newest)
    except SnapshotError as e:
        assert "snapshot" in str(e) and str(newest) in str(e)
        store = SnapshotStore(d, keep=2)
        store.scan()
        fallback = store.latest()
        assert fallback is not None and fallback["step"] == 1 and sw.snapshot_matches(fallback)
        assert store.errors and "snapshot-000000002.pt" in store.errors[0]
        tally("damage_caught", kind)
        return
    tally("damage_loaded", kind)
    # Damage that loads (zip padding, a timestamp): then the content must be exactly intact.
    assert snap["step"] == 2 and sw.snapshot_matches(snap)


def test_snapshot_files_hold_no_pickled_objects(tmp_path: Path) -> None:
    """weights_only=True loads them, and a file with an arbitrary object is refused."""
    from gradguard.core.snapshot import capture

    model, opt = sw.filled_run(3)
    path = save_snapshot(tmp_path / "s.pt", capture(model, opt, step=3, position=3))
    torch.load(path, map_location="cpu", weights_only=True)

    class Evil:
        def __reduce__(self) -> Any:
            return (os.system, ("echo pwned",))

    evil = tmp_path / "evil.pt"
    torch.save({"format": "gradguard.snapshot", "version": 1, "data": Evil()}, evil)
    with pytest.raises(SnapshotError, match="cannot be read"):
        load_snapshot(evil)


# --- resuming from disk continues the same trajectory -----------------------------------------


def _call(ctx: Any, fn_name: str, *args: Any, timeout: float = 120) -> dict[str, Any]:
    q = ctx.Queue()
    p = ctx.Process(target=sw.call_into, args=(q, fn_name, *args), daemon=True)
    p.start()
    try:
        status, payload = q.get(timeout=timeout)
    finally:
        p.join(10)
        if p.is_alive():
            p.kill()
    assert status == "ok", payload
    return torch.load(io.BytesIO(payload), weights_only=True)  # type: ignore[no-any-return]


def test_a_run_killed_and_resumed_from_disk_stays_on_the_same_trajectory(tmp_path: Path) -> None:
    delay = random.Random(7).uniform(0.2, 0.6)
    ctx = _ctx()
    ready = ctx.Event()
    done = ctx.RawValue("q", -1)
    p = ctx.Process(
        target=sw.train_with_checkpoints, args=(str(tmp_path), ready, done, 0.05), daemon=True
    )
    p.start()
    assert ready.wait(60)
    time.sleep(delay)
    os.kill(p.pid, signal.SIGKILL)  # type: ignore[arg-type]
    p.join(10)
    resumed = _call(ctx, "resume_and_finish", str(tmp_path))
    reference = _call(ctx, "uninterrupted")
    assert resumed["start"] >= max(0, int(done.value))  # resumed from the newest checkpoint
    assert resumed["start"] < sw.STEPS, "the kill came after the run finished"
    for a, b in zip(resumed["params"], reference["params"]):
        assert torch.equal(a, b)
    tally("resume", resumed["start"])
