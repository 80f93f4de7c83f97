"""The rules a skip and a rollback follow, pinned batch by batch.

The position-driven ``SkipSampler`` (what ``Guard.skip_sampler`` wires to the guard's data
position): which batches it hands out after a rollback, in which epoch's order, which ones it
leaves out by identity in later epochs (ints, index lists, index tensors), with gradient
accumulation (and the count a mid-epoch checkpoint saves), and when a loop fetches batches
before stepping.
``SkipList`` and ``SkipSampler`` name the argument they refuse. ``Rollbacks`` labels a snapshot
taken inside a streak with the streak's start and keeps its snapshots after a resume.

What a skipped step leaves: module buffers and the RNG state from before the step's first
forward (two micro-batches included), the flag a fused optimizer reads on the parameters' device
and nothing stale after it, every param-group hyperparameter (a tensor learning rate in place,
nested and graph-attached values, a stateful ``LambdaLR`` callable), a disabled ``GradScaler``
untouched, and a scheduler's ``get_last_lr()`` read between steps.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, SequentialSampler, TensorDataset

from gradguard.core.snapshot import capture
from gradguard.guard.guard import Guard, GuardConfig
from gradguard.guard.response import Budgets
from gradguard.guard.rollback import Rollbacks, SkipList, SkipSampler
from gradguard.guard.skip import (
    BufferKeeper,
    GroupState,
    arm_found_inf,
    disarm_found_inf,
    scaler_unscaled,
    scaler_update,
    skips_without_grads,
)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- the guard's side of the position-driven sampler --------------------------------------------


class _Run:
    """The guard's side of ``Guard.skip_sampler``: a data position that each step moves to the
    next allowed position, ``drop_batch``, the bad windows' count as the version, and a
    rollback that adds a bad window and returns to a snapshot's position."""

    def __init__(self) -> None:
        self.skips = SkipList()
        self.position = 0

    def step(self) -> None:
        self.position = self.skips.next_allowed(self.position + 1)

    def drop(self) -> int:
        self.step()
        return self.position

    def rollback(self, to: int, window: tuple[int, int]) -> None:
        self.skips.add(*window)
        self.position = self.skips.next_allowed(to)

    def sampler(self, base: Any, per_step: int = 1, version: bool = True) -> SkipSampler:
        return SkipSampler(
            base,
            self.skips.contains,
            per_step=per_step,
            position=lambda: self.position,
            drop=self.drop,
            version=(lambda: len(self.skips.windows)) if version else None,
        )


class _Orders:
    """A sampler that draws a new order each epoch (a shuffling sampler whose draws are known)."""

    def __init__(self, *orders: list[int]) -> None:
        self.orders = list(orders)
        self.epoch = 0

    def __iter__(self) -> Iterator[int]:
        order = self.orders[self.epoch]
        self.epoch += 1
        return iter(order)

    def __len__(self) -> int:
        return len(self.orders[0])


class _Index(Dataset[int]):
    """Sample ``i`` is ``i``: what the loop receives names the item the sampler handed out."""

    def __getitem__(self, i: int) -> int:
        return int(i)

    def __len__(self) -> int:
        return 1000


def _items(sampler: SkipSampler) -> DataLoader[int]:
    return DataLoader(_Index(), sampler=sampler, batch_size=None)


def _epoch(
    run: _Run,
    loader: Iterable[Any],
    per_step: int = 1,
    rollbacks: dict[int, tuple[int, tuple[int, int]]] | None = None,
    counts: list[int] | None = None,
) -> list[tuple[int, Any]]:
    """One epoch of the loop: ``(position when the item came, item)``, a step after every
    ``per_step`` items and one for a short last group; ``rollbacks[p]`` is the rollback the step
    at position ``p`` ends in (once)."""
    got: list[tuple[int, Any]] = []
    sampler = getattr(loader, "sampler", None)
    for n, item in enumerate(loader, 1):
        got.append((run.position, item.tolist() if isinstance(item, torch.Tensor) else item))
        if counts is not None and isinstance(sampler, SkipSampler):
            counts.append(sampler.state_dict()["count"])
        if n % per_step == 0:
            at = run.position
            run.step()
            if rollbacks and at in rollbacks:
                run.rollback(*rollbacks.pop(at))
    if len(got) % per_step:
        run.step()
    return got


