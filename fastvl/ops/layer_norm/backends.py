"""LayerNorm backends: adapters, declared capabilities, registration, the example call.

Roles: ``forward(x, weight, bias, residual, eps) -> (y, h, mean, rstd)`` and
``backward(dy, dh, x, weight, mean, rstd, need_dw, need_db) -> (dx, dw, db)``, absent outputs as empty
tensors. No optional features; LayerNorm's FLOPs are not counted (like torch's).
"""

from __future__ import annotations

import torch

from fastvl import backends
from fastvl.capabilities import KernelConstant, Limit, triton_kernel

from .reference import layer_norm_reference, layer_norm_reference_backward

OP = "layer_norm"
_ROW_ON_CHIP = "the kernel keeps a whole row on chip"


def layer_norm_triton(x, weight, bias, residual, eps):
    """Fused residual add + LayerNorm, two-stage dW/dB."""
    from fastvl.kernels.layer_norm import layer_norm_forward

    y, h, mean, rstd = layer_norm_forward(x, weight, bias, eps, residual)
    return y, h if h is not None else x.new_empty(0), mean, rstd


def layer_norm_triton_backward(dy, dh, x, weight, mean, rstd, need_dw, need_db):
    from fastvl.kernels.layer_norm import layer_norm_backward

    dx, dw, db = layer_norm_backward(dy, dh, x, weight, mean, rstd, need_dw, need_db)
    return dx, dw if dw is not None else x.new_empty(0), db if db is not None else x.new_empty(0)


TRITON = triton_kernel(
    dtype_args=("x",),
    limits=(Limit("C", "row width C", KernelConstant("fastvl.kernels.layer_norm", "MAX_COLS"), why=_ROW_ON_CHIP),),
)

backends.register(
    OP, "reference", 0, forward=layer_norm_reference, backward=layer_norm_reference_backward,
    description="torch.native_layer_norm in fp32 (+ the add)",
)  # fmt: skip
backends.register(
    OP, "triton", 20, TRITON, requires="triton", forward=layer_norm_triton, backward=layer_norm_triton_backward
)


def example(device: torch.device, small: bool):
    """A ViT-B pre-norm block of All-in-one-B: 96*237 bf16 rows of 768, fp32 weights, the residual stream."""
    M, C, dtype = (13, 40, torch.float32) if small else (96 * 237, 768, torch.bfloat16)
    new = torch.randn if small else torch.empty
    x, residual = (new(M, C, dtype=dtype, device=device) for _ in range(2))
    weight, bias = (new(C, device=device) for _ in range(2))
    return OP, (x, weight, bias, 1e-6, residual), {}


backends.register_example(OP, example)
