"""Transformer telemetry, detectors and remedies against slow references.

The references compute every head's logits in plain loops from the model's own projections and
are themselves checked against the attention weights the frameworks return
(``need_weights`` / ``output_attentions``): softmax of the reference logits must equal them.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from gradguard.app.lab.models import TinyLM
from gradguard.decide.attention import (
    AttentionLogitDetector,
    LogZDetector,
    PreconditionerLagDetector,
    preconditioner_lag,
)
from gradguard.insight.telemetry import AttentionTelemetry, attention_max_logits, logz_stats
from gradguard.insight.transformer_remedies import (
    QKClip,
    QKNormMultiheadAttention,
    ZLoss,
    add_logit_softcap,
    insert_qk_norm,
    soft_cap,
    z_loss,
)
from tests import conformance as C

transformers = pytest.importorskip("transformers")

VOCAB, T = 40, 12


def tiny_lm(seed: int = 0) -> TinyLM:
    return TinyLM(vocab=VOCAB, dim=32, heads=4, layers=2, context=T, seed=seed)


def gpt2(impl: str = "sdpa", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=T, n_embd=32, n_layer=2, n_head=4,
        bos_token_id=0, eos_token_id=0, attn_implementation=impl,
        attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(cfg)


def llama(impl: str = "sdpa", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=T,
        bos_token_id=0, eos_token_id=0, pad_token_id=0, attn_implementation=impl,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg)


def tokens(seed: int = 1, batch: int = 3) -> Tensor:
    return torch.randint(0, VOCAB, (batch, T), generator=torch.Generator().manual_seed(seed))


def slow_logits(q: Tensor, k: Tensor, scale: float, causal: bool) -> Tensor:
    """``[B, H, Tq, Tk]`` logits one dot product at a time; masked pairs are -inf."""
    b, h, tq, _ = q.shape
    group = h // k.shape[1]
    ql, kl = q.detach().double().tolist(), k.detach().double().tolist()
    out = [
        [
            [
                [
                    -math.inf if causal and j > i else scale * sum(a * c for a, c in zip(qv, kv))
                    for j, kv in enumerate(kl[bi][hi // group])
                ]
                for i, qv in enumerate(ql[bi][hi])
            ]
            for hi in range(h)
        ]
        for bi in range(b)
    ]
    assert len(out[0][0]) == tq
    return torch.tensor(out, dtype=torch.float64)


def assert_matches(ref: Tensor, probs: Tensor, got: Tensor) -> None:
    """The reference reproduces the framework's attention weights, and the telemetry's max."""
    torch.testing.assert_close(ref.softmax(-1).float(), probs.float(), atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(got, ref.amax(dim=(0, 2, 3)).float(), atol=1e-4, rtol=1e-5)


# ------------------------------------------------------------------------------ telemetry


def test_max_logits_closed_form_and_masks() -> None:
    q = torch.ones(1, 2, 3, 4)
    assert torch.equal(attention_max_logits(q, q), torch.tensor([2.0, 2.0]))
    k = torch.arange(3.0).reshape(1, 1, 3, 1).expand(1, 2, 3, 1)
    q1 = torch.ones(1, 2, 3, 1)
    assert torch.equal(attention_max_logits(q1, k, scale=1.0), torch.tensor([2.0, 2.0]))
    # causal: query 0 sees key 0 only; the last query sees all (bottom-right alignment)
    assert torch.equal(
        attention_max_logits(q1[:, :, :1], k, 1.0, causal=True), torch.tensor([2.0, 2.0])
    )
    bias = torch.tensor([0.0, 0.0, -math.inf])
    assert torch.equal(attention_max_logits(q1, k, 1.0, bias=bias), torch.tensor([1.0, 1.0]))


def test_mha_telemetry_matches_need_weights_reference() -> None:
    model = tiny_lm()
    tel = AttentionTelemetry(model, output="out")
    x = tokens()
    captured: dict[str, Tensor] = {}

    def grab(name: str):
        def hook(m: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
            captured[name] = args[0].detach()

        return hook

    for name, m in tel.layers.items():
        m.register_forward_pre_hook(grab(name), with_kwargs=True)
    logits = model(x)
    for name, m in tel.layers.items():
        assert isinstance(m, nn.MultiheadAttention)
        h_in = captured[name]
        mask = model.mask[:T, :T]
        _, probs = m(
            h_in, h_in, h_in, attn_mask=mask, need_weights=True, average_attn_weights=False
        )
        e, h = m.embed_dim, m.num_heads
        assert m.in_proj_weight is not None and m.in_proj_bias is not None
        q = (
            (h_in @ m.in_proj_weight[:e].T + m.in_proj_bias[:e])
            .reshape(3, T, h, -1)
            .transpose(1, 2)
        )
        k = (
            (h_in @ m.in_proj_weight[e : 2 * e].T + m.in_proj_bias[e : 2 * e])
            .reshape(3, T, h, -1)
            .transpose(1, 2)
        )
        ref = slow_logits(q, k, (e // h) ** -0.5, causal=True)
        assert_matches(ref, probs, tel.max_logits[name])
    lz = torch.logsumexp(logits.double(), -1)
    torch.testing.assert_close(tel.logz_mean, lz.mean().float())
    torch.testing.assert_close(tel.logz_max, lz.max().float())


def test_mha_key_padding_mask_excludes_padded_keys() -> None:
    torch.manual_seed(0)
    m = nn.MultiheadAttention(8, 2, batch_first=True)
    x = torch.randn(2, 5, 8)
    x[:, -1] *= 100.0  # a huge key, padded away
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[:, -1] = True

    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = m

        def forward(self, x: Tensor) -> Tensor:
            return self.attn(x, x, x, key_padding_mask=pad)[0]

    tel = AttentionTelemetry(Holder())
    tel.model(x)
    _, probs = m(x, x, x, key_padding_mask=pad, average_attn_weights=False)
    e = 8
    assert m.in_proj_weight is not None and m.in_proj_bias is not None
    q = (x @ m.in_proj_weight[:e].T + m.in_proj_bias[:e]).reshape(2, 5, 2, 4).transpose(1, 2)
    k = (
        (x @ m.in_proj_weight[e : 2 * e].T + m.in_proj_bias[e : 2 * e])
        .reshape(2, 5, 2, 4)
        .transpose(1, 2)
    )
    ref = slow_logits(q, k, 0.5, causal=False)
    ref[..., -1] = -math.inf
    assert_matches(ref, probs, tel.max_logits["attn"])


def _hf_reference(model: nn.Module, family: str) -> tuple[list[Tensor], list[Tensor]]:
    """Per layer: reference logits (from the projections) and eager attention weights."""
    x = tokens()
    qs: dict[int, Tensor] = {}
    ks: dict[int, Tensor] = {}
    pos: dict[int, Any] = {}
    handles = []
    layers = model.transformer.h if family == "gpt2" else model.model.layers
    for i, block in enumerate(layers):
        attn = block.attn if family == "gpt2" else block.self_attn
        if family == "gpt2":
            handles.append(
                attn.c_attn.register_forward_hook(
                    lambda m, a, o, i=i: (
                        qs.__setitem__(i, o[..., :32]),
                        ks.__setitem__(i, o[..., 32:64]),
                    )[0]
                )
            )
        else:
            handles.append(
                attn.q_proj.register_forward_hook(lambda m, a, o, i=i: qs.__setitem__(i, o))
            )
            handles.append(
                attn.k_proj.register_forward_hook(lambda m, a, o, i=i: ks.__setitem__(i, o))
            )
            handles.append(
                attn.register_forward_pre_hook(
                    lambda m, a, kw, i=i: pos.__setitem__(i, kw["position_embeddings"]),
                    with_kwargs=True,
                )
            )
    with torch.no_grad():
        out = model(x, output_attentions=True)
    for h in handles:
        h.remove()
    refs = []
    for i in range(len(layers)):
        if family == "gpt2":
            q = qs[i].reshape(3, T, 4, 8).transpose(1, 2)
            k = ks[i].reshape(3, T, 4, 8).transpose(1, 2)
        else:
            from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

            q = qs[i].reshape(3, T, 4, 8).transpose(1, 2)
            k = ks[i].reshape(3, T, 2, 8).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, *pos[i])
        refs.append(slow_logits(q, k, 8**-0.5, causal=True))
    return refs, list(out.attentions)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_hf_telemetry_matches_output_attentions_reference(family: str, impl: str) -> None:
    build = gpt2 if family == "gpt2" else llama
    eager = build("eager")
    refs, probs = _hf_reference(eager, family)
    model = build(impl)
    model.load_state_dict(eager.state_dict())
    model.train()  # telemetry measures training forwards; these configs have no dropout
    tel = AttentionTelemetry(model)
    assert len(tel.layers) == 2
    with torch.no_grad():
        logits = model(tokens()).logits
    for got, ref, p in zip(tel.max_logits.values(), refs, probs):
        assert_matches(ref, p, got)
    mean, mx = logz_stats(logits)
    assert torch.equal(tel.logz_mean, mean) and torch.equal(tel.logz_max, mx)
    # the functions it wrapped during each attention forward are back
    assert (
        torch.nn.functional.scaled_dot_product_attention.__name__ == "scaled_dot_product_attention"
    )


def test_telemetry_every_k_eval_and_row() -> None:
    model = tiny_lm()
    tel = AttentionTelemetry(model, every=2, output="out")
    x = tokens()
    model(x)
    assert tel.generation == 1
    first = tel.max_logits["blocks.layers.0.self_attn"]
    model(x)  # skipped (every 2)
    assert tel.generation == 1 and tel.max_logits["blocks.layers.0.self_attn"] is first
    model.eval()
    model(x)  # eval forwards are not measured
    assert tel.generation == 1
    model.train()
    row = tel.row(per_head=True)
    assert set(row) == {
        "attn_max_logit",
        "attn_layer_max_logit",
        "attn_head_max_logit",
        "logz_mean",
        "logz_max",
    }
    assert len(row["attn_head_max_logit"]) == 8
    assert all(v.ndim == 0 for v in row["attn_head_max_logit"].values())
    tel.remove()
    model(x)
    assert tel.generation == 1


def test_telemetry_has_no_host_sync_and_goes_through_the_recorder() -> None:
    from gradguard.decide.detect import UpdateRatioDetector
    from gradguard.records.recorder import Recorder

    model = tiny_lm()
    tel = AttentionTelemetry(model, output="out")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    ratios = UpdateRatioDetector()
    rec = Recorder(flush_every=100)
    x = tokens()
    for step in range(2):
        ratios.before(model)
        with C.no_host_sync():
            model(x).sum().backward()
            row = tel.row(per_head=True, update_ratios=ratios)
        # The Adam-lag measure reads the optimizer's step counter, which torch keeps in host
        # memory unless capturable/fused (its own Adam reads it with .item() every step): no
        # device sync, but the harness above cannot tell host memory from a device.
        row["adam_lag"] = tel.row(optimizer=opt)["adam_lag"]
        rec.log(step, kind="transformer", **row)
        opt.step()
        opt.zero_grad()
        ratios.after(model)
    rows = rec.flush()
    assert isinstance(rows[0]["attn_max_logit"], float)
    assert isinstance(rows[0]["attn_head_max_logit"]["blocks.layers.1.self_attn/h3"], float)
    assert rows[1]["adam_lag"] == 0.0 and "update_ratio" not in rows[0]
    assert rows[1]["update_ratio"]["out.weight"] > 0


def test_no_attention_module_raises() -> None:
    with pytest.raises(ValueError, match="no attention module"):
        AttentionTelemetry(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="every"):
        AttentionTelemetry(tiny_lm(), every=0)


def test_preconditioner_lag_closed_form() -> None:
    p = nn.Parameter(torch.zeros(100))
    opt = torch.optim.Adam([p], lr=1e-3, betas=(0.9, 0.99))
    p.grad = torch.ones(100)
    assert float(preconditioner_lag(opt)) == 0.0  # no state yet
    opt.step()
    # v_hat = 1 after one step; now 7 coordinates get gradients 6x larger (36 > 25)
    g = torch.ones(100)
    g[:7] = 6.0
    p.grad = g
    assert float(preconditioner_lag(opt, min_step=1)) == pytest.approx(0.07)
    assert float(preconditioner_lag(opt, factor=40.0, min_step=1)) == 0.0
    assert float(preconditioner_lag(opt)) == 0.0  # before min_step, v is one squared gradient


# ------------------------------------------------------------------------------ remedies


def test_z_loss_is_exactly_the_documented_term() -> None:
    logits = torch.randn(4, 7, VOCAB, generator=torch.Generator().manual_seed(0)) * 5
    target = torch.randint(0, VOCAB, (4, 7))
    lse = torch.logsumexp(logits, -1)
    assert torch.equal(z_loss(logits), 1e-4 * lse.square().mean())
    ce = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), target.reshape(-1))
    torch.testing.assert_close(ZLoss()(logits, target) - ce, 1e-4 * lse.square().mean())
    custom = ZLoss(lambda lg, t: lg.mean() * 0, coef=1e-2)
    torch.testing.assert_close(custom(logits, target), 1e-2 * lse.square().mean())


def test_soft_cap() -> None:
    x = torch.tensor([-1e4, -1.0, 0.0, 1e-3, 1e4])
    y = soft_cap(x, 30.0)
    assert float(y.abs().max()) <= 30.0
    torch.testing.assert_close(y[3], x[3], rtol=1e-6, atol=0)
    model = tiny_lm()
    capped = add_logit_softcap(model, 0.5, output="out")
    x_t = tokens()
    with torch.no_grad():
        out = capped(x_t)
        assert out.shape == model(x_t).shape and float(out.abs().max()) <= 0.5
        assert float(model(x_t).abs().max()) > 0.5  # the original is untouched
        hf = add_logit_softcap(gpt2(), 0.5)
        assert float(hf(x_t).logits.abs().max()) <= 0.5


def _scaled_qk_(model: nn.Module, factor: float) -> None:
    """Multiply every query and key weight by ``factor`` (plants logit growth)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "in_proj" in name or "c_attn" in name or "q_proj" in name or "k_proj" in name:
                if "c_attn" in name:
                    p[..., : 2 * 32].mul_(factor)
                elif "in_proj" in name:
                    p[: 2 * 32].mul_(factor)
                else:
                    p.mul_(factor)


