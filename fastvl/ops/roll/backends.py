"""Temporal token roll backends: adapters, declared capabilities, registration, the example call.

Every backend runs ``forward(x, num_frames, text_len, f, direction) -> out`` (the backward is the roll with
``-direction``). No optional features; a copy has no FLOPs to count.
"""

from __future__ import annotations

import torch

from fastvl import backends
from fastvl.capabilities import TRITON_COPY, Capabilities

from .reference import roll_reference

OP = "temporal_token_roll"


def roll_triton(x, num_frames, text_len, f, direction):
    """Strided gather copy, any strides."""
    from fastvl.kernels.roll import roll

    return roll(x, num_frames, text_len, f, direction)


def roll_cuda(x, num_frames, text_len, f, direction):
    """16-byte vectorised row copy (fastvl._C)."""
    from fastvl import _ext
    from fastvl.kernels.utils import empty

    out = empty(x.shape, x.dtype, x.device)
    _ext.module().roll(x, out, num_frames, text_len, f, direction)
    return out


CUDA_ROWS = Capabilities(devices=("cuda",), unit_stride=("x",))

backends.register(OP, "reference", 0, forward=roll_reference, description="torch.roll on slices (All-in-one's code)")
backends.register(OP, "triton", 20, TRITON_COPY, requires="triton", forward=roll_triton)
backends.register(OP, "cuda", 30, CUDA_ROWS, requires="fastvl._C", forward=roll_cuda)


def example(device: torch.device, small: bool):
    """All-in-one-B: B*T = 32*3 frame sequences of 40 text + 197 video tokens, width 768 (fp16)."""
    B, T, text, L, C = (2, 3, 5, 17, 8) if small else (32, 3, 40, 197, 768)
    x = (torch.randn if small else torch.empty)(B * T, text + L, C, dtype=torch.float16, device=device)
    return OP, (x, T), {"text_len": text}


backends.register_example(OP, example)
