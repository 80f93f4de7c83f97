"""GuardCallback in a real ``lightning.Trainer``: skip, logging, checkpoint resume, bf16, docs."""

from __future__ import annotations

import copy
import csv
import math
import re
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from gradguard.guard.guard import GuardConfig
from gradguard.integrations.lightning import GuardCallback
from gradguard.records.bundle import load_bundle
from tests._state import state_diff, states_equal

# Lightning 2.6 builds a LeafSpec on every fit; typing_extensions flags that as deprecated.
pytestmark = pytest.mark.filterwarnings(
    r"ignore:`isinstance\(treespec, LeafSpec\)` is deprecated:FutureWarning",
    "ignore:The '.*dataloader' does not have many workers:UserWarning",
)

N_BATCHES = 4  # per epoch; two epochs
POISON = 1  # the batch whose input is NaN, so its gradients are NaN: global steps 1 and 5
SKIPPED = (POISON, POISON + N_BATCHES)


class TinyModule(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)
        )

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.1)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def loader(poison: int | None = POISON) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2 * N_BATCHES, 4, generator=g)
    y = torch.randn(2 * N_BATCHES, 1, generator=g)
    if poison is not None:
        x[2 * poison, 0] = float("nan")
    ds = torch.utils.data.TensorDataset(x, y)
    return torch.utils.data.DataLoader(ds, batch_size=2, shuffle=False)


def trainer(tmp_path: Path, callbacks: list[Callback], **kw: Any) -> pl.Trainer:
    opts: dict[str, Any] = dict(
        max_epochs=2,
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=CSVLogger(tmp_path, name="logs"),
        enable_checkpointing=False,
        log_every_n_steps=1,
        num_sanity_val_steps=0,
    )
    opts.update(kw)
    return pl.Trainer(callbacks=callbacks, **opts)