def _output(out: Any) -> Tensor:
    return out if isinstance(out, Tensor) else out.logits


@pytest.mark.parametrize("build", [tiny_lm, gpt2, llama], ids=["mha", "gpt2", "llama"])
def test_qk_norm_keeps_shape_and_lowers_max_logit(build: Any) -> None:
    model = build()
    _scaled_qk_(model, 6.0 if build is tiny_lm else 40.0)  # HF inits with std 0.02
    x = tokens()
    normed = insert_qk_norm(model)
    tel_a, tel_b = AttentionTelemetry(model), AttentionTelemetry(normed)
    a, b = _output(model(x)), _output(normed(x))
    assert a.shape == b.shape and b.isfinite().all()
    hi, lo = tel_a.max_logit(), tel_b.max_logit()
    assert hi is not None and lo is not None
    assert float(lo) < float(hi)
    # with unit-gain LayerNorm a logit is at most |q||k|/sqrt(d) = d/sqrt(d)
    assert float(lo) <= math.sqrt(8) + 1e-4
    # gradients flow into the norms
    _output(normed(x)).sum().backward()
    assert any("norm" in n and p.grad is not None for n, p in normed.named_parameters())


def test_qk_norm_mha_matches_plain_mha_when_norm_is_identity_and_eval_path() -> None:
    torch.manual_seed(0)
    m = nn.MultiheadAttention(8, 2, batch_first=False)
    qn = QKNormMultiheadAttention.from_mha(m)
    qn.q_norm = nn.Identity()  # type: ignore[assignment]
    qn.k_norm = nn.Identity()  # type: ignore[assignment]
    x = torch.randn(5, 3, 8)
    mask = nn.Transformer.generate_square_subsequent_mask(5)
    for need in (False, True):
        a, wa = m(x, x, x, attn_mask=mask, need_weights=need)
        b, wb = qn(x, x, x, attn_mask=mask, need_weights=need)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        if need:
            torch.testing.assert_close(wa, wb, atol=1e-6, rtol=1e-5)
    # unbatched input
    a1, _ = m(x[:, 0], x[:, 0], x[:, 0], need_weights=False)
    b1, _ = qn(x[:, 0], x[:, 0], x[:, 0], need_weights=False)
    torch.testing.assert_close(a1, b1, atol=1e-5, rtol=1e-5)
    # an encoder layer in eval mode under no_grad must not take the fast path around the norms
    model = insert_qk_norm(tiny_lm())
    model.eval()
    with torch.no_grad():
        out = model(tokens())
    assert out.isfinite().all()


