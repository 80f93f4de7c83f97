"""Transformer remedies: qk-layernorm, z-loss, output-logit soft-capping and QK-clip.

Each one acts on a mechanism :mod:`gradguard.insight.telemetry` measures:

* :func:`insert_qk_norm`: LayerNorm on each head's queries and keys, so attention logits cannot
  grow with the weights (Dehghani et al. 2023; Wortsman et al. 2023, arXiv 2309.14322; OLMo 2);
* :func:`z_loss` / :class:`ZLoss`: ``1e-4 * mean(logsumexp(logits)^2)`` added to the loss keeps the
  output log partition function near 0 (PaLM, Chowdhery et al. 2022);
* :func:`soft_cap` / :func:`add_logit_softcap`: ``cap * tanh(logits / cap)`` on the output
  logits (Gemma 2, cap 30);
* :class:`QKClip`: after each optimizer step, rescale a head's ``W_q`` and ``W_k`` by
  ``sqrt(tau / max_logit)`` each when its max logit exceeded ``tau`` (Kimi K2's MuonClip,
  arXiv 2507.20534).

Supported attention modules: ``nn.MultiheadAttention`` (so ``nn.TransformerEncoder`` models),
Hugging Face ``GPT2Attention`` (one fused ``c_attn`` projection) and Llama-style attention
(``q_proj``/``k_proj``, grouped-query attention included). As in :mod:`gradguard.insight.remedies`,
a trailing underscore changes a model in place; the other transforms return a new model.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradguard.core import validate as _validate
from gradguard.insight.telemetry import AttentionTelemetry, attention_modules, mha_bias, mha_qk

__all__ = [
    "QKClip",
    "QKNormMultiheadAttention",
    "ZLoss",
    "add_logit_softcap",
    "insert_qk_norm",
    "soft_cap",
    "z_loss",
]

Z_LOSS_COEF = 1e-4  # PaLM's coefficient; Wortsman et al. 2023 use the same


# ------------------------------------------------------------------------------- output logits


def z_loss(logits: Tensor, coef: float = Z_LOSS_COEF) -> Tensor:
    """``coef * mean(logsumexp(logits, -1)^2)``, in fp32 (PaLM, Chowdhery et al. 2022).

    Example:
        >>> z_loss(torch.zeros(2, 4))   # logsumexp = log 4
        tensor(0.0002)
    """
    return coef * torch.logsumexp(logits.float(), dim=-1).square().mean()


class ZLoss:
    """A loss function plus the z-loss of its logits: ``loss_fn(logits, *rest) + z_loss(logits)``.

    Args:
        loss_fn: ``(logits, *rest) -> loss`` (e.g. a cross-entropy over flattened logits);
            ``None``: ``F.cross_entropy`` over the last dimension.
        coef: the z-loss coefficient (``>= 0``, default 1e-4).

    Example:
        >>> loss = ZLoss()(logits, targets)
    """

    def __init__(self, loss_fn: Callable[..., Tensor] | None = None, coef: float = Z_LOSS_COEF):
        self.loss_fn = loss_fn
        self.coef = _validate.threshold("coef", coef)

    def __call__(self, logits: Tensor, *rest: Any, **kw: Any) -> Tensor:
        if self.loss_fn is None:
            (target,) = rest
            base = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
        else:
            base = self.loss_fn(logits, *rest, **kw)
        return base + z_loss(logits, self.coef)

    def __repr__(self) -> str:
        return f"ZLoss(coef={self.coef})"


def soft_cap(logits: Tensor, cap: float) -> Tensor:
    """``cap * tanh(logits / cap)``: logits bounded by ``cap``, unchanged near 0 (Gemma 2)."""
    return cap * torch.tanh(logits / cap)


class SoftCap:
    """A forward hook that soft-caps a module's output (see :func:`add_logit_softcap`)."""

    def __init__(self, cap: float) -> None:
        self.cap = _validate.threshold("cap", cap, allow_zero=False)

    def __call__(self, module: nn.Module, args: Any, output: Tensor) -> Tensor:
        return soft_cap(output, self.cap)

    def __repr__(self) -> str:
        return f"SoftCap({self.cap})"


