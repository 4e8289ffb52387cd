"""Multi-head self-attention with timm ViT ``Attention``'s parameters and state dict, over fastvl's ops."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastvl import ops


class Attention(nn.Module):
    """timm's ViT ``Attention`` (submodules ``qkv``, ``q_norm``, ``k_norm``, ``attn_drop``, ``norm``, ``proj``,
    ``proj_drop``; identical state-dict keys) running fastvl's attention ops.

    ``forward(x (N, S, dim), key_padding_mask=None, frame_offsets=None, num_frames=1) -> (N, S, dim)``.
    q, k and v are read in place from the qkv projection (strided, no permute copies); without q/k norms the
    attention runs on the packed qkv (``fastvl.ops.flash_attention_qkvpacked``), so its backward writes the
    projection's gradient d(qkv) as one buffer (no stack of dq, dk, dv). Extras for timm's
    ``Block``: ``attn_mask`` (an arbitrary SDPA mask: served by ``torch.nn.functional.scaled_dot_product_attention``,
    not a fastvl op) and ``is_causal``. With ``attn_drop > 0`` in training, the op applies attention dropout
    (``dropout_p``; the mask is drawn from torch's default generator).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        backend: str | None = None,
    ):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"Attention: dim={dim} must be divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attn_dim = dim
        self.scale = self.head_dim**-0.5
        self.backend = backend
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = nn.Identity()  # timm's scale_norm slot (patch_timm_vit carries it over)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.gate: nn.Module | None = None  # timm's gated variant (patch_timm_vit carries it over)

    def forward(
        self,
        x: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        frame_offsets: torch.Tensor | None = None,
        num_frames: int = 1,
        *,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        N, S, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).view(N, S, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.unbind(2)  # (N, S, H, D) strided views of one buffer
        q, k = self.q_norm(q), self.k_norm(k)
        p = self.attn_drop.p if self.training else 0.0
        if attn_mask is not None:
            if key_padding_mask is not None or frame_offsets is not None:
                raise ValueError("Attention: attn_mask cannot be combined with key_padding_mask or frame_offsets")
            o = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask, dropout_p=p,
                is_causal=is_causal, scale=self.scale,
            ).transpose(1, 2)  # fmt: skip
        else:
            kw = dict(causal=is_causal, key_padding_mask=key_padding_mask, frame_offsets=frame_offsets,
                      num_frames=num_frames, backend=self.backend)  # fmt: skip
            if isinstance(self.q_norm, nn.Identity) and isinstance(self.k_norm, nn.Identity):
                # one op on the qkv buffer: its backward writes d(qkv), no stack of dq, dk, dv
                o = ops.flash_attention_qkvpacked(qkv, p, self.scale, **kw)
            else:
                o = ops.flash_attention(q, k, v, p, self.scale, **kw)
        o = self.norm(o.reshape(N, S, self.attn_dim))
        if gate is not None:
            o = o * gate
        return self.proj_drop(self.proj(o))

    @classmethod
    def from_timm(cls, m: nn.Module, backend: str | None = None) -> Attention:
        """A fastvl Attention sharing ``m``'s submodules (the same Parameter objects: weights kept)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.num_heads, new.head_dim = m.num_heads, m.head_dim
        new.attn_dim = getattr(m, "attn_dim", m.num_heads * m.head_dim)
        new.scale = m.scale
        new.backend = backend
        for name in ("qkv", "q_norm", "k_norm", "attn_drop", "norm", "proj", "proj_drop"):
            sub = getattr(m, name, None)
            setattr(new, name, sub if sub is not None else nn.Identity())
        new.gate = getattr(m, "gate", None)
        return new

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}" + (
            f", backend={self.backend!r}" if self.backend else ""
        )
