"""The guard in a real ``transformers.Trainer``: skip before the step, logs, resume, bf16, docs."""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from gradguard.guard.guard import GuardConfig
from gradguard.integrations.transformers import GuardCallback, GuardedTrainer
from gradguard.records.bundle import load_bundle
from tests._state import state_diff, states_equal

STEPS = 8


@pytest.fixture(autouse=True)
def one_thread() -> Any:
    # CI machines are small and shared: one intra-op thread is faster for a model this size
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


POISON = 3  # 0-based optimizer step whose batch holds a NaN input (HF logs it as step 4)


def tiny_model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=2,
        vocab_size=100,
        n_positions=16,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(cfg)


class Embeds(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """Random embeddings and labels; sample ``2 * POISON`` carries a NaN."""

    def __init__(self, poison: bool = True) -> None:
        self.poison = poison

    def __len__(self) -> int:
        return 2 * STEPS

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(i)
        x = torch.randn(8, 32, generator=g)
        if self.poison and i == 2 * POISON:
            x[0, 0] = float("nan")
        return {"inputs_embeds": x, "labels": torch.randint(0, 100, (8,), generator=g)}


def args(out: Path, **kw: Any) -> TrainingArguments:
    opts: dict[str, Any] = dict(
        output_dir=str(out),
        max_steps=STEPS,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        weight_decay=0.1,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        max_grad_norm=0.0,
        disable_tqdm=True,
        train_sampling_strategy="sequential",
        seed=0,
    )
    opts.update(kw)
    return TrainingArguments(**opts)


class StepWatch(TrainerCallback):
    """Copies model, optimizer and scheduler state around chosen optimizer steps."""

    def __init__(self, steps: tuple[int, ...]) -> None:
        self.steps = steps
        self.before: dict[int, Any] = {}
        self.after: dict[int, Any] = {}

    def _state(self, kw: dict[str, Any]) -> Any:
        return copy.deepcopy(
            (
                kw["model"].state_dict(),
                kw["optimizer"].state_dict(),
                kw["lr_scheduler"].state_dict(),
            )
        )

    def on_step_begin(self, args, state, control, **kw):  # type: ignore[no-untyped-def]
        if state.global_step in self.steps:
            self.before[state.global_step] = self._state(kw)

    def on_step_end(self, args, state, control, **kw):  # type: ignore[no-untyped-def]
        if state.global_step - 1 in self.steps:
            self.after[state.global_step - 1] = self._state(kw)


class StopAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kw):  # type: ignore[no-untyped-def]
        if state.global_step == self.step:
            control.should_training_stop = True


def _check_run(trainer: Trainer, watch: StepWatch) -> None:
    assert state_diff(watch.before[POISON], watch.after[POISON]) is None, state_diff(
        watch.before[POISON], watch.after[POISON]
    )
    w0, o0, s0 = watch.before[POISON - 1]
    w1, o1, s1 = watch.after[POISON - 1]
    assert not states_equal(w0, w1)
    assert not states_equal(o0, o1)
    assert s0 != s1
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    logs = [r for r in trainer.state.log_history if "loss" in r]
    assert len(logs) == STEPS
    for key in ("guard/grad_norm", "guard/clipped_norm", "guard/clip_rate", "guard/skipped"):
        assert all(key in r for r in logs), logs[0].keys()
    # HF hides the NaN loss (logging_nan_inf_filter); the guard reports the raw one
    raw = [r["guard/loss"] for r in logs]
    assert all(math.isnan(v) == (r["step"] == POISON + 1) for v, r in zip(raw, logs))
    assert logs[-1]["guard/skipped"] == 1
    assert math.isnan(logs[POISON]["guard/grad_norm"])


@pytest.mark.parametrize("optim", ["adamw_torch", "adamw_torch_fused"])
def test_guarded_trainer_skips_nan_batch(tmp_path: Path, optim: str) -> None:
    watch = StepWatch((POISON - 1, POISON))
    a = args(tmp_path, optim=optim)
    trainer = GuardedTrainer(model=tiny_model(), args=a, train_dataset=Embeds(), callbacks=[watch])
    trainer.train()
    assert trainer.guard.fused == (optim == "adamw_torch_fused")
    _check_run(trainer, watch)
    skips = [r["step"] for r in trainer.guard.records if r["kind"] == "action"]
    assert skips == [POISON]