@pytest.mark.parametrize("build", [tiny_lm, gpt2, llama], ids=["mha", "gpt2", "llama"])
def test_qk_clip_caps_each_head_at_tau(build: Any) -> None:
    model = build()
    _scaled_qk_(model, 6.0 if build is tiny_lm else 40.0)
    x = tokens()
    tel = AttentionTelemetry(model)
    model(x)
    before = {n: v.clone() for n, v in tel.max_logits.items()}
    tau = 0.5 * float(tel.max_logit())  # type: ignore[arg-type]
    clip = QKClip(tel, tau=tau)
    out_shape = _output(model(x)).shape
    factors = clip()
    assert clip() == {}  # one measurement is used once
    model(x)
    for i, (name, after) in enumerate(tel.max_logits.items()):
        want = torch.minimum(before[name], torch.full_like(before[name], tau))
        if i == 0:
            # the same input gives exactly min(max, tau) per head (GQA: per query head too);
            # later layers see inputs the clip of earlier layers changed
            torch.testing.assert_close(after, want, atol=1e-4, rtol=1e-4)
        assert float(after.max()) < float(before[name].max())
        assert factors[name].shape == before[name].shape
    assert _output(model(x)).shape == out_shape


def test_qk_clip_does_nothing_on_a_skipped_step_and_syncs_nothing() -> None:
    model = tiny_lm()
    _scaled_qk_(model, 6.0)
    tel = AttentionTelemetry(model)
    model(tokens())
    before = [p.detach().clone() for p in model.parameters()]
    clip = QKClip(tel, tau=1.0)
    with C.no_host_sync():
        factors = clip(applied=torch.tensor(False))
    assert all(bool((f == 1).all()) for f in factors.values())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    model(tokens())
    with C.no_host_sync():
        clip(applied=torch.tensor(True))
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("build", [tiny_lm, gpt2, llama], ids=["mha", "gpt2", "llama"])
def test_qk_clip_refuses_qk_normed_layouts(build: Any) -> None:
    model = insert_qk_norm(build())
    with pytest.raises(TypeError, match="cannot rescale"):
        QKClip(AttentionTelemetry(model))


