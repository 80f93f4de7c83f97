"""Guard overhead: a guarded step against torch clipping alone, and the peers, side by side.

Two measurements:

* **GPT-2 small gradients** (124M fp32 values in 148 tensors): the guard's pre-step work
  (measure per-tensor and total norms, ZClip threshold and clip, loss and gradient-norm spike
  detectors, a record row with per-layer norms) against ``torch.nn.utils.clip_grad_norm_``
  alone; target at most 1.15x. Peers on the same gradients: zclip 1.0.0 (``ZClip.step``),
  autoclip 0.2.1 (``QuantileClip.step``), smartclip 0.1.1 (``apply`` with ``ZScoreClip``).
* **A real training step on CPU**: a 2-layer LSTM language model (forward, backward, clip, Adam
  step); ``guard.step(loss)`` against ``clip_grad_norm_`` + ``optimizer.step()``; target at most
  3% over. Peers wrap the same step.

Each method owns its model copy; methods are timed round-robin and the median is reported.
"""

from __future__ import annotations

import copy
import platform
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from benchmarks import markdown_table, median_ms_interleaved
from benchmarks.bench_clip import gpt2_small_shapes, make_params
from gradguard.guard.guard import Guard, GuardConfig
from gradguard.records.recorder import Recorder

TARGETS = {"gpt2_guarded": 1.15, "lstm_guarded": 1.03}


def _peers() -> dict[str, Any]:
    """The peer packages that import here (name -> module)."""
    found: dict[str, Any] = {}
    for name in ("zclip", "autoclip.torch", "smartclip"):
        try:
            found[name.split(".")[0]] = __import__(name, fromlist=["_"])
        except Exception:  # not installed, or broken against this torch: left out of the table
            continue
    return found


class _Holder(nn.Module):
    """Parameters without a forward: what zclip/smartclip need (a module) around raw tensors."""

    def __init__(self, params: list[nn.Parameter]) -> None:
        super().__init__()
        self.ps = nn.ParameterList(params)


def _gpt2_case(device: str, quick: bool) -> tuple[dict[str, float], list[str]]:
    params = make_params(gpt2_small_shapes(), device)
    holder = _Holder(params)
    loss = torch.tensor(3.0, device=device)
    total = torch.nn.utils.get_total_norm([p.grad for p in params])  # type: ignore[misc]
    max_norm = 0.999 * float(total)
    opt = torch.optim.SGD(params, lr=0.0)  # never stepped: the pre-step work is timed
    guard = Guard(holder, opt, recorder=Recorder(flush_every=50))

    def guarded() -> None:
        guard.before_optimizer_step(loss)
        guard.after_optimizer_step()

    fns: dict[str, tuple[Callable[[], object], int]] = {}
    repeats = 3 if quick else 11
    fns["torch clip_grad_norm_"] = (
        lambda: torch.nn.utils.clip_grad_norm_(params, max_norm),
        repeats,
    )
    fns["gradguard Guard (pre-step)"] = (guarded, repeats)
    peers = _peers()
    notes = []
    if "zclip" in peers:
        zc = peers["zclip"].ZClip()
        fns["zclip ZClip.step"] = (lambda: zc.step(holder), repeats)
    if "autoclip" in peers:
        ac = peers["autoclip"].QuantileClip(iter(params), quantile=0.9, history_length=1000)
        fns["autoclip QuantileClip.step"] = (ac.step, repeats)
    if "smartclip" in peers:
        sc = peers["smartclip"]
        clipper = sc.ZScoreClip()
        fns["smartclip apply(ZScoreClip)"] = (lambda: sc.apply(holder, clipper), repeats)
    missing = sorted({"zclip", "autoclip", "smartclip"} - set(peers))
    if missing:
        notes.append(f"not installed here: {', '.join(missing)}")
    return median_ms_interleaved(fns, warmup=2 if not quick else 1, device=device), notes