# --- bad windows and the sampler's arguments ----------------------------------------------------


def test_skip_list_names_the_bound_it_refuses() -> None:
    s = SkipList()
    with pytest.raises(ValueError, match=r"^start must be an int >= 0, got -1$"):
        s.add(-1, 3)
    with pytest.raises(ValueError, match=r"^end must be an int >= 0, got -2$"):
        s.add(0, -2)
    with pytest.raises(ValueError, match=r"^end must be >= start, got start=4, end=3$"):
        s.add(4, 3)
    s.add(3, 4)
    s.add(6, 7)
    s.add(5, 5)  # fills the gap: one window
    assert s.windows == [(3, 7)]


@pytest.mark.parametrize("name", ["position", "drop"])
def test_skip_sampler_names_the_hook_that_is_not_callable(name: str) -> None:
    with pytest.raises(TypeError, match=rf"^{name} must be callable or None$"):
        SkipSampler(range(4), lambda p: False, **{name: 3})


# --- replays after a rollback, across epochs ----------------------------------------------------


def test_a_rollback_into_the_previous_epoch_replays_it_in_that_epochs_order() -> None:
    """Six items an epoch, a new order each epoch. The step at position 7 (epoch 2) rolls back
    to the snapshot at 3 (epoch 1) with the bad window 4..7: the replay hands out epoch 1's item
    at 3, then epoch 2's from 8 on; the window's items (4, 5 from epoch 1; 1, 5 from epoch 2)
    are left out whenever a later epoch brings them, the replay included."""
    run = _Run()
    loader = _items(
        run.sampler(_Orders([0, 1, 2, 3, 4, 5], [1, 5, 0, 4, 2, 3], [5, 3, 1, 4, 0, 2]))
    )
    assert _epoch(run, loader) == [(0, 0), (1, 1), (2, 2), (3, 3), (4, 4), (5, 5)]
    assert _epoch(run, loader, rollbacks={7: (3, (4, 7))}) == [
        (6, 1),
        (7, 5),
        (3, 3),  # epoch 1's item at the snapshot's position
        (8, 0),
        # 9: item 4 was in the window (at 4): left out, the position moves past it
        (10, 2),
        (11, 3),
    ]
    assert run.skips.windows == [(4, 7)]
    # Epoch 3 (12..17): 5, 1 and 4 are left out by identity, the others at their positions.
    assert _epoch(run, loader) == [(13, 3), (16, 0), (17, 2)]
    assert run.position == 18


def test_a_rollback_that_lands_where_the_sampler_was_going_still_leaves_the_window_out() -> None:
    """The snapshot sits at the streak's start (5), so the rollback by the step at 7 lands at 8,
    the next position anyway: only the new window tells the sampler. The window straddles the
    epochs (epoch 1's item 5; epoch 2's 2 and 0), and each is left out when it comes again."""
    run = _Run()
    loader = _items(
        run.sampler(_Orders([0, 1, 2, 3, 4, 5], [2, 0, 3, 1, 5, 4], [4, 3, 2, 1, 0, 5]))
    )
    assert len(_epoch(run, loader)) == 6
    assert _epoch(run, loader, rollbacks={7: (5, (5, 7))}) == [
        (6, 2),
        (7, 0),
        (8, 3),
        (9, 1),
        # 10: item 5 was in the window (at 5, epoch 1): left out
        (11, 4),
    ]
    assert _epoch(run, loader) == [(12, 4), (13, 3), (15, 1)]


def test_a_window_to_the_end_of_the_epoch_is_remembered_from_both_epochs() -> None:
    """A sampler that draws another subset each epoch. The step at 9 rolls back to 3 with the
    window 4..11 (widened to the end of epoch 2): the replay hands out epoch 1's item at 3 and
    the epoch ends. Epoch 3 leaves out what the window held in either epoch (5, 4 and 8)."""
    run = _Run()
    loader = _items(
        run.sampler(_Orders([0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11], [5, 4, 12, 13, 8, 0]))
    )
    assert len(_epoch(run, loader)) == 6
    got = _epoch(run, loader, rollbacks={9: (3, (4, 11))})
    assert got == [(6, 6), (7, 7), (8, 8), (9, 9), (3, 3)]
    assert run.position == 12
    assert _epoch(run, loader) == [(14, 12), (15, 13), (17, 0)]


