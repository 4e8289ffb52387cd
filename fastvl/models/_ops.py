"""The models' single swap point for attention, LayerNorm, roll offsets and contrastive losses.

Every attention, LayerNorm, roll-offset and loss call of ``fastvl.models`` goes through this module and
nothing else in the models imports those ops. For now it implements the contract of the attention /
LayerNorm issue and the contrastive-loss issue in plain PyTorch (the reference math of design.md 2);
at merge it becomes re-exports of the real ``fastvl.ops`` / ``fastvl.nn`` with the same signatures.
``backend`` is accepted everywhere and ignored here (the real ops dispatch on it).

Contract:
  flash_attention(q, k, v, *, softmax_scale, causal, key_padding_mask, deterministic, frame_offsets,
                  num_frames, backend) -> (N, Sq, H, D)
  roll_frame_offsets(seq_len, text_len, fraction, steps, device) -> int64 (S,)
  layer_norm(x, weight, bias, eps, residual, *, backend) -> y, or (y, x + residual)
  Attention (timm ViT Attention state dict), LayerNorm (nn.LayerNorm state dict)
  clip_loss(a, b, logit_scale, *, backend), mil_nce_loss(video, text, logit_scale, valid, *, backend)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "Attention",
    "LayerNorm",
    "clip_loss",
    "flash_attention",
    "layer_norm",
    "mil_nce_loss",
    "roll_frame_offsets",
]


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"flash_attention: argument '{name}' must be a 4-D tensor (N, S, H, D), got {got}")
        if not t.is_floating_point():
            raise TypeError(f"flash_attention: argument '{name}' must be a float tensor, got {t.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"flash_attention: 'k' and 'v' must have one shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(
            f"flash_attention: 'q' {tuple(q.shape)} and 'k' {tuple(k.shape)} must agree in N, H and D (N, S, H, D)"
        )


def _attend(q, k, v, scale: float, causal: bool, key_padding_mask, dropout_p: float = 0.0):
    """Softmax attention in fp32 (fp64 for fp64 inputs); (N, S, H, D) in and out; padded rows give zeros."""
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf, kf, vf = (t.to(cdt).transpose(1, 2) for t in (q, k, v))  # (N, H, S, D)
    scores = torch.matmul(qf, kf.transpose(-1, -2)) * scale
    Sq, Sk = scores.shape[-2], scores.shape[-1]
    if causal:  # bottom-right aligned, like flash-attn
        i = torch.arange(Sq, device=q.device)[:, None]
        j = torch.arange(Sk, device=q.device)[None, :]
        scores = scores.masked_fill(j > i + (Sk - Sq), float("-inf"))
    if key_padding_mask is not None:
        scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    m = scores.amax(-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(scores - m)
    denom = p.sum(-1, keepdim=True)
    if dropout_p > 0:
        p = F.dropout(p, dropout_p, training=True)
    out = torch.matmul(p, vf) / denom.clamp_min(torch.finfo(cdt).tiny)
    return out.transpose(1, 2).to(q.dtype)


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    softmax_scale: float | None = None,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    deterministic: bool = False,
    frame_offsets: torch.Tensor | None = None,
    num_frames: int = 1,
    backend: str | None = None,
) -> torch.Tensor:
    """Softmax attention on ``(N, S, H, D)`` tensors; returns ``(N, Sq, H, D)`` in q's dtype.

    ``key_padding_mask (N, Sk)`` bool, True = padded key (zero weight; a fully padded row gives zeros).
    Roll-aware addressing (All-in-one): with ``frame_offsets`` int ``(S,)`` (used mod T) and
    ``num_frames=T``, row n = b*T + t of the batch holds frame t of sample b; logical sequence (b, t)
    slot s reads q/k/v from physical row ``b*T + (t + off[s]) % T`` and writes its output to that same
    row; the mask follows k's addressing. This equals rolling the tokens, attending and rolling back.
    """
    _check_qkv(q, k, v)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    N, Sq = q.shape[:2]
    Sk = k.shape[1]
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != (N, Sk):
            raise ValueError(
                f"flash_attention: argument 'key_padding_mask' must be bool (N, Sk)=({N}, {Sk}), got "
                f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}"
            )
    T = int(num_frames)
    if frame_offsets is None or T == 1:
        return _attend(q, k, v, scale, causal, key_padding_mask)
    if frame_offsets.dtype not in (torch.int32, torch.int64) or tuple(frame_offsets.shape) != (Sk,) or Sq != Sk:
        raise ValueError(
            f"flash_attention: 'frame_offsets' must be int (S,) with Sq == Sk == S, got {frame_offsets.dtype} "
            f"{tuple(frame_offsets.shape)} for Sq={Sq}, Sk={Sk}"
        )
    if N % T != 0:
        raise ValueError(f"flash_attention: N={N} must be a multiple of num_frames={T} (rows are b*T + t)")
    B, S = N // T, Sk
    t = torch.arange(T, device=q.device)[:, None]
    off = frame_offsets.to(device=q.device, dtype=torch.int64)[None, :]
    s = torch.arange(S, device=q.device)[None, :].expand(T, S)
    src = (t + off) % T  # (T, S): physical frame read by logical (t, s)
    inv = (t - off) % T  # (T, S): logical frame written to physical (t, s)

    def logical(x):
        return x.reshape(B, T, S, *x.shape[2:])[:, src, s].reshape(N, S, *x.shape[2:])

    mask = logical(key_padding_mask) if key_padding_mask is not None else None
    out = _attend(logical(q), logical(k), logical(v), scale, causal, mask)
    return out.reshape(B, T, S, *out.shape[2:])[:, inv, s].reshape(N, S, *out.shape[2:])


def roll_frame_offsets(
    seq_len: int, text_len: int, fraction: float = 0.125, steps: int = 1, device: torch.device | str | None = None
) -> torch.Tensor:
    """Per-slot frame offsets of ``steps`` cumulative temporal token rolls, int64 ``(seq_len,)``.

    With ``L = seq_len - text_len`` video slots and ``f = floor(L * fraction)``: -steps on video slots
    1..f (they read frame t-1 per roll), +steps on the last f slots (frame t+1), 0 elsewhere (text,
    frame CLS, middle slots); matches ``fastvl.ops.temporal_token_roll`` applied ``steps`` times.
    """
    L = seq_len - text_len
    if L < 1:
        raise ValueError(f"roll_frame_offsets: seq_len={seq_len} leaves no video slots after text_len={text_len}")
    f = math.floor(L * fraction + 1e-9)
    if 2 * f + 1 > L:
        raise ValueError(f"roll_frame_offsets: fraction={fraction} rolls 2*{f} of L={L} slots, needs 2f+1 <= L")
    off = torch.zeros(seq_len, dtype=torch.int64, device=device)
    if f > 0:
        off[text_len + 1 : text_len + 1 + f] = -steps
        off[seq_len - f :] = steps
    return off


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-6,
    residual: torch.Tensor | None = None,
    *,
    backend: str | None = None,
):
    """LayerNorm over the last dim; with ``residual`` returns ``(LN(x + residual), x + residual)``."""
    h = x if residual is None else x + residual
    y = F.layer_norm(h, (h.shape[-1],), weight, bias, eps)
    return y if residual is None else (y, h)


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` (same state dict) whose ``forward(x, residual=None)`` is :func:`layer_norm`."""

    def __init__(
        self,
        normalized_shape,
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        device=None,
        dtype=None,
        backend: str | None = None,
    ):
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device=device, dtype=dtype)
        self.backend = backend

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        return layer_norm(x, self.weight, self.bias, self.eps, residual, backend=self.backend)