class LSTMLM(nn.Module):
    """A 2-layer LSTM language model (embedding, LSTM, tied-size decoder)."""

    def __init__(self, vocab: int = 2000, dim: int = 256) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.lstm = nn.LSTM(dim, dim, num_layers=2, batch_first=True)
        self.dec = nn.Linear(dim, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dec(self.lstm(self.emb(x))[0])  # type: ignore[no-any-return]


def _lstm_case(quick: bool) -> dict[str, float]:
    torch.manual_seed(0)
    base = LSTMLM()
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 2000, (20, 36), generator=gen)
    x, y = tokens[:, :-1], tokens[:, 1:]
    peers = _peers()

    def setup() -> tuple[nn.Module, torch.optim.Optimizer]:
        model = copy.deepcopy(base)
        return model, torch.optim.Adam(model.parameters(), lr=1e-3)

    def loss_of(model: nn.Module) -> torch.Tensor:
        out = model(x)
        return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))

    fns: dict[str, tuple[Callable[[], object], int]] = {}
    repeats = 5 if quick else 21

    m_t, o_t = setup()

    def torch_step() -> None:
        loss = loss_of(m_t)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m_t.parameters(), 1.0)
        o_t.step()
        o_t.zero_grad(set_to_none=True)

    m_g, o_g = setup()
    guard = Guard(m_g, o_g, config=GuardConfig())

    def guarded_step() -> None:
        loss = loss_of(m_g)
        loss.backward()
        guard.step(loss)
        o_g.zero_grad(set_to_none=True)

    fns["torch clip_grad_norm_ + step"] = (torch_step, repeats)
    fns["gradguard guard.step"] = (guarded_step, repeats)
    if "zclip" in peers:
        m_z, o_z = setup()
        zc = peers["zclip"].ZClip()

        def zclip_step() -> None:
            loss = loss_of(m_z)
            loss.backward()
            zc.step(m_z)
            o_z.step()
            o_z.zero_grad(set_to_none=True)

        fns["zclip + step"] = (zclip_step, repeats)
    if "autoclip" in peers:
        m_a, o_a = setup()
        ac = peers["autoclip"].QuantileClip(m_a.parameters(), quantile=0.9)

        def autoclip_step() -> None:
            loss = loss_of(m_a)
            loss.backward()
            ac.step()
            o_a.step()
            o_a.zero_grad(set_to_none=True)

        fns["autoclip + step"] = (autoclip_step, repeats)
    if "smartclip" in peers:
        m_s, o_s = setup()
        sc = peers["smartclip"]
        clipper = sc.ZScoreClip()

        def smartclip_step() -> None:
            loss = loss_of(m_s)
            loss.backward()
            sc.step(m_s, o_s, clipper)
            o_s.zero_grad(set_to_none=True)

        fns["smartclip step"] = (smartclip_step, repeats)
    return median_ms_interleaved(fns, warmup=2)


def run(quick: bool) -> str:
    """The markdown section for docs/benchmarks.md."""
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gpt2, notes = _gpt2_case(device, quick)
    base = gpt2["torch clip_grad_norm_"]
    rows = [[name, ms, ms / base] for name, ms in gpt2.items()]
    ratio = gpt2["gradguard Guard (pre-step)"] / base
    verdict = "met" if ratio <= TARGETS["gpt2_guarded"] else "MISSED"
    lstm = _lstm_case(quick)
    lbase = lstm["torch clip_grad_norm_ + step"]
    lrows = [[name, ms, ms / lbase] for name, ms in lstm.items()]
    lratio = lstm["gradguard guard.step"] / lbase
    lverdict = "met" if lratio <= TARGETS["lstm_guarded"] else "MISSED"
    parts = [
        "## Guard overhead",
        "",
        f"`benchmarks/bench_guard.py` on {platform.machine()} ({device}), torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads; medians, methods timed "
        "round-robin. The guard runs its defaults: ZClip under a 1.0 cap, the loss-spike "
        "rule and the divergence detector, non-finite checks, a record row per step with "
        "per-layer norms.",
        "",
        "### GPT-2 small gradients (124M fp32 values, 148 tensors)",
        "",
        markdown_table(["method", "ms", "x torch"], rows),
        "",
        f"Guarded pre-step work vs torch clipping: **{ratio:.3f}x** (target <= "
        f"{TARGETS['gpt2_guarded']}x: {verdict}).",
        "",
        "### One training step of a 2-layer LSTM language model (CPU, Adam)",
        "",
        markdown_table(["method", "ms", "x torch"], lrows),
        "",
        f"`guard.step` vs `clip_grad_norm_` + `optimizer.step()`: **{lratio:.3f}x** "
        f"(target <= {TARGETS['lstm_guarded']}x: {lverdict}).",
    ]
    if notes:
        parts += ["", "Peers " + "; ".join(notes) + "."]
    return "\n".join(parts) + "\n"


if __name__ == "__main__":
    print(run(quick=True))