def test_a_rollback_back_past_an_earlier_window_leaves_the_merged_window_out() -> None:
    """A first rollback puts position 4 in a window. The step at 9 then rolls back to 3 with the
    window 5..11, which merges with it (still one window): the move back to 3 is what tells the
    sampler, and epoch 3 leaves out what the merged window held in either epoch (5, 4, 11)."""
    run = _Run()
    loader = _items(
        run.sampler(_Orders([0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11], [5, 4, 12, 13, 11, 0]))
    )
    assert _epoch(run, loader, rollbacks={4: (4, (4, 4))}) == [
        (0, 0),
        (1, 1),
        (2, 2),
        (3, 3),
        (4, 4),
        (5, 5),
    ]
    got = _epoch(run, loader, rollbacks={9: (3, (5, 11))})
    assert got == [(6, 6), (7, 7), (8, 8), (9, 9), (3, 3)]
    assert run.skips.windows == [(4, 11)]
    assert _epoch(run, loader) == [(14, 12), (15, 13), (17, 0)]


def test_without_drop_or_version_a_rollback_still_replays_by_position() -> None:
    """A position-driven sampler with neither ``drop`` nor ``version``: the replay skips the
    window by position, and a later epoch brings its items back (no identity is kept)."""
    run = _Run()
    sampler = SkipSampler(range(5), run.skips.contains, position=lambda: run.position)
    loader = _items(sampler)
    assert _epoch(run, loader, rollbacks={3: (1, (2, 3))}) == [
        (0, 0),
        (1, 1),
        (2, 2),
        (3, 3),
        (1, 1),
        (4, 4),
    ]
    assert _epoch(run, loader) == [(5, 0), (6, 1), (7, 2), (8, 3), (9, 4)]


def test_a_rollback_two_epochs_back_replays_a_sequential_sampler_by_position() -> None:
    """Three items an epoch, in the same order each epoch, no identity kept: the step at 7
    (epoch 3) rolls back to 1 (epoch 1) with the window 2..7. The replay hands out item 1 at
    position 1, then item 2 at 8, and epoch 4 is whole."""
    run = _Run()
    loader = _items(SkipSampler(range(3), run.skips.contains, position=lambda: run.position))
    assert _epoch(run, loader) == [(0, 0), (1, 1), (2, 2)]
    assert _epoch(run, loader) == [(3, 0), (4, 1), (5, 2)]
    assert _epoch(run, loader, rollbacks={7: (1, (2, 7))}) == [(6, 0), (7, 1), (1, 1), (8, 2)]
    assert _epoch(run, loader) == [(9, 0), (10, 1), (11, 2)]


def test_batches_fetched_before_their_steps_are_consecutive_and_skip_bad_windows() -> None:
    """A loop that takes two batches, then steps twice: the second batch of a pair is fetched
    while the guard is still at the first one's position, and must be the next allowed one,
    not the first again, nor one in a bad window."""
    run = _Run()
    run.skips.add(1, 1)
    run.skips.add(4, 5)
    it = iter(_items(run.sampler(range(10))))
    got = []
    while True:
        pair = [(run.position, x) for x in (next(it, None), next(it, None)) if x is not None]
        if not pair:
            break
        got += pair
        for _ in pair:
            run.step()
    assert got == [(0, 0), (0, 2), (3, 3), (3, 6), (7, 7), (7, 8), (9, 9)]


# --- gradient accumulation and a mid-epoch checkpoint -------------------------------------------


def test_accumulated_steps_hand_out_their_micro_batches_in_order_and_count_them() -> None:
    """Two micro-batches a step, five an epoch (the last step is short): each step gets its
    pair, the count after each item is what a mid-epoch checkpoint saves, and the next epoch
    starts at the next position."""
    run = _Run()
    sampler = run.sampler(range(5), per_step=2)
    loader = _items(sampler)
    counts: list[int] = []
    assert _epoch(run, loader, per_step=2, counts=counts) == [
        (0, 0),
        (0, 1),
        (1, 2),
        (1, 3),
        (2, 4),
    ]
    assert counts == [1, 2, 3, 4, 5]
    assert sampler.state_dict() == {"count": 6, "per_step": 2}  # three steps
    assert run.position == 3
    counts.clear()
    assert _epoch(run, loader, per_step=2, counts=counts) == [
        (3, 0),
        (3, 1),
        (4, 2),
        (4, 3),
        (5, 4),
    ]
    assert counts == [7, 8, 9, 10, 11]


