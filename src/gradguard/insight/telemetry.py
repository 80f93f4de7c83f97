"""Transformer telemetry: attention-logit growth, output-logit log Z, Adam preconditioner lag.

Loss spikes in transformers have known mechanisms, each visible before the loss moves:

* **attention-logit growth** (Dehghani et al. 2023; Wortsman et al. 2023, arXiv 2309.14322):
  ``q.k / sqrt(d)`` grows until the softmax is one-hot and training diverges;
* **output-logit divergence** (PaLM, Chowdhery et al. 2022): the log partition function
  ``log Z = logsumexp(logits)`` of the output drifts far from 0;
* **preconditioner lag** (arXiv 2506.04805): Adam's second moment ``v`` decays while
  gradients are small, then one large gradient gives a huge update; the fraction of coordinates
  with ``g^2`` far above ``v`` says so before the step is taken.

:class:`AttentionTelemetry` measures the first two with forward hooks, as 0-dim or per-head
tensors on the device (no host sync: hand :meth:`AttentionTelemetry.row` to a
:class:`~gradguard.records.recorder.Recorder`, which reads them back when it flushes).
:func:`~gradguard.decide.attention.preconditioner_lag` measures the third from the optimizer's
state, and :func:`gradguard.decide.detect.update_ratios` (the
:class:`~gradguard.decide.detect.UpdateRatioDetector`) gives per-layer update-to-weight ratios.
The detectors of :mod:`gradguard.decide.attention` turn each signal into an early warning for
the :class:`~gradguard.guard.guard.Guard`.

Supported attention modules: ``nn.MultiheadAttention`` (the logits are recomputed from its input
projection in a forward pre-hook, so ``need_weights`` does not matter), and any module whose
class name ends in ``Attention`` (Hugging Face GPT-2 and Llama, nanoGPT-style modules) whose
forward calls ``F.scaled_dot_product_attention`` or, for Hugging Face's eager path, its module's
``eager_attention_forward``: during that module's forward (and only then) the function is
wrapped to see the query and key it is given, after rotary embeddings and with its mask.
"""

from __future__ import annotations

import functools
import math
import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradguard.decide.attention import preconditioner_lag
from gradguard.decide.detect import UpdateRatioDetector

__all__ = [
    "AttentionTelemetry",
    "additive_mask",
    "attention_max_logits",
    "attention_modules",
    "logz_stats",
    "mha_bias",
]


# ----------------------------------------------------------------------------------- measure