class StepWatch(Callback):
    """Copies model, optimizer and scheduler state around chosen batches, to compare later."""

    def __init__(self, batches: tuple[int, ...]) -> None:
        self.batches = batches
        self.before: dict[int, Any] = {}
        self.after: dict[int, Any] = {}

    def _state(self, trainer: pl.Trainer, module: pl.LightningModule) -> Any:
        return copy.deepcopy(
            (
                module.state_dict(),
                trainer.optimizers[0].state_dict(),
                trainer.lr_scheduler_configs[0].scheduler.state_dict(),
            )
        )

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # type: ignore[no-untyped-def]
        self._step = trainer.global_step
        if self._step in self.batches:
            self.before[self._step] = self._state(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # type: ignore[no-untyped-def]
        if self._step in self.batches:
            self.after[self._step] = self._state(trainer, pl_module)


def _metrics(tmp_path: Path) -> list[dict[str, str]]:
    files = list(tmp_path.rglob("metrics.csv"))
    assert len(files) == 1, files
    with files[0].open() as f:
        return list(csv.DictReader(f))


def _assert_skip_and_finish(tmp_path: Path, module: TinyModule, watch: StepWatch) -> None:
    # the poisoned step changed nothing: weights, Adam moments and step counts, the LR schedule
    assert states_equal(watch.before[POISON], watch.after[POISON])
    # a normal step did change all three (so the comparison above can fail)
    w0, o0, s0 = watch.before[POISON - 1]
    w1, o1, s1 = watch.after[POISON - 1]
    assert not states_equal(w0, w1)
    assert not states_equal(o0, o1)
    assert s0 != s1
    assert all(torch.isfinite(p).all() for p in module.parameters())
    rows = _metrics(tmp_path)
    keys = set().union(*(r.keys() for r in rows))
    for name in ("guard/grad_norm", "guard/clipped_norm", "guard/clip_rate", "guard/skipped"):
        assert name in keys, sorted(keys)
    assert any(k.startswith("guard/layer/") for k in keys), sorted(keys)
    skipped = [float(r["guard/skipped"]) for r in rows if r.get("guard/skipped")]
    assert skipped[-1] == len(SKIPPED)
    norms = [float(r["guard/grad_norm"]) for r in rows if r.get("guard/grad_norm")]
    assert len(norms) == 2 * N_BATCHES
    assert all(math.isnan(v) == (i in SKIPPED) for i, v in enumerate(norms))


def test_nan_batch_is_skipped_and_logged(tmp_path: Path) -> None:
    module, watch = TinyModule(), StepWatch((POISON - 1, POISON))
    guard_cb = GuardCallback(GuardConfig(incident_dir=str(tmp_path / "incidents")))
    trainer(tmp_path, [guard_cb, watch]).fit(module, loader())
    _assert_skip_and_finish(tmp_path, module, watch)
    actions = [r for r in guard_cb.guard.records if r["kind"] == "action"]
    assert [r["step"] for r in actions if r["action"] == "skip"] == list(SKIPPED)
    # Each skip wrote an incident bundle holding the batch as Lightning handed it.
    bundles = [load_bundle(r["bundle"]) for r in actions if r["action"] == "skip"]
    assert [b.step for b in bundles] == list(SKIPPED)
    assert all(torch.isnan(b.batch[0]).any() for b in bundles)


def test_nan_batch_is_skipped_under_bf16_autocast(tmp_path: Path) -> None:
    module, watch = TinyModule(), StepWatch((POISON - 1, POISON))
    dtypes: set[torch.dtype] = set()
    module.net[0].register_forward_hook(lambda m, i, o: dtypes.add(o.dtype))
    trainer(tmp_path, [GuardCallback(), watch], precision="bf16-mixed").fit(module, loader())
    assert dtypes == {torch.bfloat16}  # autocast was on
    _assert_skip_and_finish(tmp_path, module, watch)


def test_gradient_clip_val_is_refused_with_advice(tmp_path: Path) -> None:
    t = trainer(tmp_path, [GuardCallback()], gradient_clip_val=1.0)
    with pytest.raises(ValueError, match="gradient_clip_val=None"):
        t.fit(TinyModule(), loader())


def _final(tmp_path: Path, cb: GuardCallback, module: TinyModule) -> tuple[Any, Any]:
    return copy.deepcopy(module.state_dict()), cb.guard.state_dict()


def test_resume_mid_run_restores_guard_state(tmp_path: Path) -> None:
    # uninterrupted reference run
    ref_cb, ref_mod = GuardCallback(), TinyModule()
    trainer(tmp_path / "ref", [ref_cb]).fit(ref_mod, loader())

    # first epoch (it has a skipped step), checkpoint, then resume with a fresh callback
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1)
    trainer(tmp_path / "a", [GuardCallback(), ckpt], max_epochs=1, enable_checkpointing=True).fit(
        TinyModule(), loader()
    )
    path = next((tmp_path / "ckpt").glob("*.ckpt")).rename(tmp_path / "resume.ckpt")
    saved = torch.load(path, weights_only=False)["callbacks"]
    assert any(k.startswith("GuardCallback") for k in saved), saved.keys()

    cb, module = GuardCallback(), TinyModule()
    # the same callbacks as the run that wrote the checkpoint (Lightning warns otherwise)
    again = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1)
    trainer(tmp_path / "b", [cb, again], enable_checkpointing=True).fit(
        module, loader(), ckpt_path=path
    )
    w_ref, g_ref = _final(tmp_path, ref_cb, ref_mod)
    w, g = _final(tmp_path, cb, module)
    assert states_equal(w, w_ref)
    assert state_diff(g, g_ref) is None, state_diff(g, g_ref)
    skips = [r["step"] for r in cb.guard.records if r["kind"] == "action" and r["action"] == "skip"]
    assert skips[-1] == SKIPPED[-1]


def test_callback_state_round_trips_before_and_after_fit(tmp_path: Path) -> None:
    cb = GuardCallback()
    trainer(tmp_path, [cb], max_epochs=1).fit(TinyModule(), loader())
    state = cb.state_dict()
    fresh = GuardCallback()
    fresh.load_state_dict(copy.deepcopy(state))
    # before fit there is no guard yet: the state waits and comes back unchanged
    assert states_equal(fresh.state_dict(), state)


def _code_block(doc: str, name: str) -> str:
    text = (Path(__file__).parent.parent / "docs" / doc).read_text(encoding="utf-8")
    m = re.search(rf"<!-- example: {name} -->\s*```python\n(.*?)```", text, re.S)
    assert m, f"no example {name!r} in docs/{doc}"
    return m.group(1)