def test_a_rollback_with_accumulation_replays_whole_steps() -> None:
    """Three micro-batches a step: the step at 2 rolls back to 1 with the window 2..2; the
    replay hands out position 1's three micro-batches, then position 3's."""
    run = _Run()
    loader = _items(run.sampler(range(12), per_step=3))
    got = _epoch(run, loader, per_step=3, rollbacks={2: (1, (2, 2))})
    assert [x for _, x in got] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 3, 4, 5, 9, 10, 11]
    assert [p for p, _ in got] == [0] * 3 + [1] * 3 + [2] * 3 + [1] * 3 + [3] * 3


# --- identity of a batch: index lists, index tensors --------------------------------------------


def _tensor_batches(kind: str) -> Any:
    index = torch.arange(12)
    if kind == "rows":  # a batch sampler that yields index tensors
        return index.view(6, 2)
    return BatchSampler(index, 2, False)  # lists of 0-dim index tensors


@pytest.mark.parametrize("kind", ["rows", "lists"])
def test_batches_of_index_tensors_are_left_out_by_their_indices(kind: str) -> None:
    """Batches made of index tensors: a bad window's batches are recognised by their indices
    when the next epoch brings them again (as new tensor objects)."""
    run = _Run()
    ds = TensorDataset(torch.arange(12))
    loader = DataLoader(ds, batch_sampler=run.sampler(_tensor_batches(kind)))

    def batches(rollbacks: dict[int, tuple[int, tuple[int, int]]] | None = None) -> list[Any]:
        return [(p, b[0].tolist()) for p, b in _epoch(run, loader, rollbacks=rollbacks)]

    first = batches(rollbacks={3: (1, (2, 3))})
    assert first == [
        (0, [0, 1]),
        (1, [2, 3]),
        (2, [4, 5]),
        (3, [6, 7]),
        (1, [2, 3]),
        (4, [8, 9]),
        (5, [10, 11]),
    ]
    # Epoch 2 (positions 6..11): the batches at 2 and 3 are left out by their indices.
    assert batches() == [(6, [0, 1]), (7, [2, 3]), (10, [8, 9]), (11, [10, 11])]


# --- rollbacks: snapshot labels and resume ------------------------------------------------------


def test_a_snapshot_inside_a_streak_stands_for_the_streaks_start() -> None:
    rb = Rollbacks(every=4)
    rb.streak_start = 7
    # Two skipped steps since position 7: nothing was applied, the state is step 8's.
    assert rb.label(streak=2, step=10, position=9) == (8, 7)
    assert rb.label(streak=0, step=10, position=9) == (10, 9)


def test_a_resume_keeps_the_snapshots_it_restored() -> None:
    torch.manual_seed(0)
    model = nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rb = Rollbacks(every=5)
    assert rb.due(opt, streak=0, step=0, position=0) == (0, 0)
    rb.store.push(capture(model, opt, step=0, position=0))
    assert rb.due(opt, streak=0, step=1, position=1) is None
    rb.stale = True  # a checkpoint was loaded (what resume() does), then resume() says so:
    rb.seen(opt)
    assert rb.due(opt, streak=0, step=2, position=2) is None
    assert rb.store.has(0)


# --- what a skipped step leaves: buffers, RNG, fused optimizers ---------------------------------


def test_a_skipped_accumulated_step_restores_buffers_and_rng_from_before_its_first_forward() -> (
    None
):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.5))
    keeper = BufferKeeper(model, rng=True)
    try:
        x1, x2, x3 = torch.randn(3, 5, 3)  # the RNG moves between steps
        buffers = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
        rng = torch.get_rng_state()
        model(x1)  # two micro-batches: BatchNorm moves twice, dropout draws
        model(x2)
        assert torch.equal(keeper.rng["torch"], rng)  # type: ignore[index]
        keeper.settle_(True)
        after = model.state_dict()
        assert all(torch.equal(after[k], v) for k, v in buffers.items())
        # The next step keeps its own state: a forward, then an applied step.
        model(x3)
        moved = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
        keeper.settle_(False)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in moved.items())
        assert not all(torch.equal(moved[k], v) for k, v in buffers.items())
    finally:
        keeper.close()


