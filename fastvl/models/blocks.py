"""The one pre-norm transformer block shared by All-in-one, VATT and MAC, and the encoder stack.

State dicts follow timm's ViT (``blocks.i.norm1``, ``attn.qkv``, ``attn.proj``, ``norm2``, ``mlp.fc1``,
``mlp.fc2``, final ``norm``). The residual add is fused into the next LayerNorm: a block takes and returns
``(hidden, residual)`` whose sum is the residual stream, and calls ``layer_norm(hidden, w, b, eps,
residual)`` which returns ``(LN(hidden + residual), hidden + residual)``.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .layers import Attention, LayerNorm, roll_frame_offsets, temporal_token_roll


class Mlp(nn.Module):
    """timm ``Mlp``: fc1 -> GELU -> fc2 (dropout after each)."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm block: stream += Attention(LN(stream)); stream += MLP(LN(stream)), with deferred residual.

    ``forward(hidden, residual=None, *, key_padding_mask, frame_offsets, num_frames)`` with ``hidden``
    ``(N, S, C)``: the stream is ``hidden + residual`` (just ``hidden`` when residual is None). Returns
    ``(hidden', residual')`` with the updated stream ``hidden' + residual'``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        eps: float = 1e-6,
        drop: float = 0.0,
        backend: str | None = None,
    ):
        super().__init__()
        self.norm1 = LayerNorm(dim, eps=eps, backend=backend)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, proj_drop=drop, backend=backend)
        self.norm2 = LayerNorm(dim, eps=eps, backend=backend)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def forward(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor | None = None,
        *,
        key_padding_mask: torch.Tensor | None = None,
        frame_offsets: torch.Tensor | None = None,
        num_frames: int = 1,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            y, residual = self.norm1(hidden), hidden
        else:
            y, residual = self.norm1(hidden, residual)
        hidden = self.attn(y, key_padding_mask, frame_offsets, num_frames)
        y, residual = self.norm2(hidden, residual)
        return self.mlp(y), residual


@dataclasses.dataclass(frozen=True)
class Roll:
    """All-in-one temporal token rolling before every block on ``(B*T, text_len + L, C)`` sequences.

    ``mode="explicit"``: ``fastvl.ops.temporal_token_roll`` moves the residual stream before each block.
    ``mode="fused"``: nothing moves; block k attends with roll-aware addressing of k+1 cumulative rolls
    (LayerNorm and MLP are per token, so only attention sees the order). The two streams then differ by
    a permutation of frames per slot, which the frame average before the heads removes.
    """

    num_frames: int
    text_len: int
    fraction: float = 0.125
    mode: str = "fused"


class Encoder(nn.Module):
    """``depth`` shared :class:`Block` s and a final LayerNorm; ``forward(x, key_padding_mask, roll)``.

    x ``(N, S, C)`` -> normalised ``(N, S, C)``. ``key_padding_mask (N, S)`` bool, True = padded.
    With ``roll`` (All-in-one), tokens are rolled before every block (see :class:`Roll`).
    """

    def __init__(
        self,
        depth: int,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        eps: float = 1e-6,
        drop: float = 0.0,
        backend: str | None = None,
    ):
        super().__init__()
        self.blocks = nn.ModuleList(
            Block(dim, num_heads, mlp_ratio, qkv_bias, eps, drop, backend=backend) for _ in range(depth)
        )
        self.norm = LayerNorm(dim, eps=eps, backend=backend)
        self.backend = backend

    def forward(
        self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None, roll: Roll | None = None
    ) -> torch.Tensor:
        hidden, residual = x, None
        base = None
        if roll is not None and roll.mode == "fused":
            base = roll_frame_offsets(x.shape[1], roll.text_len, roll.fraction, 1, device=x.device)
        for i, blk in enumerate(self.blocks):
            offsets, T = None, 1
            if roll is not None and roll.mode == "explicit":
                hidden = self._roll(hidden, roll)
                residual = None if residual is None else self._roll(residual, roll)
            elif base is not None:
                offsets, T = base * (i + 1), roll.num_frames
            hidden, residual = blk(
                hidden, residual, key_padding_mask=key_padding_mask, frame_offsets=offsets, num_frames=T
            )
        if residual is None:
            return self.norm(hidden)
        return self.norm(hidden, residual)[0]

    def _roll(self, x: torch.Tensor, roll: Roll) -> torch.Tensor:
        return temporal_token_roll(
            x, roll.num_frames, text_len=roll.text_len, fraction=roll.fraction, backend=self.backend
        )
