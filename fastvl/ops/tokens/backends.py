"""Token op backends: adapters, declared capabilities, registration, the example calls.

Three registry ops (roles all ``forward``):
  ``gather_tokens(x, idx, pos, n_valid) -> (B, K, C)``
  ``scatter_tokens(grad, idx, L) -> (B, L, C)``  (gather's backward when indices may repeat)
  ``draw_tokens(seed, noise, rows, L, K, mode, mask_dtype, device) -> (keep, ids_restore, mask)``
No optional features; gathers and draws have no FLOPs to count.
"""

from __future__ import annotations

import torch

from fastvl import backends
from fastvl.capabilities import TRITON_COPY, Capabilities, Limit
from fastvl.rules import KERNEL_DTYPES

from .reference import MODE_MASK, draw_reference, gather_reference, scatter_reference


def gather_triton(x, idx, pos, n_valid):
    """Row gather, + pos on the fly."""
    from fastvl.kernels.tokens import gather

    return gather(x, idx, pos, n_valid)


def gather_cuda(x, idx, pos, n_valid):
    """16-byte vectorised rows (fastvl._C)."""
    from fastvl import _ext
    from fastvl.kernels.utils import empty

    out = empty((x.shape[0], idx.shape[1], x.shape[2]), x.dtype, x.device)
    _ext.module().gather(x, idx, pos, out, n_valid)
    return out


def scatter_triton(grad, idx, L):
    """Scatter-add backward, fp32 accumulation."""
    from fastvl.kernels.tokens import scatter_add

    return scatter_add(grad, idx, L)


def scatter_cuda(grad, idx, L):
    """16-byte vectorised rows (fastvl._C), fp32 accumulation."""
    from fastvl import _ext

    acc = torch.zeros(grad.shape[0], L, grad.shape[2], dtype=torch.float32, device=grad.device)
    _ext.module().scatter_add(grad, idx, acc)
    return acc.to(grad.dtype)


def draw_triton(seed, noise, rows, L, K, mode, mask_dtype, device):
    """Philox keys ranked pairwise in tiles, one launch."""
    from fastvl.kernels.tokens import draw

    keep, inv, mask = draw(
        rows, L, K, seed=seed, noise=noise, mask_dtype=mask_dtype if mode == MODE_MASK else None, device=device
    )
    return keep, inv, mask if mask is not None else torch.empty(0, dtype=mask_dtype, device=device)


CUDA_ROWS = Capabilities(
    devices=("cuda",), dtypes=KERNEL_DTYPES, dtype_args=("x", "grad"), unit_stride=("x", "grad", "pos")
)
DRAW_TRITON = Capabilities(
    devices=("cuda",),
    interpreter=True,
    dtypes=(torch.float32,),
    dtype_args=("noise",),
    limits=(Limit("L", "L", (1 << 20) - 1, why="the draw packs token indices in 20 bits"),),
)

backends.register("gather_tokens", "reference", 0, forward=gather_reference, description="torch.gather")
backends.register("gather_tokens", "triton", 20, TRITON_COPY, requires="triton", forward=gather_triton)
backends.register("gather_tokens", "cuda", 30, CUDA_ROWS, requires="fastvl._C", forward=gather_cuda)
backends.register("scatter_tokens", "reference", 0, forward=scatter_reference, description="torch.scatter_add_")
backends.register("scatter_tokens", "triton", 20, TRITON_COPY, requires="triton", forward=scatter_triton)
backends.register("scatter_tokens", "cuda", 30, CUDA_ROWS, requires="fastvl._C", forward=scatter_cuda)
backends.register("draw_tokens", "reference", 0, forward=draw_reference, description="torch.rand + argsort (MAE's)")
backends.register("draw_tokens", "triton", 20, DRAW_TRITON, requires="triton", forward=draw_triton)


def _tokens(device: torch.device, small: bool, requires_grad: bool = False) -> torch.Tensor:
    """VideoMAE-L's patch tokens: 64 clips of 1568 tokens, width 1024 (fp16)."""
    B, L, C = (3, 19, 8) if small else (64, 1568, 1024)
    x = (torch.randn if small else torch.empty)(B, L, C, dtype=torch.float16, device=device)
    return x.requires_grad_(requires_grad)


def example_gather(device: torch.device, small: bool):
    """A quarter of the tokens kept, repeated indices allowed (the backward scatters)."""
    x = _tokens(device, small, requires_grad=True)
    idx = torch.randint(0, x.shape[1], (x.shape[0], x.shape[1] // 4), device=device)
    return "gather_tokens", (x, idx), {}


def example_masking(device: torch.device, small: bool):
    """MAE / VideoMAE masking at ratio 0.75."""
    return "random_masking", (_tokens(device, small), 0.75), {}


backends.register_example("gather_tokens", example_gather)
backends.register_example("scatter_tokens", example_gather)
backends.register_example("draw_tokens", example_masking)
backends.register_example("gather_tokens", lambda device, small: ("drop_tokens", (_tokens(device, small), 0.5), {}))