def test_plain_trainer_with_callback_skips_nan_batch(tmp_path: Path) -> None:
    watch = StepWatch((POISON - 1, POISON))
    cb = GuardCallback(GuardConfig(incident_dir=str(tmp_path / "incidents")))
    trainer = Trainer(
        model=tiny_model(), args=args(tmp_path), train_dataset=Embeds(), callbacks=[cb, watch]
    )
    trainer.train()
    _check_run(trainer, watch)
    # The skip wrote an incident bundle holding the batch as the model got it.
    (path,) = [r["bundle"] for r in cb.guard.records if r["kind"] == "action"]  # type: ignore[union-attr]
    bundle = load_bundle(path)
    assert bundle.step == POISON and bundle.action == "skip"
    assert torch.isnan(bundle.batch["inputs_embeds"]).any()


def test_guarded_trainer_writes_the_training_step_inputs(tmp_path: Path) -> None:
    cfg = GuardConfig(incident_dir=str(tmp_path / "incidents"))
    trainer = GuardedTrainer(
        model=tiny_model(), args=args(tmp_path), train_dataset=Embeds(), guard_config=cfg
    )
    trainer.train()
    (path,) = [r["bundle"] for r in trainer.guard.records if r["kind"] == "action"]
    batch = load_bundle(path).batch
    assert set(batch) == {"inputs_embeds", "labels"} and torch.isnan(batch["inputs_embeds"]).any()


def test_bf16_autocast_skips_nan_batch(tmp_path: Path) -> None:
    watch = StepWatch((POISON - 1, POISON))
    model = tiny_model()
    dtypes: set[torch.dtype] = set()
    model.transformer.h[0].mlp.c_fc.register_forward_hook(lambda m, i, o: dtypes.add(o.dtype))
    trainer = GuardedTrainer(
        model=model,
        args=args(tmp_path, bf16=True),
        train_dataset=Embeds(),
        callbacks=[watch],
    )
    trainer.train()
    assert dtypes == {torch.bfloat16}  # autocast was on
    _check_run(trainer, watch)


def test_resume_mid_run_restores_guard_state(tmp_path: Path) -> None:
    ref = GuardedTrainer(model=tiny_model(), args=args(tmp_path / "ref"), train_dataset=Embeds())
    ref.train()

    # the same run, interrupted after a checkpoint that lies past the skipped step
    out = tmp_path / "run"
    first = GuardedTrainer(
        model=tiny_model(),
        args=args(out, save_strategy="steps", save_steps=POISON + 2),
        train_dataset=Embeds(),
        callbacks=[StopAt(POISON + 2)],
    )
    first.train()
    assert first.guard.counters.skips == 1
    ckpt = out / f"checkpoint-{POISON + 2}"
    assert (ckpt / "gradguard.pt").is_file()

    resumed = GuardedTrainer(model=tiny_model(), args=args(out), train_dataset=Embeds())
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert states_equal(resumed.model.state_dict(), ref.model.state_dict())
    assert states_equal(resumed.guard.state_dict(), ref.guard.state_dict())


def test_hf_clipping_is_refused_with_advice(tmp_path: Path) -> None:
    # HF clips before `on_pre_optimizer_step`, so the guard would measure clipped norms
    a = args(tmp_path, max_grad_norm=0.5)
    trainer = GuardedTrainer(model=tiny_model(), args=a, train_dataset=Embeds(poison=False))
    with pytest.raises(ValueError, match="max_grad_norm=0"):
        trainer.train()
    assert a.max_grad_norm == 0.5


def test_take_over_clipping_clips_like_hf_but_measures_first(tmp_path: Path) -> None:
    a = args(tmp_path, max_grad_norm=0.5, max_steps=3)
    trainer = GuardedTrainer(
        model=tiny_model(), args=a, train_dataset=Embeds(poison=False), take_over_clipping=True
    )
    trainer.train()
    assert a.max_grad_norm == 0.0
    logs = [r for r in trainer.state.log_history if "loss" in r]
    for r in logs:
        assert r["guard/threshold"] == 0.5
        # HF's own grad_norm (measured by HF, not clipped any more) is the guard's pre-clip norm
        assert r["guard/grad_norm"] == pytest.approx(r["grad_norm"], rel=1e-5)
        assert r["guard/grad_norm"] > 0.5 and r["guard/clipped_norm"] == pytest.approx(0.5)
        assert r["guard/clip_rate"] == 1.0