class _OwnOptimizer(torch.optim.Optimizer):
    """An optimizer from outside torch.optim: may move a parameter without a gradient."""

    def __init__(self, params: Any) -> None:
        super().__init__(params, {"lr": 0.1})

    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        return None


def test_only_torch_optimizers_are_trusted_to_skip_a_parameter_without_a_gradient() -> None:
    p = nn.Parameter(torch.ones(2))
    assert skips_without_grads(torch.optim.SGD([p], lr=0.1))
    assert skips_without_grads(torch.optim.AdamW([p], lr=0.1))
    assert not skips_without_grads(_OwnOptimizer([p]))


def test_the_skip_flag_is_handed_over_as_float32_on_the_parameters_device() -> None:
    one = torch.optim.SGD([nn.Parameter(torch.ones(2))], lr=0.1)  # a single parameter
    arm_found_inf(one, torch.tensor(True))
    assert one.found_inf.dtype == torch.float32 and one.found_inf.item() == 1.0  # type: ignore[attr-defined]
    meta = torch.optim.SGD([nn.Parameter(torch.empty(2, device="meta"))], lr=0.1)
    arm_found_inf(meta, torch.tensor(False))  # the flag lives on the host, the parameters not
    assert meta.found_inf.device.type == "meta"  # type: ignore[attr-defined]
    assert meta.found_inf.dtype == torch.float32  # type: ignore[attr-defined]


def test_disarming_leaves_no_stale_grad_scale_for_the_next_fused_step() -> None:
    def stepped(stale: bool) -> torch.Tensor:
        p = nn.Parameter(torch.ones(3))
        opt = torch.optim.SGD([p], lr=0.5, fused=True)
        if stale:
            arm_found_inf(opt, torch.tensor(False))
            opt.grad_scale = torch.tensor(4.0)  # type: ignore[attr-defined]  # as GradScaler sets it
            disarm_found_inf(opt)
            assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")
        p.grad = torch.full((3,), 2.0)
        opt.step()
        return p.detach().clone()

    assert torch.equal(stepped(stale=True), stepped(stale=False))


# --- what a skipped step leaves: param-group hyperparameters and the scheduler -------------------


def test_a_tensor_learning_rate_is_put_back_into_the_live_tensor() -> None:
    p = nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([p], lr=torch.tensor(0.1), fused=True)
    held = opt.param_groups[0]["lr"]
    kept = GroupState(opt, None)
    held.fill_(0.5)  # a scheduler writes a tensor learning rate in place
    kept.restore(opt, None)
    assert opt.param_groups[0]["lr"] is held  # the fused kernel holds this tensor
    assert held.item() == pytest.approx(0.1)
    opt.param_groups[0]["lr"] = 0.25  # a scheduler that writes a float instead
    kept.restore(opt, None)
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor)
    assert opt.param_groups[0]["lr"].item() == pytest.approx(0.1)
    opt.param_groups[0]["momentum"] = torch.tensor(0.9)  # and a float turned into a tensor
    kept.restore(opt, None)
    momentum = opt.param_groups[0]["momentum"]
    assert momentum == 0 and not isinstance(momentum, torch.Tensor)


def test_nested_and_graph_attached_hyperparameters_are_kept_by_value() -> None:
    p = nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([p], lr=0.1)
    log_scale = torch.zeros((), requires_grad=True)
    group = opt.param_groups[0]
    group["phases"] = {"warmup": [1, 2]}
    group["scale"] = log_scale.exp() * 0.5  # learned: part of an autograd graph
    kept = GroupState(opt, None)
    group["phases"]["warmup"].append(3)  # changed in place
    with torch.no_grad():
        group["scale"].fill_(2.0)
    kept.restore(opt, None)
    assert group["phases"] == {"warmup": [1, 2]}
    assert group["scale"].item() == 0.5