# ------------------------------------------------------------------------------ detectors


class FakeTelemetry:
    """A telemetry source whose values a hook sets per step."""

    def __init__(self) -> None:
        self.value = torch.tensor(5.0)
        self.logz_max: Tensor | None = torch.tensor(4.0)

    def max_logit(self) -> Tensor:
        return self.value


def _planted(step: int) -> float:
    """Max logit: noisy around 5, then growing 8 % a step from step 60."""
    noise = 1.0 + 0.02 * math.sin(step * 1.7)
    return 5.0 * noise * (1.08 ** max(0, step - 60))


def _set(fake: FakeTelemetry, planted: bool):
    def hook(det: Any, step: int) -> None:
        v = _planted(step) if planted else 5.0 * (1.0 + 0.02 * math.sin(step * 1.7))
        fake.value = torch.tensor(v)
        fake.logz_max = torch.tensor(v)

    return hook


@pytest.mark.parametrize("cls", [AttentionLogitDetector, LogZDetector])
def test_detectors_fire_on_planted_growth_and_stay_silent_on_a_clean_run(cls: type) -> None:
    seq = C.signal_sequence(120)
    fake = FakeTelemetry()
    det = cls(fake, limit=30.0, window=32, z=6.0)
    clean = C.drive_detector(det, seq, hook=_set(fake, planted=False))
    assert not any(bool(d.flag) for d in clean)
    fake2 = FakeTelemetry()
    det2 = cls(fake2, limit=30.0, window=32, z=6.0)
    got = C.drive_detector(det2, seq, hook=_set(fake2, planted=True))
    first = next(i for i, d in enumerate(got) if bool(d.flag))
    # fires while the logit is still far below where softmax saturates (~5 x 1.08^k)
    assert 60 < first <= 60 + math.ceil(math.log(30 / 5) / math.log(1.08))


