"""The one pre-norm transformer block shared by All-in-one, VATT and MAC, and the encoder stack.

State dicts follow timm's ViT (``blocks.i.norm1``, ``attn.qkv``, ``attn.proj``, ``norm2``, ``mlp.fc1``,
``mlp.fc2``, final ``norm``). The residual add is fused into the next LayerNorm: a block takes and returns
``(hidden, residual)`` whose sum is the residual stream, and calls ``layer_norm(hidden, w, b, eps,
residual)`` which returns ``(LN(hidden + residual), hidden + residual)``.

Token reduction inside the encoder (ToMe merging, SMAUG selection) and rolling after it: :mod:`fastvl.models.reduction`.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from fastvl import rules

from .layers import Attention, LayerNorm, roll_frame_offsets, roll_stream, temporal_token_roll
from .reduction import Reduce


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
        hidden, residual, _, _ = self.attend(
            hidden, residual, key_padding_mask=key_padding_mask, frame_offsets=frame_offsets, num_frames=num_frames
        )
        return self.feed(hidden, residual)

    def attend(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor | None = None,
        *,
        key_padding_mask: torch.Tensor | None = None,
        frame_offsets: torch.Tensor | None = None,
        num_frames: int = 1,
        key_bias: torch.Tensor | None = None,
        metric: bool = False,
        rows: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The attention half: ``(hidden', residual', metric, rows)`` with the stream after attention in
        ``hidden' + residual'``; ``key_bias``, ``metric`` and ``rows`` as :class:`layers.Attention`."""
        if residual is None:
            y, residual = self.norm1(hidden), hidden
        else:
            y, residual = self.norm1(hidden, residual)
        out = self.attn(y, key_padding_mask, frame_offsets, num_frames, key_bias=key_bias, metric=metric, rows=rows)
        if isinstance(out, tuple):
            return (out[0], residual, *out[1:])
        return out, residual, None, None

    def feed(self, hidden: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The MLP half: stream ``hidden + residual`` (``hidden`` alone when residual is None) -> ``(hidden',
        residual')``."""
        if residual is None:
            y, residual = self.norm2(hidden), hidden
        else:
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
    """``depth`` shared :class:`Block` s and a final LayerNorm; ``forward(x, key_padding_mask, roll, reduce)``.

    x ``(N, S, C)`` -> normalised ``(N', S', C)``. ``key_padding_mask (N, S)`` bool, True = padded.
    With ``roll`` (All-in-one), tokens are rolled before every block (see :class:`Roll`). With ``reduce``,
    tokens are merged or selected (:mod:`fastvl.models.reduction`): ``S' <= S``, and ``N' < N`` when selection drops
    frame rows (``N' = N / row_frames * select_frames``). ``return_size=True`` also returns the tokens' sizes
    ``(N', S')`` (how many input tokens each output token stands for; None without merging).
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
        self,
        x: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        roll: Roll | None = None,
        reduce: Reduce | None = None,
        return_size: bool = False,
    ):
        if reduce is not None and not reduce.settings.active:
            reduce = None
        if reduce is None:
            y = self._plain(x, key_padding_mask, roll)
            return (y, None) if return_size else y
        s = reduce.settings
        hidden, residual, size, kpm = x, None, None, key_padding_mask
        roll = _active(roll, x.shape[1])
        base, steps = self._base(roll, x), 0  # fused: the stream is roll^steps(physical) in logical order
        rows = None
        for i, blk in enumerate(self.blocks):
            if s.selects and i == s.select_layer:
                stream = hidden if residual is None else hidden + residual
                if base is not None and steps:
                    stream = roll_stream(stream, base * steps, roll.num_frames)
                hidden, kpm, roll = reduce.select(stream, rows, kpm, roll)
                residual, rows, steps = None, None, 0
                roll = _active(roll, hidden.shape[1])
                base = self._base(roll, hidden)
            offsets, T = None, 1
            if roll is not None and roll.mode == "explicit":
                hidden = self._roll(hidden, roll)
                residual = None if residual is None else self._roll(residual, roll)
                if size is not None:
                    off = roll_frame_offsets(size.shape[1], roll.text_len, roll.fraction, 1, device=size.device)
                    size = roll_stream(size, off, roll.num_frames)
            elif base is not None:
                steps += 1
                offsets, T = base * steps, roll.num_frames
            want_rows = reduce.protected if s.selects and s.select_scorer == "attention" else 0
            bias = size.log() if size is not None and s.merge_prop_attn else None
            hidden, residual, metric, r = blk.attend(
                hidden, residual, key_padding_mask=kpm, frame_offsets=offsets, num_frames=T, key_bias=bias,
                metric=s.merges, rows=want_rows if i == s.select_layer - 1 else 0,
            )  # fmt: skip
            if r is not None:
                rows = r
            if s.merges:
                stream = hidden + residual
                if base is not None and steps:
                    shift = base * steps
                    stream, metric = (roll_stream(t, shift, T) for t in (stream, metric))
                    size = None if size is None else roll_stream(size, shift, T)
                    kpm = None if kpm is None else roll_stream(kpm, shift, T)
                    steps = 0
                stream, size, kpm = reduce.merge(stream, size, metric, kpm)
                roll = _active(roll, stream.shape[1])
                base = self._base(roll, stream)
                hidden, residual = blk.feed(stream, None)
            else:
                hidden, residual = blk.feed(hidden, residual)
        y = self.norm(hidden, residual)[0]
        if base is not None and steps:  # the output in logical order, like the explicit roll's
            y = roll_stream(y, base * steps, roll.num_frames)
            size = None if size is None else roll_stream(size, base * steps, roll.num_frames)
        return (y, size) if return_size else y

    def _plain(self, x, key_padding_mask, roll):
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

    @staticmethod
    def _base(roll: Roll | None, x: torch.Tensor) -> torch.Tensor | None:
        if roll is None or roll.mode != "fused":
            return None
        return roll_frame_offsets(x.shape[1], roll.text_len, roll.fraction, 1, device=x.device)

    def _roll(self, x: torch.Tensor, roll: Roll) -> torch.Tensor:
        return temporal_token_roll(
            x, roll.num_frames, text_len=roll.text_len, fraction=roll.fraction, backend=self.backend
        )


def _active(roll: Roll | None, seq_len: int) -> Roll | None:
    """``roll`` if it moves any token of rows of ``seq_len`` tokens, else None (too few video tokens left)."""
    if roll is None or roll.num_frames < 2 or rules.roll_count(seq_len - roll.text_len, roll.fraction) == 0:
        return None
    return roll
