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
:class:`~gradguard.records.Recorder`, which reads them back when it flushes).
:func:`preconditioner_lag` measures the third from the optimizer's state, and
:func:`gradguard.detect.update_ratios` (the :class:`~gradguard.detect.UpdateRatioDetector`)
gives per-layer update-to-weight ratios. The detectors at the end of this module turn each
signal into an early warning for the :class:`~gradguard.guard.Guard`.

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
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradguard import _validate
from gradguard._state import as_bool
from gradguard.detect import Detection, Detector, Signals, SpikeDetector, UpdateRatioDetector

__all__ = [
    "AttentionLogitDetector",
    "AttentionTelemetry",
    "LogZDetector",
    "PreconditionerLagDetector",
    "attention_max_logits",
    "attention_modules",
    "logz_stats",
    "preconditioner_lag",
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


def preconditioner_lag(
    optimizer: torch.optim.Optimizer, factor: float = 25.0, min_step: int = 10
) -> Tensor:
    """Fraction of coordinates with ``g^2 > factor * v_hat``: gradients far above Adam's ``v``.

    ``v_hat = v / (1 - beta2^t)`` is the bias-corrected second moment of the steps so far (before
    this step). When ``v`` has decayed during calm steps, a sudden large gradient gives an update
    of up to ``lr * sqrt(factor)`` per coordinate instead of ``lr``: the "preconditioner lag" of
    arXiv 2506.04805. With a steady gradient distribution the fraction is about
    ``P(|z| > sqrt(factor))`` (6e-7 at the default 25, five sigma).

    Call it after ``backward`` and before ``optimizer.step()``. Parameters without an Adam
    state (``exp_avg_sq`` and ``step``) yet, or fewer than ``min_step`` steps into it (``v`` is
    then the square of one or two gradients, and a fresh draw is often 5 of them), count as
    not lagging; a fresh optimizer gives 0.

    Args:
        optimizer: an Adam-family optimizer (``Adam``, ``AdamW``, ``NAdam``, ``RAdam``...).
        factor: the ``g^2 / v_hat`` ratio that counts as lagging (``> 0``).
        min_step: Adam steps a parameter must have taken before it counts (``>= 0``).

    Returns:
        0-dim fp32 on the parameters' device (0 when no parameter qualifies).
    """
    factor = _validate.threshold("factor", factor, allow_zero=False)
    lagging: list[Tensor] = []
    total = 0
    device: torch.device | None = None
    for group in optimizer.param_groups:
        betas = group.get("betas")
        beta2 = float(betas[1]) if isinstance(betas, (tuple, list)) else 0.999
        eps2 = float(group.get("eps", 1e-8)) ** 2
        for p in group["params"]:
            st = optimizer.state.get(p, {})
            v, step = st.get("exp_avg_sq"), st.get("step")
            if p.grad is None or v is None or step is None:
                continue
            g = p.grad.detach()
            device = g.device
            total += g.numel()
            if not isinstance(step, Tensor) or step.device.type == "cpu":
                # torch's Adam keeps ``step`` on the CPU unless capturable/fused: reading it is
                # no device sync, and a host scalar lets one fused pass do the comparison.
                t = float(step)
                if t < min_step:
                    continue
                scale = (1.0 - beta2**t) / factor  # g^2 > factor * v_hat  <=>  v - g^2 * scale < 0
                d = torch.addcmul(v.detach().float(), g.float(), g.float(), value=-scale)
                lagging.append(torch.count_nonzero(d < -eps2 * scale))
            else:  # the step count lives on the device: stay there
                tt = step.to(device, torch.float32)
                v_hat = v.detach().float() / (1.0 - beta2**tt).clamp(min=1e-30)
                hit = g.float().square() > factor * v_hat + eps2
                lagging.append(torch.count_nonzero(hit & (tt >= min_step)))
    if not lagging:
        return torch.zeros((), dtype=torch.float32, device=device)
    return torch.stack(lagging).sum().float() / total


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


def _mha_bias(
    attn_mask: Tensor | None, key_padding_mask: Tensor | None, b: int, h: int, like: Tensor
) -> Tensor | None:
    """MultiheadAttention's masks (bool: True = masked out; float: additive) as one bias."""

    def additive(m: Tensor) -> Tensor:
        if m.dtype == torch.bool:
            return torch.zeros(m.shape, device=like.device).masked_fill(m, -math.inf)
        return m.detach().float()

    bias: Tensor | None = None
    if attn_mask is not None:
        a = additive(attn_mask)
        bias = a.reshape(b, h, *a.shape[-2:]) if a.ndim == 3 else a
    if key_padding_mask is not None:
        kp = additive(key_padding_mask).reshape(b, 1, 1, -1)
        bias = kp if bias is None else bias + kp
    return bias


def _sdpa_bias(mask: Tensor | None) -> Tensor | None:
    """SDPA's and Hugging Face's mask (bool: True = attend; float: additive) as a bias."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, -math.inf)


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
            optimizer: an Adam-family optimizer: add its :func:`preconditioner_lag` (call
                before ``optimizer.step()``).
            update_ratios: a :class:`~gradguard.detect.UpdateRatioDetector` the guard runs:
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
    bias = _mha_bias(attn_mask, kpm, q.shape[0], m.num_heads, q)
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


# --------------------------------------------------------------------------------- detectors


class _SignalSpike(SpikeDetector):
    """A :class:`~gradguard.detect.SpikeDetector` over a telemetry value instead of loss or
    gradient norm: flags when the value exceeds ``limit``, when its log jumps ``z`` sigma above
    its accepted history, or (with ``growth``) when it is above ``floor`` and ``growth`` times
    its value ``growth_steps`` accepted steps before (read from the same history)."""

    default_response: ClassVar[tuple[str, ...] | None] = ("log",)
    _config_keys = (  # type: ignore[assignment]
        "limit", "window", "z", "warmup", "min_std", "growth", "growth_steps", "floor",
    )  # fmt: skip

    def __init__(
        self,
        source: Any = None,
        limit: float = math.inf,
        window: int = 128,
        z: float = 6.0,
        warmup: int | None = None,
        min_std: float = 1e-2,
        growth: float | None = None,
        growth_steps: int = 3,
        floor: float = 0.0,
    ) -> None:
        super().__init__("loss", window=window, z=z, warmup=warmup, log=True, min_std=min_std)
        # The spike machinery needs a signal name; the guard keys a detector by name:signal
        # when it has one, and this one's signal is its own, so it goes by its name alone.
        del self.signal
        self.source = source
        self.limit = _validate.as_float("limit", limit)
        if not self.limit > 0:
            raise ValueError(f"limit must be > 0, got {limit!r}")
        if growth is not None:
            growth = _validate.as_float("growth", growth)
            if not growth > 1.0:
                raise ValueError(f"growth must be > 1 (or None), got {growth!r}")
        self.growth = growth
        if (
            isinstance(growth_steps, bool)
            or not isinstance(growth_steps, int)
            or not 1 <= growth_steps < self.window
        ):
            raise ValueError(f"growth_steps must be an int in [1, window), got {growth_steps!r}")
        self.growth_steps = growth_steps
        self.floor = _validate.threshold("floor", floor)

    def _grew(self, x: Tensor) -> Tensor:
        """Above ``floor`` and ``growth`` x the stored value ``growth_steps`` back; pure."""
        if self.growth is None:
            return torch.zeros((), dtype=torch.bool, device=x.device)
        st = self._ensure(x)
        buf, count = st["buffer"], st["count"]
        back = buf[(count - self.growth_steps) % self.window]
        floor = math.log(self.floor) if self.floor > 0 else -math.inf
        jump = (x - back > math.log(self.growth)) & (x > floor)
        return jump & (count >= self.growth_steps) & x.isfinite()

    def _raw(self, s: Signals) -> Tensor | None:
        raise NotImplementedError

    def _value(self, s: Signals) -> Tensor | None:
        raw = self._raw(s)
        if raw is None:
            return None
        return raw.detach().reshape(()).float().clamp(min=1e-12).log().to(s.total_norm.device)

    def check(self, s: Signals) -> Detection:
        x = self._value(s)
        if x is None:
            return Detection(
                torch.zeros((), dtype=torch.bool, device=s.total_norm.device),
                torch.zeros((), dtype=torch.float32, device=s.total_norm.device),
            )
        z = self.score(s)
        over = x > math.log(self.limit) if math.isfinite(self.limit) else torch.zeros_like(z > 0)
        flag = (z > self.z) | over | self._grew(x)
        return Detection(flag, torch.where(over, torch.full_like(z, math.inf), z))

    def update(self, s: Signals, accepted: Tensor) -> None:
        x = self._value(s)
        if x is None:
            return
        ok = as_bool(accepted, x.device)
        if math.isfinite(self.limit):
            ok = ok & (x <= math.log(self.limit))  # a value over the limit never becomes normal
        super().update(s, ok)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(limit={self.limit}, window={self.window}, z={self.z}, "
            f"growth={self.growth}, growth_steps={self.growth_steps}, floor={self.floor})"
        )


class AttentionLogitDetector(_SignalSpike):
    """Early warning of attention-logit growth: the max attention logit (all layers and heads)
    above ``limit``, tripling (``growth``) within ``growth_steps`` steps from above ``floor``, or
    its log ``z`` sigma above its recent history.

    Reads :class:`AttentionTelemetry` (give it as ``telemetry``); the guard calls ``check`` after
    the backward, when the telemetry holds this step's forward. Attention entropy collapses
    once logits reach a few tens (Dehghani et al. 2023; Wortsman et al. 2023); Kimi K2 caps
    them at 100 (QK-clip). It warns, so :attr:`default_response` is ``("log",)``; pair it with
    :class:`gradguard.transformer_remedies.QKClip` to act.

    Args:
        telemetry: the :class:`AttentionTelemetry` to read (``None`` only to load a state).
        limit: flag above this max logit (``> 0``; ``inf``: z-score only).
        window, z, warmup, min_std: as :class:`~gradguard.detect.SpikeDetector`, on
            ``log(max logit)``.
        growth: flag when the max logit is this many times its value ``growth_steps``
            accepted steps before (``> 1``; ``None``: off). The defaults (3x within 3 steps,
            above 5) warned 2-7 steps earlier than the limit alone on the lab's diverging runs
            and never in its 10,800 clean steps (docs/transformer.md).
        growth_steps: how far back ``growth`` compares (``1 <= growth_steps < window``).
        floor: ``growth`` counts only above this max logit (``>= 0``): early training moves
            small logits by large factors.

    Example:
        >>> det = AttentionLogitDetector(tel, limit=50.0)
        >>> guard = Guard(model, opt, config=GuardConfig(detectors=[det, ...]))
    """

    name: ClassVar[str] = "attn_logit"

    def __init__(
        self,
        telemetry: AttentionTelemetry | None = None,
        limit: float = 50.0,
        window: int = 128,
        z: float = 6.0,
        warmup: int | None = None,
        min_std: float = 1e-2,
        growth: float | None = 3.0,
        growth_steps: int = 3,
        floor: float = 5.0,
    ) -> None:
        super().__init__(telemetry, limit, window, z, warmup, min_std, growth, growth_steps, floor)

    def _raw(self, s: Signals) -> Tensor | None:
        return None if self.source is None else self.source.max_logit()


class LogZDetector(_SignalSpike):
    """Early warning of output-logit divergence: ``|log Z|`` (max over positions) above
    ``limit``, or its log ``z`` sigma above its recent history (PaLM, Chowdhery et al. 2022).

    Args:
        telemetry: the :class:`AttentionTelemetry` measuring the output logits.
        limit: flag above this ``|log Z|`` (``> 0``).
        window, z, warmup, min_std: as :class:`~gradguard.detect.SpikeDetector`, on
            ``log |log Z|``.
        growth, growth_steps, floor: as :class:`AttentionLogitDetector` (off by default).
    """

    name: ClassVar[str] = "logz"

    def __init__(
        self,
        telemetry: AttentionTelemetry | None = None,
        limit: float = 50.0,
        window: int = 128,
        z: float = 6.0,
        warmup: int | None = None,
        min_std: float = 1e-2,
        growth: float | None = None,
        growth_steps: int = 3,
        floor: float = 0.0,
    ) -> None:
        super().__init__(telemetry, limit, window, z, warmup, min_std, growth, growth_steps, floor)

    def _raw(self, s: Signals) -> Tensor | None:
        if self.source is None or self.source.logz_max is None:
            return None
        return self.source.logz_max.abs()


class PreconditionerLagDetector(Detector):
    """Flags a step where more than ``max_fraction`` of the coordinates have ``g^2`` above
    ``factor`` times Adam's bias-corrected second moment (:func:`preconditioner_lag`).

    The step has not been taken when the guard checks: a skip or clip prevents the huge update.
    The score is the fraction. :attr:`default_response` is ``("log",)``.

    Args:
        optimizer: the Adam-family optimizer (``None`` only to load a state).
        factor: the ``g^2 / v_hat`` ratio that counts as lagging (``> 0``).
        max_fraction: flag above this fraction of coordinates (in ``[0, 1)``). Sparse
            gradients (embedding rows of rare tokens, whose ``v`` decays between their
            appearances) make a few percent lag on healthy steps; on the lab's char-GPT no
            clean step reached 10 % (docs/transformer.md).
        min_step: Adam steps before a parameter counts (see :func:`preconditioner_lag`).
        every: measure on every ``every``-th check only (a pass over gradients and ``v``:
            about 1 s per step for GPT-2 small on one CPU thread, under a millisecond on a
            GPU); the other checks never flag.
    """

    name: ClassVar[str] = "adam_lag"
    default_response: ClassVar[tuple[str, ...] | None] = ("log",)
    _config_keys = ("factor", "max_fraction", "min_step", "every")

    def __init__(
        self,
        optimizer: torch.optim.Optimizer | None = None,
        factor: float = 25.0,
        max_fraction: float = 0.1,
        min_step: int = 10,
        every: int = 1,
    ) -> None:
        super().__init__()
        self.optimizer = optimizer
        self.factor = _validate.threshold("factor", factor, allow_zero=False)
        f = _validate.as_float("max_fraction", max_fraction)
        if not 0.0 <= f < 1.0:
            raise ValueError(f"max_fraction must be in [0, 1), got {max_fraction!r}")
        self.max_fraction = f
        if isinstance(min_step, bool) or not isinstance(min_step, int) or min_step < 0:
            raise ValueError(f"min_step must be an int >= 0, got {min_step!r}")
        self.min_step = min_step
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an int >= 1, got {every!r}")
        self.every = every
        self._checks = 0

    def check(self, s: Signals) -> Detection:
        device = s.total_norm.device
        due = self._checks % self.every == 0
        self._checks += 1
        if self.optimizer is None or not due:
            z = torch.zeros((), dtype=torch.float32, device=device)
            return Detection(z > 0, z)
        frac = preconditioner_lag(self.optimizer, self.factor, self.min_step).to(device)
        return Detection(frac > self.max_fraction, frac)

    def __repr__(self) -> str:
        return (
            f"PreconditionerLagDetector(factor={self.factor}, max_fraction={self.max_fraction}, "
            f"every={self.every})"
        )