@pytest.mark.parametrize("cls", [AttentionLogitDetector, LogZDetector])
def test_signal_detector_state_roundtrip(cls: type) -> None:
    seq = C.signal_sequence(100)
    fake = FakeTelemetry()
    C.check_detector_roundtrip(
        lambda: cls(fake, limit=30.0, window=16, z=4.0), seq, 50, hook=_set(fake, True)
    )
    det = cls(fake, limit=30.0, window=16)
    state = det.state_dict()
    assert state["limit"] == 30.0 and state["window"] == 16
    with pytest.raises(ValueError):
        cls(fake).load_state_dict({**state, "limit": -1.0})


def test_preconditioner_lag_detector() -> None:
    p = nn.Parameter(torch.zeros(1000))
    opt = torch.optim.AdamW([p], lr=1e-3)
    det = PreconditionerLagDetector(opt, factor=25.0, max_fraction=1e-3)
    seq = C.signal_sequence(3)
    g = torch.Generator().manual_seed(0)
    for step in range(30):
        p.grad = torch.randn(1000, generator=g)
        # no flag before the min_step-th Adam step (v is one or two squared gradients then)
        assert not bool(det.check(seq[0]).flag), step
        opt.step()
    p.grad = torch.randn(1000, generator=g)
    p.grad[:10] = 50.0  # 1 % of coordinates jump to 50 sigma
    d = det.check(seq[2])
    assert bool(d.flag) and float(d.score) == pytest.approx(0.01, abs=2e-3)
    state = det.state_dict()
    assert state == {"factor": 25.0, "max_fraction": 1e-3, "min_step": 10, "every": 1}
    sparse = PreconditionerLagDetector(opt, max_fraction=1e-3, every=2)
    assert [bool(sparse.check(seq[2]).flag) for _ in range(4)] == [True, False, True, False]
    other = PreconditionerLagDetector()
    other.load_state_dict(state)
    assert other.factor == 25.0 and other.max_fraction == 1e-3
    assert PreconditionerLagDetector.default_response == ("log",)