def test_docs_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    scope: dict[str, Any] = {"__name__": "__docs__"}
    exec(compile(_code_block("integrations.md", "lightning"), "integrations.md", "exec"), scope)
    assert all(torch.isfinite(p).all() for p in scope["model"].parameters())
    assert any(r.get("action") == "skip" for r in scope["guard_cb"].guard.records)


def test_fp16_grad_scaler_plugin_unscaled_loss_and_overflow(tmp_path: Path) -> None:
    # Lightning maps precision="16-mixed" to bf16 on the CPU; the plugin gives real fp16 + scaler
    from lightning.pytorch.plugins import MixedPrecision

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**20)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    cb, module = GuardCallback(), TinyModule()
    x, y = next(iter(loader()))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        first_loss = torch.nn.functional.mse_loss(TinyModule().net(x), y).item()
    trainer(tmp_path, [cb], plugins=[plugin]).fit(module, loader())
    assert cb.guard is not None
    c = cb.guard.counters
    assert c.skips == len(SKIPPED)  # the NaN batches are incidents
    assert c.amp_skips >= 1  # loss-scale overflows are the scaler's, not incidents
    assert scaler.get_scale() < 2.0**20
    steps = [r for r in cb.guard.records if r["kind"] == "step"]
    # the guard got the true loss, not the scaled one Lightning hands to on_before_backward
    assert steps[0]["loss"] == pytest.approx(first_loss, rel=1e-3)
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(TypeError, match="config"):
        GuardCallback(config={"policy": None})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="recorder"):
        GuardCallback(recorder=[])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'guard'"):
        GuardCallback().load_state_dict({"policy": {}})


class LossWatch(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # type: ignore[no-untyped-def]
        self.losses.append(float(outputs["loss"]))


def test_gradient_accumulation_guards_once_per_optimizer_step(tmp_path: Path) -> None:
    cb, losses, module = GuardCallback(), LossWatch(), TinyModule()
    trainer(tmp_path, [cb, losses], accumulate_grad_batches=2).fit(module, loader())
    assert cb.guard is not None
    steps = [r for r in cb.guard.records if r["kind"] == "step"]
    assert len(steps) == N_BATCHES  # 2 epochs x 4 batches / 2 per step
    # the poisoned micro-batch poisons its whole optimizer step (steps 0 and 2 hold batch 1)
    # (the others are applied, unclipped: the default policy clips relative to the run's own
    # norms, and the first applied step has none to compare with)
    assert [r["action"] for r in steps] == ["skip", "step", "skip", "step"]
    assert cb.guard.counters.skips == 2
    # the step's loss is the mean of its micro-batch losses; Lightning's outputs hold each one
    # already divided by the accumulation count, so their sum is that mean
    pairs = [losses.losses[i : i + 2] for i in range(0, len(losses.losses), 2)]
    assert steps[1]["loss"] == pytest.approx(sum(pairs[1]), rel=1e-6)
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_wandb_logger_receives_the_guards_metrics(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lightning's own WandbLogger, offline: the guard's numbers are in the W&B run's history."""
    pytest.importorskip("wandb")
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    from tests._wandb import offline_env, run_dirs, wandb_history

    offline_env(monkeypatch, tmp_path)
    module, guard_cb = TinyModule(), GuardCallback()
    logger = WandbLogger(project="gradguard-test", save_dir=str(tmp_path), offline=True)
    try:
        trainer(tmp_path, [guard_cb], logger=logger).fit(module, loader())
    finally:
        wandb.finish()  # Lightning leaves the run open; W&B writes the rest of the file now
    (run_dir,) = run_dirs(tmp_path)
    history = [h for h in wandb_history(run_dir) if "guard/grad_norm" in h]
    steps = [r for r in guard_cb.guard.records if r["kind"] == "step"]
    assert [h["trainer/global_step"] for h in history] == [r["step"] for r in steps]
    for h, r in zip(history, steps):
        got, want = float(h["guard/grad_norm"]), r["grad_norm"]
        assert got == want or (math.isnan(got) and math.isnan(want))
    assert [float(h["guard/skipped"]) for h in history][-1] == len(SKIPPED)
    assert any(k.startswith("guard/layer/") for k in history[0])
