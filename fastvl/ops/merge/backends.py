"""Token merging backends: adapters, declared capabilities, registration, the example calls, the FLOP formula.

One registry op, ``merge_tokens``, with roles ``match(metric, layout) -> (score, best)``,
``merge(x, size, dest, out_len) -> (merged, new_size)`` and ``backward(grad, dest, size, new_size) -> dx``
(:mod:`.reference` defines them). ``Call.params``: ``r`` (per group, capped), ``G`` groups of ``S`` tokens,
``C`` (metric width). No optional features. ``unmerge_tokens`` is a gather (the ``gather_tokens`` op).

FLOPs: the similarity matmul, ``2 * B * G * nA * nB * C`` (what FlopCounterMode charges ToMe's eager
``a @ b.transpose(-1, -2)``); the weighted mean and its backward are elementwise and not counted.
"""

from __future__ import annotations

import torch

from fastvl import backends
from fastvl.capabilities import triton_kernel

from .reference import MergeLayout, layout, match_reference, merge_reference, merge_reference_backward

OP = "merge_tokens"


def match_triton(metric, lay: MergeLayout):
    """Similarity tiles (tl.dot) with a running argmax; weighted merge over CSR sources, gather backward."""
    from fastvl.kernels.merge import match

    return match(metric, lay.P, lay.G, lay.S, lay.nA, lay.nB, lay.stride, lay.a_off, lay.b_off)


def merge_triton(x, size, dest, out_len):
    from fastvl.kernels.merge import merge_forward

    return merge_forward(x, size, dest, out_len)


def merge_triton_backward(grad, dest, size, new_size):
    from fastvl.kernels.merge import merge_backward

    return merge_backward(grad, dest, size, new_size)


backends.register(
    OP, "reference", 0, match=match_reference, merge=merge_reference, backward=merge_reference_backward,
    description="ToMe's eager matching (normalise, a @ b^T, max, stable sort) and scatter-add mean",
)  # fmt: skip
backends.register(
    OP,
    "triton",
    20,
    triton_kernel(dtype_args=("x", "metric")),
    requires="triton",
    match=match_triton,
    merge=merge_triton,
    backward=merge_triton_backward,
)


def example(device: torch.device, small: bool):
    """VATT-M video (64 clips of 1568 tokens, width 1024, bf16) after a CLS: ToMe merges 392 tokens (r = L/4),
    keys averaged over heads (width 64) as the metric."""
    B, L, C, Cm, r = (3, 1 + 23, 8, 16, 5) if small else (64, 1 + 1568, 1024, 64, 392)
    new = torch.randn if small else torch.empty
    dtype = torch.float16 if small else torch.bfloat16
    x = new(B, L, C, dtype=dtype, device=device)
    return OP, (x, None, r), {"protected": 1, "metric": new(B, L, Cm, dtype=dtype, device=device)}


def example_frames(device: torch.device, small: bool):
    """Per-frame merging of 8 frames of 196 tokens after 40 text tokens (All-in-one-B sizes), sizes carried."""
    B, P, T, N, C, r = (2, 3, 4, 9, 8, 3) if small else (32, 40, 8, 196, 768, 16)
    new = torch.randn if small else torch.empty
    x = new(B, P + T * N, C, dtype=torch.float16, device=device)
    size = torch.ones(B, P + T * N, device=device)
    return OP, (x, size, r), {"protected": P, "mode": "frame", "frames": T}


def example_unmerge(device: torch.device, small: bool):
    """ToMe's unmerge: every original token reads its merged row (All-in-one-B frames after r=16)."""
    B, L, Lo, C = (3, 17, 11, 8) if small else (96, 197, 181, 768)
    new = torch.randn if small else torch.empty
    merged = new(B, Lo, C, dtype=torch.float16, device=device)
    dest = torch.randint(0, Lo, (B, L), device=device)
    return "unmerge_tokens", (merged, dest), {}


backends.register_example(OP, example)
backends.register_example(OP, example_frames)
backends.register_example("gather_tokens", example_unmerge)


# ---- FLOPs -------------------------------------------------------------------------------------------------


def merge_flops(x_shape, size_shape, metric_shape, r, protected, mode, frames, backend, *, out_shape=None) -> int:
    B, L, Cm = metric_shape
    lay = layout(L, protected, mode, frames, r)
    return 2 * B * lay.G * lay.nA * lay.nB * Cm


def register_flops(merge_op) -> None:
    from torch.utils.flop_counter import flop_registry, register_flop_formula

    if merge_op not in flop_registry:
        register_flop_formula(merge_op)(merge_flops)