class _Warmup:
    """A stateful learning-rate lambda (LambdaLR saves a callable object's ``__dict__``)."""

    def __init__(self) -> None:
        self.seen: list[int] = []

    def __call__(self, epoch: int) -> float:
        self.seen.append(epoch)
        return 0.5**epoch


def test_a_stateful_lr_lambda_is_put_back_each_time() -> None:
    p = nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([p], lr=1.0)
    warmup = _Warmup()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup)
    kept = GroupState(opt, sched)
    before = list(warmup.seen)
    for _ in range(2):  # restored twice: the second restore is as exact as the first
        opt.step()
        sched.step()
        assert warmup.seen != before
        kept.restore(opt, sched)
        assert warmup.seen == before and sched.last_epoch == 0
        assert opt.param_groups[0]["lr"] == 1.0


def test_get_last_lr_between_steps_shows_the_settled_scheduler() -> None:
    """Sync-free on the CPU (a fused optimizer): the guard steps the scheduler on the guess
    that the step applies; ``get_last_lr()`` read between steps settles first, so a skipped
    step's guess never shows."""
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    guard = Guard(model, opt, sched, config=GuardConfig(sync="lazy"))
    assert guard.lazy
    lrs = []
    for bad in (False, True, False):
        x = torch.randn(8, 4)
        if bad:
            x[0, 0] = math.nan
        loss = model(x).pow(2).mean()
        loss.backward()
        guard.step(loss)
        opt.zero_grad()
        lrs.append(sched.get_last_lr())
    assert lrs == [[0.05], [0.05], [0.025]]
    assert [r["action"] for r in guard.records if r["kind"] == "step"] == ["step", "skip", "step"]


# --- GradScaler: a disabled one (``enabled=use_amp``) ------------------------------------------