def test_detectors_with_the_guard() -> None:
    from gradguard.guard.guard import Guard, GuardConfig

    model = tiny_lm()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tel = AttentionTelemetry(model, output="out")
    dets = [
        AttentionLogitDetector(tel, limit=1.0),
        LogZDetector(tel),
        PreconditionerLagDetector(opt),
    ]
    guard = Guard(model, opt, config=GuardConfig(detectors=dets))
    clip = QKClip(tel, tau=100.0)
    calls: list[bool] = []
    guard.register_post_step_hook(clip)
    guard.register_post_step_hook(lambda r, applied: calls.append(bool(applied)))
    x = tokens()
    for _ in range(3):
        loss = nn.functional.cross_entropy(model(x).reshape(-1, VOCAB), x.reshape(-1))
        loss.backward()
        report = guard.step(loss)
        opt.zero_grad()
        guard.recorder.log(report.step, kind="transformer", **tel.row())
    assert not report.skipped  # the logit detector (limit 1.0) flags, but only logs
    assert calls == [True, True, True]  # the post-step hook ran after each applied step
    rows = guard.flush()
    assert any(r["kind"] == "action" and r.get("signal") == "attn_logit" for r in guard.records)
    assert any(r["kind"] == "transformer" for r in rows + guard.records)


# ------------------------------------------------------------------------------ diagnose