def attention_max_logits(
    q: Tensor,
    k: Tensor,
    scale: float | None = None,
    bias: Tensor | None = None,
    causal: bool = False,
) -> Tensor:
    """The largest attention logit ``scale * q.k`` of each head, over batch, queries and keys.

    Masked entries (``-inf`` or very negative in ``bias``, or above the diagonal when
    ``causal``) do not count: the logit of a pair the softmax never sees cannot destabilize it.

    Args:
        q: queries ``[B, H, Tq, d]``.
        k: keys ``[B, Hk, Tk, d]``; ``Hk`` may divide ``H`` (grouped-query attention).
        scale: the logit scale (``None``: ``1 / sqrt(d)``).
        bias: an additive float mask broadcastable to ``[B, H, Tq, Tk]``.
        causal: mask keys after each query (aligned bottom-right, as SDPA does).

    Returns:
        fp32 ``[H]`` on the queries' device.

    Example:
        >>> q = k = torch.ones(1, 2, 3, 4)
        >>> attention_max_logits(q, k)
        tensor([2., 2.])
    """
    h, hk = q.shape[1], k.shape[1]
    if hk != h:
        k = k.repeat_interleave(h // hk, dim=1)
    s = q.detach().float() @ k.detach().float().transpose(-1, -2)
    s = s * (q.shape[-1] ** -0.5 if scale is None else float(scale))
    if bias is not None:
        s = s + bias.detach().float()
    if causal:
        tq, tk = s.shape[-2:]
        above = torch.ones(tq, tk, dtype=torch.bool, device=s.device).triu(tk - tq + 1)
        s = s.masked_fill(above, -math.inf)
    # Masks built from finfo.min (Hugging Face) leave huge negative logits: not "seen" pairs.
    s = s.masked_fill(s < -1e30, -math.inf)
    return s.amax(dim=(0, 2, 3))


def logz_stats(logits: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and max over positions of ``log Z = logsumexp(logits, -1)``, in fp32; pure.

    A healthy LM keeps ``log Z`` near ``log(vocab)`` at init and near 0 once the z-loss holds
    it; PaLM's output-logit divergence is ``log Z`` drifting far from both.

    Example:
        >>> logz_stats(torch.zeros(2, 3, 4))
        (tensor(1.3863), tensor(1.3863))
    """
    lz = torch.logsumexp(logits.detach().float(), dim=-1)
    return lz.mean(), lz.max()


# --------------------------------------------------------------------------------- telemetry


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The attention modules :class:`AttentionTelemetry` watches, by qualified name.

    ``nn.MultiheadAttention`` and modules whose class name ends in ``Attention``; a module
    inside another one found is left to its parent.
    """
    found: dict[str, nn.Module] = {}
    for name, m in model.named_modules():
        if not (isinstance(m, nn.MultiheadAttention) or type(m).__name__.endswith("Attention")):
            continue
        if any(name.startswith(p + ".") for p in found):
            continue
        found[name] = m
    return found


def additive_mask(mask: Tensor, attend: bool, dtype: torch.dtype = torch.float32) -> Tensor:
    """A boolean or additive attention mask as an additive bias of ``dtype``.

    Args:
        mask: a bool mask or an additive (floating) one.
        attend: what ``True`` means in a bool mask: attend (SDPA and Hugging Face) or mask out
            (``nn.MultiheadAttention``).
        dtype: the bias's dtype (an additive mask is converted).

    Returns:
        ``0`` where attended, ``-inf`` where masked (a floating mask as given, in ``dtype``).

    Example:
        >>> additive_mask(torch.tensor([True, False]), attend=True)
        tensor([0., -inf])
    """
    if mask.dtype != torch.bool:
        return mask.detach().to(dtype)
    out = ~mask if attend else mask
    return torch.zeros(mask.shape, device=mask.device, dtype=dtype).masked_fill(out, -math.inf)


def mha_bias(
    attn_mask: Tensor | None,
    key_padding_mask: Tensor | None,
    b: int,
    h: int,
    dtype: torch.dtype = torch.float32,
) -> Tensor | None:
    """``nn.MultiheadAttention``'s two masks (bool: True = masked out; float: additive) as one
    additive bias broadcastable to ``[b, h, T, S]`` (``None`` when neither is given)."""
    bias: Tensor | None = None
    if attn_mask is not None:
        a = additive_mask(attn_mask, attend=False, dtype=dtype)
        bias = a.reshape(b, h, *a.shape[-2:]) if a.ndim == 3 else a
    if key_padding_mask is not None:
        kp = additive_mask(key_padding_mask, attend=False, dtype=dtype).reshape(b, 1, 1, -1)
        bias = kp if bias is None else bias + kp
    return bias


def _sdpa_bias(mask: Tensor | None) -> Tensor | None:
    """SDPA's and Hugging Face's mask (bool: True = attend; float: additive) as a bias."""
    if mask is None:
        return None
    dtype = mask.dtype if mask.is_floating_point() else torch.float32
    return additive_mask(mask, attend=True, dtype=dtype)


class AttentionTelemetry:
    """Forward hooks measuring max attention logits (per layer and head) and output-logit log Z.

    Everything stays on the device: :attr:`max_logits` maps each attention layer's name to an
    fp32 ``[heads]`` tensor, :attr:`logz_mean` / :attr:`logz_max` are 0-dim tensors, and
    :meth:`row` lays them out as a records row (one level of dicts of 0-dim tensors)::

        tel = AttentionTelemetry(model)
        loss = loss_fn(model(x), y); loss.backward()
        guard.recorder.log(step, kind="transformer", **tel.row())

    Cost: one extra ``q @ k^T`` per attention layer (fp32) on each measured forward; measure
    every ``every``-th training forward when that matters (docs/transformer.md has timings).

    Args:
        model: the model; its attention modules are found by :func:`attention_modules`.
        every: measure on every ``every``-th training forward of ``model`` (``>= 1``).
        output: the module whose output is the logits (a module or its name); ``None``: the
            model's ``get_output_embeddings()`` when it has one, else no log Z (call
            :meth:`observe_logits` yourself).
        training_only: skip forwards in eval mode (held-out evaluation does not overwrite
            the training step's numbers).

    Raises:
        ValueError: no attention module found, or ``every < 1``.

    Attributes:
        layers: name -> attention module.
        max_logits: name -> fp32 ``[heads]`` of the latest measured forward.
        generation: how many forwards were measured (a host counter; QK-clip reads it so
            that it never acts twice on one measurement).
    """

    def __init__(
        self,
        model: nn.Module,
        every: int = 1,
        output: nn.Module | str | None = None,
        training_only: bool = True,
    ) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an int >= 1, got {every!r}")
        self.model = model
        self.every = every
        self.training_only = training_only
        self.layers = attention_modules(model)
        if not self.layers:
            raise ValueError(
                f"{type(model).__name__} has no attention module (nn.MultiheadAttention or a "
                "class named *Attention)"
            )
        self.max_logits: dict[str, Tensor] = {}
        self.logz_mean: Tensor | None = None
        self.logz_max: Tensor | None = None
        self.generation = 0
        self._forwards = 0
        self._active = False
        self._current: str | None = None
        self._seen: dict[str, int] = {}  # layer -> generation of its latest measurement
        self._saved: list[tuple[Any, str, Any]] = []  # what _wrap_attention replaced
        self._handles: list[Any] = []
        self._handles.append(model.register_forward_pre_hook(self._on_model))
        for name, m in self.layers.items():
            # Hooks are bound methods (partials of them), never closures: a deep copy of the
            # model then carries a consistent copy of this telemetry instead of closures that
            # still write into the original.
            if isinstance(m, nn.MultiheadAttention):
                hook = functools.partial(self._mha_hook, name)
                self._handles.append(m.register_forward_pre_hook(hook, with_kwargs=True))
            else:
                self._handles.append(
                    m.register_forward_pre_hook(functools.partial(self._enter, name))
                )
                # prepend: a second telemetry on the same module unwraps first (LIFO)
                self._handles.append(
                    m.register_forward_hook(self._leave, always_call=True, prepend=True)
                )
        head = self._output_module(output)
        if head is not None:
            self._handles.append(head.register_forward_hook(self._on_logits))

    def _output_module(self, output: nn.Module | str | None) -> nn.Module | None:
        if isinstance(output, str):
            return self.model.get_submodule(output)
        if output is not None:
            return output
        get = getattr(self.model, "get_output_embeddings", None)
        head = get() if callable(get) else None
        return head if isinstance(head, nn.Module) else None

    # -- hooks

    def _on_model(self, module: nn.Module, args: Any) -> None:
        self._active = False
        if self.training_only and not module.training:
            return
        self._active = self._forwards % self.every == 0
        self._forwards += 1
        if self._active:
            self.generation += 1

    def _mha_hook(
        self, name: str, m: nn.MultiheadAttention, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        if self._active:
            with torch.no_grad():
                self.max_logits[name] = _mha_max_logits(m, args, kwargs)

    def _enter(self, name: str, module: nn.Module, args: Any) -> None:
        if not self._active or self._current is not None:
            return
        self._current = name
        self._saved = _wrap_attention(self, module)

    def _leave(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._current is not None:
            for owner, attr, original in reversed(self._saved):
                setattr(owner, attr, original)
            self._saved = []
            self._current = None

    def _on_logits(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._active and isinstance(output, Tensor):
            self.observe_logits(output)

    def _record(self, q: Tensor, k: Tensor, scale: Any, bias: Tensor | None, causal: bool) -> None:
        if self._current is None:
            return
        with torch.no_grad():
            # A layer called several times in one forward (weight sharing): keep the largest.
            m = attention_max_logits(q, k, scale, bias, causal)
            prev = self.max_logits.get(self._current)
            if prev is not None and self._seen.get(self._current) == self.generation:
                m = torch.maximum(prev, m)
            self._seen[self._current] = self.generation
            self.max_logits[self._current] = m

    # -- API

    def observe_logits(self, logits: Tensor) -> None:
        """Measure ``log Z`` of these output logits (for models without an output module)."""
        self.logz_mean, self.logz_max = logz_stats(logits)

    def max_logit(self) -> Tensor | None:
        """The largest attention logit over all layers and heads (0-dim), or ``None`` yet."""
        if not self.max_logits:
            return None
        return torch.stack([v.max() for v in self.max_logits.values()]).max()

    def row(
        self,
        per_head: bool = False,
        optimizer: torch.optim.Optimizer | None = None,
        update_ratios: UpdateRatioDetector | None = None,
    ) -> dict[str, Any]:
        """This step's numbers as a records row: device tensors, one level of dicts.

        Args:
            per_head: also each head's max logit.
            optimizer: an Adam-family optimizer: add its
                :func:`~gradguard.decide.attention.preconditioner_lag` (call it before
                ``optimizer.step()``).
            update_ratios: a :class:`~gradguard.decide.detect.UpdateRatioDetector` the guard runs:
                add its latest per-layer update-to-weight ratios.

        Returns:
            ``attn_max_logit`` (0-dim, all layers), ``attn_layer_max_logit`` = {layer: value},
            with ``per_head`` ``attn_head_max_logit`` = {``"<layer>/h<i>"``: value};
            ``logz_mean``, ``logz_max`` when measured; ``adam_lag``; ``update_ratio`` =
            {parameter: ratio}.
        """
        out: dict[str, Any] = {}
        top = self.max_logit()
        if top is not None:
            out["attn_max_logit"] = top
            out["attn_layer_max_logit"] = {n: v.max() for n, v in self.max_logits.items()}
            if per_head:
                out["attn_head_max_logit"] = {
                    f"{n}/h{i}": v[i] for n, v in self.max_logits.items() for i in range(len(v))
                }
        if self.logz_mean is not None:
            out["logz_mean"] = self.logz_mean
            out["logz_max"] = self.logz_max
        if optimizer is not None:
            out["adam_lag"] = preconditioner_lag(optimizer)
        if update_ratios is not None and update_ratios.ratios is not None:
            r = update_ratios.ratios
            out["update_ratio"] = {n: r[i] for i, n in enumerate(update_ratios.names)}
        return out

    def remove(self) -> None:
        """Detach every hook."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __repr__(self) -> str:
        return f"AttentionTelemetry(layers={len(self.layers)}, every={self.every})"


def _arg(args: tuple[Any, ...], kwargs: dict[str, Any], i: int, name: str, default: Any) -> Any:
    return args[i] if len(args) > i else kwargs.get(name, default)


def mha_qk(m: nn.MultiheadAttention, query: Tensor, key: Tensor) -> tuple[Tensor, Tensor]:
    """Queries and keys ``[B, H, T, d]`` of ``nn.MultiheadAttention`` from its inputs."""
    e, h = m.embed_dim, m.num_heads
    if m._qkv_same_embed_dim:
        assert m.in_proj_weight is not None
        wq, wk = m.in_proj_weight[:e], m.in_proj_weight[e : 2 * e]
    else:
        assert m.q_proj_weight is not None and m.k_proj_weight is not None
        wq, wk = m.q_proj_weight, m.k_proj_weight
    b = m.in_proj_bias
    bq, bk = (None, None) if b is None else (b[:e], b[e : 2 * e])
    if query.ndim == 2:  # unbatched
        query, key = query.unsqueeze(0), key.unsqueeze(0)
    elif not m.batch_first:
        query, key = query.transpose(0, 1), key.transpose(0, 1)
    q = F.linear(query, wq, bq)
    k = F.linear(key, wk, bk)
    q = q.reshape(q.shape[0], q.shape[1], h, e // h).transpose(1, 2)
    k = k.reshape(k.shape[0], k.shape[1], h, e // h).transpose(1, 2)
    return q, k


def _mha_max_logits(
    m: nn.MultiheadAttention, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Tensor:
    query, key = _arg(args, kwargs, 0, "query", None), _arg(args, kwargs, 1, "key", None)
    qk = getattr(m, "qk", None)  # a qk-normed module knows its own queries and keys
    q, k = (
        qk(query.detach(), key.detach())
        if callable(qk)
        else mha_qk(m, query.detach(), key.detach())
    )
    attn_mask = _arg(args, kwargs, 5, "attn_mask", None)
    kpm = _arg(args, kwargs, 3, "key_padding_mask", None)
    is_causal = bool(_arg(args, kwargs, 7, "is_causal", False))
    bias = mha_bias(attn_mask, kpm, q.shape[0], m.num_heads)
    return attention_max_logits(q, k, None, bias, causal=is_causal and attn_mask is None)


def _wrap_attention(tel: AttentionTelemetry, module: nn.Module) -> list[tuple[Any, str, Any]]:
    """Wrap ``F.scaled_dot_product_attention`` and the module's Hugging Face
    ``eager_attention_forward`` so they report the query and key they receive to ``tel``; the
    caller puts back what this returns (``(owner, attribute, original)``) after the forward."""
    saved: list[tuple[Any, str, Any]] = []
    sdpa = F.scaled_dot_product_attention

    def sdpa_wrapper(query: Tensor, key: Tensor, value: Tensor, *args: Any, **kw: Any) -> Any:
        mask = args[0] if args else kw.get("attn_mask")
        causal = bool(args[2] if len(args) > 2 else kw.get("is_causal", False))
        scale = args[3] if len(args) > 3 else kw.get("scale")
        tel._record(query, key, scale, _sdpa_bias(mask), causal)
        return sdpa(query, key, value, *args, **kw)

    saved.append((F, "scaled_dot_product_attention", sdpa))
    F.scaled_dot_product_attention = sdpa_wrapper
    home = sys.modules.get(type(module).__module__)
    eager = getattr(home, "eager_attention_forward", None)
    if home is not None and callable(eager):

        def eager_wrapper(mod: nn.Module, query: Tensor, key: Tensor, *args: Any, **kw: Any) -> Any:
            mask = args[1] if len(args) > 1 else kw.get("attention_mask")
            scale = args[2] if len(args) > 2 else kw.get("scaling")
            tel._record(query, key, scale, _sdpa_bias(mask), False)
            return eager(mod, query, key, *args, **kw)

        saved.append((home, "eager_attention_forward", eager))
        home.eager_attention_forward = eager_wrapper  # type: ignore[attr-defined]
    return saved
