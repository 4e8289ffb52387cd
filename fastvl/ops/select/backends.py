"""Token selection backends: adapters, declared capabilities, registration, the example calls.

One registry op, ``select_tokens``, roles ``forward(x, scores, k, groups, protected, frames) -> (kept, ids, inv)`` and
``backward(grad, inv, ids, L) -> dx``. ``Call.params``: ``S`` (tokens per group), ``k``, ``groups``. No optional
features. Selection moves data and compares scores: no FLOPs to count (like a gather).
"""

from __future__ import annotations

import torch

from fastvl import backends
from fastvl.capabilities import Capabilities, Limit
from fastvl.rules import KERNEL_DTYPES

from .reference import select_reference, select_reference_backward

OP = "select_tokens"

MAX_GROUP = 16384
"""Tokens per group the Triton kernel takes: its ranking compares every pair of a group (S^2 work per group),
which torch's sort beats on longer groups."""


def select_triton(x, scores, k, groups, protected, frames):
    """Pairwise stable ranking fused with the gather; backward a gather through the inverse map."""
    from fastvl.kernels.select import select_forward

    return select_forward(x, scores, k, groups, protected, frames)


def select_triton_backward(grad, inv, ids, L):
    from fastvl.kernels.select import select_backward

    return select_backward(grad, inv, L)


TRITON = Capabilities(
    devices=("cuda",),
    interpreter=True,
    dtypes=KERNEL_DTYPES,
    dtype_args=("scores",),
    limits=(Limit("S", "tokens per group S", MAX_GROUP, why="the ranking compares every pair of a group"),),
)

backends.register(
    OP, "reference", 0, forward=select_reference, backward=select_reference_backward,
    description="torch.sort (stable) + gather; backward scatter",
)  # fmt: skip
backends.register(OP, "triton", 20, TRITON, requires="triton", forward=select_triton, backward=select_triton_backward)


def example(device: torch.device, small: bool):
    """VATT-M video tokens (8 frames of 196, width 1024, fp16): the top half of each frame by score."""
    B, T, N, C = (3, 4, 11, 8) if small else (64, 8, 196, 1024)
    new = torch.randn if small else torch.empty
    x = new(B, T * N, C, dtype=torch.float16, device=device)
    scores = new(B, T * N, device=device)
    return OP, (x, scores, N // 2), {"groups": T}


def example_space_time(device: torch.device, small: bool):
    """SMAUG-style: CLS kept, the 4 best of 8 frames by mean score, the top half of each kept frame."""
    B, T, N, C = (2, 4, 9, 8) if small else (64, 8, 196, 1024)
    new = torch.randn if small else torch.empty
    x = new(B, 1 + T * N, C, dtype=torch.float16, device=device)
    scores = new(B, T * N, device=device)
    return "select_space_time", (x, scores, N // 2), {"frames": T, "keep_frames": T // 2, "protected": 1}


backends.register_example(OP, example)
backends.register_example(OP, example_space_time)