def test_measure_blocks_follow_the_residual_stream() -> None:
    from gradguard.insight.diagnose import measure_blocks

    model = tiny_lm()
    x = tokens()
    blocks = measure_blocks(model, (x, x))
    assert [b.name for b in blocks] == ["blocks.layers.0", "blocks.layers.1"]
    # one block's output is the next one's input, forward and backward
    assert blocks[0].rms_out == pytest.approx(blocks[1].rms_in, rel=1e-12)
    assert blocks[0].grad_in > 0 and blocks[1].grad_in == pytest.approx(
        blocks[0].grad_out, rel=1e-9
    )
    h = model.embed(x) + model.pos[:T]
    assert blocks[0].rms_in == pytest.approx(
        float(h.detach().double().square().mean().sqrt()), rel=1e-6
    )
    assert all(b.forward_gain == pytest.approx(b.rms_out / b.rms_in) for b in blocks)
    tel = AttentionTelemetry(model)
    model(x)
    for b in blocks:
        assert b.max_logit == pytest.approx(
            float(tel.max_logits[b.name + ".self_attn"].max()), rel=1e-6
        )


def test_diagnose_ranks_probed_transformer_remedies() -> None:
    import gradguard

    model = tiny_lm()
    x = tokens(batch=4)
    d = gradguard.diagnose(
        model, (x, x.roll(-1, 1)), steps=1, jacobian_iters=0, probe_lr=0.3, probe_steps=8
    )
    assert len(d.blocks) == 2
    names = [r.name for r in d.transformer_remedies]
    assert len(names) == 6 and "no change (reference)" in names
    by = {r.name: r for r in d.transformer_remedies}
    assert all(r.applicable and math.isfinite(r.loss_after) for r in d.transformer_remedies)
    # at a high LR qk-layernorm holds the logits down; QK-clip holds them at its cap (+ one step)
    assert by["qk-layernorm"].max_logit < by["no change (reference)"].max_logit
    text = d.summary()
    assert "transformer blocks (residual stream)" in text and "qk-layernorm" in text
    parts = {r["part"] for r in d.to_rows()}
    assert {"block", "transformer_remedy"} <= parts
    assert d.to_dict()["transformer_remedies"][0]["applicable"] is True


# ------------------------------------------------------------------------------ lab


def test_lab_spike_step() -> None:
    from gradguard.app.lab.transformer import spike_step

    assert spike_step([4.0, 3.0, 2.5] + [2.5] * 10 + [3.6]) == 13
    assert spike_step([4.0] * 5 + [math.nan] * 10) == 10  # non-finite counts, after step 10
    assert spike_step([4.0 - 0.1 * i for i in range(20)]) is None