def add_logit_softcap(
    model: nn.Module, cap: float = 30.0, output: nn.Module | str | None = None
) -> nn.Module:
    """A copy of ``model`` whose output logits are ``cap * tanh(logits / cap)`` (Gemma 2: 30).

    The cap is a forward hook on the output module, so tied weights and the module tree are
    unchanged (and copies keep it).

    Args:
        model: the model (left untouched).
        cap: the cap (``> 0``).
        output: the output module or its name (``None``: ``get_output_embeddings()``, else the
            last ``nn.Linear``).

    Raises:
        ValueError: no output module.
    """
    hook = SoftCap(cap)
    new = copy.deepcopy(model)
    head = _output_module(new, output)
    head.register_forward_hook(hook)
    return new


def _output_module(model: nn.Module, output: nn.Module | str | None) -> nn.Module:
    if isinstance(output, str):
        return model.get_submodule(output)
    if output is not None:
        return output
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if isinstance(head, nn.Module):
        return head
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no output module to cap")
    return linears[-1]


# ---------------------------------------------------------------------------------- qk-norm


def _no_fast_path(module: nn.Module, args: Any) -> None:
    """A no-op pre-hook: TransformerEncoderLayer's inference fast path reads ``in_proj_weight``
    directly and would skip the norms; a hook on a child makes it take the module path."""
    return None


class QKNormMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` with LayerNorm on each head's queries and keys (qk-layernorm).

    Built from an existing module by :meth:`from_mha` (weights copied); the norms start as the
    identity affine map. ``bias_k``/``bias_v`` and ``add_zero_attn`` are not supported.
    """

    q_norm: nn.LayerNorm
    k_norm: nn.LayerNorm

    @classmethod
    def from_mha(cls, m: nn.MultiheadAttention) -> QKNormMultiheadAttention:
        """The qk-normed twin of ``m``, same weights, device and dtype."""
        if m.bias_k is not None or m.add_zero_attn:
            raise NotImplementedError("qk-norm: add_bias_kv / add_zero_attn are not supported")
        w = m.in_proj_weight if m.in_proj_weight is not None else m.q_proj_weight
        assert w is not None
        new = cls(
            m.embed_dim,
            m.num_heads,
            dropout=m.dropout,
            bias=m.in_proj_bias is not None,
            kdim=m.kdim,
            vdim=m.vdim,
            batch_first=m.batch_first,
            device=w.device,
            dtype=w.dtype,
        )
        new.load_state_dict(m.state_dict())
        new.train(m.training)
        d = m.head_dim
        new.q_norm = nn.LayerNorm(d, device=w.device, dtype=w.dtype)
        new.k_norm = nn.LayerNorm(d, device=w.device, dtype=w.dtype)
        new.register_forward_pre_hook(_no_fast_path)
        return new

    def qk(self, query: Tensor, key: Tensor) -> tuple[Tensor, Tensor]:
        """Normed queries and keys ``[B, H, T, d]`` (what the softmax sees, before scaling)."""
        q, k = mha_qk(self, query, key)
        return self.q_norm(q), self.k_norm(k)

    def forward(  # type: ignore[override]
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        unbatched = query.ndim == 2
        q, k = self.qk(query, key)
        e, h = self.embed_dim, self.num_heads
        if self._qkv_same_embed_dim:
            assert self.in_proj_weight is not None
            wv = self.in_proj_weight[2 * e :]
        else:
            assert self.v_proj_weight is not None
            wv = self.v_proj_weight
        bv = None if self.in_proj_bias is None else self.in_proj_bias[2 * e :]
        if unbatched:
            v_in = value.unsqueeze(0)
        else:
            v_in = value if self.batch_first else value.transpose(0, 1)
        v = F.linear(v_in, wv, bv)
        b, s = v.shape[0], v.shape[1]
        v = v.reshape(b, s, h, e // h).transpose(1, 2)
        bias = mha_bias(attn_mask, key_padding_mask, b, h, q.dtype)
        causal = is_causal and bias is None
        p = self.dropout if self.training else 0.0
        if need_weights:
            logits = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
            if bias is not None:
                logits = logits + bias
            if causal:
                tq, tk = logits.shape[-2:]
                above = torch.ones(tq, tk, dtype=torch.bool, device=q.device).triu(1)
                logits = logits.masked_fill(above, -math.inf)
            weights = F.dropout(logits.softmax(-1), p, self.training)
            out = weights @ v
        else:
            weights = None
            out = F.scaled_dot_product_attention(q, k, v, bias, p, is_causal=causal)
        out = out.transpose(1, 2).reshape(b, -1, e)
        out = self.out_proj(out)
        if unbatched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)
        return out, weights


class HeadNorm(nn.Module):
    """Wraps a projection: LayerNorm over each head's slice of chosen output ranges.

    ``spans`` are ``(start, stop)`` feature ranges of the projection's output (the query and
    key parts of GPT-2's fused ``c_attn``; all of Llama's ``q_proj``), each cut into heads of
    ``head_dim`` features and normalized per head by the span's own LayerNorm.
    """

    def __init__(self, proj: nn.Module, spans: list[tuple[int, int]], head_dim: int) -> None:
        super().__init__()
        self.proj = proj
        self.spans = spans
        self.head_dim = head_dim
        w = next(proj.parameters())
        self.norms = nn.ModuleList(
            nn.LayerNorm(head_dim, device=w.device, dtype=w.dtype) for _ in spans
        )

    def forward(self, x: Tensor) -> Tensor:
        y = self.proj(x)
        parts, at = [], 0
        for (a, b), norm in zip(self.spans, self.norms):
            parts.append(y[..., at:a])
            z = y[..., a:b]
            shape = z.shape
            parts.append(norm(z.reshape(*shape[:-1], -1, self.head_dim)).reshape(shape))
            at = b
        parts.append(y[..., at:])
        return torch.cat(parts, dim=-1)


def _kind(m: nn.Module) -> str:
    if isinstance(m, nn.MultiheadAttention):
        return "mha"
    if hasattr(m, "c_attn") and hasattr(m, "head_dim") and not getattr(m, "is_cross_attention", 0):
        return "fused"
    if hasattr(m, "q_proj") and hasattr(m, "k_proj") and hasattr(m, "head_dim"):
        return "split"
    return "other"


def insert_qk_norm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with LayerNorm on each attention head's queries and keys.

    ``nn.MultiheadAttention`` becomes :class:`QKNormMultiheadAttention`; GPT-2's fused
    ``c_attn`` and Llama's ``q_proj``/``k_proj`` are wrapped in :class:`HeadNorm` (before rotary
    embeddings, as OLMo 2 does). The norms start as identity affine maps, so the logits become
    ``sqrt(d)``-scale cosine similarities at once and can only grow through the norms' gains.

    Raises:
        ValueError: no supported attention module.
    """
    new = copy.deepcopy(model)
    done = 0
    for name, m in attention_modules(new).items():
        kind = _kind(m)
        if kind == "other" or isinstance(m, QKNormMultiheadAttention):
            continue
        if kind == "mha":
            assert isinstance(m, nn.MultiheadAttention)
            _replace(new, name, QKNormMultiheadAttention.from_mha(m))
        elif kind == "fused":
            hf: Any = m  # Hugging Face attention: plain attributes mypy cannot see
            e = int(hf.embed_dim)
            hf.c_attn = HeadNorm(hf.c_attn, [(0, e), (e, 2 * e)], int(hf.head_dim))
        else:
            hf = m
            d = int(hf.head_dim)
            hf.q_proj = HeadNorm(hf.q_proj, [(0, hf.q_proj.out_features)], d)
            hf.k_proj = HeadNorm(hf.k_proj, [(0, hf.k_proj.out_features)], d)
        done += 1
    if not done:
        raise ValueError(f"{type(model).__name__}: no supported attention module for qk-norm")
    return new


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, attr, new)


# ---------------------------------------------------------------------------------- QK-clip


class QKClip:
    """Kimi K2's QK-clip (MuonClip, arXiv 2507.20534): cap each head's max attention logit.

    After the optimizer step, every head ``h`` whose max logit ``m_h`` (measured by the
    :class:`~gradguard.insight.telemetry.AttentionTelemetry` on this step's forward) exceeded
    ``tau`` has ``W_q`` and ``W_k`` (and their biases) multiplied by ``sqrt(tau / m_h)`` each, so
    the same input would now give at most ``tau``. Under grouped-query attention a key head is
    shared: it takes the square root of the smallest factor of its group and each query head the
    rest, so every head's logits scale by exactly its own factor. On the device, no host sync; a
    measurement is used once (the telemetry's ``generation`` tells), so measuring every k steps
    clips every k steps.

    Use it as the guard's post-step hook (called right after every optimizer step with a
    device flag ``applied``; a skipped step is left as it was, in every sync mode)::

        clip = QKClip(tel, tau=100.0)
        guard.register_post_step_hook(clip)

    Args:
        telemetry: the telemetry watching the model's attention modules.
        tau: the cap (``> 0``; Kimi K2 used 100).

    Raises:
        TypeError: an attention module whose query/key weights it cannot find (an SDPA module
            of unknown layout, or one already qk-normed: it needs no clip).
    """

    def __init__(self, telemetry: AttentionTelemetry, tau: float = 100.0) -> None:
        self.telemetry = telemetry
        self.tau = _validate.threshold("tau", tau, allow_zero=False)
        self._used = 0
        for name, m in telemetry.layers.items():
            normed = isinstance(m, QKNormMultiheadAttention) or any(
                isinstance(getattr(m, a, None), HeadNorm) for a in ("c_attn", "q_proj", "k_proj")
            )
            if _kind(m) == "other" or normed:
                raise TypeError(f"QKClip cannot rescale {name} ({type(m).__name__})")
        self.factors: dict[str, Tensor] = {}

    def __call__(self, report: Any = None, applied: Tensor | None = None) -> dict[str, Tensor]:
        """Clip after a step.

        Args:
            report: the guard's step report (its step hook passes one; unused).
            applied: 0-dim bool on the device, False when the step was skipped (then nothing
                changes); lets a hook that runs on every step stay free of host syncs.

        Returns:
            Each layer's per-head logit factor (empty when there was no new measurement).
        """
        tel = self.telemetry
        if tel.generation == self._used:
            return {}
        self._used = tel.generation
        self.factors = self.apply_(tel.layers, tel.max_logits, applied)
        return self.factors

    @torch.no_grad()
    def apply_(
        self,
        layers: dict[str, nn.Module],
        max_logits: dict[str, Tensor],
        applied: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Rescale ``W_q``/``W_k`` of the heads above ``tau``; returns each layer's per-head
        logit factor ``min(1, tau / max_logit)`` (1 for non-finite or non-positive maxima, and
        everywhere when ``applied`` is False)."""
        out: dict[str, Tensor] = {}
        for name, m in layers.items():
            mx = max_logits.get(name)
            if mx is None:
                continue
            ok = mx.isfinite() & (mx > 0)
            if applied is not None:
                ok = ok & applied.to(mx.device, torch.bool)
            f = torch.where(ok, (self.tau / mx).clamp(max=1.0), 1.0)
            _scale_heads_(m, f)
            out[name] = f
        return out

    def __repr__(self) -> str:
        return f"QKClip(tau={self.tau})"


def _split_factors(f: Tensor, kv_heads: int) -> tuple[Tensor, Tensor]:
    """Per query head and per key head multipliers whose product per head is ``f``."""
    group = f.numel() // kv_heads
    fk = f.reshape(kv_heads, group).amin(dim=1).sqrt()
    fq = f / fk.repeat_interleave(group)
    return fq, fk


def _rows_(w: Tensor | None, start: int, factors: Tensor, d: int, dim: int = 0) -> None:
    if w is None:
        return
    scale = factors.to(w.dtype).repeat_interleave(d)
    n = scale.numel()
    if dim == 0:
        view = w[start : start + n]
        view.mul_(scale.reshape(-1, *([1] * (w.ndim - 1))))
    else:
        w[..., start : start + n].mul_(scale)


def _scale_heads_(m: Any, f: Tensor) -> None:
    kind = _kind(m)
    if kind == "mha":
        assert isinstance(m, nn.MultiheadAttention)
        e, d = m.embed_dim, m.head_dim
        fq, fk = _split_factors(f, m.num_heads)
        if m._qkv_same_embed_dim:
            _rows_(m.in_proj_weight, 0, fq, d)
            _rows_(m.in_proj_weight, e, fk, d)
        else:
            _rows_(m.q_proj_weight, 0, fq, d)
            _rows_(m.k_proj_weight, 0, fk, d)
        _rows_(m.in_proj_bias, 0, fq, d)
        _rows_(m.in_proj_bias, e, fk, d)
    elif kind == "fused":  # Conv1D: weight [in, out], columns q | k | v
        d, e = int(m.head_dim), int(m.embed_dim)
        fq, fk = _split_factors(f, f.numel())
        proj: Any = m.c_attn
        _rows_(proj.weight, 0, fq, d, dim=-1)
        _rows_(proj.weight, e, fk, d, dim=-1)
        _rows_(proj.bias, 0, fq, d, dim=-1)
        _rows_(proj.bias, e, fk, d, dim=-1)
    else:
        d = int(m.head_dim)
        qp: Any = m.q_proj
        kp: Any = m.k_proj
        fq, fk = _split_factors(f, kp.weight.shape[0] // d)
        _rows_(qp.weight, 0, fq, d)
        _rows_(kp.weight, 0, fk, d)
        _rows_(getattr(qp, "bias", None), 0, fq, d)
        _rows_(getattr(kp, "bias", None), 0, fk, d)
