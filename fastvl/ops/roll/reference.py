"""The spec of temporal token rolling (All-in-one's slice + ``torch.roll``), also its CPU path."""

from __future__ import annotations

import torch


def roll_reference(x: torch.Tensor, num_frames: int, text_len: int, f: int, direction: int = 1) -> torch.Tensor:
    """``x (B*T, text_len + L, C)`` -> a new contiguous tensor: video slots ``1..f`` from frame ``t - direction``,
    the last ``f`` from frame ``t + direction`` (cyclic in t); text and video slot 0 stay."""
    N, S, C = x.shape
    out = x.contiguous().clone()
    if f == 0 or num_frames == 1:
        return out
    v = x.reshape(N // num_frames, num_frames, S, C)
    o = out.view(N // num_frames, num_frames, S, C)
    a = text_len + 1
    o[:, :, a : a + f] = torch.roll(v[:, :, a : a + f], direction, dims=1)
    o[:, :, S - f :] = torch.roll(v[:, :, S - f :], -direction, dims=1)
    return out