def _code_block(doc: str, name: str) -> str:
    text = (Path(__file__).parent.parent / "docs" / doc).read_text(encoding="utf-8")
    m = re.search(rf"<!-- example: {name} -->\s*```python\n(.*?)```", text, re.S)
    assert m, f"no example {name!r} in docs/{doc}"
    return m.group(1)


def test_docs_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    scope: dict[str, Any] = {"__name__": "__docs__"}
    exec(compile(_code_block("integrations.md", "transformers"), "integrations.md", "exec"), scope)
    trainer = scope["trainer"]
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert any(r.get("action") == "skip" for r in trainer.guard.records)


def test_plain_callback_resumes_from_output_dir(tmp_path: Path) -> None:
    out = tmp_path / "run"
    first_cb = GuardCallback()
    Trainer(
        model=tiny_model(),
        args=args(out, save_strategy="steps", save_steps=POISON + 2),
        train_dataset=Embeds(),
        callbacks=[first_cb, StopAt(POISON + 2)],
    ).train()
    assert first_cb.guard is not None and first_cb.guard.counters.skips == 1
    saved = torch.load(out / f"checkpoint-{POISON + 2}" / "gradguard.pt", weights_only=True)
    waiting = GuardCallback()
    waiting.load_state_dict(saved)  # before training: the state waits, unchanged
    assert state_diff(waiting.state_dict(), saved) is None
    cb = GuardCallback()
    Trainer(model=tiny_model(), args=args(out), train_dataset=Embeds(), callbacks=[cb]).train(
        resume_from_checkpoint=True
    )
    assert cb.guard is not None
    assert cb.guard.counters.skips == 1  # restored from checkpoint-5/gradguard.pt
    assert cb.guard.step_count == STEPS


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(TypeError, match="config"):
        GuardCallback(config={"policy": None})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="prefix"):
        GuardCallback(prefix=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'guard'"):
        GuardCallback().load_state_dict({"policy": {}})


@pytest.mark.parametrize("guarded", [True, False], ids=["GuardedTrainer", "callback"])
def test_gradient_accumulation_guards_once_per_step_with_hf_loss(
    tmp_path: Path, guarded: bool
) -> None:
    a = args(tmp_path, gradient_accumulation_steps=2, max_steps=4)
    kw: dict[str, Any] = dict(model=tiny_model(), args=a, train_dataset=Embeds())
    trainer = GuardedTrainer(**kw) if guarded else Trainer(**kw, callbacks=[GuardCallback()])
    trainer.train()
    logs = [r for r in trainer.state.log_history if "loss" in r]
    assert len(logs) == 4
    # sample 2 * POISON sits in micro-batch POISON, i.e. optimizer step POISON // 2
    bad = POISON // 2
    assert [r["guard/skipped"] for r in logs] == [int(i >= bad) for i in range(4)]
    for i, r in enumerate(logs):
        if i == bad:
            assert math.isnan(r["guard/loss"])
        else:  # HF's own loss for the step (the sum over its micro-batches) is the guard's
            assert r["guard/loss"] == pytest.approx(r["loss"], rel=1e-4)


def test_report_to_wandb_receives_the_guards_metrics(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HF's own W&B integration (``report_to="wandb"``), offline: the guard's numbers arrive."""
    pytest.importorskip("wandb")
    import wandb

    from tests._wandb import offline_env, run_dirs, wandb_history

    offline_env(monkeypatch, tmp_path)
    monkeypatch.setenv("WANDB_PROJECT", "gradguard-test")
    trainer = GuardedTrainer(
        model=tiny_model(), args=args(tmp_path / "out", report_to=["wandb"]), train_dataset=Embeds()
    )
    try:
        trainer.train()
    finally:
        wandb.finish()  # HF leaves the run open; W&B writes the rest of the file now
    (run_dir,) = run_dirs(tmp_path)
    # HF's W&B callback prefixes training logs with "train/"
    history = [h for h in wandb_history(run_dir) if "train/guard/grad_norm" in h]
    logged = [r for r in trainer.state.log_history if "guard/grad_norm" in r]
    assert len(history) == len(logged) == STEPS
    for h, r in zip(history, logged):
        assert h["train/global_step"] == r["step"]
        got, want = float(h["train/guard/grad_norm"]), r["guard/grad_norm"]
        assert got == pytest.approx(want) or (math.isnan(got) and math.isnan(want))
    assert math.isnan(float(history[POISON]["train/guard/grad_norm"]))  # the NaN batch's step
    assert float(history[-1]["train/guard/skipped"]) == 1