class Attention(nn.Module):
    """timm ViT ``Attention`` (params ``qkv``, optional ``q_norm``/``k_norm``, ``proj``; same state dict).

    ``forward(x (N, S, C), key_padding_mask=None, frame_offsets=None, num_frames=1)`` -> ``(N, S, C)``,
    attention by :func:`flash_attention` (roll-aware when ``frame_offsets`` is given).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer=nn.LayerNorm,
        backend: str | None = None,
    ):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"Attention: dim={dim} must be divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.backend = backend

    def forward(
        self,
        x: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        frame_offsets: torch.Tensor | None = None,
        num_frames: int = 1,
    ) -> torch.Tensor:
        N, S, C = x.shape
        q, k, v = self.qkv(x).reshape(N, S, 3, self.num_heads, self.head_dim).unbind(2)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.training and self.attn_drop > 0:  # the interim keeps timm's attention dropout (no roll)
            o = _attend(q, k, v, self.scale, False, key_padding_mask, self.attn_drop)
        else:
            o = flash_attention(
                q,
                k,
                v,
                softmax_scale=self.scale,
                key_padding_mask=key_padding_mask,
                frame_offsets=frame_offsets,
                num_frames=num_frames,
                backend=self.backend,
            )
        return self.proj_drop(self.proj(o.reshape(N, S, C)))


def clip_loss(a: torch.Tensor, b: torch.Tensor, logit_scale, *, backend: str | None = None) -> torch.Tensor:
    """Symmetric InfoNCE on L2-normalised ``a, b (B, D)``: mean of CE(s a b^T, i) and CE(s b a^T, i)."""
    logits = logit_scale * (a.float() @ b.float().t())
    labels = torch.arange(a.shape[0], device=a.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


def mil_nce_loss(
    video: torch.Tensor,
    text: torch.Tensor,
    logit_scale,
    valid: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """VATT's MIL-NCE (design.md 2): ``video (B, D)``, ``text (B, P, D)`` positives, scalar mean loss.

    loss_i = logsumexp([s(i, j, p)]_{j,p} ++ [s(j, i, p)]_{j,p}) - logsumexp([s(i, i, p)]_p) with
    s(i, j, p) = logit_scale * video_i . text_{j,p}. ``valid (B,)`` bool: invalid samples' texts leave
    every denominator, their loss is zeroed and the mean is over the valid ones. P = 1 is plain NCE.
    """
    B, P, _ = text.shape
    s = logit_scale * torch.einsum("id,jpd->ijp", video.float(), text.float())  # (B, B, P)
    first = s.reshape(B, B * P)
    second = s.transpose(0, 1).reshape(B, B * P)
    if valid is not None:
        first = first.masked_fill((~valid)[None, :, None].expand(B, B, P).reshape(B, B * P), float("-inf"))
    denom = torch.logsumexp(torch.cat([first, second], dim=1), dim=1)
    num = torch.logsumexp(s.diagonal(dim1=0, dim2=1).t(), dim=1)
    loss = denom - num
    if valid is None:
        return loss.mean()
    return torch.where(valid, loss, torch.zeros_like(loss)).sum() / valid.sum().clamp_min(1)
