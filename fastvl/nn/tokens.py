"""Modules for the token ops: TemporalTokenRoll, DropToken, MaskSampler."""

from __future__ import annotations

import torch
from torch import nn

from fastvl import ops, rules


class TemporalTokenRoll(nn.Module):
    """All-in-one's parameter-free temporal token rolling on ``(B*T, text_len + L, C)`` (train and eval)."""

    def __init__(self, num_frames: int, text_len: int = 0, fraction: float = 0.125, backend: str | None = None):
        super().__init__()
        self.num_frames, self.text_len, self.fraction, self.backend = num_frames, text_len, fraction, backend

    def forward(self, x: torch.Tensor, num_frames: int | None = None, text_len: int | None = None) -> torch.Tensor:
        return ops.temporal_token_roll(
            x,
            self.num_frames if num_frames is None else num_frames,
            text_len=self.text_len if text_len is None else text_len,
            fraction=self.fraction,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return f"num_frames={self.num_frames}, text_len={self.text_len}, fraction={self.fraction}"


class DropToken(nn.Module):
    """VATT DropToken on ``(B, L, C)``: keeps ``int(keep_rate * L)`` tokens in training, all at eval.

    ``forward(x, pos=None)`` returns the kept tokens (``pos`` added); with ``return_indices=True`` it
    returns ``(tokens, ids_keep)``.
    """

    def __init__(
        self, keep_rate: float = 0.5, per_sample: bool = False, return_indices: bool = False, backend: str | None = None
    ):
        super().__init__()
        keep_rate = rules.keep_rate("DropToken", keep_rate)
        self.keep_rate, self.per_sample, self.return_indices, self.backend = (
            keep_rate,
            per_sample,
            return_indices,
            backend,
        )

    @property
    def drop_rate(self) -> float:
        return 1.0 - self.keep_rate

    def forward(self, x: torch.Tensor, pos: torch.Tensor | None = None):
        if self.training and self.keep_rate < 1.0:
            kept, ids = ops.drop_tokens(x, self.keep_rate, per_sample=self.per_sample, pos=pos, backend=self.backend)
        else:
            kept = x if pos is None else x + pos
            ids = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
        return (kept, ids) if self.return_indices else kept

    def extra_repr(self) -> str:
        return f"keep_rate={self.keep_rate}, per_sample={self.per_sample}"


class MaskSampler(nn.Module):
    """MAC / MAE random mask sampling on ``(B, L, C)``: returns ``(visible, mask, ids_restore)``.

    Training keeps ``int(L * (1 - mask_ratio))`` tokens per sample; eval keeps all (mask zeros,
    ids_restore the identity).
    """

    def __init__(self, mask_ratio: float = 0.75, backend: str | None = None):
        super().__init__()
        mask_ratio = rules.mask_ratio("MaskSampler", mask_ratio)
        self.mask_ratio, self.backend = mask_ratio, backend

    def forward(self, x: torch.Tensor, pos: torch.Tensor | None = None):
        if self.training and self.mask_ratio > 0:
            return ops.random_masking(x, self.mask_ratio, pos=pos, backend=self.backend)
        B, L, _ = x.shape
        vis = x if pos is None else x + pos
        return vis, x.new_zeros(B, L), torch.arange(L, device=x.device).expand(B, L)

    def extra_repr(self) -> str:
        return f"mask_ratio={self.mask_ratio}"
