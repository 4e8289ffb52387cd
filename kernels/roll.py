"""Temporal token rolling (All-in-one) as a strided copy: one program per (frame, token block, channel block).

Each element is read once and written once. On a GPU the channel block divides the row where it can (768
channels: 256, not a 1024 block with a quarter of its lanes idle) and a step moves ~4K elements.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import col_block, empty, on_tensor_device, row_block, use_gpu_configs, warps_for


@triton.jit
def _roll_kernel(
    x_ptr,
    out_ptr,
    T,
    S,
    C,
    text_len,
    L,
    f,
    direction,
    sxn,
    sxs,
    sxc,
    son,
    sos,
    BLOCK_S: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    n = tl.program_id(0)  # frame-sequence b*T + t
    s = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    t = n % T
    first = n - t
    v = s - text_len  # slot within the video part
    from_prev = (v >= 1) & (v <= f)
    from_next = (v >= L - f) & (v < L) & (f > 0)
    # forward (direction=1): prev slots read frame t-1, next slots read t+1; backward swaps them
    shift = tl.where(from_prev, -direction, tl.where(from_next, direction, 0))
    src_n = first + (t + shift + T) % T
    s_mask = s < S
    m = s_mask[:, None] & (c < C)[None, :]
    src = x_ptr + src_n.to(tl.int64)[:, None] * sxn + s.to(tl.int64)[:, None] * sxs + c[None, :] * sxc
    vals = tl.load(src, mask=m)
    dst = out_ptr + n.to(tl.int64) * son + s.to(tl.int64)[:, None] * sos + c[None, :]
    tl.store(dst, vals, mask=m)


@on_tensor_device
def roll(x: torch.Tensor, num_frames: int, text_len: int, f: int, direction: int = 1) -> torch.Tensor:
    """x (B*T, text_len + L, C), any strides -> contiguous rolled copy (direction=-1 is the inverse)."""
    N, S, C = x.shape
    out = empty((N, S, C), x.dtype, x.device)
    if out.numel() == 0:
        return out
    L = S - text_len
    if use_gpu_configs(x.device):
        BLOCK_C = col_block(C, x.element_size(), max_bytes=2048)
        BLOCK_S = max(1, min(triton.next_power_of_2(S), 4096 // BLOCK_C))
    else:  # interpreter: few, large programs
        BLOCK_C = row_block(C, x.element_size(), max_bytes=1 << 16)
        BLOCK_S = max(1, min(triton.next_power_of_2(S), 16384 // BLOCK_C))
    grid = (N, triton.cdiv(S, BLOCK_S), triton.cdiv(C, BLOCK_C))
    _roll_kernel[grid](
        x,
        out,
        num_frames,
        S,
        C,
        text_len,
        L,
        f,
        direction,
        x.stride(0),
        x.stride(1),
        x.stride(2),
        out.stride(0),
        out.stride(1),
        BLOCK_S=BLOCK_S,
        BLOCK_C=BLOCK_C,
        num_warps=warps_for(BLOCK_S * BLOCK_C),
    )
    return out
