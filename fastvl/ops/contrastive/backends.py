"""Contrastive-loss backends: the Triton adapters, declared capabilities, registration for the three losses,
the example calls and the FLOP formulas.

Each loss (``clip_loss``, ``mil_nce_loss``, ``siglip_loss``) is a registry op with the same three backends;
their roles are the primitives of :mod:`.reference`: ``lse``, ``lse_backward``, ``siglip``,
``siglip_backward``. Backends: ``reference`` (materialises X: the spec's memory), ``chunked`` (plain PyTorch
over row blocks, :mod:`.chunked`), ``triton`` (fused tiles in registers, fp32 accumulation). No optional
features; ``Call.params`` carries ``M``, ``N`` (logits) and ``D`` (feature width).
"""

from __future__ import annotations

import torch

from fastvl import backends
from fastvl.backends import Call
from fastvl.capabilities import KernelConstant, Limit, triton_kernel

from . import chunked
from .reference import lse_backward_reference, lse_reference, siglip_backward_reference, siglip_sum_reference

OPS = ("clip_loss", "mil_nce_loss", "siglip_loss")
ROLES = {"clip_loss": ("a", "b"), "mil_nce_loss": ("video", "text"), "siglip_loss": ("a", "b")}
"""The argument names of q and k in each loss's Call (the names reasons use)."""

AUTO_CHUNKED_MIN_ELEMS = 1 << 22
"""Under auto, chunked replaces the reference from M * N >= 2^22 logits (B >= 2048 for CLIP). Below it
the logits fit in one chunk anyway (chunked would run the same single block plus its Python loop) and
the reference's handful of M x N fp32 temporaries (< ~100 MiB) do not dominate memory; above it they
grow as B^2 (B = 32768: 4 GiB per matrix) while chunked stays at a few CHUNK_ELEMS blocks."""


def lse_triton(q, k, scale, col_mask, symmetric):
    """Fused tiles in registers, per-row/column LSE, tiles recomputed in backward."""
    from fastvl.kernels.contrastive import lse_forward

    return lse_forward(q, k, scale, col_mask, symmetric)


def lse_backward_triton(q, k, scale, col_mask, alpha, rho, beta, gamma, need_q, need_k):
    from fastvl.kernels.contrastive import lse_backward

    return lse_backward(q, k, scale, col_mask, alpha, rho, beta, gamma, need_q, need_k)


def siglip_triton(q, k, scale, bias, offset):
    from fastvl.kernels.contrastive import siglip_forward

    return siglip_forward(q, k, scale, bias, offset)


def siglip_backward_triton(q, k, scale, bias, grad, offset, need_q, need_k):
    from fastvl.kernels.contrastive import siglip_backward

    return siglip_backward(q, k, scale, bias, grad.float().reshape(1), offset, need_q, need_k)


def chunked_below_threshold(call: Call) -> list[str]:
    """auto takes chunked from M*N >= AUTO_CHUNKED_MIN_ELEMS logits."""
    if call.explicit:
        return []
    M, N = call.params["M"], call.params["N"]
    if M * N < AUTO_CHUNKED_MIN_ELEMS:
        return [
            f"{M}x{N} logits ({M * N * 4 / 2**20:.1f} MiB in fp32) are below auto's chunking threshold of "
            f"{AUTO_CHUNKED_MIN_ELEMS} logits: one block would hold them all, so the reference is as lean"
        ]
    return []


_MAX_D = KernelConstant("fastvl.kernels.contrastive", "MAX_D")
_WIDTH = Limit("D", "feature width D", _MAX_D, why="the fused backward keeps (block, D) tiles in registers")
REFERENCE = dict(
    lse=lse_reference, lse_backward=lse_backward_reference, siglip=siglip_sum_reference,
    siglip_backward=siglip_backward_reference, description="materialised B x B logits (plain PyTorch)",
)  # fmt: skip
CHUNKED = dict(
    lse=chunked.lse_chunked, lse_backward=chunked.lse_backward_chunked, siglip=chunked.siglip_sum_chunked,
    siglip_backward=chunked.siglip_backward_chunked,
    description="plain PyTorch over row blocks, online LSE, blocks recomputed in backward: O(B * block) memory",
)  # fmt: skip
TRITON = dict(
    lse=lse_triton, lse_backward=lse_backward_triton, siglip=siglip_triton, siglip_backward=siglip_backward_triton
)

for op in OPS:
    backends.register(op, "reference", 0, **REFERENCE)
    backends.register(op, "chunked", 10, check=chunked_below_threshold, **CHUNKED)
    backends.register(
        op, "triton", 20, triton_kernel(dtype_args=ROLES[op], limits=(_WIDTH,)), requires="triton", **TRITON
    )


def _example(op: str, P: int = 0):
    """B = 32768 fp16 features of width 256 (``P`` texts per clip for MIL-NCE)."""

    def make(device: torch.device, small: bool):
        B, D = (24, 16) if small else (32768, 256)
        new = torch.randn if small else torch.empty
        a = new(B, D, dtype=torch.float16, device=device)
        b = new(*((B, P, D) if P else (B, D)), dtype=torch.float16, device=device)
        return op, (a, b, 10.0) + ((-10.0,) if op == "siglip_loss" else ()), {}

    return make


backends.register_example("clip_loss", _example("clip_loss"))
backends.register_example("mil_nce_loss", _example("mil_nce_loss", P=3))
backends.register_example("siglip_loss", _example("siglip_loss"))


# FLOPs are counted like the reference's autograd: 2*M*N*D for the logits matmul, 2*M*N*D per input
# gradient in backward (the fused backends' recomputation is not counted), so reports agree across backends.


def forward_flops(q_shape, k_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * q_shape[0] * k_shape[0] * q_shape[1]


def lse_backward_flops(q_shape, k_shape, scale, mask, alpha, rho, beta, gamma, need_q, need_k, *args, out_shape=None):
    return 2 * q_shape[0] * k_shape[0] * q_shape[1] * (int(need_q) + int(need_k))


def siglip_backward_flops(q_shape, k_shape, scale, bias, grad, offset, need_q, need_k, *args, out_shape=None):
    return 2 * q_shape[0] * k_shape[0] * q_shape[1] * (int(need_q) + int(need_k))


def register_flops(lse_op, lse_backward_op, siglip_op, siglip_backward_op) -> None:
    from torch.utils.flop_counter import register_flop_formula

    register_flop_formula([lse_op, siglip_op])(forward_flops)
    register_flop_formula(lse_backward_op)(lse_backward_flops)
    register_flop_formula(siglip_backward_op)(siglip_backward_flops)
