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
from fastvl.capabilities import Capabilities, Limit
from fastvl.rules import KERNEL_DTYPES

from .reference import MODE_MASK, draw_reference, gather_reference, scatter_reference


def gather_triton(x, idx, pos, n_valid):
    from fastvl.kernels.tokens import gather

    return gather(x, idx, pos, n_valid)


def gather_cuda(x, idx, pos, n_valid):
    from fastvl import _ext
    from fastvl.kernels.utils import empty

    out = empty((x.shape[0], idx.shape[1], x.shape[2]), x.dtype, x.device)
    _ext.module().gather(x, idx, pos, out, n_valid)
    return out


def scatter_triton(grad, idx, L):
    from fastvl.kernels.tokens import scatter_add

    return scatter_add(grad, idx, L)


def scatter_cuda(grad, idx, L):
    from fastvl import _ext

    acc = torch.zeros(grad.shape[0], L, grad.shape[2], dtype=torch.float32, device=grad.device)
    _ext.module().scatter_add(grad, idx, acc)
    return acc.to(grad.dtype)


def draw_triton(seed, noise, rows, L, K, mode, mask_dtype, device):
    from fastvl.kernels.tokens import draw

    keep, inv, mask = draw(
        rows, L, K, seed=seed, noise=noise, mask_dtype=mask_dtype if mode == MODE_MASK else None, device=device
    )
    return keep, inv, mask if mask is not None else torch.empty(0, dtype=mask_dtype, device=device)


_TRITON = Capabilities(devices=("cuda",), interpreter=True)
_CUDA_ROWS = Capabilities(
    devices=("cuda",), dtypes=KERNEL_DTYPES, dtype_args=("x", "grad"), unit_stride=("x", "grad", "pos")
)

for op, reference, triton, cuda, what in (
    ("gather_tokens", gather_reference, gather_triton, gather_cuda, "row gather, + pos on the fly"),
    ("scatter_tokens", scatter_reference, scatter_triton, scatter_cuda, "scatter-add backward"),
):
    backends.register(
        op, "reference", priority=0, impls={"forward": reference}, description="torch.gather / scatter_add_"
    )
    backends.register(
        op, "triton", priority=20, capabilities=_TRITON, requires="triton", impls={"forward": triton}, description=what
    )
    backends.register(
        op,
        "cuda",
        priority=30,
        capabilities=_CUDA_ROWS,
        requires="fastvl._C",
        impls={"forward": cuda},
        description="16-byte vectorised rows (fastvl._C)",
    )
backends.register(
    "draw_tokens",
    "reference",
    priority=0,
    impls={"forward": draw_reference},
    description="torch.rand + argsort (MAE's code)",
)
backends.register(
    "draw_tokens",
    "triton",
    priority=20,
    capabilities=Capabilities(
        devices=("cuda",),
        interpreter=True,
        dtypes=(torch.float32,),
        dtype_args=("noise",),
        limits=(Limit("L", "L", (1 << 20) - 1, why="the draw packs token indices in 20 bits"),),
    ),
    requires="triton",
    impls={"forward": draw_triton},
    description="Philox keys ranked pairwise in tiles, one launch",
)


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