def test_lab_run_one_is_deterministic_and_measures() -> None:
    from gradguard.app.lab.transformer import run_one

    a = run_one("qk-clip", 0.3, 0, quick=True, steps=6)
    b = run_one("qk-clip", 0.3, 0, quick=True, steps=6)
    assert a.losses == b.losses and a.max_logits == b.max_logits and a.warnings == b.warnings
    assert len(a.losses) == len(a.max_logits) == len(a.logz) == 6
    assert set(a.warnings) == {"attn_logit", "logz", "adam_lag"}
    for remedy in ("qk-layernorm", "z-loss", "soft-cap"):
        r = run_one(remedy, 3e-3, 0, quick=True, steps=2)
        assert math.isfinite(r.final) and r.remedy == remedy
    with pytest.raises(ValueError, match="remedy"):
        run_one("dropout")


def test_lab_tables_from_runs() -> None:
    from gradguard.app.lab.transformer import Run, _false_alarms, _lead_rows

    def make(scenario: str, lr: float, spike: int | None, warn: list[int]) -> Run:
        return Run(scenario, "none", lr, 0, 100, 4.5, 3.0, [], [], [], {"attn_logit": warn}, spike)

    runs = [make("S3w", 1.0, 30, [6, 7]), make("S3w", 0.3, None, [18]), make("S6", 3e-3, None, [])]
    rows, leads = _lead_rows(runs)
    assert leads["attn_logit"] == [24] and rows[0][3] == "6 (lead 24)" and rows[1][2] == "-"
    steps, alarms = _false_alarms([*runs, make("S3", 1e-2, None, [50])])
    assert steps == 200 and alarms["attn_logit"] == 1


def test_cli_lab_transformer_runs_alone() -> None:
    from gradguard.app.cli import main

    assert main(["lab", "transformer", "chain", "--out", "/nonexistent-never-written"]) == 2


def test_attention_logit_growth_trigger_fires_before_the_limit() -> None:
    seq = C.signal_sequence(90)
    fake = FakeTelemetry()

    def fast(det: Any, step: int) -> None:  # 50 % a step from step 60: 1.5^3 > 3
        fake.value = torch.tensor(5.0 * 1.5 ** max(0, step - 60))

    # window 256: the z-score rule is still warming up (it needs 128 values)
    got = C.drive_detector(AttentionLogitDetector(fake, 30.0, window=256), seq, hook=fast)
    assert next(i for i, d in enumerate(got) if bool(d.flag)) == 63  # the limit: step 65
    off = AttentionLogitDetector(fake, 30.0, window=256, growth=None)
    off = C.drive_detector(off, seq, hook=fast)
    assert next(i for i, d in enumerate(off) if bool(d.flag)) == 65
    with pytest.raises(ValueError, match="growth"):
        AttentionLogitDetector(fake, growth=1.0)
    with pytest.raises(ValueError, match="growth_steps"):
        AttentionLogitDetector(fake, window=8, growth_steps=8)


def test_two_telemetries_and_a_deep_copy_stay_apart() -> None:
    import copy

    import torch.nn.functional as F

    original = F.scaled_dot_product_attention
    for build in (tiny_lm, gpt2):
        model = build()
        a, b = AttentionTelemetry(model), AttentionTelemetry(model)
        model(tokens())
        assert a.max_logits.keys() == b.max_logits.keys() and len(a.max_logits) == 2
        for name in a.max_logits:
            assert torch.equal(a.max_logits[name], b.max_logits[name])
        assert F.scaled_dot_product_attention is original  # both unwrapped, in order
        # a deep copy carries its own copy of the telemetry: running it changes nothing here
        twin = copy.deepcopy(model)
        _scaled_qk_(twin, 10.0)
        before = {n: v.clone() for n, v in a.max_logits.items()}
        gen = a.generation
        twin(tokens())
        assert a.generation == gen
        assert all(torch.equal(before[n], a.max_logits[n]) for n in before)
        assert F.scaled_dot_product_attention is original
