"""The models' one point of contact with fastvl's ops and modules: attention, LayerNorm, the token ops, the roll
offsets, the contrastive losses and the vocabulary loss (linear cross-entropy) all reach the models through this
module.

Token reduction (:mod:`fastvl.models.blocks`) reaches attention through :class:`Attention` here: fastvl's
``nn.Attention`` (same parameters and state dict) that also serves ToMe's proportional attention (``key_bias =
log(size)``), hands out the keys averaged over heads (ToMe's merge metric) and the softmax rows of the leading
queries (SMAUG's attention scores), all roll-aware.

The contrastive losses are made distributed-aware here: when ``torch.distributed`` is initialised with more
than one rank they go through ``fastvl.nn.ClipLoss(gather_with_grad=True)`` / ``fastvl.nn.MILNCELoss``, so
every rank computes the global-batch loss and, after DDP's gradient averaging, N ranks train exactly like one
process on the global batch.
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.distributed as dist
import torch.nn.functional as F

from fastvl import nn, ops
from fastvl.nn import Attention as BaseAttention
from fastvl.nn import LayerNorm, TokenMerger, TokenSelector
from fastvl.ops import (
    drop_tokens,
    flash_attention,
    frame_scores,
    gather_tokens,
    layer_norm,
    linear_cross_entropy,
    masked_patch_loss,
    merge_tokens,
    random_masking,
    received_attention,
    restore_tokens,
    roll_frame_offsets,
    select_space_time,
    select_tokens,
    temporal_token_roll,
    tube_masking,
)
from fastvl.ops.attention import roll_rows
from fastvl.rules import compute_dtype

__all__ = [
    "KEY_BIAS",
    "Attention",
    "LayerNorm",
    "TokenMerger",
    "TokenSelector",
    "attention_rows",
    "clip_loss",
    "drop_tokens",
    "flash_attention",
    "frame_scores",
    "gather_tokens",
    "layer_norm",
    "linear_cross_entropy",
    "masked_patch_loss",
    "merge_tokens",
    "mil_nce_loss",
    "proportional_attention",
    "proportional_attention_reference",
    "random_masking",
    "received_attention",
    "restore_tokens",
    "roll_frame_offsets",
    "roll_stream",
    "select_space_time",
    "select_tokens",
    "temporal_token_roll",
    "tube_masking",
]

# whether fastvl.ops.flash_attention takes ``key_bias`` (then proportional attention runs in its kernels)
KEY_BIAS = "key_bias" in inspect.signature(flash_attention).parameters


def roll_stream(x: torch.Tensor, offsets: torch.Tensor, num_frames: int) -> torch.Tensor:
    """Move tokens between frames like roll-aware attention reads them: ``x (B*T, S, ...)`` -> ``out[b*T + t, s] =
    x[b*T + (t + offsets[s]) % T, s]`` (``offsets (S,)`` int, e.g. ``roll_frame_offsets(..., steps=k)``: k rolls
    at once). Differentiable (an index gather)."""
    return roll_rows(x, offsets % num_frames, num_frames)


def proportional_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_bias: torch.Tensor,
    *,
    softmax_scale: float,
    key_padding_mask: torch.Tensor | None = None,
    frame_offsets: torch.Tensor | None = None,
    num_frames: int = 1,
) -> torch.Tensor:
    """``softmax(q k^T * scale + key_bias[key]) v`` per head (ToMe's proportional attention with ``key_bias =
    log(size)``), as torch SDPA with an additive float mask; differentiable in q, k, v and key_bias.

    q, k, v ``(N, S, H, D)``; ``key_bias (N, S)`` or ``(N, H, S)`` float; ``key_padding_mask (N, S)`` bool (True =
    padded: excluded); ``frame_offsets (S,)`` with ``num_frames``: roll-aware addressing as
    :func:`fastvl.ops.flash_attention` (the bias and the mask are addressed like k). Returns ``(N, S, H, D)``.
    """
    N, S, H, _ = q.shape
    bias = key_bias if key_bias.dim() == 3 else key_bias[:, None]
    shift = None
    if frame_offsets is not None and num_frames > 1:
        shift = frame_offsets.long() % num_frames
        q, k, v = (roll_rows(t, shift, num_frames) for t in (q, k, v))
        bias = roll_rows(bias.transpose(1, 2), shift, num_frames).transpose(1, 2)
        if key_padding_mask is not None:
            key_padding_mask = roll_rows(key_padding_mask, shift, num_frames)
    ct = compute_dtype(q.dtype)
    mask = bias.to(ct)[:, :, None, :]  # (N, 1 or H, 1, S)
    if key_padding_mask is not None:
        mask = mask.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    o = F.scaled_dot_product_attention(
        *(t.to(ct).transpose(1, 2) for t in (q, k, v)), attn_mask=mask, scale=softmax_scale
    ).transpose(1, 2)
    if shift is not None:
        o = roll_rows(o, shift, num_frames, inverse=True)
    return o.to(q.dtype)


def proportional_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_bias: torch.Tensor,
    *,
    softmax_scale: float,
    key_padding_mask: torch.Tensor | None = None,
    frame_offsets: torch.Tensor | None = None,
    num_frames: int = 1,
    backend: str | None = None,
) -> torch.Tensor:
    """Attention with an additive per-key bias (:func:`proportional_attention_reference`'s spec): fastvl's
    ``flash_attention(key_bias=...)`` where the op takes it (:data:`KEY_BIAS`), else the reference."""
    if KEY_BIAS:
        return flash_attention(
            q, k, v, softmax_scale=softmax_scale, key_padding_mask=key_padding_mask, frame_offsets=frame_offsets,
            num_frames=num_frames, key_bias=key_bias.to(compute_dtype(q.dtype)), backend=backend,
        )  # fmt: skip
    return proportional_attention_reference(
        q, k, v, key_bias, softmax_scale=softmax_scale, key_padding_mask=key_padding_mask,
        frame_offsets=frame_offsets, num_frames=num_frames,
    )  # fmt: skip


def attention_rows(
    q: torch.Tensor,
    k: torch.Tensor,
    rows: int,
    *,
    softmax_scale: float,
    key_padding_mask: torch.Tensor | None = None,
    key_bias: torch.Tensor | None = None,
    frame_offsets: torch.Tensor | None = None,
    num_frames: int = 1,
) -> torch.Tensor:
    """The softmax rows of the first ``rows`` queries against all keys: ``(N, H, rows, S)`` float32 (float64 for
    float64), in the logical (rolled) order of roll-aware attention; no gradient (scores for a hard top-k).

    q, k ``(N, S, H, D)``; the mask, bias and offsets as :func:`proportional_attention_reference`. Costs ``rows x
    S`` dot products per head, not ``S x S``.
    """
    with torch.no_grad():
        if frame_offsets is not None and num_frames > 1:
            shift = frame_offsets.long() % num_frames
            q, k = roll_rows(q, shift, num_frames), roll_rows(k, shift, num_frames)
            if key_padding_mask is not None:
                key_padding_mask = roll_rows(key_padding_mask, shift, num_frames)
            if key_bias is not None:
                kb = key_bias if key_bias.dim() == 3 else key_bias[:, None]
                key_bias = roll_rows(kb.transpose(1, 2), shift, num_frames).transpose(1, 2)
        ct = compute_dtype(q.dtype)
        s = (q[:, :rows].to(ct).transpose(1, 2) @ k.to(ct).permute(0, 2, 3, 1)) * softmax_scale  # (N, H, R, S)
        if key_bias is not None:
            s = s + (key_bias if key_bias.dim() == 3 else key_bias[:, None]).to(ct)[:, :, None, :]
        if key_padding_mask is not None:
            s = s.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
        return torch.softmax(s, dim=-1)


class Attention(BaseAttention):
    """:class:`fastvl.nn.Attention` (same parameters and state dict) with what token reduction asks of a block.

    ``forward(x, key_padding_mask=None, frame_offsets=None, num_frames=1, *, key_bias=None, metric=False, rows=0)``:
    ``key_bias (N, S)`` float adds to every query's logit of that key (proportional attention: ``log(size)``);
    ``metric=True`` also returns the keys averaged over heads ``(N, S, D)`` (ToMe's merge metric, detached);
    ``rows=R`` also returns the softmax rows of the first R queries ``(N, H, R, S)`` (:func:`attention_rows`).
    Without these it is ``fastvl.nn.Attention`` and returns the output only; with any of them it returns
    ``(out, metric or None, rows or None)``.
    """

    def forward(
        self,
        x: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        frame_offsets: torch.Tensor | None = None,
        num_frames: int = 1,
        *,
        key_bias: torch.Tensor | None = None,
        metric: bool = False,
        rows: int = 0,
        **kwargs,
    ):
        if key_bias is None and not metric and not rows:
            return super().forward(x, key_padding_mask, frame_offsets, num_frames, **kwargs)
        if kwargs or (self.training and self.attn_drop.p > 0):
            raise ValueError(
                "Attention: key_bias / metric / rows (token reduction) take no attn_mask, is_causal or attention "
                "dropout"
            )
        N, S, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        q, k, v = self.qkv(x).view(N, S, 3, self.num_heads, self.head_dim).unbind(2)
        q, k = self.q_norm(q), self.k_norm(k)
        geo = dict(key_padding_mask=key_padding_mask, frame_offsets=frame_offsets, num_frames=num_frames)
        if key_bias is None:
            o = flash_attention(q, k, v, softmax_scale=self.scale, backend=self.backend, **geo)
        else:
            o = proportional_attention(q, k, v, key_bias, softmax_scale=self.scale, backend=self.backend, **geo)
        r = attention_rows(q, k, rows, softmax_scale=self.scale, key_bias=key_bias, **geo) if rows else None
        o = self.norm(o.reshape(N, S, self.attn_dim))
        if gate is not None:
            o = o * gate
        return self.proj_drop(self.proj(o)), (k.detach().mean(2) if metric else None), r


def _world() -> tuple[int, int] | None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_rank(), dist.get_world_size()
    return None


@functools.cache
def _global_clip_loss(rank: int, world_size: int, backend: str | None) -> nn.ClipLoss:
    return nn.ClipLoss(gather_with_grad=True, rank=rank, world_size=world_size, backend=backend)


@functools.cache
def _global_mil_nce_loss(rank: int, world_size: int, backend: str | None) -> nn.MILNCELoss:
    return nn.MILNCELoss(rank=rank, world_size=world_size, backend=backend)


def clip_loss(a: torch.Tensor, b: torch.Tensor, logit_scale, *, backend: str | None = None) -> torch.Tensor:
    """Symmetric InfoNCE over the global batch (all ranks) on L2-normalised ``a, b (B, D)``."""
    w = _world()
    if w is None:
        return ops.clip_loss(a, b, logit_scale, backend=backend)
    return _global_clip_loss(*w, backend)(a, b, logit_scale)


def mil_nce_loss(
    video: torch.Tensor, text: torch.Tensor, logit_scale, valid: torch.Tensor | None = None, *,
    backend: str | None = None,
) -> torch.Tensor:  # fmt: skip
    """VATT's MIL-NCE over the global batch: ``video (B, D)``, ``text (B, P, D)``, ``valid (B,)``."""
    w = _world()
    if w is None:
        return ops.mil_nce_loss(video, text, logit_scale, valid, backend=backend)
    return _global_mil_nce_loss(*w, backend)(video, text, logit_scale, valid)