def test_a_disabled_grad_scaler_is_neither_unscaled_nor_held_back() -> None:
    opt = torch.optim.SGD([nn.Parameter(torch.ones(2))], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    assert not scaler_unscaled(scaler, opt)
    scaler_update(scaler, torch.tensor(True), sync=False)  # the sync-free route
    scaler_update(scaler, True, sync=True)
    assert scaler.get_scale() == 1.0 and not scaler.is_enabled()


# -- a DataLoader over guard.skip_sampler: rollbacks far back, merged windows, workers --------


def _loader_setup(n: int = 12, **cfg: Any) -> tuple:
    torch.manual_seed(0)
    ds = TensorDataset(torch.randn(n, 4), torch.randn(n, 1), torch.arange(n))
    m = nn.Linear(4, 1)
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    guard = Guard(m, opt, config=GuardConfig(**cfg))
    return ds, m, opt, guard


def test_a_rollback_more_than_one_epoch_back_replays_instead_of_raising():
    # 3 batches an epoch, one snapshot (step 0); a NaN batch in epoch 4 rolls back to position 0.
    ds, m, opt, guard = _loader_setup(snapshot_every=100, budgets=Budgets(skip=0))
    loader = DataLoader(
        ds, batch_sampler=guard.skip_sampler(BatchSampler(SequentialSampler(ds), 4, False))
    )
    seen = []
    for epoch in range(5):
        for x, y, i in loader:  # the orders of the epochs since the snapshot are kept
            if epoch == 3 and guard.counters.rollbacks == 0 and int(i[0]) == 4:
                x = x.clone()
                x[0, 0] = math.nan
            seen.append((guard.position, int(i[0]) // 4))
            loss = nn.functional.mse_loss(m(x), y)
            loss.backward()
            guard.step(loss)
            opt.zero_grad()
    assert guard.counters.rollbacks == 1
    # The replay from position 0 hands out batch p % 3 at position p (a sequential sampler).
    assert all(p % 3 == b for p, b in seen if p not in range(10, 11))


def test_worker_processes_get_each_batch_once_when_nothing_goes_wrong():
    torch.manual_seed(0)
    ds = TensorDataset(torch.randn(40, 4), torch.randn(40, 1), torch.arange(40))
    m = nn.Linear(4, 1)
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    guard = Guard(m, opt)
    sampler = guard.skip_sampler(BatchSampler(SequentialSampler(ds), 4, False))
    seen = []
    for x, y, i in DataLoader(ds, batch_sampler=sampler, num_workers=2):
        seen.append(int(i[0]) // 4)
        loss = nn.functional.mse_loss(m(x), y)
        loss.backward()
        guard.step(loss)
        opt.zero_grad()
    assert guard.counters.skips == 0 and guard.counters.rollbacks == 0
    assert seen == list(range(10))  # workers ask ahead: no batch twice, none left out


def test_a_window_that_merges_with_the_last_one_is_still_left_out_next_epoch():
    # snapshot_every=1 puts the snapshot at the streak's start, so each rollback lands where the
    # sampler was going; the second window (3, 3) merges into (2, 2): len(windows) stays 1.
    ds, m, opt, guard = _loader_setup(24, snapshot_every=1, budgets=Budgets(skip=0))
    loader = DataLoader(
        ds, batch_sampler=guard.skip_sampler(BatchSampler(SequentialSampler(ds), 4, False))
    )
    seen = []
    for epoch in range(2):
        for x, y, i in loader:
            b = int(i[0]) // 4
            if epoch == 0 and b in (2, 3):
                x = x.clone()
                x[0, 0] = math.nan
            loss = nn.functional.mse_loss(m(x), y)
            loss.backward()
            guard.step(loss)
            opt.zero_grad()
            seen.append((epoch, b))
    assert guard.skip_list.windows == [(2, 3)] and guard.counters.rollbacks == 2
    assert [b for e, b in seen if e == 1] == [
        0,
        1,
        4,
        5,
    ]  # batch 3 joined the window of batch 2: left out too


# -- the learning-rate back-off ----------------------------------------------------------------


def _groups(*lrs: Any) -> torch.optim.Optimizer:
    params = [nn.Parameter(torch.zeros(1)) for _ in lrs]
    opt = torch.optim.SGD([{"params": [p], "lr": 0.1} for p in params], lr=0.1)
    for group, lr in zip(opt.param_groups, lrs, strict=True):
        group["lr"] = lr
    return opt


def test_a_backoff_scales_every_groups_lr_for_the_step_and_puts_back_the_exact_values() -> None:
    from gradguard.guard.skip import LRScale

    tensor_lr = torch.tensor(0.3)
    opt = _groups(0.1, tensor_lr, 0.7)
    lr = LRScale()
    lr.apply(opt)  # scale 1: nothing to do, nothing saved
    assert [g["lr"] for g in opt.param_groups] == [0.1, tensor_lr, 0.7]
    assert lr.effective(0.5) == 0.5
    lr.backoff(0.5)
    lr.backoff(0.5)
    assert lr.scale == 0.25 and lr.effective(0.5) == 0.125
    lr.apply(opt)
    assert opt.param_groups[0]["lr"] == 0.1 * 0.25 and opt.param_groups[2]["lr"] == 0.7 * 0.25
    assert opt.param_groups[1]["lr"] is tensor_lr and float(tensor_lr) == float(
        torch.tensor(0.3) * 0.25
    )  # a tensor lr (capturable optimizers) is scaled in place
    lr.apply(opt)  # twice before a restore: still scaled once
    assert opt.param_groups[0]["lr"] == 0.1 * 0.25
    lr.restore()
    assert opt.param_groups[0]["lr"] == 0.1 and opt.param_groups[2]["lr"] == 0.7
    assert opt.param_groups[1]["lr"] is tensor_lr and torch.equal(tensor_lr, torch.tensor(0.3))
    lr.restore()  # nothing saved any more: a second restore changes nothing
    assert [g["lr"] for g in opt.param_groups][::2] == [0.1, 0.7]


def test_a_backoff_leaves_a_group_without_lr_alone_and_restores_a_replaced_tensor() -> None:
    from gradguard.guard.skip import LRScale

    opt = _groups(0.2, 0.4)
    del opt.param_groups[0]["lr"]  # an optimizer whose group has no lr (schedule-free kinds)
    lr = LRScale()
    lr.backoff(0.5)
    lr.apply(opt)
    assert "lr" not in opt.param_groups[0] and opt.param_groups[1]["lr"] == 0.2
    opt.param_groups[1]["lr"] = torch.tensor(9.0)  # the step replaced it by a tensor
    lr.restore()
    assert opt.param_groups[1]["lr"] == 0.4 and not isinstance(
        opt.param_groups[1]["lr"], torch.Tensor
    )
